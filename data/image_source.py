"""The images a preparation reads: a directory tree, an (EDM-style) zip, or an ILSVRC synset folder, with labels.

``ImageSource`` holds the sorted list of image files (every file whose extension PIL reads, ordered by its
'/'-separated path relative to the root) and where their labels come from (``labels=``):

- ``json``  — EDM's ``dataset.json`` at the root: ``{"labels": [["00000/img00000000.png", 6], ...]}`` or null.
- ``dirs``  — the first path component is the class; classes are numbered in sorted order (torchvision
  ``ImageFolder``; for ILSVRC ``train/<wnid>/*.JPEG`` this is the standard class index 0..999).
- ``none``  — unlabeled.
- ``auto``  — ``json`` if ``dataset.json`` exists, else ``none`` (sub-folders alone do not imply classes: EDM zips
  shard their files into ``00000/``, ``00001/``, ... folders).

The object pickles without open file handles (a zip is re-opened lazily in each process), so pool workers can read
from it.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["ImageSource", "LABEL_MODES", "LABELS_FILE", "image_extensions"]

LABEL_MODES = ("auto", "json", "dirs", "none")
LABELS_FILE = "dataset.json"


def image_extensions() -> set[str]:
    """Lower-case file extensions (with the dot) that PIL can open."""
    from PIL import Image

    return {ext.lower() for ext in Image.registered_extensions()}


class ImageSource:
    """Sorted image files of a directory or zip, readable by index from any process, with optional class labels."""

    def __init__(self, path: str | os.PathLike, labels: str = "auto") -> None:
        if labels not in LABEL_MODES:
            raise ValueError(f"unknown label mode {labels!r}; valid: {', '.join(LABEL_MODES)}")
        self.path = Path(path).expanduser()
        if not self.path.exists():
            raise FileNotFoundError(f"image source not found: '{self.path}'")
        self._zip: zipfile.ZipFile | None = None
        self._zip_pid: int | None = None
        self.is_zip = not self.path.is_dir()
        if self.is_zip:
            try:
                all_names = sorted(n for n in self._open_zip().namelist() if not n.endswith("/"))
            except (zipfile.BadZipFile, OSError) as e:
                raise ValueError(f"'{self.path}' is neither a directory nor a readable zip archive: {e}") from e
        else:
            all_names = []
            for root, dirs, files in os.walk(self.path):
                dirs.sort()
                rel = Path(root).relative_to(self.path).as_posix()
                all_names += [f if rel == "." else f"{rel}/{f}" for f in files]
            all_names.sort()
        extensions = image_extensions()
        self.names: list[str] = [n for n in all_names if os.path.splitext(n)[1].lower() in extensions]
        if not self.names:
            raise ValueError(
                f"no images found in '{self.path}' (looked for files with extensions PIL reads, e.g. .png .jpg .JPEG)"
            )
        has_json = LABELS_FILE in all_names
        mode = ("json" if has_json else "none") if labels == "auto" else labels
        self.label_mode = mode
        self.class_names: list[str] | None = None
        self.labels: np.ndarray | None = None
        if mode == "json":
            if not has_json:
                raise ValueError(f"--labels json but '{self.path}' has no {LABELS_FILE}")
            self.labels = self._labels_from_json()
        elif mode == "dirs":
            self.labels, self.class_names = self._labels_from_dirs()

    # --- labels ----------------------------------------------------------------------------------------------------
    def _labels_from_json(self) -> np.ndarray | None:
        where = f"'{self.path}' {LABELS_FILE}"
        try:
            meta = json.loads(self.read_bytes(LABELS_FILE))
        except (ValueError, OSError) as e:
            raise ValueError(f"{where} is not valid JSON: {e}") from e
        entries = meta.get("labels") if isinstance(meta, dict) else None
        if entries is None:
            return None
        if not isinstance(entries, list) or not all(isinstance(e, list | tuple) and len(e) == 2 for e in entries):
            raise ValueError(f'{where}: "labels" must be null or a list of [relative_path, class_index] pairs')
        table = {str(fname).replace("\\", "/"): label for fname, label in entries}
        out = np.empty(len(self.names), dtype=np.int64)
        for i, fname in enumerate(self.names):
            label = table.get(fname)
            if label is None:
                raise ValueError(f"{where} has no label for image '{fname}'")
            if isinstance(label, bool) or not isinstance(label, int) or label < 0:
                raise ValueError(f"{where}: label of '{fname}' must be a non-negative integer, got {label!r}")
            out[i] = label
        return out

    def _labels_from_dirs(self) -> tuple[np.ndarray, list[str]]:
        loose = [n for n in self.names if "/" not in n]
        if loose:
            raise ValueError(
                f"--labels dirs needs every image inside a class sub-folder of '{self.path}' (as ILSVRC "
                f"train/<wnid>/*.JPEG), but {len(loose)} image(s) lie at the top level, e.g. '{loose[0]}'"
            )
        classes = sorted({n.split("/", 1)[0] for n in self.names})
        index = {c: i for i, c in enumerate(classes)}
        return np.array([index[n.split("/", 1)[0]] for n in self.names], dtype=np.int64), classes

    # --- file access -----------------------------------------------------------------------------------------------
    def _open_zip(self) -> zipfile.ZipFile:
        if self._zip is None or self._zip_pid != os.getpid():
            self._zip = zipfile.ZipFile(self.path)
            self._zip_pid = os.getpid()
        return self._zip

    def read_bytes(self, name: str) -> bytes:
        """The raw bytes of a file of the source (by relative name); ValueError naming it when unreadable."""
        try:
            if self.is_zip:
                return self._open_zip().read(name)
            return (self.path / name).read_bytes()
        except (OSError, KeyError, zipfile.BadZipFile) as e:
            raise ValueError(f"cannot read '{name}' in '{self.path}': {type(e).__name__}: {e}") from e

    def __len__(self) -> int:
        return len(self.names)

    @property
    def num_classes(self) -> int:
        if self.labels is None:
            return 0
        return len(self.class_names) if self.class_names is not None else int(self.labels.max()) + 1

    def fingerprint(self) -> str:
        """SHA-256 of the ordered file names and labels: what a resumed preparation must find unchanged."""
        digest = hashlib.sha256()
        for name in self.names:
            digest.update(name.encode("utf-8", "surrogateescape") + b"\0")
        if self.labels is not None:
            digest.update(self.labels.tobytes())
        return digest.hexdigest()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_zip"] = None
        state["_zip_pid"] = None
        return state
