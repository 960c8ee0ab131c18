"""Location–scale schedules in u = ln σ, and the standard distributions they are built from.

Most published schedules are symmetric location–scale families in logSNR: λ = μ + b·Z with Z a standard symmetric
distribution (normal, Laplace, Cauchy, logistic, hyperbolic secant, uniform). Because u = ln σ = −λ/2 and Z ≅ −Z,
the same family in u is

    u = m + β·Z,   m = −μ/2,   β = b/2,
    p_u(u) = p_Z((u − m)/β)/β,   F_u(u) = F_Z((u − m)/β),   F_u⁻¹(q) = m + β·F_Z⁻¹(q).

``LocationScaleSchedule`` implements that once; a schedule only names its standard distribution. Each standard
distribution below has an exact float64 log-density, CDF and inverse CDF, written so that both tails keep their
relative accuracy (the lower tail through small-argument forms, the upper tail through 1 − q, which is exact in
floating point for q ≥ ½); ``icdf(cdf(u)) = u`` therefore holds far into the lower tail, and in the upper tail as long
as 1 − F(u) is representable next to 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from diffusion.schedules.base import NoiseSchedule

_LOG_PI = math.log(math.pi)
_LOG_2 = math.log(2.0)


# ---------------------------------------------------------------------------------------------------------------------
# Standard normal: p(z) = exp(−z²/2)/√(2π).

def normal_log_pdf(z: Tensor) -> Tensor:
    return -0.5 * z.square() - 0.5 * math.log(2.0 * math.pi)


def normal_cdf(z: Tensor) -> Tensor:
    # Φ(z) = ½·erfc(−z/√2), evaluated on the tail side (torch.special.ndtr loses the lower tail below z ≈ −7).
    tail = 0.5 * torch.special.erfc(z.abs() / math.sqrt(2.0))
    return torch.where(z < 0, tail, 1.0 - tail)


def normal_icdf(q: Tensor) -> Tensor:
    return torch.special.ndtri(q)


# ---------------------------------------------------------------------------------------------------------------------
# Standard Laplace: p(z) = ½·exp(−|z|);  F(z) = ½·e^z (z < 0), 1 − ½·e^(−z) (z ≥ 0).

def laplace_log_pdf(z: Tensor) -> Tensor:
    return -z.abs() - _LOG_2


def laplace_cdf(z: Tensor) -> Tensor:
    half_tail = 0.5 * torch.exp(-z.abs())
    return torch.where(z < 0, half_tail, 1.0 - half_tail)


def laplace_icdf(q: Tensor) -> Tensor:
    return torch.where(q < 0.5, torch.log(2.0 * q), -torch.log(2.0 * (1.0 - q)))


# ---------------------------------------------------------------------------------------------------------------------
# Standard Cauchy: p(z) = 1/(π(1 + z²));  F(z) = ½ + atan(z)/π, written as atan(−1/z)/π in the lower tail (z < −1)
# and 1 − atan(1/z)/π in the upper tail (z > 1) to avoid the cancellation of ½ + atan(z)/π.

def cauchy_log_pdf(z: Tensor) -> Tensor:
    return -_LOG_PI - torch.log1p(z.square())


def cauchy_cdf(z: Tensor) -> Tensor:
    safe = torch.where(z.abs() > 1.0, z, torch.ones_like(z))
    lower = torch.atan(-1.0 / safe) / math.pi
    upper = 1.0 - torch.atan(1.0 / safe) / math.pi
    middle = 0.5 + torch.atan(z) / math.pi
    return torch.where(z < -1.0, lower, torch.where(z > 1.0, upper, middle))


def cauchy_icdf(q: Tensor) -> Tensor:
    # tan(π(q − ½)) = −1/tan(πq) = 1/tan(π(1 − q)); each branch uses the argument that is small in its tail.
    return torch.where(q < 0.5, -1.0 / torch.tan(math.pi * q), 1.0 / torch.tan(math.pi * (1.0 - q)))


# ---------------------------------------------------------------------------------------------------------------------
# Standard logistic: p(z) = e^(−|z|)/(1 + e^(−|z|))²;  F(z) = sigmoid(z);  F⁻¹(q) = ln q − ln(1 − q).

def logistic_log_pdf(z: Tensor) -> Tensor:
    a = z.abs()
    return -a - 2.0 * torch.log1p(torch.exp(-a))


def logistic_cdf(z: Tensor) -> Tensor:
    return torch.sigmoid(z)


def logistic_icdf(q: Tensor) -> Tensor:
    return torch.log(q) - torch.log1p(-q)


# ---------------------------------------------------------------------------------------------------------------------
# Hyperbolic secant in the form the cosine schedule induces: p(z) = sech(z)/π;  F(z) = (2/π)·atan(e^z);
# F⁻¹(q) = ln tan(πq/2), written as −ln tan(π(1 − q)/2) for q > ½.

def sech_log_pdf(z: Tensor) -> Tensor:
    a = z.abs()
    log_cosh = a + torch.log1p(torch.exp(-2.0 * a)) - _LOG_2
    return -_LOG_PI - log_cosh


def sech_cdf(z: Tensor) -> Tensor:
    tail = (2.0 / math.pi) * torch.atan(torch.exp(-z.abs()))
    return torch.where(z <= 0, tail, 1.0 - tail)


def sech_icdf(q: Tensor) -> Tensor:
    lower = torch.log(torch.tan(0.5 * math.pi * q))
    upper = -torch.log(torch.tan(0.5 * math.pi * (1.0 - q)))
    return torch.where(q <= 0.5, lower, upper)


# ---------------------------------------------------------------------------------------------------------------------
# Uniform on [−1, 1]: p(z) = ½ inside, 0 outside;  F(z) = clamp((z + 1)/2, 0, 1);  F⁻¹(q) = 2q − 1.

def uniform_log_pdf(z: Tensor) -> Tensor:
    inside = (z >= -1.0) & (z <= 1.0)
    return torch.where(inside, torch.full_like(z, -_LOG_2), torch.full_like(z, -math.inf))


def uniform_cdf(z: Tensor) -> Tensor:
    return ((z + 1.0) * 0.5).clamp(0.0, 1.0)


def uniform_icdf(q: Tensor) -> Tensor:
    return 2.0 * q - 1.0


# ---------------------------------------------------------------------------------------------------------------------

class LocationScaleSchedule(NoiseSchedule):
    """u = ln σ = loc + scale·Z with Z a standard distribution given by ``std_log_pdf``, ``std_cdf``, ``std_icdf``."""

    std_log_pdf: Callable[[Tensor], Tensor]
    std_cdf: Callable[[Tensor], Tensor]
    std_icdf: Callable[[Tensor], Tensor]

    def __init__(self, loc: float, scale: float, **policy: Any):
        super().__init__(**policy)
        if not (math.isfinite(loc) and math.isfinite(scale) and scale > 0):
            raise ValueError(f"schedule={self.name}: need a finite location and a scale > 0 in ln σ, got "
                             f"loc={loc}, scale={scale}")
        self.loc = float(loc)
        self.scale = float(scale)

    def _log_density(self, u: Tensor) -> Tensor:
        return self.std_log_pdf((u - self.loc) / self.scale) - math.log(self.scale)

    def _cdf(self, u: Tensor) -> Tensor:
        return self.std_cdf((u - self.loc) / self.scale)

    def _icdf(self, q: Tensor) -> Tensor:
        return self.loc + self.scale * self.std_icdf(q)


def with_truncation(text: str, schedule: NoiseSchedule) -> str:
    """``extra_repr`` helper: a schedule's own parameters followed by its shared settings (support, convention)."""
    policy = schedule.policy_repr()
    return text + (f", {policy}" if policy else "")
