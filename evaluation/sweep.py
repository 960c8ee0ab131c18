"""The runs of a sweep: finding them, reading their configs, and labelling them by the settings they differ in.

A row of the report (``evaluation/report.py``) is a setting; runs that differ only in their seed share it.
``report_rows`` names the rows from the configs alone (directory names are never read): the ``name`` of every
varied config group (schedule, precond, weighting, model, ...), then single keys (``train.lr``), the fewest that
tell the rows apart.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from configs import flatten, jsonable, to_plain_dict
from evaluation.settings import CURVE_FILE
from training.checkpoint import CHECKPOINT_DIR, list_checkpoints, load_checkpoint

__all__ = [
    "ABSENT",
    "find_report_runs",
    "run_config",
    "job_num",
    "canon",
    "short",
    "report_rows",
]

ABSENT = "<absent>"
# Top-level config keys that do not change what a run learns, or that are the seed itself: not row settings.
_NOT_A_SETTING = {"seed", "run_dir", "resume", "device", "dry_run", "paper", "logger", "eval", "data"}
_NOT_A_TRAIN_SETTING = {"num_workers", "tick_kimg", "snapshot_kimg", "checkpoint_kimg", "keep_checkpoints",
                        "keep_every_kimg", "grid_seeds", "slurm_requeue", "max_skipped_steps"}
# The order in which varied config groups name a row (schedule first: the sweeps compare schedules).
_ASPECT_ORDER = ("schedule", "precond", "weighting", "model", "train", "sampler")


def find_report_runs(root: str | os.PathLike) -> list[Path]:
    """The run directories at or below ``root``: those holding ``config.yaml`` (not Hydra's ``.hydra/`` copy), a
    ``fid_curve.jsonl`` or checkpoints."""
    root = Path(os.path.expanduser(str(root)))
    if not root.is_dir():
        raise FileNotFoundError(f"report: sweep directory not found: {root}")
    found: set[Path] = set()
    for marker in ("config.yaml", CURVE_FILE, CHECKPOINT_DIR):
        for path in root.rglob(marker):
            if ".hydra" in path.relative_to(root).parts:
                continue
            if marker == CHECKPOINT_DIR and not list_checkpoints(path.parent):
                continue
            found.add(path.parent)
    if not found:
        raise ValueError(f"report: no runs under {root}: a run directory holds config.yaml and "
                         f"{CHECKPOINT_DIR}/ (python train.py run_dir=... or -m hydra.sweep.dir=...)")
    return sorted(found)


def run_config(run: Path) -> dict[str, Any]:
    """A run's resolved config: ``config.yaml``, else the config stored in its newest checkpoint."""
    path = run / "config.yaml"
    if path.is_file():
        cfg = OmegaConf.load(path)
        try:
            return OmegaConf.to_container(cfg, resolve=True)
        except Exception:  # noqa: BLE001 - an interpolation we cannot resolve here: keep it as written
            return OmegaConf.to_container(cfg, resolve=False)
    ckpts = list_checkpoints(run)
    if ckpts:
        return to_plain_dict(load_checkpoint(ckpts[-1])["config"])
    raise ValueError(f"report: {run} has neither config.yaml nor a checkpoint to read the run's config from")


def job_num(run: Path) -> int | None:
    """The run's position in its Hydra multirun (``.hydra/hydra.yaml`` hydra.job.num): the order of the sweep."""
    path = run / ".hydra" / "hydra.yaml"
    if not path.is_file():
        return None
    match = re.search(r"^\s+num:\s*(\d+)\s*$", path.read_text(), flags=re.MULTILINE)
    return int(match.group(1)) if match else None


def canon(value: Any) -> str:
    """A config value as canonical JSON (for comparing values of any type)."""
    return json.dumps(jsonable(value), sort_keys=True)


def short(value: Any) -> str:
    """A config value as a table cell: 0.001 not 0.0010, lists as JSON."""
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple, Mapping)):
        return json.dumps(jsonable(value))
    return str(value)


