"""Guidance as a denoiser wrapper, so that every sampler gets it: classifier-free guidance and autoguidance.

Both extrapolate from a reference denoiser D_ref towards the main one with guidance weight w:

    D_g(x; σ, c) = D_ref(x; σ) + w·(D(x; σ, c) − D_ref(x; σ)),

- **classifier-free guidance** (Ho & Salimans 2022): D_ref = the same network with the null label, an all-zero
  one-hot vector (the training loop's label dropout zeroes the one-hot vector, ``train.label_dropout``). In score
  terms D_g − x = σ²·∇ log(p_σ(x|c)^w·p_σ(x)^(1−w)).
- **autoguidance** (Karras et al. 2024, EDM2 ``guidance`` with a second network ``gnet``): D_ref = a second, weaker
  denoiser (a smaller or less-trained model, ``sampler.guide_ckpt``), given the same class labels — or none, if it is
  an unconditional model, which is CFG with a separate unconditional network.

w = 1 is no guidance (only D is evaluated), w = 0 returns D_ref. The **guidance interval** (Kynkäänniemi et al. 2024)
applies guidance only for σ_lo ≤ σ ≤ σ_hi and returns D outside it. Each guided evaluation costs two network
evaluations (D and D_ref); ``diffusion.samplers.NFECounter`` around each network counts them.

Config keys (``configs/sampler/*.yaml``): ``guidance`` (w, 1 = off), ``guidance_interval`` (null or [σ_lo, σ_hi]),
``guide_ckpt`` (null, or a checkpoint / run directory for autoguidance; loaded by ``sample.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from configs import to_plain_dict

Denoiser = Callable[..., Tensor]


def _check_interval(interval: Sequence[float] | None) -> tuple[float, float] | None:
    if interval is None:
        return None
    try:
        lo, hi = (float(v) for v in interval)
    except (TypeError, ValueError):
        raise ValueError(f"sampler.guidance_interval must be null or [sigma_lo, sigma_hi], got {interval!r}") from None
    if not 0 <= lo < hi:
        raise ValueError(f"sampler.guidance_interval needs 0 <= sigma_lo < sigma_hi, got [{lo}, {hi}]")
    return lo, hi


class GuidedDenoiser:
    """D_g = D_ref + w·(D − D_ref) inside the guidance interval, D outside; D_ref as in the module docstring.

    Args:
        denoiser: the main (conditional, for CFG) denoiser D(x, σ, class_labels=...).
        guidance: w.
        interval: None (guide at every σ) or (σ_lo, σ_hi).
        guide: None for classifier-free guidance, or the weaker denoiser for autoguidance.
    """

    def __init__(self, denoiser: Denoiser, guidance: float, interval: Sequence[float] | None = None,
                 guide: Denoiser | None = None):
        if not math.isfinite(float(guidance)):
            raise ValueError(f"sampler.guidance must be a finite number, got {guidance}")
        self.denoiser = denoiser
        self.guidance = float(guidance)
        self.interval = _check_interval(interval)
        self.guide = guide
        for attr in ("img_resolution", "img_channels", "label_dim", "sigma_data"):
            if hasattr(denoiser, attr):
                setattr(self, attr, getattr(denoiser, attr))
        label_dim = getattr(denoiser, "label_dim", None)
        if guide is None and label_dim == 0 and self.guidance != 1.0:
            raise ValueError(f"sampler.guidance={self.guidance} (classifier-free guidance) needs a class-conditional "
                             "model (data.cond=true, trained with train.label_dropout > 0); this model is "
                             "unconditional. Use sampler.guide_ckpt=<weaker checkpoint> for autoguidance.")
        if guide is not None:
            for attr in ("img_resolution", "img_channels"):
                a, b = getattr(denoiser, attr, None), getattr(guide, attr, None)
                if a is not None and b is not None and a != b:
                    raise ValueError(f"the guide model's {attr} ({b}) differs from the main model's ({a})")
            guide_labels = getattr(guide, "label_dim", None)
            if guide_labels and label_dim is not None and guide_labels != label_dim:
                raise ValueError(f"the guide model has label_dim {guide_labels} but the main model {label_dim}")

    def _reference(self, x: Tensor, sigma: Tensor, class_labels: Tensor | None) -> Tensor:
        if self.guide is not None:
            labels = class_labels if getattr(self.guide, "label_dim", 1) else None
            return self.guide(x, sigma, class_labels=labels).to(x.dtype)
        if class_labels is None:
            raise ValueError("classifier-free guidance needs class labels (a conditional model)")
        return self.denoiser(x, sigma, class_labels=torch.zeros_like(class_labels)).to(x.dtype)

    def _inside(self, x: Tensor, sigma: Tensor) -> Tensor:
        """Per-image mask [N, 1, ..., 1] of the images whose σ lies in the guidance interval."""
        sigma = torch.as_tensor(sigma, device=x.device).reshape(-1)
        sigma = sigma.expand(x.shape[0]) if sigma.numel() == 1 else sigma
        if self.interval is None:
            inside = torch.ones_like(sigma, dtype=torch.bool)
        else:
            inside = (sigma >= self.interval[0]) & (sigma <= self.interval[1])
        return inside.reshape(-1, *([1] * (x.ndim - 1)))

    def __call__(self, x: Tensor, sigma: Tensor, class_labels: Tensor | None = None, **kwargs: Any) -> Tensor:
        if self.guidance == 1.0:
            return self.denoiser(x, sigma, class_labels=class_labels, **kwargs)
        inside = self._inside(x, sigma)
        if not bool(inside.any()):
            return self.denoiser(x, sigma, class_labels=class_labels, **kwargs)
        d_ref = self._reference(x, sigma, class_labels)
        if self.guidance == 0.0 and bool(inside.all()):
            return d_ref
        d_main = self.denoiser(x, sigma, class_labels=class_labels, **kwargs).to(x.dtype)
        guided = d_ref + self.guidance * (d_main - d_ref)
        return guided if bool(inside.all()) else torch.where(inside, guided, d_main)


def guidance_settings(sampler_cfg: Any) -> tuple[float, tuple[float, float] | None, str | None]:
    """(w, interval, guide_ckpt) of a sampler config; absent keys mean no guidance."""
    cfg = to_plain_dict(sampler_cfg)
    w = cfg.get("guidance")
    w = 1.0 if w is None else w
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
        raise ValueError(f"sampler.guidance must be a finite number (1 = no guidance), got {w!r}")
    guide_ckpt = cfg.get("guide_ckpt")
    return float(w), _check_interval(cfg.get("guidance_interval")), None if guide_ckpt is None else str(guide_ckpt)


def apply_guidance(denoiser: Denoiser, sampler_cfg: Any, guide: Denoiser | None = None) -> Denoiser:
    """``denoiser`` wrapped for the guidance a sampler config asks for (unchanged when there is none).

    ``guide`` is the loaded ``sampler.guide_ckpt`` model; it is required when the config names one.
    """
    w, interval, guide_ckpt = guidance_settings(sampler_cfg)
    if guide_ckpt is not None and guide is None:
        raise ValueError(f"sampler.guide_ckpt={guide_ckpt} is set but no guide model was loaded (pass guide=)")
    if w == 1.0:
        return denoiser
    return GuidedDenoiser(denoiser, w, interval=interval, guide=guide)
