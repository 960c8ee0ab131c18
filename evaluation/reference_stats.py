"""Reference image sets: their identity (for cache names) and their statistics (mu, Sigma) in EDM's file format.

Reference statistics of a dataset are cached by torch-fidelity under ``<eval.cache_dir>/fidelity`` with a cache
name holding the dataset identity (``reference_identity``: source, name, split, resolution, channels, binarize,
split seed and, for data read from files, a fingerprint of the content, not its path), the extractor and the digest
of its weights file, and the number of reference images, so stale statistics cannot be reused by mistake.

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

**Which preprocessing made the images.** A file written by ``ref=true`` also records the ``--transform`` that made
its images (``transform``: ``center-crop`` for EDM's ImageNet-64, ``adm`` for ADM's crop; ``data.transforms``).
``check_reference_transform`` refuses (before sampling) an evaluation whose data was prepared with another one: the
two crops give different pixels and bias the FID. EDM's own ``imagenet-64x64.npz`` records nothing; it was made
with ``center-crop``, the default of ``python -m data.prepare imagenet``.

**What a data split is** (``dataset_identity``), as opposed to where it lies: the name, split, image count, shape and
a content fingerprint (every label and the pixels of ``IDENTITY_ITEMS`` items spread over the split). Curve keys
(``evaluation/curves.py``) use it, so a copy of the data on node-local disk is the same reference set.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from configs import flatten, to_plain_dict
from data import build_dataset
from data.atomic import atomic_open
from data.transforms import data_transform
from evaluation.features import extract_features, extractor_for, extractor_weights, same_weights
from evaluation.frechet import feature_statistics
from evaluation.settings import DINOV2_EXTRACTOR, eval_settings, safe_name, short_hash

__all__ = [
    "reference_identity",
    "legacy_reference_identity",
    "save_reference_statistics",
    "load_reference_statistics",
    "check_reference_statistics",
    "check_reference_transform",
    "check_fd_dinov2_reference",
    "compute_reference_statistics",
    "dataset_identity",
    "IDENTITY_ITEMS",
]

IDENTITY_ITEMS = 16  # items whose pixels go into a dataset's content fingerprint (first and last included)
_IDENTITY_MEMO: dict[str, str] = {}


def _identity_parts(d: Mapping[str, Any], split: str) -> list[str]:
    parts = [str(d.get("name")), f"src-{d.get('source')}", split, f"res{d.get('resolution')}", f"ch{d.get('channels')}"]
    if d.get("source") == "digits":
        parts += [f"bin{int(bool(d.get('binarize', False)))}", f"split{d.get('split_seed')}",
                  f"heldout{d.get('heldout_fraction')}"]
    return parts


def reference_identity(data_cfg: Any, split: str) -> str:
    """A file-name-safe string naming a reference image set: everything its pixels depend on (not the x-flip).

    Data read from files is named by its content (``dataset_identity``'s fingerprint), not by its path or file
    times: a copy of the data moved to a node's local disk keeps its cached reference statistics, and a re-prepared
    dataset at the same path gets new ones."""
    d = to_plain_dict(data_cfg)
    parts = _identity_parts(d, split)
    if any(d.get(key) and d.get(key) != "???" for key in ("path", "test_path")):
        parts.append(f"data-{dataset_identity(data_cfg, split).rpartition('/')[2]}")
    return safe_name("-".join(parts))


def legacy_reference_identity(data_cfg: Any, split: str) -> str:
    """The reference name of version 1 of the curve files (path, size and modification time of the data files),
    kept only to recognise their points (``evaluation.curve_keys``)."""
    d = to_plain_dict(data_cfg)
    parts = _identity_parts(d, split)
    for key in ("path", "test_path"):
        path = d.get(key)
        if path and path != "???":
            stat = os.stat(path) if os.path.exists(path) else None
            fingerprint = f"{os.path.abspath(path)}|{stat.st_size if stat else 0}|{stat.st_mtime_ns if stat else 0}"
            parts.append(f"{key}-{short_hash(fingerprint)}")
    return safe_name("-".join(parts))


def dataset_identity(data_cfg: Any, split: str, dataset: Any = None) -> str:
    """``<name>/<split>/n<images>/<C>x<R>x<R>/<12 hex digits>``: what a data split is, not where it lies.

    The digits are the start of the SHA-256 of the image count, the shape, every label and the raw pixels of
    ``IDENTITY_ITEMS`` un-flipped items at evenly spaced indices (first and last included): a copy of the data
    elsewhere has the same identity, a re-prepared or edited dataset almost surely not. Builds the split unless
    ``dataset`` is given; memoised per data config within a process.
    """
    memo_key = f"{sorted((k, repr(v)) for k, v in flatten(to_plain_dict(data_cfg)).items())}|{split}"
    if dataset is None and memo_key in _IDENTITY_MEMO:
        return _IDENTITY_MEMO[memo_key]
    if dataset is None:
        dataset = build_dataset(data_cfg, split=split)
    n = int(getattr(dataset, "num_images", len(dataset)))
    digest = hashlib.sha256(f"{n}|{dataset.num_channels}|{dataset.resolution}".encode())
    digest.update(np.ascontiguousarray(dataset.all_labels().numpy()).tobytes())
    for i in sorted({round(k * (n - 1) / (IDENTITY_ITEMS - 1)) for k in range(IDENTITY_ITEMS)}):
        digest.update(np.ascontiguousarray(torch.as_tensor(dataset._load_image(i)).numpy()).tobytes())
    c, r = int(dataset.num_channels), int(dataset.resolution)
    identity = f"{dataset.name}/{split}/n{n}/{c}x{r}x{r}/{digest.hexdigest()[:12]}"
    _IDENTITY_MEMO[memo_key] = identity
    return identity


def save_reference_statistics(path: str | os.PathLike, stats: Mapping[str, Any]) -> Path:
    """Write EDM's reference format (``mu``, ``sigma``; float64) plus ``num_images``, ``feature_extractor``,
    ``extractor_id`` and, when known, the ``transform`` that made the images (extra keys, ignored by EDM's and ADM's
    loaders), atomically."""
    path = Path(os.path.expanduser(str(path)))
    extra = {"transform": np.str_(stats["transform"])} if stats.get("transform") else {}
    if stats.get("fd_dinov2_mu") is not None:  # FD-DINOv2's statistics beside Inception's (evaluation/dinov2.py)
        extra.update(fd_dinov2_mu=np.asarray(stats["fd_dinov2_mu"], np.float64),
                     fd_dinov2_sigma=np.asarray(stats["fd_dinov2_sigma"], np.float64),
                     fd_dinov2_extractor_id=np.str_(stats.get("fd_dinov2_extractor_id", "")))
    with atomic_open(path, "wb") as f:
        np.savez(f, mu=np.asarray(stats["mu"], np.float64), sigma=np.asarray(stats["sigma"], np.float64),
                 num_images=np.int64(stats.get("num_images", -1)),
                 feature_extractor=np.str_(stats.get("feature_extractor", "")),
                 extractor_id=np.str_(stats.get("extractor_id", "")), **extra)
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
            for key in ("num_images", "feature_extractor", "extractor_id", "transform", "fd_dinov2_extractor_id"):
                if key in files:
                    out[key] = npz[key].item()
            for key in ("fd_dinov2_mu", "fd_dinov2_sigma"):
                if key in files:
                    out[key] = np.asarray(npz[key], np.float64)
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


def check_reference_transform(stats: Mapping[str, Any] | str | os.PathLike, data_cfg: Any) -> None:
    """Refuse reference statistics (a loaded file or its path) whose recorded ``transform`` differs from the one that
    made ``data_cfg``'s images (``data.transforms.data_transform``); nothing to check when either is unknown."""
    if not isinstance(stats, Mapping):
        p = Path(os.path.expanduser(str(stats)))
        with np.load(p, allow_pickle=False) as npz:
            stats = {"path": str(p), **({"transform": npz["transform"].item()} if "transform" in npz.files else {})}
    recorded = stats.get("transform")
    current = data_transform(data_cfg) if recorded else None
    if recorded and current and recorded != current:
        where = to_plain_dict(data_cfg).get("path")
        raise ValueError(
            f"eval.reference_stats {stats.get('path', '')} was computed from images prepared with --transform "
            f"{recorded}, but this data ({where}) was prepared with --transform {current}: the crops give different "
            f"pixels and the FID would be biased. Prepare the data with `python -m data.prepare ... --transform "
            f"{recorded}`, or compute reference statistics of this data: `python evaluate.py ref=true data=<dataset> "
            "out=<file>`")


def check_fd_dinov2_reference(stats: Mapping[str, Any], dinov2_id: str | None) -> None:
    """Refuse reference statistics without FD-DINOv2's (``fd_dinov2_mu`` / ``fd_dinov2_sigma``) or made with other
    DINOv2 weights than ``dinov2_id`` (None: not checked); ADM's images-only files pass (computed here)."""
    if "images" in stats:
        return
    path = stats.get("path", "")
    if stats.get("fd_dinov2_mu") is None:
        raise ValueError(f"eval.reference_stats {path} holds no DINOv2 statistics (fd_dinov2_mu / fd_dinov2_sigma) "
                         "for fd_dinov2: write them with `python evaluate.py ref=true data=<dataset> "
                         "eval.metrics=[fid,fd_dinov2] out=<file>`, or drop eval.reference_stats to use the training "
                         "split")
    recorded = stats.get("fd_dinov2_extractor_id")
    if recorded and dinov2_id and not same_weights(recorded, dinov2_id):
        raise ValueError(f"eval.reference_stats {path} has DINOv2 statistics of the weights {recorded}, but this "
                         f"evaluation uses {dinov2_id}: pass the weights the file was made with "
                         "(eval.dinov2_weights_path=...) or recompute the file with ref=true")


def compute_reference_statistics(
    reference: Any, *, feature_extractor: str = "auto", eval_cfg: Any = None, data_cfg: Any = None,
    classifier_path: str | None = None, device: str | torch.device | None = None,
) -> dict[str, Any]:
    """``{"mu", "sigma", "num_images", "feature_extractor", "extractor_id", "transform"}`` of a reference image set (as
    EDM's ``fid.py ref``: every image, float64 statistics); ``transform`` is the preparation of ``data_cfg``'s
    training images when ``reference`` is that dataset (None for an image tensor or when unknown). With
    ``fd_dinov2`` in ``eval.metrics`` also ``fd_dinov2_mu``, ``fd_dinov2_sigma``, ``fd_dinov2_extractor_id`` (the
    DINOv2 features, as EDM2's reference files hold both)."""
    settings = eval_settings(eval_cfg)
    extractor = extractor_for(feature_extractor, data_cfg, reference)
    _, extractor_id = extractor_weights(extractor, settings, data_cfg, classifier_path)
    feats = extract_features(reference, feature_extractor=extractor, eval_cfg=settings, data_cfg=data_cfg,
                             classifier_path=classifier_path, device=device)
    mu, sigma = feature_statistics(feats)
    transform = None if isinstance(reference, torch.Tensor) or data_cfg is None else data_transform(data_cfg)
    out = {"mu": mu, "sigma": sigma, "num_images": int(feats.shape[0]), "feature_extractor": extractor,
           "extractor_id": extractor_id, "transform": transform}
    if "fd_dinov2" in (settings.get("metrics") or []):
        dino = extract_features(reference, feature_extractor=DINOV2_EXTRACTOR, eval_cfg=settings, data_cfg=data_cfg,
                                device=device)
        out["fd_dinov2_mu"], out["fd_dinov2_sigma"] = feature_statistics(dino)
        out["fd_dinov2_extractor_id"] = extractor_weights(DINOV2_EXTRACTOR, settings, data_cfg, None)[1]
    return out
