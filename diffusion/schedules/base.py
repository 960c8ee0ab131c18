"""The noise-schedule interface: a training noise schedule *is* a probability distribution over u = ln σ.

Hang et al. (2024, arXiv 2407.03297, Sec. 3) show that a schedule λ(t) with t ~ U[0, 1] is equivalent to the density
p(λ) = −dt/dλ it induces, and that any density defines a schedule through t = 1 − CDF(λ). sigmalab therefore
describes every schedule by its distribution over u = ln σ (λ = −2u, see ``diffusion.noise_levels``):

- ``log_density(u)``  log p(u), a density **per unit ln σ** (per unit λ it is p(u)/2; per unit σ it is p(u)/σ);
- ``cdf(u)``          P(ln σ ≤ u), which is also the schedule time t of Hang et al.;
- ``icdf(q)``         its inverse; ``sample(n)`` draws σ = exp(icdf(U)), U ~ U(0, 1) (i.i.d. or stratified);
- ``update(σ, mse)``  / ``on_step(step)``: the hooks an adaptive schedule (InfoNoise) uses; no-ops here.

Subclasses implement only the plain distribution as its source defines it, ``_log_density``, ``_cdf`` and ``_icdf``
(float64, so that tails and round trips stay accurate). Two settings that every schedule shares are applied here,
once, in this order:

**1. The logSNR convention** (``snr_reference``). The published λ-schedules (Laplace, Cauchy, cosine, FM-OT, ...) are
densities over the logSNR of a process on unit-variance data. ``unit`` (the default) takes λ = −2·ln σ, which is
that logSNR for data of unit variance. ``data`` takes λ = 2·ln(σ_data/σ), the SNR of the data itself (signal variance
σ_data²), so that λ = 0 is the crossover σ = σ_data where EDM's c_skip = c_out (Karras et al. 2022, arXiv
2206.00364, Sec. 5): the whole distribution moves by ln σ_data in ln σ, i.e. u = ln σ_data + u_unit. For pixel data
with σ_data = 0.5 this moves Laplace(μ=0) from λ_unit = 0 to λ_unit = −2·ln 0.5 = 1.386 (2.8 of its scales b = 0.5).
It applies to the schedules whose parameters are stated in logSNR or in a VP / rectified-flow time (which fixes λ);
schedules stated in σ itself (EDM's log-normal and VE, whose numbers are already in the data's units, and the
tabulated / learned ones) are unaffected: ``logsnr_parameterised = False``.

**2. The support** (``sigma_range`` = [σ_lo, σ_hi], either end null for open, or null for no truncation). The
distribution of step 1 is *conditioned* on σ ∈ [σ_lo, σ_hi] (not clamped): with F its CDF, a = ln σ_lo, b = ln σ_hi,
F(a⁻) = P(u < a) (= F(a) for a continuous distribution; the discrete DDPM levels keep a level at a),
    F_T(u) = (F(u) − F(a⁻)) / (F(b) − F(a⁻)),   F_T⁻¹(q) = F⁻¹(F(a⁻) + q·(F(b) − F(a⁻))),
    log p_T(u) = log p(u) − log(F(b) − F(a⁻)) inside [a, b], −inf outside.
So every schedule keeps its shape inside the range and loses exactly the mass F(a⁻) + 1 − F(b) outside it (e.g. 6.2%
for Cauchy(0, 1) and 0.93% for cosine on EDM's sampler range [0.002, 80]). ``sigma_min`` / ``sigma_max`` are the
older spelling of ``sigma_range`` (checkpoints written before it still build). The masses F(a⁻), F(b) are computed once
(fixed schedules; adaptive ones call ``_truncation_changed`` when their distribution changes).

**Stratified draws** (``sample(..., stratified=True)``, ``train.sigma_draw=stratified``): the n uniforms of a batch are
U_i = (π_i + V_i)/n with π a uniformly random permutation of 0..n−1 and V_i ~ U[0, 1) i.i.d., i.e. one draw in each
of n equal-probability strata, in random order. Each U_i is exactly U[0, 1) (π_i is uniform on 0..n−1), so every
σ_i = exp(F_T⁻¹(U_i)) has the schedule's marginal, for any schedule alike; but the batch covers every n-quantile of the
schedule, and the batch mean of any f(σ) has variance (1/n²)·Σ_k Var(f | stratum k) ≤ Var(f)/n (the i.i.d. value),
much smaller for a smooth f. The strata belong to the global batch (the training loop draws it whole).

Schedules are ``nn.Module``s so that adaptive ones keep their state in buffers: ``state_dict()`` then carries it into
checkpoints and ``.to(device)`` keeps sampling on the accelerator.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

# Uniform draws are kept inside [EPS, 1 - EPS] so that icdf never returns ±inf for an infinite-tailed schedule.
_UNIFORM_EPS = 1e-12

#: values of ``schedule.snr_reference``
SNR_REFERENCES = ("unit", "data")
#: keys of a schedule config that describe it but are not constructor arguments (``unverified``: the parameters no
#: readable source fixes, see configs/schedule/*.yaml)
CONFIG_METADATA_KEYS = ("name", "unverified")
#: the ways ``train.sigma_draw`` draws a batch's uniforms
SIGMA_DRAWS = ("iid", "stratified")
#: a ``sigma_range``: [σ_lo, σ_hi] (either end None for open) or None
SigmaRange = Sequence[float | None] | None


def parse_sigma_range(sigma_range: Any, sigma_min: float | None = None, sigma_max: float | None = None,
                      field: str = "schedule.sigma_range") -> tuple[float | None, float | None]:
    """(σ_lo, σ_hi) of ``sigma_range`` (a pair, either end None, or None), or of the older ``sigma_min``/``sigma_max``.

    Raises ValueError naming ``field`` for anything else: a range that is not a pair of positive numbers with
    σ_lo < σ_hi, or both spellings at once.
    """
    old = sigma_min is not None or sigma_max is not None
    if sigma_range is not None and old:
        raise ValueError(f"{field}: give the range once; sigma_min / sigma_max are the older spelling of "
                         f"sigma_range (got sigma_range={sigma_range!r}, sigma_min={sigma_min!r}, "
                         f"sigma_max={sigma_max!r})")
    if sigma_range is None:
        lo, hi, name_lo, name_hi = sigma_min, sigma_max, "schedule.sigma_min", "schedule.sigma_max"
    else:
        if isinstance(sigma_range, str | bytes) or not isinstance(sigma_range, Sequence) or len(sigma_range) != 2:
            raise ValueError(f"{field} must be [sigma_min, sigma_max] (either may be null) or null for no truncation, "
                             f"got {sigma_range!r}")
        lo, hi = sigma_range
        name_lo, name_hi = f"{field}[0]", f"{field}[1]"
    for name, value in ((name_lo, lo), (name_hi, hi)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                                  or not math.isfinite(value) or not value > 0):
            raise ValueError(f"{name} must be a finite number > 0 or null, got {value!r}")
    if lo is not None and hi is not None and not lo < hi:
        if sigma_range is None:
            raise ValueError(f"schedule.sigma_min ({lo}) must be < schedule.sigma_max ({hi})")
        raise ValueError(f"{field}: need sigma_min < sigma_max, got [{lo}, {hi}]")
    return (None if lo is None else float(lo)), (None if hi is None else float(hi))


def uniform_draws(n: int, device: torch.device | str | None = None, generator: torch.Generator | None = None,
                  stratified: bool = False) -> Tensor:
    """n uniforms in (0, 1) (float64): i.i.d., or ``stratified`` — one per stratum [k/n, (k+1)/n), in random order.

    Stratified: U_i = (π_i + V_i)/n, V ~ U[0, 1)ⁿ then π = a random permutation, both from ``generator``; each U_i is
    marginally U[0, 1) (module docstring). The i.i.d. draw is one ``torch.rand`` call, as it always was.
    """
    q = torch.rand(n, dtype=torch.float64, device=device, generator=generator)
    if stratified:
        strata = torch.randperm(n, device=device, generator=generator)
        q = (strata.to(torch.float64) + q) / n
    return q.clamp_(_UNIFORM_EPS, 1.0 - _UNIFORM_EPS)


class NoiseSchedule(nn.Module):
    """A distribution over u = ln σ, in a logSNR convention (``snr_reference``), optionally truncated
    (``sigma_range``); see the module docstring.

    Args (shared by every schedule):
        sigma_range: [σ_lo, σ_hi] to condition the draws on (either end None for open), or None for none.
        snr_reference: ``unit`` (λ = −2 ln σ) or ``data`` (λ = 2 ln(σ_data/σ)); ``data`` needs ``sigma_data``.
        sigma_data: the data's standard deviation (training context: ``precond.sigma_data``).
        sigma_min, sigma_max: the older spelling of ``sigma_range`` (configs saved before it).
    """

    #: registry name (set by subclasses)
    name: str = "base"
    #: True when the parameters are stated in logSNR (or a VP / rectified-flow time): ``snr_reference=data`` then
    #: moves the schedule by ln σ_data. False for schedules stated in σ itself.
    logsnr_parameterised: bool = True
    #: bounds within this distance (in ln σ) of a point of mass count as that point (discrete schedules)
    _bound_slack: float = 0.0

    def __init__(self, sigma_range: SigmaRange = None, snr_reference: str = "unit", sigma_data: float | None = None,
                 sigma_min: float | None = None, sigma_max: float | None = None):
        super().__init__()
        self.set_support(sigma_range, sigma_min=sigma_min, sigma_max=sigma_max)
        self.set_snr_reference(snr_reference, sigma_data)

    # ----------------------------------------------------------------------------------------------------------------
    # To be implemented by each schedule: the plain distribution over u = ln σ, as its source defines it, in float64.

    def _log_density(self, u: Tensor) -> Tensor:
        raise NotImplementedError

    def _cdf(self, u: Tensor) -> Tensor:
        raise NotImplementedError

    def _icdf(self, q: Tensor) -> Tensor:
        raise NotImplementedError

    def _cdf_below(self, u: Tensor) -> Tensor:
        """P(ln σ < u); equal to ``_cdf`` for a continuous distribution (discrete ones override it)."""
        return self._cdf(u)

    # ----------------------------------------------------------------------------------------------------------------
    # The shared settings: the logSNR convention and the support.

    def set_snr_reference(self, snr_reference: str = "unit", sigma_data: float | None = None) -> None:
        """Choose the logSNR convention (module docstring, step 1)."""
        if snr_reference not in SNR_REFERENCES:
            raise ValueError(f"schedule.snr_reference must be one of {', '.join(SNR_REFERENCES)}, got "
                             f"{snr_reference!r}")
        shift = 0.0
        if snr_reference == "data" and self.logsnr_parameterised:
            if sigma_data is None or isinstance(sigma_data, bool) or not (math.isfinite(sigma_data)
                                                                         and sigma_data > 0):
                raise ValueError(f"schedule={self.name} with snr_reference=data needs sigma_data > 0 (train.py passes "
                                 f"precond.sigma_data), got {sigma_data!r}")
            shift = math.log(sigma_data)
        self.snr_reference = str(snr_reference)
        self.sigma_data = None if sigma_data is None else float(sigma_data)
        self._u_shift = shift
        self._truncation_changed()

    def set_support(self, sigma_range: SigmaRange = None, *, sigma_min: float | None = None,
                    sigma_max: float | None = None) -> None:
        """Choose the support (module docstring, step 2)."""
        self.sigma_min, self.sigma_max = parse_sigma_range(sigma_range, sigma_min, sigma_max)
        self._truncation_changed()

    @property
    def sigma_range(self) -> tuple[float | None, float | None] | None:
        """The truncation [σ_lo, σ_hi] (None when untruncated)."""
        return (self.sigma_min, self.sigma_max) if self.truncated else None

    @property
    def truncated(self) -> bool:
        return self.sigma_min is not None or self.sigma_max is not None

    @property
    def snr_shift(self) -> float:
        """How far the convention moves the schedule in ln σ: ln σ_data for ``snr_reference=data``, else 0."""
        return self._u_shift

    def _truncation_changed(self) -> None:
        """Forget the cached masses F(a⁻), F(b) (an adaptive schedule calls this when its distribution changes)."""
        self._masses: tuple[float, float] | None = None

    # The distribution in the chosen convention, before truncation. u − 0.0 is u exactly, so the default convention
    # leaves every number as the plain distribution gives it.

    def _conv_log_density(self, u: Tensor) -> Tensor:
        return self._log_density(u - self._u_shift)

    def _conv_cdf(self, u: Tensor) -> Tensor:
        return self._cdf(u - self._u_shift)

    def _conv_icdf(self, q: Tensor) -> Tensor:
        return self._icdf(q) + self._u_shift

    def _truncation_mass(self) -> tuple[float, float]:
        """(F(a⁻), F(b)) of the untruncated distribution at the bounds (cached)."""
        if self._masses is None:
            lo, hi = 0.0, 1.0
            if self.sigma_min is not None:
                a = torch.tensor(math.log(self.sigma_min) - self._bound_slack - self._u_shift, dtype=torch.float64)
                lo = float(self._cdf_below(a))
            if self.sigma_max is not None:
                b = torch.tensor(math.log(self.sigma_max) + self._bound_slack - self._u_shift, dtype=torch.float64)
                hi = float(self._cdf(b))
            if not hi > lo:
                raise ValueError(f"schedule '{self.name}' has no probability mass in sigma_range = "
                                 f"[{self.sigma_min}, {self.sigma_max}]")
            self._masses = (lo, hi)
        return self._masses

    def truncated_mass(self) -> float:
        """The probability the untruncated distribution puts outside ``sigma_range`` (0 when untruncated)."""
        if not self.truncated:
            return 0.0
        lo, hi = self._truncation_mass()
        return lo + (1.0 - hi)

    # ----------------------------------------------------------------------------------------------------------------
    # The public distribution: convention, then truncation.

    def log_density(self, log_sigma: Tensor) -> Tensor:
        """log p(u) per unit ln σ at u = ``log_sigma`` (−inf outside the truncation interval)."""
        u = torch.as_tensor(log_sigma).to(torch.float64)
        out = self._conv_log_density(u)
        if self.truncated:
            lo, hi = self._truncation_mass()
            out = out - math.log(hi - lo)
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
        out = self._conv_cdf(u)
        if self.truncated:
            lo, hi = self._truncation_mass()
            out = ((out - lo) / (hi - lo)).clamp(0.0, 1.0)
        return out

    def icdf(self, q: Tensor) -> Tensor:
        """Inverse CDF: the u = ln σ below which a fraction q of the mass lies."""
        q = torch.as_tensor(q).to(torch.float64)
        if self.truncated:
            lo, hi = self._truncation_mass()
            q = lo + q * (hi - lo)
        out = self._conv_icdf(q)
        if self.sigma_min is not None:
            out = out.clamp(min=math.log(self.sigma_min))
        if self.sigma_max is not None:
            out = out.clamp(max=math.log(self.sigma_max))
        return out

    # ----------------------------------------------------------------------------------------------------------------
    # Sampling and the adaptive-schedule hooks.

    def sample_log_sigma(self, n: int, device: torch.device | str | None = None,
                         generator: torch.Generator | None = None, stratified: bool = False) -> Tensor:
        """Draw n values of ln σ (float32) by inverse-CDF sampling of i.i.d. or ``stratified`` uniforms."""
        return self.icdf(uniform_draws(n, device, generator, stratified)).to(torch.float32)

    def sample(self, n: int, device: torch.device | str | None = None, generator: torch.Generator | None = None,
               stratified: bool = False) -> Tensor:
        """Draw n noise levels σ (float32), inside [sigma_min, sigma_max] (as float32 numbers) when truncated."""
        sigma = self.sample_log_sigma(n, device=device, generator=generator, stratified=stratified).exp()
        if self.truncated:
            # ln σ is clamped in float64 by icdf; rounding to float32 and exp may step one ulp past a bound.
            sigma = sigma.clamp(min=self.sigma_min, max=self.sigma_max)
        return sigma

    def update(self, sigma: Tensor, mse: Tensor) -> None:
        """Observe the per-sample unweighted denoising error ‖D − y‖² at the drawn σ (adaptive schedules only)."""

    def on_step(self, step: int) -> dict[str, float] | None:
        """Called once per optimizer step; an adaptive schedule may rebuild itself and return statistics to log."""
        return None

    def policy_repr(self) -> str:
        """The shared settings as ``extra_repr`` text: the truncation and a non-default convention ('' if neither)."""
        parts = []
        if self.truncated:
            parts.append(f"sigma_range=[{_fmt(self.sigma_min)}, {_fmt(self.sigma_max)}]")
        if self.snr_reference != "unit":
            effect = (f"σ_data={self.sigma_data:g}" if self.logsnr_parameterised
                      else "no effect: defined in σ")
            parts.append(f"snr_reference={self.snr_reference} ({effect})")
        return ", ".join(parts)

    def extra_repr(self) -> str:
        return self.policy_repr()


def _fmt(value: float | None) -> str:
    return "null" if value is None else f"{value:g}"
