"""Samplers for the probability-flow ODE / reverse SDE in EDM's parameterisation.

With x = y + σ·n the probability-flow ODE is dx/dσ = (x − D(x; σ))/σ (Karras et al. 2022, Eq. 1 with σ(t) = t).
Every sampler here is a plain function with the same signature

    sampler(denoiser, noise, sigmas, *, class_labels=None, randn_like=None, **options) -> x at σ = sigmas[-1]

``noise`` is unit-variance Gaussian (the sampler scales it by sigmas[0]); ``sigmas`` is a descending grid ending in
0 (see ``diffusion.sigma_grids``); ``randn_like`` supplies fresh noise for stochastic samplers (per-image streams,
see ``diffusion.per_image_noise``). The ODE state is kept in ``sigmas.dtype`` (float64 by default, as EDM).

heun — EDM's Algorithm 2: an Euler step followed by a second-order (trapezoidal) correction, except on the last step
to σ = 0; N steps cost 2N − 1 network evaluations. With S_churn > 0 it is the stochastic sampler: before each step
with S_min ≤ σ_i ≤ S_max the noise level is raised to σ̂ = (1 + γ)·σ_i, γ = min(S_churn/N, √2 − 1), by adding fresh
noise of variance σ̂² − σ_i² (scaled by S_noise).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn


def heun(denoiser: nn.Module | Callable[..., Tensor], noise: Tensor, sigmas: Tensor, *,
         class_labels: Tensor | None = None, randn_like: Callable[[Tensor], Tensor] | None = None,
         S_churn: float = 0.0, S_min: float = 0.0, S_max: float = math.inf, S_noise: float = 1.0) -> Tensor:
    """EDM's Heun sampler (deterministic when S_churn = 0)."""
    num_steps = len(sigmas) - 1
    if num_steps < 1:
        raise ValueError("the σ grid needs at least two entries (σ_max ... 0)")
    if S_churn > 0 and randn_like is None:
        randn_like = torch.randn_like
    dtype = sigmas.dtype
    x = noise.to(dtype) * sigmas[0]
    gamma_max = math.sqrt(2.0) - 1.0
    for i in range(num_steps):
        t_cur, t_next = sigmas[i], sigmas[i + 1]
        gamma = min(S_churn / num_steps, gamma_max) if (S_churn > 0 and S_min <= float(t_cur) <= S_max) else 0.0
        t_hat = t_cur * (1.0 + gamma)
        if gamma > 0:
            x = x + (t_hat**2 - t_cur**2).sqrt() * S_noise * randn_like(x)
        d_cur = (x - denoiser(x, t_hat, class_labels=class_labels).to(dtype)) / t_hat
        x_next = x + (t_next - t_hat) * d_cur
        if i < num_steps - 1:
            d_next = (x_next - denoiser(x_next, t_next, class_labels=class_labels).to(dtype)) / t_next
            x_next = x + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_next)
        x = x_next
    return x


SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "heun": heun,
}

# Sampler-config keys that describe the σ grid or the numerics rather than the sampler's own options.
GRID_KEYS = frozenset({"name", "num_steps", "sigma_min", "sigma_max", "rho", "dtype"})


def sampler_options(sampler_cfg: Any) -> dict[str, Any]:
    """The keyword options a sampler config passes to its sampler function."""
    from configs import check_kwargs, to_plain_dict

    cfg = to_plain_dict(sampler_cfg)
    name = cfg.get("name")
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler '{name}'; valid choices: {', '.join(sorted(SAMPLERS))}")
    options = {k: v for k, v in cfg.items() if k not in GRID_KEYS}
    check_kwargs("sampler", name, SAMPLERS[name], {"denoiser": None, "noise": None, "sigmas": None, **options})
    return options
