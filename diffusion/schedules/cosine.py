"""The cosine schedule family, as densities over logSNR.

``cosine`` — the continuous cosine schedule of Nichol & Dhariwal (2021, arXiv 2102.09672) without its offset,
ᾱ(t) = cos²(πt/2), so SNR = cot²(πt/2) and (Hang et al. 2024, Table 1 convention, t = 0 clean):
    λ(t) = −2·ln tan(πt/2),   p(λ) = sech(λ/2)/(2π),   t = CDF_u = (2/π)·atan(e^u) = (2/π)·atan(σ)
    in ln σ:  p(u) = sech(u)/π,  F(u) = (2/π)·atan(e^u),  F⁻¹(q) = ln tan(πq/2)
(σ is half-Cauchy distributed). Mass in |λ| < 1: (2/π)(atan(e^½) − atan(e^−½)) ≈ 0.3058.

``cosine_shifted`` — simple diffusion (Hoogeboom et al. 2023, arXiv 2301.11093, Sec. 3.1): the cosine logSNR shifted by
s = 2·ln(base_resolution/resolution) with base_resolution 64, so that a higher resolution trains at lower SNR:
    λ(t) = −2·ln tan(πt/2) + s,   p(λ) = sech((λ − s)/2)/(2π),   in ln σ: u = u_cos − s/2.
``shift`` fixes s directly. Otherwise the resolution is ``resolution`` when given, else the data's *pixel* resolution
(``image_resolution``, passed by train.py: for VAE latents the decoded images', 256 for ``imagenet256_latent``), else
``img_resolution`` (the resolution the network sees; the same for pixel data). Simple diffusion's shift is stated for
pixel-space models; for latents the source is silent, and we take the pixel resolution because the shift exists to
lower the SNR as images get larger (the latent resolution 32 would *raise* it by 2·ln 2 instead). That choice is ours
and marked unverified in ``configs/schedule/cosine_shifted.yaml``; set ``schedule.resolution=32`` for the latent one.

``cosine_scaled`` — Hang et al. (2024, arXiv 2407.03297, Table 2) list a "Cosine Scaled" schedule (the cosine
density narrowed around λ = 0) and report its FID, but we could not find its exact form and factor in the parts of
the paper available to us. We implement the natural reading, a scaling of logSNR by a factor k:
    λ(t) = −2k·ln tan(πt/2),   p(λ) = sech(λ/(2k))/(2πk),   in ln σ: u = k·u_cos, p(u) = sech(u/k)/(πk).
k < 1 concentrates the mass at λ = 0 (the paper's finding is that peaking at λ = 0 helps); the default k = 0.5 is
our choice, not a published value (mass in |λ| < 1 ≈ 0.551 against 0.306 for cosine and 0.865 for Laplace b = 0.5).
"""

from __future__ import annotations

import math
from typing import Any

from diffusion.schedules.base import SigmaRange
from diffusion.schedules.location_scale import (
    LocationScaleSchedule,
    sech_cdf,
    sech_icdf,
    sech_log_pdf,
    with_truncation,
)


class _CosineFamily(LocationScaleSchedule):
    """λ = k·λ_cos + s with λ_cos the cosine logSNR, i.e. ln σ = k·u_cos − s/2 with p(u_cos) = sech(u_cos)/π."""

    std_log_pdf = staticmethod(sech_log_pdf)
    std_cdf = staticmethod(sech_cdf)
    std_icdf = staticmethod(sech_icdf)

    def __init__(self, logsnr_scale: float, logsnr_shift: float, **policy: Any):
        super().__init__(loc=-0.5 * logsnr_shift, scale=logsnr_scale, **policy)


class Cosine(_CosineFamily):
    name = "cosine"

    def __init__(self, *, sigma_range: SigmaRange = None, snr_reference: str = "unit",
                 sigma_data: float | None = None, sigma_min: float | None = None, sigma_max: float | None = None):
        super().__init__(logsnr_scale=1.0, logsnr_shift=0.0,
                         sigma_range=sigma_range, snr_reference=snr_reference, sigma_data=sigma_data,
                         sigma_min=sigma_min, sigma_max=sigma_max)


class CosineShifted(_CosineFamily):
    name = "cosine_shifted"

    def __init__(self, shift: float | None = None, resolution: int | None = None, base_resolution: int = 64,
                 img_resolution: int | None = None, image_resolution: int | None = None, *,
                 sigma_range: SigmaRange = None, snr_reference: str = "unit", sigma_data: float | None = None,
                 sigma_min: float | None = None, sigma_max: float | None = None):
        self.resolution_used, self.resolution_source = None, None
        if shift is None:
            shift = self._shift_from_resolution(resolution, base_resolution, img_resolution, image_resolution)
        if not math.isfinite(shift):
            raise ValueError(f"schedule=cosine_shifted: shift must be finite, got {shift}")
        super().__init__(logsnr_scale=1.0, logsnr_shift=float(shift),
                         sigma_range=sigma_range, snr_reference=snr_reference, sigma_data=sigma_data,
                         sigma_min=sigma_min, sigma_max=sigma_max)
        self.shift = float(shift)
        self.img_resolution = img_resolution
        self.base_resolution = base_resolution

    def _shift_from_resolution(self, resolution: int | None, base_resolution: int, img_resolution: int | None,
                               image_resolution: int | None) -> float:
        """2·ln(base_resolution/r) with r = ``resolution``, else the pixel resolution, else ``img_resolution``."""
        given = [(value, source) for value, source in ((resolution, "schedule.resolution"),
                                                        (image_resolution, "the data's pixel resolution"),
                                                        (img_resolution, "img_resolution")) if value is not None]
        if not given:
            raise ValueError("schedule=cosine_shifted: give schedule.shift or schedule.resolution, or the data's "
                             "resolution (img_resolution / image_resolution, which train.py passes) to use simple "
                             "diffusion's shift 2·ln(base_resolution/resolution)")
        value, source = given[0]
        if not (value > 0 and base_resolution > 0):
            raise ValueError(f"schedule=cosine_shifted: need a resolution > 0 and base_resolution > 0, got {value} "
                             f"({source}) and {base_resolution}")
        self.resolution_used, self.resolution_source = int(value), source
        return 2.0 * math.log(base_resolution / value)

    def extra_repr(self) -> str:
        text = f"shift={self.shift:.6g}"
        if self.resolution_used is not None:
            text += f" (resolution {self.resolution_used}: {self.resolution_source})"
        return with_truncation(text, self)


class CosineScaled(_CosineFamily):
    name = "cosine_scaled"

    def __init__(self, scale: float = 0.5, *, sigma_range: SigmaRange = None, snr_reference: str = "unit",
                 sigma_data: float | None = None, sigma_min: float | None = None, sigma_max: float | None = None):
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"schedule=cosine_scaled: scale must be a finite number > 0, got {scale}")
        super().__init__(logsnr_scale=float(scale), logsnr_shift=0.0,
                         sigma_range=sigma_range, snr_reference=snr_reference, sigma_data=sigma_data,
                         sigma_min=sigma_min, sigma_max=sigma_max)
        self.logsnr_factor = float(scale)

    def extra_repr(self) -> str:
        return with_truncation(f"scale={self.logsnr_factor}", self)