def _setting_keys(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The flattened config keys that define what a run learns (everything but the seed, paths, logging, ...)."""
    out = {}
    for key, value in flatten(cfg).items():
        parts = key.split(".")
        if parts[0] in _NOT_A_SETTING or (parts[0] == "train" and len(parts) > 1 and parts[1] in _NOT_A_TRAIN_SETTING):
            continue
        out[key] = value
    return out


def report_rows(configs: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[dict[str, str]], list[str]]:
    """Row labels of runs that differ in their settings (runs differing only in ``seed`` share a row).

    Returns (label per run, {column: value} per run, the columns). The columns are the fewest varied settings that
    tell the rows apart, chosen in order: the ``name`` of a varied group (schedule, precond, weighting, model, ...),
    then single keys (``train.lr``, ``schedule.p_mean``); a setting that splits no row further is left out (e.g. the
    sampler's ``t_max`` that comes with the Laplace schedule). A single key's value shared by more than half of the
    runs is left out of the labels (the columns still show it). A single row is labelled by its schedule.
    """
    flats = [{k: canon(v) for k, v in _setting_keys(cfg).items()} for cfg in configs]
    raws = [_setting_keys(cfg) for cfg in configs]
    chosen = _row_keys(flats)
    if not chosen:
        chosen = ["schedule.name"] if any("schedule.name" in raw for raw in raws) else []
    columns = [k[: -len(".name")] if k.endswith(".name") and k.count(".") == 1 else k for k in chosen]
    usual = _usual_values(chosen, raws)
    labels, aspects = [], []
    for raw in raws:
        cells = {col: (short(raw[key]) if key in raw else "—") for col, key in zip(columns, chosen)}
        parts = [(value if key.endswith(".name") and key.count(".") == 1 else f"{key}={value}")
                 for key, value in zip(chosen, cells.values())
                 if key in raw and not (key in usual and canon(raw[key]) == usual[key])]
        labels.append("/".join(parts) or "run")
        aspects.append(cells)
    return labels, aspects, columns


def _usual_values(chosen: Sequence[str], raws: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """For each chosen single key (not a group name), the value most runs share, when more than half do: labels
    leave it out (``laplace``, ``laplace/schedule.snr_reference=data`` rather than ``.../...=unit`` on every row)."""
    usual = {}
    for key in chosen:
        if key.endswith(".name") and key.count(".") == 1:
            continue
        values = [canon(raw[key]) for raw in raws if key in raw]
        top = max(set(values), key=values.count) if values else None
        if top is not None and 2 * values.count(top) > len(raws):
            usual[key] = top
    return usual


def _row_keys(flats: Sequence[Mapping[str, str]]) -> list[str]:
    """The fewest varied keys, in ``_ASPECT_ORDER`` (group names first), that tell the distinct settings apart."""
    keys = list(dict.fromkeys(k for flat in flats for k in flat))
    varied = [k for k in keys if len({flat.get(k, ABSENT) for flat in flats}) > 1]
    n_rows = len({tuple(flat.get(k, ABSENT) for k in varied) for flat in flats})

    def rank(key: str) -> tuple[int, str]:
        group = key.split(".")[0]
        return (_ASPECT_ORDER.index(group) if group in _ASPECT_ORDER else len(_ASPECT_ORDER), group)

    groups = sorted({k.split(".")[0] for k in varied if k.count(".") == 1 and k.endswith(".name")}, key=rank)
    candidates = [f"{g}.name" for g in groups] + sorted((k for k in varied if k not in {f"{g}.name" for g in groups}),
                                                        key=rank)
    chosen: list[str] = []
    current: list[tuple[str, ...]] = [()] * len(flats)
    for key in candidates:
        if len(set(current)) == n_rows:
            break
        refined = [c + (flat.get(key, ABSENT),) for c, flat in zip(current, flats)]
        if len(set(refined)) > len(set(current)):
            chosen.append(key)
            current = refined
    return chosen
