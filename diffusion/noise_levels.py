"""Conversions between the noise-level coordinates used across the literature.

sigmalab works in EDM's parameterisation x = y + σ·n with n ~ N(0, I). The other coordinates are:

- u = ln σ                      — the coordinate every schedule's density is defined in (per unit ln σ);
- λ = log SNR = −2·ln σ          — the log signal-to-noise ratio of Hang et al. (2024) and Kingma & Gao (2023).
  We take the SNR of x = y + σ·n as 1/σ², i.e. *without* folding in σ_data: this is the logSNR of the equivalent
  variance-preserving process x_vp = (y + σ·n)/√(1 + σ²) = α·y + s·n with α² = 1/(1+σ²), s² = σ²/(1+σ²),
  so that published λ-schedules (defined on VP processes with data in [-1, 1]) transfer unchanged.
  Densities convert with |dλ/du| = 2: p_λ(λ) = ½·p_u(−λ/2), p_u(u) = 2·p_λ(−2u).
- t ∈ [0, 1]                    — "schedule time" of Hang et al.: t = 1 − CDF_λ(λ), so t = 0 is clean and t = 1 is
  pure noise; in ln σ this is simply t = CDF_u(ln σ) because λ decreases as σ grows. For a schedule object this is
  ``schedule.cdf(ln σ)`` and its inverse ``schedule.icdf(t)``.
- VP coefficients (α, s)         — x_vp = α·y + s·n with α = 1/√(1+σ²), s = σ/√(1+σ²);
  α² = sigmoid(λ), s² = sigmoid(−λ).
- rectified-flow time τ ∈ [0, 1] — x_rf = (1 − τ)·y + τ·n (Liu et al. 2022; SD3), which is x/(1 + σ) with
  σ = τ/(1 − τ), i.e. τ = σ/(1 + σ) = sigmoid(ln σ) and λ = 2·ln((1 − τ)/τ).
"""

from __future__ import annotations

import torch
from torch import Tensor


def sigma_to_logsnr(sigma: Tensor) -> Tensor:
    """λ = −2·ln σ."""
    return -2.0 * torch.log(sigma)


def logsnr_to_sigma(logsnr: Tensor) -> Tensor:
    """σ = exp(−λ/2)."""
    return torch.exp(-0.5 * logsnr)


def log_sigma_to_logsnr(log_sigma: Tensor) -> Tensor:
    """λ = −2·u with u = ln σ."""
    return -2.0 * log_sigma


def logsnr_to_log_sigma(logsnr: Tensor) -> Tensor:
    """u = −λ/2."""
    return -0.5 * logsnr


def sigma_to_vp(sigma: Tensor) -> tuple[Tensor, Tensor]:
    """(α, s) of the equivalent variance-preserving process: α = 1/√(1+σ²), s = σ/√(1+σ²)."""
    norm = torch.rsqrt(1.0 + sigma**2)
    return norm, sigma * norm


def flow_time_to_sigma(tau: Tensor) -> Tensor:
    """σ = τ/(1 − τ) for rectified-flow time τ (x_rf = (1−τ)·y + τ·n)."""
    return tau / (1.0 - tau)


def sigma_to_flow_time(sigma: Tensor) -> Tensor:
    """τ = σ/(1 + σ)."""
    return sigma / (1.0 + sigma)
