"""The image-dataset base class shared by every data source, the pixel encoding and the config helpers.

Pixel convention (as EDM): datasets hand out 8-bit images as ``uint8 [C, H, W]``; the model works in [-1, 1] with

    x = u / 127.5 - 1                          (to_model_space)
    u = floor(clamp(x * 127.5 + 128, 0, 255))  (to_uint8)

so that ``to_uint8(to_model_space(u)) == u`` for every u in 0..255 (``u / 127.5 - 1`` maps back to ``u + 0.5`` up
to float rounding, and the floor removes the 0.5). Labels are int64 class indices, or -1 where the dataset is used
unconditionally. Horizontal flips (``data.xflip``) double the dataset as in EDM: items N..2N-1 are the mirrored
copies of items 0..N-1.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from torch.utils.data import Dataset

__all__ = ["ImageDataset", "InMemoryImageDataset", "cfg_to_dict", "check_config_value", "to_model_space", "to_uint8"]


def to_model_space(images: Tensor) -> Tensor:
    """uint8 images -> float32 in [-1, 1] by ``u / 127.5 - 1``; float tensors (latents) -> float32, values unchanged."""
    if images.dtype == torch.uint8:
        return images.to(torch.float32) / 127.5 - 1
    if images.is_floating_point():
        return images.to(torch.float32)
    raise TypeError(f"to_model_space expects uint8 images or a float tensor, got dtype {images.dtype}")


def to_uint8(images: Tensor) -> Tensor:
    """Model-space images in [-1, 1] -> uint8 by ``floor(clamp(x * 127.5 + 128, 0, 255))`` (values outside clip)."""
    if not images.is_floating_point():
        raise TypeError(f"to_uint8 expects a float tensor in model space [-1, 1], got dtype {images.dtype}")
    # After the clamp every value is >= 0, so the truncating cast is a floor.
    return (images.to(torch.float32) * 127.5 + 128).clamp(0, 255).to(torch.uint8)


def cfg_to_dict(data_cfg: Any) -> dict:
    """A plain dict of a data config (an OmegaConf DictConfig or any mapping), interpolations resolved.

    Mandatory-but-unset values (OmegaConf's ``???``) come back as None, so callers test one thing.
    """
    if isinstance(data_cfg, DictConfig):
        data_cfg = OmegaConf.to_container(data_cfg, resolve=True, throw_on_missing=False)
    if not isinstance(data_cfg, Mapping):
        raise TypeError(f"data config must be a mapping (dict or DictConfig), got {type(data_cfg).__name__}")
    return {k: (None if v == "???" else v) for k, v in data_cfg.items()}


def check_config_value(field: str, configured: Any, found: Any, where: str = "the data") -> None:
    """Raise ValueError naming ``data.<field>`` when the configured value disagrees with the value found in the data."""
    if configured is not None and configured != found:
        raise ValueError(f"data.{field}={configured!r} but {where} has {field}={found!r}; set data.{field}={found!r}")


class ImageDataset(Dataset):
    """Base of every data source: ``(uint8 [C, H, W] image, int label)`` items, optional x-flip doubling.

    Subclasses implement ``_load_image(raw_index) -> uint8 Tensor [C, H, W]`` (un-flipped) and pass the source's
    labels (int64 [N], -1 where the source has none) to ``__init__``.

    Attributes:
        name: the config's ``data.name``.
        resolution, num_channels: image size H = W and channel count C.
        label_dim: number of classes the model is conditioned on; 0 when ``cond`` is false (labels are then -1).
        has_labels: whether the source carries class labels at all (independent of ``cond``).
        num_classes: number of classes in the source (0 when unlabeled).
        binary: True when every pixel is 0 or 255 (the binarized digits).
        xflip: whether items N..2N-1 are the mirrored copies of 0..N-1.
        num_images: N, the number of distinct (un-flipped) images.
        latent: True for datasets of VAE latents (float32 items in model space, see ``data.prepared``); they also
            set ``latent_info`` (what ``data.latents.LatentCodec.from_info`` needs to decode samples).
    """

    latent: bool = False
    latent_info: dict | None = None

    def __init__(
        self,
        *,
        name: str,
        resolution: int,
        num_channels: int,
        labels: Tensor | np.ndarray | None,
        num_images: int,
        cond: bool = False,
        xflip: bool = False,
        binary: bool = False,
        num_classes: int | None = None,
    ) -> None:
        if num_images <= 0:
            raise ValueError(f"dataset '{name}' has no images")
        self.name = str(name)
        self.resolution = int(resolution)
        self.num_channels = int(num_channels)
        self.num_images = int(num_images)
        self.xflip = bool(xflip)
        self.binary = bool(binary)
        if labels is None:
            self._labels = torch.full((self.num_images,), -1, dtype=torch.int64)
            self.has_labels = False
            self.num_classes = 0
        else:
            self._labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64).reshape(-1)
            if self._labels.numel() != self.num_images:
                raise ValueError(f"dataset '{name}': {self._labels.numel()} labels for {self.num_images} images")
            if self._labels.numel() and int(self._labels.min()) < 0:
                raise ValueError(f"dataset '{name}': class labels must be >= 0, found {int(self._labels.min())}")
            self.has_labels = True
            self.num_classes = int(num_classes) if num_classes is not None else int(self._labels.max()) + 1
        if cond and not self.has_labels:
            raise ValueError(f"data.cond=true but dataset '{name}' has no class labels; set data.cond=false")
        self.label_dim = self.num_classes if cond else 0

    # --- subclass hook ---------------------------------------------------------------------------------------------
    def _load_image(self, raw_index: int) -> Tensor:
        """The un-flipped image ``raw_index`` as uint8 [C, H, W]."""
        raise NotImplementedError

    # --- Dataset protocol ------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.num_images * (2 if self.xflip else 1)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        i = operator.index(i)
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {i} out of range for dataset '{self.name}' of {n} items")
        raw = i % self.num_images
        image = self._load_image(raw)
        image = image.flip(-1) if i >= self.num_images else image.clone()
        label = int(self._labels[raw]) if self.label_dim else -1
        return image, label

    def all_images(self) -> Tensor:
        """uint8 [N, C, H, W]: every un-flipped image (for reference statistics)."""
        return torch.stack([self._load_image(i) for i in range(self.num_images)])

    def all_labels(self) -> Tensor:
        """int64 [N]: the source's class labels of the un-flipped images (whatever ``cond`` is); -1 if unlabeled."""
        return self._labels.clone()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, images={self.num_images}, items={len(self)}, "
            f"resolution={self.resolution}, channels={self.num_channels}, classes={self.num_classes}, "
            f"label_dim={self.label_dim}, xflip={self.xflip}, binary={self.binary})"
        )


class InMemoryImageDataset(ImageDataset):
    """An ImageDataset over a uint8 [N, C, H, W] tensor held in memory (digits, CIFAR-10)."""

    def __init__(self, images: Tensor, labels: Tensor | np.ndarray | None, **kwargs: Any) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != images.shape[-2]:
            raise ValueError(f"expected square uint8 images [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
        self._images = images.contiguous()
        super().__init__(
            resolution=images.shape[-1],
            num_channels=images.shape[1],
            labels=labels,
            num_images=images.shape[0],
            **kwargs,
        )

    def _load_image(self, raw_index: int) -> Tensor:
        return self._images[raw_index]

    def all_images(self) -> Tensor:
        """uint8 [N, C, H, W]: the dataset's own image tensor (no copy; do not modify it)."""
        return self._images
