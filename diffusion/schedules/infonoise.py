"""InfoNoise (Raya et al. 2026, arXiv 2602.18647): a training noise distribution estimated online from the loss.

By the I-MMSE relation, the conditional entropy of the data y given the noisy x = y + σn falls, per unit ln σ, at

    |dH(y | x_σ)/d ln σ| = mmse(σ)/σ²,       mmse(σ) = E‖y − E[y|x]‖²   (summed over the d data dimensions)

and the training loop already measures ‖D − y‖² for every sample. InfoNoise bins those unweighted per-sample errors
on a fixed grid in ln σ (default 64 bins over [0.002, 80]) and, every ``refresh_every`` steps, rebuilds the sampling
density (see ``/work/shared/papers/infonoise.md`` §2.5–2.7 for the derivation and the sources):

1. window sums S_k = Σℓ, Q_k = Σℓ², counts N_k (float64, accumulated on the device with ``index_add_``, no host
   sync; summed over DDP ranks with one ``all_reduce`` at the refresh);
2. per-bin means ℓ̄_k = S_k/N_k where N_k ≥ ``min_count`` (sparser bins keep accumulating into the next window),
   folded into m̂_k ← (1−β)·m̂_k + β·ℓ̄_k with β = ``ema_new_weight`` (a bin's first measurement is taken outright;
   on the first refresh the bins with too few samples are filled by interpolating ln m̂ linearly in ln σ; below the
   lowest measured bin the rate m̂/σ² is held constant, above the highest m̂ is held constant: the two asymptotes of
   any data distribution);
3. smoothing across bins with a Gaussian kernel of ``smooth_bins`` bins, applied to r_k·(1 + σ_k²/σ_ref²) — a
   quantity that is flat at both ends of the σ range (r → d at σ → 0 for continuous data, m̂ → Var(y) at σ → ∞), so
   the kernel does not bias the power-law tails; σ_ref = σ_data;
4. rate per ln σ r_k = m̂_k/σ_k²; low-σ gate g_k = σ_kⁿ/(σ_kⁿ + cⁿ) (n = ``gate_n`` = 3; c pinned, ``auto``: the onset
   rule of §2.5, or null: no gate); ρ̂_k = r_k·g_k / Σ_j r_j·g_j·Δ;
5. π_k ∝ ρ̂_k / w(σ_k) with w the x₀-space loss weight (``divide_by_weight``), normalised to Σ π_k·Δ = 1;
   optionally π ← (1−ε)·π + ε·π_base with ε = ``floor_mix`` (π_base: the base schedule restricted to the grid);
6. π is stored as a ``TabulatedLogSigma`` (piecewise-constant in ln σ) and sampled by inverse CDF on the device.

For the first ``warmup_fraction`` of training (``warmup_steps``) σ is drawn from the base schedule (default EDM's
log-normal); the estimator runs all along, and the table is switched on at the first refresh at or after the end of
the warm-up (so the warm-up is rounded up to a multiple of ``refresh_every``).
Base draws outside the grid are counted in the end bins.

Conventions. ``update(sigma, mse)`` takes the per-sample error **summed over dimensions** (as ``DenoisingLoss``
returns it); the logged ``area`` Σ_k r_k·Δ (from the unsmoothed bin means) is then in nats per sample — an upper
bound on H(y) for discrete data, the likelihood-bound proxy of Kong et al. — and ``area_per_dim`` = area/d when
``num_dims`` is known. Everything (window, m̂, gate pivot, table, grid and hyperparameters) lives in buffers, so
``state_dict()``/``load_state_dict()`` resume exactly; a state saved with a different grid is refused.

InfoGrid: ``step_density(variant)`` returns a ``TabulatedLogSigma`` whose equal-mass quantiles are sampling steps:
``rate`` (ungated r: uniform steps in H(y|x_σ), Stancevic et al.'s entropic time), ``profile`` (gated ρ̂), ``pi`` (the
training density), ``mix``/``power`` (arithmetic/geometric blend of a profile with EDM's ρ-grid density ∝ σ^{1/ρ}
per ln σ).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from configs import build_from_registry
from diffusion.schedules.base import NoiseSchedule
from diffusion.schedules.fixed import FIXED_SCHEDULES
from diffusion.schedules.lognormal import LogNormal
from diffusion.schedules.tabulated import TabulatedLogSigma

#: sampling-step densities ``step_density`` can build
STEP_DENSITY_VARIANTS = ("rate", "profile", "pi", "mix", "power")
#: quantiles of π logged at every refresh (in σ)
PI_QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
# Names of the entries of the ``hparams`` buffer, in order. The first three define the grid (must match on load).
_HPARAM_NAMES = ("grid_sigma_min", "grid_sigma_max", "num_bins", "refresh_every", "min_count", "ema_new_weight",
                 "smooth_bins", "gate_mode", "gate_c", "gate_n", "onset_p", "divide_by_weight", "floor_mix",
                 "sigma_ref")
_GATE_MODES = {"none": 0.0, "pinned": 1.0, "auto": 2.0}
_TINY = 1e-300


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _smoothing_matrix(num_bins: int, std_bins: float) -> Tensor:
    """K×K Gaussian smoothing (std in bins, radius ⌈3·std⌉) with replicate padding at both ends; rows sum to 1."""
    eye = torch.eye(num_bins, dtype=torch.float64)
    if std_bins <= 0:
        return eye
    radius = max(1, int(math.ceil(3.0 * std_bins)))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets / std_bins) ** 2)
    kernel = kernel / kernel.sum()
    mat = torch.zeros(num_bins, num_bins, dtype=torch.float64)
    rows = torch.arange(num_bins)
    for j, off in enumerate(range(-radius, radius + 1)):
        cols = (rows + off).clamp(0, num_bins - 1)
        mat.index_put_((rows, cols), kernel[j].expand(num_bins), accumulate=True)
    return mat


class InfoNoise(NoiseSchedule):
    """The online information-guided training noise distribution (see the module docstring).

    Args:
        base: the warm-up schedule: a ``NoiseSchedule``, a schedule config mapping (built with
            ``diffusion.schedules.fixed``) or None for EDM's log-normal (p_mean −1.2, p_std 1.2).
        grid_sigma_min, grid_sigma_max, num_bins: the estimation grid, uniform in ln σ; also the support of π.
        warmup_fraction: fraction of the training steps (``total_nimg``/``batch_size``) drawn from ``base``.
        warmup_steps: the warm-up in optimizer steps; overrides ``warmup_fraction`` when given.
        refresh_every: rebuild the table every this many steps.
        min_count: a bin needs this many samples in a window to give a new mean (else it keeps accumulating).
        ema_new_weight: β in m̂ ← (1−β)·m̂ + β·ℓ̄, the weight of the **new** window mean (contested: 0.9).
        smooth_bins: std of the Gaussian smoothing across bins, in bins (0 = none).
        gate_c: low-σ gate pivot c: a number, ``"auto"`` (onset rule with ``onset_p``) or None (no gate).
        gate_n: gate exponent n.
        onset_p: relative threshold of the ``auto`` onset rule.
        divide_by_weight: sample π ∝ ρ̂/w (True) or π ∝ ρ̂ (False).
        floor_mix: ε of the floor mixture with the base schedule restricted to the grid.
        weighting: the x₀-space loss weight w(σ) (training context; required when ``divide_by_weight``).
        sigma_data: σ_data (context): the smoothing reference scale σ_ref; also passed to a base built from config.
        num_dims: data dimensions d (context), for ``area_per_dim``.
        total_nimg, batch_size: training length (context) for ``warmup_fraction``.
        img_resolution: passed to a base schedule built from a config.
    """

    name = "infonoise"

    def __init__(self, base: NoiseSchedule | Mapping[str, Any] | None = None, grid_sigma_min: float = 0.002,
                 grid_sigma_max: float = 80.0, num_bins: int = 64, warmup_fraction: float = 0.2,
                 warmup_steps: int | None = None, refresh_every: int = 100, min_count: int = 50,
                 ema_new_weight: float = 0.9, smooth_bins: float = 1.0, gate_c: float | str | None = 0.15,
                 gate_n: float = 3.0, onset_p: float = 0.002, divide_by_weight: bool = True, floor_mix: float = 0.0,
                 weighting: Callable[[Tensor], Tensor] | None = None, sigma_data: float | None = None,
                 num_dims: int | None = None, total_nimg: int | None = None, batch_size: int | None = None,
                 img_resolution: int | None = None):
        super().__init__()
        # --- validation ---------------------------------------------------------------------------------------------
        if not 0 < grid_sigma_min < grid_sigma_max:
            raise ValueError(f"schedule.grid_sigma_min/grid_sigma_max: need 0 < min < max, got {grid_sigma_min}, "
                             f"{grid_sigma_max}")
        if not (isinstance(num_bins, int) and num_bins >= 2):
            raise ValueError(f"schedule.num_bins must be an integer >= 2, got {num_bins!r}")
        if not (isinstance(refresh_every, int) and refresh_every >= 1):
            raise ValueError(f"schedule.refresh_every must be an integer >= 1, got {refresh_every!r}")
        if not (isinstance(min_count, int) and min_count >= 1):
            raise ValueError(f"schedule.min_count must be an integer >= 1, got {min_count!r}")
        if not 0 < ema_new_weight <= 1:
            raise ValueError(f"schedule.ema_new_weight must be in (0, 1], got {ema_new_weight}")
        if not smooth_bins >= 0:
            raise ValueError(f"schedule.smooth_bins must be >= 0, got {smooth_bins}")
        if not 0 <= floor_mix <= 1:
            raise ValueError(f"schedule.floor_mix must be in [0, 1], got {floor_mix}")
        if not 0 <= warmup_fraction <= 1:
            raise ValueError(f"schedule.warmup_fraction must be in [0, 1], got {warmup_fraction}")
        if not gate_n > 0:
            raise ValueError(f"schedule.gate_n must be > 0, got {gate_n}")
        if not 0 < onset_p < 1:
            raise ValueError(f"schedule.onset_p must be in (0, 1), got {onset_p}")
        if gate_c is None:
            gate_mode, gate_value = "none", float("nan")
        elif isinstance(gate_c, str):
            if gate_c != "auto":
                raise ValueError(f"schedule.gate_c must be a number > 0, 'auto' or null, got {gate_c!r}")
            gate_mode, gate_value = "auto", float("nan")
        else:
            if isinstance(gate_c, bool) or not float(gate_c) > 0:
                raise ValueError(f"schedule.gate_c must be a number > 0, 'auto' or null, got {gate_c!r}")
            gate_mode, gate_value = "pinned", float(gate_c)
        if divide_by_weight and weighting is None:
            raise ValueError("schedule=infonoise with divide_by_weight=true needs the loss weighting (train.py passes "
                             "weighting=...); pass weighting or set divide_by_weight=false")
        if warmup_steps is None:
            if warmup_fraction == 0:
                warmup_steps = 0
            elif total_nimg is None or batch_size is None:
                raise ValueError("schedule=infonoise needs warmup_steps, or total_nimg and batch_size (passed by "
                                 "train.py) to turn warmup_fraction into steps")
            else:
                warmup_steps = int(round(warmup_fraction * math.ceil(total_nimg / batch_size)))
        if not (isinstance(warmup_steps, int) and warmup_steps >= 0):
            raise ValueError(f"schedule.warmup_steps must be an integer >= 0 or null, got {warmup_steps!r}")

        self.num_bins = num_bins
        self.refresh_every = refresh_every
        self.min_count = min_count
        self.ema_new_weight = float(ema_new_weight)
        self.smooth_bins = float(smooth_bins)
        self.gate_mode = gate_mode
        self._gate_pinned = gate_value
        self.gate_n = float(gate_n)
        self.onset_p = float(onset_p)
        self.divide_by_weight = bool(divide_by_weight)
        self.floor_mix = float(floor_mix)
        self.weighting = weighting
        self.sigma_ref = float(sigma_data) if sigma_data is not None else 0.5
        self.num_dims = None if num_dims is None else int(num_dims)
        self.process_group = None  # default group; set to a sub-group if needed

        # --- base (warm-up) schedule --------------------------------------------------------------------------------
        self.base = self._build_base(base, sigma_data=sigma_data, img_resolution=img_resolution,
                                     weighting=weighting)

        # --- grid and state buffers ---------------------------------------------------------------------------------
        lo, hi = math.log(grid_sigma_min), math.log(grid_sigma_max)
        edges = torch.linspace(lo, hi, num_bins + 1, dtype=torch.float64)
        self.delta = (hi - lo) / num_bins
        self._log_lo = lo
        f64 = dict(dtype=torch.float64)
        self.register_buffer("log_edges", edges)
        self._grid = (float(grid_sigma_min), float(grid_sigma_max))
        self.register_buffer("hparams", self._own_hparams())
        # window accumulators, one row each: S = Σℓ, Q = Σℓ², N = count (per rank, not yet reduced)
        self.register_buffer("window", torch.zeros(3, num_bins, **f64))
        self.register_buffer("last_count", torch.zeros(num_bins, **f64))  # global samples/bin of the last window
        self.register_buffer("last_rel_se", torch.full((num_bins,), float("nan"), **f64))
        self.register_buffer("mhat", torch.zeros(num_bins, **f64))  # EMA of the raw bin means (before smoothing)
        self.register_buffer("mhat_seen", torch.zeros(num_bins, dtype=torch.bool))  # bin has had a real mean
        self.register_buffer("gate_c_value", torch.tensor(gate_value, **f64))
        self.register_buffer("num_refreshes", torch.zeros((), dtype=torch.int64))
        self.register_buffer("warmup_steps", torch.tensor(warmup_steps, dtype=torch.int64))
        self.register_buffer("active", torch.zeros((), dtype=torch.bool))
        # derived, not saved (recomputed from the grid / hyperparameters / base)
        self.register_buffer("smoother", _smoothing_matrix(num_bins, self.smooth_bins), persistent=False)
        self.register_buffer("base_grid_mass", self._base_masses(edges), persistent=False)
        # The sampling table π (starts as the base restricted to the grid, until a profile exists).
        self.table = TabulatedLogSigma(edges, masses=self.base_grid_mass.clone())
        # Python mirrors of the state that decides control flow, so the hot path never reads a device tensor.
        self._active = False
        self._warmup_steps = warmup_steps

    # ----------------------------------------------------------------------------------------------------------------
    # Construction helpers

    @staticmethod
    def _build_base(base: Any, **context: Any) -> NoiseSchedule:
        if base is None:
            return LogNormal()
        if isinstance(base, NoiseSchedule):
            if isinstance(base, InfoNoise):
                raise ValueError("schedule.base cannot itself be infonoise")
            return base
        if isinstance(base, Mapping) or hasattr(base, "keys"):
            if dict(base).get("name") == InfoNoise.name:
                raise ValueError("schedule.base cannot itself be infonoise; use e.g. {name: lognormal}")
            return build_from_registry("schedule.base", FIXED_SCHEDULES, base,
                                       context={k: v for k, v in context.items() if v is not None})
        raise ValueError(f"schedule.base must be a schedule config (e.g. {{name: lognormal}}), a NoiseSchedule or "
                         f"null, got {type(base).__name__}")

    def _base_masses(self, edges: Tensor) -> Tensor:
        """Probability of each grid bin under the base schedule, renormalised to the grid."""
        with torch.no_grad():
            cdf = self.base.cdf(edges.to(self._base_device())).to(torch.float64).cpu()
        masses = (cdf[1:] - cdf[:-1]).clamp_min(0.0)
        if not bool(masses.sum() > 0):
            raise ValueError("schedule.base has no probability mass on the InfoNoise grid "
                             f"[{math.exp(float(edges[0])):.4g}, {math.exp(float(edges[-1])):.4g}]")
        return masses / masses.sum()

    def _base_device(self) -> torch.device:
        for t in self.base.buffers():
            return t.device
        return torch.device("cpu")

    # ----------------------------------------------------------------------------------------------------------------
    # Grid

    @property
    def log_centers(self) -> Tensor:
        return 0.5 * (self.log_edges[1:] + self.log_edges[:-1])

    @property
    def centers(self) -> Tensor:
        """Bin centres σ_k (geometric midpoints)."""
        return self.log_centers.exp()

    @property
    def win_sum(self) -> Tensor:
        """Σℓ per bin in the current window (this rank's)."""
        return self.window[0]

    @property
    def win_sumsq(self) -> Tensor:
        return self.window[1]

    @property
    def win_count(self) -> Tensor:
        return self.window[2]

    @property
    def in_warmup(self) -> bool:
        """True while σ is drawn from the base schedule."""
        return not self._active

    # ----------------------------------------------------------------------------------------------------------------
    # The distribution: the base during warm-up, the table afterwards.

    def _log_density(self, u: Tensor) -> Tensor:
        return self.table.log_density(u) if self._active else self.base.log_density(u)

    def _cdf(self, u: Tensor) -> Tensor:
        return self.table.cdf(u) if self._active else self.base.cdf(u)

    def _icdf(self, q: Tensor) -> Tensor:
        return self.table.icdf(q) if self._active else self.base.icdf(q)

    # ----------------------------------------------------------------------------------------------------------------
    # The estimator

    @torch.no_grad()
    def update(self, sigma: Tensor, mse: Tensor) -> None:
        """Accumulate per-sample unweighted errors ‖D − y‖² (summed over dims) at their σ; no host synchronisation."""
        dev = self.window.device
        u = sigma.detach().to(device=dev, dtype=torch.float64).reshape(-1).log()
        ell = mse.detach().to(device=dev, dtype=torch.float64).reshape(-1)
        if u.numel() != ell.numel():
            raise ValueError(f"InfoNoise.update: {u.numel()} sigmas but {ell.numel()} errors")
        ok = torch.isfinite(ell) & torch.isfinite(u)
        k = ((u.nan_to_num(0.0) - self._log_lo) / self.delta).floor_().clamp_(0, self.num_bins - 1).long()
        ell = ell.where(ok, 0.0)
        self.window.index_add_(1, k, torch.stack([ell, ell * ell, ok.to(torch.float64)]))

    def on_step(self, step: int) -> dict[str, float] | None:
        """Refresh at every multiple of ``refresh_every`` (the same steps on every rank); the table takes over at the
        first refresh at or after ``warmup_steps``. Returns the refresh statistics, or None between refreshes."""
        if step % self.refresh_every != 0:
            return None
        stats = self.refresh()
        if not self._active and step >= self._warmup_steps and bool(self.mhat_seen.any()):
            self._active = True
            self.active.fill_(True)
        stats["warmup"] = float(not self._active)
        return stats

    @torch.no_grad()
    def refresh(self) -> dict[str, float]:
        """Reduce the window over ranks, update m̂ and rebuild the table; returns the refresh statistics.

        Collective when distributed: every rank must call it at the same step.
        """
        total = self.window.clone()
        if _distributed():
            dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.process_group)
        s, q, n = total
        fresh = n >= self.min_count
        mean = s / n.clamp_min(1.0)
        var = (q / n.clamp_min(1.0) - mean**2).clamp_min(0.0)
        rel_se = (var / n.clamp_min(1.0)).sqrt() / mean.clamp_min(_TINY)
        # Consume the bins that gave a mean; the others keep accumulating (their local, un-reduced sums).
        self.window.masked_fill_(fresh, 0.0)
        self.last_count.copy_(n)
        self.last_rel_se.copy_(torch.where(fresh, rel_se, torch.full_like(rel_se, float("nan"))))
        self.num_refreshes += 1

        stats: dict[str, float] = {"refreshes": float(self.num_refreshes), "window_samples": float(n.sum()),
                                   "empty_frac": float((~fresh).double().mean())}
        any_fresh = bool(fresh.any())
        if not bool(self.mhat_seen.any()):
            if not any_fresh:
                stats["unseen_frac"] = 1.0
                return stats  # nothing measured yet: keep sampling from the base
            new = self._fill_empty(torch.where(fresh, mean, torch.zeros_like(mean)), fresh)
        else:
            beta = self.ema_new_weight
            blended = torch.where(self.mhat_seen, (1.0 - beta) * self.mhat + beta * mean, mean)
            new = torch.where(fresh, blended, self.mhat)
        self.mhat.copy_(new)
        self.mhat_seen |= fresh
        stats["unseen_frac"] = float((~self.mhat_seen).double().mean())

        prof = self._profile_from(self.mhat, gate_c=None)
        old_cdf = self.table.cum_mass.clone()
        self.gate_c_value.fill_(float(prof["gate_c"]))
        self.table.set_density(prof["pi"])
        stats["max_dcdf"] = float((self.table.cum_mass - old_cdf).abs().max())
        stats["gate_c"] = float(prof["gate_c"])
        stats["area"] = float(prof["area"])
        if self.num_dims:
            stats["area_per_dim"] = stats["area"] / self.num_dims
        qs = torch.tensor(PI_QUANTILES, dtype=torch.float64, device=self.table.cum_mass.device)
        for p, v in zip(PI_QUANTILES, self.table.icdf(qs).exp().tolist()):
            stats[f"pi_q{round(p * 100):02d}"] = v
        return stats

    def _fill_empty(self, values: Tensor, valid: Tensor) -> Tensor:
        """Fill bins without a mean: ln m̂ linear in ln σ between measured bins; constant rate m̂/σ² below the lowest
        measured bin, constant m̂ above the highest."""
        k = self.num_bins
        u = self.log_centers
        idx = torch.arange(k, device=values.device)
        logv = values.clamp_min(_TINY).log()
        prev = torch.where(valid, idx, torch.full_like(idx, -1)).cummax(0).values
        nxt = torch.where(valid, idx, torch.full_like(idx, k)).flip(0).cummin(0).values.flip(0)
        has_prev, has_next = prev >= 0, nxt < k
        p, n = prev.clamp(0, k - 1), nxt.clamp(0, k - 1)
        t = ((u - u[p]) / (u[n] - u[p]).clamp_min(_TINY)).clamp(0.0, 1.0)
        inner = logv[p] + t * (logv[n] - logv[p])
        below = logv[n] + 2.0 * (u - u[n])  # rate held constant
        above = logv[p]                     # m̂ held constant
        filled = torch.where(has_prev & has_next, inner, torch.where(has_next, below, above))
        return torch.where(valid, values, filled.exp())

    # ----------------------------------------------------------------------------------------------------------------
    # Profile → density

    def _weight_at(self, sigma: Tensor) -> Tensor:
        w = self.weighting(sigma)
        w = torch.as_tensor(w, dtype=torch.float64, device=sigma.device)
        return w.expand_as(sigma)

    def _onset_pivot(self, rate: Tensor) -> Tensor:
        """The ``auto`` gate pivot: scanning from high σ down, the first σ where the per-σ rate m̂/σ³ (= r/σ),
        relative to its maximum, reaches ``onset_p``; ln of the ratio is interpolated linearly between bins."""
        per_sigma = rate / self.centers
        rel = per_sigma / per_sigma.max().clamp_min(_TINY)
        above = rel >= self.onset_p
        idx = torch.arange(self.num_bins, device=rate.device)
        j = int(torch.where(above, idx, torch.full_like(idx, -1)).max())  # highest bin at/above the threshold
        if j < 0:
            return self.centers[0]
        if j == self.num_bins - 1:
            return self.centers[-1]
        lr = rel.clamp_min(_TINY).log()
        lp = math.log(self.onset_p)
        u = self.log_centers
        t = ((lp - lr[j]) / (lr[j + 1] - lr[j])).clamp(0.0, 1.0) if bool(lr[j + 1] != lr[j]) else lr.new_zeros(())
        return (u[j] + t * (u[j + 1] - u[j])).exp()

    def _profile_from(self, mhat_raw: Tensor, gate_c: float | Tensor | None) -> dict[str, Tensor]:
        sig = self.centers
        ref = 1.0 + sig**2 / self.sigma_ref**2
        flat = mhat_raw / sig**2 * ref
        rate = (self.smoother @ flat).clamp_min(0.0) / ref
        if gate_c is None:
            if self.gate_mode == "auto":
                gate_c = self._onset_pivot(rate)
            elif self.gate_mode == "pinned":
                gate_c = self._gate_pinned
        if self.gate_mode == "none":
            gate = torch.ones_like(sig)
            gate_c = sig.new_tensor(float("nan"))
        else:
            gate_c = torch.as_tensor(gate_c, dtype=torch.float64, device=sig.device)
            gate = sig**self.gate_n / (sig**self.gate_n + gate_c**self.gate_n)
        gated = rate * gate
        norm = (gated.sum() * self.delta).clamp_min(_TINY)
        rho_hat = gated / norm
        pi = rho_hat / self._weight_at(sig) if self.divide_by_weight else rho_hat.clone()
        pi = pi / (pi.sum() * self.delta).clamp_min(_TINY)
        if self.floor_mix > 0:
            pi = (1.0 - self.floor_mix) * pi + self.floor_mix * self.base_grid_mass / self.delta
        if not bool(pi.sum() > 0):  # a profile that is zero everywhere: fall back to the base on the grid
            pi = self.base_grid_mass / self.delta
        # The area is a sum over bins, which averages the noise by itself: take it from the unsmoothed means, so that
        # the kernel (which moves mass across the steep onset of discrete data) cannot bias it.
        rate_raw = mhat_raw / sig**2
        return {"mhat": rate * sig**2, "rate": rate, "rate_raw": rate_raw, "gate": gate, "gate_c": gate_c,
                "rho_hat": rho_hat, "pi": pi, "area": rate_raw.sum() * self.delta}

    def profile(self) -> dict[str, Tensor]:
        """The current profile (for logs and plots), all per bin unless noted:

        log_edges [K+1]; centers σ_k; count (samples in the last window, all ranks); rel_se (relative standard error
        of the last window mean); mhat_raw (EMA of bin means); mhat (smoothed); rate m̂/σ² per ln σ (smoothed);
        rate_raw (from mhat_raw); gate; rho_hat (normalised gated rate); pi (the current table's density per ln σ);
        cdf [K+1]; area Σ rate_raw·Δ (scalar);
        gate_c (scalar); seen (bin has been measured).
        """
        with torch.no_grad():
            prof = self._profile_from(self.mhat, gate_c=self.gate_c_value)
            return {"log_edges": self.log_edges.clone(), "centers": self.centers, "count": self.last_count.clone(),
                    "rel_se": self.last_rel_se.clone(), "mhat_raw": self.mhat.clone(), "mhat": prof["mhat"],
                    "rate": prof["rate"], "rate_raw": prof["rate_raw"], "gate": prof["gate"],
                    "rho_hat": prof["rho_hat"],
                    "pi": self.table.heights.clone(), "cdf": self.table.cum_mass.clone(), "area": prof["area"],
                    "gate_c": self.gate_c_value.clone(), "seen": self.mhat_seen.clone()}

    # ----------------------------------------------------------------------------------------------------------------
    # InfoGrid: densities for sampling-step placement

    def edm_step_masses(self, rho: float = 7.0) -> Tensor:
        """Bin masses of EDM's ρ grid: uniform in σ^{1/ρ}, i.e. density ∝ σ^{1/ρ} per ln σ (exact per bin)."""
        if not rho > 0:
            raise ValueError(f"rho must be > 0, got {rho}")
        s = (self.log_edges / rho).exp()
        m = s[1:] - s[:-1]
        return m / m.sum()

    def step_density(self, variant: str = "profile", *, edm_weight: float = 0.5, rho: float = 7.0,
                     mix_source: str = "profile") -> TabulatedLogSigma:
        """A density over ln σ whose equal-mass quantiles place sampling steps (InfoGrid).

        ``rate``: ungated r (uniform steps in H(y|x_σ)); ``profile``: gated ρ̂; ``pi``: the training density;
        ``mix``: (1−w)·p + w·q_EDM; ``power``: p^{1−w}·q_EDM^w (normalised), with p the ``mix_source`` density
        (rate, profile or pi), q_EDM EDM's ρ-grid density and w = ``edm_weight``.
        """
        if variant not in STEP_DENSITY_VARIANTS:
            raise ValueError(f"unknown InfoGrid variant '{variant}'; valid choices: {', '.join(STEP_DENSITY_VARIANTS)}")
        if not 0 <= edm_weight <= 1:
            raise ValueError(f"edm_weight must be in [0, 1], got {edm_weight}")
        source = variant if variant in ("rate", "profile", "pi") else mix_source
        if source not in ("rate", "profile", "pi"):
            raise ValueError(f"unknown mix_source '{mix_source}'; valid choices: rate, profile, pi")
        if source != "pi" and not bool(self.mhat_seen.any()):
            raise ValueError("InfoNoise has no profile yet (no refresh has measured any bin); InfoGrid needs a "
                             "checkpoint trained with schedule=infonoise past its first refresh, or a measured profile")
        with torch.no_grad():
            if source == "pi":
                masses = self.table.bin_mass.clone()
            else:
                prof = self._profile_from(self.mhat, gate_c=self.gate_c_value)
                masses = prof["rate" if source == "rate" else "rho_hat"] * self.delta
            masses = masses / masses.sum()
            if variant == "mix":
                masses = (1.0 - edm_weight) * masses + edm_weight * self.edm_step_masses(rho)
            elif variant == "power":
                masses = masses.pow(1.0 - edm_weight) * self.edm_step_masses(rho).pow(edm_weight)
        return TabulatedLogSigma(self.log_edges.cpu(), masses=masses.cpu()).to(self.log_edges.device)

    # ----------------------------------------------------------------------------------------------------------------
    # Checkpointing

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        key = prefix + "log_edges"
        if key in state_dict:
            theirs = state_dict[key]
            same = theirs.shape == self.log_edges.shape and torch.allclose(
                theirs.to(torch.float64).cpu(), self.log_edges.cpu(), rtol=0, atol=1e-12)
            if not same:
                k = theirs.numel() - 1
                lo, hi = (math.exp(float(theirs[0])), math.exp(float(theirs[-1]))) if theirs.numel() else (0, 0)
                raise ValueError(
                    f"InfoNoise state has a different grid ({k} bins over [{lo:.4g}, {hi:.4g}]) than this schedule "
                    f"({self.num_bins} bins over [{self._grid[0]:.4g}, {self._grid[1]:.4g}]); "
                    "set schedule.num_bins / grid_sigma_min / grid_sigma_max to the checkpoint's values")
        hkey = prefix + "hparams"
        if hkey in state_dict and state_dict[hkey].shape == self.hparams.shape:
            theirs, mine = state_dict[hkey].cpu().to(torch.float64), self.hparams.cpu()
            differ = [n for n, a, b in zip(_HPARAM_NAMES, theirs.tolist(), mine.tolist())
                      if not (a == b or (math.isnan(a) and math.isnan(b)))]
            if differ:
                warnings.warn(f"InfoNoise: loading a state saved with different hyperparameters ({', '.join(differ)});"
                              " the estimate continues with this schedule's values", stacklevel=2)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self.hparams.copy_(self._own_hparams())
        self._active = bool(self.active)
        self._warmup_steps = int(self.warmup_steps)

    def _own_hparams(self) -> Tensor:
        hp = getattr(self, "hparams", None)
        return torch.tensor([
            *self._grid, self.num_bins, self.refresh_every, self.min_count, self.ema_new_weight, self.smooth_bins,
            _GATE_MODES[self.gate_mode], self._gate_pinned, self.gate_n, self.onset_p, float(self.divide_by_weight),
            self.floor_mix, self.sigma_ref,
        ], dtype=torch.float64, device=None if hp is None else hp.device)

    def extra_repr(self) -> str:
        c = {"none": "none", "auto": "auto"}.get(self.gate_mode, f"{self._gate_pinned:g}")
        return (f"num_bins={self.num_bins}, grid=[{self._grid[0]:g}, {self._grid[1]:g}], "
                f"warmup_steps={self._warmup_steps}, "
                f"refresh_every={self.refresh_every}, min_count={self.min_count}, "
                f"ema_new_weight={self.ema_new_weight}, smooth_bins={self.smooth_bins}, gate_c={c}, "
                f"gate_n={self.gate_n:g}, divide_by_weight={self.divide_by_weight}, floor_mix={self.floor_mix}")


