"""The dataset over a prepared directory (``data.shards`` format): memory-mapped pixels or VAE latents.

- Pixels (kind "pixels"): items are ``(uint8 [C, H, W], label)`` like every other source; ``data.xflip`` adds the
  mirrored copies N..2N-1 (flipped on the fly).
- Latents (kind "latents"): items are ``(float32 [C, h, w], label)`` already in model space (the training loop's
  ``to_model_space`` passes floats through), normalized per ``data.latent_norm`` (see ``data.latents``).
  ``data.xflip`` uses the flip copies encoded at preparation (``--flip``, as fast-DiT), never a flip of the latent
  (the VAE is not flip-equivariant). ``latent`` is True and ``latent_info`` holds what decoding needs (VAE, scale,
  shift; ``LatentCodec.from_info``). ``resolution`` is the latent size (32 for ImageNet-256), ``image_resolution``
  the decoded size.

Shards are mapped lazily in each process (maps do not pickle to DataLoader workers) and an item costs one slice
copy: no decode, no file open.
"""

from __future__ import annotations

import operator
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .dataset import ImageDataset, check_config_value
from .latents import latent_normalization
from .shards import LABELS_NPY, META_FILE, STATE_FILE, open_npy, read_meta

__all__ = ["PreparedDataset", "build_prepared", "missing_dataset_error"]


def missing_dataset_error(path: Path, prepare_cmd: str | None) -> Exception:
    """The error for a dataset directory that is absent or unfinished, with the command that (re)makes it."""
    how = f"prepare it with\n    {prepare_cmd}" if prepare_cmd else "prepare it with `python -m data.prepare --help`"
    if (path / STATE_FILE).is_file():
        import json

        try:
            command = json.loads((path / STATE_FILE).read_text()).get("command") or prepare_cmd
        except ValueError:
            command = prepare_cmd
        return FileNotFoundError(
            f"'{path}' (data.path) holds an unfinished preparation; rerun its command to resume:\n    {command}"
        )
    if path.is_dir() and not (path / META_FILE).exists():
        return FileNotFoundError(f"'{path}' (data.path) is not a prepared dataset (no {META_FILE}); {how}")
    return FileNotFoundError(f"dataset not found at '{path}' (data.path); {how}")


