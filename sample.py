"""Generate images from a trained sigmalab checkpoint.

    python sample.py ckpt=<run dir or checkpoint file> [seeds=0-63] [sampler=heun sampler.num_steps=18] [class_label=3]

Writes ``<out>/images/<seed>.png`` (one PNG per seed), ``<out>/samples.npz`` (uint8 NHWC ``samples``, ``seeds``,
``labels``) and ``<out>/grid.png``. Image i depends only on seed i (per-image random streams), not on the batch size.
The library entry point is ``generate_images``.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from data import to_uint8
from diffusion.per_image_noise import PerImageNoise
from diffusion.samplers import SAMPLERS, sampler_options
from diffusion.sigma_grids import build_sigma_grid

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"sampler.dtype '{name}' is not supported; valid choices: {', '.join(_DTYPES)}")
    return _DTYPES[name]


def parse_seeds(spec: Any) -> list[int]:
    """'0-63', '0,5,7', '0-9,20-29', an int N (→ 0..N-1) or a list of ints."""
    if isinstance(spec, int):
        return list(range(spec))
    if isinstance(spec, Sequence) and not isinstance(spec, str):
        return [int(s) for s in spec]
    seeds: list[int] = []
    for part in str(spec).split(","):
        part = part.strip()
        if m := re.fullmatch(r"(\d+)-(\d+)", part):
            lo, hi = int(m.group(1)), int(m.group(2))
            if hi < lo:
                raise ValueError(f"bad seed range '{part}': end before start")
            seeds.extend(range(lo, hi + 1))
        elif part.isdigit():
            seeds.append(int(part))
        else:
            raise ValueError(f"bad seeds '{spec}': use e.g. 0-63, 0,5,7 or 0-9,20-29")
    return seeds


@torch.no_grad()
def generate(denoiser: torch.nn.Module, seeds: Sequence[int], *, sampler_cfg: Any, device: torch.device | str,
             class_labels: Tensor | None = None, label_dim: int | None = None) -> Tensor:
    """Sample one batch: model-space images [len(seeds), C, H, W] (float32), image i from seed i."""
    device = torch.device(device)
    label_dim = getattr(denoiser, "label_dim", 0) if label_dim is None else label_dim
    rng = PerImageNoise(seeds, device=device)
    shape = (denoiser.img_channels, denoiser.img_resolution, denoiser.img_resolution)
    dtype = _dtype(str(getattr(sampler_cfg, "dtype", "float64")))
    noise = rng.randn(shape, dtype=dtype)
    onehot = None
    if label_dim:
        if class_labels is None:
            # Unspecified labels: drawn uniformly, from the image's own stream so they too depend only on its seed.
            class_labels = torch.stack([torch.randint(label_dim, (), generator=g, device=device)
                                        for g in rng.generators])
        onehot = torch.nn.functional.one_hot(class_labels.to(device).long(), label_dim).float()
    sigmas = build_sigma_grid(sampler_cfg, dtype=dtype, device=device)
    sampler = SAMPLERS[sampler_cfg.name]
    x = sampler(denoiser, noise, sigmas, class_labels=onehot, randn_like=rng.randn_like,
                **sampler_options(sampler_cfg))
    return x.float()


@torch.no_grad()
def generate_images(denoiser: torch.nn.Module, seeds: Sequence[int], *, sampler_cfg: Any, batch_size: int,
                    device: torch.device | str, class_labels: Tensor | None = None, label_dim: int | None = None,
                    binary: bool = False, progress: bool = False) -> Tensor:
    """uint8 images [N, C, H, W] for ``seeds`` (N = len(seeds)), generated ``batch_size`` at a time.

    ``class_labels`` (int64 [N]) fixes the labels of a conditional model; ``binary`` rounds the output to {0, 255}
    (discrete data); ``progress`` shows a progress bar.
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    seeds = list(seeds)
    if class_labels is not None and len(class_labels) != len(seeds):
        raise ValueError(f"{len(class_labels)} class labels for {len(seeds)} seeds")
    out = []
    starts = range(0, len(seeds), batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="sampling", unit="batch", dynamic_ncols=True)
    for start in starts:
        batch_seeds = seeds[start:start + batch_size]
        labels = None if class_labels is None else class_labels[start:start + batch_size]
        x = generate(denoiser, batch_seeds, sampler_cfg=sampler_cfg, device=device, class_labels=labels,
                     label_dim=label_dim)
        images = to_uint8(x).cpu()
        if binary:
            images = torch.where(images >= 128, 255, 0).to(torch.uint8)
        out.append(images)
    return torch.cat(out) if out else torch.empty(0, dtype=torch.uint8)


