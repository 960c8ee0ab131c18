"""A dataset of image files: a directory searched recursively, or an EDM-style zip (``dataset_tool.py`` output).

- Images: every file whose extension PIL can read (``PIL.Image.registered_extensions()``), in sorted order of their
  '/'-separated path relative to the directory or zip root. Converted to RGB (``channels: 3``) or L (``channels: 1``);
  each must be ``resolution x resolution`` (checked on the first image at construction and on every image read).
- Labels: an optional ``dataset.json`` at the root, ``{"labels": [["00000/img00000000.png", 6], ...]}`` or
  ``{"labels": null}``; every image must then have a non-negative integer label, and the number of classes is
  ``max(label) + 1`` (as EDM).
- Images are read lazily: the dataset keeps only the list of names. A zip is opened on first access in each process
  (a zip handle cannot be pickled to DataLoader workers, nor shared across a fork), so the object pickles cleanly.
- An unreadable or truncated image raises ValueError naming the file, with PIL's error chained.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .dataset import ImageDataset, check_config_value
from .image_source import LABELS_FILE, ImageSource, image_extensions

__all__ = ["ImageFolderDataset", "build_folder", "image_extensions", "LABELS_FILE"]


class ImageFolderDataset(ImageDataset):
    """Images from a directory tree or an uncompressed zip, with optional labels from ``dataset.json``.

    File listing, zip handling and the ``dataset.json`` labels are ``data.image_source.ImageSource``'s (the same
    reader the preparation tools use, with ``labels="auto"``).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        name: str = "folder",
        resolution: int | None = None,
        channels: int = 3,
        cond: bool = False,
        xflip: bool = False,
    ) -> None:
        if path is None:
            raise ValueError("data.path is not set; pass data.path=<a directory of images or an EDM-style .zip>")
        path = Path(path).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"image folder/zip not found: '{path}' (data.path)")
        if channels not in (1, 3):
            raise ValueError(f"data.channels={channels!r} is not supported by the folder source; valid: 1 (L), 3 (RGB)")
        self._mode = "RGB" if channels == 3 else "L"
        self.source = ImageSource(path, labels="auto")
        self.path = self.source.path

        found = self._open_image(0, None).shape[-1]
        check_config_value(
            "resolution", resolution, found, where=f"the first image '{self.source.names[0]}' in '{self.path}'"
        )
        super().__init__(
            name=name,
            resolution=found,
            num_channels=channels,
            labels=self.source.labels,
            num_images=len(self.source),
            cond=cond,
            xflip=xflip,
        )

    def _open_image(self, raw_index: int, expected_resolution: int | None) -> Tensor:
        """Image ``raw_index`` as uint8 [C, H, W]; ValueError naming the file if unreadable or of the wrong size."""
        from PIL import Image

        name = self.source.names[raw_index]
        try:
            with Image.open(io.BytesIO(self.source.read_bytes(name))) as img:
                img.load()
                array = np.array(img.convert(self._mode))  # a writable copy
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
            raise ValueError(f"cannot read image '{name}' in '{self.path}': {type(e).__name__}: {e}") from e
        h, w = array.shape[:2]
        if h != w or (expected_resolution is not None and h != expected_resolution):
            want = f"{expected_resolution}x{expected_resolution}" if expected_resolution is not None else "square"
            raise ValueError(
                f"image '{name}' in '{self.path}' is {w}x{h} (width x height); expected {want} (data.resolution)"
            )
        if array.ndim == 2:
            array = array[:, :, None]
        return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))

    def _load_image(self, raw_index: int) -> Tensor:
        return self._open_image(raw_index, self.resolution)

    @property
    def names(self) -> list[str]:
        """Relative '/'-separated paths of the images, in dataset order."""
        return list(self.source.names)


def build_folder(cfg: dict, split: str = "train") -> ImageFolderDataset:
    """Build from a plain data-config dict (keys of configs/data/folder.yaml); "test" reads ``data.test_path``."""
    if split == "train":
        path = cfg.get("path")
    elif split == "test":
        path = cfg.get("test_path")
        if path is None:
            raise ValueError(
                "the folder source has no test split unless data.test_path=<a directory or zip of "
                "held-out images> is set"
            )
    else:
        raise ValueError(f"unknown split {split!r}; valid: train, test")
    return ImageFolderDataset(
        path,
        name=cfg.get("name") or "folder",
        resolution=cfg.get("resolution"),
        channels=3 if cfg.get("channels") is None else cfg.get("channels"),
        cond=bool(cfg.get("cond", False)),
        xflip=bool(cfg.get("xflip", False)),
    )
