"""Samplers, σ grids, guidance and NFE accounting, checked against closed forms.

Reference problem: Gaussian data y ~ N(0, s²I). Its ideal denoiser is D(x; σ) = s²/(s² + σ²)·x, the probability-flow
ODE dx/dσ = (x − D)/σ = σx/(s² + σ²) has the exact solution x(σ) = x(σ_max)·√((s² + σ²)/(s² + σ_max²)), so
x(0) = x(σ_max)·s/√(s² + σ_max²). Every sampler ends with the step σ_min → 0, x = D(x; σ_min), whose own error is a
fixed relative σ_min²/(2s²) = 8e-6 (σ_min = 0.002, s = 0.5): below 1% of every error measured in the order tests.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from scipy.stats import norm

from diffusion.guidance import GuidedDenoiser, apply_guidance
from diffusion.per_image_noise import PerImageNoise
from diffusion.samplers import SAMPLERS, NFECounter, ddim, dpmpp_2m, euler, euler_ancestral, heun, sampler_options
from diffusion.schedules import LogNormal
from diffusion.sigma_grids import SCHEDULE_CONFIG_DIR, build_sigma_grid, edm_rho_grid, loglinear_grid, quantile_grid
from training.generate import generate_images, write_samples

S = 0.5
SIGMA_MAX = 80.0
SAMPLER_DIR = Path(__file__).resolve().parents[1] / "configs" / "sampler"


def gaussian_denoiser(x, sigma, class_labels=None):
    return S**2 / (S**2 + sigma**2) * x


def exact_solution(noise, sigma_max=SIGMA_MAX):
    return noise * sigma_max * S / math.sqrt(S**2 + sigma_max**2)


def fixed_noise(n=256):
    return torch.randn(n, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def relative_error(sampler, sigmas, **options):
    noise = fixed_noise()
    x = sampler(gaussian_denoiser, noise, sigmas, **options)
    exact = exact_solution(noise, float(sigmas[0]))
    return float((x - exact).norm() / exact.norm())


def fast_randn_like(seed):
    """One generator for the whole batch: much faster than per-image streams for 10k-sample statistics."""
    gen = torch.Generator().manual_seed(seed)
    return lambda x: torch.randn(x.shape, generator=gen, dtype=x.dtype)


def sampler_cfg(name, **overrides):
    cfg = OmegaConf.load(SAMPLER_DIR / f"{name}.yaml")
    return OmegaConf.merge(cfg, overrides)


# ---------------------------------------------------------------------------------------------------------------------
# Convergence order on the exact ODE solution


GRIDS = {"rho": lambda n: edm_rho_grid(n), "loglinear": lambda n: loglinear_grid(n)}


@pytest.mark.parametrize("grid", sorted(GRIDS))
@pytest.mark.parametrize("name, order, steps", [
    # Step counts in the asymptotic regime (measured slopes 0.99-1.00 for 1st order, 2.00-2.16 for 2nd order); below
    # ~16 steps DPM-Solver++(2M) is still pre-asymptotic (its first step is 1st order and dominates).
    ("euler", 1, (64, 128, 256)),
    ("ddim", 1, (64, 128, 256)),
    ("heun", 2, (32, 64, 128)),
    ("dpmpp_2m", 2, (32, 64, 128)),
])
def test_deterministic_samplers_converge_with_their_order(name, order, steps, grid):
    errs = [relative_error(SAMPLERS[name], GRIDS[grid](n)) for n in steps]
    slopes = [math.log(errs[i] / errs[i + 1]) / math.log(steps[i + 1] / steps[i]) for i in range(len(steps) - 1)]
    # Slope tolerance ±0.05 around 1 for first order; [1.9, 2.25] for second order (pre-asymptotic terms of the
    # non-uniform grids push the 32→64 slope slightly above 2).
    lo, hi = (0.95, 1.05) if order == 1 else (1.9, 2.25)
    assert all(lo < s < hi for s in slopes), (errs, slopes)
    assert errs[-1] < (0.025 if order == 1 else 1e-3), errs


def test_heun_18_steps_matches_exact_ode_solution():
    """At EDM's 18 steps the result equals the exact solution up to Heun's own discretisation error.

    That error is not small here (~5.5%: EDM's ρ = 7 grid takes steps of ratio ~1.8 around σ ≈ s, where this ODE
    bends), so the test checks it *is* the discretisation error of a 2nd-order method: Richardson's estimate
    (x_N − x_2N)·4/3 predicts it within 25%, and it is below 6%."""
    noise = fixed_noise()
    exact = exact_solution(noise)
    x18 = heun(gaussian_denoiser, noise, edm_rho_grid(18))
    x36 = heun(gaussian_denoiser, noise, edm_rho_grid(36))
    err = float((x18 - exact).norm() / exact.norm())
    richardson = float((x18 - x36).norm() / exact.norm()) * 4 / 3
    assert err < 0.06, err
    assert abs(err / richardson - 1) < 0.25, (err, richardson)


# ---------------------------------------------------------------------------------------------------------------------
# DDIM and Euler, ancestral and DDIM(η)


@pytest.mark.parametrize("grid", sorted(GRIDS))
def test_ddim_eta0_equals_euler(grid):
    """DDIM (written with VP α, s) and Euler (EDM's ODE) are the same map for η = 0, up to float64 rounding."""
    sigmas = GRIDS[grid](18)
    noise = fixed_noise()
    a = euler(gaussian_denoiser, noise, sigmas)
    b = ddim(gaussian_denoiser, noise, sigmas, eta=0.0)
    assert float((a - b).abs().max() / a.abs().max()) < 1e-13
    # ... and the comparison can fail: moving the inner levels by up to 1% changes the result by ~1e-5, eight orders
    # of magnitude above the tolerance.
    c = ddim(gaussian_denoiser, noise, sigmas * torch.linspace(1, 1.01, len(sigmas), dtype=sigmas.dtype), eta=0.0)
    assert float((a - c).abs().max() / a.abs().max()) > 1e-7


@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_ddim_eta_equals_euler_ancestral_on_same_noise(eta):
    """DDIM's stochastic step (VP form) and the ancestral step (EDM variables) add the same noise std σ_up."""
    sigmas = edm_rho_grid(24)
    noise = fixed_noise(64)
    a = ddim(gaussian_denoiser, noise, sigmas, eta=eta, randn_like=fast_randn_like(3))
    b = euler_ancestral(gaussian_denoiser, noise, sigmas, eta=eta, randn_like=fast_randn_like(3))
    assert float((a - b).abs().max()) < 1e-12


def test_euler_ancestral_eta0_is_euler():
    sigmas = edm_rho_grid(18)
    noise = fixed_noise()
    torch.testing.assert_close(euler_ancestral(gaussian_denoiser, noise, sigmas, eta=0.0),
                               euler(gaussian_denoiser, noise, sigmas), rtol=1e-13, atol=1e-13)


# ---------------------------------------------------------------------------------------------------------------------
# Stochastic samplers keep the data variance


def scheme_variance_heun(sigmas, s_churn, s_min, s_max):
    """Exact variance of the stochastic Heun output for N(0, s²) data, propagated through the linear scheme."""
    sig = sigmas.tolist()
    n = len(sig) - 1
    var = sig[0] ** 2
    for i in range(n):
        t, t_next = sig[i], sig[i + 1]
        gamma = min(s_churn / n, math.sqrt(2) - 1) if s_min <= t <= s_max else 0.0
        t_hat = t * (1 + gamma)
        var += t_hat**2 - t**2
        c1 = (1 - S**2 / (S**2 + t_hat**2)) / t_hat
        factor = 1 + (t_next - t_hat) * c1
        if i < n - 1:
            c2 = (1 - S**2 / (S**2 + t_next**2)) / t_next
            factor = 1 + (t_next - t_hat) * (c1 + c2 * factor) / 2
        var *= factor**2
    return var


def scheme_variance_ancestral(sigmas, eta):
    """Exact variance of the euler_ancestral output for N(0, s²) data: x' = A·x + σ_up·z per step."""
    sig = sigmas.tolist()
    var = sig[0] ** 2
    for t, t_next in zip(sig[:-1], sig[1:], strict=True):
        up = min(t_next, eta * t_next * math.sqrt(t**2 - t_next**2) / t)
        down = math.sqrt(t_next**2 - up**2)
        a = S**2 / (S**2 + t**2)
        var = (a + down / t * (1 - a)) ** 2 * var + up**2
    return var


N_VAR = 10_000
# The sample variance of n Gaussian draws has relative standard error √(2/n) ≈ 1.41% (n = 10k): allow 3 of them.
VAR_TOL = 3 * math.sqrt(2 / N_VAR)


def test_stochastic_heun_keeps_data_variance():
    """EDM's ImageNet-64 stochastic settings (256 steps, S_churn 40, S_min 0.05, S_max 50).

    The scheme's own variance bias at 256 steps, propagated exactly, is below a fifth of the tolerance, so the
    sample variance must equal s² within sampling error."""
    sigmas = edm_rho_grid(256)
    bias = scheme_variance_heun(sigmas, 40, 0.05, 50) / S**2 - 1
    assert abs(bias) < VAR_TOL / 5, bias
    noise = torch.randn(N_VAR, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x = heun(gaussian_denoiser, noise, sigmas, randn_like=fast_randn_like(2), S_churn=40, S_min=0.05, S_max=50)
    assert abs(float(x.var()) / S**2 - 1) < VAR_TOL, float(x.var())


def test_euler_ancestral_keeps_data_variance():
    """Ancestral sampling's variance bias is first order in the step (−4.6% at 256 steps, −0.29% at 4096); at 4096
    steps it is a fifth of a standard error, so the sample variance must equal s² within sampling error. At 64 steps
    the bias (−16.9%, 12 standard errors) must show up exactly as the propagated scheme variance predicts."""
    sigmas = edm_rho_grid(4096)
    bias = scheme_variance_ancestral(sigmas, 1.0) / S**2 - 1
    assert abs(bias) < VAR_TOL / 10, bias
    noise = torch.randn(N_VAR, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x = euler_ancestral(gaussian_denoiser, noise, sigmas, randn_like=fast_randn_like(2), eta=1.0)
    assert abs(float(x.var()) / S**2 - 1) < VAR_TOL, float(x.var())

    coarse = edm_rho_grid(64)
    predicted = scheme_variance_ancestral(coarse, 1.0)
    assert predicted / S**2 - 1 < -3 * VAR_TOL  # the coarse scheme is visibly biased ...
    y = euler_ancestral(gaussian_denoiser, noise, coarse, randn_like=fast_randn_like(4), eta=1.0)
    assert abs(float(y.var()) / predicted - 1) < VAR_TOL, (float(y.var()), predicted)  # ... by exactly this much


# ---------------------------------------------------------------------------------------------------------------------
# NFE


@pytest.mark.parametrize("name, nfe", [("heun", lambda n: 2 * n - 1), ("euler", lambda n: n), ("ddim", lambda n: n),
                                       ("dpmpp_2m", lambda n: n), ("euler_ancestral", lambda n: n)])
def test_nfe_per_sampler(name, nfe):
    counter = NFECounter(gaussian_denoiser)
    SAMPLERS[name](counter, torch.randn(3, 1, 2, 2, dtype=torch.float64), edm_rho_grid(18))
    assert counter.calls == nfe(18) and counter.nfe(3) == nfe(18)


class AnalyticModel:
    """An analytic conditional denoiser with the geometry attributes sample.py needs.

    Class k has mean μ_k = (k − 1)·0.4 in every pixel (a Gaussian mixture with std s per pixel); the all-zero label is
    the unconditional (mixture) denoiser, so classifier-free guidance has something to guide."""

    def __init__(self, label_dim=3, s=0.3, img_resolution=4, img_channels=1):
        self.label_dim, self.s = label_dim, s
        self.img_resolution, self.img_channels = img_resolution, img_channels
        self.means = (torch.arange(label_dim, dtype=torch.float64) - 1) * 0.4 if label_dim else torch.zeros(1)

    def log_likelihoods(self, x, sigma):
        """log p_σ(x | k) for each k: [N, K]."""
        var = self.s**2 + torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1))) ** 2
        diffs = x.unsqueeze(1) - self.means.to(x.dtype).reshape(1, -1, *([1] * (x.ndim - 1)))
        return (-0.5 * diffs**2 / var.unsqueeze(1) - 0.5 * torch.log(2 * math.pi * var.unsqueeze(1))).flatten(2).sum(2)

    def __call__(self, x, sigma, class_labels=None):
        sigma_b = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        shrink = self.s**2 / (self.s**2 + sigma_b**2)
        per_class = self.means.to(x.dtype).reshape(1, -1, *([1] * (x.ndim - 1))) + shrink.unsqueeze(1) * (
            x.unsqueeze(1) - self.means.to(x.dtype).reshape(1, -1, *([1] * (x.ndim - 1))))
        if class_labels is None or not self.label_dim:
            weights = torch.full((x.shape[0], len(self.means)), 1.0 / len(self.means), dtype=x.dtype)
        else:
            weights = class_labels.to(x.dtype)
        null = weights.sum(1) == 0
        if bool(null.any()):  # all-zero label: posterior class weights (uniform prior)
            posterior = torch.softmax(self.log_likelihoods(x, sigma), dim=1)
            weights = torch.where(null[:, None], posterior, weights)
        return (weights.reshape(*weights.shape, *([1] * (x.ndim - 1))) * per_class).sum(1)


