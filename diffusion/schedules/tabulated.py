"""A piecewise-constant density over u = ln σ: what InfoNoise samples from, and what samplers place steps by.

The table has edges e_0 < e_1 < … < e_K in ln σ (any spacing) and bin masses m_k ≥ 0 with Σ m_k = 1; inside bin k the
density per unit ln σ is the constant h_k = m_k / (e_{k+1} − e_k), and outside [e_0, e_K] there is no mass. With the
cumulative masses C_0 = 0, C_{k+1} = C_k + m_k:

    p(u)     = h_k                              for e_k ≤ u < e_{k+1}   (−inf log density outside the grid)
    F(u)     = C_k + m_k·(u − e_k)/(e_{k+1} − e_k)
    F⁻¹(q)   = e_k + (q − C_k)/m_k·(e_{k+1} − e_k)   with k such that C_k < q ≤ C_{k+1}

The inverse uses the generalised inverse inf{u : F(u) ≥ q}, found with a left ``searchsorted`` on C: the bin it
returns always has m_k > 0 for q > 0, so zero-mass bins are skipped and never divided by (q = 0 maps to e_0; the
division is guarded by a tiny floor anyway). All lookups are vectorised tensor operations on the buffers' device, so
sampling never leaves the accelerator and never synchronises with the host.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from diffusion.schedules.base import NoiseSchedule, SigmaRange

_TINY = 1e-300


def _as_f64(values: Tensor | Sequence[float], what: str) -> Tensor:
    t = torch.as_tensor(values, dtype=torch.float64)
    if t.dim() != 1:
        raise ValueError(f"tabulated schedule: {what} must be a 1-D sequence, got shape {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"tabulated schedule: {what} must be finite")
    return t


class TabulatedLogSigma(NoiseSchedule):
    """Piecewise-constant density over ln σ on the edges ``log_edges`` (zero mass outside them).

    Give either ``density`` (heights per unit ln σ, one per bin; need not be normalised) or ``masses`` (probability
    per bin; need not be normalised); with neither the density is uniform in ln σ. ``sigma_range`` (or the older
    ``sigma_min``/``sigma_max``) optionally truncates further (the base-class truncation). A table is stated in σ, so
    the logSNR convention does not move it.
    """

    name = "tabulated"
    logsnr_parameterised = False

    def __init__(self, log_edges: Tensor | Sequence[float], density: Tensor | Sequence[float] | None = None, *,
                 masses: Tensor | Sequence[float] | None = None, sigma_range: SigmaRange = None,
                 sigma_min: float | None = None, sigma_max: float | None = None):
        super().__init__(sigma_range=sigma_range, sigma_min=sigma_min, sigma_max=sigma_max)
        edges = _as_f64(log_edges, "log_edges")
        if edges.numel() < 2:
            raise ValueError("tabulated schedule: log_edges needs at least 2 entries (one bin)")
        if not bool((edges[1:] > edges[:-1]).all()):
            raise ValueError("tabulated schedule: log_edges must be strictly increasing")
        if density is not None and masses is not None:
            raise ValueError("tabulated schedule: give either density or masses, not both")
        num_bins = edges.numel() - 1
        self.register_buffer("log_edges", edges.clone())
        self.register_buffer("bin_mass", torch.full((num_bins,), 1.0 / num_bins, dtype=torch.float64))
        self.register_buffer("cum_mass", torch.zeros(num_bins + 1, dtype=torch.float64))
        if masses is not None:
            self.set_masses(masses)
        elif density is not None:
            self.set_density(density)
        else:
            self.set_density(torch.ones(num_bins, dtype=torch.float64))

    # ----------------------------------------------------------------------------------------------------------------
    # The table

    @classmethod
    def from_sigma_edges(cls, sigma_edges: Tensor | Sequence[float], density: Tensor | Sequence[float] | None = None,
                         **kwargs) -> TabulatedLogSigma:
        """Same, with the edges given in σ rather than ln σ."""
        sig = _as_f64(sigma_edges, "sigma_edges")
        if not bool((sig > 0).all()):
            raise ValueError("tabulated schedule: sigma_edges must be > 0")
        return cls(sig.log(), density, **kwargs)

    @property
    def num_bins(self) -> int:
        return self.bin_mass.numel()

    @property
    def widths(self) -> Tensor:
        """Bin widths in ln σ."""
        return self.log_edges[1:] - self.log_edges[:-1]

    @property
    def heights(self) -> Tensor:
        """Density per unit ln σ in each bin."""
        return self.bin_mass / self.widths

    def set_masses(self, masses: Tensor | Sequence[float]) -> None:
        """Replace the bin probabilities (normalised here) in place, keeping the buffers' device."""
        m = torch.as_tensor(masses, dtype=torch.float64, device=self.bin_mass.device)
        if m.shape != self.bin_mass.shape:
            raise ValueError(f"tabulated schedule: expected {self.num_bins} bin masses, got shape {tuple(m.shape)}")
        if not bool(torch.isfinite(m).all()) or bool((m < 0).any()):
            raise ValueError("tabulated schedule: bin masses must be finite and >= 0")
        total = m.sum()
        if not bool(total > 0):
            raise ValueError("tabulated schedule: bin masses sum to zero; the density has no mass")
        m = m / total
        cum = torch.cat([m.new_zeros(1), torch.cumsum(m, 0)])
        cum[-1] = 1.0  # exact, so that q = 1 maps to the last edge with mass
        self.bin_mass.copy_(m)
        self.cum_mass.copy_(cum)
        self._truncation_changed()

    def set_density(self, density: Tensor | Sequence[float]) -> None:
        """Replace the heights per unit ln σ (normalised here) in place."""
        h = torch.as_tensor(density, dtype=torch.float64, device=self.bin_mass.device)
        if h.shape != self.bin_mass.shape:
            raise ValueError(f"tabulated schedule: expected {self.num_bins} densities, got shape {tuple(h.shape)}")
        self.set_masses(h * self.widths)

    # ----------------------------------------------------------------------------------------------------------------
    # NoiseSchedule interface (float64)

    def _bin_of(self, u: Tensor) -> Tensor:
        """Index k with e_k ≤ u < e_{k+1}, clamped to [0, K−1] (the last edge belongs to the last bin)."""
        k = torch.searchsorted(self.log_edges, u.contiguous(), right=True) - 1
        return k.clamp_(0, self.num_bins - 1)

    def _log_density(self, u: Tensor) -> Tensor:
        u = u.to(self.log_edges.device)
        k = self._bin_of(u)
        out = self.heights.log()[k]  # log 0 = −inf for empty bins
        outside = (u < self.log_edges[0]) | (u > self.log_edges[-1])
        return out.masked_fill(outside, -float("inf"))

    def _cdf(self, u: Tensor) -> Tensor:
        u = u.to(self.log_edges.device).clamp(self.log_edges[0], self.log_edges[-1])
        k = self._bin_of(u)
        frac = (u - self.log_edges[k]) / self.widths[k]
        return (self.cum_mass[k] + self.bin_mass[k] * frac).clamp(0.0, 1.0)

    def _icdf(self, q: Tensor) -> Tensor:
        q = q.to(self.cum_mass.device)
        k = (torch.searchsorted(self.cum_mass, q.contiguous(), right=False) - 1).clamp_(0, self.num_bins - 1)
        frac = ((q - self.cum_mass[k]) / self.bin_mass[k].clamp_min(_TINY)).clamp(0.0, 1.0)
        return self.log_edges[k] + frac * self.widths[k]

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._truncation_changed()  # the loaded masses replace the ones the cached truncation was computed from

    def extra_repr(self) -> str:
        lo, hi = float(self.log_edges[0].exp()), float(self.log_edges[-1].exp())
        base = super().extra_repr()
        return f"num_bins={self.num_bins}, sigma in [{lo:.4g}, {hi:.4g}]" + (f", {base}" if base else "")
