"""Curve keys: what a point of ``fid_curve.jsonl`` depends on besides its checkpoint, and nothing about where files lie.

``evaluate.py run_dir=`` skips the checkpoints already evaluated under the same key, and the report
(``evaluation/report.py``) groups points by their settings, so a key must change exactly when the value could. It
holds (``curve_settings``, hashed by ``settings_key``):

- the evaluation settings (metrics, sample count, seeds, repeats; the likelihood's settings with ``nll``);
- the feature extractor and, when a weights file is named, the SHA-256 of that file (not its path);
- the reference: the training split's identity (``dataset_identity``: name, split, image count, shape and a content
  fingerprint), or the SHA-256 of ``eval.reference_stats`` (not its path); with ``nll``, the evaluated split's
  identity too;
- the sampler config and whether the EMA weights were used.

So a dataset copied to node-local disk, a sweep directory moved to another file system or weights fetched into
another cache keep their keys, and the points evaluated before the move count.

**Older curve files** (version 1 keys held the data's absolute path, size and modification time, and the paths of
the weights and reference files) are still read as they are. ``evaluate.py run_dir=`` re-keys their points in place
(``rekey_legacy_entries``: the line gets the new key and settings, and ``rekeyed_from`` the old key) when they were
evaluated with the same settings: the same old key, or the same old settings with the locations left out (the data
moved since). The re-keyed points are not evaluated again and share the report's rows and variants with new ones.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from configs import flatten, jsonable, to_plain_dict
from configs.validation import location_keys
from data.atomic import atomic_write_text
from evaluation.features import resolve_feature_extractor, weights_digest
from evaluation.reference_stats import dataset_identity, legacy_reference_identity
from evaluation.settings import CURVE_FILE, check_metrics, short_hash

__all__ = [
    "CURVE_KEY_VERSION",
    "curve_settings",
    "settings_key",
    "data_identity",
    "legacy_curve_settings",
    "rekey_legacy_entries",
]

CURVE_KEY_VERSION = 2
_LEGACY_LOCATION = re.compile(r"-(?:test_path|path)-[0-9a-f]{10}(?=-|$)")


def data_identity(data_cfg: Any, split: str) -> str:
    """``dataset_identity`` of a split; where the data cannot be read here, its config without the location keys
    (``<name>/<split>/config:<hash>``) -- still independent of where the data lies."""
    try:
        return dataset_identity(data_cfg, split)
    except (OSError, ValueError, NotImplementedError):
        flat = {f"data.{k}": v for k, v in flatten(to_plain_dict(data_cfg)).items()}
        kept = {k: v for k, v in flat.items() if k not in location_keys(flat)}
        name = to_plain_dict(data_cfg).get("name")
        return f"{name}/{split}/config:{short_hash(json.dumps(jsonable(kept), sort_keys=True))}"


def _settings_part(settings: Mapping[str, Any], metrics: list[str]) -> dict[str, Any]:
    keys = ["metrics", "num_samples", "seed", "seed_repeats"]
    if "nll" in metrics:
        keys += [k for k in settings if k.startswith("nll_") and k != "nll_batch"]
    return {k: settings[k] for k in keys}


def curve_settings(settings: Mapping[str, Any], data_cfg: Any, sampler_cfg: Any, ema: bool) -> dict[str, Any]:
    """Everything a curve point's value depends on besides the checkpoint (module docstring), hashed into
    ``settings_key``."""
    metrics = check_metrics(settings["metrics"])
    out = {"key_version": CURVE_KEY_VERSION, **_settings_part(settings, metrics)}
    weights = settings.get("feature_extractor_weights_path")
    if any(m != "nll" for m in metrics):
        out["feature_extractor"] = resolve_feature_extractor(settings["feature_extractor"], data_cfg)
        out["extractor_weights"] = weights_digest(os.path.expanduser(str(weights))) if weights else None
        if "fd_dinov2" in metrics:
            dinov2 = settings.get("dinov2_weights_path")
            out["dinov2_weights"] = weights_digest(os.path.expanduser(str(dinov2))) if dinov2 else None
    ref = settings.get("reference_stats")
    if ref:
        out["reference"] = f"stats:{weights_digest(os.path.expanduser(str(ref)))}"
    else:
        out["reference"] = data_identity(data_cfg, "train")
    if "nll" in metrics:
        out["nll_data"] = data_identity(data_cfg, str(settings["nll_split"]))
    out["sampler"] = to_plain_dict(sampler_cfg)
    out["ema"] = bool(ema)
    return out


def settings_key(settings_of_curve: Mapping[str, Any]) -> str:
    """A short hash of ``curve_settings``: the points of one curve share it."""
    return short_hash(json.dumps(jsonable(settings_of_curve), sort_keys=True))


def legacy_curve_settings(settings: Mapping[str, Any], data_cfg: Any, sampler_cfg: Any,
                          ema: bool) -> dict[str, Any]:
    """The version-1 ``curve_settings`` of the same evaluation (the data's path, size and time; the paths of the
    weights and reference files), to recognise the points of older curve files."""
    metrics = check_metrics(settings["metrics"])
    out = {**_settings_part(settings, metrics),
           "feature_extractor_weights_path": settings.get("feature_extractor_weights_path")}
    if any(m != "nll" for m in metrics):
        out["feature_extractor"] = resolve_feature_extractor(settings["feature_extractor"], data_cfg)
    ref = settings.get("reference_stats")
    if ref:
        path = os.path.abspath(os.path.expanduser(str(ref)))
        out["reference"] = f"stats:{path}:{weights_digest(path) if os.path.isfile(path) else ''}"
    else:
        out["reference"] = legacy_reference_identity(data_cfg, "train")
    out["sampler"] = to_plain_dict(sampler_cfg)
    out["ema"] = bool(ema)
    return out


def _without_location(settings_of_curve: Mapping[str, Any]) -> dict[str, Any]:
    """Version-1 settings with the locations left out: the weights path, the data's path hashes, the stats path."""
    out = {k: v for k, v in settings_of_curve.items() if k != "feature_extractor_weights_path"}
    ref = str(out.get("reference", ""))
    out["reference"] = "stats:" + ref.rpartition(":")[2] if ref.startswith("stats:") else _LEGACY_LOCATION.sub("", ref)
    return out


def rekey_legacy_entries(run: str | os.PathLike, key: str, settings_of_curve: Mapping[str, Any],
                         legacy: Mapping[str, Any]) -> int:
    """Give the version-1 points of ``<run>/fid_curve.jsonl`` that were evaluated with ``legacy`` settings (same old
    key, or same settings but for the locations) the new ``key`` and settings; rewrites the file atomically when any
    changed. Returns how many points were re-keyed."""
    path = Path(run) / CURVE_FILE
    if not path.is_file():
        return 0
    legacy_key = settings_key(legacy)
    same = json.dumps(jsonable(_without_location(legacy)), sort_keys=True)
    lines, changed = [], 0
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            lines.append(line)
            continue
        old = entry.get("settings") or {}
        if isinstance(entry, dict) and "key_version" not in old and (
                entry.get("settings_key") == legacy_key
                or json.dumps(jsonable(_without_location(old)), sort_keys=True) == same):
            entry.update(settings_key=key, settings=dict(settings_of_curve), rekeyed_from=entry.get("settings_key"))
            line = json.dumps(jsonable(entry), allow_nan=False)
            changed += 1
        lines.append(line)
    if changed:
        atomic_write_text(path, "\n".join(lines) + "\n")
    return changed
