"""Sample-quality metrics (FID, IS, KID, precision/recall) through torch-fidelity, likelihood, FID-vs-training curves,
the sweep report in the papers' layout, and the ``evaluate.py`` CLI.

    python evaluate.py samples=<samples.npz | folder of PNGs> [data=digits]
    python evaluate.py ckpt=<run dir | checkpoint file> [eval.num_samples=2000] [eval.baselines=true]
    torchrun --standalone --nproc_per_node=8 evaluate.py ckpt=<run> eval=fid50k      # sampling split over the ranks
    python evaluate.py ckpt=<run> eval.metrics=[nll]                                  # bits/dim on the held-out split
    python evaluate.py run_dir=<run or sweep dir> eval.num_samples=10000              # FID vs kimg of every checkpoint
    python evaluate.py ref=true data=cifar10 data.path=<dir> [out=cifar10-32x32.npz] # reference μ, Σ (EDM's format)
    python evaluate.py report=<sweep dir> [eval.baseline_run=lognormal] [out=<dir>]   # the papers' tables
    python evaluate.py report=schedules [out=docs/figures]                            # the schedules figure
    python evaluate.py report=infonoise run_dir=<run or sweep> [out=<dir>]            # InfoNoise profiles

Metric (Heusel et al. 2017; EDM's fid.py, see shared/papers/edm.md §5): features f of each image set are summarised by
their mean mu and covariance Sigma (unbiased, N - 1), and

    FID = ||mu_1 - mu_2||^2 + tr(Sigma_1 + Sigma_2 - 2 (Sigma_1 Sigma_2)^(1/2)).

torch-fidelity computes it (tr of the square root via the eigenvalues of Sigma_1 Sigma_2); ``frechet_distance`` is
our float64 implementation of the same formula, used with published reference statistics (below) and for features
given directly (``fid_from_features``): tr (Sigma_1 Sigma_2)^(1/2) = tr (S Sigma_2 S)^(1/2) with S = Sigma_1^(1/2)
(AB and BA share their eigenvalues), computed from two symmetric eigendecompositions. Which features:

- ``inception-v3-compat``: torch-fidelity's port of the TF 2015 Inception-v3 (pool3, 2048-d) -- the standard FID
  for natural images (CIFAR-10, image folders); grayscale is repeated to 3 channels. Reported as ``fid_inception``.
  EDM reports FID with 50,000 samples against the statistics of the whole training set (``eval=fid50k``); with
  fewer samples FID is biased upwards and comparable only at equal sample counts.
- ``digits-classifier``: the penultimate 64-d features of a small CNN trained once on the training split of the
  8x8 digits (``evaluation/digits_classifier.py``). This is the usual "classifier FID" of MNIST-like data; it is
  reported as ``fid_digits_classifier`` / "classifier-FID (digits-classifier features)", a different scale from
  Inception FID, and is never to be compared with one.
- ``auto`` (default): digits-classifier for the digits datasets (data.source digits or data.name digits /
  binary_digits), Inception otherwise.

Result keys always name the extractor: ``fid_<tag>``, ``isc_<tag>_mean/_std``, ``kid_<tag>_mean/_std``,
``prc_<tag>_precision/_recall/_f_score`` with tag ``digits_classifier`` or ``inception``. IS uses the extractor's
logits (for the digits classifier: the "classifier IS"); precision/recall (Kynkäänniemi et al. 2019, k = 3) use the
same features as FID rather than VGG-16.

Reference statistics are cached by torch-fidelity under ``<eval.cache_dir>/fidelity`` with a cache name holding the
dataset identity (source, name, split, resolution, channels, binarize, split seed, path), the extractor and the
digest of its weights file, and the number of reference images, so stale statistics cannot be reused by mistake.
**Published reference statistics**: ``eval.reference_stats=<file.npz>`` uses the ``mu``/``sigma`` arrays of EDM's
``fid-refs/cifar10-32x32.npz`` (and the other EDM refs) or of ADM's reference batches (``VIRTUAL_*.npz``, which also
hold the images as ``arr_0``; a file with only ``arr_0`` gets its statistics computed here) directly for FID; KID and
precision/recall need the reference features themselves and are refused with this option. Those files were made with
the TF/StyleGAN3 Inception graph; torch-fidelity's ``inception-v3-compat`` is a port of the same 2015 weights made to
reproduce its features, but equality of the FIDs to all digits was not checked here (no network). ``ref=true``
writes such a file (keys ``mu``, ``sigma`` in float64, plus ``num_images`` and the extractor's name/id) from all
(un-flipped) training images of ``data``.

FID is biased upwards at small sample counts and is comparable only at equal counts: on the digits, the 269
held-out images score 3.5 against the training split, the first 135 of them 11.1, the first 50 33.6.

``eval.baselines=true`` adds two reference points: the **floor**, the metric of the held-out split against the
training split (a model that generalises perfectly cannot do better, up to the bias of the smaller sample: compare
it with the ``samples@<n>`` column, the same metric on the first n samples), and the **ceiling**, the metric of a
freshly initialised (untrained) denoiser of the checkpoint's architecture sampled with the same sampler and seeds.

**Seeds.** With ``ckpt=``, image i comes from seed ``eval.seed + i`` (per-image random streams, ``sample.py``), so
the result does not depend on the batch size or on the number of ranks: under ``torchrun`` each rank generates a
contiguous slice of the seeds and rank 0 gathers them and computes the metrics. ``eval.seed_repeats=R`` evaluates R
disjoint seed ranges (seed + r·N .. seed + (r+1)·N − 1) and reports the one with the **minimum FID** as EDM does
(``eval=fid50k``: seeds 0-49999, 50000-99999, 100000-149999), listing every value.

**Likelihood** (``eval.metrics=[nll]``, ``diffusion/likelihood.py``): on ``eval.nll_num_images`` images of the
``eval.nll_split`` split (default: held out), image i with seed ``eval.seed + i``. 8-bit data: the dequantised
probability-flow-ODE NLL in bits/dim on the [0, 256) scale (``nll_ode_bpd``; adaptive RK45 or fixed-step Heun,
Hutchinson trace with ``eval.nll_probes`` Rademacher/Gaussian probes); binarized data: the continuous-time
variational bound (``nll_elbo_bpd``), an upper bound on the model's discrete NLL, from ``eval.nll_elbo_sigma_min``
(default 0.2, where the rounding decoder is exact; see diffusion/likelihood.py §3). ``_sem`` keys are the standard
errors of the mean over the images. σ range otherwise: the sampler's ``sigma_min``/``sigma_max``.

**Curves** (``run_dir=``): every checkpoint of a run (a directory with ``checkpoints/``), or of every run below a
sweep directory, is evaluated with the ``eval`` settings given on the command line (data and sampler: each run's
own, unless overridden); one JSON line per checkpoint is appended to ``<run>/fid_curve.jsonl`` (checkpoints already
evaluated with the same settings are skipped, so the command is resumable); ``<run_dir>/fid_curve.png`` (metric vs
kimg, one line per run, log y) and ``<run_dir>/fid_curve.md`` (images-to-reach-target table) are written. The
target is ``eval.target_fid``, else the baseline run's final value (InfoNoise's definition of the speed-up: images
needed to reach the final quality of the baseline), else the largest of the runs' best values. The kimg at which a
run reaches it is reported twice: at the first checkpoint at or below the target, and interpolated between that
checkpoint and the one before (``eval.target_interpolation``: ``loglinear`` = log FID linear in kimg, ``linear``,
or ``none``); the speed-up column is baseline kimg / run kimg of the interpolated value (``none``: of the
checkpoint value), i.e. ">1: reaches the target with fewer training images than the baseline".

**Report** (``report=<sweep dir>``; a sweep of sweeps or a single run work too): reads every run's ``config.yaml``
and ``fid_curve.jsonl`` (no model is loaded; run ``run_dir=<sweep>`` first) and writes ``report.md``, ``report.json``
and ``fid_vs_kimg.png`` into ``<sweep>/report`` (or ``out=``). One table per data config; rows = the settings the
runs differ in besides the seed, labelled from the configs (``report_rows``: the varied group names such as
schedule, precond, weighting, then single keys such as ``train.lr``, the fewest that tell the rows apart); the seeds
of a row are averaged: cells are mean ± sample std (n − 1) over seeds (n). Evaluation variants (curve settings set
on the ``run_dir=`` command line that differ within a run, e.g. ``sampler.guidance`` or ``eval.num_samples``) get
their own tables, and columns side by side in the final table. Tables: the metric at every checkpoint's kimg; the
final value (the last kimg evaluated for every seed), with the metrics of ``eval-*.json`` files in the run (e.g.
``ckpt=<run> eval=nll``) as extra columns; the images-to-target table on the seed-mean curves (target: the baseline
row's final value or ``eval.target_fid``; baseline: ``eval.baseline_run`` = a row label, default the row
``lognormal`` where there is one; crossing as ``kimg_to_reach``), with the same crossing per seed. A run's ``paper:``
node (experiment presets) adds the published numbers beside the measured ones: ``paper.fid`` (a number, or
{guidance: FID} matched to the variant's ``sampler.guidance``), ``paper.fid_by_kimg`` beside the kimg columns,
``paper.speedup_*`` beside the speed-ups. Runs without a curve are an error naming the command to run.
``eval.num_samples=`` (``seed``, ``seed_repeats``, ``metrics``) and ``sampler.<key>=`` on the report's command line
keep only the points evaluated with those settings (e.g. ``sampler.guidance=3.0``).

**During training**: ``evaluate_during_training`` (called by train.py on rank 0 every ``eval.every_kimg``) samples
``eval.num_samples_during_training`` images and returns ``{"kimg": ..., "eval/<metric>": ...}`` for
metrics.jsonl / wandb, leaving the global RNG states untouched.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import socket
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.error import URLError

import numpy as np
import torch
import torch_fidelity
from torch import Tensor
from torch.utils.data import Dataset
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

from evaluation.digits_classifier import EXTRACTOR_NAME as DIGITS_EXTRACTOR
from evaluation.digits_classifier import file_digest, load_or_train_digits_classifier, register_digits_classifier

__all__ = [
    "VALID_METRICS",
    "SAMPLE_METRICS",
    "feature_statistics",
    "frechet_distance",
    "fid_from_features",
    "extract_features",
    "compute_reference_statistics",
    "save_reference_statistics",
    "load_reference_statistics",
    "generate_for_eval",
    "likelihood_metrics",
    "evaluate_during_training",
    "find_runs",
    "read_curve",
    "kimg_to_reach",
    "target_table",
    "plot_curves",
    "run_curves",
    "VALID_EXTRACTORS",
    "INCEPTION_EXTRACTOR",
    "INCEPTION_WEIGHTS_URL",
    "InceptionWeightsUnavailableError",
    "resolve_feature_extractor",
    "reference_identity",
    "compute_metrics",
    "load_samples",
    "evaluate_denoiser",
    "run_evaluation",
    "format_table",
    "find_report_runs",
    "report_rows",
    "collect_report",
    "format_report",
    "plot_report",
    "sweep_report",
    "run_report",
]

SAMPLE_METRICS = ("fid", "isc", "kid", "prc")
VALID_METRICS = (*SAMPLE_METRICS, "nll")
TARGET_INTERPOLATIONS = ("loglinear", "linear", "none")
CURVE_FILE = "fid_curve.jsonl"
INCEPTION_EXTRACTOR = "inception-v3-compat"
VALID_EXTRACTORS = ("auto", DIGITS_EXTRACTOR, INCEPTION_EXTRACTOR)
INCEPTION_WEIGHTS_URL = URL_INCEPTION_V3
DIGITS_DATASETS = ("digits", "binary_digits")
EXTRACTOR_TAGS = {DIGITS_EXTRACTOR: "digits_classifier", INCEPTION_EXTRACTOR: "inception"}
EXTRACTOR_DESCRIPTIONS = {
    DIGITS_EXTRACTOR: "digits-classifier features (64-d penultimate layer of a CNN trained on the training split; "
    "not Inception FID)",
    INCEPTION_EXTRACTOR: "Inception-v3 features (torch-fidelity inception-v3-compat, pool3 2048-d)",
}
DOWNLOAD_TIMEOUT_S = 60.0  # socket timeout while torch hub fetches the Inception weights: a dead network cannot hang us
DEFAULT_EVAL = {
    "name": "default",
    "metrics": ["fid"],
    "feature_extractor": "auto",
    "feature_extractor_weights_path": None,
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
    "curve_metric": None,
    "target_fid": None,
    "target_interpolation": "loglinear",
    "baseline_run": None,
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

register_digits_classifier()  # idempotent; the import above already did it


class InceptionWeightsUnavailableError(RuntimeError):
    """The Inception-v3 weights could not be downloaded and no local file was given."""


# ------------------------------------------------------------------------------------------------------------------
# Config helpers
# ------------------------------------------------------------------------------------------------------------------
def _plain(cfg: Any) -> dict:
    """A plain dict of a config node (DictConfig or mapping; None -> {}), interpolations resolved."""
    if cfg is None:
        return {}
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    if not isinstance(cfg, Mapping):
        raise TypeError(f"expected a config mapping, got {type(cfg).__name__}")
    return dict(cfg)


def _eval_settings(eval_cfg: Any) -> dict:
    settings = dict(DEFAULT_EVAL)
    settings.update({k: v for k, v in _plain(eval_cfg).items()})
    if settings["cache_dir"] is None:
        default = os.path.join(os.path.expanduser("~"), ".cache", "sigmalab")
        settings["cache_dir"] = os.environ.get("SIGMALAB_CACHE", default)
    return settings


def _check_metrics(metrics: Any) -> list[str]:
    if isinstance(metrics, str):
        metrics = [metrics]
    metrics = [str(m).strip().lower() for m in metrics]
    if not metrics:
        raise ValueError(f"eval.metrics is empty; valid metrics: {', '.join(VALID_METRICS)}")
    for m in metrics:
        if m not in VALID_METRICS:
            raise ValueError(f"unknown metric {m!r} in eval.metrics; valid: {', '.join(VALID_METRICS)}")
    return list(dict.fromkeys(metrics))


def resolve_feature_extractor(choice: str, data_cfg: Any = None, dataset_name: str | None = None) -> str:
    """``auto`` -> ``digits-classifier`` for the digits datasets, ``inception-v3-compat`` otherwise; checks names."""
    choice = str(choice)
    if choice not in VALID_EXTRACTORS:
        raise ValueError(f"unknown eval.feature_extractor {choice!r}; valid: {', '.join(VALID_EXTRACTORS)}")
    if choice != "auto":
        return choice
    data = _plain(data_cfg)
    name = dataset_name if dataset_name is not None else data.get("name")
    if name is None and not data:
        raise ValueError(
            "eval.feature_extractor=auto needs the dataset (pass data_cfg or dataset_name), or name the extractor: "
            f"{DIGITS_EXTRACTOR} or {INCEPTION_EXTRACTOR}"
        )
    if data.get("source") == "digits" or name in DIGITS_DATASETS:
        return DIGITS_EXTRACTOR
    return INCEPTION_EXTRACTOR


def reference_identity(data_cfg: Any, split: str) -> str:
    """A file-name-safe string naming a reference image set: everything its pixels depend on (not the x-flip)."""
    d = _plain(data_cfg)
    parts = [str(d.get("name")), f"src-{d.get('source')}", split, f"res{d.get('resolution')}", f"ch{d.get('channels')}"]
    if d.get("source") == "digits":
        parts += [f"bin{int(bool(d.get('binarize', False)))}", f"split{d.get('split_seed')}",
                  f"heldout{d.get('heldout_fraction')}"]
    for key in ("path", "test_path"):
        path = d.get(key)
        if path and path != "???":
            stat = os.stat(path) if os.path.exists(path) else None
            fingerprint = f"{os.path.abspath(path)}|{stat.st_size if stat else 0}|{stat.st_mtime_ns if stat else 0}"
            parts.append(f"{key}-{_short_hash(fingerprint)}")
    return _safe_name("-".join(parts))


def _short_hash(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()[:10]


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", text)


_DIGEST_MEMO: dict[tuple[str, int, int], str] = {}


def _weights_digest(path: str) -> str:
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _DIGEST_MEMO:
        _DIGEST_MEMO[key] = file_digest(path)
    return _DIGEST_MEMO[key]


# ------------------------------------------------------------------------------------------------------------------
# Image sets
# ------------------------------------------------------------------------------------------------------------------
class _UInt8Images(Dataset):
    """uint8 [C, H, W] items from a uint8 [N, C, H, W] tensor or an ImageDataset (un-flipped images only)."""

    def __init__(self, source: Any, to_rgb: bool) -> None:
        self.source = source
        self.to_rgb = to_rgb
        if isinstance(source, Tensor):
            self.length = int(source.shape[0])
        else:
            self.length = int(getattr(source, "num_images", len(source)))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> Tensor:
        image = self.source[i] if isinstance(self.source, Tensor) else self.source[i][0]
        image = torch.as_tensor(image)
        if image.dtype != torch.uint8:
            raise TypeError(f"metrics need uint8 pixel images, item {i} has dtype {image.dtype}")
        if self.to_rgb and image.shape[0] == 1:
            image = image.repeat(3, 1, 1)
        return image


def _image_set_shape(images: Any, what: str) -> tuple[int, tuple[int, int, int]]:
    """(count, (C, H, W)) of a uint8 tensor [N, C, H, W] or an ImageDataset; clear errors otherwise."""
    if isinstance(images, Tensor):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"{what} must be uint8 images [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
        n, c, h, w = images.shape
        return int(n), (int(c), int(h), int(w))
    if hasattr(images, "num_channels") and hasattr(images, "resolution"):
        n = int(getattr(images, "num_images", len(images)))
        return n, (int(images.num_channels), int(images.resolution), int(images.resolution))
    raise TypeError(f"{what} must be a uint8 tensor [N, C, H, W] or an ImageDataset, got {type(images).__name__}")


# ------------------------------------------------------------------------------------------------------------------
# Fréchet distance from features / statistics
# ------------------------------------------------------------------------------------------------------------------
def feature_statistics(features: Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mu, Sigma) of features [N, F] in float64: the mean and the unbiased covariance (ffᵀ − N·mu·muᵀ)/(N − 1)."""
    f = features.detach().cpu().double().numpy() if isinstance(features, Tensor) else np.asarray(features, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be [N >= 2, F], got shape {f.shape}")
    mu = f.mean(0)
    centred = f - mu
    return mu, centred.T @ centred / (f.shape[0] - 1)


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((sigma + sigma.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 − mu2||² + tr(Sigma1 + Sigma2 − 2 (Sigma1 Sigma2)^(1/2)) in float64 (module docstring)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    f = mu1.shape[0]
    if mu1.shape != (f,) or mu2.shape != (f,) or sigma1.shape != (f, f) or sigma2.shape != (f, f):
        raise ValueError(f"Fréchet distance needs mu [F] and sigma [F, F] of equal F, got {mu1.shape}, "
                         f"{sigma1.shape}, {mu2.shape}, {sigma2.shape}")
    root = _psd_sqrt(sigma1)
    inner = root @ sigma2 @ root
    eig = np.linalg.eigvalsh((inner + inner.T) / 2)
    tr_covmean = float(np.sqrt(np.clip(eig, 0, None)).sum())
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def fid_from_features(features1: Tensor | np.ndarray, features2: Tensor | np.ndarray) -> float:
    """FID between two feature sets [N1, F], [N2, F] (whatever network produced them)."""
    return frechet_distance(*feature_statistics(features1), *feature_statistics(features2))


def save_reference_statistics(path: str | os.PathLike, stats: Mapping[str, Any]) -> Path:
    """Write EDM's reference format (``mu``, ``sigma``; float64) plus ``num_images``, ``feature_extractor``,
    ``extractor_id`` (ignored by EDM's and ADM's loaders), atomically."""
    path = Path(os.path.expanduser(str(path)))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, mu=np.asarray(stats["mu"], np.float64), sigma=np.asarray(stats["sigma"], np.float64),
             num_images=np.int64(stats.get("num_images", -1)),
             feature_extractor=np.str_(stats.get("feature_extractor", "")),
             extractor_id=np.str_(stats.get("extractor_id", "")))
    os.replace(tmp, path)
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


# ------------------------------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------------------------------
def _inception_hub_file() -> str:
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(INCEPTION_WEIGHTS_URL))


def _inception_unavailable_message(err: BaseException) -> str:
    fname = os.path.basename(INCEPTION_WEIGHTS_URL)
    return (
        f"the Inception-v3 weights for FID could not be downloaded ({type(err).__name__}: {err}).\n"
        f"Download {INCEPTION_WEIGHTS_URL} on a machine with network access, copy it here and pass\n"
        f"    eval.feature_extractor_weights_path=/path/to/{fname}\n"
        f"(or place it at {_inception_hub_file()}, torch hub's cache). "
        f"For the digits datasets, eval.feature_extractor={DIGITS_EXTRACTOR} needs no download."
    )


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    previous = socket.getdefaulttimeout()
    if previous is None:
        socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        if previous is None:
            socket.setdefaulttimeout(None)


def _extractor_weights(extractor: str, settings: Mapping[str, Any], data_cfg: Any,
                       classifier_path: str | None) -> tuple[str | None, str]:
    """(weights file for torch-fidelity, an id naming the extractor and its weights for cache names)."""
    if extractor == DIGITS_EXTRACTOR:
        if classifier_path is None:
            if data_cfg is None:
                raise ValueError(
                    f"the {DIGITS_EXTRACTOR} feature extractor needs data_cfg (to train or load the classifier of "
                    "that dataset) or classifier_path"
                )
            cache_dir = os.path.expanduser(str(settings["cache_dir"]))
            classifier_path, _ = load_or_train_digits_classifier(data_cfg, cache_dir)
        return str(classifier_path), f"{DIGITS_EXTRACTOR}-{_weights_digest(str(classifier_path))}"
    weights_path = settings.get("feature_extractor_weights_path")
    if weights_path is not None:
        weights_path = os.path.expanduser(str(weights_path))
        if not os.path.isfile(weights_path):
            raise FileNotFoundError(
                f"eval.feature_extractor_weights_path={weights_path} does not exist; it should be the file "
                f"{os.path.basename(INCEPTION_WEIGHTS_URL)} from {INCEPTION_WEIGHTS_URL}"
            )
        return weights_path, f"inception-{_weights_digest(weights_path)}"
    return None, "inception-" + os.path.basename(INCEPTION_WEIGHTS_URL).split("-")[-1].split(".")[0]


@contextlib.contextmanager
def _inception_download_guard(extractor: str, weights_path: str | None) -> Iterator[None]:
    """A socket timeout while torch hub may download the Inception weights, and a clear error if it cannot."""
    missing = extractor == INCEPTION_EXTRACTOR and weights_path is None and not os.path.isfile(_inception_hub_file())
    try:
        with _socket_timeout(DOWNLOAD_TIMEOUT_S) if missing else contextlib.nullcontext():
            yield
    except (URLError, OSError, RuntimeError) as err:
        if missing and not os.path.isfile(_inception_hub_file()):
            raise InceptionWeightsUnavailableError(_inception_unavailable_message(err)) from err
        raise


def _resolve_device(device: str | torch.device | None) -> torch.device:
    return torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))


