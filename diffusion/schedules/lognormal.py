"""EDM's log-normal training distribution (Karras et al. 2022, Sec. 5): ln σ ~ N(p_mean, p_std²).

EDM uses p_mean = −1.2, p_std = 1.2 (CIFAR-10, ImageNet-64); EDM2 uses p_mean = −0.4, p_std = 1.0 (ImageNet-512).
In logSNR this is λ = −2·ln σ ~ N(−2·p_mean, (2·p_std)²), i.e. N(2.4, 2.4²) for EDM.

    p(u) = exp(−(u − μ)²/(2s²)) / (s·√(2π)),   F(u) = Φ((u − μ)/s),   F⁻¹(q) = μ + s·Φ⁻¹(q)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from diffusion.schedules.base import NoiseSchedule


class LogNormal(NoiseSchedule):
    name = "lognormal"

    def __init__(self, p_mean: float = -1.2, p_std: float = 1.2, sigma_min: float | None = None,
                 sigma_max: float | None = None):
        super().__init__(sigma_min=sigma_min, sigma_max=sigma_max)
        if not p_std > 0:
            raise ValueError(f"schedule.p_std must be > 0, got {p_std}")
        self.p_mean = float(p_mean)
        self.p_std = float(p_std)

    def _log_density(self, u: Tensor) -> Tensor:
        z = (u - self.p_mean) / self.p_std
        return -0.5 * z.square() - math.log(self.p_std * math.sqrt(2.0 * math.pi))

    def _cdf(self, u: Tensor) -> Tensor:
        return torch.special.ndtr((u - self.p_mean) / self.p_std)

    def _icdf(self, q: Tensor) -> Tensor:
        return self.p_mean + self.p_std * torch.special.ndtri(q)

    def extra_repr(self) -> str:
        base = super().extra_repr()
        return f"p_mean={self.p_mean}, p_std={self.p_std}" + (f", {base}" if base else "")
