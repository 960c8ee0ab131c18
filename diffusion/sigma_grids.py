"""Sampling discretisations: descending noise levels σ_0 = σ_max > ... > σ_{N-1} = σ_min, then σ_N = 0.

EDM's ρ-spacing (Karras et al. 2022, Eq. 5), uniform in σ^(1/ρ):

    σ_i = (σ_max^(1/ρ) + i/(N−1)·(σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ,   i = 0..N−1,   σ_N = 0.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def edm_rho_grid(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                 append_zero: bool = True, dtype: torch.dtype = torch.float64,
                 device: torch.device | str | None = None) -> Tensor:
    """EDM's σ grid with ``num_steps`` levels (plus a final 0 if ``append_zero``)."""
    if num_steps < 1:
        raise ValueError(f"sampler.num_steps must be >= 1, got {num_steps}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sampler.sigma_min < sampler.sigma_max, got {sigma_min} and {sigma_max}")
    if not rho > 0:
        raise ValueError(f"sampler.rho must be > 0, got {rho}")
    if num_steps == 1:
        sigmas = torch.tensor([sigma_max], dtype=dtype, device=device)
    else:
        i = torch.arange(num_steps, dtype=dtype, device=device)
        inv_rho = 1.0 / rho
        sigmas = (sigma_max**inv_rho + i / (num_steps - 1) * (sigma_min**inv_rho - sigma_max**inv_rho)) ** rho
    if append_zero:
        sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
    return sigmas


def build_sigma_grid(sampler_cfg: Any, dtype: torch.dtype = torch.float64,
                     device: torch.device | str | None = None) -> Tensor:
    """The σ grid a sampler config asks for."""
    return edm_rho_grid(int(sampler_cfg.num_steps), float(sampler_cfg.sigma_min), float(sampler_cfg.sigma_max),
                        float(sampler_cfg.rho), dtype=dtype, device=device)
