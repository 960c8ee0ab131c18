"""Preflight: what an evaluation needs, checked before anything expensive (sampling, feature extraction, training).

Every mode of ``evaluate.py`` (``ckpt=``, ``samples=``, ``run_dir=``, ``ref=``) and train.py's evaluation during
training (``eval.every_kimg``, at start-up) call ``check_evaluation`` first, so that a wrong weights path, a missing
reference file or an evaluation that cannot work on this data fails in seconds, with the fix in the message, instead
of after 3 x 50,000 samples (``eval=fid50k``) or hours into a training run.

What is checked, cheapest first:

1. the settings: ``eval.metrics``, the sample count (>= 2; >= 10 with ``isc``), ``eval.seed_repeats``,
   ``eval.nll_method`` / ``eval.nll_split``, and that ``kid`` / ``prc`` are not asked of ``eval.reference_stats``
   (they need the reference features, the file holds only mu and Sigma);
2. the output: ``out=`` can be written (its folder exists or can be created);
3. ``eval.reference_stats``: the file exists and holds mu/sigma or ADM's reference images (``arr_0``), and the
   ``--transform`` it records made the data's images too (``check_reference_transform``);
4. the feature extractor (``eval.feature_extractor``; ``auto`` resolved with the data config; DINOv2 too for
   ``fd_dinov2``, with ``eval.dinov2_weights_path``) and its weights file:
   it exists, or for Inception without ``eval.feature_extractor_weights_path`` it is in torch hub's cache or can be
   downloaded now (``evaluation/features.py``);
5. without ``eval.reference_stats``: the training split of the data can be built, holds pixel images (not VAE
   latents) and has the generated images' shape;
6. the extractor builds from its weights and runs on two blank images of that shape (a file of another network fails
   here), and its feature size, name and weights match what ``eval.reference_stats`` recorded
   (``evaluation/reference_stats.py``).

``PreflightResult.record()`` is what the result JSON keeps of it: the extractor, its weights file and id, whether
those are the published Inception weights, and what the samples are compared with.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from data import build_dataset
from diffusion.likelihood import NLL_METHODS
from evaluation.feature_metrics import feature_layers
from evaluation.features import (
    INCEPTION_PUBLISHED_DIGEST,
    extractor_weights,
    image_set_shape,
    is_published_inception,
    probe_extractor,
    resolve_feature_extractor,
)
from evaluation.reference_stats import (
    check_fd_dinov2_reference,
    check_reference_statistics,
    check_reference_transform,
    load_reference_statistics,
    reference_identity,
)
from evaluation.settings import DINOV2_EXTRACTOR, INCEPTION_EXTRACTOR, check_metrics
from training.distributed import broadcast_object, get_rank

__all__ = ["PreflightError", "PreflightResult", "check_settings", "check_writable", "check_evaluation",
           "check_reference_job", "on_main_rank"]

NLL_SPLITS = ("test", "train")
FEATURE_METRICS = ("kid", "prc")  # need the reference features themselves, not only their mean and covariance

T = TypeVar("T")


class PreflightError(RuntimeError):
    """Raised on the ranks other than 0 when rank 0's preflight failed (its message is repeated)."""


@dataclasses.dataclass
class PreflightResult:
    """What the checks found (``record()`` goes into the result JSON)."""

    metrics: list[str]
    feature_extractor: str | None = None
    extractor_id: str | None = None
    weights_path: str | None = None
    published_weights: bool | None = None  # Inception only: torch-fidelity's published file (by its SHA-256)
    feature_dim: int | None = None
    reference: dict[str, Any] | None = None

    def record(self) -> dict[str, Any]:
        return {"feature_extractor": self.feature_extractor, "feature_extractor_id": self.extractor_id,
                "feature_extractor_weights": self.weights_path, "published_weights": self.published_weights,
                "feature_dim": self.feature_dim}