def extract_features(
    images: Any, *, feature_extractor: str = "auto", eval_cfg: Any = None, data_cfg: Any = None,
    classifier_path: str | None = None, device: str | torch.device | None = None, layer: str | None = None,
) -> Tensor:
    """Features [N, F] (float32, CPU) of uint8 images [N, C, H, W] (or an ImageDataset) from the FID layer of the
    extractor (``layer`` picks another one, e.g. the logits), computed by torch-fidelity's extractor."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
    from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset

    settings = _eval_settings(eval_cfg)
    n, (channels, _, _) = _image_set_shape(images, "images")
    dataset_name = _plain(data_cfg).get("name") if data_cfg is not None else getattr(images, "name", None)
    extractor = resolve_feature_extractor(feature_extractor, data_cfg, dataset_name)
    if extractor == INCEPTION_EXTRACTOR and channels not in (1, 3):
        raise ValueError(f"Inception features need 1- or 3-channel images, got {channels} channels")
    weights_path, _ = _extractor_weights(extractor, settings, data_cfg, classifier_path)
    layer = layer or FEATURE_EXTRACTORS_REGISTRY[extractor].get_default_feature_layer_for_metric("fid")
    device = _resolve_device(device)
    with _inception_download_guard(extractor, weights_path):
        model = create_feature_extractor(extractor, [layer], cuda=device.type == "cuda",
                                         feature_extractor_weights_path=weights_path, verbose=False)
    feats = get_featuresdict_from_dataset(_UInt8Images(images, extractor == INCEPTION_EXTRACTOR), model,
                                          int(settings["batch"]), device.type == "cuda", True, False)
    return feats[layer].float().cpu()


def compute_reference_statistics(
    reference: Any, *, feature_extractor: str = "auto", eval_cfg: Any = None, data_cfg: Any = None,
    classifier_path: str | None = None, device: str | torch.device | None = None,
) -> dict[str, Any]:
    """``{"mu", "sigma", "num_images", "feature_extractor", "extractor_id"}`` of a reference image set (EDM's
    ``fid.py ref``: every image, float64 statistics)."""
    settings = _eval_settings(eval_cfg)
    dataset_name = _plain(data_cfg).get("name") if data_cfg is not None else getattr(reference, "name", None)
    extractor = resolve_feature_extractor(feature_extractor, data_cfg, dataset_name)
    _, extractor_id = _extractor_weights(extractor, settings, data_cfg, classifier_path)
    feats = extract_features(reference, feature_extractor=extractor, eval_cfg=settings, data_cfg=data_cfg,
                             classifier_path=classifier_path, device=device)
    mu, sigma = feature_statistics(feats)
    return {"mu": mu, "sigma": sigma, "num_images": int(feats.shape[0]), "feature_extractor": extractor,
            "extractor_id": extractor_id}


def _check_sample_metrics(metrics: Sequence[str]) -> list[str]:
    metrics = _check_metrics(metrics)
    if "nll" in metrics:
        raise ValueError("nll is a property of the model, not of an image set: compute it with ckpt=<run> "
                         "eval.metrics=[nll] (evaluate_denoiser / likelihood_metrics), not from images")
    return metrics


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

    Returns:
        ``{"fid_<tag>": ..., "isc_<tag>_mean": ..., ...}`` with tag ``digits_classifier`` or ``inception``.
    """
    settings = _eval_settings(eval_cfg)
    metrics = _check_sample_metrics(metrics)
    if reference_stats is None:
        reference_stats = settings.get("reference_stats")
    n_gen, gen_shape = _image_set_shape(generated, "generated images")
    if reference_stats is not None:
        needs_features = [m for m in metrics if m in ("kid", "prc")]
        if needs_features:
            raise ValueError(f"eval.reference_stats holds only the reference mu and Sigma; {', '.join(needs_features)} "
                             "need(s) the reference features: drop eval.reference_stats, or use eval.metrics=[fid] / "
                             "[fid,isc]")
        n_ref, ref_shape = 0, gen_shape
    else:
        if reference is None:
            raise ValueError("compute_metrics needs reference images or reference_stats (eval.reference_stats)")
        n_ref, ref_shape = _image_set_shape(reference, "reference images")
    if gen_shape != ref_shape:
        raise ValueError(
            f"generated images have shape (C, H, W) = {gen_shape} but the reference images have {ref_shape}: "
            "channels and resolution must match (wrong data config for these samples?)"
        )
    binary_metrics = [m for m in metrics if m != "isc"]
    if n_gen < 2 or (binary_metrics and reference_stats is None and n_ref < 2):
        raise ValueError(f"need at least 2 images per set, got {n_gen} generated and {n_ref} reference")
    if "isc" in metrics and n_gen < 10:
        raise ValueError(f"isc splits the generated images into 10 parts and needs >= 10 of them, got {n_gen}")

    dataset_name = _plain(data_cfg).get("name") if data_cfg is not None else getattr(reference, "name", None)
    extractor = resolve_feature_extractor(feature_extractor, data_cfg, dataset_name)
    cache_dir = os.path.expanduser(str(settings["cache_dir"]))
    weights_path, extractor_id = _extractor_weights(extractor, settings, data_cfg, classifier_path)
    if extractor == INCEPTION_EXTRACTOR and gen_shape[0] not in (1, 3):
        raise ValueError(f"Inception features need 1- or 3-channel images, got {gen_shape[0]} channels")
    tag = EXTRACTOR_TAGS[extractor]
    out: dict[str, float] = {}
    if reference_stats is not None:
        stats = reference_stats
        if not isinstance(stats, Mapping):
            stats = load_reference_statistics(stats)
        stats = _usable_reference_stats(stats, extractor, extractor_id, settings, data_cfg, classifier_path, device)
        metrics = [m for m in metrics if m != "fid"] if "fid" in metrics else metrics
        gen_feats = extract_features(generated, feature_extractor=extractor, eval_cfg=settings, data_cfg=data_cfg,
                                     classifier_path=classifier_path, device=device)
        mu, sigma = feature_statistics(gen_feats)
        if mu.shape != stats["mu"].shape:
            raise ValueError(f"eval.reference_stats has {stats['mu'].shape[0]}-d statistics but the {extractor} "
                             f"features are {mu.shape[0]}-d: the file was made with another feature extractor")
        out[f"fid_{tag}"] = frechet_distance(mu, sigma, stats["mu"], stats["sigma"])
        binary_metrics = []
        if not metrics:
            return out

    device = _resolve_device(device)
    kwargs: dict[str, Any] = {
        "input1": _UInt8Images(generated, extractor == INCEPTION_EXTRACTOR),
        "feature_extractor": extractor,
        "feature_extractor_weights_path": weights_path,
        "cuda": device.type == "cuda",
        "batch_size": int(settings["batch"]),
        "cache_root": os.path.join(cache_dir, "fidelity"),
        "cache": True,
        "save_cpu_ram": True,
        "verbose": False,
        "rng_seed": int(settings["seed"]),
    }
    for m in metrics:
        kwargs[m] = True
    if binary_metrics:
        kwargs["input2"] = _UInt8Images(reference, extractor == INCEPTION_EXTRACTOR)
        if reference_cache_name is not None:
            kwargs["input2_cache_name"] = _safe_name(f"{reference_cache_name}-{extractor_id}-n{n_ref}")
    if "kid" in metrics:
        kwargs["kid_subset_size"] = min(1000, n_gen, n_ref)
    with _inception_download_guard(extractor, weights_path):
        raw = torch_fidelity.calculate_metrics(**kwargs)
    for key, value in raw.items():
        template = _KEY_MAP.get(key, key + "_{tag}")
        out[template.format(tag=tag)] = float(value)
    return out


