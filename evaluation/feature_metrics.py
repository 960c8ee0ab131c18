"""Sample metrics from features: an image set goes through each feature extractor once, every metric is computed
from the features, so the images themselves are needed only where they are made.

``image_features`` extracts what ``eval.metrics`` needs from uint8 images (for each extractor the layers of its
metrics: the FID/KID/precision-recall features and, for IS, the logits; for ``fd_dinov2`` the DINOv2 CLS features,
``evaluation/dinov2.py``) into a ``FeatureSet``. ``metrics_from_features`` turns a ``FeatureSet`` of generated
images into the metrics against the reference: the training split (its features and statistics extracted once and
cached by torch-fidelity under ``<eval.cache_dir>/fidelity``) or ``eval.reference_stats`` (mu/sigma; FD-DINOv2 needs
the file's ``fd_dinov2_mu`` / ``fd_dinov2_sigma``, which ``evaluate.py ref=true eval.metrics=[fid,fd_dinov2]``
writes).

Under torchrun each rank extracts the features of its own images and rank 0 gathers only the features
(``FeatureSet.gather``, ``evaluation/ranks.py``): 50,000 Inception features are 0.4 GB where the ImageNet-512 images
are 39 GB.

The formulas are torch-fidelity's (its FID statistics and Fréchet distance, KID, IS and precision/recall functions,
with the same arguments as its ``calculate_metrics``), so the numbers equal those of ``torch_fidelity.
calculate_metrics`` on the same features; FID against published statistics and FD-DINOv2 use our float64 Fréchet
distance (``evaluation/frechet.py``), as EDM and EDM2 compute theirs.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch_fidelity
from torch import Tensor
from torch_fidelity.metric_fid import (
    fid_featuresdict_to_statistics,
    fid_input_id_to_statistics_cached,
    fid_statistics_to_metric,
)
from torch_fidelity.metric_isc import isc_featuresdict_to_metric
from torch_fidelity.metric_kid import kid_featuresdict_to_metric
from torch_fidelity.metric_prc import prc_featuresdict_to_metric
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from torch_fidelity.utils import (
    cache_lookup_one_recompute_on_miss,
    create_feature_extractor,
    extract_featuresdict_from_input_id_cached,
    get_featuresdict_from_dataset,
)

from evaluation.dinov2 import EXTRACTOR_NAME as DINOV2_EXTRACTOR
from evaluation.dinov2 import FEATURE_NAME as DINOV2_FEATURE
from evaluation.features import UInt8Images, eval_device, extractor_weights, inception_download_guard
from evaluation.frechet import feature_statistics, frechet_distance
from evaluation.ranks import gather_to_main
from evaluation.reference_stats import check_fd_dinov2_reference
from evaluation.settings import DIGITS_EXTRACTOR, EXTRACTOR_TAGS, safe_name

__all__ = ["FeatureSet", "feature_layers", "image_features", "metrics_from_features", "reference_fd_dinov2_stats"]

# torch-fidelity result key -> our key template ({tag} = extractor tag).
_KEY_MAP = {
    torch_fidelity.KEY_METRIC_FID: "fid_{tag}",
    torch_fidelity.KEY_METRIC_ISC_MEAN: "isc_{tag}_mean",
    torch_fidelity.KEY_METRIC_ISC_STD: "isc_{tag}_std",
    torch_fidelity.KEY_METRIC_KID_MEAN: "kid_{tag}_mean",
    torch_fidelity.KEY_METRIC_KID_STD: "kid_{tag}_std",
    torch_fidelity.KEY_METRIC_PRECISION: "prc_{tag}_precision",
    torch_fidelity.KEY_METRIC_RECALL: "prc_{tag}_recall",
    torch_fidelity.KEY_METRIC_F_SCORE: "prc_{tag}_f_score",
}


@dataclasses.dataclass
class FeatureSet:
    """Features of one image set: ``features[extractor][layer]`` float32 [N, F] on the CPU (rows in image order),
    and this process's extractor networks (``models``, never sent between ranks)."""

    features: dict[str, dict[str, Tensor]]
    num_images: int
    models: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)

    def first(self, n: int) -> FeatureSet:
        """The features of the first ``n`` images."""
        return FeatureSet({e: {k: v[:n] for k, v in d.items()} for e, d in self.features.items()},
                          min(n, self.num_images), self.models)

    def gather(self, distributed: bool) -> FeatureSet | None:
        """Every rank's features in rank order, on rank 0 (the others: None); ``self`` without a process group."""
        if not distributed:
            return self
        out: dict[str, dict[str, Tensor]] = {}
        for extractor, layers in sorted(self.features.items()):
            for layer, part in sorted(layers.items()):
                gathered = gather_to_main(part, True)
                if gathered is not None:
                    out.setdefault(extractor, {})[layer] = gathered
        if not out:
            return None
        rows = next(iter(next(iter(out.values())).values())).shape[0]
        return FeatureSet(out, int(rows), self.models)


