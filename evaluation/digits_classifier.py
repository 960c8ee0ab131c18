"""A small CNN classifier for the 8x8 digits, used as the feature extractor of the "classifier-FID".

Why: Inception-v3 features are meaningless on 8x8 grayscale digits (and its weights cannot be downloaded offline).
As usual for MNIST-like data, a small classifier trained once on the *training* split of the very dataset being
modelled provides the features instead; the Fréchet distance between the Gaussians fitted to its penultimate
features of two image sets is reported as **classifier-FID (digits-classifier features)** -- a different number
from Inception FID, never to be compared with one.

Architecture (input uint8 [N, C, H, W] -> x = u / 127.5 - 1):

    [1, 8, 8] -conv3x3(32)-SiLU-conv3x3(32)-SiLU-maxpool2-> [32, 4, 4]
              -conv3x3(64)-SiLU-conv3x3(64)-SiLU-maxpool2-> [64, 2, 2] -flatten-> 256
              -linear(64)-SiLU-> **features (64-d)** -dropout-linear(10)-> logits

- Inputs larger than 8x8 (the digits at data.resolution 16, 24, 32: nearest-neighbour upsampled copies) are
  brought back to 8x8 by area averaging (``adaptive_avg_pool2d``), which inverts the pixel repetition exactly;
  3-channel inputs are averaged over channels. So one classifier, trained at 8x8, serves every digits resolution.
- Feature dimension 64: the Fréchet distance needs the covariance of the features; the held-out split (the FID
  floor) has only ~270 images, so the dimension must stay well below that for the covariance to be full rank and
  reasonably estimated (Inception's 2048-d would need thousands of images). 64 keeps the classifier accurate
  (>= 95% held-out; measured 97.8%) while 270 >> 64.
- The penultimate layer uses SiLU (not ReLU) so that no feature is identically zero (dead units would give a
  degenerate covariance).

Training (``train_digits_classifier``): Adam (lr 3e-3 with cosine decay to 0, weight decay 5e-4), batch 64,
30 epochs, random +-1 pixel translations (pad by 1 with the background value, random 8x8 crop) as augmentation,
fixed seed -- about 5 s on one CPU thread. Measured held-out accuracy (split_seed 0, 15% held out, 269 images):
97.8% on the continuous digits (98.1% with seed 1), 92.2% on the binarized ones (binarization destroys strokes).
``load_or_train_digits_classifier`` caches the result as a file under ``eval.cache_dir`` keyed by (dataset name,
binarize, resolution, split seed, held-out fraction, classifier seed, ``CLASSIFIER_VERSION``), written atomically
(``data.atomic``: temporary file, fsync, ``os.replace``) and read back with ``torch.load(weights_only=True)``.

``DigitsClassifierFeatures`` wraps a trained classifier as a torch-fidelity feature extractor registered under the
name ``digits-classifier``; it provides ``digits_classifier_64`` (penultimate features: FID, KID, PRC) and
``digits_classifier_logits`` (logits: the "classifier Inception Score", exp E[KL(p(y|x) || p(y))]). torch-fidelity
builds it with the classifier file passed as ``feature_extractor_weights_path``.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.helpers import vassert
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

from data import build_dataset
from data.atomic import atomic_open

__all__ = [
    "CLASSIFIER_VERSION",
    "FEATURE_DIM",
    "FEATURE_NAME",
    "LOGITS_NAME",
    "EXTRACTOR_NAME",
    "DigitsClassifier",
    "DigitsClassifierFeatures",
    "train_digits_classifier",
    "classifier_accuracy",
    "classifier_cache_path",
    "save_digits_classifier",
    "load_digits_classifier",
    "load_or_train_digits_classifier",
    "register_digits_classifier",
    "file_digest",
]

CLASSIFIER_VERSION = 1  # bump whenever the architecture or the training recipe changes (invalidates caches)
INPUT_RESOLUTION = 8
NUM_CLASSES = 10
FEATURE_DIM = 64
EXTRACTOR_NAME = "digits-classifier"
FEATURE_NAME = f"digits_classifier_{FEATURE_DIM}"
LOGITS_NAME = "digits_classifier_logits"
DIGITS_SOURCES = ("digits",)


class DigitsClassifier(nn.Module):
    """The CNN of the module docstring. ``forward(u) -> logits``; ``features_and_logits(u) -> (features, logits)``.

    Input: uint8 images [N, C, H, W] with C in {1, 3} and H = W a multiple of 8, or float images already in [-1, 1].
    """

    def __init__(self, feature_dim: int = FEATURE_DIM, num_classes: int = NUM_CLASSES, dropout: float = 0.2) -> None:
        super().__init__()
        self.feature_dim = int(feature_dim)
        self.num_classes = int(num_classes)
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.SiLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(64, 64, 3, padding=1),
            nn.SiLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 2 * 2, self.feature_dim),
            nn.SiLU(),
        )
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(self.feature_dim, self.num_classes)

    @staticmethod
    def preprocess(images: Tensor) -> Tensor:
        """uint8 [N, C, H, W] -> float32 [N, 1, 8, 8] in [-1, 1] (channel mean, area downsampling to 8x8)."""
        if images.ndim != 4:
            raise ValueError(f"digits classifier expects images [N, C, H, W], got shape {tuple(images.shape)}")
        n, c, h, w = images.shape
        if c not in (1, 3):
            raise ValueError(f"digits classifier expects 1 or 3 channels, got {c} (shape {tuple(images.shape)})")
        if h != w or h % INPUT_RESOLUTION:
            raise ValueError(
                f"digits classifier expects square images whose side is a multiple of {INPUT_RESOLUTION}, "
                f"got {h}x{w}"
            )
        if images.dtype == torch.uint8:
            x = images.to(torch.float32) / 127.5 - 1
        elif images.is_floating_point():
            x = images.to(torch.float32)
        else:
            raise TypeError(f"digits classifier expects uint8 (or float in [-1, 1]) images, got {images.dtype}")
        if c == 3:
            x = x.mean(dim=1, keepdim=True)
        if h != INPUT_RESOLUTION:
            x = F.adaptive_avg_pool2d(x, INPUT_RESOLUTION)
        return x

    def features_and_logits(self, images: Tensor) -> tuple[Tensor, Tensor]:
        features = self.body(self.preprocess(images))
        return features, self.head(self.dropout(features))

    def forward(self, images: Tensor) -> Tensor:
        return self.features_and_logits(images)[1]


def _images_and_labels(dataset: Any) -> tuple[Tensor, Tensor]:
    """(uint8 [N, C, H, W], int64 [N]) from an ImageDataset (all_images/all_labels) or an (images, labels) pair."""
    if hasattr(dataset, "all_images") and hasattr(dataset, "all_labels"):
        images, labels = dataset.all_images(), dataset.all_labels()
    elif isinstance(dataset, (tuple, list)) and len(dataset) == 2:
        images, labels = dataset
    else:
        raise TypeError(
            "expected an ImageDataset (with all_images()/all_labels()) or an (images, labels) pair, "
            f"got {type(dataset).__name__}"
        )
    images, labels = torch.as_tensor(images), torch.as_tensor(labels, dtype=torch.int64)
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"expected uint8 images [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
    if labels.shape != (images.shape[0],) or int(labels.min()) < 0 or int(labels.max()) >= NUM_CLASSES:
        raise ValueError(
            f"expected {images.shape[0]} class labels in 0..{NUM_CLASSES - 1}, got shape {tuple(labels.shape)} "
            f"with range [{int(labels.min())}, {int(labels.max())}] (is the dataset unlabeled?)"
        )
    return images, labels


def _random_shift(x: Tensor, generator: torch.Generator) -> Tensor:
    """Translate each image by an independent random offset in {-1, 0, 1}^2, filling with the background (-1)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dy = torch.randint(0, 3, (n,), generator=generator)
    dx = torch.randint(0, 3, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None].expand(n, 1, h, w + 2)
    shifted = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :].expand(n, 1, h, w)
    return shifted.gather(3, cols)


