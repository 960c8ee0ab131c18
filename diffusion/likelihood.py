"""Likelihood of a trained denoiser: exact-in-expectation NLL through the probability-flow ODE (8-bit data) and a
variational bound for binarized data, both in bits per dimension.

Notation as in EDM (Karras et al. 2022, arXiv 2206.00364, Sec. 2): x = y + σ·n, D(x; σ) ≈ E[y | x], d = dimensions
(C·H·W), model space [-1, 1] (``data.to_model_space``: x = u/127.5 − 1 for pixel value u).

**1. ODE likelihood** (Song et al. 2021, "Score-based generative modeling through SDEs", App. D; Chen et al. 2018
for the instantaneous change of variables). The probability-flow ODE dx/dσ = f(x, σ) = (x − D(x; σ))/σ carries
p_σ_max to p_σ_min, and along a solution d log p_σ(x(σ))/dσ = −∇·f. In u = ln σ, with ∇·f = (d − tr ∂D/∂x)/σ,

    dx/du          = x − D(x; e^u)
    log p_σmin(x)  = log N(x(σ_max); 0, σ_max² I) + ∫_{ln σ_min}^{ln σ_max} (d − tr ∂D/∂x) du      (nats)

starting from the data point x(σ_min) = x. The prior N(0, σ_max² I) replaces p_σ_max (the data's own variance
s² ≤ 1 adds at most d·s²/(2σ_max²) ≈ 8e-5·d nats at σ_max = 80). The trace is estimated with Hutchinson's
estimator tr A = E[εᵀAε] for probes with E[εεᵀ] = I: Rademacher (±1, ``probe="rademacher"``) or standard normal
(``probe="gaussian"``), ``num_probes`` of them per image (averaged), **fixed per image along the whole trajectory**;
εᵀ(∂D/∂x)ε is one vector-Jacobian product. Only tr ∂D/∂x is estimated, d is exact.

*Estimator error.* The trajectory x(u) does not depend on ε, so the estimate of the integral is εᵀMε with
M = ∫ ∂D/∂x du along the trajectory: unbiased, with standard deviation per image
    √(2(‖M‖_F² − Σ_i M_ii²)/K)  (Rademacher)      √(2‖M‖_F²/K)  (Gaussian)          nats, K = num_probes.
For Gaussian data y ~ N(0, s²I) and the exact denoiser D = s²/(s²+σ²)·x, M = m·I with
m = ln(σ_max/σ_min) − ½·ln((s²+σ_max²)/(s²+σ_min²)): Rademacher probes are then exact and Gaussian probes have
standard deviation m·√(2d/K) nats per image (``tests/test_likelihood.py`` checks both).

*Solver.* Fixed-step Heun (explicit trapezoidal rule, 2nd order) on a uniform grid in u = ln σ, ``num_steps``
steps from σ_min to σ_max, 2 network evaluations (each with K vector-Jacobian products) per step; x and the log-
density integral advance together. Every image sees the same grid and its own probes, so its NLL depends only on
its seed, not on the batch it was evaluated in. The state is float64; the network runs in its own precision.

**2. Dequantisation and bits/dim for 8-bit data** (Theis et al. 2016; Ho et al. 2020 report on this scale).
For pixel value u ∈ {0..255} let u_c = u + v, v ~ U[0, 1), the continuous value on the [0, 256) scale. Its model-
space image is x = (u_c − 128)/127.5 (= (u + v − ½)/127.5 − 1: the bin of u is exactly the set ``data.to_uint8``
rounds to u, centred on ``to_model_space(u)``). With dx/du_c = 1/127.5 per dimension,

    p_u(u_c) = p_x(x)·127.5^(−d),    P(u) = ∫_bin p_u ≥ exp E_v[log p_u(u + v)]      (bin volume 1, Jensen)

so  −log₂ P(u)/d ≤ E_v[−log p_x(x)]/(d·ln 2) + log₂ 127.5  =: the reported bits/dim (an upper bound on the
discrete model's NLL). With data scaled to [0, 1] by u/256 the same derivation gives the familiar "+ 8" (log₂ 256);
model space here is [-1, 1] with scale 127.5, hence + log₂ 127.5 = 6.994. One draw of v per image (its seed).

**3. Binarized data: the continuous-time variational bound** (Kingma et al. 2021, VDM, arXiv 2107.00630, T → ∞;
Kong et al. 2023, ITD). For y ∈ {−1, +1}^d (binarized pixels 0/255 in model space), with γ = 1/σ² the SNR,

    −log P(y) ≤ L_prior + L_diff + L_rec,
    L_diff  = ½ ∫_{γ(σ_max)}^{γ(σ_min)} E_n‖y − D(y + σn; σ)‖² dγ = ∫_{ln σ_min}^{ln σ_max} E_n‖y − D‖²/σ² d ln σ,
    L_prior = KL(N(y, σ_max² I) ‖ N(0, σ_max² I)) = ‖y‖²/(2σ_max²),
    L_rec   = E_n[−log P(y | x = y + σ_min·n)],  P(y_i | x_i) ∝ exp(−(x_i − y_i)²/(2σ_min²)) over y_i ∈ {±1}
            = Σ_i E softplus(−2·y_i·x_i/σ_min²).

L_diff is the per-image area ∫ m̂(σ)/σ² d ln σ that InfoNoise's estimator approximates (Raya et al. 2026, arXiv
2602.18647; I-MMSE: Guo, Shamai & Verdú 2005, d I/d snr = ½·mmse): with σ_min → 0, σ_max → ∞ it is
ITD's discrete estimate, and its mean over the data is ≥ H(y), with equality for the exact denoiser (I-MMSE). So
this is an upper bound on −log₂ P_θ(y)/d of the model's own discrete distribution (the diffusion's variational
model: prior, reverse process, decoder), in bits/dim, directly comparable to the ODE value of 8-bit data only in
that both bound a discrete NLL. L_diff is estimated without bias by stratified Monte Carlo: ``num_steps`` equal
strata in ln σ, one uniformly drawn ln σ and one noise n per stratum and image (all from the image's seed). For
fair bits the bound is 1 bit/dim (tested with the exact denoiser a·tanh(a·x/σ²)).

*Where to stop (σ_min).* Every σ_min gives a valid bound, on the discrete model "diffusion down to σ_min, then the
rounding decoder". For ±1 data the decoder is essentially exact from σ_min ≈ 0.2 down (L_rec < 1e-5 bits/dim for
the data itself: softplus(−50 − 10n)), and the exact denoiser has no error there either (its rate mmse/σ² vanishes
like e^(−1/(2σ²))). A trained network, however, must amplify the noise by 1/σ to predict it at σ ≪ 0.1 (with EDM's
preconditioning D − y = σ·(n + F)), and its leftover error rate ‖n + F‖²/d, up to 1 nat per dim and unit ln σ,
dominates the bound when integrated down to 0.002: the demo model (binary digits, 200 kimg, 269 held-out images)
gives 0.388 bits/dim from σ_min = 0.2 and 2.13 from σ_min = 0.002. evaluate.py therefore starts the bound at
``eval.nll_elbo_sigma_min`` (default 0.2; the decoder term is reported, so a too-large value shows).

*The convention, and what it can favour.* That choice is a convention of this code, not of the sources: the sampler
integrates down to its σ_min = 0.002, and VDM (Kingma et al. 2021) and ITD (Kong et al. 2023) integrate the bound to
very high SNR. Stopping at 0.2 leaves the noise levels below 0.2 to the rounding decoder, which is exact there for
±1 data whatever the network does, so the 0.2 bound does not see how well a model denoises at σ < 0.2: it can favour
a training schedule that spends little training there (Laplace, for one) over one that trains there (EDM's
log-normal), where the bound down to the sampler's σ_min would charge the first for its error. evaluate.py therefore
reports both, side by side and under different names: ``nll_elbo_bpd`` (from ``eval.nll_elbo_sigma_min``, 0.2 by
default, as it always was) and ``nll_elbo_bpd_smin<σ>`` (from the sampler's σ_min, e.g. ``nll_elbo_bpd_smin0.002``).
The second is the first plus the diffusion term on [σ_min_sampler, 0.2] and the decoder at σ_min_sampler in place of
the decoder at 0.2 (``binary_elbo(..., sigma_min_low=)``): its extra strata are drawn after all of the first's draws
from each image's stream, so the first number is unchanged by computing the second.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "PROBE_KINDS",
    "NLL_METHODS",
    "ODE_SOLVERS",
    "PIXEL_SCALE",
    "ODELikelihood",
    "BinaryELBO",
    "ode_log_likelihood",
    "binary_elbo",
    "low_strata",
    "dequantize",
    "nll_bits_per_dim",
    "bits_per_dim_8bit",
]

PROBE_KINDS = ("rademacher", "gaussian")
NLL_METHODS = ("ode", "elbo")
PIXEL_SCALE = 127.5  # model space x = u / 127.5 - 1 (data.to_model_space)
LN2 = math.log(2.0)

Denoiser = Callable[..., Tensor]


def _generators(seeds: Sequence[int], device: torch.device) -> list[torch.Generator]:
    gens = []
    for seed in seeds:
        g = torch.Generator(device=device)
        g.manual_seed(int(seed) % (1 << 63))
        gens.append(g)
    return gens


def _draw(gens: Sequence[torch.Generator], shape: Sequence[int], kind: str, device: torch.device,
          dtype: torch.dtype) -> Tensor:
    """[len(gens), *shape] random tensor, row i from generator i: ``gaussian``, ``rademacher`` or ``uniform``."""
    rows = []
    for g in gens:
        if kind == "gaussian":
            rows.append(torch.randn(tuple(shape), generator=g, device=device, dtype=dtype))
        elif kind == "rademacher":
            rows.append(torch.randint(0, 2, tuple(shape), generator=g, device=device).to(dtype) * 2 - 1)
        elif kind == "uniform":
            rows.append(torch.rand(tuple(shape), generator=g, device=device, dtype=dtype))
        else:
            raise ValueError(f"unknown random kind {kind!r}")
    return torch.stack(rows)


def _check_probe(probe: str, num_probes: int) -> None:
    if probe not in PROBE_KINDS:
        raise ValueError(f"unknown eval.nll_probe {probe!r}; valid: {', '.join(PROBE_KINDS)}")
    if int(num_probes) < 1:
        raise ValueError(f"eval.nll_probes must be >= 1, got {num_probes}")


def _check_range(sigma_min: float, sigma_max: float, num_steps: int) -> None:
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max for the likelihood, got {sigma_min}, {sigma_max}")
    if int(num_steps) < 1:
        raise ValueError(f"eval.nll_steps must be >= 1, got {num_steps}")


@dataclass
class ODELikelihood:
    """Per-image results of ``ode_log_likelihood`` (float64 [N], nats; ``nfe``: network evaluations per image)."""

    log_prob: Tensor  # log p_σmin(x) = prior_log_prob + divergence_integral
    prior_log_prob: Tensor  # log N(x(σ_max); 0, σ_max² I)
    divergence_integral: Tensor  # ∫ (d − εᵀ(∂D/∂x)ε) d ln σ
    x_end: Tensor  # x(σ_max)
    nfe: Tensor


def _drift_and_divergence(denoiser: Denoiser, x: Tensor, sigma: Tensor, probes: Tensor,
                          class_labels: Tensor | None) -> tuple[Tensor, Tensor]:
    """(x − D(x; σ), mean over probes of εᵀ(∂D/∂x)ε per image); probes: [K, N, C, H, W]."""
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        den = denoiser(xg, sigma, class_labels=class_labels).to(x.dtype)
        quad = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        for k in range(probes.shape[0]):
            (vjp,) = torch.autograd.grad(den, xg, grad_outputs=probes[k].to(den.dtype),
                                         retain_graph=k + 1 < probes.shape[0])
            quad = quad + (vjp.to(x.dtype) * probes[k]).flatten(1).sum(1)
    return (x - den.detach()), quad / probes.shape[0]


# Dormand–Prince 5(4) (Dormand & Prince 1980): nodes c, stage matrix a, 5th-order weights b (= the last stage row,
# "first same as last"), and b − b* (5th minus embedded 4th order) for the error estimate.
_DP_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0)
_DP_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
)
_DP_B = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84)
_DP_E = (35 / 384 - 5179 / 57600, 0.0, 500 / 1113 - 7571 / 16695, 125 / 192 - 393 / 640,
         -2187 / 6784 + 92097 / 339200, 11 / 84 - 187 / 2100, -1 / 40)
ODE_SOLVERS = ("rk45", "heun")


def _bcast(v: Tensor, like: Tensor) -> Tensor:
    return v.reshape(-1, *([1] * (like.ndim - 1)))


@torch.no_grad()
def ode_log_likelihood(
    denoiser: Denoiser, x: Tensor, *, seeds: Sequence[int] | None = None, probes: Tensor | None = None,
    sigma_min: float = 0.002, sigma_max: float = 80.0, solver: str = "rk45", tolerance: float = 1e-5,
    num_steps: int = 128, num_probes: int = 1, probe: str = "rademacher", class_labels: Tensor | None = None,
    sigma_data: float | None = None, max_nfe: int = 20000, dtype: torch.dtype = torch.float64,
) -> ODELikelihood:
    """log p_σmin(x) of the model-space points ``x`` [N, C, H, W] through the probability-flow ODE (module doc, §1).

    Args:
        probes / seeds: the Hutchinson probes [K, N, C, H, W], or seeds of per-image generators to draw them from.
        solver: ``rk45`` (adaptive Dormand–Prince 5(4), per-image step sizes, rtol = atol = ``tolerance``) or
            ``heun`` (fixed ``num_steps`` steps, uniform in ln σ).
        sigma_data: scale of the integration variable z = x/√(σ² + σ_d²) (default: the denoiser's ``sigma_data``,
            else 0.5); any value gives the same ODE, a good one makes z nearly constant and the solver cheap.
    """
    _check_range(sigma_min, sigma_max, num_steps)
    if solver not in ODE_SOLVERS:
        raise ValueError(f"unknown eval.nll_solver {solver!r}; valid: {', '.join(ODE_SOLVERS)}")
    if not tolerance > 0:
        raise ValueError(f"eval.nll_tolerance must be > 0, got {tolerance}")
    x = x.to(dtype)
    n, d = x.shape[0], x[0].numel()
    if probes is None:
        if seeds is None or len(seeds) != n:
            raise ValueError(f"pass one seed per image ({n}) or the probes themselves")
        _check_probe(probe, num_probes)
        gens = _generators(seeds, x.device)
        probes = _draw(gens, (int(num_probes), *x.shape[1:]), probe, x.device, dtype).transpose(0, 1)
    probes = probes.to(device=x.device, dtype=dtype)
    if probes.ndim != x.ndim + 1 or probes.shape[1:] != x.shape:
        raise ValueError(f"probes must have shape [K, *x.shape] = [K, {', '.join(map(str, x.shape))}], "
                         f"got {tuple(probes.shape)}")
    sd2 = float(sigma_data if sigma_data is not None else getattr(denoiser, "sigma_data", 0.5)) ** 2
    u_lo, u_hi = math.log(sigma_min), math.log(sigma_max)

    def rates(z: Tensor, u: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
        """(dz/du, d(log p)/du) at per-image u [n] for the images ``idx``; z = x/a(u), a = √(σ² + σ_d²)."""
        sigma2 = (2 * u).exp()
        a = _bcast((sigma2 + sd2).sqrt(), z)
        labels = None if class_labels is None else class_labels[idx]
        drift, quad = _drift_and_divergence(denoiser, a * z, _bcast(sigma2.sqrt(), z), probes[:, idx], labels)
        return drift / a - _bcast(sigma2 / (sigma2 + sd2), z) * z, d - quad

    scale_lo, scale_hi = math.sqrt(sigma_min**2 + sd2), math.sqrt(sigma_max**2 + sd2)
    z = x / scale_lo
    integral = torch.zeros(n, dtype=dtype, device=x.device)
    nfe = torch.zeros(n, dtype=torch.int64, device=x.device)
    everyone = torch.arange(n, device=x.device)
    if solver == "heun":
        us = torch.linspace(u_lo, u_hi, int(num_steps) + 1, dtype=dtype, device=x.device)
        for i in range(int(num_steps)):
            u0, u1 = us[i].expand(n), us[i + 1].expand(n)
            h = float(us[i + 1] - us[i])
            k1, g1 = rates(z, u0, everyone)
            k2, g2 = rates(z + h * k1, u1, everyone)
            z = z + 0.5 * h * (k1 + k2)
            integral = integral + 0.5 * h * (g1 + g2)
        nfe += 2 * int(num_steps)
    else:
        z, integral, nfe = _dormand_prince(rates, z, integral, nfe, u_lo, u_hi, float(tolerance), d, max_nfe)
    x_end = z * scale_hi
    prior = -0.5 * d * math.log(2 * math.pi * sigma_max**2) - x_end.flatten(1).square().sum(1) / (2 * sigma_max**2)
    return ODELikelihood(log_prob=prior + integral, prior_log_prob=prior, divergence_integral=integral, x_end=x_end,
                         nfe=nfe)


def _dormand_prince(rates: Callable[..., tuple[Tensor, Tensor]], z: Tensor, integral: Tensor, nfe: Tensor,
                    u_lo: float, u_hi: float, tol: float, d: int, max_nfe: int) -> tuple[Tensor, Tensor, Tensor]:
    """Adaptive DP5(4) for (z, ∫ g du) from u_lo to u_hi with a step size per image.

    Error norm per image (scipy's, with rtol = atol = tol): the RMS over the state of err/(tol + tol·max(|z|,|z'|)),
    or the log-density error relative to tol·(d + |∫g|) if that is larger; accept at <= 1, next step
    h·min(10, max(0.2, 0.9·norm^(−1/5))). Images do not interact, so each one's result depends on it alone.
    """
    n = z.shape[0]
    u = torch.full((n,), u_lo, dtype=z.dtype, device=z.device)
    h = torch.full((n,), 0.05, dtype=z.dtype, device=z.device)
    active = torch.ones(n, dtype=torch.bool, device=z.device)
    k_first = g_first = None  # FSAL: the last stage of an accepted step is the first of the next
    first_valid = torch.zeros(n, dtype=torch.bool, device=z.device)
    k_cache = torch.zeros_like(z)
    g_cache = torch.zeros_like(integral)
    while bool(active.any()):
        idx = active.nonzero().flatten()
        zi, ui = z[idx], u[idx]
        hi = torch.minimum(h[idx], u_hi - ui)
        need = ~first_valid[idx]
        k_first, g_first = k_cache[idx], g_cache[idx]
        if bool(need.any()):
            k_new, g_new = rates(zi[need], ui[need], idx[need])
            k_first[need], g_first[need] = k_new, g_new
            nfe[idx[need]] += 1
        ks, gs = [k_first], [g_first]
        for j in range(1, 6):
            dz = sum(a * k for a, k in zip(_DP_A[j], ks) if a != 0.0)
            k_j, g_j = rates(zi + _bcast(hi, zi) * dz, ui + _DP_C[j] * hi, idx)
            ks.append(k_j)
            gs.append(g_j)
        z_new = zi + _bcast(hi, zi) * sum(b * k for b, k in zip(_DP_B, ks) if b != 0.0)
        int_new = integral[idx] + hi * sum(b * g for b, g in zip(_DP_B, gs) if b != 0.0)
        k_last, g_last = rates(z_new, ui + hi, idx)
        ks.append(k_last)
        gs.append(g_last)
        nfe[idx] += 6
        err_z = _bcast(hi, zi) * sum(e * k for e, k in zip(_DP_E, ks) if e != 0.0)
        err_g = hi * sum(e * g for e, g in zip(_DP_E, gs) if e != 0.0)
        scale_z = tol + tol * torch.maximum(zi.abs(), z_new.abs())
        norm_z = (err_z / scale_z).flatten(1).square().mean(1).sqrt()
        norm_g = err_g.abs() / (tol * (d + int_new.abs()))
        norm = torch.maximum(norm_z, norm_g)
        accept = norm <= 1
        acc = idx[accept]
        z[acc], integral[acc], u[acc] = z_new[accept], int_new[accept], ui[accept] + hi[accept]
        k_cache[acc], g_cache[acc] = k_last[accept], g_last[accept]
        first_valid[acc] = True
        factor = (0.9 * norm.clamp_min(1e-10) ** -0.2).clamp(0.2, 10.0)
        factor = torch.where(accept, factor, factor.clamp(max=1.0))
        h[idx] = hi * factor
        done = acc[u[acc] >= u_hi - 1e-12 * max(1.0, abs(u_hi))]
        active[done] = False
        if bool((nfe[idx] > max_nfe).any()):
            raise RuntimeError(f"the likelihood ODE needed more than {max_nfe} network evaluations for an image "
                               f"(tolerance {tol}); raise eval.nll_tolerance or use eval.nll_solver=heun")
    return z, integral, nfe


def dequantize(images: Tensor, noise: Tensor) -> Tensor:
    """Model-space points (u + v − 128)/127.5 of uint8 ``images`` with uniform ``noise`` v ∈ [0, 1) (module doc §2)."""
    if images.dtype != torch.uint8:
        raise TypeError(f"dequantize expects uint8 images, got {images.dtype}")
    return (images.to(noise.dtype) + noise - 128.0) / PIXEL_SCALE


def bits_per_dim_8bit(log_prob: Tensor, num_dims: int) -> Tensor:
    """Bits/dim on the [0, 256) pixel scale of a model-space log-density (nats): −log p/(d ln 2) + log₂ 127.5."""
    return -log_prob / (num_dims * LN2) + math.log2(PIXEL_SCALE)


@dataclass
class BinaryELBO:
    """Per-image terms of ``binary_elbo`` (float64 [N], nats); ``total`` = prior + diffusion + reconstruction.

    With ``sigma_min_low``: ``diffusion_low`` (the diffusion term on [sigma_min_low, sigma_min]) and
    ``reconstruction_low`` (the decoder at sigma_min_low); ``total_low`` = prior + diffusion + diffusion_low +
    reconstruction_low is the bound from sigma_min_low (module doc §3)."""

    total: Tensor
    prior: Tensor
    diffusion: Tensor
    reconstruction: Tensor
    diffusion_low: Tensor | None = None
    reconstruction_low: Tensor | None = None

    @property
    def total_low(self) -> Tensor | None:
        if self.diffusion_low is None:
            return None
        return self.prior + self.diffusion + self.diffusion_low + self.reconstruction_low


def low_strata(sigma_min_low: float, sigma_min: float, sigma_max: float, num_steps: int) -> int:
    """Strata on the extension [sigma_min_low, sigma_min]: as many as keep them no wider in ln σ than the
    ``num_steps`` strata of [sigma_min, sigma_max]."""
    width = math.log(sigma_max / sigma_min) / int(num_steps)
    return max(1, math.ceil(math.log(sigma_min / sigma_min_low) / width - 1e-9))


def _diffusion_term(denoiser: Denoiser, y: Tensor, gens: Sequence[torch.Generator], sigma_lo: float,
                    sigma_hi: float, k: int, class_labels: Tensor | None, dtype: torch.dtype) -> Tensor:
    """∫_{ln σ_lo}^{ln σ_hi} ‖D − y‖²/σ² d ln σ per image: k strata, from each image's stream k stratum offsets, then
    one noise per stratum."""
    lo, hi = math.log(sigma_lo), math.log(sigma_hi)
    width = (hi - lo) / k
    offsets = _draw(gens, (k,), "uniform", y.device, dtype)  # [N, k]
    diffusion = torch.zeros(y.shape[0], dtype=dtype, device=y.device)
    for j in range(k):
        u = lo + (j + offsets[:, j]) * width
        sigma = u.exp().reshape(-1, *([1] * (y.ndim - 1)))
        noise = _draw(gens, y.shape[1:], "gaussian", y.device, dtype)
        den = denoiser(y + sigma * noise, sigma, class_labels=class_labels).to(dtype)
        diffusion = diffusion + width * (den - y).flatten(1).square().sum(1) / sigma.flatten().square()
    return diffusion


def _decoder_term(y: Tensor, gens: Sequence[torch.Generator], sigma: float, dtype: torch.dtype) -> Tensor:
    """E[−log P(y | y + σn)] of the rounding decoder, one noise per image from its stream."""
    noise = _draw(gens, y.shape[1:], "gaussian", y.device, dtype)
    x = y + sigma * noise
    return torch.nn.functional.softplus(-2 * y * x / sigma**2).flatten(1).sum(1)


@torch.no_grad()
def binary_elbo(
    denoiser: Denoiser, y: Tensor, *, seeds: Sequence[int], sigma_min: float = 0.002, sigma_max: float = 80.0,
    num_steps: int = 128, class_labels: Tensor | None = None, dtype: torch.dtype = torch.float64,
    sigma_min_low: float | None = None,
) -> BinaryELBO:
    """The negative ELBO (nats) of ±1 data ``y`` [N, C, H, W] (module doc §3); one stratified draw per stratum.

    ``sigma_min_low`` (< sigma_min) also gives the bound from there (``BinaryELBO.total_low``), with
    ``low_strata`` strata on [sigma_min_low, sigma_min] drawn after every draw of the bound from sigma_min.
    """
    _check_range(sigma_min, sigma_max, num_steps)
    if sigma_min_low is not None and not 0 < sigma_min_low < sigma_min:
        raise ValueError(f"need 0 < sigma_min_low < sigma_min for the extended bound, got {sigma_min_low}, "
                         f"{sigma_min}")
    y = y.to(dtype)
    if not bool(((y == 1) | (y == -1)).all()):
        raise ValueError("the binary ELBO needs data in {-1, +1} (binarized pixels 0/255); use the ODE likelihood "
                         "(eval.nll_method=ode) for 8-bit data")
    n = y.shape[0]
    if len(seeds) != n:
        raise ValueError(f"{len(seeds)} seeds for {n} images")
    gens = _generators(seeds, y.device)
    # Per image: k stratum offsets, then k noise tensors, then the reconstruction noise (all from its own stream);
    # then, for sigma_min_low, the same for the extension.
    diffusion = _diffusion_term(denoiser, y, gens, sigma_min, sigma_max, int(num_steps), class_labels, dtype)
    prior = y.flatten(1).square().sum(1) / (2 * sigma_max**2)
    reconstruction = _decoder_term(y, gens, sigma_min, dtype)
    out = BinaryELBO(total=prior + diffusion + reconstruction, prior=prior, diffusion=diffusion,
                     reconstruction=reconstruction)
    if sigma_min_low is not None:
        k_low = low_strata(sigma_min_low, sigma_min, sigma_max, num_steps)
        out.diffusion_low = _diffusion_term(denoiser, y, gens, sigma_min_low, sigma_min, k_low, class_labels, dtype)
        out.reconstruction_low = _decoder_term(y, gens, sigma_min_low, dtype)
    return out


def nll_bits_per_dim(
    denoiser: Denoiser, images: Tensor, *, seeds: Sequence[int], method: str = "ode", sigma_min: float = 0.002,
    sigma_max: float = 80.0, solver: str = "rk45", tolerance: float = 1e-5, num_steps: int = 128,
    num_probes: int = 1, probe: str = "rademacher", class_labels: Tensor | None = None, batch_size: int = 256,
    device: torch.device | str = "cpu", info: dict | None = None, elbo_sigma_min_low: float | None = None,
) -> Tensor:
    """Per-image bits/dim (float64 [N], on the CPU) of uint8 ``images`` [N, C, H, W].

    ``method="ode"``: dequantised probability-flow-ODE NLL on the [0, 256) scale (module doc §1–2; dequantisation
    noise, then the probes, from each image's seed). ``method="elbo"``: the binary variational bound (§3; pixels must
    be 0 or 255; ``num_steps`` strata). ``class_labels``: one-hot float [N, label_dim] for conditional models (the
    images' own classes). ``info`` (a dict) receives ``nfe``: the mean network evaluations per image, and for the
    ELBO ``terms_bpd``: the mean diffusion / reconstruction / prior terms in bits/dim. ``elbo_sigma_min_low``
    (ELBO only, < sigma_min): also the bound from there (§3, "The convention"), per image in ``info["low_bpd"]``,
    its extra terms in ``terms_bpd`` (``diffusion_low``, ``reconstruction_low``); the returned bound is unchanged.
    """
    if method not in NLL_METHODS:
        raise ValueError(f"unknown eval.nll_method {method!r}; valid: auto, {', '.join(NLL_METHODS)}")
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"nll_bits_per_dim needs uint8 images [N, C, H, W], got {images.dtype} "
                         f"{tuple(images.shape)}")
    seeds = [int(s) for s in seeds]
    if len(seeds) != len(images):
        raise ValueError(f"{len(seeds)} seeds for {len(images)} images")
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    if method == "ode":
        _check_probe(probe, num_probes)
    low = elbo_sigma_min_low if method == "elbo" else None
    device = torch.device(device)
    d = images[0].numel()
    out, out_low = [], []
    nfe_total = 0
    terms = {"diffusion": 0.0, "reconstruction": 0.0, "prior": 0.0}
    if low is not None:
        terms.update(diffusion_low=0.0, reconstruction_low=0.0)
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size].to(device)
        batch_seeds = seeds[start:start + batch_size]
        labels = None if class_labels is None else class_labels[start:start + batch_size].to(device)
        if method == "elbo":
            elbo = _binary_batch(denoiser, batch, batch_seeds, sigma_min, sigma_max, num_steps, labels, low)
            out.append((elbo.total / (d * LN2)).cpu())
            if low is not None:
                out_low.append((elbo.total_low / (d * LN2)).cpu())
            for term in terms:
                terms[term] += float(getattr(elbo, term).sum()) / (d * LN2)
        else:
            gens = _generators(batch_seeds, device)
            v = _draw(gens, batch.shape[1:], "uniform", device, torch.float64)
            probes = _draw(gens, (int(num_probes), *batch.shape[1:]), probe, device, torch.float64).transpose(0, 1)
            x = dequantize(batch, v)
            result = ode_log_likelihood(denoiser, x, probes=probes, sigma_min=sigma_min, sigma_max=sigma_max,
                                        solver=solver, tolerance=tolerance, num_steps=num_steps, class_labels=labels)
            out.append(bits_per_dim_8bit(result.log_prob, d).cpu())
            nfe_total += int(result.nfe.sum())
    if info is not None:
        elbo_nfe = int(num_steps) + (low_strata(low, sigma_min, sigma_max, num_steps) if low is not None else 0)
        info["nfe"] = (nfe_total / len(images)) if method == "ode" and len(images) else (
            elbo_nfe if method == "elbo" else 0)
        if method == "elbo" and len(images):
            info["terms_bpd"] = {term: value / len(images) for term, value in terms.items()}
        if low is not None:
            info["low_bpd"] = torch.cat(out_low) if out_low else torch.empty(0, dtype=torch.float64)
    return torch.cat(out) if out else torch.empty(0, dtype=torch.float64)


def _binary_batch(denoiser: Denoiser, batch: Tensor, seeds: Sequence[int], sigma_min: float, sigma_max: float,
                  num_steps: int, labels: Tensor | None, sigma_min_low: float | None) -> BinaryELBO:
    """``binary_elbo`` of a uint8 batch of binarized images (pixels 0 or 255)."""
    if not bool(((batch == 0) | (batch == 255)).all()):
        raise ValueError("eval.nll_method=elbo needs binarized images (pixels 0 or 255); use eval.nll_method=ode for "
                         "8-bit data")
    y = batch.to(torch.float64) / PIXEL_SCALE - 1
    return binary_elbo(denoiser, y, seeds=seeds, sigma_min=sigma_min, sigma_max=sigma_max, num_steps=num_steps,
                       class_labels=labels, sigma_min_low=sigma_min_low)
