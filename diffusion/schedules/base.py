"""The noise-schedule interface: a training noise schedule *is* a probability distribution over u = ln σ.

Hang et al. (2024, arXiv 2407.03297) show that a schedule λ(t) with t ~ U[0, 1] is equivalent to the density
p(λ) = −dt/dλ it induces, and that any density defines a schedule through t = 1 − CDF(λ). sigmalab therefore
describes every schedule by its distribution over u = ln σ (λ = −2u, see ``diffusion.noise_levels``):

- ``log_density(u)``  log p(u), a density **per unit ln σ** (per unit λ it is p(u)/2; per unit σ it is p(u)/σ);
- ``cdf(u)``          P(ln σ ≤ u), which is also the schedule time t of Hang et al.;
- ``icdf(q)``         its inverse; ``sample(n)`` draws σ = exp(icdf(U)), U ~ U(0, 1);
- ``update(σ, mse)``  / ``on_step(step)``: the hooks an adaptive schedule (InfoNoise) uses; no-ops here.

Truncation to [sigma_min, sigma_max] is implemented once, here, for every schedule:
    F_T(u) = (F(u) − F(a)) / (F(b) − F(a)),  F_T⁻¹(q) = F⁻¹(F(a) + q·(F(b) − F(a))),  log p_T = log p − log(F(b) − F(a))
with a = ln sigma_min, b = ln sigma_max. Subclasses implement only the untruncated ``_log_density``, ``_cdf`` and
``_icdf``; all three work in float64 so that tails and round trips stay accurate.

Schedules are ``nn.Module``s so that adaptive ones keep their state in buffers: ``state_dict()`` then carries it into
checkpoints and ``.to(device)`` keeps sampling on the accelerator.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

# Uniform draws are kept inside [EPS, 1 - EPS] so that icdf never returns ±inf for an infinite-tailed schedule.
_UNIFORM_EPS = 1e-12


class NoiseSchedule(nn.Module):
    """A distribution over u = ln σ, optionally truncated to [sigma_min, sigma_max]."""

    #: registry name (set by subclasses)
    name: str = "base"

    def __init__(self, sigma_min: float | None = None, sigma_max: float | None = None):
        super().__init__()
        if sigma_min is not None and not sigma_min > 0:
            raise ValueError(f"schedule.sigma_min must be > 0 or null, got {sigma_min}")
        if sigma_max is not None and not sigma_max > 0:
            raise ValueError(f"schedule.sigma_max must be > 0 or null, got {sigma_max}")
        if sigma_min is not None and sigma_max is not None and not sigma_min < sigma_max:
            raise ValueError(f"schedule.sigma_min ({sigma_min}) must be < schedule.sigma_max ({sigma_max})")
        self.sigma_min = None if sigma_min is None else float(sigma_min)
        self.sigma_max = None if sigma_max is None else float(sigma_max)

    # ----------------------------------------------------------------------------------------------------------------
    # To be implemented by each schedule: the untruncated distribution over u = ln σ, in float64.

    def _log_density(self, u: Tensor) -> Tensor:
        raise NotImplementedError

    def _cdf(self, u: Tensor) -> Tensor:
        raise NotImplementedError

    def _icdf(self, q: Tensor) -> Tensor:
        raise NotImplementedError

    # ----------------------------------------------------------------------------------------------------------------
    # Truncation, handled once for all schedules.

    @property
    def truncated(self) -> bool:
        return self.sigma_min is not None or self.sigma_max is not None

    def _truncation_mass(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """(F(a), F(b)) of the untruncated CDF at the truncation bounds, as float64 tensors."""
        lo = torch.zeros((), dtype=torch.float64, device=like.device)
        hi = torch.ones((), dtype=torch.float64, device=like.device)
        if self.sigma_min is not None:
            lo = self._cdf(torch.tensor(math.log(self.sigma_min), dtype=torch.float64, device=like.device))
        if self.sigma_max is not None:
            hi = self._cdf(torch.tensor(math.log(self.sigma_max), dtype=torch.float64, device=like.device))
        if not bool(hi > lo):
            raise ValueError(
                f"schedule '{self.name}' has no probability mass in [sigma_min, sigma_max] = "
                f"[{self.sigma_min}, {self.sigma_max}]"
            )
        return lo, hi

    def log_density(self, log_sigma: Tensor) -> Tensor:
        """log p(u) per unit ln σ at u = ``log_sigma`` (−inf outside the truncation interval)."""
        u = torch.as_tensor(log_sigma).to(torch.float64)
        out = self._log_density(u)
        if self.truncated:
            lo, hi = self._truncation_mass(u)
            out = out - torch.log(hi - lo)
            outside = torch.zeros_like(u, dtype=torch.bool)
            if self.sigma_min is not None:
                outside |= u < math.log(self.sigma_min)
            if self.sigma_max is not None:
                outside |= u > math.log(self.sigma_max)
            out = out.masked_fill(outside, -math.inf)
        return out

    def density(self, log_sigma: Tensor) -> Tensor:
        """p(u) per unit ln σ."""
        return self.log_density(log_sigma).exp()

    def cdf(self, log_sigma: Tensor) -> Tensor:
        """P(ln σ ≤ u); equal to Hang et al.'s schedule time t (t = 0 clean, t = 1 pure noise)."""
        u = torch.as_tensor(log_sigma).to(torch.float64)
        out = self._cdf(u)
        if self.truncated:
            lo, hi = self._truncation_mass(u)
            out = ((out - lo) / (hi - lo)).clamp(0.0, 1.0)
        return out

    def icdf(self, q: Tensor) -> Tensor:
        """Inverse CDF: the u = ln σ below which a fraction q of the mass lies."""
        q = torch.as_tensor(q).to(torch.float64)
        if self.truncated:
            lo, hi = self._truncation_mass(q)
            q = lo + q * (hi - lo)
        out = self._icdf(q)
        if self.sigma_min is not None:
            out = out.clamp(min=math.log(self.sigma_min))
        if self.sigma_max is not None:
            out = out.clamp(max=math.log(self.sigma_max))
        return out

    # ----------------------------------------------------------------------------------------------------------------
    # Sampling and the adaptive-schedule hooks.

    def sample_log_sigma(
        self, n: int, device: torch.device | str | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        """Draw n values of ln σ (float32) by inverse-CDF sampling."""
        q = torch.rand(n, dtype=torch.float64, device=device, generator=generator)
        q = q.clamp_(_UNIFORM_EPS, 1.0 - _UNIFORM_EPS)
        return self.icdf(q).to(torch.float32)

    def sample(
        self, n: int, device: torch.device | str | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        """Draw n noise levels σ (float32), inside [sigma_min, sigma_max] (as float32 numbers) when truncated."""
        sigma = self.sample_log_sigma(n, device=device, generator=generator).exp()
        if self.truncated:
            # ln σ is clamped in float64 by icdf; rounding to float32 and exp may step one ulp past a bound.
            sigma = sigma.clamp(min=self.sigma_min, max=self.sigma_max)
        return sigma

    def update(self, sigma: Tensor, mse: Tensor) -> None:
        """Observe the per-sample unweighted denoising error ‖D − y‖² at the drawn σ (adaptive schedules only)."""

    def on_step(self, step: int) -> dict[str, float] | None:
        """Called once per optimizer step; an adaptive schedule may rebuild itself and return statistics to log."""
        return None

    def extra_repr(self) -> str:
        if not self.truncated:
            return ""
        return f"sigma_min={self.sigma_min}, sigma_max={self.sigma_max}"
