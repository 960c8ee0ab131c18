"""CIFAR-10 read from the official python archive (Krizhevsky 2009): 50 000 train / 10 000 test, 32x32 RGB, 10 classes.

Source: https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz (or its extracted ``cifar-10-batches-py/``).
Members ``cifar-10-batches-py/data_batch_1 .. data_batch_5`` (train, in that order) and ``test_batch`` (test) are
pickled dicts with ``b'data'``: uint8 [N, 3072], each row the R, G and B planes of one image one after the other,
each plane 32 rows of 32 pixels (so pixel (c, y, x) is column ``c * 1024 + y * 32 + x``), and ``b'labels'``: N ints
in 0..9.

The pickles are loaded with a restricted unpickler that resolves only the few numpy functions that rebuild an
array (and a latin-1-only ``_codecs.encode``, which Python 3 protocol-2 pickles use for bytes): an archive whose
pickles name any other global is refused, so a malicious file cannot run code.
"""

from __future__ import annotations

import io
import os
import pickle
import tarfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .dataset import ImageDataset, InMemoryImageDataset, check_config_value

__all__ = ["Cifar10Dataset", "load_cifar10_arrays", "build_cifar10", "CIFAR10_URL", "RestrictedUnpickler"]

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
BATCH_DIR = "cifar-10-batches-py"
TRAIN_MEMBERS = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_MEMBERS = ("test_batch",)
RESOLUTION, CHANNELS, NUM_CLASSES = 32, 3, 10


def _latin1_encode(obj: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """``_codecs.encode`` restricted to what pickled bytes need: a str encoded as latin-1."""
    if not isinstance(obj, str) or encoding.lower().replace("_", "-") not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
    return obj.encode("latin-1", errors)


def _allowed_globals() -> dict[tuple[str, str], Callable]:
    try:  # numpy >= 2
        from numpy._core import multiarray, numeric
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray, numeric
    table = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype, ("_codecs", "encode"): _latin1_encode}
    for prefix in ("numpy.core", "numpy._core"):  # pickles name the module of the numpy version that wrote them
        table[(f"{prefix}.multiarray", "_reconstruct")] = multiarray._reconstruct
        table[(f"{prefix}.numeric", "_frombuffer")] = numeric._frombuffer
    return table


class RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler that resolves only the numpy array-reconstruction globals; anything else is refused."""

    _ALLOWED: dict[tuple[str, str], Callable] | None = None

    def find_class(self, module: str, name: str) -> Callable:
        if RestrictedUnpickler._ALLOWED is None:
            RestrictedUnpickler._ALLOWED = _allowed_globals()
        try:
            return RestrictedUnpickler._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load global '{module}.{name}': a CIFAR-10 batch holds only dicts, bytes, lists and "
                f"numpy arrays"
            ) from None


def _parse_batch(payload: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Unpickle one batch and check its layout; returns (images uint8 [N, 3, 32, 32], labels int64 [N])."""
    try:
        batch = RestrictedUnpickler(io.BytesIO(payload), encoding="bytes").load()
    except Exception as e:  # UnpicklingError, EOFError, ValueError, ... from a bad or hostile pickle
        raise ValueError(f"{where}: not a valid CIFAR-10 batch pickle: {e}") from e
    if not isinstance(batch, dict):
        raise ValueError(f"{where}: expected a pickled dict, got {type(batch).__name__}")
    batch = {k.decode("latin-1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or "labels" not in batch:
        raise ValueError(f"{where}: batch dict lacks b'data' and/or b'labels' (keys: {sorted(map(str, batch))})")
    data, labels = batch["data"], np.asarray(batch["labels"])
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        shape = getattr(data, "shape", None)
        dtype = getattr(data, "dtype", type(data).__name__)
        raise ValueError(f"{where}: b'data' must be a uint8 array [N, 3072], got {dtype} {shape}")
    if labels.ndim != 1 or labels.shape[0] != data.shape[0] or labels.dtype.kind not in "iu":
        raise ValueError(f"{where}: b'labels' must be {data.shape[0]} integers, got {labels.dtype} {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise ValueError(f"{where}: labels must be in 0..{NUM_CLASSES - 1}, found {labels.min()}..{labels.max()}")
    return data.reshape(-1, CHANNELS, RESOLUTION, RESOLUTION), labels.astype(np.int64)


def _read_members_from_tar(path: Path, wanted: tuple[str, ...]) -> dict[str, bytes]:
    """The wanted batch files of the archive, read in one sequential pass (a .tar.gz cannot seek cheaply)."""
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                name = member.name.removeprefix("./")
                short = name.removeprefix(BATCH_DIR + "/")
                if short in wanted and name == f"{BATCH_DIR}/{short}" and member.isfile():
                    found[short] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise ValueError(
            f"'{path}' is not a readable tar archive ({type(e).__name__}: {e}); expected the CIFAR-10 "
            f"python archive from {CIFAR10_URL}"
        ) from e
    missing = [f"{BATCH_DIR}/{m}" for m in wanted if m not in found]
    if missing:
        raise ValueError(
            f"archive '{path}' lacks member(s) {', '.join(missing)}; expected the CIFAR-10 python "
            f"archive from {CIFAR10_URL}"
        )
    return found


def _read_members_from_dir(path: Path, wanted: tuple[str, ...]) -> dict[str, bytes]:
    root = path / BATCH_DIR if (path / BATCH_DIR).is_dir() else path
    missing = [m for m in wanted if not (root / m).is_file()]
    if missing:
        raise ValueError(
            f"directory '{root}' lacks {', '.join(missing)}; expected the extracted CIFAR-10 python "
            f"archive ({BATCH_DIR}/) from {CIFAR10_URL}"
        )
    return {m: (root / m).read_bytes() for m in wanted}


def load_cifar10_arrays(path: str | os.PathLike, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 3, 32, 32], labels int64 [N]) of one split, from the archive or its extracted directory."""
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}; valid: train, test")
    if path is None:
        raise FileNotFoundError(
            f"data.path is not set; download {CIFAR10_URL} and pass data.path=<the .tar.gz or the extracted directory>"
        )
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"CIFAR-10 not found at '{path}'; download {CIFAR10_URL} and pass "
            f"data.path=<the .tar.gz or the extracted directory> (or set SIGMALAB_DATA=<its folder>), or prepare "
            f"a memory-mapped copy with `python -m data.prepare cifar10 --source <the .tar.gz> --dest DIR` and pass "
            f"data.path=DIR"
        )
    wanted = TRAIN_MEMBERS if split == "train" else TEST_MEMBERS
    raw = _read_members_from_dir(path, wanted) if path.is_dir() else _read_members_from_tar(path, wanted)
    parts = [_parse_batch(raw[m], f"'{path}' member {BATCH_DIR}/{m}") for m in wanted]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


class Cifar10Dataset(InMemoryImageDataset):
    """CIFAR-10 as uint8 [3, 32, 32] images with labels 0..9 (split "train": data_batch_1..5; "test": test_batch)."""

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        name: str = "cifar10",
        split: str = "train",
        resolution: int | None = None,
        channels: int | None = None,
        cond: bool = False,
        xflip: bool = False,
    ) -> None:
        check_config_value("resolution", resolution, RESOLUTION, where="CIFAR-10")
        check_config_value("channels", channels, CHANNELS, where="CIFAR-10")
        images, labels = load_cifar10_arrays(path, split)
        self.split = split
        super().__init__(torch.from_numpy(images), labels, name=name, cond=cond, xflip=xflip, num_classes=NUM_CLASSES)


def _build_prepared_cifar10(cfg: dict, split: str) -> ImageDataset:
    """CIFAR-10 from directories made by ``python -m data.prepare cifar10`` (train: data.path, test: data.test_path)."""
    from .prepared import PreparedDataset

    path = cfg.get("path") if split == "train" else cfg.get("test_path")
    if path is None:
        raise ValueError(
            f"data.path='{cfg.get('path')}' is a prepared CIFAR-10 train split; the test split needs "
            "data.test_path=<a dir made by `python -m data.prepare cifar10 --split test --source "
            "cifar-10-python.tar.gz --dest DIR`>"
        )
    return PreparedDataset(
        path,
        name=cfg.get("name") or "cifar10",
        resolution=cfg.get("resolution"),
        channels=cfg.get("channels"),
        cond=bool(cfg.get("cond", False)),
        xflip=bool(cfg.get("xflip", False)),
        kind="pixels",
    )


def build_cifar10(cfg: dict, split: str = "train") -> ImageDataset:
    """Build from a plain data-config dict (keys of configs/data/cifar10.yaml).

    ``data.path`` is the official archive (or its extracted folder), decoded into memory, or a directory prepared by
    ``python -m data.prepare cifar10`` (memory-mapped; the test split then comes from ``data.test_path``).
    """
    from .shards import is_prepared

    path = cfg.get("path")
    if path is not None and Path(path).expanduser().is_dir() and is_prepared(Path(path).expanduser()):
        return _build_prepared_cifar10(cfg, split)
    return Cifar10Dataset(
        cfg.get("path"),
        name=cfg.get("name") or "cifar10",
        split=split,
        resolution=cfg.get("resolution"),
        channels=cfg.get("channels"),
        cond=bool(cfg.get("cond", False)),
        xflip=bool(cfg.get("xflip", False)),
    )
