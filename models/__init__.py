"""Denoiser network architectures and the registry that builds them from a ``configs/model/*.yaml`` entry.

Every architecture follows one interface: constructor ``(img_resolution, in_channels, out_channels, label_dim=0,
augment_dim=0, **arch_kwargs)`` and ``forward(x, noise_labels, class_labels=None, augment_labels=None)`` returning a
tensor shaped like ``x``. A model config holds ``name`` (the option's name), ``arch`` (a key of ``ARCHITECTURES``)
and the architecture's keyword arguments.

Architectures (``arch``): ``songunet`` (EDM's DDPM++ / NCSN++, ``models.song_unet``), ``dhariwalunet`` (EDM's ADM,
``models.adm``), ``dit`` (Peebles & Xie's DiT, ``models.dit``), ``edm2unet`` (Karras et al. 2024's
magnitude-preserving EDM2 UNet, arXiv 2312.02696, ``models.edm2``). FLOP counting: ``models.flops``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from configs import build_from_registry, to_plain_dict
from models.adm import DhariwalUNet
from models.dit import DiT
from models.edm2 import EDM2UNet
from models.song_unet import SongUNet

ARCHITECTURES: dict[str, type[nn.Module]] = {
    "songunet": SongUNet, "dhariwalunet": DhariwalUNet, "dit": DiT, "edm2unet": EDM2UNet,
}

# Constructor arguments supplied by build_network itself (from the data), never by the model config.
_DATA_ARGS = ("img_resolution", "in_channels", "out_channels", "label_dim", "augment_dim")
_META_KEYS = ("name", "arch")


def build_network(
    model_cfg: Mapping[str, Any],
    img_resolution: int,
    img_channels: int,
    label_dim: int = 0,
    augment_dim: int = 0,
) -> nn.Module:
    """Build the network described by ``model_cfg`` (a dict or DictConfig with ``arch`` plus arch kwargs).

    in/out channels are both ``img_channels``. Goes through ``configs.build_from_registry`` (selector key ``arch``):
    a missing or unknown ``arch`` and a config key the architecture's constructor does not accept fail with the
    registries' common message; a config that sets one of the data-given arguments fails naming it.
    """
    cfg = to_plain_dict(model_cfg)
    for key in cfg:
        if key in _DATA_ARGS:
            raise ValueError(
                f"model config '{cfg.get('name', '<unnamed>')}' sets '{key}', which comes from the data config; "
                "remove it from the model config"
            )
    return build_from_registry(
        "model", ARCHITECTURES, cfg, key="arch", drop=_META_KEYS,
        img_resolution=img_resolution, in_channels=img_channels, out_channels=img_channels,
        label_dim=label_dim, augment_dim=augment_dim,
    )


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements in ``module`` (buffers such as Fourier frequencies are not counted)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


__all__ = ["ARCHITECTURES", "DhariwalUNet", "DiT", "EDM2UNet", "SongUNet", "build_network", "count_parameters"]
