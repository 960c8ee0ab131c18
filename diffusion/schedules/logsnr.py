"""Schedules defined directly as densities over logSNR λ (Hang et al. 2024, arXiv 2407.03297, Sec. 3; Kingma & Gao
2023).

Each is a location–scale family in λ, hence in u = ln σ = −λ/2 with location −μ/2 and scale b/2
(``location_scale``). Time convention of Hang et al.: t = 1 − CDF_λ(λ) = CDF_u(u), t = 0 clean.

``laplace`` (Hang et al. 2024, the proposed schedule; μ = 0, b = 0.5 on ImageNet-256, b = 0.75 at 512):
    p(λ) = exp(−|λ − μ|/b)/(2b),   λ(t) = μ − b·sgn(½ − t)·ln(1 − 2|t − ½|)
    in ln σ: u ~ Laplace(−μ/2, b/2):  p(u) = exp(−|u + μ/2|/(b/2))/b,
             F(u) = ½·exp((u + μ/2)/(b/2)) below the median, 1 − ½·exp(−(u + μ/2)/(b/2)) above.
    Mass in |λ| < a (μ = 0): 1 − exp(−a/b), e.g. 1 − e⁻² ≈ 0.8647 for a = 1, b = 0.5.

``cauchy`` (Hang et al. 2024, proposed variant; we could not find their μ, γ — we default to μ = 0, γ = 1):
    p(λ) = γ/(π((λ − μ)² + γ²)),   λ(t) = μ + γ·tan(π(½ − t))
    in ln σ: u ~ Cauchy(−μ/2, γ/2):  p(u) = (γ/2)/(π((u + μ/2)² + γ²/4)),  F(u) = ½ + atan((u + μ/2)/(γ/2))/π.

``uniform_logsnr`` — λ ~ U[λ_min, λ_max] (the uniform-logSNR schedule of Kingma & Gao 2023 / VDM++):
    p(λ) = 1/(λ_max − λ_min),   λ(t) = λ_max − t·(λ_max − λ_min)
    in ln σ: u ~ U[−λ_max/2, −λ_min/2],  p(u) = 2/(λ_max − λ_min).
    Defaults λ ∈ [−2·ln 80, −2·ln 0.002] ≈ [−8.764, 12.429]: exactly EDM's sampling range σ ∈ [0.002, 80], so the
    schedule spends training uniformly over the log noise levels the sampler visits (our choice; there is no single
    published range).
"""

from __future__ import annotations

import math

from diffusion.schedules.base import SigmaRange
from diffusion.schedules.location_scale import (
    LocationScaleSchedule,
    cauchy_cdf,
    cauchy_icdf,
    cauchy_log_pdf,
    laplace_cdf,
    laplace_icdf,
    laplace_log_pdf,
    uniform_cdf,
    uniform_icdf,
    uniform_log_pdf,
    with_truncation,
)

# λ range of EDM's default sampler, σ ∈ [0.002, 80].
EDM_SAMPLER_LOGSNR_MIN = -2.0 * math.log(80.0)
EDM_SAMPLER_LOGSNR_MAX = -2.0 * math.log(0.002)


def _finite(name: str, **values: float) -> None:
    for key, value in values.items():
        if not math.isfinite(value):
            raise ValueError(f"schedule={name}: {key} must be finite, got {value}")


class Laplace(LocationScaleSchedule):
    """λ ~ Laplace(mu, b)."""

    name = "laplace"
    std_log_pdf = staticmethod(laplace_log_pdf)
    std_cdf = staticmethod(laplace_cdf)
    std_icdf = staticmethod(laplace_icdf)

    def __init__(self, mu: float = 0.0, b: float = 0.5, *,
                 sigma_range: SigmaRange = None, snr_reference: str = "unit", sigma_data: float | None = None,
                 sigma_min: float | None = None, sigma_max: float | None = None):
        _finite(self.name, mu=mu, b=b)
        if not b > 0:
            raise ValueError(f"schedule=laplace: b must be > 0, got {b}")
        super().__init__(loc=-0.5 * mu, scale=0.5 * b,
                         sigma_range=sigma_range, snr_reference=snr_reference, sigma_data=sigma_data,
                         sigma_min=sigma_min, sigma_max=sigma_max)
        self.mu, self.b = float(mu), float(b)

    def extra_repr(self) -> str:
        return with_truncation(f"mu={self.mu}, b={self.b}", self)


class Cauchy(LocationScaleSchedule):
    """λ ~ Cauchy(mu, gamma)."""

    name = "cauchy"
    std_log_pdf = staticmethod(cauchy_log_pdf)
    std_cdf = staticmethod(cauchy_cdf)
    std_icdf = staticmethod(cauchy_icdf)

    def __init__(self, mu: float = 0.0, gamma: float = 1.0, *,
                 sigma_range: SigmaRange = None, snr_reference: str = "unit", sigma_data: float | None = None,
                 sigma_min: float | None = None, sigma_max: float | None = None):
        _finite(self.name, mu=mu, gamma=gamma)
        if not gamma > 0:
            raise ValueError(f"schedule=cauchy: gamma must be > 0, got {gamma}")
        super().__init__(loc=-0.5 * mu, scale=0.5 * gamma,
                         sigma_range=sigma_range, snr_reference=snr_reference, sigma_data=sigma_data,
                         sigma_min=sigma_min, sigma_max=sigma_max)
        self.mu, self.gamma = float(mu), float(gamma)

    def extra_repr(self) -> str:
        return with_truncation(f"mu={self.mu}, gamma={self.gamma}", self)


class UniformLogSNR(LocationScaleSchedule):
    """λ ~ U[logsnr_min, logsnr_max]."""

    name = "uniform_logsnr"
    std_log_pdf = staticmethod(uniform_log_pdf)
    std_cdf = staticmethod(uniform_cdf)
    std_icdf = staticmethod(uniform_icdf)

    def __init__(self, logsnr_min: float = EDM_SAMPLER_LOGSNR_MIN, logsnr_max: float = EDM_SAMPLER_LOGSNR_MAX, *,
                 sigma_range: SigmaRange = None, snr_reference: str = "unit", sigma_data: float | None = None,
                 sigma_min: float | None = None, sigma_max: float | None = None):
        _finite(self.name, logsnr_min=logsnr_min, logsnr_max=logsnr_max)
        if not logsnr_min < logsnr_max:
            raise ValueError(f"schedule=uniform_logsnr: need logsnr_min < logsnr_max, got {logsnr_min} and "
                             f"{logsnr_max}")
        # u ∈ [−λ_max/2, −λ_min/2]: centre −(λ_min + λ_max)/4, half-width (λ_max − λ_min)/4.
        super().__init__(loc=-0.25 * (logsnr_min + logsnr_max), scale=0.25 * (logsnr_max - logsnr_min),
                         sigma_range=sigma_range, snr_reference=snr_reference, sigma_data=sigma_data,
                         sigma_min=sigma_min, sigma_max=sigma_max)
        self.logsnr_min, self.logsnr_max = float(logsnr_min), float(logsnr_max)

    def extra_repr(self) -> str:
        return with_truncation(f"logsnr_min={self.logsnr_min:.6g}, logsnr_max={self.logsnr_max:.6g}", self)
