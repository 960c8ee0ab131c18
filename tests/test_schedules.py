"""Training noise schedules against references written independently here (scipy.stats and the sources' formulas).

For every schedule: a Kolmogorov–Smirnov test of 100k samples against a closed-form CDF (fixed seed, p > 1e-3);
the density integrates to 1 (adaptive quadrature in u = ln σ); icdf(cdf(u)) = u and cdf(icdf(q)) = q; the published
λ(t) formulas equal −2·icdf(t) under Hang et al.'s t = 1 − CDF_λ = CDF_u convention; truncation keeps samples
inside [σ_min, σ_max] and follows the truncated CDF. DDPM's discrete levels are checked as a discrete distribution.
The masses in |λ| < a are compared with closed forms and with reference values computed independently of this code
from the densities (Laplace, cosine, FM-OT and EDM in the forms of Hang et al. 2024, arXiv 2407.03297).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from scipy import integrate, special, stats

from diffusion.schedules import SCHEDULES, build_schedule
from diffusion.sigma_grids import build_sigma_grid
from evaluation.schedule_figure import logsnr_mass, write_schedule_report

ROOT = Path(__file__).resolve().parents[1]
KS_PVALUE = 1e-3        # KS tests pass when p > 1e-3 (fixed seeds, so the outcome is deterministic)
N_KS = 100_000
F64 = torch.float64


def _lambda_sf_to_u(dist):
    """CDF in u = ln σ of a λ-distribution: P(ln σ ≤ u) = P(λ ≥ −2u)."""
    return lambda u: dist.sf(-2.0 * np.asarray(u))


def _vp_cdf(beta_d, beta_min, eps):
    def cdf(u):
        x = np.log1p(np.exp(2.0 * np.asarray(u)))  # ln(1 + σ²)
        t = (-beta_min + np.sqrt(beta_min**2 + 2.0 * beta_d * x)) / beta_d  # plain quadratic formula
        return np.clip((t - eps) / (1.0 - eps), 0.0, 1.0)
    return cdf


# name → (constructor kwargs, reference CDF in u, published λ(t) or None)
SHIFT = 2.0 * math.log(64 / 32)
CASES = {
    "lognormal": ({}, stats.norm(-1.2, 1.2).cdf, lambda t: -2.0 * (-1.2 + 1.2 * stats.norm.ppf(t))),
    "lognormal_edm2": ({"p_mean": -0.4, "p_std": 1.0}, stats.norm(-0.4, 1.0).cdf,
                       lambda t: -2.0 * (-0.4 + stats.norm.ppf(t))),
    "logit_normal": ({"m": 0.3, "s": 0.8}, stats.norm(0.3, 0.8).cdf,
                     lambda t: 2 * np.log((1 - special.expit(0.3 + 0.8 * stats.norm.ppf(t)))
                                          / special.expit(0.3 + 0.8 * stats.norm.ppf(t)))),
    "fm_ot": ({}, lambda u: special.expit(u), lambda t: 2.0 * np.log((1.0 - t) / t)),
    "fm_ot_shift3": ({"shift": 3.0}, lambda u: (np.exp(u) / 3) / (1 + np.exp(u) / 3),  # τ = σ'/(1+σ'), σ' = σ/3
                     lambda t: 2.0 * np.log((1.0 - t) / t) - 2.0 * math.log(3.0)),
    "cosine": ({}, lambda u: 2.0 / np.pi * np.arctan(np.exp(u)), lambda t: -2.0 * np.log(np.tan(np.pi * t / 2))),
    "cosine_shifted": ({"shift": SHIFT}, lambda u: 2.0 / np.pi * np.arctan(np.exp(u + SHIFT / 2)),
                       lambda t: -2.0 * np.log(np.tan(np.pi * t / 2)) + SHIFT),
    "cosine_scaled": ({"scale": 0.5}, lambda u: 2.0 / np.pi * np.arctan(np.exp(u / 0.5)),
                      lambda t: -2.0 * 0.5 * np.log(np.tan(np.pi * t / 2))),
    "laplace": ({}, _lambda_sf_to_u(stats.laplace(0.0, 0.5)),
                lambda t: 0.0 - 0.5 * np.sign(0.5 - t) * np.log(1 - 2 * np.abs(t - 0.5))),
    "laplace_mu": ({"mu": 1.0, "b": 0.75}, _lambda_sf_to_u(stats.laplace(1.0, 0.75)),
                   lambda t: 1.0 - 0.75 * np.sign(0.5 - t) * np.log(1 - 2 * np.abs(t - 0.5))),
    "cauchy": ({"sigma_min": None, "sigma_max": None}, _lambda_sf_to_u(stats.cauchy(0.0, 1.0)),
               lambda t: 0.0 + 1.0 * np.tan(np.pi / 2 * (1 - 2 * t))),
    "cauchy_mu": ({"mu": -1.0, "gamma": 0.5}, _lambda_sf_to_u(stats.cauchy(-1.0, 0.5)),
                  lambda t: -1.0 + 0.5 * np.tan(np.pi / 2 * (1 - 2 * t))),
    "uniform_logsnr": ({"logsnr_min": -10.0, "logsnr_max": 6.0}, _lambda_sf_to_u(stats.uniform(-10.0, 16.0)),
                       lambda t: 6.0 - 16.0 * t),
    "vp": ({}, _vp_cdf(19.9, 0.1, 1e-5),
           lambda t: -np.log(np.expm1(0.5 * 19.9 * (1e-5 + t * (1 - 1e-5)) ** 2 + 0.1 * (1e-5 + t * (1 - 1e-5))))),
    "ve": ({}, stats.uniform(math.log(0.02), math.log(100 / 0.02)).cdf,
           lambda t: -2.0 * (math.log(0.02) + t * math.log(100 / 0.02))),
}


def _build(case: str, **overrides):
    return SCHEDULES[_schedule_name(case)](**{**CASES[case][0], **overrides})


def _schedule_name(case: str) -> str:
    """Cases are named '<schedule>' or '<schedule>_<variant>' (e.g. 'laplace_mu')."""
    return max((n for n in SCHEDULES if case == n or case.startswith(n + "_")), key=len)


def _support(sched) -> tuple[float, float]:
    a, b = sched.icdf(torch.tensor([0.0, 1.0], dtype=F64)).tolist()
    return a, b


def test_every_registered_schedule_is_covered():
    covered = {_schedule_name(c) for c in CASES} | {"discrete_ddpm"}
    assert set(SCHEDULES) - {"infonoise", "tabulated"} <= covered


@pytest.mark.parametrize("case", list(CASES))
def test_samples_follow_reference_cdf(case):
    sched = _build(case)
    gen = torch.Generator().manual_seed(1234)
    u = sched.sample_log_sigma(N_KS, generator=gen).double().numpy()
    assert np.isfinite(u).all()
    result = stats.kstest(u, CASES[case][1])
    assert result.pvalue > KS_PVALUE, f"{case}: KS D={result.statistic:.4g}, p={result.pvalue:.3g}"
    # The schedule's own CDF agrees with the reference everywhere, to float64 accuracy.
    grid = np.linspace(-12, 12, 241)
    ours = sched.cdf(torch.tensor(grid, dtype=F64)).numpy()
    np.testing.assert_allclose(ours, CASES[case][1](grid), rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize("case", list(CASES))
def test_density_integrates_to_one_and_is_the_cdf_derivative(case):
    sched = _build(case)
    a, b = _support(sched)
    median = sched.icdf(torch.tensor(0.5, dtype=F64)).item()

    def f(u: float) -> float:
        return float(sched.density(torch.tensor(u, dtype=F64)))

    total = sum(integrate.quad(f, lo, hi, limit=200, epsabs=1e-12, epsrel=1e-10)[0]
                for lo, hi in ((a, median), (median, b)))
    assert abs(total - 1.0) < 1e-7, f"{case}: ∫ p(u) du = {total}"
    # p = dF/du by central differences at interior points.
    qs = torch.tensor([0.02, 0.2, 0.45, 0.7, 0.97], dtype=F64)
    u = sched.icdf(qs)
    h = 1e-5
    fd = (sched.cdf(u + h) - sched.cdf(u - h)) / (2 * h)
    torch.testing.assert_close(sched.density(u), fd, rtol=1e-6, atol=0)


@pytest.mark.parametrize("case", list(CASES))
def test_icdf_inverts_cdf_far_into_the_tails(case):
    sched = _build(case)
    a, b = _support(sched)
    u = torch.linspace(-15.0, 15.0, 3001, dtype=F64)  # |λ| ≤ 30
    u = u[(u > a + 1e-9) & (u < b - 1e-9)]
    q = sched.cdf(u)
    keep = (q > 1e-300) & (q < 1.0 - 1e-12)   # beyond this the float64 CDF value itself saturates
    u, q = u[keep], q[keep]
    p = sched.density(u)
    back = sched.icdf(q)
    # Conditioning: an error of one ulp in q moves u by ε·q/p (lower tail) or ε/p (upper tail, q ≈ 1).
    eps = torch.finfo(F64).eps
    tol = 1e-12 * (1 + u.abs()) + 16 * eps * torch.minimum(q, torch.ones_like(q)) / p
    err = (back - u).abs()
    assert bool((err <= tol).all()), f"{case}: worst |icdf(cdf(u)) − u| = {err.max():.3g} at u = {u[err.argmax()]:.3f}"
    # ...and cdf(icdf(q)) = q to relative accuracy in both tails.
    qq = torch.cat([torch.logspace(-15, -0.31, 60, dtype=F64), 1 - torch.logspace(-12, -0.31, 60, dtype=F64)])
    if np.isfinite(a) or np.isfinite(b):  # bounded support: the tails are linear in q, no deep-tail claim
        qq = qq[(qq > 1e-9) & (qq < 1 - 1e-9)]
    got = sched.cdf(sched.icdf(qq))
    torch.testing.assert_close(got, qq, rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("case", [c for c in CASES if CASES[c][2] is not None])
def test_published_lambda_of_t_equals_icdf(case):
    sched = _build(case)
    t = np.concatenate([np.linspace(0.001, 0.999, 999), [1e-6, 0.25, 0.5, 0.75, 1 - 1e-6]])
    ours = -2.0 * sched.icdf(torch.tensor(t, dtype=F64)).numpy()
    np.testing.assert_allclose(ours, CASES[case][2](t), rtol=1e-9, atol=1e-9)


def test_lambda_at_some_t_matches_reference_values():
    """λ(t) of Laplace(0, 0.5) and cosine at a few t, computed independently from their closed-form λ(t)."""
    lap = SCHEDULES["laplace"](mu=0.0, b=0.5)
    cos = SCHEDULES["cosine"]()
    lam = lambda s, t: -2.0 * s.icdf(torch.tensor(t, dtype=F64)).item()  # noqa: E731
    for t, expected in [(0.01, 1.956), (0.1, 0.805), (0.25, 0.347), (0.99, -1.956)]:
        assert lam(lap, t) == pytest.approx(expected, abs=5e-4)
    assert lam(cos, 0.01) == pytest.approx(8.307, abs=5e-4)
    assert lam(cos, 0.99) == pytest.approx(-8.307, abs=5e-4)


TRUNC_CASES = ["lognormal", "logit_normal", "fm_ot", "cosine", "cosine_scaled", "laplace", "cauchy",
               "uniform_logsnr", "vp", "ve"]


@pytest.mark.parametrize("case", TRUNC_CASES)
def test_truncation(case):
    sched = _build(case, sigma_range=(0.01, 20.0))
    ref = CASES[case][1]
    a, b = math.log(0.01), math.log(20.0)
    fa, fb = ref(a), ref(b)
    sigma = sched.sample(20_000, generator=torch.Generator().manual_seed(7))
    assert float(sigma.min()) >= 0.01 and float(sigma.max()) <= 20.0
    u = sigma.double().log().numpy()
    result = stats.kstest(u, lambda x: (ref(x) - fa) / (fb - fa))
    assert result.pvalue > KS_PVALUE, f"{case}: truncated KS p={result.pvalue:.3g}"
    # Truncated density integrates to 1 over [a, b] and vanishes outside; cdf/icdf are the renormalised ones.
    f = lambda x: float(sched.density(torch.tensor(x, dtype=F64)))  # noqa: E731
    support_lo, support_hi = _support(_build(case))
    lo, hi = max(a, support_lo), min(b, support_hi)
    assert integrate.quad(f, lo, hi, limit=200)[0] == pytest.approx(1.0, abs=1e-7)
    assert f(a - 0.1) == 0.0 and f(b + 0.1) == 0.0
    x = torch.linspace(a, b, 101, dtype=F64)
    np.testing.assert_allclose(sched.cdf(x).numpy(), (ref(x.numpy()) - fa) / (fb - fa), rtol=1e-9, atol=1e-12)
    x = x[(x > lo) & (x < hi)]
    torch.testing.assert_close(sched.icdf(sched.cdf(x)), x, rtol=0, atol=1e-9)


def test_cauchy_config_is_truncated_to_finite_sigma():
    sched = build_schedule(OmegaConf.load(ROOT / "configs/schedule/cauchy.yaml"))
    sigma = sched.sample(200_000, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(sigma).all() and float(sigma.min()) >= 0.002 and float(sigma.max()) <= 80.0


# ---------------------------------------------------------------------------------------------------------------------
# DDPM's discrete levels.

def _nearest(log_sigma: np.ndarray, log_levels: np.ndarray) -> np.ndarray:
    """Index of the nearest level (levels ascending)."""
    return np.searchsorted(0.5 * (log_levels[1:] + log_levels[:-1]), log_sigma)


def _ddpm_sigmas_numpy() -> np.ndarray:
    betas = np.linspace(1e-4, 0.02, 1000)
    alpha_bar = np.cumprod(1.0 - betas)
    return np.sqrt((1.0 - alpha_bar) / alpha_bar)


def test_discrete_ddpm_levels_and_uniform_sampling():
    sched = SCHEDULES["discrete_ddpm"]()
    ref = _ddpm_sigmas_numpy()
    np.testing.assert_allclose(sched.sigmas.numpy(), ref, rtol=1e-10)
    assert ref[0] == pytest.approx(0.01000, abs=1e-5) and ref[-1] == pytest.approx(157.4, abs=0.1)
    sigma = sched.sample(100_000, generator=torch.Generator().manual_seed(3)).double().numpy()
    idx = _nearest(np.log(sigma), np.log(ref))
    # Every draw is one of the 1000 levels (to float32 rounding of ln σ) ...
    np.testing.assert_allclose(np.log(sigma), np.log(ref[idx]), rtol=0, atol=1e-6)
    # ... and the levels are equally likely (chi-square against uniform counts).
    counts = np.bincount(idx, minlength=1000)
    assert counts.min() > 0
    assert stats.chisquare(counts).pvalue > KS_PVALUE


def test_discrete_ddpm_cdf_icdf_and_surrogate_density():
    sched = SCHEDULES["discrete_ddpm"]()
    u = sched.log_sigmas.clone()  # checked against DDPM's definition in the test above
    k = torch.arange(1000, dtype=F64)
    # Step CDF: F(u_k) = (k+1)/T exactly, constant between levels.
    torch.testing.assert_close(sched.cdf(u), (k + 1) / 1000, rtol=0, atol=0)
    mid = 0.5 * (u[1:] + u[:-1])
    torch.testing.assert_close(sched.cdf(mid), (k[:-1] + 1) / 1000, rtol=0, atol=0)
    assert sched.cdf(u[:1] - 1.0).item() == 0.0 and sched.cdf(u[-1:] + 1.0).item() == 1.0
    # Generalised inverse: icdf(q) = u_k with k = ⌈T q⌉ − 1; it lands exactly on the levels and inverts cdf there.
    torch.testing.assert_close(sched.icdf((k + 0.5) / 1000), u, rtol=0, atol=0)
    torch.testing.assert_close(sched.icdf(sched.cdf(u)), u, rtol=0, atol=0)
    # Surrogate density: piecewise constant, mass 1/T per bin, integrates to 1.
    edges = torch.cat([2 * u[:1] - mid[:1], mid, 2 * u[-1:] - mid[-1:]])
    widths = edges[1:] - edges[:-1]
    torch.testing.assert_close(sched.density(u) * widths, torch.full_like(u, 1e-3), rtol=1e-12, atol=0)
    assert sched.density(edges[:1] - 0.01).item() == 0.0
    # Hang's t: the DDPM index t/T is the step CDF's value at the level.
    t = np.array([0.0005, 0.1, 0.5, 0.999])
    assert np.allclose(sched.icdf(torch.tensor(t, dtype=F64)).numpy(), u.numpy()[np.ceil(1000 * t).astype(int) - 1])


def test_discrete_ddpm_truncation_keeps_exactly_the_levels_inside():
    ref = _ddpm_sigmas_numpy()
    inside = ref[(ref >= 0.1) & (ref <= 10.0)]
    sched = SCHEDULES["discrete_ddpm"](sigma_range=[0.1, 10.0])
    sigma = sched.sample(50_000, generator=torch.Generator().manual_seed(5)).double().numpy()
    idx = _nearest(np.log(sigma), np.log(inside))
    np.testing.assert_allclose(np.log(sigma), np.log(inside[idx]), atol=1e-6)
    counts = np.bincount(idx, minlength=len(inside))
    assert counts.min() > 0 and stats.chisquare(counts).pvalue > KS_PVALUE
    # Truncating exactly at a level keeps that level.
    at = SCHEDULES["discrete_ddpm"](sigma_range=[float(ref[10]), float(ref[20])])
    levels = at.icdf(torch.linspace(1e-9, 1.0, 2001, dtype=F64)).exp().numpy()
    np.testing.assert_allclose(np.unique(levels), ref[10:21], rtol=1e-12)


# ---------------------------------------------------------------------------------------------------------------------
# Mass near λ = 0, and the schedules report.

def test_mass_in_logsnr_band_closed_forms():
    laplace = SCHEDULES["laplace"](mu=0.0, b=0.5)
    cosine = SCHEDULES["cosine"]()
    assert logsnr_mass(laplace, 1.0) == pytest.approx(1 - math.exp(-2), abs=1e-14)
    assert round(logsnr_mass(laplace, 1.0), 4) == 0.8647
    cos_closed = 2 / math.pi * (math.atan(math.exp(0.5)) - math.atan(math.exp(-0.5)))
    assert logsnr_mass(cosine, 1.0) == pytest.approx(cos_closed, abs=1e-14)
    assert round(logsnr_mass(cosine, 1.0), 4) == 0.3058


@pytest.mark.parametrize(("cfg", "expected"), [
    ({"name": "laplace", "b": 0.75}, (0.7364, 0.9305, 0.9952)),
    ({"name": "laplace", "b": 1.0}, (0.6321, 0.8647, 0.9817)),
    ({"name": "cosine"}, (0.3058, 0.5512, 0.8287)),
    ({"name": "fm_ot"}, (0.2449, 0.4621, 0.7616)),
    ({"name": "lognormal"}, (0.2015, 0.4004, 0.7437)),
])
def test_mass_table_matches_reference_values(cfg, expected):
    """Share of samples with |λ| < 1, 2, 4 (4 decimals), computed independently from each closed-form density."""
    sched = build_schedule(cfg)
    got = tuple(logsnr_mass(sched, a) for a in (1.0, 2.0, 4.0))
    assert got == pytest.approx(expected, abs=6e-5)


def test_schedule_report(tmp_path):
    cfgs = {"laplace": {"name": "laplace"}, "cosine_shifted": {"name": "cosine_shifted"},
            "broken": {"name": "laplace", "b": -1.0}}
    paths = write_schedule_report(tmp_path, cfgs, img_resolution=128)
    assert paths["png"].stat().st_size > 10_000
    md = paths["md"].read_text()
    assert "| laplace | `Laplace(mu=0.0, b=0.5)` | 0.8647 | 0.9817 | 0.9997 |" in md
    assert f"shift={2 * math.log(64 / 128):.6g}" in md
    assert "`broken`: ValueError" in md


def test_schedule_report_draws_the_support_and_both_conventions(tmp_path):
    """The support and the mass it cut (Laplace b = 0.5 outside λ ∈ [−2 ln 80, −2 ln 0.002]: ½e^(−λ_hi/b) +
    ½e^(λ_lo/b)) are in the table; snr_reference=both adds the data-convention row, whose median σ is σ_data."""
    cfgs = {"laplace": {"name": "laplace", "sigma_range": [0.002, 80.0]}, "lognormal": {"name": "lognormal"}}
    md = write_schedule_report(tmp_path, cfgs, sigma_data=0.5, snr_reference="both")["md"].read_text()
    cut = 0.5 * math.exp(-2 * math.log(1 / 0.002) / 0.5) + 0.5 * math.exp(-2 * math.log(80) / 0.5)
    assert f"| 1 | [0.002, 80] | {cut:.3g} |" in md
    assert "| laplace (data) | `Laplace(mu=0.0, b=0.5, sigma_range=[0.002, 80], snr_reference=data (σ_data=0.5))`" in md
    assert "| 0.5 | [0.002, 80] |" in md
    assert "lognormal (data)" not in md  # stated in σ: the convention does not move it
    with pytest.raises(ValueError, match="snr_reference must be one of unit, data, both"):
        write_schedule_report(tmp_path, cfgs, snr_reference="pixels")


# ---------------------------------------------------------------------------------------------------------------------
# Configs, context and errors.

MY_SCHEDULE_FILES = sorted(p for p in (ROOT / "configs/schedule").glob("*.yaml")
                           if OmegaConf.load(p).get("name") in set(SCHEDULES) - {"infonoise", "tabulated"})


@pytest.mark.parametrize("path", MY_SCHEDULE_FILES, ids=lambda p: p.stem)
def test_schedule_configs_build(path):
    cfg = OmegaConf.load(path)
    # The shared settings are in every option (so one override reaches every arm of a sweep), in one spelling.
    assert "sigma_range" in cfg and "snr_reference" in cfg and "sigma_min" not in cfg and "sigma_max" not in cfg
    sched = build_schedule(cfg, img_resolution=32, sigma_data=0.5)
    sigma = sched.sample(1000, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(sigma).all() and bool((sigma > 0).all())


def test_cosine_shifted_takes_the_shift_from_the_resolution():
    cfg = {"name": "cosine_shifted", "shift": None, "base_resolution": 64}
    s256 = build_schedule(cfg, img_resolution=256)
    assert s256.shift == pytest.approx(2 * math.log(64 / 256))
    # Higher resolution → noisier: the median σ of the cosine schedule (1) is multiplied by 256/64.
    assert math.exp(s256.icdf(torch.tensor(0.5, dtype=F64)).item()) == pytest.approx(4.0, rel=1e-12)
    given = build_schedule({**cfg, "shift": 1.0}, img_resolution=256)
    assert given.shift == 1.0
    with pytest.raises(ValueError, match="schedule.shift or schedule.resolution"):
        build_schedule(cfg)


def test_cosine_shifted_uses_the_pixel_resolution_for_latents():
    """ImageNet-256 in SD-VAE latents: the network sees 32x32, the images are 256x256. The shift is simple
    diffusion's 2·ln(64/256) (toward lower SNR), not 2·ln(64/32) (toward higher SNR), unless the config says 32."""
    cfg = {"name": "cosine_shifted", "shift": None, "resolution": None, "base_resolution": 64}
    latent = build_schedule(cfg, img_resolution=32, image_resolution=256)
    assert latent.shift == pytest.approx(2 * math.log(64 / 256)) and latent.resolution_source.startswith("the data")
    assert math.exp(latent.icdf(torch.tensor(0.5, dtype=F64)).item()) == pytest.approx(4.0, rel=1e-12)
    pinned = build_schedule({**cfg, "resolution": 32}, img_resolution=32, image_resolution=256)
    assert pinned.shift == pytest.approx(2 * math.log(2.0))
    assert "resolution 32: schedule.resolution" in repr(pinned)


