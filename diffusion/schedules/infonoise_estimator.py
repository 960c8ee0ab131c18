"""The online estimator behind InfoNoise: the rate at which denoising resolves the data, measured from the loss.

By the I-MMSE relation (Guo, Shamai & Verdú 2005), the conditional entropy of the data y given the noisy
x = y + σn falls, per unit ln σ, at

    |dH(y | x_σ)/d ln σ| = mmse(σ)/σ²,       mmse(σ) = E‖y − E[y|x]‖²   (summed over the d data dimensions)

and the training loop already measures ‖D − y‖² for every sample. ``InfoNoiseEstimator`` bins those unweighted
per-sample errors on a fixed grid in ln σ (default 64 bins over [0.002, 80]) and, at every refresh, turns them into a
profile (Raya et al. 2026, arXiv 2602.18647; the gate is their Eq. 14 as quoted by public re-implementations):

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
4. rate per ln σ r_k = m̂_k/σ_k²; low-σ gate g_k = σ_kⁿ/(σ_kⁿ + cⁿ) (n = ``gate_n`` = 3; c pinned, ``auto``: the
   onset rule below, or null: no gate); ρ̂_k = r_k·g_k / Σ_j r_j·g_j·Δ.

The gate exists because for continuous data the rate tends to the constant d as σ → 0, a plateau that would swamp
any normalisation. The ``auto`` pivot scans the per-σ rate r/σ from high σ downwards and takes the first σ where it
reaches ``onset_p`` times its maximum.

Conventions. ``update(sigma, mse)`` takes the per-sample error **summed over dimensions** (as ``DenoisingLoss``
returns it); the ``area`` Σ_k r_k·Δ (from the unsmoothed bin means) is then in nats per sample — an upper bound on
H(y) for discrete data, the likelihood-bound proxy of Kong et al. — and ``area_per_dim`` = area/d when ``num_dims``
is known. The window, m̂, the gate pivot and the grid live in buffers, so ``state_dict()``/``load_state_dict()``
resume exactly; a state saved with a different grid is refused. ``diffusion.schedules.infonoise.InfoNoise`` is this
estimator plus the sampling table built from ρ̂ (its buffers keep these names in checkpoints).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor, nn

#: numeric codes of the gate modes in InfoNoise's ``hparams`` buffer
GATE_MODES = {"none": 0.0, "pinned": 1.0, "auto": 2.0}
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


def gate_setting(gate_c: float | str | None) -> tuple[str, float]:
    """``schedule.gate_c`` as (mode, pinned value): a number > 0 (pinned), ``"auto"`` or None (no gate)."""
    if gate_c is None:
        return "none", float("nan")
    if isinstance(gate_c, str):
        if gate_c != "auto":
            raise ValueError(f"schedule.gate_c must be a number > 0, 'auto' or null, got {gate_c!r}")
        return "auto", float("nan")
    if isinstance(gate_c, bool) or not float(gate_c) > 0:
        raise ValueError(f"schedule.gate_c must be a number > 0, 'auto' or null, got {gate_c!r}")
    return "pinned", float(gate_c)


def check_estimator_args(grid_sigma_min: float, grid_sigma_max: float, num_bins: int, min_count: int,
                         ema_new_weight: float, smooth_bins: float, gate_n: float, onset_p: float) -> None:
    """Raise ValueError, naming the ``schedule.*`` field, for an estimator hyperparameter that cannot work."""
    if not 0 < grid_sigma_min < grid_sigma_max:
        raise ValueError(f"schedule.grid_sigma_min/grid_sigma_max: need 0 < min < max, got {grid_sigma_min}, "
                         f"{grid_sigma_max}")
    if not (isinstance(num_bins, int) and num_bins >= 2):
        raise ValueError(f"schedule.num_bins must be an integer >= 2, got {num_bins!r}")
    if not (isinstance(min_count, int) and min_count >= 1):
        raise ValueError(f"schedule.min_count must be an integer >= 1, got {min_count!r}")
    if not 0 < ema_new_weight <= 1:
        raise ValueError(f"schedule.ema_new_weight must be in (0, 1], got {ema_new_weight}")
    if not smooth_bins >= 0:
        raise ValueError(f"schedule.smooth_bins must be >= 0, got {smooth_bins}")
    if not gate_n > 0:
        raise ValueError(f"schedule.gate_n must be > 0, got {gate_n}")
    if not 0 < onset_p < 1:
        raise ValueError(f"schedule.onset_p must be in (0, 1), got {onset_p}")


class InfoNoiseEstimator(nn.Module):
    """Online binned estimate of the rate profile m̂(σ)/σ² and its gated, normalised form ρ̂ (module docstring).

    Args:
        grid_sigma_min, grid_sigma_max, num_bins: the estimation grid, uniform in ln σ.
        min_count: a bin needs this many samples in a window to give a new mean (else it keeps accumulating).
        ema_new_weight: β in m̂ ← (1−β)·m̂ + β·ℓ̄, the weight of the **new** window mean.
        smooth_bins: std of the Gaussian smoothing across bins, in bins (0 = none).
        gate_c: low-σ gate pivot c: a number, ``"auto"`` (onset rule with ``onset_p``) or None (no gate).
        gate_n: gate exponent n.
        onset_p: relative threshold of the ``auto`` onset rule.
        sigma_ref: the smoothing reference scale σ_ref (σ_data).
        num_dims: data dimensions d, for ``area_per_dim``.

    Checkpointed buffers: ``log_edges`` (the grid), ``window`` (rows S, Q, N of this rank's unreduced window),
    ``last_count``, ``last_rel_se``, ``mhat``, ``mhat_seen``, ``gate_c_value``, ``num_refreshes``.
    """

    def __init__(self, grid_sigma_min: float = 0.002, grid_sigma_max: float = 80.0, num_bins: int = 64,
                 min_count: int = 50, ema_new_weight: float = 0.9, smooth_bins: float = 1.0,
                 gate_c: float | str | None = 0.15, gate_n: float = 3.0, onset_p: float = 0.002,
                 sigma_ref: float = 0.5, num_dims: int | None = None):
        super().__init__()
        check_estimator_args(grid_sigma_min, grid_sigma_max, num_bins, min_count, ema_new_weight, smooth_bins,
                             gate_n, onset_p)
        self.gate_mode, self._gate_pinned = gate_setting(gate_c)
        self.num_bins = num_bins
        self.min_count = min_count
        self.ema_new_weight = float(ema_new_weight)
        self.smooth_bins = float(smooth_bins)
        self.gate_n = float(gate_n)
        self.onset_p = float(onset_p)
        self.sigma_ref = float(sigma_ref)
        self.num_dims = None if num_dims is None else int(num_dims)
        self.process_group = None  # default group; set to a sub-group if needed

        lo, hi = math.log(grid_sigma_min), math.log(grid_sigma_max)
        self.delta = (hi - lo) / num_bins
        self._log_lo = lo
        self._grid = (float(grid_sigma_min), float(grid_sigma_max))
        f64 = dict(dtype=torch.float64)
        self.register_buffer("log_edges", torch.linspace(lo, hi, num_bins + 1, **f64))
        # window accumulators, one row each: S = Σℓ, Q = Σℓ², N = count (per rank, not yet reduced)
        self.register_buffer("window", torch.zeros(3, num_bins, **f64))
        self.register_buffer("last_count", torch.zeros(num_bins, **f64))  # global samples/bin of the last window
        self.register_buffer("last_rel_se", torch.full((num_bins,), float("nan"), **f64))
        self.register_buffer("mhat", torch.zeros(num_bins, **f64))  # EMA of the raw bin means (before smoothing)
        self.register_buffer("mhat_seen", torch.zeros(num_bins, dtype=torch.bool))  # bin has had a real mean
        self.register_buffer("gate_c_value", torch.tensor(self._gate_pinned, **f64))
        self.register_buffer("num_refreshes", torch.zeros((), dtype=torch.int64))
        # derived, not saved (recomputed from the grid and the smoothing width)
        self.register_buffer("smoother", _smoothing_matrix(num_bins, self.smooth_bins), persistent=False)

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

    # ----------------------------------------------------------------------------------------------------------------
    # Accumulating and folding the window

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

    @torch.no_grad()
    def fold_window(self) -> dict[str, float]:
        """Reduce the window over ranks and fold the bins with enough samples into m̂; returns window statistics.

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
        if not bool(self.mhat_seen.any()):
            if not bool(fresh.any()):
                stats["unseen_frac"] = 1.0
                return stats  # nothing measured yet
            new = self._fill_empty(torch.where(fresh, mean, torch.zeros_like(mean)), fresh)
        else:
            beta = self.ema_new_weight
            blended = torch.where(self.mhat_seen, (1.0 - beta) * self.mhat + beta * mean, mean)
            new = torch.where(fresh, blended, self.mhat)
        self.mhat.copy_(new)
        self.mhat_seen |= fresh
        stats["unseen_frac"] = float((~self.mhat_seen).double().mean())
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

    @torch.no_grad()
    def refresh_estimate(self) -> tuple[dict[str, float], dict[str, Tensor] | None]:
        """``fold_window``, then the new profile with a new gate pivot (pinned, or the ``auto`` rule on the new m̂),
        kept in ``gate_c_value``. Returns (window statistics, the profile of ``rate_profile``, or None while no bin
        has been measured)."""
        stats = self.fold_window()
        if not bool(self.mhat_seen.any()):
            return stats, None
        prof = self.rate_profile(gate_c=None)
        self.gate_c_value.fill_(float(prof["gate_c"]))
        return stats, prof

    # ----------------------------------------------------------------------------------------------------------------
    # Profile

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

    def rate_profile(self, gate_c: float | Tensor | None = None) -> dict[str, Tensor]:
        """The profile of the current m̂, per bin: ``mhat`` (smoothed), ``rate`` (smoothed m̂/σ²), ``rate_raw`` (from
        the unsmoothed m̂), ``gate``, ``rho_hat`` (normalised gated rate); scalars ``gate_c`` and ``area``.

        ``gate_c`` None: the pivot of the gate mode (the pinned value or the ``auto`` onset rule); else that pivot.
        """
        sig = self.centers
        ref = 1.0 + sig**2 / self.sigma_ref**2
        flat = self.mhat / sig**2 * ref
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
        # The area is a sum over bins, which averages the noise by itself: take it from the unsmoothed means, so that
        # the kernel (which moves mass across the steep onset of discrete data) cannot bias it.
        rate_raw = self.mhat / sig**2
        return {"mhat": rate * sig**2, "rate": rate, "rate_raw": rate_raw, "gate": gate, "gate_c": gate_c,
                "rho_hat": gated / norm, "area": rate_raw.sum() * self.delta}

    def profile_stats(self, prof: dict[str, Tensor]) -> dict[str, float]:
        """The logged summary of a profile: the gate pivot, the area (and the area per dimension when d is known)."""
        stats = {"gate_c": float(prof["gate_c"]), "area": float(prof["area"])}
        if self.num_dims:
            stats["area_per_dim"] = stats["area"] / self.num_dims
        return stats

    def profile(self) -> dict[str, Tensor]:
        """The current profile (for logs and plots), all per bin unless noted:

        log_edges [K+1]; centers σ_k; count (samples in the last window, all ranks); rel_se (relative standard error
        of the last window mean); mhat_raw (EMA of bin means); mhat (smoothed); rate m̂/σ² per ln σ (smoothed);
        rate_raw (from mhat_raw); gate; rho_hat (normalised gated rate); area Σ rate_raw·Δ (scalar);
        gate_c (scalar); seen (bin has been measured).
        """
        with torch.no_grad():
            prof = self.rate_profile(gate_c=self.gate_c_value)
            return {"log_edges": self.log_edges.clone(), "centers": self.centers, "count": self.last_count.clone(),
                    "rel_se": self.last_rel_se.clone(), "mhat_raw": self.mhat.clone(), "mhat": prof["mhat"],
                    "rate": prof["rate"], "rate_raw": prof["rate_raw"], "gate": prof["gate"],
                    "rho_hat": prof["rho_hat"], "area": prof["area"], "gate_c": self.gate_c_value.clone(),
                    "seen": self.mhat_seen.clone()}

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
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
