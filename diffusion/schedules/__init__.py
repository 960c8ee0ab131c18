"""Training noise schedules, each a distribution over ln σ (``base.NoiseSchedule``), selected by ``schedule=<name>``.

``build_schedule(cfg.schedule, **context)`` constructs one from its config group; the config's keys (except ``name``
and the ``unverified`` list, which only describes it) are the constructor's keyword arguments.

Every schedule shares two settings, implemented once in ``base.py``: ``sigma_range`` (the support: the distribution
conditioned on σ ∈ [σ_lo, σ_hi], or null) and ``snr_reference`` (unit: λ = −2 ln σ; data: λ = 2 ln(σ_data/σ)), and
draws i.i.d. or stratified uniforms (``train.sigma_draw``). ``defined_config`` strips the first two: the schedule as
its source defines it, whose CDF is the "schedule time" a sampler places its steps by.

| name             | family (λ = −2 ln σ)                              | module           |
|------------------|---------------------------------------------------|------------------|
| lognormal        | EDM: ln σ ~ N(p_mean, p_std²)                      | lognormal.py     |
| logit_normal     | SD3: rectified-flow τ ~ logit-normal(m, s)          | rectified_flow.py|
| fm_ot            | flow matching: τ ~ U(0, 1), λ = 2 ln((1−τ)/τ)       | rectified_flow.py|
| cosine           | λ = −2 ln tan(πt/2)                                | cosine.py        |
| cosine_shifted   | cosine + 2 ln(64/pixel resolution) (simple diff.)  | cosine.py        |
| cosine_scaled    | k·cosine (Hang et al.; form assumed, see module)   | cosine.py        |
| laplace          | λ ~ Laplace(μ, b) (Hang et al.)                    | logsnr.py        |
| cauchy           | λ ~ Cauchy(μ, γ) (Hang et al.)                     | logsnr.py        |
| uniform_logsnr   | λ ~ U[λ_min, λ_max]                                | logsnr.py        |
| vp               | EDM's VP: t ~ U[ε_t, 1], linear-β σ(t)             | vp_ve.py         |
| ve               | EDM's VE: ln σ ~ U[ln 0.02, ln 100]                | vp_ve.py         |
| discrete_ddpm    | DDPM's 1000 linear-β levels, uniform               | discrete.py      |
| infonoise        | learned online from the loss (Raya et al. 2026)    | infonoise.py     |

Every schedule but InfoNoise is in ``fixed.py``'s ``FIXED_SCHEDULES``, the schedules InfoNoise may warm up from.
"""

from __future__ import annotations

from typing import Any

from configs import build_from_registry, to_plain_dict
from diffusion.schedules.base import CONFIG_METADATA_KEYS, SIGMA_DRAWS, SNR_REFERENCES, NoiseSchedule
from diffusion.schedules.cosine import Cosine, CosineScaled, CosineShifted
from diffusion.schedules.discrete import DiscreteDDPM
from diffusion.schedules.fixed import FIXED_SCHEDULES
from diffusion.schedules.infonoise import InfoNoise
from diffusion.schedules.lognormal import LogNormal
from diffusion.schedules.logsnr import Cauchy, Laplace, UniformLogSNR
from diffusion.schedules.rectified_flow import FlowMatchingOT, LogitNormal
from diffusion.schedules.tabulated import TabulatedLogSigma
from diffusion.schedules.vp_ve import VE, VP

SCHEDULES: dict[str, type[NoiseSchedule]] = {
    **FIXED_SCHEDULES,
    "infonoise": InfoNoise,  # adaptive: learned online from the training losses (Raya et al. 2026, arXiv 2602.18647)
}


def build_schedule(schedule_cfg: Any, **context: Any) -> NoiseSchedule:
    """Build the schedule named by ``schedule_cfg.name`` with the remaining keys as keyword arguments.

    ``context`` (e.g. ``weighting=``, ``img_resolution=``, ``sigma_data=``) is passed to the schedules whose
    constructors take a parameter of that name (see ``configs.build_from_registry``). A ``sigma_range`` that holds
    no probability mass fails here, before any draw.
    """
    schedule = build_from_registry("schedule", SCHEDULES, schedule_cfg, drop=CONFIG_METADATA_KEYS, context=context)
    schedule.truncated_mass()
    return schedule


def defined_config(schedule_cfg: Any) -> dict[str, Any]:
    """A schedule config without the shared settings: untruncated, in the unit logSNR convention — the schedule as
    its source defines it (the older ``sigma_min``/``sigma_max`` spelling is dropped too)."""
    cfg = to_plain_dict(schedule_cfg)
    for key in ("sigma_range", "snr_reference", "sigma_min", "sigma_max"):
        cfg.pop(key, None)
    return cfg


__all__ = [
    "NoiseSchedule", "LogNormal", "LogitNormal", "FlowMatchingOT", "Cosine", "CosineShifted", "CosineScaled",
    "Laplace", "Cauchy", "UniformLogSNR", "VP", "VE", "DiscreteDDPM", "InfoNoise", "TabulatedLogSigma",
    "FIXED_SCHEDULES", "SCHEDULES", "SNR_REFERENCES", "SIGMA_DRAWS", "build_schedule", "defined_config",
]
