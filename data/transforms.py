"""Image decoding with clear errors, and the resize/crop transforms that turn source photos into square training images.

Transforms (``TRANSFORMS``, chosen by ``python -m data.prepare ... --transform``), all on a PIL image converted to
RGB (or L) first, returning uint8 ``[H, W, C]``:

- ``adm`` — the preprocessing of ADM (Dhariwal & Nichol 2021, arXiv 2105.05233, ``center_crop_arr``), used by ADM
  itself and for ImageNet-256/512 by DiT and EDM2 (EDM2's ``dataset_tool.py --transform=center-crop-dhariwal``); the
  default of ``python -m data.prepare latents`` and ``folder``:
      while min(w, h) >= 2 r:   (w, h) <- (w // 2, h // 2) with a BOX filter   (cheap, alias-free halving)
      s = r / min(w, h);        (w, h) <- (round(w s), round(h s)) with BICUBIC  (short side becomes r)
      crop the central r x r:   top = (h - r) // 2, left = (w - r) // 2
- ``center-crop`` — EDM's ImageNet-64 (Karras et al. 2022, arXiv 2206.00364; its ``dataset_tool.py
  --transform=center-crop``, which also made EDM's published ``imagenet-64x64.npz`` reference statistics): the
  largest central square (rows [(h - c) // 2, (h + c) // 2), c = min(w, h)), then one LANCZOS resize to r x r. The
  default of ``python -m data.prepare imagenet`` (configs/data/imagenet64.yaml). ADM's crop gives other pixels (box
  halving + bicubic against one LANCZOS filter), so an FID against EDM's reference statistics of data prepared with
  ``adm`` is biased.
- ``none`` — the image must already be r x r (an error names the file otherwise).

``data_transform(data_cfg)`` reads which transform made a prepared dataset (its ``meta.json``); reference statistics
record it (``evaluation/reference_stats.py``) and an evaluation against statistics of another transform is refused.

``decode_image`` opens a file's bytes with PIL, forces a full decode (so truncated files fail here rather than
later) and raises ``ValueError("cannot read image '<name>' ...: <PIL's reason>")``.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["TRANSFORMS", "decode_image", "center_crop_adm", "center_crop_edm", "exact_size", "prepare_image",
           "data_transform"]


def decode_image(blob: bytes, name: str, mode: str = "RGB", where: str = ""):
    """``PIL.Image`` of the encoded bytes, fully decoded and converted to ``mode``; ValueError naming the file."""
    from PIL import Image

    suffix = f" in '{where}'" if where else ""
    try:
        with Image.open(io.BytesIO(blob)) as img:
            img.load()
            return img.convert(mode)
    except Exception as e:  # OSError (truncated), UnidentifiedImageError, SyntaxError, DecompressionBombError, ...
        raise ValueError(f"cannot read image '{name}'{suffix}: {type(e).__name__}: {e}") from e


def _as_array(img) -> np.ndarray:
    array = np.asarray(img, dtype=np.uint8)
    return array[:, :, None] if array.ndim == 2 else array


def center_crop_adm(img, resolution: int) -> np.ndarray:
    """ADM's ``center_crop_arr``: box-halve while the short side >= 2r, bicubic to short side r, central crop."""
    from PIL import Image

    while min(img.size) >= 2 * resolution:
        img = img.resize((img.size[0] // 2, img.size[1] // 2), resample=Image.BOX)
    scale = resolution / min(img.size)
    img = img.resize((round(img.size[0] * scale), round(img.size[1] * scale)), resample=Image.BICUBIC)
    array = _as_array(img)
    top = (array.shape[0] - resolution) // 2
    left = (array.shape[1] - resolution) // 2
    return array[top : top + resolution, left : left + resolution]


def center_crop_edm(img, resolution: int) -> np.ndarray:
    """EDM dataset_tool's ``center-crop``: the largest central square, then a LANCZOS resize to r x r."""
    from PIL import Image

    w, h = img.size
    c = min(w, h)
    img = img.crop(((w - c) // 2, (h - c) // 2, (w - c) // 2 + c, (h - c) // 2 + c))
    if img.size != (resolution, resolution):
        img = img.resize((resolution, resolution), resample=Image.LANCZOS)
    return _as_array(img)


def exact_size(img, resolution: int) -> np.ndarray:
    """The image unchanged; ValueError unless it is already ``resolution x resolution``."""
    if img.size != (resolution, resolution):
        raise ValueError(f"is {img.size[0]}x{img.size[1]} (width x height), expected {resolution}x{resolution}")
    return _as_array(img)


TRANSFORMS: dict[str, Callable] = {"adm": center_crop_adm, "center-crop": center_crop_edm, "none": exact_size}


def prepare_image(blob: bytes, name: str, transform: str, resolution: int, channels: int = 3,
                  where: str = "") -> np.ndarray:
    """Decode + transform one file: uint8 ``[C, resolution, resolution]``; ValueError naming the file on failure."""
    if transform not in TRANSFORMS:
        raise ValueError(f"unknown transform {transform!r}; valid: {', '.join(TRANSFORMS)}")
    if channels not in (1, 3):
        raise ValueError(f"channels={channels!r} is not supported; valid: 1 (L), 3 (RGB)")
    img = decode_image(blob, name, "RGB" if channels == 3 else "L", where)
    try:
        array = TRANSFORMS[transform](img, resolution)
    except ValueError as e:
        suffix = f" in '{where}'" if where else ""
        raise ValueError(f"image '{name}'{suffix} {e} (--transform {transform})") from e
    return np.ascontiguousarray(array.transpose(2, 0, 1))


def data_transform(data_cfg: Any, split: str = "train") -> str | None:
    """The ``--transform`` that made the images of a data config's split: ``data.transform`` when the config names
    one, else the one recorded in a prepared dataset's ``meta.json`` (``source.transform``; a prepared CIFAR-10 is
    ``none``); None when it is not known (the digits, an archive, an image folder or zip not made here)."""
    from .dataset import cfg_to_dict
    from .shards import META_FILE, read_meta

    cfg = cfg_to_dict(data_cfg) if data_cfg is not None else {}
    if cfg.get("transform"):
        return str(cfg["transform"])
    path = cfg.get("path") if split == "train" else cfg.get("test_path")
    if not path or not (Path(str(path)).expanduser() / META_FILE).is_file():
        return None
    source = read_meta(Path(str(path)).expanduser()).get("source") or {}
    if source.get("type") == "cifar10":
        return "none"
    transform = source.get("transform")
    return str(transform) if transform else None
