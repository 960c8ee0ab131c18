"""EDM's log-normal training distribution (Karras et al. 2022, arXiv 2206.00364, Sec. 5): ln σ ~ N(p_mean, p_std²).

EDM uses p_mean = −1.2, p_std = 1.2 (CIFAR-10, ImageNet-64); EDM2 uses p_mean = −0.4, p_std = 1.0 (ImageNet-512,
preset ``schedule=lognormal_edm2``).

In ln σ (u):   p(u) = exp(−(u − μ)²/(2s²)) / (s·√(2π)),   F(u) = Φ((u − μ)/s),   F⁻¹(q) = μ + s·Φ⁻¹(q)
In logSNR:     λ = −2u ~ N(−2·p_mean, (2·p_std)²), i.e. N(2.4, 2.4²) for EDM;  λ(t) = −2·(p_mean + p_std·Φ⁻¹(t)).
"""

from __future__ import annotations

from diffusion.schedules.base import SigmaRange
from diffusion.schedules.location_scale import (
    LocationScaleSchedule,
    normal_cdf,
    normal_icdf,
    normal_log_pdf,
    with_truncation,
)


class LogNormal(LocationScaleSchedule):
    name = "lognormal"
    logsnr_parameterised = False  # stated in σ (EDM's p_mean is already in the data's units)
    std_log_pdf = staticmethod(normal_log_pdf)
    std_cdf = staticmethod(normal_cdf)
    std_icdf = staticmethod(normal_icdf)

    def __init__(self, p_mean: float = -1.2, p_std: float = 1.2, *,
                 sigma_range: SigmaRange = None, snr_reference: str = "unit", sigma_data: float | None = None,
                 sigma_min: float | None = None, sigma_max: float | None = None):
        if not p_std > 0:
            raise ValueError(f"schedule.p_std must be > 0, got {p_std}")
        super().__init__(loc=p_mean, scale=p_std,
                         sigma_range=sigma_range, snr_reference=snr_reference, sigma_data=sigma_data,
                         sigma_min=sigma_min, sigma_max=sigma_max)
        self.p_mean = float(p_mean)
        self.p_std = float(p_std)

    def extra_repr(self) -> str:
        return with_truncation(f"p_mean={self.p_mean}, p_std={self.p_std}", self)
