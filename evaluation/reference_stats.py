"""Reference image sets: their identity (for cache names) and their statistics (mu, Sigma) in EDM's file format.

Reference statistics of a dataset are cached by torch-fidelity under ``<eval.cache_dir>/fidelity`` with a cache
name holding the dataset identity (``reference_identity``: source, name, split, resolution, channels, binarize,
split seed, path), the extractor and the digest of its weights file, and the number of reference images, so stale
statistics cannot be reused by mistake.

**Published reference statistics**: ``eval.reference_stats=<file.npz>`` uses the ``mu``/``sigma`` arrays of the
reference files of EDM (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models",
arXiv 2206.00364; ``fid-refs/cifar10-32x32.npz`` and the others of its reference implementation, NVlabs/edm) or of
ADM's reference batches (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs on Image Synthesis", arXiv
2105.05233; ``VIRTUAL_*.npz``, which also hold the images as ``arr_0``; a file with only ``arr_0`` gets its
statistics computed here) directly for FID; KID and precision/recall need the reference features themselves and are
refused with this option. Those files were made with the TF/StyleGAN3 Inception graph; torch-fidelity's
``inception-v3-compat`` is a port of the same 2015 weights made to reproduce its features, but equality of the FIDs
to all digits was not checked here (no network). ``evaluate.py ref=true`` writes such a file
(``save_reference_statistics``: keys ``mu``, ``sigma`` in float64, plus ``num_images`` and the extractor's name/id)
from all (un-flipped) training images of ``data``.

**Which weights made a file.** ``check_reference_statistics`` refuses a file whose recorded extractor, feature size
or weights differ from the evaluation's. Weights are compared by their id (``evaluation/features.py``: the
SHA-256 of the weights file, whichever way it was found), so a file made online (weights from torch hub) is accepted
offline with the same file given as ``eval.feature_extractor_weights_path``; older files that recorded
``inception-6726825d`` match the published weights by the digits they share. Files without a recorded id (EDM's,
ADM's) cannot be checked beyond their feature size.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from configs import to_plain_dict
from data.atomic import atomic_open
from evaluation.features import extract_features, extractor_for, extractor_weights, same_weights
from evaluation.frechet import feature_statistics
from evaluation.settings import eval_settings, safe_name, short_hash

__all__ = [
    "reference_identity",
    "save_reference_statistics",
    "load_reference_statistics",
    "check_reference_statistics",
    "compute_reference_statistics",
]


def reference_identity(data_cfg: Any, split: str) -> str:
    """A file-name-safe string naming a reference image set: everything its pixels depend on (not the x-flip)."""
    d = to_plain_dict(data_cfg)
    parts = [str(d.get("name")), f"src-{d.get('source')}", split, f"res{d.get('resolution')}", f"ch{d.get('channels')}"]
    if d.get("source") == "digits":
        parts += [f"bin{int(bool(d.get('binarize', False)))}", f"split{d.get('split_seed')}",
                  f"heldout{d.get('heldout_fraction')}"]
    for key in ("path", "test_path"):
        path = d.get(key)
        if path and path != "???":
            stat = os.stat(path) if os.path.exists(path) else None
            fingerprint = f"{os.path.abspath(path)}|{stat.st_size if stat else 0}|{stat.st_mtime_ns if stat else 0}"
            parts.append(f"{key}-{short_hash(fingerprint)}")
    return safe_name("-".join(parts))


def save_reference_statistics(path: str | os.PathLike, stats: Mapping[str, Any]) -> Path:
    """Write EDM's reference format (``mu``, ``sigma``; float64) plus ``num_images``, ``feature_extractor``,
    ``extractor_id`` (ignored by EDM's and ADM's loaders), atomically."""
    path = Path(os.path.expanduser(str(path)))
    with atomic_open(path, "wb") as f:
        np.savez(f, mu=np.asarray(stats["mu"], np.float64), sigma=np.asarray(stats["sigma"], np.float64),
                 num_images=np.int64(stats.get("num_images", -1)),
                 feature_extractor=np.str_(stats.get("feature_extractor", "")),
                 extractor_id=np.str_(stats.get("extractor_id", "")))
    return path


def load_reference_statistics(path: str | os.PathLike) -> dict[str, Any]:
    """``{"mu", "sigma", ...}`` from an EDM/ADM/sigmalab reference ``.npz``; ``{"images": uint8 NHWC}`` when the file
    holds only ADM's reference images (``arr_0``), whose statistics the caller then computes."""
    p = Path(os.path.expanduser(str(path)))
    if not p.is_file():
        raise FileNotFoundError(f"eval.reference_stats={p} does not exist (expected an .npz with mu and sigma, e.g. "
                                "EDM's https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/cifar10-32x32.npz)")
    with np.load(p, allow_pickle=False) as npz:
        files = set(npz.files)
        if {"mu", "sigma"} <= files:
            mu, sigma = np.asarray(npz["mu"], np.float64), np.asarray(npz["sigma"], np.float64)
            if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
                raise ValueError(f"{p}: mu must be [F] and sigma [F, F], got {mu.shape} and {sigma.shape}")
            out: dict[str, Any] = {"mu": mu, "sigma": sigma, "path": str(p)}
            for key in ("num_images", "feature_extractor", "extractor_id"):
                if key in files:
                    out[key] = npz[key].item()
            return out
        if "arr_0" in files:
            return {"images": np.asarray(npz["arr_0"]), "path": str(p)}
    raise ValueError(f"{p} has neither mu/sigma (EDM / ADM reference statistics) nor arr_0 (ADM reference images); "
                     f"found: {', '.join(sorted(files)) or 'nothing'}")


