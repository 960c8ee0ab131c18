"""Writing EDM-style dataset zips (the format of EDM's ``dataset_tool.py``, read by the ``folder`` source).

Layout: an uncompressed zip (ZIP_STORED) of PNGs named by the 8-digit image index, the first five digits being a
folder — image i is ``f"{i:08d}"[:5] + "/img" + f"{i:08d}" + ".png"`` (``00000/img00000000.png`` ...
``01281/img01281166.png``) — plus ``dataset.json`` = ``{"labels": [[name, class], ...]}`` or ``{"labels": null}``.
PNGs are written with ``compress_level=0`` by default (as EDM: the zip then decodes fastest; raise it to save disk).

The zip is written to ``<dest>.tmp-<pid>`` and renamed into place by ``close()``; on an error (or a context-manager
exit with an exception) the temporary file is deleted, so a failed run leaves nothing behind. Not resumable: use the
prepared-array format for long preparations.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np

__all__ = ["EdmZipWriter", "edm_image_name", "encode_png"]


def edm_image_name(index: int) -> str:
    digits = f"{index:08d}"
    return f"{digits[:5]}/img{digits}.png"


def encode_png(image_chw: np.ndarray, compress_level: int = 0) -> bytes:
    """PNG bytes of a uint8 [C, H, W] image (C = 1 or 3)."""
    from PIL import Image

    array = np.ascontiguousarray(np.asarray(image_chw, dtype=np.uint8).transpose(1, 2, 0))
    img = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
    buf = io.BytesIO()
    img.save(buf, format="png", compress_level=compress_level, optimize=False)
    return buf.getvalue()


class EdmZipWriter:
    """Appends images in index order; ``close(labels)`` writes dataset.json and moves the zip into place."""

    def __init__(self, dest: str | os.PathLike, compress_level: int = 0, overwrite: bool = False) -> None:
        self.dest = Path(dest)
        if self.dest.exists() and not overwrite:
            raise ValueError(f"--dest '{self.dest}' already exists; delete it or choose another path")
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        self.compress_level = int(compress_level)
        self._tmp = self.dest.with_name(f"{self.dest.name}.tmp-{os.getpid()}")
        self._zip = zipfile.ZipFile(self._tmp, "w", compression=zipfile.ZIP_STORED)
        self.count = 0

    def add(self, image_chw: np.ndarray | None = None, png: bytes | None = None) -> str:
        """Add the next image (raw uint8 [C, H, W], or already-encoded PNG bytes); returns its name."""
        name = edm_image_name(self.count)
        self._zip.writestr(name, png if png is not None else encode_png(image_chw, self.compress_level))
        self.count += 1
        return name

    def close(self, labels: np.ndarray | None = None) -> Path:
        if labels is not None and len(labels) != self.count:
            self.abort()
            raise ValueError(f"{len(labels)} labels for {self.count} images")
        entries = None if labels is None else [[edm_image_name(i), int(v)] for i, v in enumerate(labels)]
        self._zip.writestr("dataset.json", json.dumps({"labels": entries}))
        self._zip.close()
        with open(self._tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(self._tmp, self.dest)
        return self.dest

    def abort(self) -> None:
        try:
            self._zip.close()
        finally:
            self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> EdmZipWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
