"""The ``eval`` config group's defaults and checks, and the names the evaluation modules share.

``eval_settings`` turns an ``eval`` node (a DictConfig, a mapping of some keys, or None) into a complete plain dict
over ``DEFAULT_EVAL``; every evaluation function takes such a node and calls it, so a partial dict in a test or a
library call means the same as the config group with those keys changed.

Metric names (``eval.metrics``): ``fid``, ``isc``, ``kid``, ``prc``, ``fd_dinov2`` (properties of an image set) and
``nll`` (a property of the model: ``evaluation/likelihood.py``); ``configs.validation.VALID_METRICS`` is the one list
of them. Result keys always name the feature extractor: ``fid_<tag>``, ``isc_<tag>_mean/_std``,
``kid_<tag>_mean/_std``, ``prc_<tag>_precision/_recall/_f_score`` with tag ``digits_classifier``, ``inception`` or
``dinov2`` (``EXTRACTOR_TAGS``); ``fd_dinov2`` (EDM2's FD_DINOv2, ``evaluation/dinov2.py``) names its own.
Keys do not carry the sample count (``fid_inception``, not ``fid50k_inception``): a ``num_samples`` field sits
beside every set of values instead (``num_samples`` beside ``metrics`` in ``eval-*.json`` and ``fid_curve.jsonl``,
``counts`` beside ``columns``, ``num_samples`` in each seed repeat, ``eval/num_samples`` in metrics.jsonl), so the
existing keys stay readable by every consumer and a 2,000-sample FID is never mistaken for a 50k one.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from omegaconf import OmegaConf

from configs import to_plain_dict
from configs.validation import VALID_METRICS
from evaluation.digits_classifier import EXTRACTOR_NAME as DIGITS_EXTRACTOR
from evaluation.dinov2 import EXTRACTOR_NAME as DINOV2_EXTRACTOR

__all__ = [
    "VALID_METRICS",
    "SAMPLE_METRICS",
    "DIGITS_EXTRACTOR",
    "INCEPTION_EXTRACTOR",
    "DINOV2_EXTRACTOR",
    "VALID_EXTRACTORS",
    "DIGITS_DATASETS",
    "EXTRACTOR_TAGS",
    "EXTRACTOR_DESCRIPTIONS",
    "DEFAULT_EVAL",
    "CURVE_FILE",
    "eval_settings",
    "check_metrics",
    "check_sample_metrics",
    "primary_key",
    "short_hash",
    "safe_name",
    "override_keys",
    "run_group",
]

SAMPLE_METRICS = tuple(m for m in VALID_METRICS if m != "nll")
INCEPTION_EXTRACTOR = "inception-v3-compat"
VALID_EXTRACTORS = ("auto", DIGITS_EXTRACTOR, INCEPTION_EXTRACTOR, DINOV2_EXTRACTOR)
DIGITS_DATASETS = ("digits", "binary_digits")
EXTRACTOR_TAGS = {DIGITS_EXTRACTOR: "digits_classifier", INCEPTION_EXTRACTOR: "inception", DINOV2_EXTRACTOR: "dinov2"}
EXTRACTOR_DESCRIPTIONS = {
    DIGITS_EXTRACTOR: "digits-classifier features (64-d penultimate layer of a CNN trained on the training split; "
    "not Inception FID)",
    INCEPTION_EXTRACTOR: "Inception-v3 features (torch-fidelity inception-v3-compat, pool3 2048-d)",
    DINOV2_EXTRACTOR: "DINOv2 ViT-L/14 features (CLS 1024-d, EDM2's bicubic-antialiased resize to 224; FD-DINOv2)",
}
CURVE_FILE = "fid_curve.jsonl"  # in every run: one line per evaluated checkpoint (evaluation/curves.py)
DEFAULT_EVAL = {
    "name": "default",
    "metrics": ["fid"],
    "feature_extractor": "auto",
    "feature_extractor_weights_path": None,
    "dinov2_weights_path": None,
    "num_samples": 2000,
    "batch": 250,
    "baselines": False,
    "cache_dir": None,  # None: $SIGMALAB_CACHE, else ~/.cache/sigmalab (read at call time)
    "every_kimg": None,
    "num_samples_during_training": 1000,
    "seed": 0,
    "seed_repeats": 1,
    "reference_stats": None,
    "save_samples": False,
    "progress": True,
    "curve_metric": None,
    "target_fid": None,
    "target_interpolation": "loglinear",
    "baseline_run": None,
    "checkpoints": "all",
    "nll_method": "auto",
    "nll_split": "test",
    "nll_num_images": 1000,
    "nll_solver": "rk45",
    "nll_tolerance": 1e-5,
    "nll_steps": 128,
    "nll_probes": 1,
    "nll_probe": "rademacher",
    "nll_batch": None,
    "nll_elbo_sigma_min": 0.2,
}


def eval_settings(eval_cfg: Any) -> dict:
    """``DEFAULT_EVAL`` updated with the keys of ``eval_cfg`` (None: the defaults); ``cache_dir`` filled in."""
    settings = dict(DEFAULT_EVAL)
    settings.update(to_plain_dict(eval_cfg))
    if settings["cache_dir"] is None:
        default = os.path.join(os.path.expanduser("~"), ".cache", "sigmalab")
        settings["cache_dir"] = os.environ.get("SIGMALAB_CACHE", default)
    return settings


def check_metrics(metrics: Any) -> list[str]:
    """``eval.metrics`` as a list of known metric names (lower case, each once, in the given order)."""
    if isinstance(metrics, str):
        metrics = [metrics]
    metrics = [str(m).strip().lower() for m in metrics]
    if not metrics:
        raise ValueError(f"eval.metrics is empty; valid metrics: {', '.join(VALID_METRICS)}")
    for m in metrics:
        if m not in VALID_METRICS:
            raise ValueError(f"unknown metric {m!r} in eval.metrics; valid: {', '.join(VALID_METRICS)}")
    return list(dict.fromkeys(metrics))


def check_sample_metrics(metrics: Sequence[str]) -> list[str]:
    """``check_metrics``, refusing ``nll`` (which needs the model, not an image set)."""
    metrics = check_metrics(metrics)
    if "nll" in metrics:
        raise ValueError("nll is a property of the model, not of an image set: compute it with ckpt=<run> "
                         "eval.metrics=[nll] (evaluate_denoiser / likelihood_metrics), not from images")
    return metrics


def primary_key(values: Mapping[str, float]) -> tuple[str | None, bool]:
    """The metric that ranks seed repeats / is plotted by default, and whether lower is better."""
    for prefix, suffix, lower in (("fid_", "", True), ("kid_", "_mean", True), ("isc_", "_mean", False),
                                  ("nll_", "_bpd", True)):
        for k in values:
            if k.startswith(prefix) and k.endswith(suffix):
                return k, lower
    return (next(iter(values), None), True)


def short_hash(text: str) -> str:
    """Ten hex digits of the SHA-256 of ``text``."""
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def safe_name(text: str) -> str:
    """``text`` with every character that is not safe in a file name replaced by ``_``."""
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", text)


def override_keys(overrides: Sequence[str], group: str) -> tuple[bool, list[str]]:
    """(whether ``group=<option>`` was chosen on the command line, the ``group.key`` keys set there)."""
    chosen, keys = False, []
    for item in overrides:
        lhs = item.split("=", 1)[0].lstrip("+~")
        if lhs == group:
            chosen = True
        elif lhs.startswith(group + "."):
            keys.append(lhs[len(group) + 1:])
    return chosen, keys


def run_group(run_value: Any, cli_value: Any, overrides: Sequence[str], group: str) -> Any:
    """The run's own config group, unless the command line chose another option or set some of its keys."""
    chosen, keys = override_keys(overrides, group)
    if chosen or run_value is None:
        return cli_value
    merged = OmegaConf.create(to_plain_dict(run_value))
    for key in keys:
        OmegaConf.update(merged, key, OmegaConf.select(cli_value, key), force_add=True)
    return merged