def test_sampling_steps_from_cosine_shifted_see_the_pixel_resolution_as_training_did():
    """A latent model rebuilt for sampling from its checkpoint's geometry places sampler.steps_from=cosine_shifted
    steps at the images' resolution, as its training schedule did: the grid equals that of pixel data at 256 and
    differs from the latent resolution's."""
    from training.denoiser import denoiser_from_geometry
    from training.generate import prepare_sampling

    configs = Path(__file__).resolve().parents[1] / "configs"
    cfg = OmegaConf.create({"model": OmegaConf.load(configs / "model" / "unet_tiny.yaml"),
                            "precond": OmegaConf.load(configs / "precond" / "edm.yaml")})
    geometry = {"img_resolution": 4, "img_channels": 4, "label_dim": 0,
                "latent_info": {"image_resolution": 256, "scale": [1.0] * 4}}
    denoiser = denoiser_from_geometry(cfg, geometry)
    sampler = {"name": "heun", "num_steps": 8, "steps_from": "cosine_shifted"}
    grid = prepare_sampling(denoiser, sampler, device="cpu").sigmas
    pixels = build_sigma_grid(sampler, schedule_context={"img_resolution": 256})
    latent = build_sigma_grid(sampler, schedule_context={"img_resolution": 4})
    assert torch.equal(grid, pixels) and not torch.allclose(grid, latent)


