"""Feature extractors for the sample metrics, computed through torch-fidelity.

Which features (``eval.feature_extractor``):

- ``inception-v3-compat``: torch-fidelity's port of the TF 2015 Inception-v3 (pool3, 2048-d) -- the standard FID
  for natural images (CIFAR-10, image folders); grayscale is repeated to 3 channels. Reported as ``fid_inception``.
- ``digits-classifier``: the penultimate 64-d features of a small CNN trained once on the training split of the
  8x8 digits (``evaluation/digits_classifier.py``). This is the usual "classifier FID" of MNIST-like data; it is
  reported as ``fid_digits_classifier`` / "classifier-FID (digits-classifier features)", a different scale from
  Inception FID, and is never to be compared with one.
- ``auto`` (default): digits-classifier for the digits datasets (data.source digits or data.name digits /
  binary_digits), Inception otherwise.

IS uses the extractor's logits (for the digits classifier: the "classifier IS"); precision/recall (Kynkäänniemi et
al. 2019, "Improved Precision and Recall Metric for Assessing Generative Models", arXiv 1904.06991, k = 3) use the
same features as FID rather than VGG-16.

The Inception weights are downloaded by torch hub on first use, under a socket timeout so that a dead network
cannot hang an evaluation; without a network, ``eval.feature_extractor_weights_path`` names a local copy, and the
error says so (``InceptionWeightsUnavailableError``). Every extractor has an id naming it and the digest of its
weights file (``extractor_weights``), which goes into cache names and reference files so that statistics of other
weights are never reused by mistake.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.error import URLError

import torch
from torch import Tensor
from torch.utils.data import Dataset
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

from configs import to_plain_dict
from evaluation.digits_classifier import file_digest, load_or_train_digits_classifier, register_digits_classifier
from evaluation.settings import (
    DIGITS_DATASETS,
    DIGITS_EXTRACTOR,
    INCEPTION_EXTRACTOR,
    VALID_EXTRACTORS,
    eval_settings,
)
from training.distributed import resolve_device

__all__ = [
    "INCEPTION_WEIGHTS_URL",
    "InceptionWeightsUnavailableError",
    "UInt8Images",
    "resolve_feature_extractor",
    "extractor_for",
    "image_set_shape",
    "weights_digest",
    "extractor_weights",
    "inception_download_guard",
    "eval_device",
    "extract_features",
]

INCEPTION_WEIGHTS_URL = URL_INCEPTION_V3
DOWNLOAD_TIMEOUT_S = 60.0  # socket timeout while torch hub fetches the Inception weights: a dead network cannot hang us

register_digits_classifier()  # idempotent; importing evaluation.digits_classifier already did it


class InceptionWeightsUnavailableError(RuntimeError):
    """The Inception-v3 weights could not be downloaded and no local file was given."""


def resolve_feature_extractor(choice: str, data_cfg: Any = None, dataset_name: str | None = None) -> str:
    """``auto`` -> ``digits-classifier`` for the digits datasets, ``inception-v3-compat`` otherwise; checks names."""
    choice = str(choice)
    if choice not in VALID_EXTRACTORS:
        raise ValueError(f"unknown eval.feature_extractor {choice!r}; valid: {', '.join(VALID_EXTRACTORS)}")
    if choice != "auto":
        return choice
    data = to_plain_dict(data_cfg)
    name = dataset_name if dataset_name is not None else data.get("name")
    if name is None and not data:
        raise ValueError(
            "eval.feature_extractor=auto needs the dataset (pass data_cfg or dataset_name), or name the extractor: "
            f"{DIGITS_EXTRACTOR} or {INCEPTION_EXTRACTOR}"
        )
    if data.get("source") == "digits" or name in DIGITS_DATASETS:
        return DIGITS_EXTRACTOR
    return INCEPTION_EXTRACTOR


def extractor_for(choice: str, data_cfg: Any, images: Any) -> str:
    """``resolve_feature_extractor`` with the dataset named by ``data_cfg``, else by the image set (``.name``)."""
    dataset_name = to_plain_dict(data_cfg).get("name") if data_cfg is not None else getattr(images, "name", None)
    return resolve_feature_extractor(choice, data_cfg, dataset_name)


class UInt8Images(Dataset):
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


def image_set_shape(images: Any, what: str) -> tuple[int, tuple[int, int, int]]:
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


_DIGEST_MEMO: dict[tuple[str, int, int], str] = {}


def weights_digest(path: str) -> str:
    """``file_digest`` of a file, memoised by (path, size, modification time)."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _DIGEST_MEMO:
        _DIGEST_MEMO[key] = file_digest(path)
    return _DIGEST_MEMO[key]


