"""Datasets and sampling for sigmalab: ``build_dataset(cfg.data, split)`` picks a source from the ``SOURCES`` registry.

Sources (``data.source``): ``digits`` (scikit-learn 8x8 digits, optionally binarized / upsampled; no download),
``cifar10`` (the official python archive), ``folder`` (a directory tree of images or an EDM-style zip). Every dataset
yields ``(uint8 [C, H, W], label)`` items; ``to_model_space`` / ``to_uint8`` convert to and from [-1, 1].
``InfiniteSampler`` is the resumable DDP-sharded index stream used by the training loop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .cifar10 import Cifar10Dataset, build_cifar10
from .dataset import ImageDataset, cfg_to_dict, to_model_space, to_uint8
from .digits import DigitsDataset, build_digits
from .image_folder import ImageFolderDataset, build_folder
from .sampler import InfiniteSampler

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
    "InfiniteSampler",
]

SOURCES: dict[str, Callable[[dict, str], ImageDataset]] = {
    "digits": build_digits,
    "cifar10": build_cifar10,
    "folder": build_folder,
}
SPLITS = ("train", "test")


def build_dataset(data_cfg: Any, split: str = "train") -> ImageDataset:
    """The dataset described by a data config group (``configs/data/*.yaml``) for ``split`` in {"train", "test"}.

    "test" is the held-out split: the digits' fixed stratified held-out part, CIFAR-10's test_batch, or for the
    folder source the images at ``data.test_path``.
    """
    cfg = cfg_to_dict(data_cfg)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    source = cfg.get("source")
    if source not in SOURCES:
        raise ValueError(f"unknown data.source {source!r}; valid: {', '.join(SOURCES)}")
    return SOURCES[source](cfg, split)