def feature_layers(metrics: Sequence[str], extractor: str) -> dict[str, list[str]]:
    """For each extractor the layers the metrics need (``fd_dinov2``: DINOv2's CLS features)."""
    layers: dict[str, list[str]] = {}
    if "isc" in metrics and extractor == DINOV2_EXTRACTOR:
        raise ValueError(f"isc needs class logits and the {DINOV2_EXTRACTOR} features have none: compute IS with "
                         "eval.feature_extractor=inception-v3-compat (FD-DINOv2 with eval.metrics=[..., fd_dinov2])")
    for metric in metrics:
        if metric == "fd_dinov2":
            name, layer = DINOV2_EXTRACTOR, DINOV2_FEATURE
        else:
            name = extractor
            layer = FEATURE_EXTRACTORS_REGISTRY[extractor].get_default_feature_layer_for_metric(metric)
        if layer not in layers.setdefault(name, []):
            layers[name].append(layer)
    return layers


def _model(name: str, layers: list[str], settings: Mapping[str, Any], data_cfg: Any, classifier_path: str | None,
           device: torch.device) -> Any:
    weights_path, _ = extractor_weights(name, settings, data_cfg, classifier_path)
    with inception_download_guard(name, weights_path):
        return create_feature_extractor(name, layers, cuda=device.type == "cuda",
                                        feature_extractor_weights_path=weights_path, verbose=False)


def image_features(images: Any, metrics: Sequence[str], extractor: str, *, settings: Mapping[str, Any],
                   data_cfg: Any = None, classifier_path: str | None = None, device: Any = None,
                   progress: str | None = None) -> FeatureSet:
    """The features ``metrics`` need of uint8 images [N, C, H, W] (or an ImageDataset), in ``eval.batch`` batches;
    an empty set gives empty features. ``progress``: the label of a progress bar."""
    n = int(images.shape[0]) if isinstance(images, Tensor) else int(getattr(images, "num_images", len(images)))
    device = eval_device(device)
    out, models = {}, {}
    for name, layers in feature_layers(metrics, extractor).items():
        if n == 0:  # a rank with no images of its own (fewer images than ranks): nothing to build or run
            out[name] = {layer: torch.empty(0, 0) for layer in layers}
            continue
        models[name] = _model(name, layers, settings, data_cfg, classifier_path, device)
        feats = get_featuresdict_from_dataset(UInt8Images(images, name != DIGITS_EXTRACTOR, progress), models[name],
                                              int(settings["batch"]), device.type == "cuda", True, False)
        out[name] = {layer: feats[layer].float().cpu() for layer in layers}
    return FeatureSet(out, n, models)


def _fidelity_kwargs(settings: Mapping[str, Any], device: torch.device, reference: Any = None,
                     reference_name: str | None = None, to_rgb: bool = True, progress: bool = False) -> dict[str, Any]:
    """torch-fidelity's keyword arguments, as its ``calculate_metrics`` would get them (input2: the reference)."""
    cache_dir = os.path.expanduser(str(settings["cache_dir"]))
    label = "features (reference)" if progress else None
    return {"input2": None if reference is None else UInt8Images(reference, to_rgb, label),
            "input2_cache_name": reference_name, "cuda": device.type == "cuda", "batch_size": int(settings["batch"]),
            "cache_root": os.path.join(cache_dir, "fidelity"), "cache": True, "save_cpu_ram": True, "verbose": False,
            "rng_seed": int(settings["seed"])}


