"""Generate images from a trained sigmalab checkpoint.

    python sample.py ckpt=<run dir | checkpoint | .safetensors> [seeds=0-63] [sampler.num_steps=18] [class_label=3]
    python sample.py ckpt=... sampler=dpmpp_2m sampler.num_steps=10
    python sample.py ckpt=... sampler=ddim sampler.num_steps=50 sampler.steps_from=cosine sampler.t_max=0.99
    python sample.py ckpt=... sampler.guidance=2 sampler.guidance_interval=[0.3,5]     # CFG (conditional model)
    python sample.py ckpt=... sampler.guidance=2 sampler.guide_ckpt=<weaker run>       # autoguidance
    python sample.py ckpt=<run trained with train.ema=power> ema.sigma_rel=0.08 [ema.at_kimg=...]  # post-hoc EMA

The sampler is the run's own (its config's ``sampler`` group), as ``evaluate.py ckpt=`` uses it, so both give the
same images for the same seeds; ``sampler=<option>`` or ``sampler.<key>=`` on the command line replace the option or
change those keys. Samplers: heun, euler, ddim, euler_ancestral, dpmpp_2m (``diffusion.samplers``); step placement
``sampler.steps_from`` (``diffusion.sigma_grids``); guidance (``diffusion.guidance``). The number of network
evaluations per image (NFE, counted, guidance passes included) is printed.

Writes ``<out>/images/<seed>.png`` (one PNG per seed), ``<out>/samples.npz`` (uint8 NHWC ``samples``, ``seeds``,
``labels``, ``nfe``), ``<out>/samples.json`` (checkpoint and the training images it had seen, sampler config, NFE,
σ grid) and ``<out>/grid.png``; ``out`` defaults to ``<run>/samples`` inside the run the checkpoint belongs to
(``<run>`` for ``<run>/ema.safetensors``, two levels up for ``<run>/checkpoints/checkpoint-*.pt``). Image i depends
only on seed i (per-image random streams), not on the batch size. The library entry point is
``training.generate.generate_images``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from configs import to_plain_dict
from diffusion.sigma_grids import parse_infogrid
from evaluation.provenance import checkpoint_info, run_dir_of
from evaluation.settings import run_group
from training.checkpoint import load_denoiser, resolve_checkpoint
from training.distributed import resolve_device
from training.generate import (
    generate_images,
    latent_codec_for,
    load_guide,
    load_profile_schedule,
    parse_seeds,
    write_samples,
)
from training.posthoc_ema import ema_choice, load_posthoc_denoiser


def main(cfg: Any) -> Path:
    if cfg.ckpt is None:
        raise ValueError("ckpt is required: pass ckpt=<run directory or checkpoint file>")
    device = resolve_device(cfg.device)
    ckpt_path = resolve_checkpoint(cfg.ckpt)
    ema = ema_choice(cfg.ema)  # true | false | {sigma_rel, at_kimg}: a post-hoc EMA from the run's snapshots
    if ema.posthoc:
        denoiser, run_cfg, phema = load_posthoc_denoiser(cfg.ckpt, ema.sigma_rel, ema.at_kimg, device=device)
        print(f"post-hoc EMA σ_rel={ema.sigma_rel} (γ={phema['gamma']:.3f}) at {phema['at_kimg']:g} kimg from "
              f"{phema['num_snapshots']} snapshots, profile fit residual {phema['fit_residual']:.2e}")
    else:
        denoiser, run_cfg = load_denoiser(ckpt_path, ema=ema.use_ema, device=device)
    # The run's own sampler, as evaluate.py ckpt= uses it; sampler=... / sampler.<key>=... on the command line win.
    sampler_cfg = run_group(run_cfg.get("sampler"), cfg.sampler, _overrides(), "sampler")
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
    guide = load_guide(sampler_cfg, device, ema=ema.use_ema)
    profile = None
    steps_from = to_plain_dict(sampler_cfg).get("steps_from")
    if parse_infogrid(steps_from) is not None:
        profile = load_profile_schedule(ckpt_path, steps_from, device)
    codec = latent_codec_for(denoiser, device)
    info: dict[str, Any] = {}
    images = generate_images(denoiser, seeds, sampler_cfg=sampler_cfg, batch_size=cfg.batch, device=device,
                             class_labels=labels, binary=binary, progress=True, guide=guide,
                             profile_schedule=profile, info=info, latent_codec=codec)
    sampler = to_plain_dict(sampler_cfg)
    w = 1.0 if sampler.get("guidance") is None else float(sampler["guidance"])
    guidance = "" if w == 1.0 else (
        f", guidance {sampler['guidance']}" + (" (autoguidance)" if guide is not None else " (CFG)"))
    print(f"sampler {sampler['name']}: {info['num_steps']} steps from σ={info['sigmas'][0]:.4g} "
          f"(steps_from={sampler.get('steps_from') or 'rho'}){guidance}; NFE {info['nfe']} network evaluations "
          f"per image" + (f" ({info['nfe_main']} main + {info['nfe_guide']} guide)" if guide is not None else ""))
    ema_record = {"sigma_rel": ema.sigma_rel, "at_kimg": phema["at_kimg"]} if ema.posthoc else ema.use_ema
    metadata = {"ckpt": str(ckpt_path), "cur_nimg": checkpoint_info(ckpt_path)["progress"].get("cur_nimg"),
                "ema": ema_record, "seeds": str(cfg.seeds), "class_label": cfg.class_label,
                "guide_ckpt": sampler.get("guide_ckpt"), "sampler": sampler, **info}
    out_dir = Path(cfg.out) if cfg.out else _default_out_dir(cfg.ckpt, ema.sigma_rel)
    npz = write_samples(images, seeds, labels, out_dir, write_pngs=cfg.write_pngs, metadata=metadata)
    print(f"wrote {len(images)} samples to {out_dir} ({npz.name}, samples.json, grid.png"
          + (", images/*.png)" if cfg.write_pngs else ")"))
    return npz


def _default_out_dir(ckpt: str, sigma_rel: float | None = None) -> Path:
    """``<run>/samples``: the run of a run directory, of ``<run>/checkpoints/<file>`` or of ``<run>/<file>``."""
    run_dir = run_dir_of(ckpt)
    return run_dir / ("samples" if sigma_rel is None else f"samples-phema{sigma_rel:g}")


def _overrides() -> list[str]:
    """The command-line overrides of this Hydra job (none when ``main`` is called without Hydra)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except (ImportError, ValueError):
        return []


if __name__ == "__main__":
    import hydra

    hydra.main(version_base="1.3", config_path="configs", config_name="sample")(main)()
