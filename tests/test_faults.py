"""Faults injected for real: a killed run resumes exactly, SIGTERM checkpoints cleanly, NaNs are caught and named,
bad config values fail before any work."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.helpers import FAST_TRAIN, ROOT, compose, run_cli
from training.checkpoint import list_checkpoints, load_checkpoint
from training.distributed import init_distributed
from training.trainer import Trainer, train

# 16 steps of 32 images with a checkpoint every 2 steps (64 images).
LONG = [*FAST_TRAIN, "train.total_kimg=0.512", "train.checkpoint_kimg=0.064", "train.tick_kimg=0.064",
        "train.keep_checkpoints=2"]


def _start_training(run_dir, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), f"run_dir={run_dir}", *LONG, *extra],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_checkpoints(run_dir, count, proc, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if len(list_checkpoints(run_dir)) >= count or proc.poll() is not None:
            return
        time.sleep(0.05)
    raise TimeoutError(f"no {count} checkpoints in {run_dir} after {timeout}s")


def test_kill_9_at_a_random_step_then_resume_equals_uninterrupted(tmp_path):
    reference = tmp_path / "reference"
    train(compose("train", [f"run_dir={reference}", *LONG]))

    victim = tmp_path / "victim"
    proc = _start_training(victim)
    kill_after = random.Random(os.getpid()).randint(1, 5)  # checkpoints to wait for before the kill
    _wait_for_checkpoints(victim, kill_after, proc)
    time.sleep(random.Random(os.getpid() + 1).random() * 0.5)  # and somewhere inside a later step
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list_checkpoints(victim), "the killed run left no checkpoint"
    run_cli("train.py", f"run_dir={victim}", *LONG)  # resume=auto is the default

    a, b = load_checkpoint(reference), load_checkpoint(victim)
    assert a["progress"] == b["progress"]
    for key in ("net", "ema"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs after kill -9 + resume"


def test_sigterm_checkpoints_and_exits_cleanly(tmp_path):
    run_dir = tmp_path / "run"
    proc = _start_training(run_dir, "train.total_kimg=100", "train.checkpoint_kimg=1000")
    deadline = time.time() + 120
    while not (run_dir / "metrics.jsonl").exists() and time.time() < deadline:  # wait until training is under way
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "SIGTERM received" in out
    state = load_checkpoint(run_dir)
    steps = state["progress"]["step"]
    assert steps >= 1
    # Resuming continues the step count.
    train(compose("train", [f"run_dir={run_dir}", *LONG, f"train.total_kimg={(steps + 2) * 32 / 1000}",
                            "train.checkpoint_kimg=1000"]))
    assert load_checkpoint(run_dir)["progress"]["step"] == steps + 2


def _nan_after(calls: int):
    """A forward hook on the network that turns its output into NaN from the ``calls``-th call on."""
    count = {"n": 0}

    def hook(module, args, output):
        count["n"] += 1
        return output * float("nan") if count["n"] > calls else output

    return hook


def test_nan_stops_with_step_sigma_and_indices(tmp_path, monkeypatch):
    cfg = compose("train", [f"run_dir={tmp_path}", *LONG])
    trainer = Trainer(cfg, init_distributed("cpu"))
    trainer.denoiser.net.register_forward_hook(_nan_after(5))
    with pytest.raises(FloatingPointError) as info:
        trainer.run(tmp_path)
    message = str(info.value)
    assert "non-finite loss at step 5" in message and "σ in [" in message and "dataset indices (rank 0) [" in message
    # The message names the right images: the indices of step 5 in the sampler's order.
    from data.order import InfiniteSampler

    stream = iter(InfiniteSampler(len(trainer.dataset), seed=0, batch_size_per_rank=32, start=5 * 32))
    expected = [next(stream) for _ in range(32)]
    assert "[" + ", ".join(map(str, expected[:16])) + ", ...]" in message
    # The checkpoints written before the fault are intact and loadable; the run can resume from them.
    assert load_checkpoint(tmp_path)["progress"]["step"] == 4
    train(compose("train", [f"run_dir={tmp_path}", *LONG]))
    assert load_checkpoint(tmp_path)["progress"]["step"] == 16


def test_nan_skip_mode_counts_and_continues(tmp_path):
    cfg = compose("train", [f"run_dir={tmp_path}", *LONG, "train.nonfinite=skip", "train.max_skipped_steps=3"])
    trainer = Trainer(cfg, init_distributed("cpu"))
    trainer.denoiser.net.register_forward_hook(_nan_after(3))  # steps 3, 4, 5, ... produce NaN
    with pytest.raises(FloatingPointError, match="more than train.max_skipped_steps=3"):
        trainer.run(tmp_path)
    assert trainer.skipped_steps == 4  # steps 3..6 skipped, the 4th skip exceeds the limit
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in records if "loss" in r] == [0, 1, 3]
    # Skipped steps left the weights untouched: those of step 3's checkpoint... are the weights at the failure.
    before = load_checkpoint(list_checkpoints(tmp_path)[0])["net"]  # after step 2 (nothing skipped yet)
    after = load_checkpoint(tmp_path)["net"]  # after step 6 (steps 3..6 skipped)
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("override,message", [
    ("train.batch=-4", "train.batch: must be a positive integer, got -4"),
    ("train.total_kimg=0", "train.total_kimg: must be a finite number > 0"),
    ("train.precision=fp8", "train.precision: must be one of fp32, bf16, fp16"),
    ("schedule.sigma_range=[1.0,0.5]", "schedule.sigma_range: need sigma_min < sigma_max, got [1.0, 0.5]"),
    ("schedule=laplace schedule.b=0", "b"),
    ("sampler.num_steps=0", "sampler.num_steps must be an integer >= 1, got 0"),
    ("data.resolution=12", "resolution"),
    ("data.channels=3", "data.channels"),
    ("model.in_channels=3", "in_channels"),
    ("eval.metrics=[fid,nope]", "nope"),
    ("logger=wandb logger.mode=sideways", "logger.mode: must be online, offline or disabled"),
])
def test_each_bad_value_is_one_clear_error_before_any_work(tmp_path, override, message):
    proc = run_cli("train.py", f"run_dir={tmp_path}", *override.split(), check=False)
    assert proc.returncode != 0
    assert message in proc.stderr + proc.stdout, proc.stderr[-2000:]
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()