def metrics_from_features(
    generated: FeatureSet, reference: Any, *, metrics: Sequence[str], extractor: str, settings: Mapping[str, Any],
    data_cfg: Any = None, classifier_path: str | None = None, device: Any = None,
    reference_cache_name: str | None = None, reference_stats: Mapping[str, Any] | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """``eval.metrics`` of generated images given by their features (``image_features``) against ``reference``
    (an ImageDataset or uint8 images; its features cached under ``reference_cache_name`` with the extractor id and
    size appended) or loaded reference statistics (``{"mu", "sigma"[, "fd_dinov2_mu", "fd_dinov2_sigma"]}``).
    ``progress``: a progress bar over the reference images when their features are not cached yet."""
    device = eval_device(device)
    tag = EXTRACTOR_TAGS[extractor]
    n_gen = generated.num_images
    n_ref = 0 if reference_stats is not None else len(UInt8Images(reference, False))
    out: dict[str, float] = {}
    gen = generated.features.get(extractor, {})
    models = dict(generated.models)

    def model(name: str) -> Any:
        if name not in models:
            models[name] = _model(name, feature_layers(metrics, extractor)[name], settings, data_cfg,
                                  classifier_path, device)
        return models[name]

    def kwargs(name: str) -> dict[str, Any]:
        cache = None
        if reference_cache_name is not None:
            weights_id = extractor_weights(name, settings, data_cfg, classifier_path)[1]
            cache = safe_name(f"{reference_cache_name}-{weights_id}-n{n_ref}")
        return _fidelity_kwargs(settings, device, reference, cache, name != DIGITS_EXTRACTOR, progress)

    layer_of = FEATURE_EXTRACTORS_REGISTRY[extractor].get_default_feature_layer_for_metric
    if "isc" in metrics:
        raw = isc_featuresdict_to_metric(gen, layer_of("isc"), **_fidelity_kwargs(settings, device))
        out.update({_KEY_MAP[k].format(tag=tag): float(v) for k, v in raw.items()})
    if "fid" in metrics:
        if reference_stats is not None:
            out[f"fid_{tag}"] = _fd_against(gen[layer_of("fid")], reference_stats["mu"], reference_stats["sigma"],
                                            f"the {extractor} features")
        else:
            with inception_download_guard(extractor, None):
                ref_stats = fid_input_id_to_statistics_cached(2, model(extractor), layer_of("fid"), **kwargs(extractor))
            raw = fid_statistics_to_metric(fid_featuresdict_to_statistics(gen, layer_of("fid")), ref_stats, False)
            out[f"fid_{tag}"] = float(raw[torch_fidelity.KEY_METRIC_FID])
    if "kid" in metrics or "prc" in metrics:
        ref_feats = extract_featuresdict_from_input_id_cached(2, model(extractor), **kwargs(extractor))
        if "kid" in metrics:
            raw = kid_featuresdict_to_metric(gen, ref_feats, layer_of("kid"), kid_subset_size=min(1000, n_gen, n_ref),
                                             **kwargs(extractor))
            out.update({_KEY_MAP[k].format(tag=tag): float(v) for k, v in raw.items()})
        if "prc" in metrics:
            raw = prc_featuresdict_to_metric(gen, ref_feats, layer_of("prc"), **kwargs(extractor))
            out.update({_KEY_MAP[k].format(tag=tag): float(v) for k, v in raw.items()})
    if "fd_dinov2" in metrics:
        mu, sigma = (reference_fd_dinov2_stats(reference_stats) if reference_stats is not None else
                     _reference_dinov2_stats(model(DINOV2_EXTRACTOR), kwargs(DINOV2_EXTRACTOR)))
        out["fd_dinov2"] = _fd_against(generated.features[DINOV2_EXTRACTOR][DINOV2_FEATURE], mu, sigma,
                                       "the DINOv2 features")
    return {k: out[k] for k in sorted(out, key=_order(metrics))}


def _order(metrics: Sequence[str]) -> Any:
    """Result keys in the order of ``eval.metrics``."""
    rank = {m: i for i, m in enumerate(metrics)}
    return lambda key: rank.get("fd_dinov2" if key == "fd_dinov2" else key.split("_", 1)[0], len(rank))


def _fd_against(features: Tensor, mu: Any, sigma: Any, what: str) -> float:
    """The float64 Fréchet distance of ``features`` to reference statistics (EDM's / EDM2's formula)."""
    f_mu, f_sigma = feature_statistics(features)
    if f_mu.shape != np.shape(mu):
        raise ValueError(f"eval.reference_stats has {np.shape(mu)[0]}-d statistics but {what} are {f_mu.shape[0]}-d: "
                         "the file was made with another feature extractor")
    return frechet_distance(f_mu, f_sigma, mu, sigma)


def reference_fd_dinov2_stats(stats: Mapping[str, Any]) -> tuple[Any, Any]:
    """(mu, sigma) of FD-DINOv2 from a reference file; a clear error when the file holds none."""
    check_fd_dinov2_reference(stats, None)
    return stats["fd_dinov2_mu"], stats["fd_dinov2_sigma"]


def _reference_dinov2_stats(model: Any, kwargs: Mapping[str, Any]) -> tuple[Any, Any]:
    """Float64 (mu, sigma) of the reference's DINOv2 features, cached by torch-fidelity under the reference name."""
    def compute() -> dict[str, Any]:
        dataset = kwargs["input2"]
        feats = get_featuresdict_from_dataset(dataset, model, kwargs["batch_size"], kwargs["cuda"], True, False)
        mu, sigma = feature_statistics(feats[DINOV2_FEATURE])
        return {"mu": mu, "sigma": sigma}

    name = kwargs.get("input2_cache_name")
    stats = (cache_lookup_one_recompute_on_miss(f"{name}-stat-fd-dinov2", compute, **kwargs) if name is not None
             else compute())
    return stats["mu"], stats["sigma"]