def check_reference_statistics(stats: Mapping[str, Any], extractor: str, extractor_id: str,
                               feature_dim: int | None = None) -> None:
    """Refuse reference statistics (``load_reference_statistics``) made with another extractor, feature size or
    weights than ``extractor`` / ``extractor_id``; the error says how to proceed."""
    path = stats.get("path", "")
    recorded = stats.get("feature_extractor")
    if recorded and recorded != extractor:
        raise ValueError(f"eval.reference_stats {path} was computed with {recorded} features, but this evaluation "
                         f"uses {extractor}: set eval.feature_extractor={recorded}, or recompute the file with "
                         "`python evaluate.py ref=true`")
    if feature_dim is not None and "mu" in stats and int(np.shape(stats["mu"])[0]) != int(feature_dim):
        raise ValueError(f"eval.reference_stats {path} has {np.shape(stats['mu'])[0]}-d statistics but the "
                         f"{extractor} features are {feature_dim}-d: the file was made with another feature extractor")
    recorded_id = stats.get("extractor_id")
    if recorded_id and not same_weights(recorded_id, extractor_id):
        digits = str(recorded_id).rpartition("-")[2]
        raise ValueError(
            f"eval.reference_stats {path} was computed with the weights {recorded_id}, but this evaluation uses "
            f"{extractor_id}; statistics of other weights give meaningless distances. Either pass the weights the "
            f"file was made with (eval.feature_extractor_weights_path=<the file whose SHA-256 starts with {digits}>; "
            "`sha256sum <file>` shows it), or recompute the file with these weights: `python evaluate.py ref=true "
            "data=<dataset> out=<file>`")


def compute_reference_statistics(
    reference: Any, *, feature_extractor: str = "auto", eval_cfg: Any = None, data_cfg: Any = None,
    classifier_path: str | None = None, device: str | torch.device | None = None,
) -> dict[str, Any]:
    """``{"mu", "sigma", "num_images", "feature_extractor", "extractor_id"}`` of a reference image set (as EDM's
    ``fid.py ref``: every image, float64 statistics)."""
    settings = eval_settings(eval_cfg)
    extractor = extractor_for(feature_extractor, data_cfg, reference)
    _, extractor_id = extractor_weights(extractor, settings, data_cfg, classifier_path)
    feats = extract_features(reference, feature_extractor=extractor, eval_cfg=settings, data_cfg=data_cfg,
                             classifier_path=classifier_path, device=device)
    mu, sigma = feature_statistics(feats)
    return {"mu": mu, "sigma": sigma, "num_images": int(feats.shape[0]), "feature_extractor": extractor,
            "extractor_id": extractor_id}
