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
import json
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .dataset import ImageDataset, check_config_value

__all__ = ["ImageFolderDataset", "build_folder", "image_extensions"]

LABELS_FILE = "dataset.json"


def image_extensions() -> set[str]:
    """Lower-case file extensions (with the dot) that PIL can open."""
    from PIL import Image

    return {ext.lower() for ext in Image.registered_extensions()}


class ImageFolderDataset(ImageDataset):
    """Images from a directory tree or an uncompressed zip, with optional labels from ``dataset.json``."""

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
        self.path = Path(path).expanduser()
        if not self.path.exists():
            raise FileNotFoundError(f"image folder/zip not found: '{self.path}' (data.path)")
        if channels not in (1, 3):
            raise ValueError(f"data.channels={channels!r} is not supported by the folder source; valid: 1 (L), 3 (RGB)")
        self._mode = "RGB" if channels == 3 else "L"
        self._zip: zipfile.ZipFile | None = None
        self._zip_pid: int | None = None

        if self.path.is_dir():
            self._is_zip = False
            all_names = sorted(
                Path(root, f).relative_to(self.path).as_posix() for root, _, files in os.walk(self.path) for f in files
            )
        else:
            self._is_zip = True
            try:
                all_names = sorted(n for n in self._open_zip().namelist() if not n.endswith("/"))
            except (zipfile.BadZipFile, OSError) as e:
                raise ValueError(f"'{self.path}' is neither a directory nor a readable zip archive: {e}") from e

        extensions = image_extensions()
        self._names = [n for n in all_names if os.path.splitext(n)[1].lower() in extensions]
        if not self._names:
            raise ValueError(
                f"no images found in '{self.path}' (looked for files with extensions PIL reads, e.g. .png .jpg)"
            )
        labels = self._read_labels(LABELS_FILE in all_names)

        found = self._open_image(0, None).shape[-1]
        check_config_value(
            "resolution", resolution, found, where=f"the first image '{self._names[0]}' in '{self.path}'"
        )
        super().__init__(
            name=name,
            resolution=found,
            num_channels=channels,
            labels=labels,
            num_images=len(self._names),
            cond=cond,
            xflip=xflip,
        )

    # --- file access -----------------------------------------------------------------------------------------------
    def _open_zip(self) -> zipfile.ZipFile:
        """This process's handle on the zip (re-opened after a fork or an unpickle)."""
        if self._zip is None or self._zip_pid != os.getpid():
            self._zip = zipfile.ZipFile(self.path)
            self._zip_pid = os.getpid()
        return self._zip

    def _read_bytes(self, name: str) -> bytes:
        if self._is_zip:
            return self._open_zip().read(name)
        return (self.path / name).read_bytes()

    def _read_labels(self, present: bool) -> np.ndarray | None:
        if not present:
            return None
        where = f"'{self.path}' {LABELS_FILE}"
        try:
            meta = json.loads(self._read_bytes(LABELS_FILE))
        except (ValueError, OSError) as e:
            raise ValueError(f"{where} is not valid JSON: {e}") from e
        entries = meta.get("labels") if isinstance(meta, dict) else None
        if entries is None:
            return None
        if not isinstance(entries, list) or not all(isinstance(e, list | tuple) and len(e) == 2 for e in entries):
            raise ValueError(f'{where}: "labels" must be null or a list of [relative_path, class_index] pairs')
        table = {str(fname).replace("\\", "/"): label for fname, label in entries}
        labels = []
        for fname in self._names:
            if fname not in table:
                raise ValueError(f"{where} has no label for image '{fname}'")
            label = table[fname]
            if isinstance(label, bool) or not isinstance(label, int) or label < 0:
                raise ValueError(f"{where}: label of '{fname}' must be a non-negative integer, got {label!r}")
            labels.append(label)
        return np.asarray(labels, dtype=np.int64)

    def _open_image(self, raw_index: int, expected_resolution: int | None) -> Tensor:
        """Image ``raw_index`` as uint8 [C, H, W]; ValueError naming the file if unreadable or of the wrong size."""
        from PIL import Image

        name = self._names[raw_index]
        try:
            with Image.open(io.BytesIO(self._read_bytes(name))) as img:
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
        return list(self._names)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_zip"] = None  # zip handles don't pickle; each worker opens its own
        state["_zip_pid"] = None
        return state


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