def _usable_reference_stats(stats: Mapping[str, Any], extractor: str, extractor_id: str, settings: Mapping[str, Any],
                            data_cfg: Any, classifier_path: str | None, device: Any) -> Mapping[str, Any]:
    """Check a loaded reference file against the extractor; compute mu/Sigma of an images-only (ADM) file."""
    if "images" in stats:
        images = _to_nchw(np.asarray(stats["images"]), None, str(stats.get("path", "reference images")))
        return compute_reference_statistics(images, feature_extractor=extractor, eval_cfg=settings,
                                            data_cfg=data_cfg, classifier_path=classifier_path, device=device)
    recorded = stats.get("feature_extractor")
    if recorded and recorded != extractor:
        raise ValueError(f"eval.reference_stats {stats.get('path', '')} was computed with {recorded} features, but "
                         f"this evaluation uses {extractor}")
    recorded_id = stats.get("extractor_id")
    if recorded_id and recorded_id != extractor_id:
        raise ValueError(f"eval.reference_stats {stats.get('path', '')} was computed with {recorded_id} weights, but "
                         f"this evaluation uses {extractor_id}: recompute it with ref=true")
    return stats

# ------------------------------------------------------------------------------------------------------------------
# Loading samples
# ------------------------------------------------------------------------------------------------------------------
_IMAGE_EXTS = (".png", ".jpg", ".jpeg")


def _to_nchw(array: np.ndarray, expected_chw: tuple[int, int, int] | None, origin: str) -> Tensor:
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
        return _to_nchw(array, expected_chw, str(p))
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
    return _to_nchw(np.stack(arrays), expected_chw, str(p))


# ------------------------------------------------------------------------------------------------------------------
# Sampling (optionally split over ranks) and likelihood
# ------------------------------------------------------------------------------------------------------------------
def _rank_slice(n: int, rank: int, world: int) -> range:
    """Contiguous part ``rank`` of ``world`` of range(n) (sizes differ by at most one; in rank order they tile n)."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def _split(distributed: bool) -> tuple[bool, int, int]:
    from training.distributed import get_rank, get_world_size, is_distributed

    on = bool(distributed) and is_distributed()
    return on, (get_rank() if on else 0), (get_world_size() if on else 1)


def _gather_rows(part: Tensor, distributed: bool) -> Tensor:
    """Concatenate every rank's rows in rank order (on every rank); identity without a process group."""
    if not distributed:
        return part
    from training.distributed import all_gather_object

    parts = [p for p in all_gather_object(part.cpu()) if p.numel()]
    return torch.cat(parts) if parts else part


def generate_for_eval(
    denoiser: torch.nn.Module, data_cfg: Any, eval_cfg: Any, sampler_cfg: Any, *, device: str | torch.device,
    num_samples: int | None = None, progress: bool = False, first_seed: int | None = None, distributed: bool = False,
) -> Tensor:
    """``eval.num_samples`` uint8 images from seeds ``first_seed .. first_seed + N - 1`` (default first seed
    ``eval.seed``; labels drawn per seed). ``distributed``: under torchrun each rank generates a contiguous slice of
    the seeds and every rank returns all N images (gathered in seed order); identical to one process."""
    from training import generate as generation

    settings = _eval_settings(eval_cfg)
    n = int(num_samples if num_samples is not None else settings["num_samples"])
    if n < 2:
        raise ValueError(f"eval.num_samples must be >= 2, got {n}")
    first = int(settings["seed"] if first_seed is None else first_seed)
    on, rank, world = _split(distributed)
    mine = [first + i for i in _rank_slice(n, rank, world)]
    binary = bool(_plain(data_cfg).get("binarize", False))
    extra: dict[str, Any] = {}
    if getattr(denoiser, "latent_info", None):  # a latent-space model: decode its samples to RGB with its VAE
        codec_for = getattr(generation, "latent_codec_for", None)
        if codec_for is None:
            raise ValueError("this checkpoint generates VAE latents but sample.py has no latent_codec_for to decode "
                             "them")
        extra["latent_codec"] = codec_for(denoiser, device)
    images = torch.empty(0, dtype=torch.uint8)
    if mine:
        images = generation.generate_images(denoiser, mine, sampler_cfg=sampler_cfg, batch_size=int(settings["batch"]),
                                        device=device, binary=binary, progress=progress and rank == 0, **extra)
    return _gather_rows(images, on)


NLL_MEASURES = {
    "ode": "dequantised probability-flow-ODE NLL, bits/dim on the [0, 256) pixel scale (upper bound on the 8-bit NLL)",
    "elbo": "continuous-time variational bound (negative ELBO), bits/dim (upper bound on the binary data's NLL)",
}


def likelihood_metrics(
    denoiser: torch.nn.Module, data_cfg: Any, eval_cfg: Any, sampler_cfg: Any, *, device: str | torch.device,
    dataset: Any = None, distributed: bool = False,
) -> tuple[dict[str, float], dict[str, Any]]:
    """(``{"nll_<method>_bpd": mean, "nll_<method>_bpd_sem": standard error}``, details) on ``eval.nll_num_images``
    images of the ``eval.nll_split`` split (image i: seed ``eval.seed + i``); under torchrun the images are split
    over the ranks and every rank returns the same numbers."""
    from data import build_dataset
    from diffusion.likelihood import NLL_METHODS, nll_bits_per_dim

    settings = _eval_settings(eval_cfg)
    split = str(settings["nll_split"])
    if dataset is None:
        try:
            dataset = build_dataset(data_cfg, split=split)
        except (FileNotFoundError, NotImplementedError) as err:
            raise ValueError(f"eval.nll_split={split}: {err} (eval.nll_split=train evaluates on training images)") \
                from err
    if getattr(dataset, "latent", False):
        raise ValueError(f"eval.metrics=[nll] needs pixel data; data '{dataset.name}' holds VAE latents, whose "
                         "density is not a likelihood of images")
    method = str(settings["nll_method"])
    if method == "auto":
        method = "elbo" if getattr(dataset, "binary", False) else "ode"
    if method not in NLL_METHODS:
        raise ValueError(f"unknown eval.nll_method {method!r}; valid: auto, {', '.join(NLL_METHODS)}")
    images = dataset.all_images()
    limit = settings["nll_num_images"]
    n = len(images) if limit is None else min(int(limit), len(images))
    if n < 1:
        raise ValueError(f"eval.nll_num_images must be >= 1, got {limit}")
    images = images[:n]
    label_dim = int(getattr(denoiser, "label_dim", 0) or 0)
    onehot = None
    if label_dim:
        labels = dataset.all_labels()[:n]
        if bool((labels < 0).any()):
            raise ValueError(f"the model is class-conditional but data '{dataset.name}' has no labels")
        onehot = torch.nn.functional.one_hot(labels, label_dim).float()
    sampler = _plain(sampler_cfg)
    sigma_min, sigma_max = float(sampler.get("sigma_min", 0.002)), float(sampler.get("sigma_max", 80.0))
    if method == "elbo" and settings.get("nll_elbo_sigma_min") is not None:
        sigma_min = float(settings["nll_elbo_sigma_min"])
    first = int(settings["seed"])
    on, rank, world = _split(distributed)
    mine = _rank_slice(n, rank, world)
    info: dict[str, Any] = {}
    part = torch.empty(0, dtype=torch.float64)
    if len(mine):
        sl = slice(mine.start, mine.stop)
        part = nll_bits_per_dim(
            denoiser, images[sl], seeds=[first + i for i in mine], method=method, sigma_min=sigma_min,
            sigma_max=sigma_max, solver=str(settings["nll_solver"]), tolerance=float(settings["nll_tolerance"]),
            num_steps=int(settings["nll_steps"]), num_probes=int(settings["nll_probes"]),
            probe=str(settings["nll_probe"]), class_labels=None if onehot is None else onehot[sl],
            batch_size=int(settings["nll_batch"] or settings["batch"]), device=device, info=info)
    bpd = _gather_rows(part, on)
    nfe_parts = [(info.get("nfe", 0.0), len(mine), info.get("terms_bpd"))]
    if on:
        from training.distributed import all_gather_object

        nfe_parts = all_gather_object(nfe_parts[0])
    count = max(sum(b for _, b, _ in nfe_parts), 1)
    nfe = sum(a * b for a, b, _ in nfe_parts) / count
    key = f"nll_{method}_bpd"
    metrics = {key: float(bpd.mean())}
    if n > 1:
        metrics[key + "_sem"] = float(bpd.std() / math.sqrt(n))
    details = {
        "method": method, "measure": NLL_MEASURES[method], "split": split, "num_images": n,
        "seeds": [first, first + n - 1], "sigma_min": sigma_min, "sigma_max": sigma_max,
        "nfe_per_image": round(float(nfe), 2),
    }
    if method == "ode":
        details.update(solver=settings["nll_solver"], probes=int(settings["nll_probes"]), probe=settings["nll_probe"])
        details["tolerance" if settings["nll_solver"] == "rk45" else "steps"] = (
            float(settings["nll_tolerance"]) if settings["nll_solver"] == "rk45" else int(settings["nll_steps"]))
    else:
        details["strata"] = int(settings["nll_steps"])
        details["terms_bpd"] = {term: sum(t[term] * b for _, b, t in nfe_parts if t) / count
                                for term in ("diffusion", "reconstruction", "prior")}
    return metrics, details


def _format_likelihood(metrics: Mapping[str, float], details: Mapping[str, Any]) -> str:
    key = f"nll_{details['method']}_bpd"
    sem = metrics.get(key + "_sem")
    value = f"{metrics[key]:.4f}" + (f" ± {sem:.4f}" if sem is not None else "")
    solver = (f", {details['solver']} " + (f"tol {details['tolerance']:g}" if "tolerance" in details
                                           else f"{details['steps']} steps")
              + f", {details['probes']} {details['probe']} probe(s)") if details["method"] == "ode" else (
        f", σ from {details['sigma_min']:g}, {details['strata']} strata; bits/dim: diffusion "
        f"{details['terms_bpd']['diffusion']:.4f} + decoder {details['terms_bpd']['reconstruction']:.2g} + prior "
        f"{details['terms_bpd']['prior']:.2g}")
    return (f"likelihood: {key} = {value} bits/dim ({details['measure']}; {details['num_images']} "
            f"{details['split']} images{solver}, {details['nfe_per_image']:g} NFE/image)")


# ------------------------------------------------------------------------------------------------------------------
# One model's evaluation (CLI ckpt=, curves, training hook)
# ------------------------------------------------------------------------------------------------------------------
def _primary_key(values: Mapping[str, float]) -> tuple[str | None, bool]:
    """The metric that ranks seed repeats / is plotted by default, and whether lower is better."""
    for prefix, suffix, lower in (("fid_", "", True), ("kid_", "_mean", True), ("isc_", "_mean", False),
                                  ("nll_", "_bpd", True)):
        for k in values:
            if k.startswith(prefix) and k.endswith(suffix):
                return k, lower
    return (next(iter(values), None), True)


def _floor_columns(images: Tensor, data_cfg: Any, common: Mapping[str, Any], get_reference: Any,
                   notes: list[str]) -> tuple[dict[str, dict[str, float]], dict[str, int]]:
    """The floor (held-out split vs training split) and the same metric on as many samples."""
    from data import build_dataset

    columns: dict[str, dict[str, float]] = {}
    counts: dict[str, int] = {}
    try:
        heldout = build_dataset(data_cfg, split="test")
    except (ValueError, FileNotFoundError, NotImplementedError) as err:
        notes.append(f"floor: not available ({err})")
        return columns, counts
    held_images = heldout.all_images()
    n_held = len(held_images)
    if n_held < len(images):
        key = f"samples@{n_held}"
        columns[key] = compute_metrics(images[:n_held], get_reference(), **common)
        counts[key] = n_held
    columns["floor"] = compute_metrics(held_images, get_reference(), **common)
    counts["floor"] = n_held
    return columns, counts


def _evaluate_model(
    denoiser: torch.nn.Module, data_cfg: Any, sampler_cfg: Any, settings: Mapping[str, Any], *,
    device: str | torch.device, get_reference: Any, distributed: bool = False, progress: bool = False,
    run_cfg: Any = None, num_samples: int | None = None,
) -> dict[str, Any] | None:
    """Sample (every seed repeat), compute ``eval.metrics`` and, with ``eval.baselines``, floor and ceiling.

    All ranks must call it (sampling and NLL are split over them); rank 0 gets the result, the others None.
    ``get_reference()`` returns the training split (or None with ``eval.reference_stats``); ``run_cfg`` (the run's
    config) is needed for the ceiling.
    """
    metrics = _check_metrics(settings["metrics"])
    sample_metrics = [m for m in metrics if m != "nll"]
    on, rank, _ = _split(distributed)
    main = rank == 0
    n = int(num_samples if num_samples is not None else settings["num_samples"])
    repeats_n = int(settings["seed_repeats"])
    if repeats_n < 1:
        raise ValueError(f"eval.seed_repeats must be >= 1, got {repeats_n}")
    seed = int(settings["seed"])
    extractor = resolve_feature_extractor(settings["feature_extractor"], data_cfg) if sample_metrics else None
    common = dict(metrics=sample_metrics, feature_extractor=extractor,
                  reference_cache_name=reference_identity(data_cfg, "train"), eval_cfg=settings, data_cfg=data_cfg,
                  device=device)
    repeats: list[dict[str, Any]] = []
    first_images = None
    for r in range(repeats_n if sample_metrics else 0):
        first = seed + r * n
        if main and progress:
            sampler = _plain(sampler_cfg)
            print(f"generating {n} samples (seeds {first}-{first + n - 1}) with sampler={sampler.get('name')} "
                  f"num_steps={sampler.get('num_steps')} on {device}", flush=True)
        images = generate_for_eval(denoiser, data_cfg, settings, sampler_cfg, device=device, num_samples=n,
                                   first_seed=first, distributed=on, progress=progress)
        if main:
            repeats.append({"seeds": [first, first + len(images) - 1], "num_images": len(images),
                            "metrics": compute_metrics(images, get_reference(), **common)})
            if r == 0:
                first_images = images
    nll_metrics: dict[str, float] = {}
    nll_details = None
    if "nll" in metrics:
        nll_metrics, nll_details = likelihood_metrics(denoiser, data_cfg, settings, sampler_cfg, device=device,
                                                      distributed=on)
    ceiling = None
    if settings["baselines"] and sample_metrics and run_cfg is not None:
        from training.denoiser import build_denoiser

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            fresh = build_denoiser(run_cfg, denoiser.img_resolution, denoiser.img_channels,
                                   label_dim=int(getattr(denoiser, "label_dim", 0)),
                                   augment_dim=int(getattr(denoiser, "augment_dim", 0)))
        fresh = fresh.eval().requires_grad_(False).to(device)
        untrained = generate_for_eval(fresh, data_cfg, settings, sampler_cfg, device=device, num_samples=n,
                                      first_seed=seed, distributed=on)
        if main:
            ceiling = (compute_metrics(untrained, get_reference(), **common), len(untrained))
    if not main:
        return None

    columns: dict[str, dict[str, float]] = {}
    counts: dict[str, int] = {}
    notes: list[str] = []
    best = 0
    if repeats:
        key, lower = _primary_key(repeats[0]["metrics"])
        values = [rep["metrics"][key] for rep in repeats]
        best = int(np.argmin(values) if lower else np.argmax(values))
        if len(repeats) == 1:
            columns["samples"], counts["samples"] = repeats[0]["metrics"], repeats[0]["num_images"]
        else:
            for rep in repeats:
                name = f"seeds {rep['seeds'][0]}-{rep['seeds'][1]}"
                columns[name], counts[name] = rep["metrics"], rep["num_images"]
            name = f"{'min' if lower else 'max'} of {len(repeats)}"
            columns[name], counts[name] = repeats[best]["metrics"], repeats[best]["num_images"]
            notes.append(f"reported: the {'minimum' if lower else 'maximum'} {key} over {len(repeats)} seed ranges "
                         f"(EDM's protocol): seeds {repeats[best]['seeds'][0]}-{repeats[best]['seeds'][1]}")
        if settings["baselines"]:
            floor_cols, floor_counts = _floor_columns(first_images, data_cfg, common, get_reference, notes)
            columns.update(floor_cols)
            counts.update(floor_counts)
            if ceiling is not None:
                columns["ceiling"], counts["ceiling"] = ceiling
            else:
                notes.append("ceiling: needs ckpt= (an untrained model of the checkpoint's architecture)")
    return {
        "metrics": {**(repeats[best]["metrics"] if repeats else {}), **nll_metrics},
        "extractor": extractor,
        "repeats": repeats,
        "best_repeat": best,
        "columns": columns,
        "counts": counts,
        "notes": notes,
        "likelihood": nll_details,
        "images": first_images,
        "num_samples": repeats[best]["num_images"] if repeats else 0,
        "seeds": repeats[best]["seeds"] if repeats else None,
    }


