"""Tests of InfoNoise and the tabulated log-σ density, against closed forms worked out independently of the code.

References used (all independent of the code under test):
- piecewise-constant density: CDF/inverse worked out by hand, and ``numpy.interp`` on the table for KS tests;
- Gaussian data y ~ N(0, s²I_d), exact denoiser D = s²/(s²+σ²)·x: rate d·s²/(s²+σ²) per ln σ; with s = σ_data and
  EDM's weight, π ∝ rate/λ is the logistic in ln σ with CDF σ²/(σ²+σ_data²); uniform steps in
  I(σ) = (d/2)·ln(1 + s²/σ²) for the equal-information grid;
- binary ±a data, exact denoiser a·tanh(a·x/σ²): area ∫ mmse/σ² d ln σ = d·ln 2, peak of the rate at σ ≈ 0.814·a;
- DDP: one process fed the union of both ranks' data; resume: an uninterrupted run.
"""

from __future__ import annotations

import math
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from scipy import optimize, stats

from configs import build_from_registry
from diffusion.schedules.infonoise import InfoNoise, measure_profile
from diffusion.schedules.lognormal import LogNormal
from diffusion.schedules.tabulated import TabulatedLogSigma
from diffusion.sigma_grids import edm_rho_grid
from diffusion.weighting import EDMWeighting

ROOT = Path(__file__).resolve().parents[1]
SIGMA_DATA = 0.5
LO, HI = 0.002, 80.0


def equal_mass_sigmas(density: TabulatedLogSigma, num_steps: int, sigma_min: float = LO,
                      sigma_max: float = HI) -> np.ndarray:
    """Local equal-mass grid: σ_i = F⁻¹(F(σ_max) − i/(N−1)·(F(σ_max) − F(σ_min))), descending (no trailing 0)."""
    f_lo = density.cdf(torch.tensor(math.log(sigma_min), dtype=torch.float64))
    f_hi = density.cdf(torch.tensor(math.log(sigma_max), dtype=torch.float64))
    q = f_hi + (f_lo - f_hi) * torch.arange(num_steps, dtype=torch.float64) / (num_steps - 1)
    return density.icdf(q).exp().numpy()


def table_cdf_np(table: TabulatedLogSigma):
    """The table's CDF in ln σ, re-implemented with numpy (piecewise linear between the cumulative masses)."""
    edges = table.log_edges.numpy()
    cum = np.concatenate([[0.0], np.cumsum(table.bin_mass.numpy())])
    return lambda u: np.interp(u, edges, cum / cum[-1], left=0.0, right=1.0)


# ---------------------------------------------------------------------------------------------------------------------
# TabulatedLogSigma


