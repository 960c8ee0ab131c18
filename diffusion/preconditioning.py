"""Network preconditioning: the denoiser D(x; σ) = c_skip(σ)·x + c_out(σ)·F(c_in(σ)·x; c_noise(σ)).

Karras et al. (2022), Table 1. F is the raw network; the four coefficients decide what F effectively predicts and
keep its inputs and targets at unit variance. EDM's choice (σ_d = σ_data, the data standard deviation):

    c_skip = σ_d² / (σ² + σ_d²)      c_out = σ·σ_d / √(σ² + σ_d²)
    c_in   = 1 / √(σ² + σ_d²)         c_noise = ¼·ln σ

With EDM's loss weight λ(σ) = 1/c_out(σ)² the training target of F, (y − c_skip·x)/c_out, has unit variance.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from configs import build_from_registry


class Preconditioner(nn.Module):
    """Wraps a network F into a denoiser D(x; σ); subclasses define ``coefficients(σ)``."""

    name = "base"

    def __init__(self, net: nn.Module, sigma_data: float = 0.5):
        super().__init__()
        if not sigma_data > 0:
            raise ValueError(f"precond.sigma_data must be > 0, got {sigma_data}")
        self.net = net
        self.sigma_data = float(sigma_data)

    def coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(c_skip, c_out, c_in, c_noise) at noise level σ (broadcastable tensors)."""
        raise NotImplementedError

    def forward(self, x: Tensor, sigma: Tensor, class_labels: Tensor | None = None,
                augment_labels: Tensor | None = None) -> Tensor:
        """D(x; σ). ``x`` may be float64 (samplers); the network runs in float32 and D is returned in x's dtype."""
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1, 1, 1, 1)
        if sigma.shape[0] == 1 and x.shape[0] != 1:
            sigma = sigma.expand(x.shape[0], 1, 1, 1)
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        net_dtype = torch.float32
        F = self.net((c_in * x).to(net_dtype), c_noise.flatten().to(net_dtype), class_labels=class_labels,
                     augment_labels=augment_labels)
        return c_skip * x + c_out * F.to(x.dtype)


class EDMPrecond(Preconditioner):
    """EDM's preconditioning (Karras et al. 2022, Table 1, column "ours")."""

    name = "edm"

    def coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        sd2 = self.sigma_data**2
        c_skip = sd2 / (sigma**2 + sd2)
        c_out = sigma * self.sigma_data / (sigma**2 + sd2).sqrt()
        c_in = 1.0 / (sigma**2 + sd2).sqrt()
        c_noise = sigma.log() / 4.0
        return c_skip, c_out, c_in, c_noise


PRECONDITIONERS: dict[str, type[Preconditioner]] = {
    "edm": EDMPrecond,
}


def build_preconditioner(precond_cfg: Any, net: nn.Module) -> Preconditioner:
    """Wrap ``net`` with the preconditioning named by ``precond_cfg.name``."""
    return build_from_registry("precond", PRECONDITIONERS, precond_cfg, net=net)


def build_denoiser(cfg: Any, img_resolution: int, img_channels: int, label_dim: int = 0,
                   augment_dim: int = 0) -> Preconditioner:
    """A freshly initialised denoiser from a full run config (its ``model`` and ``precond`` groups)."""
    from models import build_network

    net = build_network(cfg.model if hasattr(cfg, "model") else cfg["model"], img_resolution=img_resolution,
                        img_channels=img_channels, label_dim=label_dim, augment_dim=augment_dim)
    precond = cfg.precond if hasattr(cfg, "precond") else cfg["precond"]
    denoiser = build_preconditioner(precond, net)
    # The data geometry travels with the denoiser so that samplers know what to generate.
    denoiser.img_resolution = int(img_resolution)
    denoiser.img_channels = int(img_channels)
    denoiser.label_dim = int(label_dim)
    denoiser.augment_dim = int(augment_dim)
    return denoiser
