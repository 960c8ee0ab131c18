"""A training run's noise schedule rebuilt from its saved state: a loaded checkpoint dict, no file I/O.

A sigmalab checkpoint holds the run's resolved ``config``, its data ``geometry`` and one ``schedule`` state dict per
rank (see ``training.checkpoint``). ``infonoise_from_run_state`` rebuilds an InfoNoise schedule with the context
training gave it (the loss weighting, σ_data, the data dimensions, the training length) and loads one rank's state,
for InfoGrid step placement and the profile plots.

This lives above ``diffusion.schedules`` and ``diffusion.weighting`` because it needs both: the loss weighting is
rebuilt from the run's config, and the importance weighting in turn builds schedules.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from diffusion.schedules import build_schedule
from diffusion.schedules.infonoise import InfoNoise
from diffusion.weighting import build_weighting


def infonoise_from_run_state(state: Mapping[str, Any], rank: int = 0,
                             device: torch.device | str = "cpu") -> InfoNoise:
    """The InfoNoise schedule of a run, from its loaded checkpoint ``state``, with rank ``rank``'s estimator state.

    Rebuilt from the checkpoint's own config (schedule, weighting, precond, train) and geometry. Raises ValueError
    when the run did not train with ``schedule=infonoise`` or holds no state for ``rank``.
    """
    cfg = state["config"]
    sched_cfg = dict(cfg["schedule"])
    if sched_cfg.get("name") != InfoNoise.name:
        raise ValueError(f"checkpoint was trained with schedule={sched_cfg.get('name')}, not infonoise: it has "
                         "no learned profile; measure one with diffusion.schedules.infonoise.measure_profile")
    geometry = state.get("geometry", {})
    num_dims = None
    if "img_channels" in geometry and "img_resolution" in geometry:
        num_dims = int(geometry["img_channels"]) * int(geometry["img_resolution"]) ** 2
    schedule = build_schedule(sched_cfg, weighting=build_weighting(cfg["weighting"]),
                              sigma_data=cfg.get("precond", {}).get("sigma_data"), num_dims=num_dims,
                              total_nimg=int(round(float(cfg["train"]["total_kimg"]) * 1000)),
                              batch_size=int(cfg["train"]["batch"]), img_resolution=geometry.get("img_resolution"))
    states = state["schedule"]
    if not 0 <= rank < len(states):
        raise ValueError(f"checkpoint holds schedule states for ranks 0..{len(states) - 1}, asked for {rank}")
    schedule.load_state_dict(states[rank])
    return schedule.to(device)