def extractor_weights(extractor: str, settings: Mapping[str, Any], data_cfg: Any,
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
        return str(classifier_path), f"{DIGITS_EXTRACTOR}-{weights_digest(str(classifier_path))}"
    weights_path = settings.get("feature_extractor_weights_path")
    if weights_path is not None:
        weights_path = os.path.expanduser(str(weights_path))
        if not os.path.isfile(weights_path):
            raise FileNotFoundError(
                f"eval.feature_extractor_weights_path={weights_path} does not exist; it should be the file "
                f"{os.path.basename(INCEPTION_WEIGHTS_URL)} from {INCEPTION_WEIGHTS_URL}"
            )
        return weights_path, f"inception-{weights_digest(weights_path)}"
    return None, "inception-" + os.path.basename(INCEPTION_WEIGHTS_URL).split("-")[-1].split(".")[0]


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


@contextlib.contextmanager
def inception_download_guard(extractor: str, weights_path: str | None) -> Iterator[None]:
    """A socket timeout while torch hub may download the Inception weights, and a clear error if it cannot."""
    missing = extractor == INCEPTION_EXTRACTOR and weights_path is None and not os.path.isfile(_inception_hub_file())
    try:
        with _socket_timeout(DOWNLOAD_TIMEOUT_S) if missing else contextlib.nullcontext():
            yield
    except (URLError, OSError, RuntimeError) as err:
        if missing and not os.path.isfile(_inception_hub_file()):
            raise InceptionWeightsUnavailableError(_inception_unavailable_message(err)) from err
        raise


def eval_device(device: str | torch.device | None) -> torch.device:
    """Where features are computed: ``device``, or (None) CUDA when available, else the CPU."""
    return resolve_device("auto" if device is None else device)


def extract_features(
    images: Any, *, feature_extractor: str = "auto", eval_cfg: Any = None, data_cfg: Any = None,
    classifier_path: str | None = None, device: str | torch.device | None = None, layer: str | None = None,
) -> Tensor:
    """Features [N, F] (float32, CPU) of uint8 images [N, C, H, W] (or an ImageDataset) from the FID layer of the
    extractor (``layer`` picks another one, e.g. the logits), computed by torch-fidelity's extractor."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
    from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset

    settings = eval_settings(eval_cfg)
    n, (channels, _, _) = image_set_shape(images, "images")
    extractor = extractor_for(feature_extractor, data_cfg, images)
    if extractor == INCEPTION_EXTRACTOR and channels not in (1, 3):
        raise ValueError(f"Inception features need 1- or 3-channel images, got {channels} channels")
    weights_path, _ = extractor_weights(extractor, settings, data_cfg, classifier_path)
    layer = layer or FEATURE_EXTRACTORS_REGISTRY[extractor].get_default_feature_layer_for_metric("fid")
    device = eval_device(device)
    with inception_download_guard(extractor, weights_path):
        model = create_feature_extractor(extractor, [layer], cuda=device.type == "cuda",
                                         feature_extractor_weights_path=weights_path, verbose=False)
    feats = get_featuresdict_from_dataset(UInt8Images(images, extractor == INCEPTION_EXTRACTOR), model,
                                          int(settings["batch"]), device.type == "cuda", True, False)
    return feats[layer].float().cpu()
