"""Turning a denoiser into images: per-image seeds, batching, guidance, latent decoding, PNGs and grids.

One implementation for everyone who samples: ``sample.py``, the Trainer's snapshot grids and the evaluation
protocol (``evaluation.protocol``). Image i depends only on seed i (per-image random streams,
``diffusion.per_image_noise``), never on the batch size or on how the seeds are split over processes. The samplers
themselves (Karras et al. 2022, arXiv 2206.00364, Algorithms 1-2, and the others) are ``diffusion.samplers``; step
placement is ``diffusion.sigma_grids``; guidance ``diffusion.guidance``.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from configs import jsonable, to_plain_dict
from data import LatentCodec, to_uint8
from diffusion.guidance import apply_guidance, guidance_settings
from diffusion.per_image_noise import PerImageNoise
from diffusion.run_state import infonoise_from_run_state
from diffusion.samplers import NFECounter, resolve_sampler
from diffusion.sigma_grids import build_sigma_grid, parse_infogrid
from training.checkpoint import load_checkpoint, load_denoiser

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


@dataclass
class SamplingSetup:
    """Everything that is the same for every batch of one ``generate_images`` call."""

    sampler: Callable[..., Tensor]
    options: dict[str, Any]
    sigmas: Tensor
    denoiser: Callable[..., Tensor]  # the (guided) denoiser the sampler calls
    main_counter: NFECounter
    guide_counter: NFECounter | None
    label_dim: int

    def reset(self) -> None:
        self.main_counter.reset()
        if self.guide_counter is not None:
            self.guide_counter.reset()


def load_guide(sampler_cfg: Any, device: torch.device | str, ema: bool = True) -> torch.nn.Module | None:
    """The autoguidance model named by ``sampler.guide_ckpt`` (None if it names none)."""
    _, _, guide_ckpt = guidance_settings(sampler_cfg)
    if guide_ckpt is None:
        return None
    guide, _ = load_denoiser(guide_ckpt, ema=ema, device=device)
    return guide


def grid_context(denoiser: Any) -> dict[str, Any]:
    """What a schedule-placed σ grid (``sampler.steps_from=<schedule>``) is built with, from the denoiser: the
    network's resolution, the images' pixel resolution (latent models: the decoded images') and σ_data."""
    context = {"img_resolution": getattr(denoiser, "img_resolution", None),
               "image_resolution": (getattr(denoiser, "latent_info", None) or {}).get("image_resolution"),
               "sigma_data": getattr(denoiser, "sigma_data", None)}
    return {k: v for k, v in context.items() if v is not None}


def prepare_sampling(denoiser: Callable[..., Tensor], sampler_cfg: Any, *, device: torch.device | str,
                     label_dim: int | None = None, guide: Callable[..., Tensor] | None = None,
                     profile_schedule: Any = None) -> SamplingSetup:
    """Resolve a sampler config once: the sampler function, its options, the σ grid and the counted, guided
    denoiser. ``guide`` is the autoguidance model (loaded from ``sampler.guide_ckpt`` if that is set and it is None);
    ``profile_schedule`` is an InfoNoise run's profile for ``sampler.steps_from=infonoise``."""
    device = torch.device(device)
    sampler, options = resolve_sampler(sampler_cfg)
    dtype = _dtype(str(to_plain_dict(sampler_cfg).get("dtype") or "float64"))
    sigmas = build_sigma_grid(sampler_cfg, dtype=dtype, device=device, profile_schedule=profile_schedule,
                              schedule_context=grid_context(denoiser))
    if guide is None:
        guide = load_guide(sampler_cfg, device)
    main_counter = NFECounter(denoiser)
    guide_counter = None if guide is None else NFECounter(guide)
    label_dim = getattr(denoiser, "label_dim", 0) if label_dim is None else label_dim
    if label_dim:
        main_counter.label_dim = label_dim  # an explicit label_dim overrides the model's (e.g. analytic denoisers)
    guided = apply_guidance(main_counter, sampler_cfg, guide=guide_counter)
    return SamplingSetup(sampler, options, sigmas, guided, main_counter, guide_counter, int(label_dim or 0))


def _sample_batch(setup: SamplingSetup, denoiser: Callable[..., Tensor], seeds: Sequence[int],
                  device: torch.device, class_labels: Tensor | None) -> Tensor:
    """One batch of model-space images [len(seeds), C, H, W] (float32); image i depends only on seed i."""
    rng = PerImageNoise(seeds, device=device)
    shape = (denoiser.img_channels, denoiser.img_resolution, denoiser.img_resolution)
    noise = rng.randn(shape, dtype=setup.sigmas.dtype)
    onehot = None
    if setup.label_dim:
        if class_labels is None:
            # Unspecified labels: drawn uniformly, from the image's own stream so they too depend only on its seed.
            class_labels = torch.stack([torch.randint(setup.label_dim, (), generator=g, device=device)
                                        for g in rng.generators])
        onehot = torch.nn.functional.one_hot(class_labels.to(device).long(), setup.label_dim).float()
    x = setup.sampler(setup.denoiser, noise, setup.sigmas, class_labels=onehot, randn_like=rng.randn_like,
                      **setup.options)
    return x.float()


@torch.no_grad()
def generate(denoiser: torch.nn.Module, seeds: Sequence[int], *, sampler_cfg: Any, device: torch.device | str,
             class_labels: Tensor | None = None, label_dim: int | None = None) -> Tensor:
    """Sample one batch: model-space images [len(seeds), C, H, W] (float32), image i from seed i."""
    setup = prepare_sampling(denoiser, sampler_cfg, device=device, label_dim=label_dim)
    return _sample_batch(setup, denoiser, seeds, torch.device(device), class_labels)


@torch.no_grad()
def generate_images(denoiser: torch.nn.Module, seeds: Sequence[int], *, sampler_cfg: Any, batch_size: int,
                    device: torch.device | str, class_labels: Tensor | None = None, label_dim: int | None = None,
                    binary: bool = False, progress: bool = False, guide: torch.nn.Module | None = None,
                    profile_schedule: Any = None, info: dict[str, Any] | None = None,
                    latent_codec: Any = None) -> Tensor:
    """uint8 images [N, C, H, W] for ``seeds`` (N = len(seeds)), generated ``batch_size`` at a time.

    ``class_labels`` (int64 [N]) fixes the labels of a conditional model; ``binary`` rounds the output to {0, 255}
    (discrete data); ``progress`` shows a progress bar. ``guide`` is the autoguidance model (default: loaded from
    ``sampler.guide_ckpt`` when set); ``profile_schedule`` the InfoNoise profile for ``sampler.steps_from=infonoise``.
    ``latent_codec`` (``data.LatentCodec``) decodes the samples of a latent-space model into uint8 RGB images.
    If ``info`` is a dict it receives the sampling facts: ``nfe`` (network evaluations per image, guide included),
    ``nfe_main``, ``nfe_guide``, ``num_steps`` and the σ grid ``sigmas``.
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    seeds = list(seeds)
    if class_labels is not None and len(class_labels) != len(seeds):
        raise ValueError(f"{len(class_labels)} class labels for {len(seeds)} seeds")
    device = torch.device(device)
    setup = prepare_sampling(denoiser, sampler_cfg, device=device, label_dim=label_dim, guide=guide,
                             profile_schedule=profile_schedule)
    out = []
    main_evals = guide_evals = 0
    bar = None
    if progress:  # images/s and ETA; tqdm shows it only on a terminal
        from tqdm import tqdm

        bar = tqdm(total=len(seeds), desc="sampling", unit="img", dynamic_ncols=True, leave=False, disable=None)
    for start in range(0, len(seeds), batch_size):
        batch_seeds = seeds[start:start + batch_size]
        labels = None if class_labels is None else class_labels[start:start + batch_size]
        setup.reset()
        x = _sample_batch(setup, denoiser, batch_seeds, device, labels)
        main_evals += setup.main_counter.images
        guide_evals += 0 if setup.guide_counter is None else setup.guide_counter.images
        images = (latent_codec.decode(x) if latent_codec is not None else to_uint8(x)).cpu()
        if binary:
            images = torch.where(images >= 128, 255, 0).to(torch.uint8)
        out.append(images)
        if bar is not None:
            bar.update(len(batch_seeds))
    if bar is not None:
        bar.close()
    if info is not None:
        n = max(len(seeds), 1)
        nfe_main, nfe_guide = main_evals / n, guide_evals / n
        info.update(nfe=_int_if_whole(nfe_main + nfe_guide), nfe_main=_int_if_whole(nfe_main),
                    nfe_guide=_int_if_whole(nfe_guide), num_steps=len(setup.sigmas) - 1,
                    sigmas=[float(s) for s in setup.sigmas])
    return torch.cat(out) if out else torch.empty(0, dtype=torch.uint8)


def latent_codec_for(denoiser: torch.nn.Module, device: torch.device | str) -> Any:
    """The SD-VAE decoder of a latent-space model (from its checkpoint's ``latent_info``), or None for pixel models."""
    info = getattr(denoiser, "latent_info", None)
    if not info:
        return None
    return LatentCodec.from_info(info, device=device)


def _int_if_whole(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)


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
    upscale = max(1, 512 // max(grid.shape[1:]))
    save_png(grid, path, upscale=min(upscale, 8))


def write_samples(images: Tensor, seeds: Sequence[int], labels: Tensor | None, out_dir: str | os.PathLike,
                  write_pngs: bool = True, metadata: dict[str, Any] | None = None) -> Path:
    """Write PNGs, ``samples.npz`` and ``grid.png`` into ``out_dir``; returns the npz path.

    ``metadata`` (e.g. the sampler config and the ``info`` of ``generate_images``) is written to ``samples.json``;
    its ``nfe`` is also stored in the npz.
    """
    import numpy as np

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if write_pngs:
        (out_dir / "images").mkdir(exist_ok=True)
        for img, seed in zip(images, seeds, strict=True):
            save_png(img, out_dir / "images" / f"{seed:06d}.png")
    npz_path = out_dir / "samples.npz"
    arrays = {"samples": images.permute(0, 2, 3, 1).numpy(), "seeds": np.asarray(list(seeds), dtype=np.int64),
              "labels": np.asarray([] if labels is None else labels.cpu().numpy(), dtype=np.int64)}
    if metadata is not None and metadata.get("nfe") is not None:
        arrays["nfe"] = np.asarray(metadata["nfe"], dtype=np.float64)
    np.savez(npz_path, **arrays)
    if metadata is not None:
        with open(out_dir / "samples.json", "w") as f:
            json.dump(jsonable(metadata), f, indent=2)
            f.write("\n")
    save_grid(images[:256], out_dir / "grid.png")
    return npz_path


def load_profile_schedule(ckpt: str | os.PathLike, steps_from: str = "infonoise",
                          device: torch.device | str = "cpu") -> Any:
    """The InfoGrid step-placement density of an InfoNoise run, for ``sampler.steps_from=infonoise[:variant[:w]]``.

    Rebuilds the run's InfoNoise schedule from the checkpoint (``diffusion.run_state.infonoise_from_run_state``)
    and returns its ``step_density(variant, edm_weight=w)``, a ``TabulatedLogSigma`` whose equal-mass quantiles
    are the steps.
    """
    parsed = parse_infogrid(steps_from)
    if parsed is None:
        raise ValueError(f"sampler.steps_from={steps_from} does not name an InfoGrid (infonoise[:variant[:w]])")
    variant, weight = parsed
    schedule = infonoise_from_run_state(load_checkpoint(ckpt), device=device)
    return schedule.step_density(variant, **({} if weight is None else {"edm_weight": weight}))