@pytest.mark.parametrize(("cfg", "match"), [
    ({"name": "nope"}, "valid choices: .*laplace"),
    ({"name": "laplace", "beta": 0.5}, "unknown parameter.*beta.*valid parameters: mu, b"),
    ({"name": "laplace", "b": 0.0}, "b must be > 0"),
    ({"name": "cauchy", "gamma": -1.0}, "gamma must be > 0"),
    ({"name": "uniform_logsnr", "logsnr_min": 3.0, "logsnr_max": 1.0}, "logsnr_min < logsnr_max"),
    ({"name": "ve", "sigma_low": 5.0, "sigma_high": 1.0}, "sigma_low < sigma_high"),
    ({"name": "vp", "epsilon_t": 1.0}, "epsilon_t"),
    ({"name": "discrete_ddpm", "num_steps": 1}, "num_steps"),
    ({"name": "cosine_scaled", "scale": 0.0}, "scale"),
    ({"name": "fm_ot", "shift": -1.0}, "shift"),
    ({"name": "laplace", "sigma_range": [1e-9, 1e-8]}, None),  # valid but far tail: builds
    ({"name": "laplace", "sigma_min": 1e-9, "sigma_max": 1e-8}, None),  # the older spelling still builds
    ({"name": "laplace", "sigma_range": [1.0, 0.5]}, r"schedule.sigma_range: need sigma_min < sigma_max"),
    ({"name": "laplace", "sigma_range": [0.0, 80.0]}, r"schedule.sigma_range\[0\] must be a finite number > 0"),
    ({"name": "laplace", "sigma_range": [0.002]}, r"schedule.sigma_range must be \[sigma_min, sigma_max\]"),
    ({"name": "laplace", "sigma_range": [0.002, 80], "sigma_max": 80.0}, "older spelling"),
    ({"name": "laplace", "snr_reference": "pixel"}, "snr_reference must be one of unit, data"),
    ({"name": "laplace", "snr_reference": "data"}, "snr_reference=data needs sigma_data"),
])
def test_bad_schedule_configs_fail_clearly(cfg, match):
    if match is None:
        sched = build_schedule(cfg)
        assert float(sched.sample(10).max()) <= 1e-8
        return
    with pytest.raises(ValueError, match=match):
        build_schedule(cfg)


def test_truncation_without_mass_fails_clearly():
    """A range that holds none of the schedule's mass fails when the schedule is built, before any draw."""
    with pytest.raises(ValueError, match="no probability mass"):
        build_schedule({"name": "ve", "sigma_range": [200.0, 300.0]})
