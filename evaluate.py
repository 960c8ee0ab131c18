"""Sample-quality metrics (FID, IS, KID, precision/recall) through torch-fidelity, and the ``evaluate.py`` CLI.

    python evaluate.py samples=<samples.npz | folder of PNGs> [data=digits]
    python evaluate.py ckpt=<run dir | checkpoint file> [eval.num_samples=2000] [eval.baselines=true]

Metric (Heusel et al. 2017; EDM's fid.py, see shared/papers/edm.md §5): features f of each image set are summarised by
their mean mu and covariance Sigma (unbiased, N - 1), and

    FID = ||mu_1 - mu_2||^2 + tr(Sigma_1 + Sigma_2 - 2 (Sigma_1 Sigma_2)^(1/2)).

torch-fidelity computes it (tr of the square root via the eigenvalues of Sigma_1 Sigma_2). Which features:

- ``inception-v3-compat``: torch-fidelity's port of the TF 2015 Inception-v3 (pool3, 2048-d) -- the standard FID
  for natural images (CIFAR-10, image folders); grayscale is repeated to 3 channels. Reported as ``fid_inception``.
  EDM reports FID with 50,000 samples against the statistics of the whole training set (``eval=fid50k``); with
  fewer samples FID is biased upwards and comparable only at equal sample counts.
- ``digits-classifier``: the penultimate 64-d features of a small CNN trained once on the training split of the
  8x8 digits (``models/digits_classifier.py``). This is the usual "classifier FID" of MNIST-like data; it is
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

FID is biased upwards at small sample counts and is comparable only at equal counts: on the digits, the 269
held-out images score 3.5 against the training split, the first 135 of them 11.1, the first 50 33.6.

``eval.baselines=true`` adds two reference points: the **floor**, the metric of the held-out split against the
training split (a model that generalises perfectly cannot do better, up to the bias of the smaller sample: compare
it with the ``samples@<n>`` column, the same metric on the first n samples), and the **ceiling**, the metric of a
freshly initialised (untrained) denoiser of the checkpoint's architecture sampled with the same sampler and seeds.
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

from models.digits_classifier import EXTRACTOR_NAME as DIGITS_EXTRACTOR
from models.digits_classifier import file_digest, load_or_train_digits_classifier, register_digits_classifier

__all__ = [
    "VALID_METRICS",
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
]

VALID_METRICS = ("fid", "isc", "kid", "prc")
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
    "seed": 0,
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
) -> dict[str, float]:
    """Metrics of ``generated`` (uint8 [N, C, H, W]) against ``reference`` (ImageDataset or uint8 tensor).

    Args:
        metrics: any of ``fid``, ``isc``, ``kid``, ``prc``.
        feature_extractor: ``auto`` | ``digits-classifier`` | ``inception-v3-compat`` (``auto`` needs ``data_cfg``
            or a reference ImageDataset carrying its ``name``).
        reference_cache_name: identity of the reference set (e.g. ``reference_identity(data_cfg, "train")``); when
            given, its statistics are cached under ``<eval.cache_dir>/fidelity`` with the extractor, its weights'
            digest and the reference size appended. None: nothing is cached.
        eval_cfg: the ``eval`` config group (``cache_dir``, ``batch``, ``seed``, ``feature_extractor_weights_path``);
            None uses ``DEFAULT_EVAL``. ``feature_extractor_weights_path`` applies to Inception only.
        data_cfg: the data config; needed by the digits classifier (trained on its training split, cached) unless
            ``classifier_path`` names a classifier file.
        device: where features are computed (default: CUDA when available).

    Returns:
        ``{"fid_<tag>": ..., "isc_<tag>_mean": ..., ...}`` with tag ``digits_classifier`` or ``inception``.
    """
    settings = _eval_settings(eval_cfg)
    metrics = _check_metrics(metrics)
    n_gen, gen_shape = _image_set_shape(generated, "generated images")
    n_ref, ref_shape = _image_set_shape(reference, "reference images")
    if gen_shape != ref_shape:
        raise ValueError(
            f"generated images have shape (C, H, W) = {gen_shape} but the reference images have {ref_shape}: "
            "channels and resolution must match (wrong data config for these samples?)"
        )
    binary_metrics = [m for m in metrics if m != "isc"]
    if n_gen < 2 or (binary_metrics and n_ref < 2):
        raise ValueError(f"need at least 2 images per set, got {n_gen} generated and {n_ref} reference")
    if "isc" in metrics and n_gen < 10:
        raise ValueError(f"isc splits the generated images into 10 parts and needs >= 10 of them, got {n_gen}")

    dataset_name = _plain(data_cfg).get("name") if data_cfg is not None else getattr(reference, "name", None)
    extractor = resolve_feature_extractor(feature_extractor, data_cfg, dataset_name)
    cache_dir = os.path.expanduser(str(settings["cache_dir"]))

    if extractor == DIGITS_EXTRACTOR:
        if classifier_path is None:
            if data_cfg is None:
                raise ValueError(
                    f"the {DIGITS_EXTRACTOR} feature extractor needs data_cfg (to train or load the classifier of "
                    "that dataset) or classifier_path"
                )
            classifier_path, _ = load_or_train_digits_classifier(data_cfg, cache_dir)
        weights_path: str | None = str(classifier_path)
        extractor_id = f"{DIGITS_EXTRACTOR}-{_weights_digest(weights_path)}"
    else:
        weights_path = settings.get("feature_extractor_weights_path")
        if weights_path is not None:
            weights_path = os.path.expanduser(str(weights_path))
            if not os.path.isfile(weights_path):
                raise FileNotFoundError(
                    f"eval.feature_extractor_weights_path={weights_path} does not exist; it should be the file "
                    f"{os.path.basename(INCEPTION_WEIGHTS_URL)} from {INCEPTION_WEIGHTS_URL}"
                )
            extractor_id = f"inception-{_weights_digest(weights_path)}"
        else:
            extractor_id = "inception-" + os.path.basename(INCEPTION_WEIGHTS_URL).split("-")[-1].split(".")[0]
        if gen_shape[0] not in (1, 3):
            raise ValueError(f"Inception features need 1- or 3-channel images, got {gen_shape[0]} channels")

    to_rgb = extractor == INCEPTION_EXTRACTOR
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    kwargs: dict[str, Any] = {
        "input1": _UInt8Images(generated, to_rgb),
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
        kwargs["input2"] = _UInt8Images(reference, to_rgb)
        if reference_cache_name is not None:
            kwargs["input2_cache_name"] = _safe_name(f"{reference_cache_name}-{extractor_id}-n{n_ref}")
    if "kid" in metrics:
        kwargs["kid_subset_size"] = min(1000, n_gen, n_ref)

    weights_missing = (
        extractor == INCEPTION_EXTRACTOR and weights_path is None and not os.path.isfile(_inception_hub_file())
    )
    try:
        with _socket_timeout(DOWNLOAD_TIMEOUT_S) if weights_missing else contextlib.nullcontext():
            raw = torch_fidelity.calculate_metrics(**kwargs)
    except (URLError, OSError, RuntimeError) as err:
        if weights_missing and not os.path.isfile(_inception_hub_file()):
            raise InceptionWeightsUnavailableError(_inception_unavailable_message(err)) from err
        raise

    tag = EXTRACTOR_TAGS[extractor]
    out = {}
    for key, value in raw.items():
        template = _KEY_MAP.get(key, key + "_{tag}")
        out[template.format(tag=tag)] = float(value)
    return out


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
# Sampling + metrics (used by the CLI, and by train.py for eval.every_kimg)
# ------------------------------------------------------------------------------------------------------------------
def generate_for_eval(
    denoiser: torch.nn.Module, data_cfg: Any, eval_cfg: Any, sampler_cfg: Any, *, device: str | torch.device,
    num_samples: int | None = None, progress: bool = False,
) -> Tensor:
    """``eval.num_samples`` uint8 images from seeds ``eval.seed .. eval.seed + N - 1`` (labels drawn per seed)."""
    from sample import generate_images

    settings = _eval_settings(eval_cfg)
    n = int(num_samples if num_samples is not None else settings["num_samples"])
    if n < 2:
        raise ValueError(f"eval.num_samples must be >= 2, got {n}")
    seeds = list(range(int(settings["seed"]), int(settings["seed"]) + n))
    binary = bool(_plain(data_cfg).get("binarize", False))
    return generate_images(denoiser, seeds, sampler_cfg=sampler_cfg, batch_size=int(settings["batch"]), device=device,
                           binary=binary, progress=progress)


def evaluate_denoiser(
    denoiser: torch.nn.Module, data_cfg: Any, eval_cfg: Any, sampler_cfg: Any, *, device: str | torch.device,
    num_samples: int | None = None, reference: Any = None,
) -> dict[str, float]:
    """Sample ``eval.num_samples`` images and compute ``eval.metrics`` against the training split of ``data_cfg``.

    The hook for periodic evaluation during training (``eval.every_kimg``); ``reference`` may pass a prebuilt
    training dataset to avoid rebuilding it each time.
    """
    settings = _eval_settings(eval_cfg)
    metrics = _check_metrics(settings["metrics"])
    if reference is None:
        from data import build_dataset

        reference = build_dataset(data_cfg, split="train")
    images = generate_for_eval(denoiser, data_cfg, settings, sampler_cfg, device=device, num_samples=num_samples)
    return compute_metrics(images, reference, metrics=metrics, feature_extractor=settings["feature_extractor"],
                           reference_cache_name=reference_identity(data_cfg, "train"), eval_cfg=settings,
                           data_cfg=data_cfg, device=device)


# ------------------------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------------------------
def _metric_label(key: str, extractor: str) -> str:
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


def run_evaluation(cfg: Any, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The CLI's work on a composed ``configs/evaluate.yaml`` config; returns the record written to JSON.

    ``overrides`` are the command-line overrides: with ``ckpt``, the run's own ``data`` and ``sampler`` groups are
    used unless the command line chose another option (``data=...``) or set keys (``data.path=...``).
    """
    from data import build_dataset
    from models.distributed import resolve_device

    if (cfg.samples is None) == (cfg.ckpt is None):
        raise ValueError("give exactly one of samples=<npz or image folder> and ckpt=<checkpoint or run dir> "
                         f"(got samples={cfg.samples!r}, ckpt={cfg.ckpt!r})")
    settings = _eval_settings(cfg.eval)
    metrics = _check_metrics(settings["metrics"])
    device = resolve_device(str(cfg.get("device", "auto")))
    denoiser = run_cfg = None
    sampler_cfg = cfg.sampler
    data_cfg = cfg.data
    if cfg.ckpt is not None:
        from models.checkpoint import load_denoiser

        if not os.path.exists(str(cfg.ckpt)):
            raise FileNotFoundError(f"ckpt not found: {cfg.ckpt}")
        denoiser, run_cfg = load_denoiser(str(cfg.ckpt), ema=bool(cfg.get("ema", True)), device=device)
        data_cfg = _run_group(run_cfg.get("data"), cfg.data, overrides, "data")
        sampler_cfg = _run_group(run_cfg.get("sampler"), cfg.sampler, overrides, "sampler")
    extractor = resolve_feature_extractor(settings["feature_extractor"], data_cfg)
    reference = build_dataset(data_cfg, split="train")
    ref_chw = (reference.num_channels, reference.resolution, reference.resolution)
    ref_name = reference_identity(data_cfg, "train")
    common = dict(metrics=metrics, feature_extractor=extractor, reference_cache_name=ref_name, eval_cfg=settings,
                  data_cfg=data_cfg, device=device)

    t0 = time.time()
    if denoiser is not None:
        den_chw = (denoiser.img_channels, denoiser.img_resolution, denoiser.img_resolution)
        if den_chw != ref_chw:
            raise ValueError(f"the checkpoint generates (C, H, W) = {den_chw} but data '{reference.name}' has "
                             f"{ref_chw}: channel/resolution mismatch")
        print(f"generating {settings['num_samples']} samples (seeds {settings['seed']}..) with "
              f"sampler={sampler_cfg.name} num_steps={sampler_cfg.get('num_steps')} on {device}")
        images = generate_for_eval(denoiser, data_cfg, settings, sampler_cfg, device=device, progress=True)
        source = {"ckpt": str(cfg.ckpt), "ema": bool(cfg.get("ema", True)),
                  "seeds": [int(settings["seed"]), int(settings["seed"]) + len(images) - 1]}
    else:
        images = load_samples(str(cfg.samples), ref_chw)
        source = {"samples": str(cfg.samples)}

    columns: dict[str, dict[str, float]] = {"samples": compute_metrics(images, reference, **common)}
    counts = {"samples": len(images)}
    notes = []
    if settings["baselines"]:
        try:
            heldout = build_dataset(data_cfg, split="test")
        except (ValueError, FileNotFoundError, NotImplementedError) as err:
            heldout = None
            notes.append(f"floor: not available ({err})")
        if heldout is not None:
            held_images = heldout.all_images()
            n_held = len(held_images)
            if n_held < len(images):
                key = f"samples@{n_held}"
                columns[key] = compute_metrics(images[:n_held], reference, **common)
                counts[key] = n_held
            columns["floor"] = compute_metrics(held_images, reference, **common)
            counts["floor"] = n_held
        if denoiser is not None:
            from diffusion.preconditioning import build_denoiser

            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(settings["seed"]))
                fresh = build_denoiser(run_cfg, denoiser.img_resolution, denoiser.img_channels,
                                       label_dim=int(getattr(denoiser, "label_dim", 0)),
                                       augment_dim=int(getattr(denoiser, "augment_dim", 0)))
            fresh = fresh.eval().requires_grad_(False).to(device)
            untrained = generate_for_eval(fresh, data_cfg, settings, sampler_cfg, device=device)
            columns["ceiling"] = compute_metrics(untrained, reference, **common)
            counts["ceiling"] = len(untrained)
        else:
            notes.append("ceiling: needs ckpt= (an untrained model of the checkpoint's architecture)")

    n_ref = len(_UInt8Images(reference, False))
    print(f"reference: '{reference.name}' training split ({n_ref} images)")
    print(format_table(columns, counts, extractor))
    for note in notes:
        print(note)

    record = {
        "metrics": columns["samples"],
        "feature_extractor": extractor,
        "feature_extractor_description": EXTRACTOR_DESCRIPTIONS[extractor],
        "num_samples": len(images),
        "reference": {"dataset": reference.name, "split": "train", "num_images": n_ref, "identity": ref_name},
        "columns": columns,
        "counts": counts,
        "notes": notes,
        "data": _plain(data_cfg),
        "sampler": _plain(sampler_cfg) if denoiser is not None else None,
        "eval": {k: v for k, v in settings.items()},
        **source,
        "seconds": round(time.time() - t0, 2),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if extractor == DIGITS_EXTRACTOR:  # the classifier's provenance and held-out accuracy (already cached)
        cache_dir = os.path.expanduser(str(settings["cache_dir"]))
        record["classifier"] = load_or_train_digits_classifier(data_cfg, cache_dir)[1]
    out = Path(str(cfg.out)) if cfg.get("out") else _default_out(cfg, str(settings["name"]))
    out.parent.mkdir(parents=True, exist_ok=True)
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
        run_evaluation(cfg, list(HydraConfig.get().overrides.task))

    _main()


if __name__ == "__main__":
    sys.exit(main())
