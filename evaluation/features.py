"""Feature extractors for the sample metrics, computed through torch-fidelity.

Which features (``eval.feature_extractor``):

- ``inception-v3-compat``: torch-fidelity's port of the TF 2015 Inception-v3 (pool3, 2048-d) -- the standard FID
  for natural images (CIFAR-10, image folders); grayscale is repeated to 3 channels. Reported as ``fid_inception``.
- ``digits-classifier``: the penultimate 64-d features of a small CNN trained once on the training split of the
  8x8 digits (``evaluation/digits_classifier.py``). This is the usual "classifier FID" of MNIST-like data; it is
  reported as ``fid_digits_classifier`` / "classifier-FID (digits-classifier features)", a different scale from
  Inception FID, and is never to be compared with one.
- ``dinov2-vit-l-14-edm2``: DINOv2 ViT-L/14 CLS features (1024-d) with EDM2's preprocessing
  (``evaluation/dinov2.py``); ``fid_dinov2`` is FD-DINOv2, and KID / precision-recall in these features are
  ``kid_dinov2_*`` / ``prc_dinov2_*`` (no IS). ``eval.metrics=[..., fd_dinov2]`` adds FD-DINOv2 beside any extractor.
- ``auto`` (default): digits-classifier for the digits datasets (data.source digits or data.name digits /
  binary_digits), Inception otherwise.

IS uses the extractor's logits (for the digits classifier: the "classifier IS"); precision/recall (Kynkäänniemi et
al. 2019, "Improved Precision and Recall Metric for Assessing Generative Models", arXiv 1904.06991, k = 3) use the
same features as FID rather than VGG-16.

**Weights.** ``eval.feature_extractor_weights_path`` names a local copy of the Inception weights; without it the
published file is fetched into torch hub's cache (``<torch hub dir>/checkpoints``) the first time it is needed, under
a socket timeout so that a dead network cannot hang an evaluation, and an unreachable network is an
``InceptionWeightsUnavailableError`` saying what to download and where to put it. ``probe_extractor`` builds the
extractor from its weights and runs it on two blank images: the evaluation's preflight (``evaluation/preflight.py``)
calls it, so a missing, unreadable or wrong weights file fails in about a second, before any sampling.

**Identity.** Every extractor has an id: its name and the first 12 hex digits of the SHA-256 of its weights file
(``extractor_weights``: ``inception-<digest>``, ``digits-classifier-<digest>``), the same whichever way the file was
found (hub cache or explicit path). The id goes into cache names and reference files, so that statistics of other
weights are never reused by mistake. ``same_weights`` compares two ids on the digits they share (at least 8): the
ids of older reference files, ``inception-6726825d`` for the hub's file, carry the 8 digits that torch hub puts in
the file's name (``weights-inception-2015-12-05-6726825d.pth``), which are the start of the same SHA-256.

Registering another extractor (``WEIGHTS_RESOLVERS``): a function ``(settings, data_cfg) -> weights file or None``
under the extractor's torch-fidelity name; the id, the probe and the preflight then work for it unchanged.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable, Iterator, Mapping
from typing import Any
from urllib.error import URLError

import torch
from torch import Tensor
from torch.utils.data import Dataset
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

from configs import to_plain_dict
from evaluation.digits_classifier import file_digest, load_or_train_digits_classifier, register_digits_classifier
from evaluation.dinov2 import dinov2_weights_file
from evaluation.settings import (
    DIGITS_DATASETS,
    DIGITS_EXTRACTOR,
    DINOV2_EXTRACTOR,
    INCEPTION_EXTRACTOR,
    VALID_EXTRACTORS,
    eval_settings,
)
from training.distributed import resolve_device

__all__ = [
    "INCEPTION_WEIGHTS_URL",
    "INCEPTION_PUBLISHED_DIGEST",
    "InceptionWeightsUnavailableError",
    "UInt8Images",
    "resolve_feature_extractor",
    "extractor_for",
    "image_set_shape",
    "weights_digest",
    "weights_id",
    "same_weights",
    "WEIGHTS_RESOLVERS",
    "inception_weights_file",
    "is_published_inception",
    "extractor_weights",
    "probe_extractor",
    "inception_download_guard",
    "eval_device",
    "extract_features",
]

INCEPTION_WEIGHTS_URL = URL_INCEPTION_V3
# torch hub names a file <name>-<first 8 hex digits of its SHA-256>.<ext>: the published weights' digest starts so.
INCEPTION_PUBLISHED_DIGEST = os.path.basename(INCEPTION_WEIGHTS_URL).rsplit("-", 1)[-1].split(".")[0]
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
    """uint8 [C, H, W] items from a uint8 [N, C, H, W] tensor or an ImageDataset (un-flipped images only).

    ``progress``: a label; then a progress bar (images/s and ETA; tqdm, shown only on a terminal) counts the images
    as the feature extractor reads them. It opens at the first image read, so a set whose features come from
    torch-fidelity's cache shows none. torch-fidelity reads the items in this process (``save_cpu_ram=True``).
    """

    def __init__(self, source: Any, to_rgb: bool, progress: str | None = None) -> None:
        self.source = source
        self.to_rgb = to_rgb
        self.progress = progress
        self._bar: Any = None
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
        if self.progress is not None:
            self._tick()
        return image

    def _tick(self) -> None:
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=self.length, desc=self.progress, unit="img", dynamic_ncols=True, leave=False,
                             disable=None, mininterval=1.0)
        self._bar.update(1)
        if self._bar.n >= self.length:
            self._bar.close()
            self._bar = None


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


def weights_id(extractor: str, path: str) -> str:
    """``<extractor tag>-<first 12 hex digits of the weights file's SHA-256>`` (``inception-...``,
    ``digits-classifier-...``)."""
    tag = "inception" if extractor == INCEPTION_EXTRACTOR else extractor
    return f"{tag}-{weights_digest(path)}"


def same_weights(recorded_id: str | None, current_id: str | None) -> bool:
    """Whether two extractor ids name the same weights: the same extractor and digests that agree on all the digits
    they share, at least 8 (an older id may carry fewer: ``inception-6726825d``, see the module docstring)."""
    if not recorded_id or not current_id:
        return False
    name_a, _, hex_a = str(recorded_id).rpartition("-")
    name_b, _, hex_b = str(current_id).rpartition("-")
    n = min(len(hex_a), len(hex_b))
    hexdigits = set("0123456789abcdef")
    return (name_a == name_b and n >= 8 and hex_a[:n] == hex_b[:n]
            and set(hex_a.lower()) <= hexdigits and set(hex_b.lower()) <= hexdigits)


def is_published_inception(path: str) -> bool:
    """Whether ``path`` holds torch-fidelity's published Inception weights (by the SHA-256 prefix in its name)."""
    return weights_digest(path).startswith(INCEPTION_PUBLISHED_DIGEST)


