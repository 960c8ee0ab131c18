"""EDM2's training set-up (Karras et al. 2024, arXiv 2312.02696): the learned uncertainty weighting, the
inverse-square-root learning rate, non-finite gradients zeroed, the presets, and a tiny EDM2 UNet trained end to end
with post-hoc EMA.

Independent references: EDM's loss (u ≡ 0), the closed-form optimum u* = ln(λ·e), EDM2's learning-rate formula
evaluated by hand, EDM2's published parameter counts, a run whose NaN gradient elements were set to 0 by hand, and an
uninterrupted run for the resume.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from configs.validation import ConfigError, validate_train_config
from diffusion.loss import DenoisingLoss
from diffusion.schedules import build_schedule
from diffusion.weighting import EDMWeighting, build_weighting
from models.edm2 import EDM2LogVar
from tests.helpers import CONFIG_DIR, FAST_TRAIN, compose, run_cli
from training.checkpoint import load_checkpoint
from training.denoiser import build_denoiser, build_uncertainty
from training.distributed import init_distributed
from training.posthoc_ema import list_snapshots
from training.step import learning_rate, zero_nonfinite_gradients
from training.trainer import Trainer, train


class _Zero(torch.nn.Module):
    def forward(self, c_noise):
        return torch.zeros_like(c_noise)


def test_uncertainty_weighting_with_u_zero_is_the_edm_loss():
    weighting = build_weighting({"name": "edm2_uncertainty", "sigma_data": 0.5}, uncertainty=_Zero())
    sigma = torch.exp(torch.randn(64, generator=torch.Generator().manual_seed(0)) * 1.2 - 1.2)
    sq_err = torch.rand(64, generator=torch.Generator().manual_seed(1)) * 10
    edm = EDMWeighting(0.5)
    assert torch.equal(weighting.weighted_loss(sigma, sq_err, num_dims=64), edm(sigma) * sq_err)
    assert torch.equal(weighting(sigma), edm(sigma))  # the effective weight λ/e^u that InfoNoise divides by
    # The same through the whole denoising loss, against EDM's weighting on the same draws.
    denoiser = build_denoiser(compose("train", ["model.model_channels=8", "model.num_blocks=1"]),
                              img_resolution=8, img_channels=1)
    images = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    schedule = build_schedule({"name": "lognormal"})
    a = DenoisingLoss(schedule, weighting)(denoiser, images, sigma=sigma[:4], noise=noise)
    b = DenoisingLoss(schedule, edm)(denoiser, images, sigma=sigma[:4], noise=noise)
    assert torch.equal(a.loss, b.loss) and torch.equal(a.mse, b.mse)


def test_learned_u_converges_to_log_lambda_times_error():
    """Train u alone on a synthetic error that is fixed per σ: the optimum of λ/e^u·d·e + d·u is u* = ln(λ·e)."""
    torch.manual_seed(0)
    u_net = EDM2LogVar(128)
    weighting = build_weighting({"name": "edm2_uncertainty", "sigma_data": 0.5}, uncertainty=u_net)
    d, e = 64, math.exp(-2.0)  # d elements per sample, constant per-element error e
    opt = torch.optim.Adam(u_net.parameters(), lr=0.02, betas=(0.9, 0.99))
    gen = torch.Generator().manual_seed(1)
    for _ in range(600):
        sigma = torch.exp(torch.empty(256).uniform_(math.log(0.3), math.log(3.0), generator=gen))
        loss = weighting.weighted_loss(sigma, torch.full_like(sigma, d * e), d).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    u_net.eval()
    sigma = torch.tensor([0.4, 0.7, 1.0, 1.6, 2.5])
    with torch.no_grad():
        u = weighting.log_variance(sigma)
    expected = torch.log(EDMWeighting(0.5)(sigma) * e)  # from 0.82 down to -0.55 over these σ
    assert torch.allclose(u, expected, atol=0.05), (u, expected)


def test_edm2_learning_rate_schedule():
    t = OmegaConf.create({"lr": 0.01, "lr_rampup_kimg": 10, "lr_schedule": "edm2_inv_sqrt", "lr_ref_kimg": 100})
    # By hand: warm-up only below t_ref, then α_ref / √(t / t_ref).
    assert learning_rate(t, 5_000) == pytest.approx(0.01 * 0.5)
    assert learning_rate(t, 100_000) == pytest.approx(0.01)
    assert learning_rate(t, 400_000) == pytest.approx(0.005)
    assert learning_rate(t, 900_000) == pytest.approx(0.01 / 3)
    constant = OmegaConf.create({"lr": 0.01, "lr_rampup_kimg": 10, "lr_schedule": "constant", "lr_ref_kimg": 100})
    assert learning_rate(constant, 900_000) == 0.01
    cfg = compose("train", ["train.lr_schedule=edm2_inv_sqrt"])
    with pytest.raises(ConfigError, match="train.lr_ref_kimg: train.lr_schedule=edm2_inv_sqrt needs t_ref"):
        validate_train_config(cfg)
    with pytest.raises(ConfigError, match="train.lr_schedule: unknown schedule 'cosine'"):
        validate_train_config(compose("train", ["train.lr_schedule=cosine"]))


def test_zero_nonfinite_gradients_in_place():
    p = torch.nn.Parameter(torch.zeros(5))
    p.grad = torch.tensor([1.0, float("nan"), float("inf"), -float("inf"), -2.0])
    zero_nonfinite_gradients([p])
    assert p.grad.tolist() == [1.0, 0.0, 0.0, 0.0, -2.0]


def _poison(steps: set[int], value: float):
    """A gradient hook on one weight that sets its first element to ``value`` at the given (1-based) steps."""
    count = {"n": 0}

    def hook(grad):
        count["n"] += 1
        if count["n"] in steps:
            grad = grad.clone()
            grad.view(-1)[0] = value
        return grad

    return hook


def test_nonfinite_zero_equals_zeroing_by_hand(tmp_path):
    """train.nonfinite=zero with NaN gradient elements gives, bit for bit, the run whose elements were 0 instead."""
    base = [*FAST_TRAIN, "train.checkpoint_kimg=0"]
    finals = []
    for name, value, mode in (("nan", float("nan"), "zero"), ("zero", 0.0, "stop")):
        cfg = compose("train", [f"run_dir={tmp_path / name}", *base, f"train.nonfinite={mode}"])
        trainer = Trainer(cfg, init_distributed("cpu"))
        next(trainer.denoiser.parameters()).register_hook(_poison({2, 3, 5}, value))
        trainer.run(tmp_path / name)
        finals.append(load_checkpoint(tmp_path / name)["net"])
    for key, tensor in finals[0].items():
        assert torch.isfinite(tensor).all(), key
        assert torch.equal(tensor, finals[1][key]), key


EDM2_PUBLISHED = {  # EDM2's published parameter counts (denoiser + u(σ) head), 1000 classes
    "edm2_img512_xxs": 31_309_029, "edm2_img512_xs": 124_713_253, "edm2_img512_s": 280_212_837,
    "edm2_img512_m": 497_807_781, "edm2_img512_l": 777_498_085, "edm2_img512_xl": 1_119_283_749,
    "edm2_img512_xxl": 1_523_164_773, "edm2_img64_s": 280_209_381, "edm2_img64_m": 497_803_173,
    "edm2_img64_l": 777_492_325, "edm2_img64_xl": 1_119_276_837,
}


@pytest.mark.parametrize("preset", sorted(EDM2_PUBLISHED))
def test_edm2_presets_compose_validate_and_build(preset):
    cfg = compose("train", [f"experiment={preset}"])
    validate_train_config(cfg, world_size=32)
    t = cfg.train
    assert (t.batch, t.betas[1], t.lr_schedule, t.ema, t.nonfinite) == (2048, 0.99, "edm2_inv_sqrt", "power", "zero")
    assert t.lr_ref_kimg * 1000 == (70_000 if "img512" in preset else 35_000) * 2048
    assert cfg.weighting.name == "edm2_uncertainty" and cfg.precond.name == "edm"
    assert (cfg.schedule.p_mean, cfg.schedule.p_std) == ((-0.4, 1.0) if "img512" in preset else (-0.8, 1.6))
    latent = "img512" in preset
    with torch.device("meta"):
        denoiser = build_denoiser(cfg, img_resolution=64, img_channels=4 if latent else 3, label_dim=1000)
        u_net = build_uncertainty(cfg)
    count = sum(p.numel() for p in denoiser.parameters()) + sum(p.numel() for p in u_net.parameters())
    assert count == EDM2_PUBLISHED[preset]
    paper = OmegaConf.load(CONFIG_DIR / "experiment" / f"{preset}.yaml").paper
    assert paper.fid is None if preset == "edm2_img512_xxs" else paper.fid > 1


def test_edm2_s_with_infonoise_and_uncertainty_composes_and_trains(tmp_path):
    """`model=edm2_s schedule=infonoise weighting=edm2_uncertainty` is a valid run: the full-size config validates
    and builds (meta device), and the same combination trains at a reduced width, InfoNoise dividing by λ/e^u."""
    overrides = ["model=edm2_s", "schedule=infonoise", "weighting=edm2_uncertainty", "train.ema=power"]
    validate_train_config(compose("train", overrides))
    small = ["model.model_channels=8", "model.channel_mult=[1,2]", "model.num_blocks=1", "model.attn_resolutions=[4]",
             "model.channels_per_head=8", "train.lr=0.01", "schedule.refresh_every=2", "schedule.min_count=1",
             "schedule.warmup_steps=2", "train.ema_snapshot_kimg=0.128"]
    cfg = compose("train", [f"run_dir={tmp_path}", *FAST_TRAIN, *overrides, *small])
    train(cfg)
    state = load_checkpoint(tmp_path)
    assert "uncertainty" in state and state["ema_power"]["sigma_rels"] == [0.05, 0.1]
    assert len(list_snapshots(tmp_path)) == 4  # 2 profiles x (0.128, 0.256 kimg)
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("schedule/pi_q50" in r for r in records)  # InfoNoise rebuilt its table from λ/e^u


@pytest.mark.slow
def test_tiny_edm2_trains_resumes_exactly_and_samples_posthoc(tmp_path):
    """edm2_tiny + edm2_uncertainty + power EMA on the digits: 160 steps lower the error, a run stopped half way and
    resumed equals the uninterrupted one bit for bit (net, u(σ), every EMA profile, optimizer, snapshots), and a
    post-hoc EMA of another length samples."""
    common = ["model=edm2_tiny", "train.lr=0.01", "weighting=edm2_uncertainty", "train.ema=power",
              "train.batch=32", "train.tick_kimg=0.64", "train.snapshot_kimg=0", "train.checkpoint_kimg=2.56",
              "train.lr_rampup_kimg=0", "train.grid_seeds=0", "train.ema_snapshot_kimg=0.64",
              "train.ema_snapshot_dtype=fp32"]
    full, split = tmp_path / "full", tmp_path / "split"
    train(compose("train", [f"run_dir={full}", *common, "train.total_kimg=5.12"]))
    train(compose("train", [f"run_dir={split}", *common, "train.total_kimg=2.56"]))
    train(compose("train", [f"run_dir={split}", *common, "train.total_kimg=5.12"]))
    a, b = load_checkpoint(full), load_checkpoint(split)
    assert a["progress"] == b["progress"] and a["progress"]["step"] == 160
    for key in ("net", "ema", "uncertainty"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name} differs after resume"
    for pa, pb in zip(a["ema_power"]["profiles"], b["ema_power"]["profiles"]):
        assert all(torch.equal(pa[k], pb[k]) for k in pa)
    for name, tensor in a["optimizer"]["state"].items():
        assert all(torch.equal(v, b["optimizer"]["state"][name][k]) for k, v in tensor.items())
    snaps_a, snaps_b = list_snapshots(full), list_snapshots(split)
    assert [s.path.name for s in snaps_a] == [s.path.name for s in snaps_b] and len(snaps_a) == 16
    last_a = torch.load(snaps_a[-1].path, weights_only=True)["params"]
    last_b = torch.load(snaps_b[-1].path, weights_only=True)["params"]
    assert all(torch.equal(last_a[k], last_b[k]) for k in last_a)
    # The unweighted error falls (the weighted loss includes the learned d·u and need not).
    mse = [r["mse"] for r in map(json.loads, (full / "metrics.jsonl").read_text().splitlines()) if "mse" in r]
    assert mse[-1] < 0.7 * mse[0], mse
    out = tmp_path / "phema"
    proc = run_cli("sample.py", f"ckpt={full}", "ema.sigma_rel=0.08", "seeds=0-7", "sampler.num_steps=8",
                   f"out={out}", "write_pngs=false")
    assert "post-hoc EMA σ_rel=0.08" in proc.stdout
    with np.load(out / "samples.npz") as f:
        assert f["samples"].shape == (8, 8, 8, 1) and f["samples"].std() > 0
    assert json.loads((out / "samples.json").read_text())["ema"] == {"sigma_rel": 0.08, "at_kimg": 5.12}


@pytest.mark.slow
def test_two_process_ddp_trains_u_like_one_process(tmp_path):
    """Under DDP the learned u(σ) is outside the DDP module: its gradients are averaged by hand, so 2 processes x 16
    images train it (and the denoiser, and every EMA profile) like 1 process x 32, up to float summation order."""
    import sys

    from tests.test_distributed import PARAM_ATOL, _assert_close_params, run_cli_torchrun

    extra = ["weighting=edm2_uncertainty", "train.ema=power", "train.ema_snapshot_kimg=0.128", "device=cpu"]
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    run_cli("train.py", f"run_dir={single}", *FAST_TRAIN, *extra)
    run_cli_torchrun(["train.py", f"run_dir={ddp}", *FAST_TRAIN, *extra], sys.executable)
    a, b = load_checkpoint(single), load_checkpoint(ddp)
    assert a["progress"] == b["progress"]
    for key in ("net", "ema", "uncertainty"):
        _assert_close_params(a[key], b[key])
    for pa, pb in zip(a["ema_power"]["profiles"], b["ema_power"]["profiles"]):
        _assert_close_params(pa, pb)
    # The u(σ) weights moved from the run's own initialisation (so this is not a comparison of two untouched ones).
    start = Trainer(compose("train", [f"run_dir={tmp_path / 'init'}", *FAST_TRAIN, *extra]), init_distributed("cpu"))
    trained = EDM2LogVar(128)
    trained.load_state_dict(a["uncertainty"])
    c_noise = torch.linspace(-1.5, 1.0, 11)
    with torch.no_grad():
        moved = (trained.eval()(c_noise) - start.uncertainty.eval()(c_noise)).abs().max()
    assert moved > 100 * PARAM_ATOL, float(moved)
    assert len(list_snapshots(ddp)) == len(list_snapshots(single)) == 4
