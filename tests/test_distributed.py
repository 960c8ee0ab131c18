"""Data parallelism and precision: results must not depend on how the global batch is split.

The training loop draws σ, the noise and the label-dropout decisions for the whole global batch from one generator
that is identical on every rank, and each (rank, accumulation round) uses its slice — so 2 processes x 16, 1 process
x 4 rounds x 8 and 1 process x 32 are the same computation, up to the order of floating-point sums.
"""

from __future__ import annotations

import torch

from tests.helpers import FAST_TRAIN, compose, run_cli
from training.checkpoint import load_checkpoint
from training.trainer import train

# After 8 Adam steps from the same start, parameters that differ only by float32 summation order agree to ~1e-6
# (Adam normalises the update, so a relative gradient difference of 1e-7 moves a weight by ≲ lr·1e-7·steps). 1e-4 is a
# bound 100x above that and far below the size of an Adam step (lr = 1e-3), which any real divergence would show.
PARAM_ATOL = 1e-4


def _final_params(run_dir):
    return load_checkpoint(run_dir)["net"]


def _assert_close_params(a, b, atol=PARAM_ATOL):
    assert a.keys() == b.keys()
    worst = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
    assert worst < atol, f"parameters differ by up to {worst}"
    return worst


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    cfg_a = compose("train", [f"run_dir={tmp_path / 'one'}", *FAST_TRAIN])
    cfg_b = compose("train", [f"run_dir={tmp_path / 'acc'}", *FAST_TRAIN, "train.batch_gpu=8"])
    train(cfg_a)
    train(cfg_b)
    _assert_close_params(_final_params(tmp_path / "one"), _final_params(tmp_path / "acc"))


def test_two_process_ddp_equals_single_process(tmp_path):
    import sys

    single, ddp = tmp_path / "single", tmp_path / "ddp"
    run_cli("train.py", f"run_dir={single}", *FAST_TRAIN, "device=cpu")
    proc = run_cli_torchrun(["train.py", f"run_dir={ddp}", *FAST_TRAIN, "device=cpu"], sys.executable)
    a, b = load_checkpoint(single), load_checkpoint(ddp)
    assert a["progress"] == b["progress"]
    assert len(b["rng"]) == 2  # one RNG state per process
    _assert_close_params(a["net"], b["net"])
    _assert_close_params(a["ema"], b["ema"])
    # Only rank 0 writes: one metrics line per tick, exactly as the single process.
    lines = (ddp / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len((single / "metrics.jsonl").read_text().splitlines()), proc.stdout


def run_cli_torchrun(args, python):
    import os
    import subprocess

    from tests.helpers import ROOT

    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "1"}
    cmd = [python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    if proc.returncode != 0:
        raise AssertionError(f"torchrun failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def test_bf16_autocast_loss_close_to_fp32():
    """bf16 autocast on CPU runs, and the loss of one batch is within bf16's precision of the fp32 loss."""
    from data import build_dataset, to_model_space
    from diffusion.loss import DenoisingLoss
    from diffusion.schedules import build_schedule
    from diffusion.weighting import build_weighting
    from training.denoiser import build_denoiser

    cfg = compose("train", [])
    data = build_dataset(cfg.data)
    images = to_model_space(torch.stack([data[i][0] for i in range(32)]))
    torch.manual_seed(0)
    denoiser = build_denoiser(cfg, img_resolution=8, img_channels=1)
    # Give the output layers real weights (they start at ~1e-5) so the network output matters.
    with torch.no_grad():
        for p in denoiser.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    loss_fn = DenoisingLoss(build_schedule(cfg.schedule), build_weighting(cfg.weighting))
    sigma, noise = loss_fn.draw(32, (1, 8, 8), "cpu", torch.Generator().manual_seed(1))
    with torch.no_grad():
        fp32 = loss_fn(denoiser, images, sigma=sigma, noise=noise).loss.mean()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = loss_fn(denoiser, images, sigma=sigma, noise=noise).loss.mean()
    assert bf16.dtype == torch.float32  # the loss itself stays in fp32
    # bf16 has an 8-bit mantissa (relative precision 2^-8 ≈ 0.4%); through a few layers the loss moves by ~1%.
    assert abs(float(bf16) / float(fp32) - 1) < 0.05, (float(fp32), float(bf16))
    assert float(bf16) != float(fp32)  # autocast really ran in bf16


def test_bf16_training_runs(tmp_path):
    cfg = compose("train", [f"run_dir={tmp_path}", *FAST_TRAIN, "train.precision=bf16"])
    train(cfg)
    state = load_checkpoint(tmp_path)
    assert all(torch.isfinite(v).all() for v in state["net"].values())


def test_submitit_launcher_config_composes():
    cfg = compose("train", ["hydra/launcher=submitit_slurm"])
    assert cfg.train.batch > 0  # the job config is unaffected by the launcher choice
    proc = run_cli("train.py", "hydra/launcher=submitit_slurm", "--cfg", "hydra")
    assert "submitit" in proc.stdout and "SlurmLauncher" in proc.stdout