def inception_weights_file(settings: Mapping[str, Any], data_cfg: Any = None) -> str:
    """The Inception weights file: ``eval.feature_extractor_weights_path``, else torch hub's cached copy of the
    published file, downloaded first if missing (``InceptionWeightsUnavailableError`` when that fails)."""
    explicit = settings.get("feature_extractor_weights_path")
    if explicit is not None:
        path = os.path.expanduser(str(explicit))
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"eval.feature_extractor_weights_path={path} does not exist; it should be the file "
                f"{os.path.basename(INCEPTION_WEIGHTS_URL)} from {INCEPTION_WEIGHTS_URL}"
            )
        return path
    hub = _inception_hub_file()
    if not os.path.isfile(hub):
        _download_inception_weights()
    return hub


def _download_inception_weights() -> None:
    """Fetch the published Inception weights into torch hub's cache, as torch-fidelity would, under a timeout."""
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    try:
        with _socket_timeout(DOWNLOAD_TIMEOUT_S):
            tf_inception.load_state_dict_from_url(INCEPTION_WEIGHTS_URL, progress=False, map_location="cpu")
    except (URLError, OSError, RuntimeError, ValueError) as err:
        raise InceptionWeightsUnavailableError(_inception_unavailable_message(err)) from err
    if not os.path.isfile(_inception_hub_file()):
        raise InceptionWeightsUnavailableError(_inception_unavailable_message(
            FileNotFoundError(f"no file at {_inception_hub_file()} after the download")))


