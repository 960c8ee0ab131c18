"""scikit-learn's 8x8 handwritten digits (1797 images, classes 0..9), optionally binarized and upsampled.

Source: ``sklearn.datasets.load_digits()`` (UCI optical recognition of handwritten digits; pixel values 0..16).

- Pixel mapping: ``u = round(v * 255 / 16)`` with halves rounded up (only v = 8 -> 127.5 -> 128 is a half).
- ``binarize: true``: ``u = 255 if v >= 8 else 0`` -- the threshold is half the full scale 16, so the images are
  exactly -1 / +1 in model space (the discrete case, as binarized MNIST).
- Held-out split: for every class c (in order 0..9) ``round(heldout_fraction * count_c)`` of its images are drawn
  without replacement by one ``numpy.random.default_rng(split_seed)``; they form "test", the rest "train". The split
  depends on nothing but (heldout_fraction, split_seed).
- ``resolution`` may be any integer multiple of 8 (e.g. 16 or 32 for networks that need bigger inputs): every pixel
  is repeated ``resolution // 8`` times along each axis (nearest-neighbour upsampling).
"""

from __future__ import annotations

import numpy as np
import torch

from .dataset import InMemoryImageDataset, check_config_value

__all__ = ["DigitsDataset", "NATIVE_RESOLUTION", "MAX_VALUE", "heldout_indices", "build_digits"]

NATIVE_RESOLUTION = 8
MAX_VALUE = 16  # load_digits' pixel values are integers 0..16
BINARIZE_THRESHOLD = 8  # pixel = 255 if v >= 8 else 0


def _load_raw() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return np.asarray(bunch.images), np.asarray(bunch.target, dtype=np.int64)


def heldout_indices(labels: np.ndarray, heldout_fraction: float, split_seed: int) -> np.ndarray:
    """Sorted indices of the class-stratified held-out split (see the module docstring)."""
    if not 0.0 < float(heldout_fraction) < 1.0:
        raise ValueError(f"data.heldout_fraction must be in (0, 1), got {heldout_fraction!r}")
    rng = np.random.default_rng(int(split_seed))
    chosen = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        k = int(np.floor(heldout_fraction * len(members) + 0.5))
        chosen.append(rng.choice(members, size=k, replace=False))
    return np.sort(np.concatenate(chosen))


def _to_uint8(values: np.ndarray, binarize: bool) -> np.ndarray:
    if binarize:
        return np.where(values >= BINARIZE_THRESHOLD, 255, 0).astype(np.uint8)
    return np.floor(values * (255.0 / MAX_VALUE) + 0.5).astype(np.uint8)


class DigitsDataset(InMemoryImageDataset):
    """The digits as uint8 [1, R, R] images (R = resolution), one split of the fixed held-out partition.

    ``resolution=None`` / ``channels=None`` mean "as found" (8 and 1).
    """

    def __init__(
        self,
        *,
        name: str = "digits",
        split: str = "train",
        resolution: int | None = None,
        channels: int | None = None,
        binarize: bool = False,
        heldout_fraction: float = 0.15,
        split_seed: int = 0,
        cond: bool = False,
        xflip: bool = False,
    ) -> None:
        if split not in ("train", "test"):
            raise ValueError(f"unknown split {split!r}; valid: train, test")
        check_config_value("channels", channels, 1, where="the digits dataset (grayscale)")
        resolution = NATIVE_RESOLUTION if resolution is None else int(resolution)
        if resolution <= 0 or resolution % NATIVE_RESOLUTION:
            raise ValueError(
                f"data.resolution={resolution} is not a positive integer multiple of the digits' native "
                f"{NATIVE_RESOLUTION}x{NATIVE_RESOLUTION}; valid: 8, 16, 24, 32, ..."
            )
        values, labels = _load_raw()
        test = heldout_indices(labels, heldout_fraction, split_seed)
        if split == "test":
            keep = test
        else:
            mask = np.ones(len(labels), dtype=bool)
            mask[test] = False
            keep = np.flatnonzero(mask)
        images = torch.from_numpy(_to_uint8(values[keep], binarize))[:, None]  # [N, 1, 8, 8]
        factor = resolution // NATIVE_RESOLUTION
        if factor > 1:
            images = images.repeat_interleave(factor, dim=2).repeat_interleave(factor, dim=3)
        self.split = split
        self.indices = torch.from_numpy(keep)  # positions in load_digits() order
        super().__init__(
            images,
            labels[keep],
            name=name,
            cond=cond,
            xflip=xflip,
            binary=binarize,
            num_classes=10,
        )


def build_digits(cfg: dict, split: str = "train") -> DigitsDataset:
    """Build from a plain data-config dict (keys of configs/data/digits.yaml)."""
    return DigitsDataset(
        name=cfg.get("name") or "digits",
        split=split,
        resolution=cfg.get("resolution"),
        channels=cfg.get("channels"),
        binarize=bool(cfg.get("binarize", False)),
        heldout_fraction=cfg.get("heldout_fraction", 0.15),
        split_seed=cfg.get("split_seed", 0),
        cond=bool(cfg.get("cond", False)),
        xflip=bool(cfg.get("xflip", False)),
    )