class PreparedDataset(ImageDataset):
    """A prepared dataset directory (pixels or latents), memory-mapped.

    Args:
        path: the directory.
        name: ``data.name``.
        resolution, channels: expected item size / channels (checked against the metadata when given).
        cond, xflip: as every source.
        latent_norm, latent_std: normalization of latents ("scale" or "channel", see ``data.latents``).
        vae: override of the VAE location stored in the metadata (e.g. a local copy on an offline machine).
        prepare_cmd: the command that prepares this dataset, quoted when it is missing.
        kind: expected kind ("pixels" / "latents") or None for either.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        name: str = "prepared",
        resolution: int | None = None,
        channels: int | None = None,
        cond: bool = False,
        xflip: bool = False,
        latent_norm: str = "scale",
        latent_std: float = 0.5,
        vae: str | None = None,
        prepare_cmd: str | None = None,
        kind: str | None = None,
    ) -> None:
        if path is None:
            raise ValueError(f"data.path is not set; {prepare_cmd or 'prepare a dataset with python -m data.prepare'}")
        self.path = Path(path).expanduser()
        if not (self.path / META_FILE).is_file():
            raise missing_dataset_error(self.path, prepare_cmd)
        meta = read_meta(self.path)
        self.meta = meta
        self.kind = meta["kind"]
        if kind is not None and self.kind != kind:
            raise ValueError(f"'{self.path}' holds {self.kind}, expected {kind}")
        self._shard_files = [self.path / f for f in meta["shards"]]
        self.shard_size = int(meta["shard_size"])
        item_shape = tuple(meta["item_shape"])
        self.variants = int(meta.get("variants", 1)) if self.kind == "latents" else 1
        c, h, w = item_shape[-3:]
        if h != w:
            raise ValueError(f"'{self.path}': items are {h}x{w}; only square images are supported")
        where = f"the prepared dataset '{self.path}'"
        check_config_value("resolution", resolution, h, where=where)
        check_config_value("channels", channels, c, where=where)

        labels = None
        if meta.get("labels"):
            labels = np.load(self.path / LABELS_NPY)
            if labels.shape != (meta["num_images"],) or labels.dtype.kind not in "iu":
                raise ValueError(f"'{self.path / LABELS_NPY}' is {labels.dtype} {labels.shape}, expected int64 "
                                 f"[{meta['num_images']}]")
        self.latent = self.kind == "latents"
        self.latent_info: dict[str, Any] | None = None
        if self.latent:
            if xflip and self.variants < 2:
                raise ValueError(
                    f"data.xflip=true but '{self.path}' stores no flipped latents (a flipped latent is not the latent "
                    f"of the flipped image); re-prepare with --flip or set data.xflip=false"
                )
            info = meta["latent"]
            scale, shift = latent_normalization(info, latent_norm, latent_std)
            self.latent_info = {
                "vae": vae or info["vae"],
                "vae_subfolder": info.get("vae_subfolder"),
                "scale": scale,
                "shift": shift,
                "norm": latent_norm,
                "image_resolution": int(info["image_resolution"]),
            }
            self._scale = np.asarray(scale, dtype=np.float32).reshape(-1, 1, 1)
            self._shift = np.asarray(shift, dtype=np.float32).reshape(-1, 1, 1)
        self.image_resolution = self.latent_info["image_resolution"] if self.latent else h
        self._maps: list[np.ndarray | None] = [None] * len(self._shard_files)
        self._maps_pid = os.getpid()
        super().__init__(
            name=name,
            resolution=h,
            num_channels=c,
            labels=labels,
            num_images=int(meta["num_images"]),
            cond=cond,
            xflip=xflip,
            num_classes=meta.get("num_classes") or None,
        )
        self._labels_np = self._labels.numpy()

    # --- shard access ----------------------------------------------------------------------------------------------
    def _shard(self, k: int) -> np.ndarray:
        if self._maps_pid != os.getpid():
            self._maps = [None] * len(self._shard_files)
            self._maps_pid = os.getpid()
        shard = self._maps[k]
        if shard is None:
            shard = self._maps[k] = open_npy(self._shard_files[k])
        return shard

    def _item(self, raw: int, flip: bool) -> Tensor:
        k, j = divmod(raw, self.shard_size)
        shard = self._shard(k)
        if self.latent:
            array = shard[j, 1 if flip else 0]
            return torch.from_numpy((array.astype(np.float32) - self._shift) * self._scale)
        array = shard[j]
        return torch.from_numpy(np.array(array[:, :, ::-1] if flip else array))  # np.array: a writable copy

    def _load_image(self, raw_index: int) -> Tensor:
        return self._item(raw_index, False)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        i = operator.index(i)
        n = self.num_images
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for dataset '{self.name}' of {len(self)} items")
        flip = i >= n
        raw = i - n if flip else i
        return self._item(raw, flip), (int(self._labels_np[raw]) if self.label_dim else -1)

    def all_images(self) -> Tensor:
        """Every un-flipped item stacked: uint8 [N, C, H, W] pixels, or float32 model-space latents."""
        parts = []
        for k in range(len(self._shard_files)):
            shard = self._shard(k)
            if self.latent:
                parts.append((shard[:, 0].astype(np.float32) - self._shift) * self._scale)
            else:
                parts.append(np.array(shard))
        return torch.from_numpy(np.concatenate(parts))

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_maps"] = [None] * len(self._shard_files)  # maps don't pickle; each process maps its own
        return state

    def __repr__(self) -> str:
        extra = f", latent={self.latent_info['vae']!r}" if self.latent else ""
        return super().__repr__()[:-1] + f", path='{self.path}'{extra})"


def build_prepared(cfg: dict, split: str = "train") -> PreparedDataset:
    """Build from a plain data-config dict (configs/data/imagenet64.yaml etc.); "test" reads ``data.test_path``."""
    if split == "train":
        path = cfg.get("path")
    elif split == "test":
        path = cfg.get("test_path")
        if path is None:
            raise ValueError(
                "this prepared dataset has no test split unless data.test_path=<a prepared directory> is set")
    else:
        raise ValueError(f"unknown split {split!r}; valid: train, test")
    return PreparedDataset(
        path,
        name=cfg.get("name") or "prepared",
        resolution=cfg.get("resolution"),
        channels=cfg.get("channels"),
        cond=bool(cfg.get("cond", False)),
        xflip=bool(cfg.get("xflip", False)),
        latent_norm=cfg.get("latent_norm") or "scale",
        latent_std=float(cfg.get("latent_std", 0.5)),
        vae=cfg.get("vae"),
        prepare_cmd=cfg.get("prepare_cmd") if split == "train" else None,
    )