def make_grid(images: Tensor, nrow: int | None = None, padding: int = 1) -> Tensor:
    """uint8 [N, C, H, W] → one uint8 [C, H', W'] grid (roughly square unless ``nrow`` is given)."""
    import torchvision

    nrow = nrow or max(1, int(math.ceil(math.sqrt(len(images)))))
    return torchvision.utils.make_grid(images, nrow=nrow, padding=padding, pad_value=255)


def save_png(image: Tensor, path: str | os.PathLike, upscale: int = 1) -> None:
    """Write one uint8 [C, H, W] image (C = 1 or 3); ``upscale`` enlarges it with nearest-neighbour for viewing."""
    from PIL import Image

    array = image.permute(1, 2, 0).cpu().numpy()
    img = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
    if upscale > 1:
        img = img.resize((img.width * upscale, img.height * upscale), Image.NEAREST)
    img.save(path)


def save_grid(images: Tensor, path: str | os.PathLike, nrow: int | None = None) -> None:
    """A grid PNG of uint8 images; small images (e.g. 8x8 digits) are enlarged so the grid is legible."""
    grid = make_grid(images, nrow=nrow)
    upscale = max(1, 256 // max(grid.shape[1:]))
    save_png(grid, path, upscale=min(upscale, 8))


def write_samples(images: Tensor, seeds: Sequence[int], labels: Tensor | None, out_dir: str | os.PathLike,
                  write_pngs: bool = True) -> Path:
    """Write PNGs, ``samples.npz`` and ``grid.png`` into ``out_dir``; returns the npz path."""
    import numpy as np

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if write_pngs:
        (out_dir / "images").mkdir(exist_ok=True)
        for img, seed in zip(images, seeds, strict=True):
            save_png(img, out_dir / "images" / f"{seed:06d}.png")
    npz_path = out_dir / "samples.npz"
    np.savez(npz_path, samples=images.permute(0, 2, 3, 1).numpy(), seeds=np.asarray(list(seeds), dtype=np.int64),
             labels=np.asarray([] if labels is None else labels.cpu().numpy(), dtype=np.int64))
    save_grid(images[:256], out_dir / "grid.png")
    return npz_path


def main(cfg: Any) -> Path:
    from models.checkpoint import load_denoiser
    from models.distributed import resolve_device

    if cfg.ckpt is None:
        raise ValueError("ckpt is required: pass ckpt=<run directory or checkpoint file>")
    device = resolve_device(cfg.device)
    denoiser, run_cfg = load_denoiser(cfg.ckpt, ema=cfg.ema, device=device)
    seeds = parse_seeds(cfg.seeds)
    labels = None
    if cfg.class_label is not None:
        if not denoiser.label_dim:
            raise ValueError("class_label given but the checkpoint's model is unconditional (trained with "
                             "data.cond=false)")
        if not 0 <= int(cfg.class_label) < denoiser.label_dim:
            raise ValueError(f"class_label must be in [0, {denoiser.label_dim - 1}], got {cfg.class_label}")
        labels = torch.full((len(seeds),), int(cfg.class_label), dtype=torch.long)
    binary = bool(run_cfg.data.get("binarize", False))
    images = generate_images(denoiser, seeds, sampler_cfg=cfg.sampler, batch_size=cfg.batch, device=device,
                             class_labels=labels, binary=binary, progress=True)
    out_dir = Path(cfg.out) if cfg.out else _default_out_dir(cfg.ckpt)
    npz = write_samples(images, seeds, labels, out_dir, write_pngs=cfg.write_pngs)
    print(f"wrote {len(images)} samples to {out_dir} ({npz.name}, grid.png"
          + (", images/*.png)" if cfg.write_pngs else ")"))
    return npz


def _default_out_dir(ckpt: str) -> Path:
    path = Path(ckpt)
    run_dir = path if path.is_dir() else path.parent.parent
    return run_dir / "samples"


if __name__ == "__main__":
    import hydra

    hydra.main(version_base="1.3", config_path="configs", config_name="sample")(main)()
