"""Sampling discretisations: descending noise levels σ_0 = σ_max > ... > σ_{N-1} = σ_min, then σ_N = 0.

Every grid here starts at exactly σ_max, ends at exactly σ_min (before the appended 0) and is strictly descending.

``rho`` — EDM's ρ-spacing (Karras et al. 2022, Eq. 5), uniform in σ^(1/ρ) (the default, ρ = 7):

    σ_i = (σ_max^(1/ρ) + i/(N−1)·(σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ,   i = 0..N−1,   σ_N = 0.

``loglinear`` — uniform in ln σ (equivalently in logSNR λ = −2 ln σ); the ρ → ∞ limit of the above:

    σ_i = exp(ln σ_max + i/(N−1)·(ln σ_min − ln σ_max)).

``<schedule>`` — equal-mass quantiles of a noise schedule's density over ln σ (``quantile_grid``). With F the
schedule's CDF in ln σ, which is also Hang et al.'s schedule time t (``diffusion.noise_levels``):

    σ_i = exp(F⁻¹(F(ln σ_hi) + i/(N−1)·(F(ln σ_lo) − F(ln σ_hi)))),

i.e. the schedule's density truncated to [σ_lo, σ_hi] puts mass 1/(N−1) between consecutive levels. This is the same
thing as steps *uniform in the schedule's time t* between t(σ_lo) and t(σ_hi): Hang et al. (2024) sample every model
with DDIM on steps uniform in the cosine schedule's t ("cosine-aligned", ``steps_from=cosine``) and start at
t_max = 0.99 rather than 1, which here lowers the top level to σ_hi = min(σ_max, exp(F⁻¹(t_max))).
``steps_from=infonoise`` is the same construction applied to a trained InfoNoise run's tabulated profile ("InfoGrid",
handed in as ``profile_schedule``; ``infonoise:<variant>`` picks the density of ``InfoNoise.step_density``: rate,
profile (default), pi, mix or power, and ``infonoise:mix:<w>`` / ``infonoise:power:<w>`` its EDM weight w).

Config keys (``configs/sampler/*.yaml``): ``num_steps`` (N, levels before the final 0), ``sigma_min``, ``sigma_max``,
``rho``, ``steps_from`` (rho | loglinear | infonoise[:variant[:w]] | the name of a ``configs/schedule/`` option, also
written ``quantile:<name>`` or ``time_uniform:<name>``, or a full schedule mapping such as
``{name: laplace, b: 0.75}``) and ``t_max`` (schedule time at which sampling starts; 1 = σ_max; only with
schedule-based placement).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import Tensor

from configs import to_plain_dict
from diffusion.schedules import build_schedule, defined_config

SCHEDULE_CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "schedule"
GRID_NAMES = ("rho", "loglinear", "infonoise")
_SCHEDULE_PREFIXES = ("quantile:", "time_uniform:")


def parse_infogrid(steps_from: Any) -> tuple[str, float | None] | None:
    """(variant, EDM weight or None) for ``steps_from`` = infonoise[:variant[:w]]; None for any other placement."""
    if not isinstance(steps_from, str) or steps_from.split(":")[0] != "infonoise":
        return None
    parts = steps_from.split(":")
    if len(parts) > 3 or (len(parts) == 3 and parts[1] not in ("mix", "power")):
        raise ValueError(f"bad sampler.steps_from '{steps_from}': use infonoise, infonoise:<rate|profile|pi|mix|power> "
                         "or infonoise:<mix|power>:<edm weight in [0, 1]>")
    variant = parts[1] if len(parts) > 1 else "profile"
    weight = None
    if len(parts) == 3:
        try:
            weight = float(parts[2])
        except ValueError:
            raise ValueError(f"bad sampler.steps_from '{steps_from}': the EDM weight '{parts[2]}' is not a number") \
                from None
    return variant, weight


def _check_range(num_steps: int, sigma_min: float, sigma_max: float) -> None:
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"sampler.num_steps must be an integer >= 1, got {num_steps!r}")
    if not (math.isfinite(sigma_min) and math.isfinite(sigma_max) and 0 < sigma_min < sigma_max):
        raise ValueError(f"need 0 < sampler.sigma_min < sampler.sigma_max < inf, got {sigma_min} and {sigma_max}")


def _finish(sigmas: Tensor, sigma_min: float, sigma_max: float, append_zero: bool, what: str) -> Tensor:
    """Pin the endpoints to exactly σ_max and σ_min, check strict descent and append the final 0."""
    sigmas = sigmas.clone()
    sigmas[0] = sigma_max
    if len(sigmas) > 1:
        sigmas[-1] = sigma_min
    if len(sigmas) > 1 and not bool((sigmas.diff() < 0).all()):
        raise ValueError(f"the {what} σ grid is not strictly descending (a region without mass, or too many steps "
                         f"for the float precision): {sigmas.tolist()}")
    if append_zero:
        sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
    return sigmas


def edm_rho_grid(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                 append_zero: bool = True, dtype: torch.dtype = torch.float64,
                 device: torch.device | str | None = None) -> Tensor:
    """EDM's σ grid (Eq. 5) with ``num_steps`` levels (plus a final 0 if ``append_zero``)."""
    _check_range(num_steps, sigma_min, sigma_max)
    if not rho > 0:
        raise ValueError(f"sampler.rho must be > 0, got {rho}")
    if num_steps == 1:
        sigmas = torch.tensor([sigma_max], dtype=dtype, device=device)
    else:
        i = torch.arange(num_steps, dtype=dtype, device=device)
        inv_rho = 1.0 / rho
        sigmas = (sigma_max**inv_rho + i / (num_steps - 1) * (sigma_min**inv_rho - sigma_max**inv_rho)) ** rho
    return _finish(sigmas, sigma_min, sigma_max, append_zero, "rho")


