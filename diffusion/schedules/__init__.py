"""Training noise schedules, each a distribution over ln σ (see ``base.NoiseSchedule``), selected by ``schedule=<name>``.

``build_schedule(cfg.schedule, **context)`` constructs one from its config group; the config's keys (except ``name``)
are the constructor's keyword arguments.
"""

from __future__ import annotations

from typing import Any

from configs import build_from_registry
from diffusion.schedules.base import NoiseSchedule
from diffusion.schedules.lognormal import LogNormal

SCHEDULES: dict[str, type[NoiseSchedule]] = {
    "lognormal": LogNormal,
}


def build_schedule(schedule_cfg: Any, **context: Any) -> NoiseSchedule:
    """Build the schedule named by ``schedule_cfg.name`` with the remaining keys as keyword arguments.

    ``context`` (e.g. ``weighting=``, ``img_resolution=``, ``sigma_data=``) is passed to the schedules whose
    constructors take a parameter of that name (see ``configs.build_from_registry``).
    """
    return build_from_registry("schedule", SCHEDULES, schedule_cfg, context=context)


__all__ = ["NoiseSchedule", "LogNormal", "SCHEDULES", "build_schedule"]
