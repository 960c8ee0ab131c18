"""Datasets and the data order: ``build_dataset(cfg.data, split)`` picks a source from the ``SOURCES`` registry.

Sources (``data.source``): ``digits`` (scikit-learn 8x8 digits, optionally binarized / upsampled; no download),
``cifar10`` (the official python archive, or a directory prepared from it), ``folder`` (a directory tree of images or
an EDM-style zip), ``prepared`` (a directory written by ``python -m data.prepare``: memory-mapped pixels such as
ImageNet-64, or SD-VAE latents such as ImageNet-256/512). Pixel datasets yield ``(uint8 [C, H, W], label)`` items,
latent datasets ``(float32 [C, h, w], label)`` already in model space (``dataset.latent`` is True); ``to_model_space``
/ ``to_uint8`` convert pixels to and from [-1, 1]. ``InfiniteSampler`` (``data.order``) is the data order: the
resumable, DDP-sharded index stream of the training loop; ``build_augment_pipe`` (``data.augment``) EDM's geometric
augmentation; ``LatentCodec`` decodes generated latents to images.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from configs import build_from_registry

from .augment import AugmentPipe, build_augment_pipe
from .cifar10 import Cifar10Dataset, build_cifar10
from .dataset import ImageDataset, cfg_to_dict, to_model_space, to_uint8
from .digits import DigitsDataset, build_digits
from .image_folder import ImageFolderDataset, build_folder
from .latents import LatentCodec
from .order import InfiniteSampler
from .prepared import PreparedDataset, build_prepared

__all__ = [
    "SOURCES",
    "SPLITS",
    "build_dataset",
    "to_model_space",
    "to_uint8",
    "ImageDataset",
    "DigitsDataset",
    "Cifar10Dataset",
    "ImageFolderDataset",
    "PreparedDataset",
    "InfiniteSampler",
    "AugmentPipe",
    "build_augment_pipe",
    "LatentCodec",
]

SOURCES: dict[str, Callable[[dict, str], ImageDataset]] = {
    "digits": build_digits,
    "cifar10": build_cifar10,
    "folder": build_folder,
    "prepared": build_prepared,
}
SPLITS = ("train", "test")


def build_dataset(data_cfg: Any, split: str = "train") -> ImageDataset:
    """The dataset described by a data config group (``configs/data/*.yaml``) for ``split`` in {"train", "test"}.

    "test" is the held-out split: the digits' fixed stratified held-out part, CIFAR-10's test_batch, or for the
    folder and prepared sources (and a prepared CIFAR-10) the dataset at ``data.test_path``.
    """
    cfg = cfg_to_dict(data_cfg)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    return build_from_registry("data", SOURCES, cfg, key="source", whole_config=True, split=split)

