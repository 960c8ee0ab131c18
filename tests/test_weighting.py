"""Loss weightings against independent derivations, and Hang et al. (2024)'s importance-sampling equivalence.

- Each "plain MSE on a target" weight is checked by computing that target's error numerically from a denoiser output
  (ε̂ from D, v̂ from the VP process) and comparing with w(σ)·‖D − y‖².
- Min-SNR-γ and soft-min-SNR are checked against their published per-target forms (ε/v space; k-diffusion's weight on
  the EDM-preconditioned output).
- Equivalence: for a fixed imperfect denoiser on Gaussian data, the Monte Carlo estimate of ½·E[(w/p)·‖ε̂ − ε‖²]
  drawing λ ~ p equals the one drawing λ ~ q with w/q (and both equal the quadrature value), within standard errors.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from scipy import integrate, stats

from diffusion.schedules import build_schedule
from diffusion.weighting import WEIGHTINGS, ImportanceWeighting, build_weighting
from training.denoiser import build_uncertainty

ROOT = Path(__file__).resolve().parents[1]
F64 = torch.float64
SIGMAS = torch.tensor([0.002, 0.01, 0.1, 0.5, 1.0, 3.0, 20.0, 80.0], dtype=F64)


def _errors(seed: int = 0, dims: int = 16):
    """Clean data y, noise n and an arbitrary (wrong) denoiser output D at each σ in SIGMAS."""
    gen = torch.Generator().manual_seed(seed)
    shape = (len(SIGMAS), dims)
    y = 0.5 * torch.randn(shape, generator=gen, dtype=F64)
    n = torch.randn(shape, generator=gen, dtype=F64)
    d = y + 0.3 * torch.randn(shape, generator=gen, dtype=F64)
    s = SIGMAS[:, None]
    return y, n, d, s, y + s * n


def _sq(t: torch.Tensor) -> torch.Tensor:
    return t.square().sum(dim=1)


def test_plain_target_mse_weights_match_the_targets():
    y, n, d, s, x = _errors()
    x0_err = _sq(d - y)
    # ε: ε̂ = (x − D)/σ.
    eps_err = _sq((x - d) / s - n)
    torch.testing.assert_close(build_weighting({"name": "eps_mse"})(SIGMAS) * x0_err, eps_err, rtol=1e-10, atol=0)
    # v (Salimans & Ho 2022) on the VP process x_vp = α·y + s·n, α = 1/√(1+σ²), s = σ/√(1+σ²):
    alpha, sv = 1 / (1 + s**2).sqrt(), s / (1 + s**2).sqrt()
    x_vp = alpha * x
    eps_hat = (x_vp - alpha * d) / sv
    v_err = _sq((alpha * eps_hat - sv * d) - (alpha * n - sv * y))
    torch.testing.assert_close(build_weighting({"name": "v_mse"})(SIGMAS) * x0_err, v_err, rtol=1e-10, atol=0)
    torch.testing.assert_close(build_weighting({"name": "x0_mse"})(SIGMAS) * x0_err, x0_err, rtol=0, atol=0)
    # In ε units (VP identities): x₀-MSE = e^{−λ}·ε-MSE, v-MSE = (1 + e^{−λ})·ε-MSE, λ = −2 ln σ.
    e_minus_lam = SIGMAS**2
    torch.testing.assert_close(x0_err, e_minus_lam * eps_err, rtol=1e-10, atol=0)
    torch.testing.assert_close(v_err, (1 + e_minus_lam) * eps_err, rtol=1e-10, atol=0)
    # SNR weighting = SNR = 1/σ².
    torch.testing.assert_close(build_weighting({"name": "snr"})(SIGMAS), SIGMAS.pow(-2), rtol=1e-15, atol=0)


@pytest.mark.parametrize("gamma", [5.0, 1.0])
def test_min_snr_matches_its_per_target_forms(gamma):
    """Hang et al. 2023: ε-loss weight min(SNR, γ)/SNR, v-loss weight min(SNR, γ)/(SNR + 1)."""
    y, n, d, s, x = _errors(1)
    snr = SIGMAS.pow(-2)
    eps_err = _sq((x - d) / s - n)
    alpha, sv = 1 / (1 + s**2).sqrt(), s / (1 + s**2).sqrt()
    v_err = _sq(alpha * (alpha * x - alpha * d) / sv - sv * d - (alpha * n - sv * y))
    ours = build_weighting({"name": "min_snr", "gamma": gamma})(SIGMAS) * _sq(d - y)
    torch.testing.assert_close(ours, torch.clamp(snr, max=gamma) / snr * eps_err, rtol=1e-10, atol=0)
    torch.testing.assert_close(ours, torch.clamp(snr, max=gamma) / (snr + 1) * v_err, rtol=1e-10, atol=0)
    assert build_weighting({"name": "min_snr"}).gamma == 5.0


@pytest.mark.parametrize("sigma_data", [0.5, 1.0])
def test_soft_min_snr_is_k_diffusion_weight_on_the_edm_output(sigma_data):
    """k-diffusion's soft-min-snr c_weight = (σσ_d)²/(σ² + σ_d²)² multiplies ‖F − F*‖² = ‖D − y‖²/c_out²."""
    y, _, d, _, _ = _errors(2)
    c_out = SIGMAS * sigma_data / (SIGMAS**2 + sigma_data**2).sqrt()
    c_weight = (SIGMAS * sigma_data) ** 2 / (SIGMAS**2 + sigma_data**2) ** 2
    expected = c_weight * _sq(d - y) / c_out**2
    ours = build_weighting({"name": "soft_min_snr", "gamma": None, "sigma_data": sigma_data})(SIGMAS) * _sq(d - y)
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=0)
    # With an explicit γ it is the harmonic soft minimum of SNR and γ: → SNR at high noise, → γ at low noise.
    w = build_weighting({"name": "soft_min_snr", "gamma": 5.0})
    torch.testing.assert_close(w(SIGMAS), 1 / (1 / SIGMAS.pow(-2) + 1 / 5.0), rtol=1e-12, atol=0)
    assert float(w(torch.tensor(1e-4, dtype=F64))) == pytest.approx(5.0, rel=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# Hang et al.'s equivalence: only w/p matters.

SIGMA_D, S0, DIMS = 0.5, 0.7, 8


def _denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """An imperfect linear denoiser: the Wiener filter for data std S0 = 0.7, applied to data of std 0.5."""
    return S0**2 / (sigma**2 + S0**2) * x


def _eps_loss_per_sample(sigma: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    s = sigma.reshape(-1, 1).to(F64)
    y = SIGMA_D * torch.randn(len(s), DIMS, generator=gen, dtype=F64)
    n = torch.randn(len(s), DIMS, generator=gen, dtype=F64)
    x = y + s * n
    eps_hat = (x - _denoise(x, s)) / s
    return _sq(eps_hat - n)


def _expected_eps_loss(sigma: float) -> float:
    a = S0**2 / (sigma**2 + S0**2)
    return DIMS * ((1 - a) ** 2 * SIGMA_D**2 / sigma**2 + a**2)


def _w_lambda(lam):
    """A loss weight over λ (a Gaussian bump, so both estimators have finite variance)."""
    return stats.norm(0.5, 1.0).pdf(lam)


def _mc_half_weighted_eps_loss(schedule, n: int, seed: int) -> tuple[float, float]:
    """½·E_{λ~p}[(w/p)·‖ε̂ − ε‖²] with p the schedule's density per unit λ; returns (mean, standard error)."""
    gen = torch.Generator().manual_seed(seed)
    sigma = schedule.sample(n, generator=gen).to(F64)
    lam = -2.0 * sigma.log()
    p_lam = 0.5 * schedule.density(sigma.log())
    vals = 0.5 * torch.as_tensor(_w_lambda(lam.numpy())) / p_lam * _eps_loss_per_sample(sigma, gen)
    return float(vals.mean()), float(vals.std() / math.sqrt(n))


def test_hang_equivalence_density_versus_weight():
    truth = 0.5 * integrate.quad(lambda lam: _w_lambda(lam) * _expected_eps_loss(math.exp(-lam / 2)), -40, 40,
                                 limit=200, points=[0.5])[0]
    p = build_schedule({"name": "laplace", "mu": 0.0, "b": 0.5})
    q = build_schedule({"name": "cosine"})
    est_p, se_p = _mc_half_weighted_eps_loss(p, 200_000, seed=11)
    est_q, se_q = _mc_half_weighted_eps_loss(q, 200_000, seed=12)
    assert abs(est_p - truth) < 4 * se_p
    assert abs(est_q - truth) < 4 * se_q
    assert abs(est_p - est_q) < 4 * math.hypot(se_p, se_q)
    assert se_p < 0.01 * truth and se_q < 0.01 * truth  # the test has the power to see a 5% discrepancy
    # Without the 1/p factor the two schedules give clearly different objectives, so the check above is not vacuous.
    gen = torch.Generator().manual_seed(13)
    raw_p = float(_eps_loss_per_sample(p.sample(50_000, generator=gen), gen).mean())
    raw_q = float(_eps_loss_per_sample(q.sample(50_000, generator=gen), gen).mean())
    assert abs(raw_p - raw_q) > 0.05 * raw_q


def test_importance_weighting_moves_density_into_the_weight():
    """σ ~ cosine with weighting=importance(target=edm, reference=laplace)  ≡  σ ~ laplace with weighting=edm."""
    target = {"name": "edm", "sigma_data": SIGMA_D}
    reference = {"name": "laplace", "mu": 0.0, "b": 0.5}
    weighting = build_weighting({"name": "importance", "target": target, "reference": reference})
    sampling = build_schedule({"name": "cosine"})
    weighting.attach_schedule(sampling)
    edm = build_weighting(target)
    q = build_schedule(reference)

    def x0_loss(sigma, gen):
        s = sigma.reshape(-1, 1).to(F64)
        y = SIGMA_D * torch.randn(len(s), DIMS, generator=gen, dtype=F64)
        x = y + s * torch.randn(len(s), DIMS, generator=gen, dtype=F64)
        return _sq(_denoise(x, s) - y)

    def estimate(schedule, weight, seed, n=200_000):
        gen = torch.Generator().manual_seed(seed)
        sigma = schedule.sample(n, generator=gen).to(F64)
        vals = weight(sigma) * x0_loss(sigma, gen)
        return float(vals.mean()), float(vals.std() / math.sqrt(n))

    def expected(u):
        sigma = math.exp(u)
        a = S0**2 / (sigma**2 + S0**2)
        w = (sigma**2 + SIGMA_D**2) / (sigma * SIGMA_D) ** 2
        density = stats.laplace(0.0, 0.25).pdf(u)  # λ ~ Laplace(0, 0.5) ⇔ ln σ ~ Laplace(0, 0.25)
        return density * w * DIMS * ((1 - a) ** 2 * SIGMA_D**2 + a**2 * sigma**2)

    truth = integrate.quad(expected, -30, 0, limit=200)[0] + integrate.quad(expected, 0, 30, limit=200)[0]
    est_imp, se_imp = estimate(sampling, weighting, seed=21)
    est_dir, se_dir = estimate(q, edm, seed=22)
    assert abs(est_imp - truth) < 4 * se_imp
    assert abs(est_dir - truth) < 4 * se_dir
    assert abs(est_imp - est_dir) < 4 * math.hypot(se_imp, se_dir)
    assert se_imp < 0.01 * truth
    # The weight itself: w_edm·q/p with the densities written independently.
    u = SIGMAS.log().numpy()
    ratio = stats.laplace(0.0, 0.25).pdf(u) / (1 / (math.pi * np.cosh(u)))
    torch.testing.assert_close(weighting(SIGMAS), edm(SIGMAS) * torch.as_tensor(ratio), rtol=1e-10, atol=0)
    assert weighting(SIGMAS.float()).dtype == torch.float32


def test_importance_weighting_errors_and_context():
    cfg = {"name": "importance", "target": {"name": "x0_mse"}, "reference": {"name": "cosine_shifted"}}
    with pytest.raises(ValueError, match="img_resolution"):
        build_weighting(cfg)
    w = build_weighting(cfg, img_resolution=256)  # context reaches the reference schedule
    assert w.reference.shift == pytest.approx(2 * math.log(64 / 256))
    with pytest.raises(RuntimeError, match="attach_schedule"):
        w(SIGMAS)
    with pytest.raises(ValueError, match="cannot itself be 'importance'"):
        build_weighting({"name": "importance", "target": cfg, "reference": {"name": "cosine"}}, img_resolution=64)
    with pytest.raises(ValueError, match="needs weighting.target"):
        build_weighting({"name": "importance", "target": None, "reference": {"name": "cosine"}})
    with pytest.raises(ValueError, match="valid choices: .*min_snr"):
        build_weighting({"name": "min-snr"})
    with pytest.raises(ValueError, match="gamma must be"):
        build_weighting({"name": "min_snr", "gamma": 0.0})
    # The other weightings ignore attach_schedule.
    plain = build_weighting({"name": "v_mse"})
    plain.attach_schedule(build_schedule({"name": "cosine"}))
    torch.testing.assert_close(plain(SIGMAS), 1 + SIGMAS.pow(-2))


WEIGHTING_FILES = sorted((ROOT / "configs/weighting").glob("*.yaml"))


@pytest.mark.parametrize("path", WEIGHTING_FILES, ids=lambda p: p.stem)
def test_weighting_configs_build(path):
    # The configs interpolate ${precond.sigma_data}; resolve them inside a minimal run config.
    run = OmegaConf.create({"precond": {"name": "edm", "sigma_data": 0.5}, "weighting": OmegaConf.load(path)})
    assert run.weighting.name == path.stem and run.weighting.name in WEIGHTINGS
    # A learned weighting (edm2_uncertainty) takes its u(σ) network from the trainer's builder; the others none.
    w = build_weighting(run.weighting, img_resolution=32, uncertainty=build_uncertainty(run))
    w.attach_schedule(build_schedule({"name": "lognormal"}))
    values = w(SIGMAS)
    assert torch.isfinite(values).all() and bool((values > 0).all())
    if isinstance(w, ImportanceWeighting):  # default: EDM's objective under any schedule → ratio 1 under lognormal
        torch.testing.assert_close(values, build_weighting({"name": "edm", "sigma_data": 0.5})(SIGMAS))
