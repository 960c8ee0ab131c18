"""``eval.save_samples``: the generated images of an evaluation, streamed into an ``.npz`` one chunk at a time.

The file is what ``np.savez(path, samples=..., seeds=...)`` writes (uint8 ``samples`` [N, H, W, C], int64 ``seeds``
[N]; uncompressed members, readable by ``np.load`` and by ``evaluate.py samples=``), but ``SamplesNpzWriter``
never holds more than the chunk it is given: under torchrun rank 0 receives every rank's images in seed order,
chunk by chunk (``evaluation/ranks.py``, ``gather_to_main``), and writes them on. It is written to a temporary name
and renamed when complete, so an interrupted evaluation leaves no partial file.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
from torch import Tensor

__all__ = ["SamplesNpzWriter"]


class SamplesNpzWriter:
    """``write`` uint8 NCHW chunks in order, then ``close`` (which checks that all ``num`` images came)."""

    def __init__(self, path: str | os.PathLike, seeds: np.ndarray, chw: tuple[int, int, int]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.num, self.written = int(len(seeds)), 0
        self.tmp = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}")
        self.zip = zipfile.ZipFile(self.tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
        with self.zip.open("seeds.npy", "w") as f:
            np.lib.format.write_array(f, np.asarray(seeds, dtype=np.int64))
        self.member = self.zip.open("samples.npy", "w", force_zip64=True)
        c, h, w = chw
        np.lib.format.write_array_header_1_0(self.member, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
                                                           "fortran_order": False, "shape": (self.num, h, w, c)})

    def write(self, chunk: Tensor) -> None:
        """The next images, uint8 [n, C, H, W] (stored as NHWC)."""
        self.member.write(np.ascontiguousarray(chunk.permute(0, 2, 3, 1).numpy()).tobytes())
        self.written += int(chunk.shape[0])

    def close(self) -> Path:
        """Finish the file and move it into place; a short count is an error (and nothing is left behind)."""
        self.member.close()
        self.zip.close()
        if self.written != self.num:
            self.tmp.unlink(missing_ok=True)
            raise RuntimeError(f"{self.path}: {self.written} images written, {self.num} expected")
        with open(self.tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(self.tmp, self.path)
        return self.path
