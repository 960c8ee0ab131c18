"""Training noise schedules, each a distribution over ln σ (see ``base.NoiseSchedule``), selected by ``schedule=<name>``.

``build_schedule(cfg.schedule)`` constructs one from its config group; the config's keys (except ``name``)
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


def build_schedule(schedule_cfg: Any) -> NoiseSchedule:
    """Build the schedule named by ``schedule_cfg.name`` with the remaining keys as keyword arguments."""
    return build_from_registry("schedule", SCHEDULES, schedule_cfg)


__all__ = ["NoiseSchedule", "LogNormal", "SCHEDULES", "build_schedule"]
