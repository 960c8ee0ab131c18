"""Rectified-flow (flow matching) time distributions, mapped to σ.

Rectified flow / flow matching with the optimal-transport path (Lipman et al. 2023; Liu et al. 2022) noises as
x_τ = (1 − τ)·y + τ·n, which is EDM's x = y + σ·n divided by (1 + σ) with σ = τ/(1 − τ). So
u = ln σ = logit(τ) and λ = 2·ln((1 − τ)/τ) = −2·logit(τ). Both schedules accept SD3's resolution ``shift``
(Esser et al. 2024, Eq. 23: τ' = shift·τ/(1 + (shift − 1)·τ)), which is σ' = shift·σ, i.e. u' = u + ln(shift).

``fm_ot`` — τ ~ U(0, 1) (the plain flow-matching / rectified-flow schedule):
    ln σ ~ Logistic(ln shift, 1):  p(u) = e^(−|u−m|)/(1 + e^(−|u−m|))²,  F(u) = sigmoid(u − m),  F⁻¹(q) = m + logit(q)
    in logSNR (shift = 1): p(λ) = sech²(λ/4)/8,  λ(t) = 2·ln((1 − t)/t).

``logit_normal`` — SD3's timestep density (Esser et al. 2024, arXiv 2403.03206, Sec. 3.1): τ = sigmoid(m + s·z),
z ~ N(0, 1), defaults m = 0, s = 1. Then u = logit(τ) + ln shift ~ N(m + ln shift, s²), i.e. a log-normal in σ:
    p(u) = N(u; m + ln shift, s²),   λ(t) = 2·ln((1 − τ)/τ) with τ = sigmoid(m + s·Φ⁻¹(t)),
    in logSNR: λ ~ N(−2(m + ln shift), (2s)²).
"""

from __future__ import annotations

import math

from diffusion.schedules.base import SigmaRange
from diffusion.schedules.location_scale import (
    LocationScaleSchedule,
    logistic_cdf,
    logistic_icdf,
    logistic_log_pdf,
    normal_cdf,
    normal_icdf,
    normal_log_pdf,
    with_truncation,
)


def _check_shift(name: str, shift: float) -> float:
    if not (math.isfinite(shift) and shift > 0):
        raise ValueError(f"schedule={name}: shift must be a finite number > 0, got {shift}")
    return float(shift)


class FlowMatchingOT(LocationScaleSchedule):
    """τ ~ U(0, 1) on the rectified-flow path: ln σ ~ Logistic(ln shift, 1)."""

    name = "fm_ot"
    std_log_pdf = staticmethod(logistic_log_pdf)
    std_cdf = staticmethod(logistic_cdf)
    std_icdf = staticmethod(logistic_icdf)

    def __init__(self, shift: float = 1.0, *,
                 sigma_range: SigmaRange = None, snr_reference: str = "unit", sigma_data: float | None = None,
                 sigma_min: float | None = None, sigma_max: float | None = None):
        shift = _check_shift(self.name, shift)
        super().__init__(loc=math.log(shift), scale=1.0,
                         sigma_range=sigma_range, snr_reference=snr_reference, sigma_data=sigma_data,
                         sigma_min=sigma_min, sigma_max=sigma_max)
        self.shift = shift

    def extra_repr(self) -> str:
        return with_truncation(f"shift={self.shift}", self)


class LogitNormal(LocationScaleSchedule):
    """SD3's logit-normal timesteps τ = sigmoid(m + s·z) on the rectified-flow path: ln σ ~ N(m + ln shift, s²)."""

    name = "logit_normal"
    std_log_pdf = staticmethod(normal_log_pdf)
    std_cdf = staticmethod(normal_cdf)
    std_icdf = staticmethod(normal_icdf)

    def __init__(self, m: float = 0.0, s: float = 1.0, shift: float = 1.0, *,
                 sigma_range: SigmaRange = None, snr_reference: str = "unit", sigma_data: float | None = None,
                 sigma_min: float | None = None, sigma_max: float | None = None):
        if not s > 0:
            raise ValueError(f"schedule=logit_normal: s must be > 0, got {s}")
        shift = _check_shift(self.name, shift)
        super().__init__(loc=float(m) + math.log(shift), scale=float(s),
                         sigma_range=sigma_range, snr_reference=snr_reference, sigma_data=sigma_data,
                         sigma_min=sigma_min, sigma_max=sigma_max)
        self.m, self.s, self.shift = float(m), float(s), shift

    def extra_repr(self) -> str:
        return with_truncation(f"m={self.m}, s={self.s}, shift={self.shift}", self)
