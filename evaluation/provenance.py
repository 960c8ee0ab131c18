"""Where a result comes from: which checkpoint file (and how many training images it had seen), which run it belongs
to, and how a set of sample images was made.

``checkpoint_info`` reads a checkpoint's config, geometry and progress without reading its tensors (a memory-mapped
load; ``.safetensors`` exports keep them in their metadata), so the preflight can check an evaluation before the
network is loaded. ``run_dir_of`` is the run a checkpoint file belongs to: sample.py writes its images there.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from configs import to_plain_dict
from training.checkpoint import CHECKPOINT_DIR, FORMAT, load_checkpoint, resolve_checkpoint

__all__ = ["checkpoint_info", "checkpoint_record", "run_dir_of", "samples_metadata"]


def checkpoint_info(path: str | os.PathLike) -> dict[str, Any]:
    """``{"path", "config", "geometry", "progress", "weights"}`` of a checkpoint file, a run directory (its newest
    checkpoint) or a ``.safetensors`` export; ``weights`` names the tensors an export holds (``ema`` / ``net``)."""
    file = resolve_checkpoint(path)
    if file.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(file), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != "sigmalab-weights":
            raise ValueError(f"{file} is not a sigmalab weights file (no 'sigmalab-weights' metadata)")
        return {"path": str(file), "config": json.loads(meta["config"]), "geometry": json.loads(meta["geometry"]),
                "progress": json.loads(meta.get("progress", "{}")), "weights": meta.get("weights")}
    try:  # the tensors stay on disk: only the small entries are read
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - an older serialisation: the full load below gives the proper error if any
        state = None
    if not (isinstance(state, dict) and state.get("format") == FORMAT):
        state = load_checkpoint(file)
    return {"path": str(file), "config": to_plain_dict(state["config"]), "geometry": dict(state["geometry"]),
            "progress": dict(state.get("progress") or {}), "weights": None}


def checkpoint_record(info: dict[str, Any], ema: Any) -> dict[str, Any]:
    """The ``checkpoint`` entry of a result: the file, the training images it had seen, its step, which weights
    (``ema`` / ``net``; ``posthoc-ema`` when ``ema`` describes a post-hoc EMA reconstruction)."""
    progress = info.get("progress") or {}
    nimg = progress.get("cur_nimg")
    weights = info.get("weights") or ("posthoc-ema" if isinstance(ema, Mapping) else "ema" if ema else "net")
    return {"path": info["path"], "cur_nimg": None if nimg is None else int(nimg),
            "kimg": None if nimg is None else int(nimg) / 1000, "step": progress.get("step"), "weights": weights}


def run_dir_of(path: str | os.PathLike) -> Path:
    """The run directory of a checkpoint: a run directory itself, two levels above ``<run>/checkpoints/<file>``,
    else the folder of the file (``<run>/ema.safetensors``)."""
    path = Path(path)
    if path.is_dir():
        return path
    if path.parent.name == CHECKPOINT_DIR:
        return path.parent.parent
    return path.parent


def samples_metadata(samples: str | os.PathLike) -> dict[str, Any] | None:
    """sample.py's ``samples.json`` (checkpoint, seeds, sampler, NFE) beside a ``samples.npz`` or in an image folder,
    if there is one."""
    p = Path(os.path.expanduser(str(samples)))
    candidate = p / "samples.json" if p.is_dir() else p.with_name("samples.json")
    if p.is_file() and p.name != "samples.npz":
        return None  # another file's neighbour describes other samples
    if not candidate.is_file():
        return None
    try:
        return json.loads(candidate.read_text())
    except (OSError, json.JSONDecodeError):
        return None
