"""InfoNoise (Raya et al. 2026, arXiv 2602.18647): a training noise distribution estimated online from the loss.

The estimate itself — the binned I-MMSE rate m̂(σ)/σ², its EMA, smoothing, low-σ gate and DDP reduction, giving the
normalised gated profile ρ̂ — is ``InfoNoiseEstimator`` (``infonoise_estimator.py``). ``InfoNoise`` is that estimator
plus the schedule built from it: every ``refresh_every`` steps it rebuilds the sampling density

    π_k ∝ ρ̂_k / w(σ_k)

with w the x₀-space loss weight (``divide_by_weight``; the loss-weight compensation of Raya et al., their Eq. 15 as
quoted by public re-implementations), normalised to Σ π_k·Δ = 1; optionally π ← (1−ε)·π + ε·π_base with
ε = ``floor_mix`` (π_base: the base schedule restricted to the grid). π is stored as a ``TabulatedLogSigma``
(piecewise-constant in ln σ on the estimator's grid) and sampled by inverse CDF on the device.

For the first ``warmup_fraction`` of training (``warmup_steps``) σ is drawn from the base schedule (default EDM's
log-normal); the estimator runs all along, and the table is switched on at the first refresh at or after the end of
the warm-up (so the warm-up is rounded up to a multiple of ``refresh_every``).
Base draws outside the grid are counted in the end bins.

The shared support setting ``sigma_range`` (``base.py``) conditions both phases, the base during the warm-up and the
table afterwards, on [σ_lo, σ_hi]; by default (null) the warm-up follows the base's own setting and the table lives
on the grid. The learned density is stated in σ, so ``snr_reference`` does not move it (the base has its own).

Everything (the estimator's window, m̂ and gate pivot, the table, the warm-up state, the grid and the
hyperparameters) lives in buffers, so ``state_dict()``/``load_state_dict()`` resume exactly; a state saved with a
different grid is refused, one saved with other hyperparameters loads with a warning.

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
from torch import Tensor

from configs import build_from_registry
from diffusion.schedules.base import CONFIG_METADATA_KEYS, NoiseSchedule, SigmaRange
from diffusion.schedules.fixed import FIXED_SCHEDULES
from diffusion.schedules.infonoise_estimator import GATE_MODES, InfoNoiseEstimator
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
_TINY = 1e-300


def _warmup_steps(warmup_fraction: float, warmup_steps: int | None, total_nimg: int | None,
                  batch_size: int | None) -> int:
    """The warm-up in optimizer steps: ``warmup_steps``, or ``warmup_fraction`` of ⌈total_nimg / batch_size⌉."""
    if not 0 <= warmup_fraction <= 1:
        raise ValueError(f"schedule.warmup_fraction must be in [0, 1], got {warmup_fraction}")
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
    return warmup_steps


class InfoNoise(InfoNoiseEstimator, NoiseSchedule):
    """The online information-guided training noise distribution (see the module docstring).

    An ``InfoNoiseEstimator`` (the estimate and its buffers, under their checkpoint names) that is also a
    ``NoiseSchedule`` drawing from the base schedule during the warm-up and from its table afterwards.

    Args:
        base: the warm-up schedule: a ``NoiseSchedule``, a schedule config mapping (a schedule of
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
        img_resolution, image_resolution: passed to a base schedule built from a config.
        sigma_range, snr_reference, sigma_min, sigma_max: the shared settings (``base.NoiseSchedule``).
    """

    name = "infonoise"
    logsnr_parameterised = False  # the learned table is stated in σ

    def __init__(self, base: NoiseSchedule | Mapping[str, Any] | None = None, grid_sigma_min: float = 0.002,
                 grid_sigma_max: float = 80.0, num_bins: int = 64, warmup_fraction: float = 0.2,
                 warmup_steps: int | None = None, refresh_every: int = 100, min_count: int = 50,
                 ema_new_weight: float = 0.9, smooth_bins: float = 1.0, gate_c: float | str | None = 0.15,
                 gate_n: float = 3.0, onset_p: float = 0.002, divide_by_weight: bool = True, floor_mix: float = 0.0,
                 weighting: Callable[[Tensor], Tensor] | None = None, sigma_data: float | None = None,
                 num_dims: int | None = None, total_nimg: int | None = None, batch_size: int | None = None,
                 img_resolution: int | None = None, image_resolution: int | None = None, *,
                 sigma_range: SigmaRange = None, snr_reference: str = "unit", sigma_min: float | None = None,
                 sigma_max: float | None = None):
        super().__init__(grid_sigma_min=grid_sigma_min, grid_sigma_max=grid_sigma_max, num_bins=num_bins,
                         min_count=min_count, ema_new_weight=ema_new_weight, smooth_bins=smooth_bins, gate_c=gate_c,
                         gate_n=gate_n, onset_p=onset_p, num_dims=num_dims,
                         sigma_ref=float(sigma_data) if sigma_data is not None else 0.5)
        if not (isinstance(refresh_every, int) and refresh_every >= 1):
            raise ValueError(f"schedule.refresh_every must be an integer >= 1, got {refresh_every!r}")
        if not 0 <= floor_mix <= 1:
            raise ValueError(f"schedule.floor_mix must be in [0, 1], got {floor_mix}")
        if divide_by_weight and weighting is None:
            raise ValueError("schedule=infonoise with divide_by_weight=true needs the loss weighting (train.py passes "
                             "weighting=...); pass weighting or set divide_by_weight=false")
        warmup_steps = _warmup_steps(warmup_fraction, warmup_steps, total_nimg, batch_size)
        self.refresh_every = refresh_every
        self.divide_by_weight = bool(divide_by_weight)
        self.floor_mix = float(floor_mix)
        self.weighting = weighting
        self.base = self._build_base(base, sigma_data=sigma_data, img_resolution=img_resolution,
                                     image_resolution=image_resolution, weighting=weighting)
        self.register_buffer("hparams", self._own_hparams())
        self.register_buffer("warmup_steps", torch.tensor(warmup_steps, dtype=torch.int64))
        self.register_buffer("active", torch.zeros((), dtype=torch.bool))
        # derived, not saved (recomputed from the grid and the base)
        self.register_buffer("base_grid_mass", self._base_masses(self.log_edges), persistent=False)
        # The sampling table π (starts as the base restricted to the grid, until a profile exists).
        self.table = TabulatedLogSigma(self.log_edges, masses=self.base_grid_mass.clone())
        # Python mirrors of the state that decides control flow, so the hot path never reads a device tensor.
        self._active = False
        self._warmup_steps = warmup_steps
        self.set_snr_reference(snr_reference, sigma_data)
        self.set_support(sigma_range, sigma_min=sigma_min, sigma_max=sigma_max)

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
            return build_from_registry("schedule.base", FIXED_SCHEDULES, base, drop=CONFIG_METADATA_KEYS,
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
    # The distribution: the base during warm-up, the table afterwards.

    @property
    def in_warmup(self) -> bool:
        """True while σ is drawn from the base schedule."""
        return not self._active

    def _log_density(self, u: Tensor) -> Tensor:
        return self.table.log_density(u) if self._active else self.base.log_density(u)

    def _cdf(self, u: Tensor) -> Tensor:
        return self.table.cdf(u) if self._active else self.base.cdf(u)

    def _icdf(self, q: Tensor) -> Tensor:
        return self.table.icdf(q) if self._active else self.base.icdf(q)

    # ----------------------------------------------------------------------------------------------------------------
    # Refreshing: the estimate, then the table built from it

    def on_step(self, step: int) -> dict[str, float] | None:
        """Refresh at every multiple of ``refresh_every`` (the same steps on every rank); the table takes over at the
        first refresh at or after ``warmup_steps``. Returns the refresh statistics, or None between refreshes."""
        if step % self.refresh_every != 0:
            return None
        stats = self.refresh()
        if not self._active and step >= self._warmup_steps and bool(self.mhat_seen.any()):
            self._active = True
            self.active.fill_(True)
            self._truncation_changed()
        stats["warmup"] = float(not self._active)
        return stats

    @torch.no_grad()
    def refresh(self) -> dict[str, float]:
        """Reduce the window over ranks, update m̂ and rebuild the table; returns the refresh statistics.

        Collective when distributed: every rank must call it at the same step.
        """
        stats, prof = self.refresh_estimate()
        if prof is None:
            return stats  # nothing measured yet: keep sampling from the base
        old_cdf = self.table.cum_mass.clone()
        self.table.set_density(self._density_from(prof["rho_hat"]))
        self._truncation_changed()
        stats["max_dcdf"] = float((self.table.cum_mass - old_cdf).abs().max())
        stats.update(self.profile_stats(prof))
        qs = torch.tensor(PI_QUANTILES, dtype=torch.float64, device=self.table.cum_mass.device)
        for p, v in zip(PI_QUANTILES, self.table.icdf(qs).exp().tolist()):
            stats[f"pi_q{round(p * 100):02d}"] = v
        return stats

    def _weight_at(self, sigma: Tensor) -> Tensor:
        w = self.weighting(sigma)
        w = torch.as_tensor(w, dtype=torch.float64, device=sigma.device)
        return w.expand_as(sigma)

    def _density_from(self, rho_hat: Tensor) -> Tensor:
        """π per ln σ from the profile ρ̂: divided by the loss weight (``divide_by_weight``), normalised on the grid,
        mixed with the base (``floor_mix``); the base on the grid if that leaves no mass."""
        pi = rho_hat / self._weight_at(self.centers) if self.divide_by_weight else rho_hat.clone()
        pi = pi / (pi.sum() * self.delta).clamp_min(_TINY)
        if self.floor_mix > 0:
            pi = (1.0 - self.floor_mix) * pi + self.floor_mix * self.base_grid_mass / self.delta
        if not bool(pi.sum() > 0):  # a profile that is zero everywhere: fall back to the base on the grid
            pi = self.base_grid_mass / self.delta
        return pi

    def profile(self) -> dict[str, Tensor]:
        """The estimator's profile (``InfoNoiseEstimator.profile``) plus the current table: pi (its density per
        ln σ) and cdf [K+1]."""
        prof = super().profile()
        prof["pi"] = self.table.heights.clone()
        prof["cdf"] = self.table.cum_mass.clone()
        return prof

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
                prof = self.rate_profile(gate_c=self.gate_c_value)
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
        # The estimator refuses a state on another grid before anything is loaded.
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        hkey = prefix + "hparams"
        mine = self._own_hparams()
        if hkey in state_dict and state_dict[hkey].shape == mine.shape:
            theirs = state_dict[hkey].cpu().to(torch.float64)
            differ = [n for n, a, b in zip(_HPARAM_NAMES, theirs.tolist(), mine.cpu().tolist())
                      if not (a == b or (math.isnan(a) and math.isnan(b)))]
            if differ:
                warnings.warn(f"InfoNoise: loading a state saved with different hyperparameters ({', '.join(differ)});"
                              " the estimate continues with this schedule's values", stacklevel=2)
        self.hparams.copy_(mine)
        self._active = bool(self.active)
        self._warmup_steps = int(self.warmup_steps)
        self._truncation_changed()

    def _own_hparams(self) -> Tensor:
        hp = getattr(self, "hparams", None)
        return torch.tensor([
            *self._grid, self.num_bins, self.refresh_every, self.min_count, self.ema_new_weight, self.smooth_bins,
            GATE_MODES[self.gate_mode], self._gate_pinned, self.gate_n, self.onset_p, float(self.divide_by_weight),
            self.floor_mix, self.sigma_ref,
        ], dtype=torch.float64, device=None if hp is None else hp.device)

    def extra_repr(self) -> str:
        c = {"none": "none", "auto": "auto"}.get(self.gate_mode, f"{self._gate_pinned:g}")
        policy = self.policy_repr()
        return (f"num_bins={self.num_bins}, grid=[{self._grid[0]:g}, {self._grid[1]:g}], "
                f"warmup_steps={self._warmup_steps}, "
                f"refresh_every={self.refresh_every}, min_count={self.min_count}, "
                f"ema_new_weight={self.ema_new_weight}, smooth_bins={self.smooth_bins}, gate_c={c}, "
                f"gate_n={self.gate_n:g}, divide_by_weight={self.divide_by_weight}, floor_mix={self.floor_mix}"
                + (f", {policy}" if policy else ""))


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
