"""What a run says about itself: the dataset and parameter count (logged at the start of a run), the FLOPs of one
forward, and the summary that ``dry_run=true`` prints (``training.trainer.train``)."""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import OmegaConf

from models import count_parameters


def describe(denoiser: torch.nn.Module, dataset: Any, uncertainty: torch.nn.Module | None = None) -> str:
    """The dataset and the trained parameter count. With ``weighting=edm2_uncertainty`` the learned u(σ) is counted
    apart and in the total, the total being EDM2's count (its preconditioned network holds both; Karras et al. 2024,
    arXiv 2312.02696, Sec. 2, config B)."""
    params = f"parameters: {count_parameters(denoiser)}"
    if uncertainty is not None:
        extra = count_parameters(uncertainty)
        params += f" + {extra} of the learned u(sigma) = {count_parameters(denoiser) + extra}"
    return (f"dataset: {dataset.name} ({len(dataset)} images, {dataset.num_channels}x{dataset.resolution}x"
            f"{dataset.resolution}, {dataset.label_dim or 'no'} class labels)\n{params}")


def flops_line(net: torch.nn.Module, dataset: Any, label_dim: int) -> str:
    """'GFLOPs per forward' of one image, in DiT's convention (multiply-adds), measured with torch's FLOP counter."""
    try:
        from models.flops import count_flops
    except ImportError:
        return ""
    try:
        flops = count_flops(net, img_resolution=dataset.resolution, img_channels=dataset.num_channels,
                            label_dim=label_dim)
    except Exception as err:  # noqa: BLE001 - FLOP counting is informative only
        return f"GFLOPs per forward: unavailable ({err})"
    return (f"GFLOPs per forward: {flops / 2e9:.3f} (multiply-adds per image, DiT's convention; "
            f"{flops / 1e9:.3f} counting a multiply-add as 2)")


def print_summary(trainer: Any) -> None:
    """What ``dry_run=true`` prints: the resolved config, the schedule, weighting, augmentation, data and model."""
    print(OmegaConf.to_yaml(trainer.cfg, resolve=True))
    print(f"schedule: {trainer.schedule}\nweighting: {trainer.weighting}")
    if trainer.augment is not None:
        print(f"augmentation: {trainer.augment}")
    print(describe(trainer.denoiser, trainer.dataset, trainer.uncertainty))
    flops = flops_line(trainer.denoiser.net, trainer.dataset, trainer.label_dim)
    if flops:
        print(flops)
