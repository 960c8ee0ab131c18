"""EDM's Heun sampler against the exact probability-flow ODE solution for Gaussian data.

For y ~ N(0, s²I) the ideal denoiser is D(x; σ) = s²/(s² + σ²)·x, the ODE dx/dσ = (x − D)/σ = σx/(s² + σ²) has the
exact solution x(σ) = x(σ_max)·√((s² + σ²)/(s² + σ_max²)), and in particular x(0) = x(σ_max)·s/√(s² + σ_max²).
"""

from __future__ import annotations

import math

import torch

from diffusion.per_image_noise import PerImageNoise
from diffusion.samplers import heun
from diffusion.sigma_grids import edm_rho_grid

S = 0.5


def gaussian_denoiser(x, sigma, class_labels=None):
    return S**2 / (S**2 + sigma**2) * x


def exact_solution(noise, sigma_max):
    x_max = noise * sigma_max
    return x_max * S / math.sqrt(S**2 + sigma_max**2)


def relative_error(num_steps):
    noise = torch.randn(256, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sigmas = edm_rho_grid(num_steps, 0.002, 80.0, 7.0)
    x = heun(gaussian_denoiser, noise, sigmas)
    exact = exact_solution(noise, 80.0)
    return float((x - exact).norm() / exact.norm())


def test_edm_grid_matches_eq5():
    sigmas = edm_rho_grid(18)
    assert len(sigmas) == 19 and float(sigmas[-1]) == 0.0
    assert math.isclose(float(sigmas[0]), 80.0) and math.isclose(float(sigmas[17]), 0.002)
    # σ^(1/ρ) is evenly spaced.
    r = sigmas[:-1] ** (1 / 7)
    torch.testing.assert_close(r.diff(), torch.full((17,), float(r[1] - r[0]), dtype=torch.float64))


def test_heun_18_steps_matches_exact_ode_solution():
    """At EDM's 18 steps the result equals the exact solution up to Heun's own discretisation error.

    That error is not small here (~5.5%: EDM's ρ = 7 grid takes steps of ratio ~1.8 around σ ≈ s, where this ODE
    bends), so the test checks it *is* the discretisation error of a 2nd-order method: Richardson's estimate
    (x_N − x_2N)·4/3 predicts it within 25%, and it is below 6%. A wrong drift, a wrong grid or a broken correction
    fails one of the two."""
    noise = torch.randn(256, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = exact_solution(noise, 80.0)
    x18 = heun(gaussian_denoiser, noise, edm_rho_grid(18))
    x36 = heun(gaussian_denoiser, noise, edm_rho_grid(36))
    err = float((x18 - exact).norm() / exact.norm())
    richardson = float((x18 - x36).norm() / exact.norm()) * 4 / 3
    assert err < 0.06, err
    assert abs(err / richardson - 1) < 0.25, (err, richardson)


def test_heun_is_second_order():
    errs = [relative_error(n) for n in (18, 36, 72)]
    slopes = [math.log(errs[i] / errs[i + 1]) / math.log(2) for i in range(2)]
    assert all(1.8 < s < 2.4 for s in slopes), (errs, slopes)
    assert errs[-1] < 3e-3


def test_nfe_is_2n_minus_1():
    calls = []

    def counting(x, sigma, class_labels=None):
        calls.append(1)
        return gaussian_denoiser(x, sigma)

    heun(counting, torch.randn(2, 1, 2, 2, dtype=torch.float64), edm_rho_grid(18))
    assert len(calls) == 35


def test_stochastic_heun_keeps_data_variance():
    """With churn the sampler is an SDE sampler of the same marginals: samples have variance s²."""
    n = 10_000
    rng = PerImageNoise(range(n))
    noise = rng.randn((1,), dtype=torch.float64)
    # EDM's ImageNet-64 stochastic settings (256 steps, S_churn 40, S_min 0.05, S_max 50); at 256 steps the
    # discretisation bias of the variance is ~0.3% (deterministic) to ~1.5% (with churn), below the sampling error.
    sigmas = edm_rho_grid(256)
    x = heun(gaussian_denoiser, noise, sigmas, randn_like=rng.randn_like, S_churn=40, S_min=0.05, S_max=50,
             S_noise=1.0)
    var = float(x.var())
    # The sample variance of n Gaussian draws has relative standard error √(2/n) ≈ 1.4%; allow 3 standard errors.
    assert abs(var / S**2 - 1) < 3 * math.sqrt(2 / n), var


def test_per_image_noise_independent_of_batch():
    a = PerImageNoise([3, 4, 5]).randn((2, 2))
    b = PerImageNoise([5]).randn((2, 2))
    torch.testing.assert_close(a[2], b[0])
    assert not torch.equal(a[0], a[1])