def _reference_getter(data_cfg: Any, settings: Mapping[str, Any], reference: Any = None) -> Any:
    """A memoised ``() -> training split`` (None when ``eval.reference_stats`` replaces it)."""
    memo: dict[str, Any] = {"ref": reference}

    def get() -> Any:
        if settings.get("reference_stats") is not None:
            return None
        if memo["ref"] is None:
            from data import build_dataset

            reference = build_dataset(data_cfg, split="train")
            if getattr(reference, "latent", False):
                raise ValueError(
                    f"data '{reference.name}' holds VAE latents, not images: sample metrics of a latent-space model "
                    "need pixel reference statistics, e.g. eval.reference_stats=VIRTUAL_imagenet256_labeled.npz "
                    "(ADM's reference batch) or the output of `python evaluate.py ref=true data=<the pixel dataset>`")
            memo["ref"] = reference
        return memo["ref"]

    return get


def evaluate_denoiser(
    denoiser: torch.nn.Module, data_cfg: Any, eval_cfg: Any, sampler_cfg: Any, *, device: str | torch.device,
    num_samples: int | None = None, reference: Any = None, distributed: bool = False,
) -> dict[str, float]:
    """Sample ``eval.num_samples`` images and compute ``eval.metrics`` (``nll`` included) against the training split
    of ``data_cfg`` (or ``eval.reference_stats``); with ``eval.seed_repeats`` > 1 the best repeat's values.

    ``reference`` may pass a prebuilt training dataset. ``distributed=True``: every rank calls it and shares the
    sampling; rank 0 gets the metrics, the other ranks ``{}``.
    """
    settings = _eval_settings(eval_cfg)
    settings["baselines"] = False
    result = _evaluate_model(denoiser, data_cfg, sampler_cfg, settings, device=device, num_samples=num_samples,
                             get_reference=_reference_getter(data_cfg, settings, reference), distributed=distributed)
    return {} if result is None else result["metrics"]


@contextlib.contextmanager
def _preserved_rng(device: str | torch.device) -> Iterator[None]:
    """Restore the global torch (CPU and this CUDA device), numpy and python RNG states afterwards."""
    import random

    device = torch.device(device)
    py_state, np_state = random.getstate(), np.random.get_state()  # noqa: NPY002 - the legacy global state itself
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)  # noqa: NPY002


def evaluate_during_training(ema_denoiser: torch.nn.Module, cfg: Any, dataset: Any, device: str | torch.device,
                             cur_kimg: float) -> dict[str, Any]:
    """Periodic evaluation for train.py (rank 0, every ``eval.every_kimg``): ``eval.metrics`` of
    ``eval.num_samples_during_training`` samples (seeds ``eval.seed``.., one repeat, no baselines) against
    ``dataset`` (the training split), with ``cfg.data`` and ``cfg.sampler``.

    Returns ``{"kimg": cur_kimg, "eval/<metric key>": value, ..., "eval/num_samples": N, "eval/seconds": s}``
    ready for metrics.jsonl / wandb. The model's train/eval mode and every global RNG state are restored, so a
    resumed run is not perturbed by when it was evaluated.
    """
    if getattr(dataset, "latent", False):
        raise ValueError("evaluation during training needs pixel data; the training set holds latents (set "
                         "eval.every_kimg=null, and evaluate decoded samples with sample.py + evaluate.py samples=)")
    settings = _eval_settings(cfg.eval)
    n = int(settings["num_samples_during_training"] or settings["num_samples"])
    settings.update(seed_repeats=1, baselines=False)
    t0 = time.time()
    was_training = ema_denoiser.training
    with _preserved_rng(device):
        ema_denoiser.eval()
        try:
            values = evaluate_denoiser(ema_denoiser, cfg.data, settings, cfg.sampler, device=device, num_samples=n,
                                       reference=dataset)
        finally:
            ema_denoiser.train(was_training)
    return {"kimg": float(cur_kimg), **{f"eval/{k}": v for k, v in values.items()}, "eval/num_samples": n,
            "eval/seconds": round(time.time() - t0, 2)}


# ------------------------------------------------------------------------------------------------------------------
# Curves: every checkpoint of a run / sweep
# ------------------------------------------------------------------------------------------------------------------
def find_runs(root: str | os.PathLike) -> list[Path]:
    """``root`` itself if it is a run (holds ``checkpoints/``), else every run directory below it (a sweep)."""
    from training.checkpoint import CHECKPOINT_DIR, list_checkpoints

    root = Path(os.path.expanduser(str(root)))
    if not root.is_dir():
        raise FileNotFoundError(f"run_dir not found: {root}")
    if (root / CHECKPOINT_DIR).is_dir():
        return [root]
    runs = sorted({p.parent for p in root.rglob(CHECKPOINT_DIR) if p.is_dir() and list_checkpoints(p.parent)})
    if not runs:
        raise ValueError(f"no runs under {root}: a run directory holds {CHECKPOINT_DIR}/checkpoint-<nimg>.pt")
    return runs


def _run_name(run: Path, root: Path) -> str:
    return run.name if run == root else run.relative_to(root).as_posix()


def read_curve(run_dir: str | os.PathLike, settings_key: str | None = None) -> list[dict[str, Any]]:
    """The entries of ``<run_dir>/fid_curve.jsonl`` (those with ``settings_key`` if given), by training images."""
    path = Path(run_dir) / CURVE_FILE
    entries = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a crash: that checkpoint is evaluated again
                continue
            if settings_key is None or entry.get("settings_key") == settings_key:
                entries.append(entry)
    return sorted(entries, key=lambda e: e["nimg"])


def _curve_settings(settings: Mapping[str, Any], data_cfg: Any, sampler_cfg: Any, ema: bool) -> dict[str, Any]:
    """Everything a curve point's value depends on besides the checkpoint (hashed into ``settings_key``)."""
    metrics = _check_metrics(settings["metrics"])
    keys = ["metrics", "num_samples", "seed", "seed_repeats", "feature_extractor_weights_path"]
    if "nll" in metrics:
        keys += [k for k in settings if k.startswith("nll_") and k != "nll_batch"]
    out = {k: settings[k] for k in keys}
    if any(m != "nll" for m in metrics):
        out["feature_extractor"] = resolve_feature_extractor(settings["feature_extractor"], data_cfg)
    ref = settings.get("reference_stats")
    if ref:
        ref_path = os.path.abspath(os.path.expanduser(str(ref)))
        out["reference"] = f"stats:{ref_path}:{_weights_digest(ref_path)}"
    else:
        out["reference"] = reference_identity(data_cfg, "train")
    out["sampler"] = _plain(sampler_cfg)
    out["ema"] = bool(ema)
    return out


def _settings_key(curve_settings: Mapping[str, Any]) -> str:
    return _short_hash(json.dumps(_jsonable(curve_settings), sort_keys=True))


def kimg_to_reach(points: Sequence[tuple[float, float]], target: float,
                  interpolation: str = "loglinear") -> tuple[float | None, float | None]:
    """(kimg of the first checkpoint with value <= target, kimg interpolated between it and the previous one).

    ``loglinear``: log(value) linear in kimg; ``linear``; ``none`` (both numbers are the checkpoint's). A run
    already at the target at its first checkpoint gets that checkpoint's kimg twice; (None, None) if never reached.
    """
    if interpolation not in TARGET_INTERPOLATIONS:
        raise ValueError(f"unknown eval.target_interpolation {interpolation!r}; valid: "
                         f"{', '.join(TARGET_INTERPOLATIONS)}")
    points = sorted(points)
    for i, (kimg, value) in enumerate(points):
        if value <= target:
            if i == 0 or interpolation == "none":
                return kimg, kimg
            k0, v0 = points[i - 1]
            if interpolation == "loglinear" and value > 0 and target > 0:
                t = (math.log(v0) - math.log(target)) / (math.log(v0) - math.log(value))
            else:
                t = (v0 - target) / (v0 - value)
            return kimg, k0 + t * (kimg - k0)
    return None, None


def target_table(curves: Mapping[str, Sequence[tuple[float, float]]], *, metric: str, target: float | None = None,
                 baseline: str | None = None, interpolation: str = "loglinear",
                 num_samples: int | None = None) -> tuple[str, dict[str, Any]]:
    """The images-to-reach-target table (Markdown) and its numbers; see the module docstring for the definitions."""
    curves = {name: sorted(points) for name, points in curves.items() if points}
    if not curves:
        raise ValueError("no evaluated checkpoints to tabulate")
    if baseline is not None:
        matches = [n for n in curves if n == baseline or n.rsplit("/", 1)[-1] == baseline]
        if len(matches) != 1:
            raise ValueError(f"eval.baseline_run={baseline!r} matches {len(matches)} runs; runs: {', '.join(curves)}")
        baseline = matches[0]
    if target is not None:
        source = "eval.target_fid"
    elif baseline is not None:
        target, source = curves[baseline][-1][1], f"final value of the baseline run '{baseline}'"
    else:
        target = max(min(v for _, v in points) for points in curves.values())
        source = "the largest of the runs' best values (every run reaches it)"
    rows = {}
    for name, points in curves.items():
        first, interp = kimg_to_reach(points, float(target), interpolation)
        best_kimg, best = min(points, key=lambda p: p[1])
        rows[name] = {"first_kimg": first, "kimg": interp, "final_kimg": points[-1][0], "final": points[-1][1],
                      "best": best, "best_kimg": best_kimg, "checkpoints": len(points),
                      "at_first_checkpoint": first is not None and first == points[0][0]}
    base_kimg = rows[baseline]["kimg"] if baseline is not None else None
    for row in rows.values():
        row["speedup"] = (base_kimg / row["kimg"]) if base_kimg and row["kimg"] else None

    def k(v: float | None, row: Mapping[str, Any] | None = None) -> str:
        if v is None:
            return "not reached"
        return ("≤ " if row is not None and row["at_first_checkpoint"] else "") + _fmt_kimg(v)

    how = {"loglinear": "log(value) linear in kimg between the last checkpoint above the target and the first at or "
                        "below it",
           "linear": "value linear in kimg between the last checkpoint above the target and the first at or below it",
           "none": "not interpolated: the first checkpoint at or below the target"}[interpolation]
    lines = [f"## Training images to reach {metric} ≤ {target:.4g}", "",
             f"- metric: `{metric}`" + (f", {num_samples} samples per checkpoint" if num_samples else ""),
             f"- target: {target:.4g} ({source})",
             f"- kimg to target: {how} (eval.target_interpolation={interpolation}); '≤' = already reached at the "
             "first checkpoint",
             "- speed-up: kimg of the baseline / kimg of the run" + (f" (baseline: '{baseline}')" if baseline else
                                                                      " (no eval.baseline_run given)"), "",
             "| run | checkpoints | final kimg | final | best (kimg) | first checkpoint ≤ target (kimg) | "
             "kimg to target | speed-up |",
             "|---|---|---|---|---|---|---|---|"]
    for name, row in rows.items():
        speed = f"{row['speedup']:.2f}x" if row["speedup"] else "—"
        lines.append(f"| {name} | {row['checkpoints']} | {_fmt_kimg(row['final_kimg'])} | {row['final']:.4g} | "
                     f"{row['best']:.4g} ({_fmt_kimg(row['best_kimg'])}) | {k(row['first_kimg'], row)} | "
                     f"{k(row['kimg'], row)} | {speed} |")
    return "\n".join(lines) + "\n", {"target": float(target), "target_source": source, "baseline": baseline,
                                     "interpolation": interpolation, "rows": rows}


def _fmt_kimg(v: float) -> str:
    return f"{v:.1f}" if abs(v) >= 10 else f"{v:.4g}"