def test_tabulated_cdf_icdf_density_hand_values():
    # bins [0,1] and [1,3] in ln σ with masses 0.25 and 0.75 → heights 0.25 and 0.375
    t = TabulatedLogSigma([0.0, 1.0, 3.0], masses=[1.0, 3.0])
    u = torch.tensor([-1.0, 0.0, 0.5, 1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    assert torch.allclose(t.cdf(u), torch.tensor([0.0, 0.0, 0.125, 0.25, 0.625, 1.0, 1.0], dtype=torch.float64))
    dens = t.density(u)
    assert torch.allclose(dens, torch.tensor([0.0, 0.25, 0.25, 0.375, 0.375, 0.375, 0.0], dtype=torch.float64))
    assert t.log_density(torch.tensor([-0.1, 3.1], dtype=torch.float64)).eq(-math.inf).all()
    q = torch.tensor([0.0, 0.125, 0.25, 0.625, 1.0], dtype=torch.float64)
    assert torch.allclose(t.icdf(q), torch.tensor([0.0, 0.5, 1.0, 2.0, 3.0], dtype=torch.float64))
    # same table given by heights per ln σ, and by σ edges
    t2 = TabulatedLogSigma.from_sigma_edges([1.0, math.e, math.e**3], density=[0.25, 0.375])
    assert torch.allclose(t2.bin_mass, t.bin_mass)


def test_tabulated_zero_mass_bins_are_skipped():
    t = TabulatedLogSigma([0.0, 1.0, 2.0, 3.0, 4.0], masses=[0.5, 0.0, 0.5, 0.0])
    # generalised inverse inf{u: F(u) >= q}: q = 0.5 → end of bin 0; q just above → start of bin 2
    assert float(t.icdf(torch.tensor(0.5, dtype=torch.float64))) == pytest.approx(1.0)
    assert float(t.icdf(torch.tensor(0.5 + 1e-9, dtype=torch.float64))) == pytest.approx(2.0, abs=1e-6)
    assert float(t.icdf(torch.tensor(1.0, dtype=torch.float64))) == pytest.approx(3.0)
    draws = t.sample_log_sigma(20000, generator=torch.Generator().manual_seed(0)).double()
    assert torch.isfinite(draws).all()
    assert not ((draws > 1.0 + 1e-6) & (draws < 2.0 - 1e-6)).any() and not (draws > 3.0 + 1e-6).any()
    assert t.log_density(torch.tensor([1.5, 3.5], dtype=torch.float64)).eq(-math.inf).all()
    with pytest.raises(ValueError, match="sum to zero"):
        TabulatedLogSigma([0.0, 1.0], masses=[0.0])
    with pytest.raises(ValueError, match="strictly increasing"):
        TabulatedLogSigma([0.0, 0.0, 1.0])


def test_tabulated_draws_match_cdf_ks():
    gen = torch.Generator().manual_seed(1)
    edges = torch.tensor([-5.0, -3.0, -2.5, -1.0, 0.0, 0.3, 2.0, 4.0], dtype=torch.float64)
    masses = torch.rand(7, generator=gen, dtype=torch.float64)
    t = TabulatedLogSigma(edges, masses=masses)
    draws = t.sample(20000, generator=gen).double().log().numpy()
    assert stats.kstest(draws, table_cdf_np(t)).pvalue > 0.01
    # truncation through the base class
    tt = TabulatedLogSigma(edges, masses=masses, sigma_min=math.exp(-2.0), sigma_max=math.exp(1.0))
    d2 = tt.sample(20000, generator=gen).double().log().numpy()
    f = table_cdf_np(t)
    assert stats.kstest(d2, lambda u: (f(u) - f(-2.0)) / (f(1.0) - f(-2.0))).pvalue > 0.01


# ---------------------------------------------------------------------------------------------------------------------
# Simulations with exact per-sample errors


def run_estimator(schedule: InfoNoise, error_fn, steps: int, batch: int, seed: int = 0) -> InfoNoise:
    """The training-loop contract: σ = schedule.sample(B) → per-sample ‖D − y‖² → update → on_step."""
    gen = torch.Generator().manual_seed(seed)
    for step in range(1, steps + 1):
        sigma = schedule.sample(batch, generator=gen).double()
        schedule.update(sigma, error_fn(sigma, gen))
        schedule.on_step(step)
    return schedule


def gaussian_errors(s: float, d: int):
    def fn(sigma, gen):
        y = s * torch.randn(sigma.numel(), d, dtype=torch.float64, generator=gen)
        x = y + sigma[:, None] * torch.randn(sigma.numel(), d, dtype=torch.float64, generator=gen)
        denoised = s**2 / (s**2 + sigma[:, None] ** 2) * x
        return (denoised - y).square().sum(1)
    return fn


def binary_errors(a: float, d: int):
    def fn(sigma, gen):
        y = a * (2.0 * torch.randint(0, 2, (sigma.numel(), d), generator=gen).double() - 1.0)
        x = y + sigma[:, None] * torch.randn(sigma.numel(), d, dtype=torch.float64, generator=gen)
        denoised = a * torch.tanh(a * x / sigma[:, None] ** 2)
        return (denoised - y).square().sum(1)
    return fn


D_GAUSS = 64


@pytest.fixture(scope="module")
def gaussian_run():
    """Ungated InfoNoise with EDM weighting trained on exact errors of Gaussian data with s = σ_data."""
    sch = InfoNoise(weighting=EDMWeighting(SIGMA_DATA), sigma_data=SIGMA_DATA, warmup_steps=20, refresh_every=20,
                    gate_c=None, num_dims=D_GAUSS)
    return run_estimator(sch, gaussian_errors(SIGMA_DATA, D_GAUSS), steps=200, batch=1024)


@pytest.mark.parametrize("s", [SIGMA_DATA, 1.5])
def test_gaussian_rate_converges(s, gaussian_run):
    if s == SIGMA_DATA:
        sch = gaussian_run
    else:
        sch = InfoNoise(weighting=EDMWeighting(SIGMA_DATA), sigma_data=SIGMA_DATA, warmup_steps=20, refresh_every=20,
                        gate_c=None, num_dims=D_GAUSS)
        run_estimator(sch, gaussian_errors(s, D_GAUSS), steps=200, batch=1024, seed=3)
    assert not sch.in_warmup
    prof = sch.profile()
    seen = prof["seen"]
    assert seen.sum() >= 30  # most of the grid has been measured
    expected = D_GAUSS * s**2 / (s**2 + prof["centers"] ** 2)
    rel = (prof["rate"] / expected - 1.0).abs()
    assert float(rel[seen].max()) < 0.05, rel[seen]


def test_gaussian_sampling_density_is_logistic(gaussian_run):
    sch = gaussian_run
    # analytic: CDF σ²/(σ² + σ_d²), restricted to the grid
    edges_sigma = sch.log_edges.exp()
    f = edges_sigma**2 / (edges_sigma**2 + SIGMA_DATA**2)
    f = (f - f[0]) / (f[-1] - f[0])
    assert float((sch.table.cum_mass - f).abs().max()) < 0.01
    # draws vs π (KS against the table, re-implemented in numpy) and vs the analytic logistic (looser, sup norm)
    draws = sch.sample(20000, generator=torch.Generator().manual_seed(7)).double()
    assert stats.kstest(draws.log().numpy(), table_cdf_np(sch.table)).pvalue > 0.01
    z = draws.numpy() ** 2
    emp = np.sort(z / (z + SIGMA_DATA**2))  # F(σ) of the draws: uniform if σ ~ logistic (grid ends ~1e-5 / 1e-4)
    assert np.abs(emp - (np.arange(1, emp.size + 1) - 0.5) / emp.size).max() < 0.02


def test_equal_information_grid_closed_form(gaussian_run):
    d, s, n = D_GAUSS, SIGMA_DATA, 18
    sig = equal_mass_sigmas(gaussian_run.step_density("rate"), n)
    info = lambda x: 0.5 * d * np.log1p(s**2 / x**2)  # noqa: E731
    i_grid = info(HI) + np.arange(n) / (n - 1) * (info(LO) - info(HI))
    closed = s / np.sqrt(np.exp(2.0 * i_grid / d) - 1.0)
    assert np.allclose(sig, closed, rtol=0.03), np.c_[sig, closed]


@pytest.mark.parametrize("a", [0.5, 2.0])
def test_binary_area_is_ln2_per_dim_and_peak(a):
    d = 64
    sch = InfoNoise(weighting=EDMWeighting(SIGMA_DATA), sigma_data=SIGMA_DATA, warmup_steps=20, refresh_every=20,
                    gate_c=None, num_dims=d)
    run_estimator(sch, binary_errors(a, d), steps=200, batch=1024, seed=11)
    prof = sch.profile()
    assert float(prof["area"]) / d == pytest.approx(math.log(2.0), rel=0.03)
    # peak of the (smoothed) rate per ln σ, refined by a parabola through the top three bins in ln σ; the grid is
    # 18% per bin in σ, and the smoothing moves the peak by ~2%, hence a 4% tolerance
    r = prof["rate"].numpy()
    u = sch.log_centers.numpy()
    j = int(r.argmax())
    y0, y1, y2 = np.log(r[j - 1:j + 2])
    peak = math.exp(u[j] + 0.5 * (y0 - y2) / (y0 - 2 * y1 + y2) * (u[1] - u[0]))
    assert peak == pytest.approx(0.814 * a, rel=0.04)


def test_binary_peak_location_closed_form():
    """The 0.814·a constant itself, by Gauss–Hermite quadrature of the binary mmse (guards the reference value)."""
    z, w = np.polynomial.hermite_e.hermegauss(120)
    w = w / w.sum()

    def rate(log_sigma: float) -> float:  # a = 1: γ = 1/σ², mmse = 1 − E tanh(γ + √γ·Z), rate per ln σ = γ·mmse
        g = math.exp(-2.0 * log_sigma)
        return g * (1.0 - float(np.sum(w * np.tanh(g + math.sqrt(g) * z))))

    res = optimize.minimize_scalar(lambda ls: -rate(ls), bounds=(-2.0, 2.0), method="bounded")
    assert math.exp(res.x) == pytest.approx(0.814, abs=0.002)


# ---------------------------------------------------------------------------------------------------------------------
# Gate, divide-by-weight, warm-up


def test_gate_and_weight_division(gaussian_run):
    prof = gaussian_run.profile()
    sig = prof["centers"]
    c = 0.15
    gated = InfoNoise(weighting=EDMWeighting(SIGMA_DATA), sigma_data=SIGMA_DATA, warmup_steps=0, gate_c=c)
    gated.load_state_dict({**gaussian_run.state_dict(), "hparams": gated.hparams}, strict=True)
    gated.refresh()  # the window holds < min_count per bin, so m̂ is unchanged; the table is rebuilt with this gate
    assert torch.equal(gated.mhat, gaussian_run.mhat)
    gp = gated.profile()
    assert torch.allclose(gp["gate"], sig**3 / (sig**3 + c**3))
    expected = prof["rate"] * sig**3 / (sig**3 + c**3)
    assert torch.allclose(gp["rho_hat"], expected / (expected.sum() * gated.delta))
    # π is ρ̂/λ, normalised
    pi = gated.table.heights
    lam = (sig**2 + SIGMA_DATA**2) / (sig * SIGMA_DATA) ** 2
    ref = gp["rho_hat"] / lam
    assert torch.allclose(pi, ref / (ref.sum() * gated.delta), rtol=1e-9)
    no_div = InfoNoise(sigma_data=SIGMA_DATA, warmup_steps=0, gate_c=c, divide_by_weight=False)
    no_div.load_state_dict({**gaussian_run.state_dict(), "hparams": no_div.hparams})
    no_div.refresh()
    assert torch.allclose(no_div.table.heights, no_div.profile()["rho_hat"], rtol=1e-9)


def test_auto_gate_onset_rule(gaussian_run):
    sch = InfoNoise(weighting=EDMWeighting(SIGMA_DATA), sigma_data=SIGMA_DATA, warmup_steps=0, gate_c="auto")
    sch.load_state_dict({**gaussian_run.state_dict(), "hparams": sch.hparams})
    stats_ = sch.refresh()
    # analytic: per-σ rate R(σ) = d·s²/(σ(s² + σ²)), maximal at the first bin centre; c solves R(c)/R(σ_1) = p
    s, p = SIGMA_DATA, 0.002
    sig1 = float(sch.centers[0])
    rate = lambda x: s**2 / (x * (s**2 + x**2))  # noqa: E731
    c = optimize.brentq(lambda x: rate(x) / rate(sig1) - p, 0.01, 10.0)
    assert c == pytest.approx(0.5, rel=0.05)  # the pivot worked out by hand for s = 0.5, σ_min = 0.002
    assert stats_["gate_c"] == pytest.approx(c, rel=0.05)


def test_warmup_draws_from_base_then_table():
    base = LogNormal()
    sch = InfoNoise(base=base, weighting=EDMWeighting(SIGMA_DATA), warmup_steps=30, refresh_every=20, gate_c=0.15)
    err = gaussian_errors(SIGMA_DATA, 16)
    gen, gen_ref = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for step in range(1, 41):
        sigma = sch.sample(256, generator=gen)
        assert torch.equal(sigma, base.sample(256, generator=gen_ref))  # warm-up: exactly the base's draws
        sch.update(sigma, err(sigma.double(), torch.Generator().manual_seed(step)))
        out = sch.on_step(step)
        assert (out is None) == (step % 20 != 0)
        if step == 20:
            assert out["warmup"] == 1.0 and sch.in_warmup
    assert out["warmup"] == 0.0 and not sch.in_warmup  # the first refresh after the warm-up (step 30) switches
    u = sch.sample_log_sigma(5000, generator=gen).double()
    assert float(u.min()) >= math.log(LO) - 1e-6 and float(u.max()) <= math.log(HI) + 1e-6
    assert stats.kstest(u.numpy(), table_cdf_np(sch.table)).pvalue > 0.01
    for key in ("pi_q05", "pi_q25", "pi_q50", "pi_q75", "pi_q95", "gate_c", "area", "max_dcdf", "empty_frac"):
        assert math.isfinite(out[key]), key
    assert out["pi_q05"] < out["pi_q50"] < out["pi_q95"]


def test_update_counts_out_of_grid_in_end_bins_and_skips_nonfinite():
    sch = InfoNoise(divide_by_weight=False, warmup_steps=0)
    sigma = torch.tensor([1e-5, 1e3, 1.0, 1.0])
    sch.update(sigma, torch.tensor([1.0, 2.0, float("nan"), 4.0]))
    k1 = int((math.log(1.0) - math.log(LO)) // sch.delta)
    assert sch.win_count[0] == 1 and sch.win_count[-1] == 1 and sch.win_count[k1] == 1
    assert sch.win_sum[0] == 1.0 and sch.win_sum[-1] == 2.0 and sch.win_sum[k1] == 4.0
    assert sch.win_sumsq[k1] == 16.0 and sch.win_count.sum() == 3


# ---------------------------------------------------------------------------------------------------------------------
# InfoGrid


def test_infogrid_mix_with_full_edm_weight_is_edm_grid(gaussian_run):
    dens = gaussian_run.step_density("mix", edm_weight=1.0)
    assert np.allclose(equal_mass_sigmas(dens, 18), edm_rho_grid(18, LO, HI, 7.0, append_zero=False).numpy(),
                       rtol=2e-3)
    # power with weight 0 and mix with weight 0 are the profile itself
    prof = gaussian_run.step_density("profile")
    for variant in ("mix", "power"):
        other = gaussian_run.step_density(variant, edm_weight=0.0)
        assert torch.allclose(other.bin_mass, prof.bin_mass)
    # power: geometric blend, normalised
    half = gaussian_run.step_density("power", edm_weight=0.5)
    ref = (prof.bin_mass * gaussian_run.edm_step_masses(7.0)).sqrt()
    assert torch.allclose(half.bin_mass, ref / ref.sum())
    assert torch.allclose(gaussian_run.step_density("pi").bin_mass, gaussian_run.table.bin_mass)
    with pytest.raises(ValueError, match="valid choices: rate, profile, pi, mix, power"):
        gaussian_run.step_density("entropic")


def test_measure_profile_offline():
    s, d = 0.7, 32

    class GaussDenoiser(torch.nn.Module):
        def forward(self, x, sigma, class_labels=None):
            return s**2 / (s**2 + sigma.reshape(-1, 1, 1, 1) ** 2) * x

    gen = torch.Generator().manual_seed(0)
    images = s * torch.randn(512, 2, 4, 4, generator=gen)
    sch = InfoNoise(divide_by_weight=False, warmup_steps=0, gate_c=None, min_count=64)
    measure_profile(GaussDenoiser(), images, sch, samples_per_bin=256, batch_size=1024, generator=gen)
    # the finite image set has its own variance: compare with the closed form at the empirical per-dim variance
    prof = sch.profile()
    assert bool(prof["seen"].all())
    s_emp2 = float(images.double().square().mean())
    # exact posterior for the *population* prior N(0, s²) evaluated on data with variance s_emp²
    sig2 = prof["centers"] ** 2
    k = s**2 / (s**2 + sig2)
    expected = d * ((1 - k) ** 2 * s_emp2 + k**2 * sig2) / sig2
    assert float((prof["rate"] / expected - 1).abs().max()) < 0.05


# ---------------------------------------------------------------------------------------------------------------------
# DDP and checkpoint/resume


def _ddp_data(steps: int, world: int, batch: int) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    gen = torch.Generator().manual_seed(123)
    out = [[] for _ in range(world)]
    for _ in range(steps):
        for r in range(world):
            u = math.log(LO) + torch.rand(batch, dtype=torch.float64, generator=gen) * math.log(HI / LO)
            sig = u.exp()
            mse = 16 * SIGMA_DATA**2 * sig**2 / (SIGMA_DATA**2 + sig**2) * (
                1 + 0.3 * torch.randn(batch, dtype=torch.float64, generator=gen))
            out[r].append((sig, mse))
    return out


def _make_ddp_schedule() -> InfoNoise:
    return InfoNoise(weighting=EDMWeighting(SIGMA_DATA), warmup_steps=6, refresh_every=5, min_count=40,
                     gate_c="auto")


def _ddp_worker(rank: int, world: int, port: int, data_path: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        data = torch.load(data_path)[rank]
        sch = _make_ddp_schedule()
        for step, (sig, mse) in enumerate(data, 1):
            sch.update(sig, mse)
            sch.on_step(step)
        torch.save(sch.state_dict(), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_match_union(tmp_path):
    import torch.multiprocessing as mp

    steps, world = 23, 2
    data = _ddp_data(steps, world, batch=300)
    data_path = tmp_path / "data.pt"
    torch.save(data, data_path)
    mp.spawn(_ddp_worker, args=(world, _free_port(), str(data_path), str(tmp_path)), nprocs=world, join=True)
    states = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]

    single = _make_ddp_schedule()
    for step in range(steps):
        for r in range(world):
            single.update(*data[r][step])
        single.on_step(step + 1)
    ref = single.state_dict()
    assert int(ref["num_refreshes"]) == 4 and bool(ref["active"])  # steps 5, 10 (end of warm-up), 15, 20
    for st in states:
        for key in ("mhat", "mhat_seen", "gate_c_value", "table.bin_mass", "table.cum_mass", "last_count", "active"):
            assert torch.allclose(st[key].double(), ref[key].double(), rtol=1e-12, atol=0), key
    # the not-yet-reduced windows are per rank; together they are the single process's window
    assert torch.allclose(states[0]["window"] + states[1]["window"], ref["window"], rtol=1e-12)


def test_state_dict_resume_is_exact(tmp_path):
    def make():
        return InfoNoise(weighting=EDMWeighting(SIGMA_DATA), warmup_steps=10, refresh_every=10, gate_c="auto")

    err = gaussian_errors(SIGMA_DATA, 16)
    a = make()
    gen = torch.Generator().manual_seed(0)
    for step in range(1, 26):  # stops mid-window, after the warm-up
        sig = a.sample(200, generator=gen).double()
        a.update(sig, err(sig, gen))
        a.on_step(step)
    path = tmp_path / "sched.pt"
    torch.save(a.state_dict(), path)
    gen_state = gen.get_state()

    b = make()
    b.load_state_dict(torch.load(path))
    assert torch.equal(a.table.cum_mass, b.table.cum_mass) and not b.in_warmup
    gen_a, gen_b = torch.Generator(), torch.Generator()
    gen_a.set_state(gen_state)
    gen_b.set_state(gen_state)
    for step in range(26, 41):  # continue both: identical draws and identical rebuilt tables
        sa, sb = a.sample(200, generator=gen_a), b.sample(200, generator=gen_b)
        assert torch.equal(sa, sb)
        ea = err(sa.double(), gen_a)
        assert torch.equal(ea, err(sb.double(), gen_b))
        a.update(sa, ea)
        b.update(sb, ea)
        assert a.on_step(step) == b.on_step(step)
    assert torch.equal(a.table.cum_mass, b.table.cum_mass) and torch.equal(a.mhat, b.mhat)

    other_grid = InfoNoise(weighting=EDMWeighting(SIGMA_DATA), warmup_steps=10, num_bins=32)
    with pytest.raises(ValueError, match="different grid"):
        other_grid.load_state_dict(torch.load(path))


# ---------------------------------------------------------------------------------------------------------------------
# Config and errors


def test_config_builds_and_bad_values_fail():
    cfg = OmegaConf.load(ROOT / "configs" / "schedule" / "infonoise.yaml")
    registry = {"infonoise": InfoNoise, "lognormal": LogNormal}
    ctx = dict(weighting=EDMWeighting(SIGMA_DATA), sigma_data=SIGMA_DATA, total_nimg=200_000, batch_size=64,
               img_resolution=8)
    sch = build_from_registry("schedule", registry, cfg, context=ctx)
    assert isinstance(sch.base, LogNormal) and sch.base.p_mean == -1.2
    assert int(sch.warmup_steps) == round(0.2 * math.ceil(200_000 / 64))
    assert sch.num_bins == 64 and sch.refresh_every == 100 and sch.gate_mode == "pinned"
    with pytest.raises(ValueError, match="gate_c"):
        InfoNoise(weighting=EDMWeighting(), warmup_steps=0, gate_c="sometimes")
    with pytest.raises(ValueError, match="needs the loss weighting"):
        InfoNoise(warmup_steps=0)
    with pytest.raises(ValueError, match="warmup_steps, or total_nimg"):
        InfoNoise(weighting=EDMWeighting())
    with pytest.raises(ValueError, match="cannot itself be infonoise"):
        InfoNoise(base={"name": "infonoise"}, weighting=EDMWeighting(), warmup_steps=0)


def test_profile_report_plot(tmp_path):
    """The report reads metrics.jsonl and checkpoints of a (synthetic) run and writes a PNG."""
    import json

    from diffusion.run_state import infonoise_from_run_state
    from evaluation.infonoise_report import plot_infonoise_profile
    from training.checkpoint import checkpoint_name, load_checkpoint, save_checkpoint

    sch = InfoNoise(weighting=EDMWeighting(SIGMA_DATA), sigma_data=SIGMA_DATA, warmup_steps=20, refresh_every=20,
                    num_dims=64)
    err = gaussian_errors(SIGMA_DATA, 64)
    gen = torch.Generator().manual_seed(0)
    cfg = {"schedule": {"name": "infonoise", **{k: v for k, v in OmegaConf.to_container(
        OmegaConf.load(ROOT / "configs" / "schedule" / "infonoise.yaml")).items() if k != "name"},
        "warmup_steps": 20, "refresh_every": 20},
        "weighting": {"name": "edm", "sigma_data": SIGMA_DATA}, "precond": {"name": "edm", "sigma_data": SIGMA_DATA},
        "train": {"total_kimg": 10, "batch": 256}}
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for step in range(1, 81):
            sig = sch.sample(256, generator=gen).double()
            sch.update(sig, err(sig, gen))
            out = sch.on_step(step)
            if out:
                f.write(json.dumps({"kimg": step * 0.256, "step": step, **{f"schedule/{k}": v
                                                                          for k, v in out.items()}}) + "\n")
            if step % 40 == 0:
                save_checkpoint(tmp_path / "checkpoints" / checkpoint_name(step * 256), {
                    "config": cfg, "geometry": {"img_resolution": 8, "img_channels": 1, "label_dim": 0},
                    "progress": {"cur_nimg": step * 256, "step": step},
                    "schedule": [{k: v.cpu() for k, v in sch.state_dict().items()}]})
    restored = infonoise_from_run_state(load_checkpoint(tmp_path))
    assert torch.equal(restored.table.cum_mass, sch.table.cum_mass) and restored.num_dims == 64
    out_png = plot_infonoise_profile(tmp_path, tmp_path / "profile.png")
    assert Path(out_png).stat().st_size > 10_000


def test_training_with_infonoise_logs_the_profile_and_plots_it(tmp_path):
    """`python train.py data=binary_digits schedule=infonoise` end to end at a tiny budget: the refreshes are logged
    as schedule/* records and the run ends with its profile plot."""
    import json

    from tests.helpers import FAST_TRAIN, run_cli

    run_cli("train.py", f"run_dir={tmp_path}", *FAST_TRAIN, "data=binary_digits", "schedule=infonoise",
            "schedule.refresh_every=2", "schedule.min_count=1", "schedule.warmup_steps=2")
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    refreshes = [r for r in records if "schedule/area" in r]
    assert len(refreshes) == 4  # steps 2, 4, 6, 8
    assert all(r["schedule/area"] > 0 for r in refreshes)
    assert (tmp_path / "infonoise_profile.png").stat().st_size > 10_000