def test_generate_images_reports_nfe_with_and_without_guidance():
    model = AnalyticModel()
    seeds = list(range(5))
    info = {}
    generate_images(model, seeds, sampler_cfg=sampler_cfg("heun", num_steps=7), batch_size=2, device="cpu", info=info)
    assert (info["nfe"], info["nfe_main"], info["nfe_guide"], info["num_steps"]) == (13, 13, 0, 7)
    # CFG doubles every network evaluation.
    generate_images(model, seeds, sampler_cfg=sampler_cfg("heun", num_steps=7, guidance=2.0), batch_size=2,
                    device="cpu", info=info)
    assert info["nfe"] == 26
    # With a guidance interval only evaluations at σ inside it are doubled: Heun evaluates at σ_0..σ_6 (Euler) and
    # σ_1..σ_6 (correction).
    lo, hi = 0.1, 5.0
    sigmas = edm_rho_grid(7).tolist()
    evaluated = sigmas[:7] + sigmas[1:7]
    inside = sum(lo <= s <= hi for s in evaluated)
    assert 0 < inside < len(evaluated)
    generate_images(model, seeds, sampler_cfg=sampler_cfg("heun", num_steps=7, guidance=2.0,
                                                           guidance_interval=[lo, hi]),
                    batch_size=2, device="cpu", info=info)
    assert info["nfe"] == 13 + inside
    # Autoguidance: the guide's evaluations are counted too.
    generate_images(model, seeds, sampler_cfg=sampler_cfg("dpmpp_2m", num_steps=6, guidance=1.5), batch_size=5,
                    device="cpu", guide=AnalyticModel(s=0.4), info=info)
    assert (info["nfe"], info["nfe_main"], info["nfe_guide"]) == (12, 6, 6)