def check_settings(settings: Mapping[str, Any], num_samples: int | None = None) -> list[str]:
    """Step 1 of the module docstring; returns the checked ``eval.metrics``."""
    metrics = check_metrics(settings["metrics"])
    sample_metrics = [m for m in metrics if m != "nll"]
    if sample_metrics and num_samples is not None:
        if int(num_samples) < 2:
            raise ValueError(f"the sample metrics need at least 2 images, got eval.num_samples={num_samples}")
        if "isc" in sample_metrics and int(num_samples) < 10:
            raise ValueError(f"isc splits the generated images into 10 parts and needs >= 10 of them, got "
                             f"{num_samples}")
    repeats = settings.get("seed_repeats", 1)
    if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
        raise ValueError(f"eval.seed_repeats must be an integer >= 1, got {repeats!r}")
    needs_features = [m for m in sample_metrics if m in FEATURE_METRICS]
    if settings.get("reference_stats") is not None and needs_features:
        raise ValueError(f"eval.reference_stats holds only the reference mu and Sigma; {', '.join(needs_features)} "
                         "need(s) the reference features: drop eval.reference_stats, or use eval.metrics=[fid] / "
                         "[fid,isc]")
    if "nll" in metrics:
        method, split = str(settings["nll_method"]), str(settings["nll_split"])
        if method != "auto" and method not in NLL_METHODS:
            raise ValueError(f"unknown eval.nll_method {method!r}; valid: auto, {', '.join(NLL_METHODS)}")
        if split not in NLL_SPLITS:
            raise ValueError(f"unknown eval.nll_split {split!r}; valid: {', '.join(NLL_SPLITS)}")
    return metrics


def check_writable(path: str | os.PathLike) -> None:
    """Step 2: the folder of ``path`` exists or can be created, and can be written."""
    folder = Path(os.path.expanduser(str(path))).parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"cannot write the result to {path}: its folder {folder} cannot be created ({err}); "
                         "choose another out=") from err
    if not os.access(folder, os.W_OK):
        raise ValueError(f"cannot write the result to {path}: no write permission in {folder}; choose another out=")


def check_evaluation(settings: Mapping[str, Any], data_cfg: Any, *, get_reference: Callable[[], Any] | None = None,
                     chw: Sequence[int] | None = None, num_samples: int | None = None,
                     out: str | os.PathLike | None = None) -> PreflightResult:
    """Run the checks of the module docstring for an evaluation with these ``settings`` (``eval_settings``) of
    images of shape ``chw`` (None: not known before sampling, e.g. decoded latents) against ``data_cfg``'s training
    split (``get_reference()``, memoised by the caller) or ``eval.reference_stats``; raises on the first failure."""
    metrics = check_settings(settings, num_samples)
    if out is not None:
        check_writable(out)
    result = PreflightResult(metrics)
    if not any(m != "nll" for m in metrics):
        return result
    main_metrics = [m for m in metrics if m not in ("nll", "fd_dinov2")]  # fd_dinov2 has its own extractor
    stats = None
    if settings.get("reference_stats") is not None:
        stats = load_reference_statistics(settings["reference_stats"])
        check_reference_transform(stats, data_cfg)  # made from images of another crop (ImageNet-64: EDM's vs ADM's)
    extractor = resolve_feature_extractor(settings["feature_extractor"], data_cfg)
    feature_layers([m for m in metrics if m != "nll"], extractor)  # a metric the extractor cannot give fails here
    if main_metrics:
        extractor_weights(extractor, settings, data_cfg, None)  # a missing file or a failed download fails here
    if "fd_dinov2" in metrics:
        extractor_weights(DINOV2_EXTRACTOR, settings, data_cfg, None)  # eval.dinov2_weights_path / the download
    if stats is None:
        chw = _reference_shape(get_reference, chw)
        reference = get_reference()
        result.reference = {"dataset": getattr(reference, "name", None), "split": "train",
                            "num_images": image_set_shape(reference, "the reference images")[0],
                            "identity": reference_identity(data_cfg, "train")}
    else:
        result.reference = {"stats": str(stats.get("path")), "num_images": stats.get("num_images"),
                            "extractor_id": stats.get("extractor_id")}
    if "fd_dinov2" in metrics:
        dinov2 = probe_extractor(DINOV2_EXTRACTOR, settings, data_cfg,
                                 None if chw is None else tuple(int(v) for v in chw))
        if stats is not None:
            check_fd_dinov2_reference(stats, dinov2["extractor_id"])
    if not main_metrics:
        return result
    probe = probe_extractor(extractor, settings, data_cfg, None if chw is None else tuple(int(v) for v in chw))
    if stats is not None and "mu" in stats:
        check_reference_statistics(stats, extractor, probe["extractor_id"], probe["feature_dim"])
    result.feature_extractor, result.extractor_id = extractor, probe["extractor_id"]
    result.weights_path, result.feature_dim = probe["weights_path"], probe["feature_dim"]
    result.published_weights = _published(extractor, probe["weights_path"])
    return result