def _digits_classifier_file(settings: Mapping[str, Any], data_cfg: Any) -> str:
    """The digits classifier of ``data_cfg`` (trained and cached on first use)."""
    if data_cfg is None:
        raise ValueError(
            f"the {DIGITS_EXTRACTOR} feature extractor needs data_cfg (to train or load the classifier of that "
            "dataset) or classifier_path"
        )
    cache_dir = os.path.expanduser(str(settings["cache_dir"]))
    return str(load_or_train_digits_classifier(data_cfg, cache_dir)[0])


# torch-fidelity extractor name -> (settings, data_cfg) -> its weights file (None: the extractor fetches its own).
WEIGHTS_RESOLVERS: dict[str, Callable[[Mapping[str, Any], Any], str | None]] = {
    DIGITS_EXTRACTOR: _digits_classifier_file,
    INCEPTION_EXTRACTOR: inception_weights_file,
    DINOV2_EXTRACTOR: dinov2_weights_file,  # eval.dinov2_weights_path (evaluation/dinov2.py)
}


def extractor_weights(extractor: str, settings: Mapping[str, Any], data_cfg: Any,
                      classifier_path: str | None) -> tuple[str | None, str]:
    """(weights file for torch-fidelity, the extractor's id ``weights_id``); ``classifier_path`` overrides the digits
    classifier's file. An extractor without a resolver (torch-fidelity fetches its weights itself) is identified by
    its name alone."""
    if extractor == DIGITS_EXTRACTOR and classifier_path is not None:
        path: str | None = str(classifier_path)
    else:
        resolver = WEIGHTS_RESOLVERS.get(extractor)
        path = None if resolver is None else resolver(settings, data_cfg)
    if path is None:
        return None, extractor
    return path, weights_id(extractor, path)


def probe_extractor(extractor: str, settings: Mapping[str, Any], data_cfg: Any = None,
                    chw: tuple[int, int, int] | None = None) -> dict[str, Any]:
    """Build ``extractor`` from its weights on the CPU and run it on two blank images of shape ``chw`` (default
    3x64x64): a missing, unreadable or foreign weights file, or images the extractor cannot take, fail here.

    Returns ``{"feature_extractor", "extractor_id", "weights_path", "feature_dim"}``.
    """
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
    from torch_fidelity.utils import create_feature_extractor

    weights_path, extractor_id = extractor_weights(extractor, settings, data_cfg, None)
    c, h, w = chw or (3, 64, 64)
    if extractor == INCEPTION_EXTRACTOR and c not in (1, 3):
        raise ValueError(f"Inception features need 1- or 3-channel images, got {c} channels")
    layer = FEATURE_EXTRACTORS_REGISTRY[extractor].get_default_feature_layer_for_metric("fid")
    images = UInt8Images(torch.zeros(2, c, h, w, dtype=torch.uint8), extractor == INCEPTION_EXTRACTOR)
    try:
        with inception_download_guard(extractor, weights_path):
            model = create_feature_extractor(extractor, [layer], cuda=False,
                                             feature_extractor_weights_path=weights_path, verbose=False)
        with torch.no_grad():
            features = model(torch.stack([images[0], images[1]]))[0]
    except InceptionWeightsUnavailableError:
        raise
    except Exception as err:  # noqa: BLE001 - whatever the library raises, name the file and the setting
        source = f"the weights file {weights_path}" if weights_path else "its default weights"
        raise ValueError(f"the {extractor} feature extractor could not be built from {source} and run on "
                         f"{c}x{h}x{w} images ({type(err).__name__}: {err}); check "
                         "eval.feature_extractor_weights_path / eval.feature_extractor") from err
    return {"feature_extractor": extractor, "extractor_id": extractor_id, "weights_path": weights_path,
            "feature_dim": int(features.reshape(2, -1).shape[1])}


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
    progress: str | None = None,
) -> Tensor:
    """Features [N, F] (float32, CPU) of uint8 images [N, C, H, W] (or an ImageDataset) from the FID layer of the
    extractor (``layer`` picks another one, e.g. the logits), computed by torch-fidelity's extractor. ``progress``:
    the label of a progress bar over the images (``UInt8Images``)."""
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
    feats = get_featuresdict_from_dataset(UInt8Images(images, extractor == INCEPTION_EXTRACTOR, progress), model,
                                          int(settings["batch"]), device.type == "cuda", True, False)
    return feats[layer].float().cpu()