def test_write_samples_stores_nfe_and_config(tmp_path):
    images = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    meta = {"nfe": 35, "sampler": {"name": "heun", "S_max": math.inf}}
    npz = write_samples(images, [0, 1, 2, 3], None, tmp_path, write_pngs=False, metadata=meta)
    with np.load(npz) as data:
        assert float(data["nfe"]) == 35
        np.testing.assert_array_equal(data["samples"], images.permute(0, 2, 3, 1).numpy())
    stored = json.loads((tmp_path / "samples.json").read_text())
    assert stored == {"nfe": 35, "sampler": {"name": "heun", "S_max": "inf"}}


# ---------------------------------------------------------------------------------------------------------------------
# Per-image seeds


@pytest.mark.parametrize("name, extra", [("euler_ancestral", {}), ("heun", {"S_churn": 10.0}),
                                         ("ddim", {"eta": 0.5})])
def test_same_seed_same_image_at_any_batch_size(name, extra):
    model = AnalyticModel()
    seeds = list(range(100, 116))
    cfg = sampler_cfg(name, num_steps=8, **extra)
    batched = generate_images(model, seeds, sampler_cfg=cfg, batch_size=16, device="cpu")
    singles = torch.cat([generate_images(model, [seed], sampler_cfg=cfg, batch_size=1, device="cpu")
                         for seed in seeds])
    assert torch.equal(batched, singles)
    odd = generate_images(model, seeds[::-1], sampler_cfg=cfg, batch_size=5, device="cpu")
    assert torch.equal(odd, batched.flip(0))
    assert len({img.numpy().tobytes() for img in batched}) == len(seeds)  # different seeds, different images