def loglinear_grid(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, append_zero: bool = True,
                   dtype: torch.dtype = torch.float64, device: torch.device | str | None = None) -> Tensor:
    """σ levels uniform in ln σ from σ_max down to σ_min (plus a final 0 if ``append_zero``)."""
    _check_range(num_steps, sigma_min, sigma_max)
    if num_steps == 1:
        sigmas = torch.tensor([sigma_max], dtype=dtype, device=device)
    else:
        sigmas = torch.linspace(math.log(sigma_max), math.log(sigma_min), num_steps, dtype=torch.float64).exp()
    return _finish(sigmas.to(dtype=dtype, device=device), sigma_min, sigma_max, append_zero, "loglinear")


def quantile_grid(schedule: Any, num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0,
                  append_zero: bool = True, dtype: torch.dtype = torch.float64,
                  device: torch.device | str | None = None) -> Tensor:
    """Equal-mass levels of ``schedule`` (a ``NoiseSchedule``) truncated to [σ_min, σ_max], descending.

    σ_0 = σ_max and σ_{N−1} = σ_min exactly; consecutive levels enclose mass 1/(N−1) of the truncated density.
    The computation is in float64 (the schedule's ``cdf``/``icdf``) and cast to ``dtype`` at the end.
    """
    _check_range(num_steps, sigma_min, sigma_max)
    where = _schedule_device(schedule)
    f_lo = float(schedule.cdf(torch.tensor(math.log(sigma_min), dtype=torch.float64, device=where)))
    f_hi = float(schedule.cdf(torch.tensor(math.log(sigma_max), dtype=torch.float64, device=where)))
    name = getattr(schedule, "name", type(schedule).__name__)
    if not f_hi > f_lo:
        raise ValueError(f"schedule '{name}' has no probability mass between sampler.sigma_min={sigma_min} and "
                         f"sampler.sigma_max={sigma_max}; cannot place sampling steps by its quantiles")
    if num_steps == 1:
        sigmas = torch.tensor([sigma_max], dtype=torch.float64)
    else:
        i = torch.arange(num_steps, dtype=torch.float64, device=where)
        q = f_hi + i / (num_steps - 1) * (f_lo - f_hi)
        sigmas = schedule.icdf(q).to(torch.float64).cpu().exp()
    return _finish(sigmas.to(dtype=dtype, device=device), sigma_min, sigma_max, append_zero, f"'{name}' quantile")


def schedule_top_sigma(schedule: Any, t_max: float, sigma_max: float) -> float:
    """The level where sampling starts when it starts at schedule time ``t_max``: min(σ_max, exp(F⁻¹(t_max)))."""
    if not 0 < t_max <= 1:
        raise ValueError(f"sampler.t_max must be in (0, 1], got {t_max}")
    if t_max >= 1:
        return sigma_max
    q = torch.tensor(t_max, dtype=torch.float64, device=_schedule_device(schedule))
    return min(sigma_max, math.exp(float(schedule.icdf(q))))