def plot_curves(curves: Mapping[str, Sequence[tuple[float, float]]], path: str | os.PathLike, *, metric: str,
                title: str = "", target: float | None = None) -> Path:
    """Metric vs training kimg, one line per run (log y when all values are positive), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    values = []
    for name, points in curves.items():
        if not points:
            continue
        kimg, vals = zip(*sorted(points))
        values += vals
        ax.plot(kimg, vals, marker="o", markersize=3, label=name)
    if target is not None:
        ax.axhline(target, color="gray", linestyle="--", linewidth=1, label=f"target {target:.4g}")
    if values and min(values) > 0:
        from matplotlib.ticker import LogFormatter

        ax.set_yscale("log")
        # Plain numbers; minor ticks labelled too when the curves span less than about two decades.
        ax.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
        ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
    ax.set_xlabel("training images (kimg)")
    ax.set_ylabel(metric)
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_curves(cfg: Any, overrides: Sequence[str] = (), dist_info: Any = None) -> dict[str, Any]:
    """``run_dir=``: evaluate every checkpoint not yet in ``fid_curve.jsonl`` with these settings; plot and tabulate.

    Returns ``{"runs": {name: [(kimg, value), ...]}, "metric", "table", "plot", "summary"}`` on rank 0.
    """
    from training.checkpoint import list_checkpoints, load_checkpoint, load_denoiser
    from training.distributed import barrier, broadcast_object

    settings = _eval_settings(cfg.eval)
    settings["baselines"] = False
    _check_metrics(settings["metrics"])
    interpolation = str(settings["target_interpolation"])
    if interpolation not in TARGET_INTERPOLATIONS:
        raise ValueError(f"unknown eval.target_interpolation {interpolation!r}; valid: "
                         f"{', '.join(TARGET_INTERPOLATIONS)}")
    device = dist_info.device if dist_info is not None else _resolve_device(None)
    main = dist_info is None or dist_info.rank == 0
    root = Path(os.path.expanduser(str(cfg.run_dir)))
    runs = find_runs(root)
    ema = bool(cfg.get("ema", True))

    # The plan (the same on every rank): per run its data/sampler configs, settings key and unevaluated checkpoints.
    plan = []
    for run in runs:
        ckpts = list_checkpoints(run)
        run_cfg = _omegaconf(load_checkpoint(ckpts[0])["config"])
        data_cfg = _run_group(run_cfg.get("data"), cfg.data, overrides, "data")
        sampler_cfg = _run_group(run_cfg.get("sampler"), cfg.sampler, overrides, "sampler")
        curve_settings = _curve_settings(settings, data_cfg, sampler_cfg, ema)
        key = _settings_key(curve_settings)
        done = {e["checkpoint"] for e in read_curve(run, key)} if main else set()
        todo = [str(p) for p in ckpts if p.name not in done]
        plan.append({"run": run, "name": _run_name(run, root), "data": data_cfg, "sampler": sampler_cfg,
                     "settings": curve_settings, "key": key, "todo": todo, "total": len(ckpts)})
    todos = broadcast_object([p["todo"] for p in plan])
    references: dict[str, Any] = {}
    for item, todo in zip(plan, todos):
        if main:
            print(f"[{item['name']}] {len(todo)} of {item['total']} checkpoints to evaluate "
                  f"(settings {item['key']})", flush=True)
        ident = reference_identity(item["data"], "train")
        if ident not in references:
            references[ident] = _reference_getter(item["data"], settings)
        for ckpt in todo:
            t0 = time.time()
            denoiser, _ = load_denoiser(ckpt, ema=ema, device=device)
            result = _evaluate_model(denoiser, item["data"], item["sampler"], settings, device=device,
                                     get_reference=references[ident], distributed=dist_info is not None)
            if not main:
                continue
            nimg = int(re.search(r"(\d+)\.pt$", ckpt).group(1))
            entry = {"run": item["name"], "checkpoint": Path(ckpt).name, "nimg": nimg, "kimg": nimg / 1000,
                     "settings_key": item["key"], "metrics": result["metrics"], "num_samples": result["num_samples"],
                     "seeds": result["seeds"], "repeats": [{"seeds": r["seeds"], "metrics": r["metrics"]}
                                                           for r in result["repeats"]],
                     "likelihood": result["likelihood"], "settings": item["settings"],
                     "seconds": round(time.time() - t0, 2), "time": time.strftime("%Y-%m-%d %H:%M:%S")}
            with open(item["run"] / CURVE_FILE, "a") as f:
                f.write(json.dumps(_jsonable(entry), allow_nan=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
            shown = ", ".join(f"{k} = {v:.4g}" for k, v in result["metrics"].items())
            print(f"[{item['name']}] {Path(ckpt).name} ({_fmt_kimg(nimg / 1000)} kimg): {shown}", flush=True)
    barrier()
    if not main:
        return {}

    entries = {item["name"]: read_curve(item["run"], item["key"]) for item in plan}
    available = list(dict.fromkeys(k for es in entries.values() for e in es for k in e["metrics"]))
    metric = settings.get("curve_metric") or _primary_key(dict.fromkeys(available, 0.0))[0]
    if metric not in available:
        raise ValueError(f"eval.curve_metric={metric!r} is not among the evaluated metrics: {', '.join(available)}")
    curves = {name: [(e["kimg"], e["metrics"][metric]) for e in es if metric in e["metrics"]]
              for name, es in entries.items()}
    n_samples = int(settings["num_samples"]) if any(m != "nll" for m in _check_metrics(settings["metrics"])) else None
    target = settings.get("target_fid")
    baseline, note = _curve_baseline(settings.get("baseline_run"), {item["name"]: item["run"] for item in plan}, root)
    if note:
        print(note)
    table, summary = target_table(curves, metric=metric, target=None if target is None else float(target),
                                  baseline=baseline, interpolation=interpolation, num_samples=n_samples)
    title = f"{metric}" + (f", {n_samples} samples" if n_samples else "") + f" ({root.name})"
    plot = plot_curves(curves, root / "fid_curve.png", metric=metric, title=title, target=summary["target"])
    (root / "fid_curve.md").write_text(table)
    print(table)
    print(f"wrote {plot} and {root / 'fid_curve.md'}")
    return {"runs": curves, "metric": metric, "table": table, "plot": str(plot), "summary": summary}


def _curve_baseline(baseline: str | None, runs: Mapping[str, Path], root: Path) -> tuple[str | None, str | None]:
    """``eval.baseline_run`` for the per-run table: a run name, or a row label of the report (``lognormal``: the
    runs whose settings are the log-normal schedule, see ``report_rows``) -> that run if it is the only one, else
    no baseline (the seeds are averaged by ``evaluate.py report=``). Returns (baseline, note to print)."""
    if baseline is None or any(n == baseline or n.rsplit("/", 1)[-1] == baseline for n in runs):
        return baseline, None
    try:
        labels, _, _ = report_rows([_run_config(run) for run in runs.values()])
    except (OSError, ValueError):
        return baseline, None  # target_table names the runs in its error
    members = [name for name, label in zip(runs, labels) if label == baseline]
    if len(members) == 1:
        return members[0], f"eval.baseline_run={baseline!r}: the run {members[0]}"
    if members:
        return None, (f"eval.baseline_run={baseline!r} is the setting of {len(members)} runs (seeds): the per-run "
                      f"table has no speed-ups; python evaluate.py report={root} averages the seeds and gives them")
    return baseline, None


def _omegaconf(value: Any) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.create(value)


# ------------------------------------------------------------------------------------------------------------------
# Report: a sweep's curves as the papers' tables
# ------------------------------------------------------------------------------------------------------------------
REPORT_KEYWORDS = ("schedules", "infonoise")
REPORT_DIR = "report"
DEFAULT_BASELINE_ROW = "lognormal"  # EDM's schedule: the baseline of the digits sweeps and of InfoNoise's speed-up
# Top-level config keys that do not change what a run learns, or that are the seed itself: not row settings.
_NOT_A_SETTING = {"seed", "run_dir", "resume", "device", "dry_run", "paper", "logger", "eval", "data"}
_NOT_A_TRAIN_SETTING = {"num_workers", "tick_kimg", "snapshot_kimg", "checkpoint_kimg", "keep_checkpoints",
                        "keep_every_kimg", "grid_seeds", "slurm_requeue", "max_skipped_steps"}
# The order in which varied config groups name a row (schedule first: the sweeps compare schedules).
_ASPECT_ORDER = ("schedule", "precond", "weighting", "model", "train", "sampler")
_ABSENT = "<absent>"
_SELECTABLE_EVAL_KEYS = ("num_samples", "seed", "seed_repeats", "metrics")
_EXTRACTOR_SHORT = {DIGITS_EXTRACTOR: "digits-classifier features (not Inception)",
                    INCEPTION_EXTRACTOR: "Inception-v3 features"}


def find_report_runs(root: str | os.PathLike) -> list[Path]:
    """The run directories at or below ``root``: those holding ``config.yaml`` (not Hydra's ``.hydra/`` copy), a
    ``fid_curve.jsonl`` or checkpoints."""
    from training.checkpoint import CHECKPOINT_DIR, list_checkpoints

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


def _run_config(run: Path) -> dict[str, Any]:
    """A run's resolved config: ``config.yaml``, else the config stored in its newest checkpoint."""
    from omegaconf import OmegaConf

    from training.checkpoint import list_checkpoints, load_checkpoint

    path = run / "config.yaml"
    if path.is_file():
        cfg = OmegaConf.load(path)
        try:
            return OmegaConf.to_container(cfg, resolve=True)
        except Exception:  # noqa: BLE001 - an interpolation we cannot resolve here: keep it as written
            return OmegaConf.to_container(cfg, resolve=False)
    ckpts = list_checkpoints(run)
    if ckpts:
        return _plain(load_checkpoint(ckpts[-1])["config"])
    raise ValueError(f"report: {run} has neither config.yaml nor a checkpoint to read the run's config from")


def _job_num(run: Path) -> int | None:
    """The run's position in its Hydra multirun (``.hydra/hydra.yaml`` hydra.job.num): the order of the sweep."""
    path = run / ".hydra" / "hydra.yaml"
    if not path.is_file():
        return None
    match = re.search(r"^\s+num:\s*(\d+)\s*$", path.read_text(), flags=re.MULTILINE)
    return int(match.group(1)) if match else None


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(node, Mapping):
        for key, value in node.items():
            name = f"{prefix}.{key}" if prefix else str(key)
            if isinstance(value, Mapping) and value:
                out.update(_flatten(value, name))
            else:
                out[name] = value
    return out


def _canon(value: Any) -> str:
    return json.dumps(_jsonable(value), sort_keys=True)


def _short(value: Any) -> str:
    """A config value as a table cell: 0.001 not 0.0010, lists as JSON."""
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple, Mapping)):
        return json.dumps(_jsonable(value))
    return str(value)


def _setting_keys(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The flattened config keys that define what a run learns (everything but the seed, paths, logging, ...)."""
    out = {}
    for key, value in _flatten(cfg).items():
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
    sampler's ``t_max`` that comes with the Laplace schedule). A single row is labelled by its schedule.
    """
    flats = [{k: _canon(v) for k, v in _setting_keys(cfg).items()} for cfg in configs]
    raws = [_setting_keys(cfg) for cfg in configs]
    keys = list(dict.fromkeys(k for flat in flats for k in flat))
    varied = [k for k in keys if len({flat.get(k, _ABSENT) for flat in flats}) > 1]
    n_rows = len({tuple(flat.get(k, _ABSENT) for k in varied) for flat in flats})

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
        refined = [c + (flat.get(key, _ABSENT),) for c, flat in zip(current, flats)]
        if len(set(refined)) > len(set(current)):
            chosen.append(key)
            current = refined
    if not chosen:
        chosen = ["schedule.name"] if any("schedule.name" in raw for raw in raws) else []
    columns = [k[: -len(".name")] if k.endswith(".name") and k.count(".") == 1 else k for k in chosen]
    labels, aspects = [], []
    for raw in raws:
        cells = {col: (_short(raw[key]) if key in raw else "—") for col, key in zip(columns, chosen)}
        parts = [(value if key.endswith(".name") and key.count(".") == 1 else f"{key}={value}")
                 for key, value in zip(chosen, cells.values()) if key in raw]
        labels.append("/".join(parts) or "run")
        aspects.append(cells)
    return labels, aspects, columns


def _stats(values: Sequence[float]) -> dict[str, Any]:
    """Mean and sample standard deviation (n − 1; None for one value) over seeds."""
    arr = np.asarray(values, dtype=np.float64)
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if len(arr) > 1 else None, "n": len(arr),
            "values": [float(v) for v in arr]}


def _decimals(value: float) -> int:
    a = abs(value)
    if a >= 100:
        return 1
    if a >= 1 or a == 0:
        return 2
    return min(6, 2 - math.floor(math.log10(a)))


def _fmt_stat(stat: Mapping[str, Any] | None, bold: bool = False) -> str:
    """``mean ± std (n)``, or ``mean (1)`` for a single seed; ``—`` when missing."""
    if not stat:
        return "—"
    d = _decimals(stat["mean"])
    text = f"{stat['mean']:.{d}f}"
    text = f"**{text}**" if bold else text
    if stat["std"] is not None:
        text += f" ± {stat['std']:.{d}f}"
    return text + f" ({stat['n']})"


def _fmt_paper(value: float | None) -> str:
    return "—" if value is None else f"{value:g}"


def _num_eq(a: Any, b: Any) -> bool:
    try:
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    except (TypeError, ValueError):
        return False


def _paper_final(paper: Mapping[str, Any] | None, guidance: Any) -> float | None:
    """The published final FID of a row at the variant's guidance (``paper.fid``: a number or {guidance: fid})."""
    if not paper or paper.get("fid") is None:
        return None
    fid = paper["fid"]
    if isinstance(fid, Mapping):
        return next((float(v) for k, v in fid.items() if _num_eq(k, guidance) and v is not None), None)
    return float(fid)


def _paper_by_kimg(paper: Mapping[str, Any] | None, guidance: Any) -> dict[float, float]:
    """``paper.fid_by_kimg`` ({kimg: fid}), if the paper's guidance list (when given) holds the variant's."""
    if not paper or not paper.get("fid_by_kimg"):
        return {}
    listed = paper.get("guidance")
    if listed and not any(_num_eq(g, guidance) for g in listed):
        return {}
    return {float(k): float(v) for k, v in paper["fid_by_kimg"].items() if v is not None}


def _paper_speedups(paper: Mapping[str, Any] | None) -> str | None:
    if not paper:
        return None
    items = [f"{float(v):g}x" + (f" vs {k[len('speedup_vs_'):]}" if k.startswith("speedup_vs_") else "")
             for k, v in paper.items() if str(k).startswith("speedup") and v is not None]
    return ", ".join(items) or None


def _sampler_nfe(sampler: Mapping[str, Any]) -> str:
    """Network evaluations per image of a sampler config (Heun 2N − 1, the others N; guidance doubles them)."""
    steps = int(sampler.get("num_steps") or 0)
    base = 2 * steps - 1 if sampler.get("name") == "heun" else steps
    guided = sampler.get("guidance") not in (None, 1, 1.0)
    if not guided:
        return str(base)
    if sampler.get("guidance_interval"):
        return f"≤ {2 * base} (guidance interval)"
    return str(2 * base)


def _unique(values: Sequence[Any]) -> str:
    items = list(dict.fromkeys(_short(v) for v in values if v is not None))
    return items[0] if len(items) == 1 else ("varies: " + ", ".join(items) if items else "?")


def _setup_line(configs: Sequence[Mapping[str, Any]], settings: Sequence[Mapping[str, Any]],
                seeds_per_row: Sequence[int], metric: str = "fid") -> str:
    """One line naming the data, model, budget, sampler (NFE), samples per point and feature extractor of a table;
    ``settings``: the curve settings of the table's evaluation variants (what differs is listed as ``varies``)."""
    data = configs[0].get("data", {})
    data_text = f"{data.get('name')} {data.get('resolution')}x{data.get('resolution')}x{data.get('channels')}"
    data_text += ", class-conditional" if data.get("cond") else ", unconditional"
    data_text += ", binarized" if data.get("binarize") else ""
    models = _unique([c.get("model", {}).get("name") for c in configs])
    train = [c.get("train", {}) for c in configs]
    budget = (f"{_unique([t.get('total_kimg') for t in train])} kimg, batch {_unique([t.get('batch') for t in train])}"
              f", lr {_unique([t.get('lr') for t in train])}")
    samplers = [s.get("sampler") or {} for s in settings]
    sampler_text = (f"{_unique([s.get('name') for s in samplers])}, {_unique([s.get('num_steps') for s in samplers])} "
                    f"steps, {_unique([_sampler_nfe(s) for s in samplers])} NFE")
    guidance = [s.get("guidance") for s in samplers if s.get("guidance") not in (None, 1, 1.0)]
    if guidance:
        sampler_text += f", guidance {_unique(guidance)}"
    metric_text = f"{_unique([s.get('num_samples') for s in settings])} samples per point"
    repeats = [int(s.get("seed_repeats") or 1) for s in settings]
    if max(repeats) > 1:
        metric_text += f" (best of {_unique(repeats)} seed ranges)"
    extractors = [_EXTRACTOR_SHORT.get(s["feature_extractor"], s["feature_extractor"]) for s in settings
                  if s.get("feature_extractor")]
    if extractors:
        metric_text += f", {_unique(extractors)}"
    refs = [str(s.get("reference") or "") for s in settings]
    metric_text += ", against " + _unique([r.split(":")[1] if r.startswith("stats:") else "the training split"
                                           for r in refs])
    seed_text = "-".join(str(n) for n in sorted({min(seeds_per_row), max(seeds_per_row)})) if seeds_per_row else "?"
    name = "FID" if metric.startswith("fid_") else f"`{metric}`"
    return (f"Setup: data {data_text}; model {models}; budget {budget}; sampler {sampler_text}; {name}: "
            f"{metric_text}; {seed_text} seed(s) per row.")


