"""DDPM's discrete training noise levels (Ho et al. 2020): a discrete distribution over 1000 values of σ.

DDPM trains with t uniform on {1, …, T}, T = 1000, and a linear β schedule β_t = linspace(1e-4, 0.02, T).
With ᾱ_t = Π_{s ≤ t}(1 − β_s), its noisy sample √ᾱ_t·y + √(1 − ᾱ_t)·n is EDM's x = y + σ·n scaled by √ᾱ_t, with

    σ_t = √((1 − ᾱ_t)/ᾱ_t),   λ_t = ln(ᾱ_t/(1 − ᾱ_t)) = −2·ln σ_t      (σ_1 ≈ 0.0100, σ_1000 ≈ 157.4).

So the training distribution puts mass 1/T on each of the T levels u_t = ln σ_t (increasing in t). This is a
*discrete* distribution and has no density; the interface functions behave as follows:

- ``cdf(u)``  — the exact right-continuous step CDF, #{t : u_t ≤ u}/T (equal to Hang et al.'s time t/T at u = u_t).
- ``icdf(q)`` — the generalised inverse inf{u : F(u) ≥ q}, i.e. the level u_k with k = ⌈T·q⌉ (q ∈ (0, 1]; values of
  T·q within 1e-9 above an integer count as that integer, to absorb rounding);
  ``sample`` (inverse-CDF sampling of q ~ U(0, 1)) therefore returns exactly the T levels, each with probability 1/T,
  and ``icdf(cdf(u_t)) = u_t`` at every level. The sampler helper's quantile placement lands on DDPM's own levels.
- ``log_density(u)`` — the log of a piecewise-constant *surrogate* density that spreads each level's mass 1/T
  uniformly over its bin in ln σ; the bins are bounded by the mid-points between neighbouring u_t (the two outer bins
  are symmetric about their level). It integrates to 1 and is what the schedule figure draws and what an
  importance weight q/p uses: drawing σ from the levels with weight w·q/p_bin is a midpoint quadrature of ∫ w·q du.
  It is *not* the derivative of ``cdf``.
- Truncation to ``sigma_range`` keeps exactly the levels inside the closed interval, each with equal probability (the
  base class's truncation, with the lower mass F(a⁻) = P(u < ln σ_lo) from ``_cdf_below``; a bound within 1e-12 in
  ln σ of a level keeps that level). The truncated surrogate density is the untruncated one renormalised by the kept
  probability, so near a cut bin it is approximate.
- ``snr_reference=data`` moves every level by ln σ_data (DDPM's ᾱ_t fixes λ_t on unit-variance data).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from diffusion.schedules.base import NoiseSchedule, SigmaRange
from diffusion.schedules.location_scale import with_truncation


def ddpm_log_sigmas(beta_start: float = 1e-4, beta_end: float = 0.02, num_steps: int = 1000) -> Tensor:
    """ln σ_t, t = 1..T (ascending), of DDPM's linear-β schedule, in float64."""
    betas = torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
    log_alpha_bar = torch.cumsum(torch.log1p(-betas), dim=0)
    # σ² = (1 − ᾱ)/ᾱ = 1/ᾱ − 1 = expm1(−ln ᾱ)
    return 0.5 * torch.log(torch.expm1(-log_alpha_bar))


class DiscreteDDPM(NoiseSchedule):
    """Uniform over DDPM's ``num_steps`` discrete noise levels (linear β from ``beta_start`` to ``beta_end``)."""

    name = "discrete_ddpm"
    _bound_slack = 1e-12  # σ_lo = σ_k (up to rounding in ln σ) keeps level k

    def __init__(self, beta_start: float = 1e-4, beta_end: float = 0.02, num_steps: int = 1000, *,
                 sigma_range: SigmaRange = None, snr_reference: str = "unit", sigma_data: float | None = None,
                 sigma_min: float | None = None, sigma_max: float | None = None):
        if not (isinstance(num_steps, int) and num_steps >= 2):
            raise ValueError(f"schedule=discrete_ddpm: num_steps must be an integer >= 2, got {num_steps!r}")
        if not 0 < beta_start < beta_end < 1:
            raise ValueError(f"schedule=discrete_ddpm: need 0 < beta_start < beta_end < 1, got {beta_start}, "
                             f"{beta_end}")
        super().__init__()
        self.beta_start, self.beta_end, self.num_steps = float(beta_start), float(beta_end), num_steps
        levels = ddpm_log_sigmas(self.beta_start, self.beta_end, num_steps)
        mids = 0.5 * (levels[1:] + levels[:-1])
        edges = torch.cat([(2.0 * levels[:1] - mids[:1]), mids, (2.0 * levels[-1:] - mids[-1:])])
        # Buffers move with .to(device) but stay out of state_dict (they are a pure function of the config).
        self.register_buffer("log_sigmas", levels, persistent=False)
        self.register_buffer("bin_edges", edges, persistent=False)
        # The shared settings need the levels (the truncation masses are computed from them).
        self.set_snr_reference(snr_reference, sigma_data)
        self.set_support(sigma_range, sigma_min=sigma_min, sigma_max=sigma_max)

    @property
    def sigmas(self) -> Tensor:
        """The T noise levels σ_t of DDPM, ascending (float64; before the ``snr_reference`` shift)."""
        return self.log_sigmas.exp()

    def _on(self, like: Tensor, name: str) -> Tensor:
        return getattr(self, name).to(like.device)

    def _log_density(self, u: Tensor) -> Tensor:
        edges = self._on(u, "bin_edges")
        widths = edges[1:] - edges[:-1]
        idx = torch.searchsorted(edges, u.contiguous(), right=True) - 1
        inside = (idx >= 0) & (idx < self.num_steps)
        w = widths[idx.clamp(0, self.num_steps - 1)]
        out = -math.log(self.num_steps) - torch.log(w)
        return out.masked_fill(~inside, -math.inf)

    def _cdf(self, u: Tensor) -> Tensor:
        count = torch.searchsorted(self._on(u, "log_sigmas"), u.contiguous(), right=True)
        return count.to(torch.float64) / self.num_steps

    def _icdf(self, q: Tensor) -> Tensor:
        # Smallest k (0-based) with F(u_k) = (k + 1)/T ≥ q, i.e. k = ⌈T·q⌉ − 1. The 1e-9 tolerance absorbs the
        # rounding of q = (k + 1)/T (e.g. after truncation's affine map) so that icdf(cdf(u_k)) = u_k exactly.
        k = (torch.ceil(q * self.num_steps - 1e-9) - 1).clamp(0, self.num_steps - 1).to(torch.long)
        return self._on(q, "log_sigmas")[k]

    def _cdf_below(self, u: Tensor) -> Tensor:
        count = torch.searchsorted(self._on(u, "log_sigmas"), u.contiguous(), right=False)
        return count.to(torch.float64) / self.num_steps

    def extra_repr(self) -> str:
        return with_truncation(f"beta_start={self.beta_start}, beta_end={self.beta_end}, "
                               f"num_steps={self.num_steps}", self)
