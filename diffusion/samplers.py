"""Samplers for the probability-flow ODE / reverse SDE in EDM's parameterisation, and exact NFE accounting.

With x = y + σ·n the probability-flow ODE is dx/dσ = (x − D(x; σ))/σ (Karras et al. 2022, Eq. 1 with σ(t) = t);
write d(x, σ) = (x − D(x; σ))/σ for its slope and ε̂ = d for the implied noise prediction. Every sampler here is a
plain function with the same signature

    sampler(denoiser, noise, sigmas, *, class_labels=None, randn_like=None, **options) -> x at σ = sigmas[-1]

``noise`` is unit-variance Gaussian (the sampler scales it by sigmas[0]); ``sigmas`` is a descending grid ending in
0 (see ``diffusion.sigma_grids``); ``randn_like`` supplies fresh noise for stochastic samplers (per-image streams,
see ``diffusion.per_image_noise``; default ``torch.randn_like``). The state is kept in ``sigmas.dtype`` (float64 by
default, as EDM). Between σ = sigmas[i] and σ' = sigmas[i+1]:

euler — x' = x + (σ' − σ)·d(x, σ). First order; N steps cost N network evaluations (NFE).

heun — EDM's Algorithm 2: the Euler step followed by a trapezoidal correction
x' = x + (σ' − σ̂)·(d(x, σ̂) + d(x'_Euler, σ'))/2, except on the last step to σ = 0; second order, NFE = 2N − 1. With
S_churn > 0 it is EDM's stochastic sampler: before each step with S_min ≤ σ ≤ S_max the level is raised to
σ̂ = (1 + γ)·σ, γ = min(S_churn/N, √2 − 1), by adding fresh noise of variance (σ̂² − σ²)·S_noise².

ddim — DDIM (Song et al. 2021, Eq. 12), written in its own variance-preserving form: x_vp = α·x with
α = 1/√(1 + σ²), s = σ/√(1 + σ²) (so x_vp = α·y + s·n, ᾱ = α²), x̂_0 = D(x; σ), ε̂ = (x_vp − α·x̂_0)/s and

    x'_vp = α'·x̂_0 + √(s'² − c²)·ε̂ + c·z,   c = η·(s'/s)·√(1 − α²/α'²),   z ~ N(0, I),

then x' = x'_vp/α'. η = 0 is deterministic DDIM, η = 1 is DDPM's ancestral sampler. For η = 0 this is algebraically
x' = D + σ'·(x − D)/σ, the Euler step above (DDIM is Euler's method in EDM's parameterisation; Karras et al. Sec. 3),
NFE = N.

euler_ancestral — ancestral sampling in EDM's variables: step to σ_down with Euler, then add noise of std σ_up, where
σ_up = min(σ', η·σ'·√(σ² − σ'²)/σ) and σ_down = √(σ'² − σ_up²). With η = 1 this draws x' from the forward process'
posterior q(x_σ' | x_σ, y = D(x; σ)) (mean D + (σ'²/σ²)(x − D), variance σ'²(σ² − σ'²)/σ²), which is DDIM's η = 1
step in these variables. NFE = N.

dpmpp_2m — DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2), a multistep exponential integrator for the
data-prediction form of the ODE. In log-σ steps, λ = −ln σ, h_i = λ_{i+1} − λ_i = ln(σ_i/σ_{i+1}), the exact
solution is x' = (σ'/σ)·x + σ'·∫_λ^λ' e^l·D dl; with D_i = D(x_i; σ_i) held constant this gives
x' = (σ'/σ)·x + (1 − σ'/σ)·D_i (= Euler/DDIM); 2M replaces D_i by the linear extrapolation
D̃_i = (1 + 1/(2r_i))·D_i − 1/(2r_i)·D_{i−1}, r_i = h_{i−1}/h_i, after the first step. The first step and the last
one (to σ = 0, where h = ∞) are first order. Second order; NFE = N.

``NFECounter`` wraps a denoiser and counts network evaluations per image (images passed through the network divided
by the batch size), so classifier-free guidance, which evaluates the network twice per step, counts twice.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from configs import check_kwargs, registry_choice, to_plain_dict

Denoiser = nn.Module | Callable[..., Tensor]
RandnLike = Callable[[Tensor], Tensor]


def _check_grid(sigmas: Tensor) -> int:
    num_steps = len(sigmas) - 1
    if num_steps < 1:
        raise ValueError("the σ grid needs at least two entries (σ_max ... 0)")
    return num_steps


def _denoise(denoiser: Denoiser, x: Tensor, sigma: Tensor, class_labels: Tensor | None) -> Tensor:
    return denoiser(x, sigma, class_labels=class_labels).to(x.dtype)


def euler(denoiser: Denoiser, noise: Tensor, sigmas: Tensor, *, class_labels: Tensor | None = None,
          randn_like: RandnLike | None = None) -> Tensor:
    """Euler's method on the probability-flow ODE (first order, NFE = N)."""
    num_steps = _check_grid(sigmas)
    x = noise.to(sigmas.dtype) * sigmas[0]
    for i in range(num_steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        d = (x - _denoise(denoiser, x, sigma, class_labels)) / sigma
        x = x + (sigma_next - sigma) * d
    return x


def heun(denoiser: Denoiser, noise: Tensor, sigmas: Tensor, *, class_labels: Tensor | None = None,
         randn_like: RandnLike | None = None, S_churn: float = 0.0, S_min: float = 0.0, S_max: float = math.inf,
         S_noise: float = 1.0) -> Tensor:
    """EDM's Heun sampler (deterministic when S_churn = 0; NFE = 2N − 1)."""
    num_steps = _check_grid(sigmas)
    if S_churn < 0:
        raise ValueError(f"sampler.S_churn must be >= 0, got {S_churn}")
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
        d_cur = (x - _denoise(denoiser, x, t_hat, class_labels)) / t_hat
        x_next = x + (t_next - t_hat) * d_cur
        if i < num_steps - 1:
            d_next = (x_next - _denoise(denoiser, x_next, t_next, class_labels)) / t_next
            x_next = x + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_next)
        x = x_next
    return x