def load_schedule_option(option: str | Mapping[str, Any], **context: Any) -> Any:
    """Build a noise schedule from a ``configs/schedule/<option>.yaml`` name (or a full schedule mapping).

    ``context`` (e.g. ``img_resolution``, ``sigma_data``) goes to the constructors that take it, as in training.
    """
    if isinstance(option, Mapping) or hasattr(option, "keys"):
        cfg = option
    else:
        path = SCHEDULE_CONFIG_DIR / f"{option}.yaml"
        if not path.is_file():
            valid = sorted({*GRID_NAMES, *(p.stem for p in SCHEDULE_CONFIG_DIR.glob("*.yaml"))})
            raise ValueError(f"unknown sampler.steps_from '{option}'; valid: {', '.join(valid)} (a schedule option "
                             "name places the steps at its equal-mass quantiles)")
        # The schedule as its source defines it (untruncated, unit logSNR): its CDF is the schedule time that
        # steps and t_max are placed by, whatever support a training run gives it.
        cfg = defined_config(OmegaConf.load(path))
    return build_schedule(cfg, **context)


def _schedule_device(schedule: Any) -> torch.device:
    """Where a schedule keeps its tables (a tabulated profile may live on the accelerator)."""
    buffers = getattr(schedule, "buffers", None)
    first = next(iter(buffers()), None) if callable(buffers) else None
    return first.device if first is not None else torch.device("cpu")


def build_sigma_grid(sampler_cfg: Any, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None,
                     *, profile_schedule: Any = None, schedule_context: Mapping[str, Any] | None = None) -> Tensor:
    """The σ grid a sampler config asks for (see the module docstring for ``steps_from`` and ``t_max``).

    ``profile_schedule`` is the tabulated profile of a trained InfoNoise run, needed by ``steps_from=infonoise``;
    ``schedule_context`` is passed to schedule constructors for ``steps_from=<schedule option>``.
    """
    cfg = to_plain_dict(sampler_cfg)
    if cfg.get("num_steps") is None:
        raise ValueError("sampler.num_steps is required")
    num_steps = cfg["num_steps"]
    sigma_min = float(cfg.get("sigma_min", 0.002))
    sigma_max = float(cfg.get("sigma_max", 80.0))
    steps_from = "rho" if cfg.get("steps_from") is None else cfg["steps_from"]
    t_max = 1.0 if cfg.get("t_max") is None else float(cfg["t_max"])
    if not 0 < t_max <= 1:
        raise ValueError(f"sampler.t_max must be in (0, 1], got {t_max}")
    if isinstance(steps_from, str) and steps_from in ("rho", "loglinear"):
        if t_max < 1:
            raise ValueError(f"sampler.t_max={t_max} needs schedule-based step placement (sampler.steps_from=<schedule "
                             f"option> or infonoise); steps_from={steps_from} has no schedule time")
        if steps_from == "rho":
            return edm_rho_grid(num_steps, sigma_min, sigma_max, float(cfg.get("rho", 7.0)), dtype=dtype,
                                device=device)
        return loglinear_grid(num_steps, sigma_min, sigma_max, dtype=dtype, device=device)
    if parse_infogrid(steps_from) is not None:
        if profile_schedule is None:
            raise ValueError(f"sampler.steps_from={steps_from} needs the profile of a run trained with "
                             "schedule=infonoise (sample.py reads it from the checkpoint; library callers pass "
                             "profile_schedule=)")
        schedule = profile_schedule
    else:
        option = steps_from
        if isinstance(option, str):
            for prefix in _SCHEDULE_PREFIXES:
                if option.startswith(prefix):
                    option = option[len(prefix):]
        schedule = load_schedule_option(option, **dict(schedule_context or {}))
    top = schedule_top_sigma(schedule, t_max, sigma_max)
    if not top > sigma_min:
        raise ValueError(f"sampler.t_max={t_max} starts sampling at σ={top:.4g}, not above sampler.sigma_min="
                         f"{sigma_min}")
    return quantile_grid(schedule, num_steps, sigma_min, top, dtype=dtype, device=device)
