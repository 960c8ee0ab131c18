"""Denoiser network architectures and the registry that builds them from a ``configs/model/*.yaml`` entry.

Every architecture follows one interface: constructor ``(img_resolution, in_channels, out_channels, label_dim=0,
augment_dim=0, **arch_kwargs)`` and ``forward(x, noise_labels, class_labels=None, augment_labels=None)`` returning a
tensor shaped like ``x``. A model config holds ``name`` (the option's name), ``arch`` (a key of ``ARCHITECTURES``)
and the architecture's keyword arguments.

Architectures (``arch``): ``songunet`` (EDM's DDPM++ / NCSN++, ``models.song_unet``), ``dhariwalunet`` (EDM's ADM,
``models.adm``), ``dit`` (Peebles & Xie's DiT, ``models.dit``). FLOP counting: ``models.flops``.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from torch import nn

from models.adm import DhariwalUNet
from models.dit import DiT
from models.song_unet import SongUNet

ARCHITECTURES: dict[str, type[nn.Module]] = {"songunet": SongUNet, "dhariwalunet": DhariwalUNet, "dit": DiT}

# Constructor arguments supplied by build_network itself (from the data), never by the model config.
_DATA_ARGS = ("img_resolution", "in_channels", "out_channels", "label_dim", "augment_dim")
_META_KEYS = ("name", "arch")


def _to_plain(value: Any) -> Any:
    """OmegaConf containers -> plain Python (lists/dicts) so modules never hold DictConfig/ListConfig values."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        return value
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


def build_network(
    model_cfg: Mapping[str, Any],
    img_resolution: int,
    img_channels: int,
    label_dim: int = 0,
    augment_dim: int = 0,
) -> nn.Module:
    """Build the network described by ``model_cfg`` (a dict or DictConfig with ``arch`` plus arch kwargs).

    in/out channels are both ``img_channels``. Raises ValueError for an unknown ``arch`` (listing the valid ones)
    or for a config key the architecture's constructor does not accept (naming the key and the config).
    """
    cfg = dict(_to_plain(model_cfg))
    cfg_name = cfg.get("name", "<unnamed>")
    if "arch" not in cfg:
        raise ValueError(f"model config '{cfg_name}' has no 'arch' key; valid archs: {', '.join(ARCHITECTURES)}")
    arch = cfg["arch"]
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown model.arch '{arch}' in model config '{cfg_name}'; valid: {', '.join(ARCHITECTURES)}")
    cls = ARCHITECTURES[arch]
    kwargs = {k: v for k, v in cfg.items() if k not in _META_KEYS}
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self" and p not in _DATA_ARGS]
    for key in kwargs:
        if key in _DATA_ARGS:
            raise ValueError(
                f"model config '{cfg_name}' sets '{key}', which comes from the data config; remove it from the model "
                "config"
            )
        if key not in accepted:
            raise ValueError(
                f"unknown key '{key}' in model config '{cfg_name}' (arch '{arch}'); valid keys: {', '.join(accepted)}"
            )
    return cls(
        img_resolution=img_resolution,
        in_channels=img_channels,
        out_channels=img_channels,
        label_dim=label_dim,
        augment_dim=augment_dim,
        **kwargs,
    )


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements in ``module`` (buffers such as Fourier frequencies are not counted)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


__all__ = ["ARCHITECTURES", "DhariwalUNet", "DiT", "SongUNet", "build_network", "count_parameters"]