def check_reference_job(settings: Mapping[str, Any], data_cfg: Any, extractor: str,
                        out: str | os.PathLike | None) -> dict[str, Any]:
    """``evaluate.py ref=true``: the output path, the extractor's weights (before the data is read), the training
    split (pixel images) and the extractor on images of its shape. Returns ``{"dataset": the split,
    "feature_extractor_weights", "published_weights"}``."""
    if out is not None:
        check_writable(out)
    extractor_weights(extractor, settings, data_cfg, None)
    if "fd_dinov2" in (settings.get("metrics") or []):  # ref=true eval.metrics=[fid,fd_dinov2]: DINOv2's too
        extractor_weights(DINOV2_EXTRACTOR, settings, data_cfg, None)
    dataset = build_dataset(data_cfg, split="train")
    if getattr(dataset, "latent", False):
        raise ValueError(f"data '{dataset.name}' holds latents; reference statistics need pixel images (use the "
                         "pixel dataset the latents were made from)")
    _, chw = image_set_shape(dataset, "the training split")
    probe = probe_extractor(extractor, settings, data_cfg, chw)
    return {"dataset": dataset, "feature_extractor_weights": probe["weights_path"],
            "published_weights": _published(extractor, probe["weights_path"])}


def _published(extractor: str, weights_path: str | None) -> bool | None:
    """Inception: whether the weights are the published file (a warning if not); None for other extractors."""
    if extractor != INCEPTION_EXTRACTOR or weights_path is None:
        return None
    published = is_published_inception(weights_path)
    if not published:
        print(f"warning: {weights_path} is not torch-fidelity's published Inception-v3 file (its SHA-256 does not "
              f"start with {INCEPTION_PUBLISHED_DIGEST}): these FIDs are not comparable with published ones",
              flush=True)
    return published


def _reference_shape(get_reference: Callable[[], Any] | None, chw: Sequence[int] | None) -> tuple[int, int, int]:
    """Step 5: the training split's (C, H, W), checked against the generated images' ``chw``."""
    if get_reference is None:
        raise ValueError("the sample metrics need the reference images (the training split) or "
                         "eval.reference_stats=<file.npz>")
    reference = get_reference()  # builds the split: a missing data.path or latent data fails here
    _, ref_chw = image_set_shape(reference, "the reference images")
    if chw is not None and tuple(int(v) for v in chw) != ref_chw:
        raise ValueError(f"the model generates (C, H, W) = {tuple(chw)} but data '{getattr(reference, 'name', '?')}'"
                         f" has {ref_chw}: channel/resolution mismatch (wrong data config for this checkpoint?)")
    return ref_chw


def on_main_rank(check: Callable[[], T], distributed: bool) -> T | None:
    """Run ``check`` on rank 0 only (downloads, dataset builds) and fail on every rank if it failed there: rank 0
    raises the original error, the others a ``PreflightError`` with its message. Returns ``check()`` on rank 0."""
    if not distributed:
        return check()
    if get_rank() == 0:
        try:
            value = check()
        except Exception as err:
            broadcast_object(f"{type(err).__name__}: {err}")
            raise
        broadcast_object(None)
        return value
    failure = broadcast_object(None)
    if failure is not None:
        raise PreflightError(f"rank 0's evaluation preflight failed: {failure}")
    return None