def _variant_of(entry: Mapping[str, Any], run_sampler: Mapping[str, Any]) -> tuple[str, dict, dict]:
    """(id, settings without the sampler, sampler keys set differently from the run's own sampler config)."""
    settings = dict(entry.get("settings") or {})
    sampler = settings.pop("sampler", None) or {}
    override = {k: v for k, v in sampler.items() if run_sampler.get(k, _ABSENT) != v}
    return _canon({"settings": settings, "sampler": override}), settings, override


def _sort_value(value: Any) -> tuple[int, Any]:
    try:
        return (0, float(value))
    except (TypeError, ValueError):
        return (1, str(value))


def _variant_labels(variants: Mapping[str, dict]) -> dict[str, str]:
    """A label per evaluation variant: the settings that differ between the variants (``guidance=1.5``)."""
    if len(variants) < 2:
        return {vid: "" for vid in variants}
    override_keys = sorted({k for v in variants.values() for k in v["override"]})
    flats = {}
    for vid, v in variants.items():
        flat = _flatten({k: val for k, val in v["settings"].items()})
        flat.update({f"sampler.{k}": v["sampler"].get(k) for k in override_keys})
        flats[vid] = {k: _canon(val) for k, val in flat.items()}
    keys = list(dict.fromkeys(k for f in flats.values() for k in f))
    varied = [k for k in keys if len({f.get(k, _ABSENT) for f in flats.values()}) > 1]
    labels = {}
    for vid, flat in flats.items():
        parts = [f"{k.removeprefix('sampler.')}={_short(json.loads(flat[k]))}" for k in varied if k in flat]
        labels[vid] = ", ".join(parts) or f"settings {_short_hash(vid)}"
    return labels


