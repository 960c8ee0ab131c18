"""Schedule comparisons that are fair by construction: one support setting, one logSNR convention, visible guesses,
and stratified σ draws.

References, all independent of the code under test: closed-form CDFs of the truncated distributions written out here
(Laplace in λ, Cauchy, half-Cauchy, logistic) and scipy's ``truncnorm`` and ``laplace``; analytic masses outside the
range; the stratified-sampling variance formula (1/n²)·Σ_k Var(f | stratum k) evaluated by quadrature; the cosine
schedule time t = (2/π)·atan(σ) for the sampler's t_max.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from scipy import integrate, stats

from configs.validation import config_differences
from diffusion.loss import DenoisingLoss
from diffusion.schedules import SCHEDULES, build_schedule
from diffusion.schedules.infonoise import InfoNoise
from diffusion.schedules.tabulated import TabulatedLogSigma
from diffusion.sigma_grids import build_sigma_grid
from diffusion.weighting import EDMWeighting, build_weighting
from evaluation.report import collect_report
from evaluation.report_format import format_report
from tests.helpers import FAST_TRAIN, compose
from training.checkpoint import load_checkpoint
from training.distributed import init_distributed
from training.trainer import Trainer, train

ROOT = Path(__file__).resolve().parents[1]
SCHEDULE_DIR = ROOT / "configs" / "schedule"
F64 = torch.float64
KS_PVALUE = 1e-3
LN_LO, LN_HI = math.log(0.002), math.log(80.0)
LAM_LO, LAM_HI = -2 * LN_HI, -2 * LN_LO  # the default support in logSNR: [−8.76, 12.43]


def _schedule_cfg(name: str) -> dict:
    return dict(OmegaConf.to_container(OmegaConf.load(SCHEDULE_DIR / f"{name}.yaml")))


# ---------------------------------------------------------------------------------------------------------------------
# One support for every schedule.

def test_every_schedule_config_has_the_shared_settings_with_the_stated_defaults():
    """One override (schedule.sigma_range=..., schedule.snr_reference=...) reaches every arm of a sweep; EDM's
    log-normal (and InfoNoise, which warms up from it) stay untruncated by default so existing runs reproduce."""
    untruncated = {"lognormal", "lognormal_edm2", "infonoise"}
    for path in sorted(SCHEDULE_DIR.glob("*.yaml")):
        cfg = OmegaConf.load(path)
        assert cfg.snr_reference == "unit", path.stem
        expected = None if path.stem in untruncated else [0.002, 80.0]
        assert (None if cfg.sigma_range is None else list(cfg.sigma_range)) == expected, path.stem
    # The demo's config: schedule=lognormal, untruncated, i.i.d. draws; its σ's are the plain log-normal's, bit for bit.
    cfg = compose("train", [])
    assert cfg.schedule.sigma_range is None and cfg.train.sigma_draw == "iid"
    demo = build_schedule(cfg.schedule, sigma_data=0.5).sample(4096, generator=torch.Generator().manual_seed(3))
    plain = SCHEDULES["lognormal"]().sample(4096, generator=torch.Generator().manual_seed(3))
    assert torch.equal(demo, plain)


def _laplace_truncated_cdf_u(u, mu, b, lam_lo, lam_hi):
    """P(ln σ ≤ u) for λ ~ Laplace(μ, b) conditioned on λ ∈ [λ_lo, λ_hi], λ = −2u (closed form, written here)."""
    def g(lam):  # Laplace CDF in λ
        lam = np.asarray(lam, dtype=float)
        return np.where(lam < mu, 0.5 * np.exp((lam - mu) / b), 1.0 - 0.5 * np.exp(-(lam - mu) / b))
    lam = np.clip(-2.0 * np.asarray(u), lam_lo, lam_hi)
    return (g(lam_hi) - g(lam)) / (g(lam_hi) - g(lam_lo))


def test_truncated_laplace_in_logsnr_matches_its_closed_form():
    """A range that cuts a lot (σ ∈ [0.3, 3], λ ∈ [−2.20, 2.41]) of Laplace(μ=0.5, b=1): CDF, density and draws."""
    lo, hi = 0.3, 3.0
    sched = SCHEDULES["laplace"](mu=0.5, b=1.0, sigma_range=[lo, hi])
    lam_lo, lam_hi = -2 * math.log(hi), -2 * math.log(lo)
    u = np.linspace(math.log(lo) - 0.5, math.log(hi) + 0.5, 401)
    expected = _laplace_truncated_cdf_u(u, 0.5, 1.0, lam_lo, lam_hi)
    np.testing.assert_allclose(sched.cdf(torch.tensor(u, dtype=F64)).numpy(), expected, rtol=1e-12, atol=1e-15)
    # Kept mass, analytically: G(λ_hi) − G(λ_lo).
    kept = stats.laplace(0.5, 1.0).cdf(lam_hi) - stats.laplace(0.5, 1.0).cdf(lam_lo)
    assert sched.truncated_mass() == pytest.approx(1.0 - kept, rel=1e-12)
    # Density per unit ln σ: 2·p_λ(−2u)/kept inside, 0 outside.
    inside = u[(u > math.log(lo)) & (u < math.log(hi))]
    np.testing.assert_allclose(sched.density(torch.tensor(inside, dtype=F64)).numpy(),
                               2 * stats.laplace(0.5, 1.0).pdf(-2 * inside) / kept, rtol=1e-12)
    assert float(sched.density(torch.tensor(math.log(hi) + 0.01, dtype=F64))) == 0.0
    draws = sched.sample(50_000, generator=torch.Generator().manual_seed(11))
    assert float(draws.min()) >= lo and float(draws.max()) <= hi
    ks = stats.kstest(draws.double().log().numpy(), lambda x: _laplace_truncated_cdf_u(x, 0.5, 1.0, lam_lo, lam_hi))
    assert ks.pvalue > KS_PVALUE


def test_truncated_lognormal_matches_scipy_truncnorm():
    lo, hi = 0.1, 2.0
    sched = SCHEDULES["lognormal"](p_mean=-1.2, p_std=1.2, sigma_range=[lo, hi])
    ref = stats.truncnorm((math.log(lo) + 1.2) / 1.2, (math.log(hi) + 1.2) / 1.2, loc=-1.2, scale=1.2)
    u = np.linspace(math.log(lo), math.log(hi), 201)
    np.testing.assert_allclose(sched.cdf(torch.tensor(u, dtype=F64)).numpy(), ref.cdf(u), rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(sched.icdf(torch.tensor([0.1, 0.5, 0.9], dtype=F64)).numpy(),
                               ref.ppf([0.1, 0.5, 0.9]), rtol=1e-10)
    ks = stats.kstest(sched.sample_log_sigma(50_000, generator=torch.Generator().manual_seed(2)).double().numpy(),
                      ref.cdf)
    assert ks.pvalue > KS_PVALUE


@pytest.mark.parametrize(("name", "outside"), [
    # Cauchy(0, 1) in λ: 1 − (atan(λ_hi) − atan(λ_lo))/π.
    ("cauchy", 1 - (math.atan(LAM_HI) - math.atan(LAM_LO)) / math.pi),
    # cosine: σ ~ half-Cauchy(1), P(σ < a) + P(σ > b) = (2/π)(atan(a) + atan(1/b)).
    ("cosine", 2 / math.pi * (math.atan(0.002) + math.atan(1 / 80))),
    # FM-OT: ln σ ~ Logistic(0, 1), P = a/(1 + a) + 1/(1 + b).
    ("fm_ot", 0.002 / 1.002 + 1 / 81),
    # Laplace(0, 0.5) in λ: ½e^{λ_lo/b} + ½e^{−λ_hi/b}.
    ("laplace", 0.5 * math.exp(LAM_LO / 0.5) + 0.5 * math.exp(-LAM_HI / 0.5)),
    # EDM's VE, ln σ ~ U[ln 0.02, ln 100]: the part above 80.
    ("ve", math.log(100 / 80) / math.log(100 / 0.02)),
])
def test_mass_the_default_support_removes(name, outside):
    sched = build_schedule(_schedule_cfg(name), sigma_data=0.5)
    assert sched.truncated_mass() == pytest.approx(outside, rel=1e-10)
    if name in ("cauchy", "cosine"):  # the 6.2% and 0.92% quoted in the configs
        assert round(100 * outside, 2 if name == "cosine" else 1) == {"cauchy": 6.2, "cosine": 0.92}[name]


def _active_infonoise(**kwargs) -> InfoNoise:
    """An InfoNoise past its warm-up, its table learned from a rate ∝ σ/(1 + σ²) (any positive profile will do)."""
    sch = InfoNoise(divide_by_weight=False, warmup_steps=0, refresh_every=1, min_count=1, gate_c=None, **kwargs)
    sigma = torch.logspace(math.log10(0.002), math.log10(80.0), 4096)
    sch.update(sigma, sigma**3 / (1 + sigma**2))
    sch.on_step(1)
    assert not sch.in_warmup
    return sch


def _every_kind_of_schedule(sigma_range):
    edges = torch.linspace(-4.0, 3.0, 8, dtype=F64)
    out = {name: build_schedule({"name": name, "sigma_range": sigma_range}, img_resolution=32, sigma_data=0.5)
           for name in SCHEDULES if name != "infonoise"}
    out["tabulated"] = TabulatedLogSigma(edges, masses=[1, 3, 2, 5, 1, 2, 4], sigma_range=sigma_range)
    out["infonoise (warm-up)"] = InfoNoise(weighting=EDMWeighting(0.5), sigma_data=0.5, warmup_steps=10,
                                           sigma_range=sigma_range)
    out["infonoise (learned)"] = _active_infonoise(sigma_range=sigma_range)
    return out


def test_one_truncation_mechanism_for_every_kind_of_schedule():
    """Fixed, discrete, tabulated and adaptive (warm-up and learned) alike: the CDF on σ ∈ [0.05, 5] is the untruncated
    CDF renormalised, (F(u) − F(a))/(F(b) − F(a)), and every draw is inside."""
    truncated, plain = _every_kind_of_schedule([0.05, 5.0]), _every_kind_of_schedule(None)
    a, b = math.log(0.05), math.log(5.0)
    u = torch.linspace(a, b, 301, dtype=F64)
    for name, sched in truncated.items():
        ref = plain[name]
        f_lo = float(ref.cdf(torch.tensor(a, dtype=F64)))  # = F(a⁻): no DDPM level lies at 0.05
        f_hi = float(ref.cdf(torch.tensor(b, dtype=F64)))
        expected = (ref.cdf(u) - f_lo) / (f_hi - f_lo)
        torch.testing.assert_close(sched.cdf(u), expected, rtol=1e-9, atol=1e-12, msg=name)
        sigma = sched.sample(5000, generator=torch.Generator().manual_seed(1), stratified=True)
        assert float(sigma.min()) >= 0.05 and float(sigma.max()) <= 5.0, name
        assert sched.truncated_mass() == pytest.approx(1 - (f_hi - f_lo), abs=1e-12), name


def test_older_spelling_gives_the_same_draws():
    """Checkpoints saved with sigma_min / sigma_max (Cauchy's old default) rebuild to the same schedule, bit for bit."""
    old = build_schedule({"name": "cauchy", "mu": 0.0, "gamma": 1.0, "sigma_min": 0.002, "sigma_max": 80.0})
    new = build_schedule(_schedule_cfg("cauchy"))
    gen = lambda: torch.Generator().manual_seed(9)  # noqa: E731
    assert torch.equal(old.sample(10_000, generator=gen()), new.sample(10_000, generator=gen()))


def test_sampler_steps_follow_the_schedule_as_defined():
    """Hang et al.'s cosine-aligned grid starts at cosine time t_max = 0.99, σ = tan(0.99π/2) = 63.66, whatever
    support the training config gives cosine (truncated, its time 0.99 would be σ ≈ 35.6)."""
    grid = build_sigma_grid({"num_steps": 50, "steps_from": "cosine", "t_max": 0.99, "sigma_min": 0.002,
                             "sigma_max": 80.0})
    assert float(grid[0]) == pytest.approx(math.tan(0.99 * math.pi / 2), rel=1e-12)
    plain = build_sigma_grid({"num_steps": 50, "steps_from": {"name": "cosine"}, "t_max": 0.99, "sigma_min": 0.002,
                              "sigma_max": 80.0})
    assert torch.equal(grid, plain)


def test_resume_compares_the_support_in_one_spelling():
    saved = {"schedule": {"name": "cauchy", "mu": 0.0, "gamma": 1.0, "sigma_min": 0.002, "sigma_max": 80.0},
             "train": {"batch": 64}}
    now = {"schedule": {**_schedule_cfg("cauchy")}, "train": {"batch": 64, "sigma_draw": "iid"}}
    assert config_differences(saved, now) == []
    # A cosine run from before the policy (untruncated) does not silently continue truncated ...
    old_cosine = {"schedule": {"name": "cosine", "sigma_min": None, "sigma_max": None}}
    (diff,) = config_differences(old_cosine, {"schedule": _schedule_cfg("cosine")})
    assert diff == "schedule.sigma_range: None (checkpoint) != [0.002, 80.0] (now)"
    # ... and resumes with schedule.sigma_range=null.
    assert config_differences(old_cosine, {"schedule": {**_schedule_cfg("cosine"), "sigma_range": None}}) == []
    # cosine_shifted on latents took the latent resolution: resuming needs schedule.resolution=32.
    latent = {"data": {"resolution": 32, "latent_norm": "scale"},
              "schedule": {"name": "cosine_shifted", "shift": None, "base_resolution": 64}}
    now = {"data": latent["data"], "schedule": _schedule_cfg("cosine_shifted")}
    assert [d.split(":")[0] for d in config_differences(latent, now)] == ["schedule.resolution",
                                                                          "schedule.sigma_range"]
    now["schedule"]["resolution"] = 32
    assert config_differences(latent, {**now, "schedule": {**now["schedule"], "sigma_range": None}}) == []
    assert config_differences({"train": {"batch": 8}}, {"train": {"batch": 8, "sigma_draw": "stratified"}}) != []


# ---------------------------------------------------------------------------------------------------------------------
# The logSNR convention.

@pytest.mark.parametrize(("name", "ref"), [("laplace", stats.laplace(0.0, 0.5)), ("cauchy", stats.cauchy(0.0, 1.0))])
def test_data_convention_centres_a_logsnr_schedule_on_sigma_data(name, ref):
    """snr_reference=data: λ = 2·ln(σ_data/σ) ~ the published density, so the median σ is σ_data (not 1)."""
    sigma_data = 0.5
    cfg = {**_schedule_cfg(name), "snr_reference": "data", "sigma_range": None}
    sched = build_schedule(cfg, sigma_data=sigma_data)
    assert math.exp(float(sched.icdf(torch.tensor(0.5, dtype=F64)))) == pytest.approx(sigma_data, rel=1e-12)
    # In the unit convention the median is σ = 1: the offset is 2·ln 2 = 1.39 in λ, 2.8 Laplace scales b = 0.5.
    unit = build_schedule({**cfg, "snr_reference": "unit"})
    assert math.exp(float(unit.icdf(torch.tensor(0.5, dtype=F64)))) == pytest.approx(1.0, rel=1e-12)
    u = np.linspace(-6, 4, 201)
    np.testing.assert_allclose(sched.cdf(torch.tensor(u, dtype=F64)).numpy(),
                               ref.sf(2 * (math.log(sigma_data) - u)), rtol=1e-10, atol=1e-14)
    draws = sched.sample_log_sigma(50_000, generator=torch.Generator().manual_seed(4)).double().numpy()
    assert stats.kstest(2 * (math.log(sigma_data) - draws), ref.cdf).pvalue > KS_PVALUE


def test_data_convention_leaves_schedules_stated_in_sigma_alone():
    for name in ("lognormal", "ve"):
        cfg = _schedule_cfg(name)
        unit = build_schedule(cfg, sigma_data=0.5).sample(1000, generator=torch.Generator().manual_seed(0))
        data = build_schedule({**cfg, "snr_reference": "data"}, sigma_data=0.5)
        assert torch.equal(unit, data.sample(1000, generator=torch.Generator().manual_seed(0)))
        assert "no effect" in repr(data)


def test_trainer_builds_the_data_convention_from_precond_sigma_data():
    cfg = compose("train", ["schedule=laplace", "schedule.snr_reference=data", "precond.sigma_data=0.25",
                            "model.model_channels=8", "model.num_blocks=1"])
    trainer = Trainer(cfg, init_distributed("cpu"))
    assert trainer.schedule.snr_shift == pytest.approx(math.log(0.25))
    assert "snr_reference=data (σ_data=0.25)" in repr(trainer.schedule)


# ---------------------------------------------------------------------------------------------------------------------
# Guesses are visible.

UNVERIFIED = {"cauchy": ["mu", "gamma"], "cosine_scaled": ["scale"], "cosine_shifted": ["resolution"],
              "uniform_logsnr": ["logsnr_min", "logsnr_max"]}


def test_unverified_parameters_are_marked_in_the_configs():
    for path in sorted(SCHEDULE_DIR.glob("*.yaml")):
        cfg = OmegaConf.load(path)
        marked = list(cfg.get("unverified") or [])
        assert marked == UNVERIFIED.get(path.stem, []), path.stem
        assert all(key in cfg for key in marked), path.stem  # the list names parameters that exist
        if marked:
            assert "UNVERIFIED" in path.read_text()  # with the reasoning beside it


def test_report_states_the_setup_and_marks_unverified_rows(tmp_path):
    from tests.test_report import write_run

    root = tmp_path / "sweep"
    for job, schedule in enumerate(("lognormal", "cauchy")):
        write_run(root / f"job{job}", [f"schedule={schedule}", "train.sigma_draw=stratified",
                                       "train.ema_halflife_kimg=20"], {30: 20.0 - job, 60: 10.0 - job}, job=job)
    md = format_report(collect_report(root))
    assert ("Training noise: support untruncated (σ ∈ [0.002, 80]: cauchy); logSNR λ = −2·ln σ "
            "(unit); σ draws stratified. Evaluated weights: EMA half-life 20 kimg (ramp-up 0.05).") in md
    # a third row: the setting most runs share is stated once, the other rows are named after it
    write_run(root / "job2", ["schedule=laplace", "train.sigma_draw=stratified", "train.ema_halflife_kimg=20"],
              {30: 15.0, 60: 8.0}, job=2)
    md = format_report(collect_report(root))
    assert "Training noise: support σ ∈ [0.002, 80] (untruncated: lognormal); logSNR" in md
    assert "| cauchy † |" in md and "| lognormal |" in md
    assert "† Parameters no readable source fixes" in md and "cauchy: mu = 0, gamma = 1." in md


# ---------------------------------------------------------------------------------------------------------------------
# Stratified σ draws.

def _exact_cdfs():
    """(schedule, exact CDF in u written independently) pairs."""
    lam_cdf = lambda dist: (lambda u: (dist.sf(-2 * np.clip(u, LN_LO, LN_HI)) - dist.sf(LAM_HI))  # noqa: E731
                            / (dist.sf(LAM_LO) - dist.sf(LAM_HI)))
    return {
        "lognormal": (build_schedule(_schedule_cfg("lognormal")), stats.norm(-1.2, 1.2).cdf),
        "laplace": (build_schedule(_schedule_cfg("laplace")), lam_cdf(stats.laplace(0.0, 0.5))),
        "cauchy": (build_schedule(_schedule_cfg("cauchy")), lam_cdf(stats.cauchy(0.0, 1.0))),
    }


@pytest.mark.parametrize("name", ["lognormal", "laplace", "cauchy"])
def test_stratified_draws_keep_the_marginal(name):
    """Pooled over 400 batches of 64, and at one fixed position of the batch over 3000 batches of 16 (without the
    random permutation that position would always hold the lowest stratum), the draws follow the exact CDF."""
    sched, cdf = _exact_cdfs()[name]
    gen = torch.Generator().manual_seed(21)
    pooled = torch.cat([sched.sample_log_sigma(64, generator=gen, stratified=True) for _ in range(400)])
    assert stats.kstest(pooled.double().numpy(), cdf).pvalue > KS_PVALUE
    first = torch.stack([sched.sample_log_sigma(16, generator=gen, stratified=True)[0] for _ in range(3000)])
    assert stats.kstest(first.double().numpy(), cdf).pvalue > KS_PVALUE
    # Every batch holds exactly one draw per stratum of the schedule: F(σ)·n is a permutation of 0..n−1.
    strata = (sched.cdf(sched.sample_log_sigma(64, generator=gen, stratified=True).double()) * 64).floor()
    assert sorted(strata.long().tolist()) == list(range(64))


def test_stratified_draws_keep_the_marginal_of_a_learned_schedule():
    sched = _active_infonoise()
    edges, cum = sched.table.log_edges.numpy(), sched.table.cum_mass.numpy()
    gen = torch.Generator().manual_seed(5)
    pooled = torch.cat([sched.sample_log_sigma(64, generator=gen, stratified=True) for _ in range(300)])
    assert stats.kstest(pooled.double().numpy(), lambda x: np.interp(x, edges, cum)).pvalue > KS_PVALUE


def _batch_mean_variances(sched, weight, n):
    """Var of the batch mean of w(σ) for i.i.d. (Var(w)/n) and stratified ((1/n²)·Σ_k Var(w | stratum k)) draws,
    by quadrature over the quantile q (w as a function of q through the schedule's inverse CDF)."""
    f = lambda q: float(weight(torch.exp(sched.icdf(torch.tensor(q, dtype=F64)))))  # noqa: E731
    moments = []
    for k in range(n):
        m1 = integrate.quad(f, k / n, (k + 1) / n, epsabs=0, epsrel=1e-10, limit=200)[0] * n
        m2 = integrate.quad(lambda q: f(q) ** 2, k / n, (k + 1) / n, epsabs=0, epsrel=1e-10, limit=200)[0] * n
        moments.append((m1, m2))
    mean = sum(m1 for m1, _ in moments) / n
    var = sum(m2 for _, m2 in moments) / n - mean**2
    return var / n, sum(m2 - m1**2 for m1, m2 in moments) / n**2


def test_stratified_draws_cut_the_batch_to_batch_variance_of_the_mean_loss_weight():
    """Min-SNR-5's loss weight under Laplace, batch 64: the batch mean's variance over 2000 batches matches Var(w)/n
    for i.i.d. draws and the stratified-sampling formula for stratified ones, which is more than 50x smaller."""
    sched = build_schedule(_schedule_cfg("laplace"))
    weight = build_weighting({"name": "min_snr"})
    n, batches = 64, 2000
    measured = {}
    for stratified in (False, True):
        gen = torch.Generator().manual_seed(8)
        means = torch.stack([weight(sched.sample(n, generator=gen, stratified=stratified)).double().mean()
                             for _ in range(batches)])
        measured[stratified] = float(means.var())
    iid, strat = _batch_mean_variances(sched, weight, n)
    # The sample variance of 2000 batch means has a relative standard error of about √(2/1999) = 3.2%.
    assert measured[False] == pytest.approx(iid, rel=0.15)
    assert measured[True] == pytest.approx(strat, rel=0.15)
    assert measured[True] < measured[False] / 50


def test_stratified_draws_are_per_global_batch_and_resume_exactly(tmp_path):
    cfg = compose("train", [f"run_dir={tmp_path / 'x'}", *FAST_TRAIN, "train.sigma_draw=stratified"])
    trainer = Trainer(cfg, init_distributed("cpu"))
    assert isinstance(trainer.loss_fn, DenoisingLoss) and trainer.loss_fn.sigma_draw == "stratified"
    sigma, _ = trainer.loss_fn.draw(32, (1, 8, 8), "cpu", torch.Generator().manual_seed(0))
    strata = (trainer.schedule.cdf(sigma.double().log()) * 32).floor().long()
    assert sorted(strata.tolist()) == list(range(32))  # one σ in each of the 32 strata of the global batch
    full, split = tmp_path / "full", tmp_path / "split"
    train(compose("train", [f"run_dir={full}", *FAST_TRAIN, "train.sigma_draw=stratified"]))
    train(compose("train", [f"run_dir={split}", *FAST_TRAIN, "train.sigma_draw=stratified", "train.total_kimg=0.128"]))
    train(compose("train", [f"run_dir={split}", *FAST_TRAIN, "train.sigma_draw=stratified", "resume=auto"]))
    a, b = load_checkpoint(full), load_checkpoint(split)
    for name, tensor in a["net"].items():
        assert torch.equal(tensor, b["net"][name]), name
    iid = load_checkpoint(train(compose("train", [f"run_dir={tmp_path / 'iid'}", *FAST_TRAIN])))
    assert any(not torch.equal(t, iid["net"][k]) for k, t in a["net"].items())  # the option changes the draws


def test_bad_sigma_draw_fails_before_any_work(tmp_path):
    from configs.validation import ConfigError, validate_train_config

    with pytest.raises(ConfigError, match="train.sigma_draw: must be one of iid, stratified, got 'sobol'"):
        validate_train_config(compose("train", [f"run_dir={tmp_path}", "train.sigma_draw=sobol"]))
    with pytest.raises(ValueError, match="train.sigma_draw must be one of iid, stratified"):
        DenoisingLoss(build_schedule({"name": "laplace"}), build_weighting({"name": "edm"}), sigma_draw="sobol")


def test_a_sweep_of_sweeps_lists_the_plain_arms_first_then_each_sweeps_variants(tmp_path):
    """docs/results/fair/run.sh's layout: the arms' sweep, then sweeps that change one setting of some arms. Rows
    with the usual settings come first in job order, then each other sweep's rows together, in its job order."""
    from tests.test_report import write_run

    root = tmp_path / "fair"
    arms = [("support", ["schedule=lognormal"]), ("support", ["schedule=laplace"]), ("support", ["schedule=cosine"]),
            ("snr_data", ["schedule=laplace", "schedule.snr_reference=data"]),
            ("stratified", ["schedule=lognormal", "train.sigma_draw=stratified"]),
            ("stratified", ["schedule=laplace", "train.sigma_draw=stratified"])]
    jobs: dict[str, int] = {}
    for sweep, overrides in arms:
        job = jobs[sweep] = jobs.get(sweep, -1) + 1
        write_run(root / sweep / f"job{job}", overrides, {30: 20.0, 60: 10.0}, job=job)
    report = collect_report(root, {"baseline_run": "lognormal"})
    assert report["tables"][0]["order"] == [
        "lognormal", "laplace", "cosine", "laplace/schedule.snr_reference=data",
        "lognormal/train.sigma_draw=stratified", "laplace/train.sigma_draw=stratified"]
    assert report["tables"][0]["baseline"] == "lognormal"
