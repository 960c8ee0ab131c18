"""The fixed training schedules: every schedule except the adaptive InfoNoise, keyed by their config ``name``.

``diffusion.schedules.SCHEDULES`` is this registry plus InfoNoise. InfoNoise draws its warm-up from a fixed schedule
(``schedule.base``) and builds it from here, so that it never imports the registry that holds it.
"""

from __future__ import annotations

from diffusion.schedules.base import NoiseSchedule
from diffusion.schedules.cosine import Cosine, CosineScaled, CosineShifted
from diffusion.schedules.discrete import DiscreteDDPM
from diffusion.schedules.lognormal import LogNormal
from diffusion.schedules.logsnr import Cauchy, Laplace, UniformLogSNR
from diffusion.schedules.rectified_flow import FlowMatchingOT, LogitNormal
from diffusion.schedules.vp_ve import VE, VP

FIXED_SCHEDULES: dict[str, type[NoiseSchedule]] = {
    "lognormal": LogNormal,
    "logit_normal": LogitNormal,
    "fm_ot": FlowMatchingOT,
    "cosine": Cosine,
    "cosine_shifted": CosineShifted,
    "cosine_scaled": CosineScaled,
    "laplace": Laplace,
    "cauchy": Cauchy,
    "uniform_logsnr": UniformLogSNR,
    "vp": VP,
    "ve": VE,
    "discrete_ddpm": DiscreteDDPM,
}
