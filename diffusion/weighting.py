"""Loss weightings w(σ): the training loss is E_σ[ w(σ)·‖D(y + σn; σ) − y‖² ] with σ drawn from the schedule.

Every weight here is expressed in **denoiser (x₀) space**, i.e. it multiplies the error of D against the clean data
y, whatever the network's own prediction target. This is the convention of EDM (Karras et al. 2022, arXiv 2206.00364,
Eq. 2 and Table 1) and the one InfoNoise's divide-by-weight step needs. The SNR is 1/σ² (λ = −2 ln σ, no σ_data; see
``diffusion.noise_levels``), the SNR of the equivalent VP process x_vp = α·y + s·n, α = 1/√(1+σ²), s = σ/√(1+σ²).

Plain MSE on another target, written as an x₀-space weight (with D the denoiser's estimate of y):
    ε:   ε̂ = (x − D)/σ  ⇒  ε̂ − ε = −(D − y)/σ                   ⇒ w = 1/σ² = SNR
    x₀:  w = 1
    v:   v = α·n − s·y (Salimans & Ho 2022) and v̂ = (α·x_vp − D)/s, so v̂ − v = (α²·y + α·s·n − D)/s − α·n + s·y
         = (y − D)(α² + s²)/s = −(D − y)/s     ⇒ w = 1/s² = (1 + σ²)/σ² = 1 + SNR
(equivalently, in ε units: x₀-MSE = e^{−λ}·ε-MSE and v-MSE = (1 + e^{−λ})·ε-MSE, the three targets Hang et al. 2024
compare).

| name          | w(σ) in x₀ space                          | source                                             |
|---------------|--------------------------------------------|----------------------------------------------------|
| edm           | (σ² + σ_d²)/(σ·σ_d)²                       | Karras et al. 2022, Table 1                         |
| eps_mse       | 1/σ²                                        | plain ε-prediction MSE (Ho et al. 2020)             |
| x0_mse        | 1                                           | plain x₀-prediction MSE                             |
| v_mse         | 1 + 1/σ²                                    | plain v-prediction MSE (Salimans & Ho 2022)         |
| snr           | SNR = 1/σ²  (the same function as eps_mse)  | Min-SNR paper's "SNR weighting" (Hang et al. 2023)  |
| min_snr       | min(SNR, γ), γ = 5                          | Min-SNR-γ (Hang et al. 2023, Eq. 9)                 |
| soft_min_snr  | 1/(1/SNR + 1/γ) = 1/(σ² + 1/γ), γ = 1/σ_d²   | Crowson et al. 2024 (HDiT / k-diffusion)            |
| importance    | w_target(σ)·q(σ)/p(σ)                      | Hang et al. 2024 / Kingma & Gao 2023, see below     |
| edm2_uncertainty | λ_edm(σ)/e^{u(σ)}, u learned (+ u in the loss) | Karras et al. 2024 (EDM2), see below          |

Min-SNR-γ is written for each target in its own paper (min(SNR, γ)/SNR for ε, min(SNR, γ)/(SNR + 1) for v); in x₀
space all of these are min(SNR, γ). Soft-min-SNR is k-diffusion's ``soft-min-snr`` c_weight = (σσ_d)²/(σ² + σ_d²)²
on the EDM-preconditioned output; dividing by c_out² = σ²σ_d²/(σ² + σ_d²) gives the x₀ weight 1/(σ² + σ_d²), the
harmonic soft minimum of SNR and γ = 1/σ_d² (γ = 4 for σ_d = 0.5).

**Importance weighting.** Hang et al.'s objective ½·E_{λ~p}[(w(λ)/p(λ))·‖ε̂ − ε‖²] depends only on w/p: drawing
σ from a schedule p with weight w·q/p has the same expectation as drawing σ from q with weight w,

    E_{u~p}[ w(u)·(q(u)/p(u))·L(u) ] = ∫ w·q·L du = E_{u~q}[ w(u)·L(u) ]     (wherever p > 0 on the support of q).

``weighting=importance`` takes a ``target`` weighting config and a ``reference`` schedule config (the density q),
and the *sampling* schedule p is the run's training schedule, attached after both are built with
``weighting.attach_schedule(schedule)`` (densities per unit ln σ; the Jacobian cancels in the ratio, and truncation of
either is respected). So ``schedule=laplace weighting=importance`` trains with Laplace's σ draws but EDM's expected
objective (lognormal + edm weight), and ``schedule=lognormal weighting=importance weighting.reference=...`` moves a
density into the weight. The ratio has finite variance only where p's tails are at least as heavy as q's.

**Learned uncertainty (EDM2).** Karras et al. 2024 ("Analyzing and Improving the Training Dynamics of Diffusion
Models", arXiv 2312.02696, Sec. 2, config B, after Kendall et al. 2018's multi-task uncertainty weighting) train a
small function u(σ) jointly with the network and minimise, per element of D − y,

    (λ(σ)/e^{u(σ)})·(D − y)² + u(σ),      λ = EDM's weight,

i.e. per sample (summed over its d elements, as everywhere here) λ/e^u·‖D − y‖² + d·u. For a fixed per-σ error
e = E‖D − y‖²/d the optimum is u*(σ) = ln(λ(σ)·e(σ)) (set the derivative −λe^{−u}·d·e + d to zero), where the
effective weight λ/e^{u*} = 1/e(σ) equalises the loss over σ: an *adaptive weighting*, the counterpart of an adaptive
training distribution such as InfoNoise, and combinable with it (InfoNoise divides by the current effective weight
λ/e^u). ``weighting=edm2_uncertainty`` takes the u-module from the trainer (``training.denoiser.build_uncertainty``:
EDM2's head, an MP-Fourier embedding of c_noise = ¼ ln σ and one linear layer; ``diffusion/`` does not build
networks) and evaluates u(σ) = module(ln σ / 4). With u ≡ 0 the loss is EDM's.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from configs import build_from_registry
from diffusion.schedules import build_schedule


class LossWeighting:
    """A loss weight w(σ) in x₀ space; subclasses implement ``__call__``."""

    name = "base"

    def __call__(self, sigma: Tensor) -> Tensor:
        raise NotImplementedError

    def weighted_loss(self, sigma: Tensor, sq_err: Tensor, num_dims: int) -> Tensor:
        """The per-sample training loss from the per-sample ‖D − y‖² (summed over its ``num_dims`` elements):
        w(σ)·‖D − y‖² here; a learned weighting (``edm2_uncertainty``) adds its own term."""
        return self(sigma) * sq_err

    def attach_schedule(self, schedule: Any) -> None:
        """Tell the weighting which schedule the training σ are drawn from (used by ``importance``; no-op here).

        train.py calls this once, after building the schedule (which may itself need the weighting).
        """

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({params})"


def _check_sigma_data(sigma_data: float) -> float:
    if not (isinstance(sigma_data, (int, float)) and math.isfinite(sigma_data) and sigma_data > 0):
        raise ValueError(f"weighting.sigma_data must be > 0, got {sigma_data}")
    return float(sigma_data)


class EDMWeighting(LossWeighting):
    """λ(σ) = (σ² + σ_data²) / (σ·σ_data)²."""

    name = "edm"

    def __init__(self, sigma_data: float = 0.5):
        self.sigma_data = _check_sigma_data(sigma_data)

    def __call__(self, sigma: Tensor) -> Tensor:
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2


class EpsMSEWeighting(LossWeighting):
    """Plain ε-prediction MSE: w = 1/σ²."""

    name = "eps_mse"

    def __call__(self, sigma: Tensor) -> Tensor:
        return sigma.pow(-2)


class X0MSEWeighting(LossWeighting):
    """Plain x₀-prediction MSE: w = 1."""

    name = "x0_mse"

    def __call__(self, sigma: Tensor) -> Tensor:
        return torch.ones_like(sigma)


class VMSEWeighting(LossWeighting):
    """Plain v-prediction MSE: w = 1/s² = (1 + σ²)/σ² = 1 + SNR."""

    name = "v_mse"

    def __call__(self, sigma: Tensor) -> Tensor:
        return 1.0 + sigma.pow(-2)


class SNRWeighting(LossWeighting):
    """w = SNR = 1/σ² (the Min-SNR paper's "SNR weighting"; the same function as ``eps_mse``)."""

    name = "snr"

    def __call__(self, sigma: Tensor) -> Tensor:
        return sigma.pow(-2)


class MinSNRWeighting(LossWeighting):
    """Min-SNR-γ: w = min(SNR, γ)."""

    name = "min_snr"

    def __init__(self, gamma: float = 5.0):
        if not (math.isfinite(gamma) and gamma > 0):
            raise ValueError(f"weighting=min_snr: gamma must be a finite number > 0, got {gamma}")
        self.gamma = float(gamma)

    def __call__(self, sigma: Tensor) -> Tensor:
        return sigma.pow(-2).clamp(max=self.gamma)


class SoftMinSNRWeighting(LossWeighting):
    """Soft-min-SNR: w = 1/(1/SNR + 1/γ) = 1/(σ² + 1/γ), with γ = 1/σ_data² unless given."""

    name = "soft_min_snr"

    def __init__(self, gamma: float | None = None, sigma_data: float = 0.5):
        if gamma is None:
            gamma = 1.0 / _check_sigma_data(sigma_data) ** 2
        if not (math.isfinite(gamma) and gamma > 0):
            raise ValueError(f"weighting=soft_min_snr: gamma must be a finite number > 0 or null, got {gamma}")
        self.gamma = float(gamma)

    def __call__(self, sigma: Tensor) -> Tensor:
        return 1.0 / (sigma**2 + 1.0 / self.gamma)


class ImportanceWeighting(LossWeighting):
    """w_imp(σ) = w_target(σ)·q(σ)/p(σ): σ ~ p with this weight has the expectation of σ ~ q with weight w_target.

    ``target`` is a weighting config, ``reference`` a schedule config (q); p is the training schedule given later to
    ``attach_schedule``. ``img_resolution`` and ``sigma_data`` are forwarded as context to the reference schedule
    and the target weighting (e.g. ``cosine_shifted`` needs the resolution).
    """

    name = "importance"

    def __init__(self, target: Any, reference: Any, img_resolution: int | None = None,
                 sigma_data: float | None = None):
        context = {k: v for k, v in (("img_resolution", img_resolution), ("sigma_data", sigma_data))
                   if v is not None}
        if target is None or reference is None:
            raise ValueError("weighting=importance needs weighting.target (a weighting config, e.g. {name: edm}) and "
                             "weighting.reference (a schedule config, e.g. {name: lognormal})")
        self.target = build_weighting(target, **context)
        if isinstance(self.target, ImportanceWeighting):
            raise ValueError("weighting=importance: weighting.target cannot itself be 'importance'")
        if isinstance(self.target, EDM2UncertaintyWeighting):
            raise ValueError("weighting=importance: weighting.target cannot be 'edm2_uncertainty' (a learned weight "
                             "has no fixed target to reweight); use weighting=edm2_uncertainty directly")
        self.reference = build_schedule(reference, **context)
        self._sampling = None

    def attach_schedule(self, schedule: Any) -> None:
        if not (hasattr(schedule, "log_density") and callable(schedule.log_density)):
            raise TypeError(f"weighting=importance: the sampling schedule must have log_density, got {schedule!r}")
        self._sampling = schedule

    @property
    def sampling(self) -> Any:
        return self._sampling

    def density_ratio(self, sigma: Tensor) -> Tensor:
        """q(σ)/p(σ) in float64 (both per unit ln σ)."""
        if self._sampling is None:
            raise RuntimeError("weighting=importance: call weighting.attach_schedule(schedule) with the training "
                               "schedule before computing weights (train.py does this after building the schedule)")
        u = torch.log(sigma.to(torch.float64))
        return torch.exp(self.reference.log_density(u) - self._sampling.log_density(u))

    def __call__(self, sigma: Tensor) -> Tensor:
        ratio = self.density_ratio(sigma).to(sigma.dtype)
        return self.target(sigma) * ratio

    def __repr__(self) -> str:
        sampling = "unattached" if self._sampling is None else repr(self._sampling)
        return f"ImportanceWeighting(target={self.target!r}, reference={self.reference!r}, sampling={sampling})"


class EDM2UncertaintyWeighting(LossWeighting):
    """EDM2's learned uncertainty weighting (module docstring): loss = λ(σ)/e^{u(σ)}·‖D − y‖² + d·u(σ).

    ``uncertainty`` maps c_noise = ln σ / 4 to u, shape [N] (``models.edm2.EDM2LogVar``, built and trained by the
    trainer, which passes it here); ``channels`` is the size of that module's Fourier embedding (EDM2: 128), read by
    the trainer. ``__call__`` gives the current effective weight λ/e^u, without gradient (what InfoNoise divides by).
    """

    name = "edm2_uncertainty"

    def __init__(self, sigma_data: float = 0.5, channels: int = 128, uncertainty: Any = None):
        self.edm = EDMWeighting(sigma_data)
        if not (isinstance(channels, int) and channels > 0):
            raise ValueError(f"weighting=edm2_uncertainty: channels must be a positive integer, got {channels!r}")
        self.channels = channels
        self._uncertainty = uncertainty

    @property
    def uncertainty(self) -> Any:
        return self._uncertainty

    def log_variance(self, sigma: Tensor) -> Tensor:
        """u(σ), shape [N], with gradient to the u-module's parameters."""
        if self._uncertainty is None:
            raise RuntimeError("weighting=edm2_uncertainty needs its learned u(σ) module: the trainer builds it "
                               "(training.denoiser.build_uncertainty) and passes it as uncertainty=")
        return self._uncertainty(sigma.log() / 4.0).reshape(sigma.shape)

    def __call__(self, sigma: Tensor) -> Tensor:
        with torch.no_grad():
            u = self.log_variance(sigma)
        return self.edm(sigma) * torch.exp(-u.to(sigma.dtype))

    def weighted_loss(self, sigma: Tensor, sq_err: Tensor, num_dims: int) -> Tensor:
        u = self.log_variance(sigma).to(sq_err.dtype)
        return self.edm(sigma).to(sq_err.dtype) * torch.exp(-u) * sq_err + num_dims * u

    def __repr__(self) -> str:
        return f"EDM2UncertaintyWeighting(sigma_data={self.edm.sigma_data}, channels={self.channels})"


WEIGHTINGS: dict[str, type[LossWeighting]] = {
    "edm": EDMWeighting,
    "eps_mse": EpsMSEWeighting,
    "x0_mse": X0MSEWeighting,
    "v_mse": VMSEWeighting,
    "snr": SNRWeighting,
    "min_snr": MinSNRWeighting,
    "soft_min_snr": SoftMinSNRWeighting,
    "importance": ImportanceWeighting,
    "edm2_uncertainty": EDM2UncertaintyWeighting,
}


def build_weighting(weighting_cfg: Any, **context: Any) -> LossWeighting:
    """Build the weighting named by ``weighting_cfg.name``.

    ``context`` (``img_resolution=``, ``sigma_data=``) is passed to the weightings whose constructors take a parameter
    of that name (``importance`` forwards it to its reference schedule). A weighting that depends on the training
    schedule receives it afterwards through ``attach_schedule``.
    """
    return build_from_registry("weighting", WEIGHTINGS, weighting_cfg, context=context)
