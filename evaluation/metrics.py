"""Sample-quality metrics of an image set against a reference set: FID (Heusel et al. 2017, arXiv 1706.08500), IS
(Salimans et al. 2016, "Improved Techniques for Training GANs", arXiv 1606.03498), KID (Bińkowski et al. 2018,
"Demystifying MMD GANs", arXiv 1801.01401) and precision/recall (Kynkäänniemi et al. 2019, arXiv 1904.06991),
computed by torch-fidelity in the features of ``evaluation/features.py``; and the loading of sample files.

``compute_metrics`` returns keys that name the extractor (``fid_digits_classifier``, ``fid_inception``, ...; see
``evaluation/settings.py``). With ``eval.reference_stats`` the FID is taken against published statistics
(``evaluation/reference_stats.py``) with our float64 Fréchet distance (``evaluation/frechet.py``).

FID is biased upwards at small sample counts and is comparable only at equal counts: on the digits, the 269
held-out images score 3.5 against the training split, the first 135 of them 11.1, the first 50 33.6. EDM reports
FID with 50,000 samples against the statistics of the whole training set (``eval=fid50k``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from evaluation.feature_metrics import FeatureSet, image_features, metrics_from_features
from evaluation.features import (
    extractor_for,
    extractor_weights,
    image_set_shape,
)
from evaluation.reference_stats import (
    check_fd_dinov2_reference,
    check_reference_statistics,
    compute_reference_statistics,
    load_reference_statistics,
)
from evaluation.settings import DINOV2_EXTRACTOR, INCEPTION_EXTRACTOR, check_sample_metrics, eval_settings

__all__ = ["compute_metrics", "metrics_of_features", "load_samples", "to_nchw"]

_IMAGE_EXTS = (".png", ".jpg", ".jpeg")


def compute_metrics(
    generated: Tensor,
    reference: Any,
    *,
    metrics: Sequence[str] = ("fid",),
    feature_extractor: str = "auto",
    reference_cache_name: str | None = None,
    eval_cfg: Any = None,
    data_cfg: Any = None,
    classifier_path: str | None = None,
    device: str | torch.device | None = None,
    reference_stats: Mapping[str, Any] | str | os.PathLike | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """Metrics of ``generated`` (uint8 [N, C, H, W]) against ``reference`` (ImageDataset or uint8 tensor).

    Args:
        metrics: any of ``fid``, ``isc``, ``kid``, ``prc``.
        feature_extractor: ``auto`` | ``digits-classifier`` | ``inception-v3-compat`` (``auto`` needs ``data_cfg``
            or a reference ImageDataset carrying its ``name``).
        reference_cache_name: identity of the reference set (e.g. ``reference_identity(data_cfg, "train")``); when
            given, its statistics are cached under ``<eval.cache_dir>/fidelity`` with the extractor, its weights'
            digest and the reference size appended. None: nothing is cached.
        eval_cfg: the ``eval`` config group (``cache_dir``, ``batch``, ``seed``, ``feature_extractor_weights_path``,
            ``reference_stats``); None uses ``DEFAULT_EVAL``. ``feature_extractor_weights_path`` applies to Inception.
        data_cfg: the data config; needed by the digits classifier (trained on its training split, cached) unless
            ``classifier_path`` names a classifier file.
        device: where features are computed (default: CUDA when available).
        reference_stats: published reference statistics (a path, or ``{"mu", "sigma"}``; default
            ``eval.reference_stats``): FID against them instead of ``reference`` (which may then be None); IS needs
            no reference; KID and precision/recall are refused (they need reference features).
        progress: progress bars (images/s, ETA; on a terminal) over the feature extraction of each image set.

    Returns:
        ``{"fid_<tag>": ..., "isc_<tag>_mean": ..., ...}`` with tag ``digits_classifier`` or ``inception``.
    """
    settings = eval_settings(eval_cfg)
    metrics = check_sample_metrics(metrics)
    if reference_stats is None:
        reference_stats = settings.get("reference_stats")
    n_gen, n_ref, gen_shape = _check_image_sets(generated, reference, metrics, reference_stats is not None)
    extractor = extractor_for(feature_extractor, data_cfg, reference)
    if extractor == INCEPTION_EXTRACTOR and gen_shape[0] not in (1, 3):
        raise ValueError(f"Inception features need 1- or 3-channel images, got {gen_shape[0]} channels")
    features = image_features(generated, metrics, extractor, settings=settings, data_cfg=data_cfg,
                              classifier_path=classifier_path, device=device,
                              progress="features (samples)" if progress else None)
    return metrics_of_features(features, reference, metrics=metrics, feature_extractor=extractor,
                               reference_cache_name=reference_cache_name, eval_cfg=settings, data_cfg=data_cfg,
                               classifier_path=classifier_path, device=device, reference_stats=reference_stats,
                               progress=progress)


def metrics_of_features(
    features: FeatureSet, reference: Any, *, metrics: Sequence[str] = ("fid",), feature_extractor: str = "auto",
    reference_cache_name: str | None = None, eval_cfg: Any = None, data_cfg: Any = None,
    classifier_path: str | None = None, device: str | torch.device | None = None,
    reference_stats: Mapping[str, Any] | str | os.PathLike | None = None, progress: bool = False,
) -> dict[str, float]:
    """``compute_metrics`` of images given by their features (``evaluation.feature_metrics.image_features``, e.g.
    gathered from the ranks of a torchrun job): the same arguments, the same keys and values."""
    settings = eval_settings(eval_cfg)
    metrics = check_sample_metrics(metrics)
    if reference_stats is None:
        reference_stats = settings.get("reference_stats")
    extractor = extractor_for(feature_extractor, data_cfg, reference)
    stats = None
    if reference_stats is not None:
        stats = reference_stats if isinstance(reference_stats, Mapping) else load_reference_statistics(reference_stats)
        stats = _usable_reference_stats(stats, metrics, extractor, settings, data_cfg, classifier_path, device)
    elif reference is None:
        raise ValueError("the metrics need reference images or reference statistics (eval.reference_stats)")
    return metrics_from_features(features, reference, metrics=metrics, extractor=extractor, settings=settings,
                                 data_cfg=data_cfg, classifier_path=classifier_path, device=device,
                                 reference_cache_name=reference_cache_name, reference_stats=stats, progress=progress)


def _check_image_sets(generated: Any, reference: Any, metrics: Sequence[str],
                      has_stats: bool) -> tuple[int, int, tuple[int, int, int]]:
    """(generated count, reference count (0 with reference statistics), (C, H, W)); clear errors otherwise."""
    n_gen, gen_shape = image_set_shape(generated, "generated images")
    if has_stats:
        needs_features = [m for m in metrics if m in ("kid", "prc")]
        if needs_features:
            raise ValueError(f"eval.reference_stats holds only the reference mu and Sigma; {', '.join(needs_features)} "
                             "need(s) the reference features: drop eval.reference_stats, or use eval.metrics=[fid] / "
                             "[fid,isc]")
        n_ref, ref_shape = 0, gen_shape
    else:
        if reference is None:
            raise ValueError("compute_metrics needs reference images or reference_stats (eval.reference_stats)")
        n_ref, ref_shape = image_set_shape(reference, "reference images")
    if gen_shape != ref_shape:
        raise ValueError(
            f"generated images have shape (C, H, W) = {gen_shape} but the reference images have {ref_shape}: "
            "channels and resolution must match (wrong data config for these samples?)"
        )
    with_reference = [m for m in metrics if m != "isc"]
    if n_gen < 2 or (with_reference and not has_stats and n_ref < 2):
        raise ValueError(f"need at least 2 images per set, got {n_gen} generated and {n_ref} reference")
    if "isc" in metrics and n_gen < 10:
        raise ValueError(f"isc splits the generated images into 10 parts and needs >= 10 of them, got {n_gen}")
    return n_gen, n_ref, gen_shape


def _usable_reference_stats(stats: Mapping[str, Any], metrics: Sequence[str], extractor: str,
                            settings: Mapping[str, Any], data_cfg: Any, classifier_path: str | None,
                            device: Any) -> Mapping[str, Any]:
    """Check a loaded reference file against the extractors (the main one, DINOv2 for ``fd_dinov2``); compute the
    statistics of an images-only (ADM) file."""
    if "images" in stats:
        images = to_nchw(np.asarray(stats["images"]), None, str(stats.get("path", "reference images")))
        return compute_reference_statistics(images, feature_extractor=extractor, eval_cfg=settings,
                                            data_cfg=data_cfg, classifier_path=classifier_path, device=device)
    if any(m != "fd_dinov2" for m in metrics):
        check_reference_statistics(stats, extractor, extractor_weights(extractor, settings, data_cfg,
                                                                       classifier_path)[1])
    if "fd_dinov2" in metrics:
        check_fd_dinov2_reference(stats, extractor_weights(DINOV2_EXTRACTOR, settings, data_cfg, None)[1])
    return stats


def to_nchw(array: np.ndarray, expected_chw: tuple[int, int, int] | None, origin: str) -> Tensor:
    """uint8 images [N, C, H, W] from NCHW or NHWC ``array`` (``expected_chw`` resolves the layout when given)."""
    if array.dtype != np.uint8 or array.ndim != 4:
        raise ValueError(f"{origin}: samples must be uint8 [N, C, H, W] or [N, H, W, C], got {array.dtype} "
                         f"{array.shape}")
    shape = tuple(array.shape[1:])
    if expected_chw is not None:
        c, h, w = expected_chw
        if shape == (c, h, w):
            return torch.from_numpy(np.ascontiguousarray(array))
        if shape == (h, w, c):
            return torch.from_numpy(np.ascontiguousarray(array.transpose(0, 3, 1, 2)))
        raise ValueError(
            f"{origin}: samples of shape {array.shape} match neither NCHW (N, {c}, {h}, {w}) nor NHWC "
            f"(N, {h}, {w}, {c}) of the reference dataset (C, H, W) = {expected_chw}: channel/resolution mismatch"
        )
    if shape[0] in (1, 3) and shape[2] not in (1, 3):
        return torch.from_numpy(np.ascontiguousarray(array))
    if shape[2] in (1, 3):
        return torch.from_numpy(np.ascontiguousarray(array.transpose(0, 3, 1, 2)))
    raise ValueError(f"{origin}: cannot tell the channel axis of samples of shape {array.shape} (1 or 3 channels)")


def _load_image_file(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        if img.mode not in ("L", "RGB"):
            img = img.convert("L" if img.mode in ("1", "LA", "I", "I;16") else "RGB")
        array = np.asarray(img, dtype=np.uint8)
    return array[:, :, None] if array.ndim == 2 else array  # HWC


def load_samples(path: str | os.PathLike, expected_chw: tuple[int, int, int] | None = None) -> Tensor:
    """uint8 [N, C, H, W] from an ``.npz`` (key ``samples``, NHWC or NCHW) or a folder of PNG/JPEG images.

    A folder that holds a ``samples.npz`` (sample.py's output folder) is read through that file. ``expected_chw``
    (the reference's (C, H, W)) resolves the layout and turns a mismatch into an error naming both shapes.
    """
    p = Path(os.path.expanduser(str(path)))
    if not p.exists():
        raise FileNotFoundError(f"samples path not found: {p}")
    if p.is_dir() and (p / "samples.npz").is_file():
        p = p / "samples.npz"
    if p.is_file():
        if p.suffix != ".npz":
            raise ValueError(f"samples must be an .npz file or a folder of images, got {p}")
        with np.load(p) as npz:
            if "samples" not in npz.files:
                raise ValueError(f"{p} has no array 'samples' (found: {', '.join(npz.files) or 'none'})")
            array = npz["samples"]
        return to_nchw(array, expected_chw, str(p))
    files = sorted(f for f in p.iterdir() if f.suffix.lower() in _IMAGE_EXTS and f.is_file())
    if not files:
        raise ValueError(f"no samples.npz and no images ({', '.join(_IMAGE_EXTS)}) in folder {p}")
    arrays = [_load_image_file(f) for f in files]
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        first = arrays[0].shape
        odd = next(f for f, a in zip(files, arrays) if a.shape != first)
        raise ValueError(f"images in {p} differ in size/channels: {files[0].name} is {first} (HWC), {odd.name} is "
                         f"{_load_image_file(odd).shape}")
    return to_nchw(np.stack(arrays), expected_chw, str(p))
