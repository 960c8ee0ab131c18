"""Post-hoc EMA (training/posthoc_ema.py; Karras et al. 2024, EDM2, arXiv 2312.02696, Sec. 3 and App. C).

Independent references: EDM2's published γ for σ_rel 0.05 / 0.10; numerical quadrature of the profiles' inner
product; the closed-form weights of the discrete power EMA; a power EMA of the requested length tracked directly
along the same trajectory.
"""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch
from scipy import integrate

from training.posthoc_ema import (
    SIGMA_REL_MAX,
    PowerFunctionEMA,
    ema_choice,
    gamma_to_sigma_rel,
    list_snapshots,
    load_snapshot,
    profile_inner_products,
    reconstruct,
    sigma_rel_to_gamma,
    solve_posthoc_coefficients,
)


def test_sigma_rel_gamma_published_values_and_round_trip():
    # EDM2 Sec. 3: σ_rel = 0.05 and 0.10 correspond to γ = 16.97 and 6.94.
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.005)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.005)
    for s in (0.01, 0.05, 0.08, 0.13, 0.2, 0.29, 0.3):
        assert gamma_to_sigma_rel(sigma_rel_to_gamma(s)) == pytest.approx(s, rel=1e-12)
    for g in (-0.3, 0.0, 1.0, 6.94, 16.97, 100.0):
        assert sigma_rel_to_gamma(gamma_to_sigma_rel(g)) == pytest.approx(g, rel=1e-9, abs=1e-9)
    assert SIGMA_REL_MAX == pytest.approx(0.30028, abs=1e-4)
    for bad in (0.0, -0.1, 0.31, float("nan")):
        with pytest.raises(ValueError, match=r"sigma_rel must be in \(0, 0\.300"):
            sigma_rel_to_gamma(bad)


@pytest.mark.parametrize("ta,ga,tb,gb", [(1.0, 6.94, 1.0, 16.97), (0.4, 16.97, 1.0, 6.94), (0.7, 0.5, 0.3, 3.0)])
def test_inner_product_closed_form_matches_quadrature(ta, ga, tb, gb):
    def p(tau, t, g):
        return (g + 1) * tau**g / t ** (g + 1) if tau <= t else 0.0

    numeric, _ = integrate.quad(lambda tau: p(tau, ta, ga) * p(tau, tb, gb), 0, min(ta, tb), epsabs=1e-13,
                                epsrel=1e-11, limit=200)
    closed = profile_inner_products(np.array([ta]), np.array([ga]), np.array([tb]), np.array([gb]))[0, 0]
    assert closed == pytest.approx(numeric, rel=1e-8)


def test_reconstructing_a_tracked_profile_gives_that_profile():
    gammas = [sigma_rel_to_gamma(0.05), sigma_rel_to_gamma(0.10)]
    times = [256.0, 512.0, 768.0, 1024.0]
    t_in = [t for t in times for _ in gammas]
    g_in = [g for _ in times for g in gammas]
    for j in range(len(t_in)):
        x, residual = solve_posthoc_coefficients(t_in, g_in, [t_in[j]], [g_in[j]])
        expected = np.zeros(len(t_in))
        expected[j] = 1.0
        np.testing.assert_allclose(x[:, 0], expected, atol=1e-8)
        assert residual[0] < 1e-6