def train_digits_classifier(
    dataset: Any, seed: int = 0, *, epochs: int = 30, batch_size: int = 64, lr: float = 3e-3, weight_decay: float = 5e-4
) -> DigitsClassifier:
    """Train a ``DigitsClassifier`` on ``dataset`` (an ImageDataset or an (images, labels) pair) on the CPU.

    Deterministic for a given seed (on one machine); leaves the global RNG state untouched. Returns the model in
    eval mode. Measure its accuracy on the held-out split with ``classifier_accuracy``.
    """
    images, labels = _images_and_labels(dataset)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitsClassifier()
    generator = torch.Generator().manual_seed(seed + 1)
    x_all = DigitsClassifier.preprocess(images)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    total_steps = epochs * math.ceil(len(x_all) / batch_size)
    step = 0
    model.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 2)  # dropout masks
        for _ in range(epochs):
            order = torch.randperm(len(x_all), generator=generator)
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                for group in optimizer.param_groups:  # cosine decay from lr to 0
                    group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total_steps))
                step += 1
                x = _random_shift(x_all[idx], generator)
                loss = F.cross_entropy(model.head(model.dropout(model.body(x))), labels[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    model.eval()
    model.requires_grad_(False)
    return model


@torch.no_grad()
def classifier_accuracy(model: DigitsClassifier, dataset: Any) -> float:
    """Fraction of ``dataset``'s images (ImageDataset or (images, labels) pair) classified correctly."""
    images, labels = _images_and_labels(dataset)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for start in range(0, len(images), 1024):
        logits = model(images[start : start + 1024].to(device))
        correct += int((logits.argmax(dim=1).cpu() == labels[start : start + 1024]).sum())
    model.train(was_training)
    return correct / len(images)


def _cfg_get(cfg: Any, key: str, default: Any = None) -> Any:
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def classifier_cache_path(data_cfg: Any, cache_dir: str | os.PathLike, seed: int = 0) -> str:
    """Where the classifier for ``data_cfg`` lives: the file name holds every field the trained weights depend on."""
    name = str(_cfg_get(data_cfg, "name", "digits"))
    binarize = int(bool(_cfg_get(data_cfg, "binarize", False)))
    resolution = _cfg_get(data_cfg, "resolution", INPUT_RESOLUTION) or INPUT_RESOLUTION
    split_seed = int(_cfg_get(data_cfg, "split_seed", 0))
    heldout = float(_cfg_get(data_cfg, "heldout_fraction", 0.15))
    fname = (
        f"{name}-bin{binarize}-res{int(resolution)}-split{split_seed}-heldout{heldout:g}"
        f"-seed{int(seed)}-v{CLASSIFIER_VERSION}.pt"
    )
    return os.path.join(os.fspath(cache_dir), "digits_classifier", fname)


def save_digits_classifier(model: DigitsClassifier, path: str | os.PathLike, meta: Mapping[str, Any]) -> None:
    """Write ``{"version", "state_dict", "meta"}`` atomically (``data.atomic.atomic_open``)."""
    payload = {
        "version": CLASSIFIER_VERSION,
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "meta": dict(meta),
    }
    with atomic_open(path, "wb") as f:
        torch.save(payload, f)


def load_digits_classifier(path: str | os.PathLike) -> tuple[DigitsClassifier, dict]:
    """Load a classifier file written by ``save_digits_classifier`` -> (model in eval mode, meta dict)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"digits classifier file not found: {path}")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("version") != CLASSIFIER_VERSION:
        found = payload.get("version") if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(
            f"{path} is not a digits classifier of version {CLASSIFIER_VERSION} (found {found}); "
            "delete it to retrain"
        )
    model = DigitsClassifier()
    model.load_state_dict(payload["state_dict"])
    model.eval()
    model.requires_grad_(False)
    return model, dict(payload.get("meta", {}))


def load_or_train_digits_classifier(
    data_cfg: Any, cache_dir: str | os.PathLike, seed: int = 0, *, verbose: bool = False
) -> tuple[str, dict]:
    """Path of the cached classifier for this digits config (training and caching it on first use) and its meta.

    Trains on ``build_dataset(data_cfg, split="train")`` and records the accuracy on the held-out ``"test"`` split
    in the meta (``heldout_accuracy``). Only digits datasets (``data.source: digits``) are supported.
    """
    source = _cfg_get(data_cfg, "source", "digits")
    if source not in DIGITS_SOURCES:
        raise ValueError(
            f"the digits-classifier feature extractor needs a digits dataset (data.source in {DIGITS_SOURCES}), "
            f"got data.source={source!r}; use eval.feature_extractor=inception-v3-compat for other data"
        )
    path = classifier_cache_path(data_cfg, cache_dir, seed)
    if os.path.isfile(path):
        return path, load_digits_classifier(path)[1]
    train_set = build_dataset(data_cfg, split="train")
    heldout_set = build_dataset(data_cfg, split="test")
    model = train_digits_classifier(train_set, seed)
    meta = {
        "dataset": str(_cfg_get(data_cfg, "name", "digits")),
        "binarize": bool(_cfg_get(data_cfg, "binarize", False)),
        "split_seed": int(_cfg_get(data_cfg, "split_seed", 0)),
        "heldout_fraction": float(_cfg_get(data_cfg, "heldout_fraction", 0.15)),
        "seed": int(seed),
        "num_train": int(len(train_set.all_labels())),
        "num_heldout": int(len(heldout_set.all_labels())),
        "train_accuracy": classifier_accuracy(model, train_set),
        "heldout_accuracy": classifier_accuracy(model, heldout_set),
    }
    save_digits_classifier(model, path, meta)
    if verbose:
        print(
            f"trained digits classifier -> {path} (held-out accuracy {meta['heldout_accuracy']:.2%} on "
            f"{meta['num_heldout']} images)"
        )
    return path, meta


def file_digest(path: str | os.PathLike, length: int = 12) -> str:
    """First ``length`` hex digits of the SHA-256 of a file (identifies a weights file in cache names)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:length]


class DigitsClassifierFeatures(FeatureExtractorBase):
    """torch-fidelity feature extractor ``digits-classifier`` over a trained ``DigitsClassifier``.

    Built by torch-fidelity as ``cls(name, features_list, **calculate_metrics_kwargs)``; the classifier file comes in
    ``feature_extractor_weights_path``. Input: uint8 [N, C, H, W] (C = 1 or 3, H = W a multiple of 8).
    """

    def __init__(
        self, name: str, features_list: list[str], feature_extractor_weights_path: str | None = None, **kwargs: Any
    ) -> None:
        super().__init__(name, features_list)
        if feature_extractor_weights_path is None:
            raise ValueError(
                "the digits-classifier feature extractor needs the classifier file in feature_extractor_weights_path "
                "(see evaluation.digits_classifier.load_or_train_digits_classifier)"
            )
        self.classifier, self.meta = load_digits_classifier(feature_extractor_weights_path)

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return FEATURE_NAME, LOGITS_NAME

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        layers = {"isc": LOGITS_NAME, "fid": FEATURE_NAME, "kid": FEATURE_NAME, "prc": FEATURE_NAME}
        if metric not in layers:
            raise ValueError(f"digits-classifier has no feature layer for metric {metric!r}; valid: {list(layers)}")
        return layers[metric]

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    @staticmethod
    def get_dummy_input_for_compile() -> Tensor:
        return torch.zeros(1, 1, INPUT_RESOLUTION, INPUT_RESOLUTION, dtype=torch.uint8)

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        vassert(torch.is_tensor(x) and x.dtype == torch.uint8, "Expecting images as torch.Tensor with dtype=uint8")
        features, logits = self.classifier.features_and_logits(x)
        out = {FEATURE_NAME: features.to(torch.float32), LOGITS_NAME: logits.to(torch.float32)}
        return tuple(out[name] for name in self.features_list)


def register_digits_classifier() -> None:
    """Register ``DigitsClassifierFeatures`` with torch-fidelity as ``digits-classifier`` (idempotent).

    A second call, or a re-import of this module under another name (which creates a new class object), replaces the
    entry of our own class; a foreign class already registered under the name is an error.
    """
    existing = FEATURE_EXTRACTORS_REGISTRY.get(EXTRACTOR_NAME)
    if existing is DigitsClassifierFeatures:
        return
    if existing is None:
        register_feature_extractor(EXTRACTOR_NAME, DigitsClassifierFeatures)
        return
    if existing.__qualname__ == DigitsClassifierFeatures.__qualname__ and existing.__module__.endswith(
        "digits_classifier"
    ):
        FEATURE_EXTRACTORS_REGISTRY[EXTRACTOR_NAME] = DigitsClassifierFeatures
        return
    raise ValueError(
        f"torch-fidelity already has a different feature extractor registered as {EXTRACTOR_NAME!r}: "
        f"{existing.__module__}.{existing.__qualname__}"
    )


register_digits_classifier()