def collect_report(root: str | os.PathLike, eval_cfg: Any = None,
                   select: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Every number of the report of a sweep (or a sweep of sweeps, or one run), without writing anything.

    Runs are grouped into tables by their ``data`` config, and within a table into rows by their settings
    (``report_rows``; the seeds of a setting are averaged). Each run's ``fid_curve.jsonl`` entries are split into
    evaluation variants (settings of ``evaluate.py run_dir=`` such as the number of samples or the guidance scale).
    ``eval_cfg`` keys used: ``curve_metric``, ``target_fid``, ``target_interpolation``, ``baseline_run`` (a row
    label; default: the row labelled ``lognormal`` where there is one). ``select`` keeps only the curve points
    evaluated with these settings (``{"num_samples": 1000, "sampler.guidance": 3.0}``; the CLI passes the ``eval.`` /
    ``sampler.`` keys set on its command line).
    """
    from training.checkpoint import list_checkpoints

    settings = _eval_settings(eval_cfg)
    interpolation = str(settings["target_interpolation"])
    if interpolation not in TARGET_INTERPOLATIONS:
        raise ValueError(f"unknown eval.target_interpolation {interpolation!r}; valid: "
                         f"{', '.join(TARGET_INTERPOLATIONS)}")
    root = Path(os.path.expanduser(str(root)))
    runs = find_report_runs(root)
    curves = {run: read_curve(run) for run in runs}
    missing = [run for run in runs if not curves[run]]
    if missing:
        names = ", ".join(_run_name(r, root) for r in missing[:3]) + (f" and {len(missing) - 3} more"
                                                                       if len(missing) > 3 else "")
        raise FileNotFoundError(
            f"report: {len(missing)} of {len(runs)} runs under {root} have no FID curve ({CURVE_FILE}): {names}. "
            f"Evaluate their checkpoints first: python evaluate.py run_dir={root} eval.num_samples=<N> — then run "
            f"python evaluate.py report={root} again")
    configs = {run: _run_config(run) for run in runs}
    notes: list[str] = []

    by_data: dict[str, list[Path]] = {}
    for run in runs:
        by_data.setdefault(_canon(configs[run].get("data")), []).append(run)
    names = {key: str(configs[members[0]].get("data", {}).get("name")) for key, members in by_data.items()}
    titles = dict(names)
    for key in by_data:
        same = [k for k in by_data if names[k] == names[key]]
        if len(same) > 1:  # two data configs of one name: say how they differ
            flats = {k: _flatten(configs[by_data[k][0]].get("data")) for k in same}
            diff = [f"{dk}={_short(v)}" for dk, v in flats[key].items()
                    if len({_canon(f.get(dk)) for f in flats.values()}) > 1]
            titles[key] = f"{names[key]} ({', '.join(diff)})"

    baseline_wanted = settings.get("baseline_run")
    tables = []
    for data_key, members in by_data.items():
        labels, aspects, columns = report_rows([configs[r] for r in members])
        rows: dict[str, dict[str, Any]] = {}
        for run, label, cells in zip(members, labels, aspects):
            row = rows.setdefault(label, {"label": label, "aspects": cells, "runs": [], "order": math.inf,
                                          "paper": configs[run].get("paper")})
            seed = configs[run].get("seed")
            row["runs"].append({"dir": str(run), "name": _run_name(run, root), "seed": seed})
            job = _job_num(run)
            row["order"] = min(row["order"], job if job is not None else math.inf)
        for row in rows.values():
            seeds = [r["seed"] for r in row["runs"]]
            if len(set(map(str, seeds))) < len(seeds):
                notes.append(f"{titles[data_key]} / {row['label']}: several runs share a seed ({_short(seeds)}); "
                             "each is counted")
        order = sorted(rows, key=lambda lab: (rows[lab]["order"], lab))
        baseline = baseline_wanted if baseline_wanted is not None else (
            DEFAULT_BASELINE_ROW if DEFAULT_BASELINE_ROW in rows else None)
        if baseline is not None and baseline not in rows:
            notes.append(f"{titles[data_key]}: baseline row {baseline!r} not in this table (rows: {', '.join(order)})"
                         "; no speed-ups")
            baseline = None
        label_of = dict(zip(members, labels))

        # Evaluation variants and every run's points in each.
        variants: dict[str, dict[str, Any]] = {}
        for run in members:
            run_sampler = _jsonable(configs[run].get("sampler") or {})
            for entry in curves[run]:
                if select and not _entry_matches(entry, select):
                    continue
                vid, vsettings, override = _variant_of(entry, run_sampler)
                variant = variants.setdefault(vid, {"settings": vsettings, "override": override,
                                                    "sampler": (entry.get("settings") or {}).get("sampler") or {},
                                                    "points": {}, "metrics": {}})
                variant["points"].setdefault(run, {})[float(entry["kimg"])] = entry.get("metrics") or {}
                for k in entry.get("metrics") or {}:
                    variant["metrics"][k] = None
        if not variants:
            evaluated = sorted({_short((e.get("settings") or {}).get("num_samples"))
                                for r in members for e in curves[r]})
            raise ValueError(f"report: no curve points of {titles[data_key]} were evaluated with "
                             f"{', '.join(f'{k}={_short(v)}' for k, v in (select or {}).items())} (num_samples "
                             f"evaluated: {', '.join(evaluated)}); drop the setting or evaluate with it first")
        vlabels = _variant_labels(variants)
        table_variants = []
        for vid in sorted(variants, key=lambda v: tuple(_sort_value(p.split("=", 1)[-1])
                                                         for p in vlabels[v].split(", "))):
            variant = variants[vid]
            available = list(variant["metrics"])
            metric = settings.get("curve_metric") or _primary_key(dict.fromkeys(available, 0.0))[0]
            if metric not in available:
                raise ValueError(f"eval.curve_metric={metric!r} is not among the evaluated metrics: "
                                 f"{', '.join(available)}")
            lower_better = not metric.startswith("isc_")
            n_ckpts = {run: len(list_checkpoints(run)) for run in variant["points"]}
            for run, pts in variant["points"].items():
                if n_ckpts[run] > len(pts):
                    notes.append(f"{_run_name(run, root)}: the curve{' (' + vlabels[vid] + ')' if vlabels[vid] else ''}"
                                 f" covers {len(pts)} of its {n_ckpts[run]} checkpoints (python evaluate.py "
                                 f"run_dir={root} with the same eval settings evaluates the rest)")
            seed_curves: dict[str, list[tuple[dict, dict[float, float]]]] = {lab: [] for lab in order}
            for run, pts in variant["points"].items():
                curve = {k: float(m[metric]) for k, m in pts.items() if metric in m}
                bad = sorted(k for k, v in curve.items() if not math.isfinite(v))
                if bad:
                    notes.append(f"{_run_name(run, root)}: non-finite {metric} at kimg {', '.join(map(_short, bad))}"
                                 " (left out)")
                    curve = {k: v for k, v in curve.items() if math.isfinite(v)}
                if curve:
                    info = next(r for r in rows[label_of[run]]["runs"] if r["dir"] == str(run))
                    seed_curves[label_of[run]].append((info, curve))
            guidance = variant["sampler"].get("guidance", 1.0)
            kimgs = sorted({k for lab in order for _, c in seed_curves[lab] for k in c})
            paper_kimg = {lab: _paper_by_kimg(rows[lab]["paper"], guidance) for lab in order}
            vrows = {}
            for lab in order:
                sc = seed_curves[lab]
                if not sc:
                    continue
                cells = {}
                for k in sorted({k for _, c in sc for k in c}):
                    have = [(info, c[k]) for info, c in sc if k in c]
                    cells[k] = {**_stats([v for _, v in have]), "seeds": [info["seed"] for info, _ in have]}
                complete = [k for k in sorted(cells) if cells[k]["n"] == len(sc)]
                last_seen = {max(c) for _, c in sc}
                if complete and len(last_seen) > 1:
                    notes.append(f"{titles[data_key]} / {lab}: the seeds' curves end at different kimg "
                                 f"({', '.join(_short(k) for k in sorted(last_seen))}); final = {_short(complete[-1])}"
                                 " kimg, the last point evaluated for every seed")
                vrows[lab] = {"cells": cells, "mean_curve": [(k, cells[k]["mean"]) for k in complete],
                              "final_kimg": complete[-1] if complete else None,
                              "final": cells[complete[-1]] if complete else None,
                              "paper_final": _paper_final(rows[lab]["paper"], guidance),
                              "paper_by_kimg": paper_kimg[lab], "seed_curves": sc}
            mean_curves = {lab: r["mean_curve"] for lab, r in vrows.items() if r["mean_curve"]}
            target_summary = None
            if mean_curves:
                base = baseline if baseline in mean_curves else None
                target = settings.get("target_fid")
                _, target_summary = target_table(mean_curves, metric=metric,
                                                 target=None if target is None else float(target), baseline=base,
                                                 interpolation=interpolation)
                for lab, r in vrows.items():
                    tr = target_summary["rows"].get(lab)
                    per_seed = [kimg_to_reach(sorted(c.items()), target_summary["target"], interpolation)[1]
                                for _, c in r["seed_curves"]]
                    reached = [k for k in per_seed if k is not None]
                    r["target"] = {**(tr or {}), "per_seed_kimg": per_seed,
                                   "per_seed": _stats(reached) if reached else None, "reached": len(reached),
                                   "paper_speedup": _paper_speedups(rows[lab]["paper"])}
            table_variants.append({
                "id": vid, "label": vlabels[vid], "metric": metric, "lower_is_better": lower_better,
                "settings": {**variant["settings"], "sampler": variant["sampler"]}, "guidance": guidance,
                "kimg": kimgs, "rows": vrows, "target": target_summary,
                "setup": _setup_line([configs[r] for r in members],
                                     [{**variant["settings"], "sampler": variant["sampler"]}],
                                     [len(vrows[lab]["seed_curves"]) for lab in vrows], metric),
            })
        all_settings = [v["settings"] for v in table_variants]
        final_setup = _setup_line([configs[r] for r in members], all_settings,
                                  [len(r["seed_curves"]) for v in table_variants for r in v["rows"].values()],
                                  table_variants[0]["metric"] if table_variants else "fid")

        extras = _extra_metrics(members, label_of, root, notes)
        batches = {configs[r].get("train", {}).get("batch") for r in members}
        tables.append({"title": titles[data_key], "data": configs[members[0]].get("data"), "columns": columns,
                       "rows": {lab: {k: v for k, v in rows[lab].items() if k != "order"} for lab in order},
                       "order": order, "baseline": baseline, "variants": table_variants, "extras": extras,
                       "setup": final_setup,
                       "batch": batches.pop() if len(batches) == 1 else None})
    if baseline_wanted is not None and all(t["baseline"] is None for t in tables):
        rows_text = "; ".join(f"{t['title']}: {', '.join(t['order'])}" for t in tables)
        raise ValueError(f"eval.baseline_run={baseline_wanted!r} names no row of the report; rows: {rows_text}")
    return {"root": str(root), "tables": tables, "notes": list(dict.fromkeys(notes)),
            "target_fid": settings.get("target_fid"), "interpolation": interpolation,
            "time": time.strftime("%Y-%m-%d %H:%M:%S")}


def _extra_metrics(members: Sequence[Path], label_of: Mapping[Path, str], root: Path,
                   notes: list[str]) -> dict[str, dict[str, Any]]:
    """Final metrics of ``evaluate.py ckpt=<run> ...`` (``eval-*.json`` in a run or its checkpoints/): per column
    ``<metric> (<file stem>)`` and row, their mean ± std over the row's runs."""
    from training.checkpoint import CHECKPOINT_DIR, list_checkpoints

    values: dict[str, dict[str, list[float]]] = {}
    for run in members:
        files = sorted(run.glob("eval-*.json")) + sorted((run / CHECKPOINT_DIR).glob("eval-*.json"))
        ckpts = list_checkpoints(run)
        newest = ckpts[-1].stat().st_mtime if ckpts else None
        for path in files:
            try:
                record = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                notes.append(f"{path}: not readable JSON; skipped")
                continue
            metrics = record.get("metrics") if isinstance(record, Mapping) else None
            if not isinstance(metrics, Mapping):
                continue
            shown = path.relative_to(root) if path.is_relative_to(root) else path
            evaluated = re.search(r"checkpoint-(\d+)\.pt$", str(record.get("ckpt", "")))
            if evaluated and ckpts and ckpts[-1].name != Path(evaluated.group(0)).name:
                notes.append(f"{shown}: evaluates {evaluated.group(0)}, not the run's newest checkpoint "
                             f"{ckpts[-1].name}")
            elif not evaluated and newest is not None and path.stat().st_mtime < newest:
                notes.append(f"{shown}: written before the run's newest checkpoint (it may describe an earlier one)")
            for key, value in metrics.items():
                if key.endswith(("_sem", "_std")) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    continue
                column = f"{key} ({path.stem})"
                values.setdefault(column, {}).setdefault(label_of[run], []).append(float(value))
    return {col: {lab: _stats(v) for lab, v in per_row.items()} for col, per_row in values.items()}


def _report_kimg(kimg: float) -> str:
    """A kimg value for a table: one decimal at most from 10 kimg up (a checkpoint lands on a whole batch, so
    30 kimg at batch 128 is 30.08: shown 30.1), four significant digits below."""
    return f"{round(kimg, 1):g}" if abs(kimg) >= 10 else f"{kimg:.4g}"


def _kimg_header(kimg: float, batch: int | None) -> str:
    text = f"{_report_kimg(kimg)} kimg"
    if batch:
        iters = kimg * 1000 / batch
        if abs(iters - round(iters)) < 1e-6 and iters >= 1000:
            text += f" ({round(iters) / 1000:g}K it)"
    return text


def _best(values: Mapping[str, float | None], lower: bool) -> set[str]:
    """The rows holding the best value of a column (all of them on a tie; none when fewer than two values)."""
    present = {k: v for k, v in values.items() if v is not None}
    if len(present) < 2:
        return set()
    best = (min if lower else max)(present.values())
    return {k for k, v in present.items() if v == best}


def format_report(report: Mapping[str, Any], plot_name: str | None = "fid_vs_kimg.png") -> str:
    """The Markdown of ``collect_report``'s numbers: per table the metric-vs-kimg table, the final table and the
    images-to-target table, in the papers' layout (rows = settings, published numbers in adjacent columns)."""
    root = Path(report["root"])
    any_paper = any(row.get("paper") for t in report["tables"] for row in t["rows"].values())
    lines = [f"# Report: {root.name}", "",
             f"Sweep `{root}`, {report['time']}. Cells: mean ± sample standard deviation (n − 1) over seeds, with the "
             "number of seeds in parentheses; the best mean per column in bold."
             + (" Paper columns: the published numbers of the preset (the runs' `paper:` config) — comparable only "
                "at the paper's protocol and budget." if any_paper else ""), ""]
    if plot_name:
        lines += [f"![metric vs training kimg]({plot_name})", ""]
    for table in report["tables"]:
        lines += [f"## {table['title']}", ""]
        columns = table["columns"] or ["row"]
        for variant in table["variants"]:
            lower = variant["lower_is_better"]
            vrows = variant["rows"]
            suffix = f" — {variant['label']}" if variant["label"] else ""
            metric = variant["metric"]
            head = [f"### `{metric}` vs training kimg{suffix}", "", variant["setup"], ""]
            # Metric vs kimg, paper numbers (fid_by_kimg) beside their kimg.
            paper_kimgs = sorted({k for r in vrows.values() for k in r["paper_by_kimg"]})
            kimgs = sorted(set(variant["kimg"]) | set(paper_kimgs))
            header = list(columns)
            for k in kimgs:
                header.append(_kimg_header(k, table["batch"]))
                if k in paper_kimgs:
                    header.append("paper")
            body = []
            bests = {k: _best({lab: (r["cells"][k]["mean"] if k in r["cells"] else None) for lab, r in vrows.items()},
                              lower) for k in kimgs}
            for lab, r in vrows.items():
                cells = [table["rows"][lab]["aspects"].get(c, lab) for c in columns] if table["columns"] else [lab]
                for k in kimgs:
                    cells.append(_fmt_stat(r["cells"].get(k), bold=lab in bests[k]))
                    if k in paper_kimgs:
                        cells.append(_fmt_paper(r["paper_by_kimg"].get(k)))
                body.append(cells)
            lines += head + _md_table(header, body) + [""]

        # Final values: one column (and its paper column) per variant, then the eval-*.json metrics.
        lines += ["### Final", "", table["setup"], ""]
        header = list(columns) + ["final kimg"]
        has_paper = [any(r["paper_final"] is not None for r in v["rows"].values()) for v in table["variants"]]
        for variant, paper in zip(table["variants"], has_paper):
            name = f"`{variant['metric']}`" + (f" ({variant['label']})" if variant["label"] else "")
            header.append(name)
            if paper:
                header.append("paper")
        extra_cols = list(table["extras"])
        header += extra_cols
        body = []
        for lab in table["order"]:
            cells = [table["rows"][lab]["aspects"].get(c, lab) for c in columns] if table["columns"] else [lab]
            finals = [v["rows"].get(lab, {}).get("final_kimg") for v in table["variants"]]
            cells.append(" / ".join(dict.fromkeys(_report_kimg(k) for k in finals if k is not None)) or "—")
            for variant, paper in zip(table["variants"], has_paper):
                r = variant["rows"].get(lab)
                best = _best({lb: (vr["final"]["mean"] if vr["final"] else None)
                              for lb, vr in variant["rows"].items()}, variant["lower_is_better"])
                cells.append(_fmt_stat(r["final"] if r else None, bold=lab in best))
                if paper:
                    cells.append(_fmt_paper(r["paper_final"] if r else None))
            for col in extra_cols:
                cells.append(_fmt_stat(table["extras"][col].get(lab)))
            body.append(cells)
        lines += _md_table(header, body) + [""]
        sources = list(dict.fromkeys(str(table["rows"][lab]["paper"]["source"]) for lab in table["order"]
                                     if table["rows"][lab]["paper"] and table["rows"][lab]["paper"].get("source")))
        if sources:
            lines += ["Paper numbers: " + _join_sources(sources) + ".", ""]

        # Training images to reach the target.
        for variant in table["variants"]:
            summary = variant["target"]
            if summary is None:
                continue
            suffix = f" — {variant['label']}" if variant["label"] else ""
            base = summary["baseline"]
            how = {"loglinear": "log value linear in kimg between checkpoints", "linear": "linear between checkpoints",
                   "none": "first checkpoint at or below it"}[summary["interpolation"]]
            source = ("eval.target_fid" if report["target_fid"] is not None else
                      f"the final seed-mean value of the baseline row '{base}'" if base else
                      "the largest of the rows' best seed-mean values (every row reaches it)")
            lines += [f"### Training images to reach `{variant['metric']}` ≤ {summary['target']:.4g}{suffix}", "",
                      variant["setup"], "",
                      f"Target {summary['target']:.4g}: {source}. kimg at which the seed-mean curve "
                      f"first reaches it ({how}; '≤': already at the first checkpoint); per seed: the same for each "
                      "seed's curve, mean ± std over the seeds that reach it (reached/n). Speed-up: baseline kimg / "
                      "row kimg" + (f" (baseline: {base})." if base else " (no baseline row: set "
                                    "eval.baseline_run=<row label>)."), ""]
            paper_col = any(r.get("target", {}).get("paper_speedup") for r in variant["rows"].values())
            header = list(columns) + ["final kimg", "final (seed mean)", "kimg to target", "per seed",
                                      "speed-up"] + (["paper speed-up"] if paper_col else [])
            body = []
            for lab, r in variant["rows"].items():
                t = r.get("target") or {}
                cells = [table["rows"][lab]["aspects"].get(c, lab) for c in columns] if table["columns"] else [lab]
                cells[0] = cells[0] + (" (baseline)" if lab == base else "")
                kimg = t.get("kimg")
                reach = "not reached" if kimg is None else (("≤ " if t.get("at_first_checkpoint") else "") +
                                                            _fmt_kimg(kimg))
                per_seed = t.get("per_seed")
                per_seed_text = "—" if per_seed is None else _fmt_stat(per_seed).rsplit(" (", 1)[0]
                per_seed_text += f" ({t.get('reached', 0)}/{len(t.get('per_seed_kimg', []))})"
                speed = f"{t['speedup']:.2f}x" if t.get("speedup") else "—"
                cells += [_report_kimg(r["final_kimg"]) if r["final_kimg"] is not None else "—",
                          f"{r['final']['mean']:.4g}" if r["final"] else "—", reach, per_seed_text, speed]
                if paper_col:
                    cells.append(t.get("paper_speedup") or "—")
                body.append(cells)
            lines += _md_table(header, body) + [""]
    if report["notes"]:
        lines += ["## Notes", ""] + [f"- {n}" for n in report["notes"]] + [""]
    return "\n".join(lines)


def _join_sources(sources: Sequence[str]) -> str:
    """``A, row "x"; A, row "y"`` -> ``A, rows "x", "y"`` (the presets' ``paper.source`` strings)."""
    parts = [src.rsplit(", row ", 1) for src in sources]
    if len(sources) > 1 and all(len(p) == 2 for p in parts) and len({p[0] for p in parts}) == 1:
        return f"{parts[0][0]}, rows " + ", ".join(p[1] for p in parts)
    return "; ".join(sources)


def _md_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> list[str]:
    esc = [[str(c).replace("|", "\\|") for c in row] for row in [header, *body]]
    return ["| " + " | ".join(esc[0]) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |"
                                                                           for r in esc[1:]]


def plot_report(report: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Seed-mean metric vs kimg, one line per row, ±1 std shaded, log y: one panel per table and variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(t, v) for t in report["tables"] for v in t["variants"]]
    ncols = min(2, max(1, len(panels)))
    nrows = max(1, math.ceil(len(panels) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(7 * ncols, 4.6 * nrows), squeeze=False)
    cmap = plt.get_cmap("tab10")
    for ax, (table, variant) in zip(axes.flat, panels):
        positive = True
        for i, (lab, r) in enumerate(variant["rows"].items()):
            if not r["mean_curve"]:
                continue
            kimg = np.array([k for k, _ in r["mean_curve"]])
            mean = np.array([r["cells"][k]["mean"] for k in kimg])
            std = np.array([r["cells"][k]["std"] or 0.0 for k in kimg])
            n = max(r["cells"][k]["n"] for k in kimg)
            color = cmap(i % 10)
            style = "-" if i < 10 else "--"
            name = f"{lab} (n={n})" + (" — baseline" if lab == table["baseline"] else "")
            ax.plot(kimg, mean, style, marker="o", markersize=3, color=color, label=name)
            if n > 1:
                lo = mean - std
                ax.fill_between(kimg, np.where(lo > 0, lo, mean * 0.5), mean + std, color=color, alpha=0.15,
                                linewidth=0)
            positive = positive and bool((mean > 0).all())
        if variant["target"] is not None:
            ax.axhline(variant["target"]["target"], color="gray", linestyle=":", linewidth=1,
                       label=f"target {variant['target']['target']:.4g}")
        if positive:
            from matplotlib.ticker import LogFormatter

            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
            ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
        ax.set_xlabel("training images (kimg)")
        ax.set_ylabel(variant["metric"])
        ax.set_title(f"{table['title']}" + (f" — {variant['label']}" if variant["label"] else "")
                     + f" ({variant['settings'].get('num_samples')} samples per point)", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _report_json(report: Mapping[str, Any]) -> dict[str, Any]:
    """``collect_report``'s numbers in JSON form (kimg keys as lists of points)."""
    tables = []
    for table in report["tables"]:
        variants = []
        for v in table["variants"]:
            rows = {}
            for lab, r in v["rows"].items():
                rows[lab] = {
                    "points": [{"kimg": k, **c} for k, c in r["cells"].items()],
                    "mean_curve": [{"kimg": k, "mean": m} for k, m in r["mean_curve"]],
                    "final_kimg": r["final_kimg"], "final": r["final"], "paper_final": r["paper_final"],
                    "paper_by_kimg": [{"kimg": k, "value": p} for k, p in sorted(r["paper_by_kimg"].items())],
                    "target": r.get("target"),
                    "seeds": [{"seed": info["seed"], "run": info["name"],
                               "curve": [{"kimg": k, "value": c[k]} for k in sorted(c)]}
                              for info, c in r["seed_curves"]],
                }
            variants.append({"label": v["label"], "metric": v["metric"], "lower_is_better": v["lower_is_better"],
                             "settings": v["settings"], "setup": v["setup"], "kimg": v["kimg"], "rows": rows,
                             "target": v["target"] and {k: val for k, val in v["target"].items() if k != "rows"}})
        tables.append({"title": table["title"], "data": table["data"], "columns": table["columns"],
                       "baseline": table["baseline"], "setup": table["setup"],
                       "rows": [{"label": lab, **{k: val for k, val in table["rows"][lab].items() if k != "label"}}
                                for lab in table["order"]],
                       "variants": variants, "extra_metrics": table["extras"]})
    return {"root": report["root"], "time": report["time"], "interpolation": report["interpolation"],
            "target_fid": report["target_fid"], "tables": tables, "notes": report["notes"]}


def sweep_report(root: str | os.PathLike, out_dir: str | os.PathLike | None = None, eval_cfg: Any = None,
                 select: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``evaluate.py report=<sweep dir>``: write ``report.md``, ``report.json`` and ``fid_vs_kimg.png`` into
    ``out_dir`` (default ``<root>/report``); returns ``collect_report``'s numbers with ``files`` and ``markdown``."""
    report = collect_report(root, eval_cfg, select)
    out = Path(os.path.expanduser(str(out_dir))) if out_dir else Path(report["root"]) / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    plot = plot_report(report, out / "fid_vs_kimg.png")
    markdown = format_report(report, plot.name)
    (out / "report.md").write_text(markdown)
    (out / "report.json").write_text(json.dumps(_jsonable(_report_json(report)), indent=1, allow_nan=False) + "\n")
    files = {"markdown": out / "report.md", "json": out / "report.json", "plot": plot}
    print(markdown)
    print("wrote " + ", ".join(str(p) for p in files.values()))
    return {**report, "markdown": markdown, "files": {k: str(v) for k, v in files.items()}}


def _infonoise_reports(run_dir: Path, out: str | None) -> dict[str, Any]:
    """``report=infonoise run_dir=<run or sweep>``: the InfoNoise profile figure of every InfoNoise run."""
    from evaluation.infonoise_report import plot_infonoise_profile

    runs = [r for r in find_report_runs(run_dir)
            if (_run_config(r).get("schedule") or {}).get("name") == "infonoise"]
    if not runs:
        raise ValueError(f"report=infonoise: no InfoNoise run (schedule=infonoise) at or below {run_dir}")
    written = []
    for run in runs:
        if out is None:
            target = None
        elif len(runs) == 1 and str(out).endswith(".png"):
            target = Path(out)
        else:
            Path(out).mkdir(parents=True, exist_ok=True)
            target = Path(out) / f"infonoise_profile-{_safe_name(_run_name(run, run_dir))}.png"
        written.append(str(plot_infonoise_profile(run, target)))
        print(f"wrote {written[-1]}")
    return {"report": "infonoise", "files": written}


def run_report(cfg: Any, overrides: Sequence[str] = (), dist_info: Any = None) -> dict[str, Any]:
    """The CLI's ``report=``: ``<sweep dir>`` (tables), ``schedules`` (the schedules figure) or ``infonoise``
    (with ``run_dir=``: InfoNoise profiles). ``out=``: the output directory (or .png for one InfoNoise run)."""
    if dist_info is not None and dist_info.rank != 0:
        return {}
    what = str(cfg.report)
    others = sorted(k for k, on in _modes(cfg).items() if on and k != "report")
    out = cfg.get("out")
    if what == "infonoise":
        if cfg.get("run_dir") is None or others != ["run_dir"]:
            raise ValueError("report=infonoise needs run_dir=<InfoNoise run or sweep dir> and none of samples=, "
                             f"ckpt=, ref= (got {', '.join(others) or 'no run_dir'})")
        return _infonoise_reports(Path(os.path.expanduser(str(cfg.run_dir))), None if out is None else str(out))
    if others:
        raise ValueError(f"report={what} is a mode of its own: drop {', '.join(others)}= (run_dir= goes only with "
                         "report=infonoise; the sweep report reads the curves `evaluate.py run_dir=<sweep>` wrote)")
    if what == "schedules":
        from evaluation.schedule_figure import write_schedule_report

        paths = write_schedule_report(Path(str(out)) if out else Path("docs") / "figures")
        print("wrote " + ", ".join(str(p) for p in (paths.values() if isinstance(paths, Mapping) else paths)))
        return {"report": "schedules",
                "files": {k: str(v) for k, v in paths.items()} if isinstance(paths, Mapping) else paths}
    return sweep_report(what, out_dir=out, eval_cfg=cfg.get("eval"), select=_report_selection(cfg, overrides))


def _report_selection(cfg: Any, overrides: Sequence[str]) -> dict[str, Any]:
    """The curve settings set on the report's command line (``eval.num_samples=1000``, ``sampler.guidance=3``)."""
    from omegaconf import Container, OmegaConf

    select = {}
    for item in overrides:
        key = item.split("=", 1)[0].lstrip("+~")
        if (key.startswith("eval.") and key[5:] in _SELECTABLE_EVAL_KEYS) or key.startswith("sampler."):
            value = OmegaConf.select(cfg, key)
            value = OmegaConf.to_container(value) if isinstance(value, Container) else value
            select[key[5:] if key.startswith("eval.") else key] = value
    return select


def _entry_matches(entry: Mapping[str, Any], select: Mapping[str, Any]) -> bool:
    settings = entry.get("settings") or {}
    for key, wanted in select.items():
        have = (settings.get("sampler") or {}).get(key[8:]) if key.startswith("sampler.") else settings.get(key)
        if not (have == wanted or _num_eq(have, wanted) or _canon(have) == _canon(wanted)):
            return False
    return True


# ------------------------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------------------------
def _metric_label(key: str, extractor: str | None) -> str:
    if key.startswith("nll_"):
        return {"nll_ode_bpd": "NLL, ODE (bits/dim)", "nll_elbo_bpd": "NLL bound, ELBO (bits/dim)"}.get(key, key)
    prefix = "classifier-" if extractor == DIGITS_EXTRACTOR else ""
    names = {"fid": "FID", "isc": "IS", "kid": "KID"}
    metric = key.split("_", 1)[0]
    tag = EXTRACTOR_TAGS[extractor]
    rest = key[len(metric) + 1 + len(tag):].lstrip("_")
    if metric == "prc":
        return f"{prefix}{rest}"
    return f"{prefix}{names[metric]}" + (f" ({rest})" if rest else "")


def format_table(columns: Mapping[str, Mapping[str, float]], counts: Mapping[str, int], extractor: str) -> str:
    """An aligned text table: one column per image set (samples, floor, ...), one row per metric key."""
    keys = list(dict.fromkeys(k for col in columns.values() for k in col))
    label_w = max([len("images")] + [len(_metric_label(k, extractor)) for k in keys])
    widths = {name: max(len(name), 10) for name in columns}

    def fmt(v: float | None) -> str:
        if v is None:
            return "-"
        return f"{v:.4g}" if abs(v) < 1e-3 and v != 0 else f"{v:.4f}" if abs(v) < 10 else f"{v:.2f}"

    lines = [f"metric: {EXTRACTOR_DESCRIPTIONS[extractor]}"]
    lines.append("  ".join([" " * label_w] + [name.rjust(widths[name]) for name in columns]))
    lines.append("  ".join(["images".ljust(label_w)] + [str(counts.get(n, "-")).rjust(widths[n]) for n in columns]))
    for k in keys:
        cells = [fmt(columns[n].get(k)).rjust(widths[n]) for n in columns]
        lines.append("  ".join([_metric_label(k, extractor).ljust(label_w)] + cells))
    return "\n".join(lines)


def _override_keys(overrides: Sequence[str], group: str) -> tuple[bool, list[str]]:
    """(whether ``group=<option>`` was chosen on the command line, the ``group.key`` keys set there)."""
    chosen, keys = False, []
    for item in overrides:
        lhs = item.split("=", 1)[0].lstrip("+~")
        if lhs == group:
            chosen = True
        elif lhs.startswith(group + "."):
            keys.append(lhs[len(group) + 1:])
    return chosen, keys


def _run_group(run_value: Any, cli_value: Any, overrides: Sequence[str], group: str) -> Any:
    """The run's own config group, unless the command line chose another option or set some of its keys."""
    from omegaconf import OmegaConf

    chosen, keys = _override_keys(overrides, group)
    if chosen or run_value is None:
        return cli_value
    merged = OmegaConf.create(_plain(run_value))
    for key in keys:
        OmegaConf.update(merged, key, OmegaConf.select(cli_value, key), force_add=True)
    return merged


def _default_out(cfg: Any, eval_name: str) -> Path:
    if cfg.ckpt is not None:
        ckpt = Path(str(cfg.ckpt))
        if ckpt.is_dir():
            return ckpt / f"eval-{eval_name}.json"
        return ckpt.parent / f"eval-{eval_name}-{ckpt.stem}.json"
    samples = Path(str(cfg.samples))
    stem = samples.stem if samples.is_file() else samples.name
    return samples.parent / f"eval-{eval_name}-{stem}.json"


def run_reference(cfg: Any, dist_info: Any = None) -> dict[str, Any]:
    """``ref=true``: μ, Σ of every (un-flipped) training image of ``data`` in EDM's ``.npz`` format (rank 0 only)."""
    from data import build_dataset

    if dist_info is not None and dist_info.rank != 0:
        return {}
    settings = _eval_settings(cfg.eval)
    dataset = build_dataset(cfg.data, split="train")
    if getattr(dataset, "latent", False):
        raise ValueError(f"data '{dataset.name}' holds latents; reference statistics need pixel images")
    device = dist_info.device if dist_info is not None else _resolve_device(None)
    extractor = resolve_feature_extractor(settings["feature_extractor"], cfg.data)
    t0 = time.time()
    stats = compute_reference_statistics(dataset, feature_extractor=extractor, eval_cfg=settings, data_cfg=cfg.data,
                                         device=device)
    if cfg.get("out"):
        out = Path(str(cfg.out))
    else:
        suffix = "" if extractor == INCEPTION_EXTRACTOR else f"-{EXTRACTOR_TAGS[extractor]}"
        out = Path(f"{dataset.name}-{dataset.resolution}x{dataset.resolution}{suffix}.npz")
    save_reference_statistics(out, stats)
    print(f"reference statistics of '{dataset.name}' (training split, {stats['num_images']} images, "
          f"{EXTRACTOR_DESCRIPTIONS[extractor]}) -> {out}  [{time.time() - t0:.1f} s]")
    return {"path": str(out), "num_images": stats["num_images"], "feature_extractor": extractor,
            "extractor_id": stats["extractor_id"]}


def _modes(cfg: Any) -> dict[str, bool]:
    return {"samples": cfg.get("samples") is not None, "ckpt": cfg.get("ckpt") is not None,
            "run_dir": cfg.get("run_dir") is not None, "ref": bool(cfg.get("ref", False)),
            "report": cfg.get("report") is not None}


def run_evaluation(cfg: Any, overrides: Sequence[str] = (), dist_info: Any = None) -> dict[str, Any]:
    """The CLI's work on a composed ``configs/evaluate.yaml`` config; returns the record written to JSON.

    ``overrides`` are the command-line overrides: with ``ckpt`` (and ``run_dir``), the run's own ``data`` and
    ``sampler`` groups are used unless the command line chose another option (``data=...``) or set keys
    (``data.path=...``). ``dist_info`` (``training.distributed.init_distributed``): split sampling over the ranks;
    rank 0 computes the metrics and returns the record, the other ranks return ``{}``.
    """
    from training.distributed import resolve_device

    modes = _modes(cfg)
    if modes["report"]:
        return run_report(cfg, overrides, dist_info)
    if sum(modes.values()) != 1:
        raise ValueError("give exactly one of samples=<npz or image folder>, ckpt=<checkpoint or run dir>, "
                         "run_dir=<run or sweep dir> (FID curves), ref=true (reference statistics) or "
                         "report=<sweep dir | schedules | infonoise> (got "
                         f"samples={cfg.get('samples')!r}, ckpt={cfg.get('ckpt')!r}, run_dir={cfg.get('run_dir')!r}, "
                         f"ref={cfg.get('ref', False)!r})")
    settings = _eval_settings(cfg.eval)
    metrics = _check_metrics(settings["metrics"])
    if modes["ref"]:
        return run_reference(cfg, dist_info)
    if modes["run_dir"]:
        return run_curves(cfg, overrides, dist_info)
    device = dist_info.device if dist_info is not None else resolve_device(str(cfg.get("device", "auto")))
    main = dist_info is None or dist_info.rank == 0
    sample_metrics = [m for m in metrics if m != "nll"]
    data_cfg = cfg.data
    t0 = time.time()
    if cfg.ckpt is not None:
        from training.checkpoint import load_denoiser

        if not os.path.exists(str(cfg.ckpt)):
            raise FileNotFoundError(f"ckpt not found: {cfg.ckpt}")
        ema = bool(cfg.get("ema", True))
        denoiser, run_cfg = load_denoiser(str(cfg.ckpt), ema=ema, device=device)
        data_cfg = _run_group(run_cfg.get("data"), cfg.data, overrides, "data")
        sampler_cfg = _run_group(run_cfg.get("sampler"), cfg.sampler, overrides, "sampler")
        get_reference = _reference_getter(data_cfg, settings)
        if sample_metrics and settings.get("reference_stats") is None:
            reference = get_reference()
            den_chw = (denoiser.img_channels, denoiser.img_resolution, denoiser.img_resolution)
            ref_chw = (reference.num_channels, reference.resolution, reference.resolution)
            if den_chw != ref_chw:
                raise ValueError(f"the checkpoint generates (C, H, W) = {den_chw} but data '{reference.name}' has "
                                 f"{ref_chw}: channel/resolution mismatch")
        result = _evaluate_model(denoiser, data_cfg, sampler_cfg, settings, device=device,
                                 get_reference=get_reference, distributed=dist_info is not None, progress=True,
                                 run_cfg=run_cfg)
        if not main:
            return {}
        source = {"ckpt": str(cfg.ckpt), "ema": ema, "seeds": result["seeds"]}
        if result["likelihood"] is not None:
            source["likelihood"] = result["likelihood"]
        if len(result["repeats"]) > 1:
            source["repeats"] = [{"seeds": r["seeds"], "metrics": r["metrics"]} for r in result["repeats"]]
    else:
        if "nll" in metrics:
            raise ValueError("eval.metrics contains nll, which needs the model: evaluate it with ckpt=<run>")
        if int(settings["seed_repeats"]) != 1:
            raise ValueError("eval.seed_repeats needs ckpt=<run> (the images of samples= come with their seeds)")
        if not main:
            return {}
        sampler_cfg = None
        get_reference = _reference_getter(data_cfg, settings)
        reference = get_reference()
        ref_chw = None if reference is None else (reference.num_channels, reference.resolution, reference.resolution)
        images = load_samples(str(cfg.samples), ref_chw)
        extractor = resolve_feature_extractor(settings["feature_extractor"], data_cfg)
        common = dict(metrics=sample_metrics, feature_extractor=extractor,
                      reference_cache_name=reference_identity(data_cfg, "train"), eval_cfg=settings,
                      data_cfg=data_cfg, device=device)
        result = {"columns": {"samples": compute_metrics(images, reference, **common)},
                  "counts": {"samples": len(images)}, "notes": [], "extractor": extractor, "images": images,
                  "num_samples": len(images), "likelihood": None}
        result["metrics"] = result["columns"]["samples"]
        if settings["baselines"]:
            columns, counts = _floor_columns(images, data_cfg, common, get_reference, result["notes"])
            result["columns"].update(columns)
            result["counts"].update(counts)
            result["notes"].append("ceiling: needs ckpt= (an untrained model of the checkpoint's architecture)")
        source = {"samples": str(cfg.samples)}

    extractor = result["extractor"]
    if extractor is not None:
        reference = get_reference()
        if reference is None:
            stats_path = str(settings["reference_stats"])
            ref_record: dict[str, Any] = {"stats": stats_path}
            print(f"reference: statistics from {stats_path}")
        else:
            n_ref = len(_UInt8Images(reference, False))
            ref_record = {"dataset": reference.name, "split": "train", "num_images": n_ref,
                          "identity": reference_identity(data_cfg, "train")}
            print(f"reference: '{reference.name}' training split ({n_ref} images)")
        print(format_table(result["columns"], result["counts"], extractor))
    else:
        ref_record = None
    if result["likelihood"] is not None:
        print(_format_likelihood(result["metrics"], result["likelihood"]))
    for note in result["notes"]:
        print(note)

    record = {
        "metrics": result["metrics"],
        "feature_extractor": extractor,
        "feature_extractor_description": EXTRACTOR_DESCRIPTIONS.get(extractor) if extractor else None,
        "num_samples": result["num_samples"],
        "reference": ref_record,
        "columns": result["columns"],
        "counts": result["counts"],
        "notes": result["notes"],
        "data": _plain(data_cfg),
        "sampler": _plain(sampler_cfg) if sampler_cfg is not None else None,
        "eval": {k: v for k, v in settings.items()},
        **source,
        "world_size": 1 if dist_info is None else dist_info.world_size,
        "seconds": round(time.time() - t0, 2),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if extractor == DIGITS_EXTRACTOR:  # the classifier's provenance and held-out accuracy (already cached)
        cache_dir = os.path.expanduser(str(settings["cache_dir"]))
        record["classifier"] = load_or_train_digits_classifier(data_cfg, cache_dir)[1]
    out = Path(str(cfg.out)) if cfg.get("out") else _default_out(cfg, str(settings["name"]))
    out.parent.mkdir(parents=True, exist_ok=True)
    if settings["save_samples"] and cfg.ckpt is not None and result["images"] is not None:
        images = result["images"]
        first = result["repeats"][0]["seeds"][0]
        samples_path = out.with_name(out.stem + "-samples.npz")
        np.savez(samples_path, samples=images.permute(0, 2, 3, 1).numpy(),
                 seeds=np.arange(first, first + len(images), dtype=np.int64))
        record["samples_file"] = str(samples_path)
        print(f"wrote {samples_path}")
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(_jsonable(record), indent=2, allow_nan=False) + "\n")
    os.replace(tmp, out)
    print(f"wrote {out}")
    return record


def _jsonable(value: Any) -> Any:
    """Strict JSON: non-finite floats (e.g. sampler.S_max = inf) become strings, unknown objects their str()."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


def main() -> None:
    import hydra
    from hydra.core.hydra_config import HydraConfig

    @hydra.main(version_base="1.3", config_path="configs", config_name="evaluate")
    def _main(cfg: Any) -> None:
        from training.distributed import init_distributed, shutdown_distributed

        dist_info = None
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            dist_info = init_distributed(str(cfg.get("device", "auto")))
        try:
            run_evaluation(cfg, list(HydraConfig.get().overrides.task), dist_info)
        finally:
            if dist_info is not None:
                shutdown_distributed()

    _main()


if __name__ == "__main__":
    sys.exit(main())