@torch.no_grad()
def measure_profile(denoiser: torch.nn.Module, images: Tensor, schedule: InfoNoise, *, samples_per_bin: int = 256,
                    batch_size: int = 256, class_labels: Tensor | None = None,
                    generator: torch.Generator | None = None) -> InfoNoise:
    """Estimate the profile of a trained denoiser offline, into ``schedule`` (a fresh ``InfoNoise``), and return it.

    For InfoGrid on a model that was not trained with InfoNoise: ``samples_per_bin`` noise levels are drawn uniformly
    in ln σ inside every grid bin, paired with ``images`` (model space, [M, C, H, W], cycled; ``class_labels``
    one-hot [M, L] alongside), and ‖D(y + σn; σ) − y‖² is fed to ``update``; one ``refresh`` then takes the bin means
    outright. Single process (the refresh is not collective here unless a process group is initialised).
    """
    if samples_per_bin < schedule.min_count:
        raise ValueError(f"samples_per_bin ({samples_per_bin}) must be >= the schedule's min_count "
                         f"({schedule.min_count})")
    if images.dim() != 4 or images.shape[0] == 0:
        raise ValueError(f"images must be a non-empty [M, C, H, W] batch, got shape {tuple(images.shape)}")
    device = schedule.log_edges.device
    k = schedule.num_bins
    bins = torch.arange(k, device=device).repeat_interleave(samples_per_bin)
    jitter = torch.rand(bins.numel(), dtype=torch.float64, device=device, generator=generator)
    log_sigma = schedule.log_edges[bins] + jitter * schedule.delta
    count = images.shape[0]
    for start in range(0, bins.numel(), batch_size):
        sig = log_sigma[start:start + batch_size].exp().to(torch.float32)
        idx = torch.arange(start, start + sig.numel(), device=images.device) % count
        y = images[idx].to(device=device, dtype=torch.float32)
        labels = None if class_labels is None else class_labels[idx].to(device)
        noise = torch.randn(y.shape, device=device, dtype=y.dtype, generator=generator)
        denoised = denoiser(y + noise * sig.reshape(-1, 1, 1, 1), sig, class_labels=labels)
        schedule.update(sig, (denoised - y).square().flatten(1).sum(1))
    schedule.refresh()
    return schedule