def test_per_image_noise_independent_of_batch():
    a = PerImageNoise([3, 4, 5]).randn((2, 2))
    b = PerImageNoise([5]).randn((2, 2))
    torch.testing.assert_close(a[2], b[0])
    assert not torch.equal(a[0], a[1])


# ---------------------------------------------------------------------------------------------------------------------
# σ grids


def test_rho_grid_is_eq5():
    n, lo, hi, rho = 18, 0.002, 80.0, 7.0
    expected = [(hi ** (1 / rho) + i / (n - 1) * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho for i in range(n)]
    sigmas = edm_rho_grid(n, lo, hi, rho)
    assert len(sigmas) == n + 1 and float(sigmas[-1]) == 0.0
    np.testing.assert_allclose(sigmas[:-1].numpy(), expected, rtol=1e-13)
    assert float(sigmas[0]) == hi and float(sigmas[n - 1]) == lo


def test_loglinear_grid():
    sigmas = loglinear_grid(10, 0.01, 10.0)
    assert float(sigmas[0]) == 10.0 and float(sigmas[9]) == 0.01 and float(sigmas[10]) == 0.0
    np.testing.assert_allclose(np.diff(np.log(sigmas[:-1].numpy())), np.log(1e-3) / 9, rtol=1e-12)


@pytest.mark.parametrize("p_mean, p_std, lo, hi", [(-1.2, 1.2, 0.002, 80.0), (0.5, 0.8, 0.05, 5.0)])
def test_quantile_grid_of_lognormal_is_normal_ppf_placement(p_mean, p_std, lo, hi):
    n = 12
    schedule = LogNormal(p_mean, p_std)
    sigmas = quantile_grid(schedule, n, lo, hi)
    f_lo, f_hi = norm.cdf((math.log(lo) - p_mean) / p_std), norm.cdf((math.log(hi) - p_mean) / p_std)
    q = f_hi + np.arange(n) / (n - 1) * (f_lo - f_hi)
    expected = np.exp(p_mean + p_std * norm.ppf(q))
    np.testing.assert_allclose(sigmas[:-1].numpy(), expected, rtol=1e-9)
    assert float(sigmas[0]) == hi and float(sigmas[n - 1]) == lo and float(sigmas[n]) == 0.0


def test_schedule_time_t_max():
    """Starting at schedule time t_max = 0.9 of lognormal: σ_top = exp(μ + s·Φ⁻¹(0.9)), then equal mass below."""
    cfg = {"name": "ddim", "num_steps": 6, "sigma_min": 0.002, "sigma_max": 80.0, "steps_from": "lognormal",
           "t_max": 0.9}
    sigmas = build_sigma_grid(cfg)
    top = math.exp(-1.2 + 1.2 * norm.ppf(0.9))
    assert math.isclose(float(sigmas[0]), top, rel_tol=1e-12)
    f_lo = norm.cdf((math.log(0.002) + 1.2) / 1.2)
    q = 0.9 + np.arange(6) / 5 * (f_lo - 0.9)
    np.testing.assert_allclose(sigmas[:-1].numpy(), np.exp(-1.2 + 1.2 * norm.ppf(q)), rtol=1e-9)


def test_cosine_aligned_grid_of_hang_et_al():
    """sampler=ddim_cosine sampler.t_max=0.99: steps uniform in cosine time t = (2/π)·arctan σ (σ = tan(πt/2)),
    from t = 0.99 (σ = tan(0.495π) ≈ 63.66) down to t(σ_min)."""
    cfg = sampler_cfg("ddim_cosine", t_max=0.99)
    sigmas = build_sigma_grid(cfg)
    t = 0.99 + np.arange(50) / 49 * (2 / math.pi * math.atan(0.002) - 0.99)
    np.testing.assert_allclose(sigmas[:-1].numpy(), np.tan(math.pi * t / 2), rtol=1e-10)
    assert math.isclose(float(sigmas[0]), math.tan(0.495 * math.pi), rel_tol=1e-12)


def test_build_sigma_grid_config_plumbing():
    base = {"name": "heun", "num_steps": 9, "sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0}
    torch.testing.assert_close(build_sigma_grid(base), edm_rho_grid(9))
    torch.testing.assert_close(build_sigma_grid({**base, "steps_from": "loglinear"}), loglinear_grid(9))
    by_quantile = quantile_grid(LogNormal(-1.2, 1.2), 9, 0.002, 80.0)
    for spec in ("lognormal", "quantile:lognormal", "time_uniform:lognormal",
                 {"name": "lognormal", "p_mean": -1.2, "p_std": 1.2}):
        torch.testing.assert_close(build_sigma_grid({**base, "steps_from": spec}), by_quantile)
    # InfoGrid: the run's profile schedule is handed in.
    profile = LogNormal(0.0, 0.7)
    torch.testing.assert_close(build_sigma_grid({**base, "steps_from": "infonoise"}, profile_schedule=profile),
                               quantile_grid(profile, 9, 0.002, 80.0))
    with pytest.raises(ValueError, match="infonoise needs the profile"):
        build_sigma_grid({**base, "steps_from": "infonoise"})
    with pytest.raises(ValueError, match="unknown sampler.steps_from 'nope'; valid: .*lognormal.*rho"):
        build_sigma_grid({**base, "steps_from": "nope"})
    with pytest.raises(ValueError, match="t_max"):
        build_sigma_grid({**base, "t_max": 0.99})
    with pytest.raises(ValueError, match="sigma_min < sampler.sigma_max"):
        build_sigma_grid({**base, "sigma_min": 100.0})
    with pytest.raises(ValueError, match="num_steps"):
        build_sigma_grid({**base, "num_steps": 0})


def test_quantile_grid_of_tabulated_profile():
    """A piecewise-constant density in ln σ (InfoNoise's table): quantiles by inverting its piecewise-linear CDF."""
    from diffusion.schedules.tabulated import TabulatedLogSigma

    edges = np.log([0.002, 0.05, 0.5, 2.0, 80.0])
    masses = np.array([0.1, 0.4, 0.3, 0.2])
    profile = TabulatedLogSigma(torch.tensor(edges), masses=torch.tensor(masses))
    n = 9
    sigmas = quantile_grid(profile, n, 0.002, 80.0)
    cum = np.concatenate([[0.0], np.cumsum(masses)])
    q = 1.0 - np.arange(n) / (n - 1)
    expected = np.exp(np.interp(q, cum, edges))  # the CDF is linear in ln σ inside each bin
    np.testing.assert_allclose(sigmas[:-1].numpy(), expected, rtol=1e-12)
    # A narrower sampling range: the profile truncated to [0.01, 10].
    sigmas = quantile_grid(profile, n, 0.01, 10.0)
    f = np.interp(np.log([0.01, 10.0]), edges, cum)
    expected = np.exp(np.interp(f[1] + np.arange(n) / (n - 1) * (f[0] - f[1]), cum, edges))
    np.testing.assert_allclose(sigmas[:-1].numpy(), expected, rtol=1e-12)


def test_infogrid_from_an_infonoise_checkpoint(tmp_path):
    """steps_from=infonoise[:variant]: sample.py rebuilds the run's InfoNoise and uses its step density."""
    from diffusion.schedules.infonoise import InfoNoise
    from diffusion.weighting import build_weighting
    from training.checkpoint import save_checkpoint
    from training.generate import load_profile_schedule

    run_cfg = {"schedule": {"name": "infonoise", "warmup_steps": 0, "refresh_every": 1, "min_count": 1},
               "weighting": {"name": "edm", "sigma_data": 0.5}, "precond": {"name": "edm", "sigma_data": 0.5},
               "train": {"total_kimg": 1, "batch": 64}}
    schedule = InfoNoise(warmup_steps=0, refresh_every=1, min_count=1, sigma_data=0.5,
                         weighting=build_weighting(run_cfg["weighting"]))
    sigma = torch.exp(torch.linspace(math.log(0.002), math.log(80.0), 4096, dtype=torch.float64))
    schedule.update(sigma, 16 * S**2 * sigma**2 / (S**2 + sigma**2))  # the exact mmse of 16-dim N(0, s²) data
    schedule.on_step(1)
    state = {"config": run_cfg, "geometry": {"img_resolution": 4, "img_channels": 1, "label_dim": 0},
             "schedule": [schedule.state_dict()]}
    ckpt = save_checkpoint(tmp_path / "checkpoint-0000000064.pt", state)
    cfg = {"name": "heun", "num_steps": 12, "sigma_min": 0.002, "sigma_max": 80.0}
    for steps_from, variant, kwargs in [("infonoise", "profile", {}), ("infonoise:rate", "rate", {}),
                                        ("infonoise:mix:0.25", "mix", {"edm_weight": 0.25})]:
        profile = load_profile_schedule(ckpt, steps_from)
        grid = build_sigma_grid({**cfg, "steps_from": steps_from}, profile_schedule=profile)
        expected = quantile_grid(schedule.step_density(variant, **kwargs), 12, 0.002, 80.0)
        torch.testing.assert_close(grid, expected, rtol=1e-12, atol=0)
    # For d-dim N(0, s²) data the ungated rate per ln σ is d·s²/(s² + σ²) = −dI/d ln σ with I(σ) = (d/2)·ln(1 + s²/σ²)
    # (I-MMSE, Guo, Shamai & Verdú 2005), so its equal-mass grid is uniform in I: σ_i = s/√(exp(2·I_i/d) − 1).
    # The 64-bin tabulation and the bin smoothing leave ~0.15% (measured); allow 1%.
    rate_grid = build_sigma_grid({**cfg, "steps_from": "infonoise:rate"},
                                 profile_schedule=load_profile_schedule(ckpt, "infonoise:rate"))
    info = 0.5 * np.log1p(S**2 / np.array([80.0, 0.002]) ** 2)  # I/d at σ_max, σ_min
    levels = info[0] + np.arange(12) / 11 * (info[1] - info[0])
    np.testing.assert_allclose(rate_grid[:-1].numpy(), S / np.sqrt(np.expm1(2 * levels)), rtol=0.01)
    with pytest.raises(ValueError, match="bad sampler.steps_from"):
        build_sigma_grid({**cfg, "steps_from": "infonoise:rate:0.5"}, profile_schedule=profile)


def _discrete_atom(schedule):
    from diffusion.schedules import DiscreteDDPM

    return 1.0 / schedule.num_steps if isinstance(schedule, DiscreteDDPM) else 0.0


@pytest.mark.parametrize("option", sorted(p.stem for p in SCHEDULE_CONFIG_DIR.glob("*.yaml") if p.stem != "infonoise"))
def test_quantile_grid_of_every_schedule_option(option):
    """Whatever schedules exist: exact endpoints, strictly descending, and equal mass between levels (for a discrete
    schedule, up to one atom). The adaptive infonoise option places steps through its trained profile (above)."""
    from diffusion.sigma_grids import load_schedule_option

    schedule = load_schedule_option(option, img_resolution=32, sigma_data=0.5)
    lo, hi = 0.002, 80.0
    sigmas = quantile_grid(schedule, 10, lo, hi)
    assert float(sigmas[0]) == hi and float(sigmas[9]) == lo and float(sigmas[10]) == 0.0
    assert bool((sigmas.diff() < 0).all())
    mass = schedule.cdf(sigmas[:-1].log()).diff().abs()
    np.testing.assert_allclose(mass.numpy(), float(mass.mean()), rtol=1e-6, atol=1e-12 + _discrete_atom(schedule))


# ---------------------------------------------------------------------------------------------------------------------
# Guidance


def tweedie_guided(model, x, sigma, label, w):
    """D_g from the guided score σ²·∇ log(p_σ(x|c)^w·p_σ(x)^(1−w)) + x, by autograd of the analytic log densities."""
    x = x.clone().requires_grad_(True)
    log_lik = model.log_likelihoods(x, sigma)  # [N, K]
    log_cond = log_lik.gather(1, label[:, None]).squeeze(1)
    log_marg = torch.logsumexp(log_lik, dim=1) - math.log(log_lik.shape[1])
    (grad,) = torch.autograd.grad((w * log_cond + (1 - w) * log_marg).sum(), x)
    return (x + sigma**2 * grad).detach()


def mixture_batch(n=32):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(n, 1, 2, 2, generator=gen, dtype=torch.float64)
    labels = torch.randint(3, (n,), generator=gen)
    return x, labels, torch.nn.functional.one_hot(labels, 3).to(torch.float64)


@pytest.mark.parametrize("w", [0.0, 1.0, 2.5])
@pytest.mark.parametrize("sigma", [0.2, 1.5])
def test_cfg_on_gaussian_mixture_matches_guided_score(w, sigma):
    model = AnalyticModel()
    x, labels, onehot = mixture_batch()
    sigma_t = torch.tensor(sigma, dtype=torch.float64)
    guided = GuidedDenoiser(model, w)(x, sigma_t, class_labels=onehot)
    torch.testing.assert_close(guided, tweedie_guided(model, x, sigma, labels, w), rtol=1e-10, atol=1e-10)
    cond, uncond = model(x, sigma_t, onehot), model(x, sigma_t, torch.zeros_like(onehot))
    if w == 1.0:
        assert torch.equal(guided, cond)
    if w == 0.0:
        assert torch.equal(guided, uncond)
    assert float((cond - uncond).abs().max()) > 1e-3  # guidance has an effect to measure


def test_guidance_interval_respected():
    model = AnalyticModel()
    x, _, onehot = mixture_batch(4)
    guided = GuidedDenoiser(model, 3.0, interval=(0.5, 2.0))
    for sigma in (0.3, 0.5, 1.0, 2.0, 4.0):
        s = torch.tensor(sigma, dtype=torch.float64)
        cond, uncond = model(x, s, onehot), model(x, s, torch.zeros_like(onehot))
        expected = uncond + 3.0 * (cond - uncond) if 0.5 <= sigma <= 2.0 else cond
        torch.testing.assert_close(guided(x, s, class_labels=onehot), expected, rtol=1e-12, atol=1e-12)
    # Per-image σ straddling the interval: each image gets its own rule.
    sig = torch.tensor([0.3, 1.0, 3.0, 2.0], dtype=torch.float64)
    out = guided(x, sig, class_labels=onehot)
    for i in range(4):
        torch.testing.assert_close(out[i:i + 1], guided(x[i:i + 1], sig[i], class_labels=onehot[i:i + 1]))


def test_autoguidance_is_lerp_from_guide():
    main, weak = AnalyticModel(s=0.3), AnalyticModel(s=0.45)
    x, labels, onehot = mixture_batch()
    sigma = torch.tensor(0.8, dtype=torch.float64)
    out = GuidedDenoiser(main, 2.0, guide=weak)(x, sigma, class_labels=onehot)
    # Closed form for a class-k Gaussian: D = μ_k + s²/(s² + σ²)(x − μ_k) for each of the two models.
    mu = main.means[labels].reshape(-1, 1, 1, 1)
    d_main = mu + 0.3**2 / (0.3**2 + 0.64) * (x - mu)
    d_weak = mu + 0.45**2 / (0.45**2 + 0.64) * (x - mu)
    torch.testing.assert_close(out, d_weak + 2.0 * (d_main - d_weak), rtol=1e-12, atol=1e-12)
    # An unconditional guide gets no labels: CFG with a separate unconditional network.
    uncond_guide = AnalyticModel(label_dim=0, s=0.3)
    out = GuidedDenoiser(main, 2.0, guide=uncond_guide)(x, sigma, class_labels=onehot)
    d_u = 0.3**2 / (0.3**2 + 0.64) * x
    torch.testing.assert_close(out, d_u + 2.0 * (d_main - d_u), rtol=1e-12, atol=1e-12)


def test_guidance_errors():
    with pytest.raises(ValueError, match="needs a class-conditional model"):
        GuidedDenoiser(AnalyticModel(label_dim=0), 2.0)
    with pytest.raises(ValueError, match="guidance_interval needs 0 <= sigma_lo < sigma_hi"):
        GuidedDenoiser(AnalyticModel(), 2.0, interval=(3.0, 1.0))
    with pytest.raises(ValueError, match="guide_ckpt=.*no guide model"):
        apply_guidance(AnalyticModel(), {"guidance": 2.0, "guide_ckpt": "runs/x"})
    with pytest.raises(ValueError, match="img_resolution"):
        GuidedDenoiser(AnalyticModel(), 2.0, guide=AnalyticModel(img_resolution=8))
    assert apply_guidance(gaussian_denoiser, {"guidance": 1.0}) is gaussian_denoiser


# ---------------------------------------------------------------------------------------------------------------------
# Configs


@pytest.mark.parametrize("name", sorted(p.stem for p in SAMPLER_DIR.glob("*.yaml")))
def test_every_sampler_config_samples(name):
    cfg = sampler_cfg(name, num_steps=4)
    info = {}
    images = generate_images(AnalyticModel(), [0, 1], sampler_cfg=cfg, batch_size=2, device="cpu", info=info)
    assert images.shape == (2, 1, 4, 4) and images.dtype == torch.uint8
    assert info["nfe"] == (7 if cfg.name == "heun" else 4)


def test_sampler_options_validation():
    assert sampler_options(sampler_cfg("ddim")) == {"eta": 0.0}
    with pytest.raises(ValueError, match="unknown sampler 'rk4'; valid choices: ddim, dpmpp_2m, euler"):
        sampler_options({"name": "rk4"})
    with pytest.raises(ValueError, match="sampler=dpmpp_2m: unknown parameter.*eta"):
        sampler_options({"name": "dpmpp_2m", "eta": 1.0})
    assert set(SAMPLERS) == {"heun", "euler", "ddim", "dpmpp_2m", "euler_ancestral"}
    assert dpmpp_2m in SAMPLERS.values()


def test_benchmark_plans_the_nfe_it_measures():
    """benchmarks/sampling.py picks step counts for a target NFE; the counted NFE must hit the target."""
    from benchmarks.sampling import sampler_config, steps_for_nfe

    for name in SAMPLERS:
        for target in (5, 9):
            cfg = sampler_config(name, steps_for_nfe(name, target), ["steps_from=loglinear", "guidance_interval=null"])
            assert cfg.steps_from == "loglinear" and cfg.guidance_interval is None
            info = {}
            generate_images(AnalyticModel(), [0, 1], sampler_cfg=cfg, batch_size=2, device="cpu", info=info)
            assert info["nfe"] == target, (name, target, info["nfe"])
    with pytest.raises(ValueError, match="has no key 'etaa'"):
        sampler_config("ddim", 5, ["etaa=1"])
