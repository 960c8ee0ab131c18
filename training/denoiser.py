"""Building a denoiser from a run config: the network of ``models`` wrapped in the preconditioning of ``diffusion``
(and, for ``weighting=edm2_uncertainty``, the small learned u(σ) network the loss weighting uses).

This is where the two layers meet (Karras et al. 2022, arXiv 2206.00364, Sec. 5 and Table 1: D = c_skip·x +
c_out·F(c_in·x; c_noise)): ``models`` knows nothing of σ and ``diffusion.preconditioning`` wraps whatever network it
is given.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from diffusion.preconditioning import Preconditioner, build_preconditioner
from models import build_network
from models.edm2 import EDM2LogVar


def build_denoiser(cfg: Any, img_resolution: int, img_channels: int, label_dim: int = 0,
                   augment_dim: int = 0, latent_info: Mapping[str, Any] | None = None) -> Preconditioner:
    """A freshly initialised denoiser from a full run config (its ``model`` and ``precond`` groups).

    ``latent_info`` (latent datasets: the VAE, normalisation and the decoded images' ``image_resolution``) travels
    with it, so that samples can be decoded and a resolution-dependent sampling grid (``sampler.steps_from=
    cosine_shifted``) sees the same pixel resolution as training did."""
    net = build_network(cfg.model if hasattr(cfg, "model") else cfg["model"], img_resolution=img_resolution,
                        img_channels=img_channels, label_dim=label_dim, augment_dim=augment_dim)
    precond = cfg.precond if hasattr(cfg, "precond") else cfg["precond"]
    denoiser = build_preconditioner(precond, net)
    # The data geometry travels with the denoiser so that samplers know what to generate.
    denoiser.img_resolution = int(img_resolution)
    denoiser.img_channels = int(img_channels)
    denoiser.label_dim = int(label_dim)
    denoiser.augment_dim = int(augment_dim)
    denoiser.latent_info = None if latent_info is None else dict(latent_info)
    return denoiser


def denoiser_from_geometry(cfg: Any, geometry: Mapping[str, Any]) -> Preconditioner:
    """``build_denoiser`` from a checkpoint's ``geometry`` entry (resolution, channels, labels, latent info)."""
    return build_denoiser(cfg, img_resolution=geometry["img_resolution"], img_channels=geometry["img_channels"],
                          label_dim=geometry["label_dim"], augment_dim=geometry.get("augment_dim", 0),
                          latent_info=geometry.get("latent_info"))


def build_uncertainty(cfg: Any) -> nn.Module | None:
    """The learned u(σ) of ``weighting=edm2_uncertainty`` (EDM2's head, ``models.edm2.EDM2LogVar`` with
    ``weighting.channels`` Fourier features; Karras et al. 2024, arXiv 2312.02696, Sec. 2, config B), freshly
    initialised; None for every other weighting. The trainer optimises it with the denoiser and hands it to the
    weighting (``diffusion.weighting.EDM2UncertaintyWeighting``), which feeds it c_noise = ln σ / 4."""
    weighting = cfg.weighting if hasattr(cfg, "weighting") else cfg["weighting"]
    if weighting.get("name") != "edm2_uncertainty":
        return None
    return EDM2LogVar(int(weighting.get("channels", 128)))