class _Vector(torch.nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.theta = torch.nn.Parameter(torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("constant", torch.arange(3.0))


def test_power_ema_update_gives_the_profile_weights():
    """θ_k = e_k (a one-hot trajectory): the EMA after n steps *is* the weight vector, which must equal
    (k^(γ+1) − (k−1)^(γ+1)) / n^(γ+1), the profile integrated over step k."""
    n, batch = 50, 4
    model = _Vector(n)
    ema = PowerFunctionEMA(model, [0.05, 0.15])
    for k in range(1, n + 1):
        with torch.no_grad():
            model.theta.zero_()
            model.theta[k - 1] = 1.0
        ema.update(model, cur_nimg=k * batch, batch_size=batch)
    ks = np.arange(1, n + 1, dtype=np.float64)
    for profile, gamma in zip(ema.profiles, ema.gammas):
        expected = (ks ** (gamma + 1) - (ks - 1) ** (gamma + 1)) / n ** (gamma + 1)
        np.testing.assert_allclose(profile.theta.detach().numpy(), expected, rtol=1e-10, atol=1e-14)


def _random_walk_run(tmp_path, dtype: str, steps: int = 2000, every: int = 100, batch: int = 8):
    """Track σ_rel 0.05 and 0.10 (snapshots every ``every`` steps) and, directly, 0.08 along one random walk."""
    torch.manual_seed(0)
    dim = 256
    model = _Vector(dim)
    tracked = PowerFunctionEMA(model, [0.05, 0.10])
    direct = PowerFunctionEMA(model, [0.08])
    for k in range(1, steps + 1):
        with torch.no_grad():
            model.theta.add_(torch.randn(dim, dtype=torch.float64))
        tracked.update(model, k * batch, batch)
        direct.update(model, k * batch, batch)
        if k % every == 0:
            tracked.save_snapshots(tmp_path, k * batch, k, batch, dtype, config={"note": "test"},
                                   geometry={"img_resolution": 1})
    return tracked, direct, steps * batch


def test_reconstruction_matches_a_directly_tracked_ema(tmp_path):
    """A third length (σ_rel 0.08) reconstructed from two tracked profiles' 20 snapshots of a 2000-step random walk
    equals the EMA tracked directly to ~1e-3 of the gap between the two tracked EMAs.

    Why the error is small: the reconstruction's weights over the steps are the least-squares fit of the 0.08
    profile by the 40 snapshot profiles (relative L² residual ~1e-3 here, printed by the solver as fit_residual), and
    the EMA difference is that residual weight function applied to the trajectory. Finite-precision storage adds
    nothing with fp32 snapshots of a float64 run beyond float32 rounding.
    """
    tracked, direct, n = _random_walk_run(tmp_path, "fp32")
    assert len(list_snapshots(tmp_path)) == 40
    (state,), info = reconstruct(tmp_path, [0.08])
    assert info["at_nimg"] == n and info["num_snapshots"] == 40
    rec = state["theta"].double()
    ref = direct.profiles[0].theta.detach()
    gap = (tracked.profiles[0].theta - tracked.profiles[1].theta).norm()
    err = (rec - ref).norm() / gap
    assert err < 5e-3, (float(err), info["fit_residual"])
    assert info["fit_residual"][0] < 5e-3
    # The reconstruction is much closer to the direct 0.08 EMA than either tracked EMA is.
    assert (rec - ref).norm() < 0.02 * min((p.theta.detach() - ref).norm() for p in tracked.profiles)
    # Buffers come from the newest snapshot, not averaged.
    assert torch.equal(state["constant"], torch.arange(3.0))
    # A tracked length is reproduced exactly (up to the float32 storage of the snapshots).
    (state05,), _ = reconstruct(tmp_path, [0.05])
    np.testing.assert_allclose(state05["theta"].double(), tracked.profiles[0].theta.detach(), rtol=1e-6)


def test_fp16_snapshots_add_only_rounding_error(tmp_path):
    tracked, direct, n = _random_walk_run(tmp_path, "fp16", steps=400, every=50)
    snap = load_snapshot(list_snapshots(tmp_path)[-1].path)
    assert snap["params"]["theta"].dtype == torch.float16 and snap["dtype"] == "fp16"
    (state,), info = reconstruct(tmp_path, [0.05])
    # fp16 keeps 11 significant bits: relative rounding error ≤ 2^-11 per stored value.
    exact = tracked.profiles[0].theta.detach()
    assert ((state["theta"].double() - exact).abs() <= exact.abs() * 2.0**-11 + 1e-6).all()


def test_reconstruction_at_an_earlier_time_uses_only_earlier_snapshots(tmp_path):
    _random_walk_run(tmp_path, "fp32", steps=400, every=100)
    (_,), info = reconstruct(tmp_path, [0.07], at_nimg=250 * 8)
    assert info["at_nimg"] == 200 * 8 and info["num_snapshots"] == 4
    with pytest.raises(ValueError, match="no EMA snapshot at or before"):
        reconstruct(tmp_path, [0.07], at_nimg=10)
    with pytest.raises(FileNotFoundError, match="train.ema=power"):
        reconstruct(tmp_path / "nothing", [0.07])


def test_ema_choice_parses_the_entry_points_ema_key():
    assert ema_choice(True).use_ema and not ema_choice(True).posthoc
    assert not ema_choice(False).use_ema
    choice = ema_choice({"sigma_rel": 0.08, "at_kimg": 100, "sigma_rels": None})
    assert choice.posthoc and choice.sigma_rel == 0.08 and choice.at_kimg == 100.0
    assert ema_choice({"sigma_rel": None, "at_kimg": None}).use_ema
    assert ema_choice({"sigma_rels": [0.05, 0.1]}).sigma_rels == (0.05, 0.1)
    with pytest.raises(ValueError, match="unknown key"):
        ema_choice({"sigma": 0.1})
    with pytest.raises(ValueError, match="sigma_rel must be in"):
        ema_choice({"sigma_rel": 0.5})
    assert math.isclose(sigma_rel_to_gamma(ema_choice({"sigma_rel": 0.13}).sigma_rel), 4.6036, abs_tol=1e-3)


def test_posthoc_evaluation_and_ema_sweep(tmp_path):
    """evaluate.py ckpt=<run> ema.sigma_rel= and ema_sweep=: a tracked σ_rel rebuilt from fp32 snapshots evaluates
    like the checkpoint's own EMA (the same profile), the sweep writes its table, plot and one line per σ_rel, and a
    rerun evaluates nothing again."""
    from evaluation.run import run_evaluation
    from tests.helpers import FAST_TRAIN, compose
    from training.trainer import train

    run = tmp_path / "sweep" / "run"
    train(compose("train", [f"run_dir={run}", *FAST_TRAIN, "train.ema=power", "train.ema_snapshot_kimg=0.064",
                            "train.ema_snapshot_dtype=fp32"]))
    assert len(list_snapshots(run)) == 8  # 4 times x 2 profiles
    common = ["device=cpu", "eval.num_samples=32", "eval.batch=32", "sampler.num_steps=3",
              f"eval.cache_dir={tmp_path / 'cache'}"]
    posthoc = run_evaluation(compose("evaluate", [f"ckpt={run}", "ema.sigma_rel=0.05", *common]))
    tracked = run_evaluation(compose("evaluate", [f"ckpt={run}", *common]))
    assert posthoc["ema"]["sigma_rel"] == 0.05 and posthoc["ema"]["fit_residual"] < 1e-6
    assert (run / "eval-default-phema0.05.json").is_file() and (run / "eval-default.json").is_file()
    key = next(iter(tracked["metrics"]))
    assert posthoc["metrics"][key] == pytest.approx(tracked["metrics"][key], rel=1e-4)
    with pytest.raises(ValueError, match="ema.sigma_rel= reconstructs a post-hoc EMA of one run"):
        run_evaluation(compose("evaluate", [f"run_dir={run}", "ema.sigma_rel=0.05", *common]))

    sweep = compose("evaluate", [f"ema_sweep={tmp_path / 'sweep'}", "ema.sigma_rels=[0.05,0.12]", *common])
    summary = run_evaluation(sweep)
    points = summary["runs"]["run"]["points"]
    assert [s for s, _ in points] == [0.05, 0.12]
    assert points[0][1] == pytest.approx(tracked["metrics"][key], rel=1e-4)
    assert summary["runs"]["run"]["best_sigma_rel"] in (0.05, 0.12)
    assert (run / "ema_sweep.md").is_file() and (run / "ema_sweep.png").is_file()
    assert "| 0.12 | 5.254 |" in (run / "ema_sweep.md").read_text()
    lines = (run / "ema_sweep.jsonl").read_text().splitlines()
    assert len(lines) == 2
    run_evaluation(sweep)  # nothing new to evaluate
    assert len((run / "ema_sweep.jsonl").read_text().splitlines()) == 2
    # A directory of runs: each run at its own best length, and the directory's summary of them.
    shutil.copytree(run, tmp_path / "sweep" / "copy", ignore=shutil.ignore_patterns("ema_sweep*"))
    summary = run_evaluation(sweep)
    assert set(summary["runs"]) == {"run", "copy"}
    assert summary["runs"]["copy"]["points"] == points  # the same snapshots give the same numbers
    table = (tmp_path / "sweep" / "ema_sweep.md").read_text()
    assert "| copy | 0.256 |" in table and "| run | 0.256 |" in table
    assert (tmp_path / "sweep" / "ema_sweep.png").is_file()
    with pytest.raises(ValueError, match="ema_sweep needs the EMA lengths"):
        run_evaluation(compose("evaluate", [f"ema_sweep={run}", *common]))
