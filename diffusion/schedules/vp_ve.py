"""EDM's training distributions for the VP and VE baselines (Karras et al. 2022, Table 1, "VP" and "VE" columns).

``vp`` — Song et al. (2021)'s variance-preserving SDE with linear β(t) = β_min + β_d·t, trained with t ~ U[ε_t, 1]:
    σ(t) = √(exp(½β_d·t² + β_min·t) − 1),   β_d = 19.9, β_min = 0.1, ε_t = 1e-5  (σ ∈ [≈0.0010, ≈152.2])
    inverse: with x = ln(1 + σ²),  t(σ) = (√(β_min² + 2β_d·x) − β_min)/β_d = 2x/(√(β_min² + 2β_d·x) + β_min)
    in ln σ: F(u) = (t(e^u) − ε_t)/(1 − ε_t) on [u(ε_t), u(1)],  F⁻¹(q) = ½·ln expm1(½β_d·t² + β_min·t) with
             t = ε_t + q(1 − ε_t),  p(u) = dt/du/(1 − ε_t) = 2·sigmoid(2u)/((β_d·t(u) + β_min)(1 − ε_t))
    in logSNR: λ(t) = −ln expm1(½β_d·t'² + β_min·t') with t' = ε_t + t(1 − ε_t) (Hang's t = CDF_u).
The rationalised form of t(σ) and log1p/expm1 keep the small-σ end accurate.

``ve`` — Song et al. (2021)'s variance-exploding SDE as EDM trains it: ln σ ~ U[ln σ_low, ln σ_high], σ_low = 0.02,
σ_high = 100 (EDM's VELoss sigma_min/sigma_max, renamed here so as not to clash with the truncation bounds):
    p(u) = 1/ln(σ_high/σ_low) on the interval,  F(u) = (u − ln σ_low)/ln(σ_high/σ_low),
    F⁻¹(q) = ln σ_low + q·ln(σ_high/σ_low)
    in logSNR: λ ~ U[−2·ln σ_high, −2·ln σ_low],  λ(t) = −2·(ln σ_low + t·ln(σ_high/σ_low)).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn import functional as F

from diffusion.schedules.base import NoiseSchedule, SigmaRange
from diffusion.schedules.location_scale import (
    LocationScaleSchedule,
    uniform_cdf,
    uniform_icdf,
    uniform_log_pdf,
    with_truncation,
)


def _softplus(x: Tensor) -> Tensor:
    """ln(1 + e^x) without overflow and without torch's linear cut-off."""
    return x.clamp(min=0) + torch.log1p(torch.exp(-x.abs()))


def vp_sigma(t: Tensor, beta_d: float = 19.9, beta_min: float = 0.1) -> Tensor:
    """σ(t) = √(exp(½β_d t² + β_min t) − 1) of the linear-β VP SDE."""
    return torch.sqrt(torch.expm1(0.5 * beta_d * t**2 + beta_min * t))


def vp_sigma_inv_from_log1p_sigma2(x: Tensor, beta_d: float = 19.9, beta_min: float = 0.1) -> Tensor:
    """t(σ) from x = ln(1 + σ²): the positive root of ½β_d t² + β_min t = x, in cancellation-free form."""
    return 2.0 * x / (torch.sqrt(beta_min**2 + 2.0 * beta_d * x) + beta_min)


def vp_sigma_inv(sigma: Tensor, beta_d: float = 19.9, beta_min: float = 0.1) -> Tensor:
    """t(σ), the inverse of ``vp_sigma``."""
    return vp_sigma_inv_from_log1p_sigma2(torch.log1p(sigma**2), beta_d, beta_min)


class VP(NoiseSchedule):
    """EDM's VP training distribution: t ~ U[epsilon_t, 1], σ = σ_VP(t)."""

    name = "vp"

    def __init__(self, beta_d: float = 19.9, beta_min: float = 0.1, epsilon_t: float = 1e-5, *,
                 sigma_range: SigmaRange = None, snr_reference: str = "unit", sigma_data: float | None = None,
                 sigma_min: float | None = None, sigma_max: float | None = None):
        super().__init__(sigma_range=sigma_range, snr_reference=snr_reference, sigma_data=sigma_data,
                         sigma_min=sigma_min, sigma_max=sigma_max)
        if not (math.isfinite(beta_d) and math.isfinite(beta_min) and beta_d >= 0 and beta_min >= 0
                and beta_d + beta_min > 0):
            raise ValueError(f"schedule=vp: need beta_d >= 0, beta_min >= 0, not both 0; got {beta_d}, {beta_min}")
        if not 0 <= epsilon_t < 1:
            raise ValueError(f"schedule=vp: epsilon_t must be in [0, 1), got {epsilon_t}")
        self.beta_d, self.beta_min, self.epsilon_t = float(beta_d), float(beta_min), float(epsilon_t)

    def _t_of_u(self, u: Tensor) -> Tensor:
        return vp_sigma_inv_from_log1p_sigma2(_softplus(2.0 * u), self.beta_d, self.beta_min)

    def _u_of_t(self, t: Tensor) -> Tensor:
        return 0.5 * torch.log(torch.expm1(0.5 * self.beta_d * t**2 + self.beta_min * t))

    def _log_density(self, u: Tensor) -> Tensor:
        t = self._t_of_u(u)
        out = (math.log(2.0) + F.logsigmoid(2.0 * u) - torch.log(self.beta_d * t + self.beta_min)
               - math.log1p(-self.epsilon_t))
        inside = (t >= self.epsilon_t) & (t <= 1.0)
        return out.masked_fill(~inside, -math.inf)

    def _cdf(self, u: Tensor) -> Tensor:
        return ((self._t_of_u(u) - self.epsilon_t) / (1.0 - self.epsilon_t)).clamp(0.0, 1.0)

    def _icdf(self, q: Tensor) -> Tensor:
        return self._u_of_t(self.epsilon_t + q * (1.0 - self.epsilon_t))

    def extra_repr(self) -> str:
        return with_truncation(f"beta_d={self.beta_d}, beta_min={self.beta_min}, epsilon_t={self.epsilon_t}", self)


class VE(LocationScaleSchedule):
    """EDM's VE training distribution: ln σ ~ U[ln sigma_low, ln sigma_high]."""

    name = "ve"
    logsnr_parameterised = False  # stated in σ (EDM's VE range [0.02, 100])
    std_log_pdf = staticmethod(uniform_log_pdf)
    std_cdf = staticmethod(uniform_cdf)
    std_icdf = staticmethod(uniform_icdf)

    def __init__(self, sigma_low: float = 0.02, sigma_high: float = 100.0, *,
                 sigma_range: SigmaRange = None, snr_reference: str = "unit", sigma_data: float | None = None,
                 sigma_min: float | None = None, sigma_max: float | None = None):
        if not 0 < sigma_low < sigma_high < math.inf:
            raise ValueError(f"schedule=ve: need 0 < sigma_low < sigma_high < inf, got {sigma_low}, {sigma_high}")
        a, b = math.log(sigma_low), math.log(sigma_high)
        super().__init__(loc=0.5 * (a + b), scale=0.5 * (b - a),
                         sigma_range=sigma_range, snr_reference=snr_reference, sigma_data=sigma_data,
                         sigma_min=sigma_min, sigma_max=sigma_max)
        self.sigma_low, self.sigma_high = float(sigma_low), float(sigma_high)

    def extra_repr(self) -> str:
        return with_truncation(f"sigma_low={self.sigma_low}, sigma_high={self.sigma_high}", self)