def ddim(denoiser: Denoiser, noise: Tensor, sigmas: Tensor, *, class_labels: Tensor | None = None,
         randn_like: RandnLike | None = None, eta: float = 0.0) -> Tensor:
    """DDIM in its variance-preserving form (η = 0 deterministic, η = 1 DDPM-like; NFE = N)."""
    num_steps = _check_grid(sigmas)
    if not 0 <= eta:
        raise ValueError(f"sampler.eta must be >= 0, got {eta}")
    if eta > 0 and randn_like is None:
        randn_like = torch.randn_like
    x = noise.to(sigmas.dtype) * sigmas[0]
    for i in range(num_steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        alpha, s = 1.0 / (1.0 + sigma**2).sqrt(), sigma / (1.0 + sigma**2).sqrt()
        alpha_next, s_next = 1.0 / (1.0 + sigma_next**2).sqrt(), sigma_next / (1.0 + sigma_next**2).sqrt()
        x_vp = alpha * x
        x0 = _denoise(denoiser, x, sigma, class_labels)
        eps = (x_vp - alpha * x0) / s
        x_vp_next = alpha_next * x0
        if eta > 0:
            c = eta * (s_next / s) * (1.0 - alpha**2 / alpha_next**2).clamp(min=0).sqrt()
            c = torch.minimum(c, s_next)
            x_vp_next = x_vp_next + (s_next**2 - c**2).clamp(min=0).sqrt() * eps + c * randn_like(x)
        else:
            x_vp_next = x_vp_next + s_next * eps
        x = x_vp_next / alpha_next
    return x


def euler_ancestral(denoiser: Denoiser, noise: Tensor, sigmas: Tensor, *, class_labels: Tensor | None = None,
                    randn_like: RandnLike | None = None, eta: float = 1.0) -> Tensor:
    """Ancestral sampling: an Euler step to σ_down, then fresh noise of std σ_up (NFE = N)."""
    num_steps = _check_grid(sigmas)
    if not 0 <= eta:
        raise ValueError(f"sampler.eta must be >= 0, got {eta}")
    if eta > 0 and randn_like is None:
        randn_like = torch.randn_like
    x = noise.to(sigmas.dtype) * sigmas[0]
    for i in range(num_steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        sigma_up = torch.minimum(sigma_next, eta * sigma_next * (sigma**2 - sigma_next**2).clamp(min=0).sqrt() / sigma)
        sigma_down = (sigma_next**2 - sigma_up**2).clamp(min=0).sqrt()
        d = (x - _denoise(denoiser, x, sigma, class_labels)) / sigma
        x = x + (sigma_down - sigma) * d
        if eta > 0 and float(sigma_up) > 0:
            x = x + sigma_up * randn_like(x)
    return x


def dpmpp_2m(denoiser: Denoiser, noise: Tensor, sigmas: Tensor, *, class_labels: Tensor | None = None,
             randn_like: RandnLike | None = None) -> Tensor:
    """DPM-Solver++(2M): second-order multistep, data prediction, steps in λ = −ln σ (NFE = N)."""
    num_steps = _check_grid(sigmas)
    x = noise.to(sigmas.dtype) * sigmas[0]
    x0_prev, h_prev = None, None
    for i in range(num_steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0 = _denoise(denoiser, x, sigma, class_labels)
        if float(sigma_next) == 0.0:
            x = x0  # the limit h → ∞ of the first-order update
            break
        h = (sigma / sigma_next).log()
        if x0_prev is None:
            x0_eff = x0
        else:
            r = h_prev / h
            x0_eff = (1.0 + 1.0 / (2.0 * r)) * x0 - (1.0 / (2.0 * r)) * x0_prev
        ratio = sigma_next / sigma  # = e^{−h}
        x = ratio * x + (1.0 - ratio) * x0_eff
        x0_prev, h_prev = x0, h
    return x


SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "heun": heun,
    "euler": euler,
    "ddim": ddim,
    "euler_ancestral": euler_ancestral,
    "dpmpp_2m": dpmpp_2m,
}

# Sampler-config keys that describe the σ grid, the numerics or guidance rather than the sampler function's options.
GRID_KEYS = frozenset({"name", "num_steps", "sigma_min", "sigma_max", "rho", "steps_from", "t_max", "dtype"})
GUIDANCE_KEYS = frozenset({"guidance", "guidance_interval", "guide_ckpt"})
NON_OPTION_KEYS = GRID_KEYS | GUIDANCE_KEYS


def resolve_sampler(sampler_cfg: Any) -> tuple[Callable[..., Tensor], dict[str, Any]]:
    """The sampler function a sampler config names (``SAMPLERS[name]``) and the keyword options it passes to it.

    An unknown sampler fails with the registries' common message (``configs.registry_choice``), an unknown option
    with ``configs.check_kwargs``'s.
    """
    cfg = to_plain_dict(sampler_cfg)
    name = registry_choice("sampler", SAMPLERS, cfg)
    options = {k: v for k, v in cfg.items() if k not in NON_OPTION_KEYS}
    reserved = sorted({"class_labels", "randn_like"} & set(options))
    if reserved:
        raise ValueError(f"sampler={name}: {', '.join(reserved)} cannot be set from the config")
    check_kwargs("sampler", name, SAMPLERS[name], {"denoiser": None, "noise": None, "sigmas": None, **options},
                 supplied=("denoiser", "noise", "sigmas", "class_labels", "randn_like"))
    return SAMPLERS[name], options


def sampler_options(sampler_cfg: Any) -> dict[str, Any]:
    """The keyword options a sampler config passes to its sampler function (unknown keys are an error)."""
    return resolve_sampler(sampler_cfg)[1]


class NFECounter:
    """Wraps a denoiser and counts its network evaluations.

    ``images`` accumulates the batch size of every call and ``calls`` the calls; ``nfe(batch_size)`` is the number
    of network evaluations per image. Attributes (``img_resolution``, ``label_dim``, ...) are those of the wrapped
    denoiser.
    """

    def __init__(self, denoiser: Denoiser):
        self.denoiser = denoiser
        self.images = 0
        self.calls = 0

    def __call__(self, x: Tensor, sigma: Tensor, class_labels: Tensor | None = None, **kwargs: Any) -> Tensor:
        self.images += int(x.shape[0])
        self.calls += 1
        return self.denoiser(x, sigma, class_labels=class_labels, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name == "denoiser":  # not yet set (during unpickling): avoid infinite recursion
            raise AttributeError(name)
        return getattr(self.denoiser, name)

    def reset(self) -> None:
        self.images = 0
        self.calls = 0

    def nfe(self, batch_size: int) -> float:
        """Network evaluations per image since the last reset, for a batch of ``batch_size`` images."""
        return self.images / batch_size
