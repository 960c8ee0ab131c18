"""On a CUDA GPU: mixed precision, channels_last, the compiled step, a step with no host synchronisation, nonfinite=skip
on the device, and exact RNG continuation on resume (marker ``gpu``: skipped without CUDA; ``benchmarks/gpu_check.sh``
runs them). Plus the CPU test that ``benchmarks/gpu_check.sh --cpu --quick`` works and writes its report (CI).
"""

from __future__ import annotations

import datetime
import os
import subprocess
import warnings

import pytest
import torch

from tests.helpers import FAST_TRAIN, ROOT, compose
from training.checkpoint import list_checkpoints, load_checkpoint
from training.distributed import init_distributed
from training.trainer import Trainer, train

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

GPU_TRAIN = [*FAST_TRAIN, "device=cuda"]


def _trainer(tmp_path, *overrides):
    cfg = compose("train", [f"run_dir={tmp_path}", *GPU_TRAIN, *overrides])
    trainer = Trainer(cfg, init_distributed("cuda"))
    trainer.build_optimisation()
    torch.manual_seed(0)
    return trainer


def _losses(trainer, steps=4):
    batches = trainer.data_stream()
    out = []
    for _ in range(steps):
        stats = trainer.train_step(batches)
        out.append(float(stats["loss_sum"]))
    return out


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.gpu
@needs_cuda
def test_mixed_precision_step_is_finite_and_close_to_fp32(tmp_path, precision):
    reference = _losses(_trainer(tmp_path / "fp32"), steps=1)[0]
    trainer = _trainer(tmp_path / precision, f"train.precision={precision}")
    losses = _losses(trainer)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[0] == pytest.approx(reference, rel=0.05)  # the same first batch, σ and noise, weights
    if precision == "fp16":
        assert trainer.scaler.is_enabled() and trainer.scaler.get_scale() > 0


@pytest.mark.gpu
@needs_cuda
def test_channels_last_gives_the_same_loss(tmp_path):
    a = _losses(_trainer(tmp_path / "a", "train.channels_last=false"), steps=2)
    b = _losses(_trainer(tmp_path / "b", "train.channels_last=true"), steps=2)
    assert a == pytest.approx(b, rel=1e-3)


@pytest.mark.gpu
@needs_cuda
def test_compiled_step_has_no_graph_break_and_matches_eager(tmp_path):
    """train.compile=true with the default inductor backend on CUDA: one graph, no break, no recompilation."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager = _losses(_trainer(tmp_path / "eager", "train.tf32=false"), steps=1)[0]
    trainer = _trainer(tmp_path / "compiled", "train.compile=true", "train.tf32=false")
    compiled = _losses(trainer, steps=4)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1
    assert compiled[0] == pytest.approx(eager, rel=1e-3)
    torch._dynamo.reset()


@pytest.mark.gpu
@needs_cuda
def test_steady_state_step_never_synchronises_the_host(tmp_path):
    """CUDA's own sync detector (torch.cuda.set_sync_debug_mode) over everything between boundaries, from the third
    step on (the first ones choose cuDNN algorithms and allocate)."""
    cfg = compose("train", [f"run_dir={tmp_path}", *GPU_TRAIN, "train.total_kimg=0.512", "train.tick_kimg=0.256",
                            "train.checkpoint_kimg=0.512"])
    trainer = Trainer(cfg, init_distributed("cuda"))
    original_step, original_boundary = trainer.train_step, trainer._boundary

    def step(batches):
        if trainer.step >= 2:
            torch.cuda.set_sync_debug_mode("warn")
        return original_step(batches)

    def boundary(prev_nimg, stop):
        torch.cuda.set_sync_debug_mode(0)
        return original_boundary(prev_nimg, stop)

    trainer.train_step, trainer._boundary = step, boundary
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            trainer.run(tmp_path)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    assert not syncs, f"{len(syncs)} synchronising CUDA calls between boundaries, e.g. {syncs[:3]}"
    assert load_checkpoint(tmp_path)["progress"]["step"] == 16


@pytest.mark.gpu
@needs_cuda
def test_skip_mode_on_cuda_skips_on_the_device(tmp_path):
    """nonfinite=skip with the fused Adam of CUDA: NaN steps leave the weights untouched (found_inf in the kernel),
    and are reported at the next boundary."""
    cfg = compose("train", [f"run_dir={tmp_path}", *GPU_TRAIN, "train.total_kimg=0.256", "train.tick_kimg=0.064",
                            "train.checkpoint_kimg=0.064", "train.keep_checkpoints=0", "train.nonfinite=skip"])
    trainer = Trainer(cfg, init_distributed("cuda"))
    calls = {"n": 0}

    def nan_from_third(module, args, output):
        calls["n"] += 1
        return output * float("nan") if calls["n"] > 2 else output

    trainer.denoiser.net.register_forward_hook(nan_from_third)
    trainer.run(tmp_path)
    assert trainer.skipped_steps == 6  # steps 3..8 of 8
    first, last = (load_checkpoint(p)["net"] for p in (list_checkpoints(tmp_path)[0], list_checkpoints(tmp_path)[-1]))
    assert all(torch.equal(first[k], last[k]) for k in first)  # after step 2 == after step 8


@pytest.mark.gpu
@needs_cuda
def test_resume_continues_the_cuda_random_streams_exactly(tmp_path):
    """A run stopped and resumed draws the same σ and noise as an uninterrupted one: the generator states at the end
    are identical, and the weights agree up to cuDNN's non-deterministic reductions."""
    full, split = tmp_path / "full", tmp_path / "split"
    train(compose("train", [f"run_dir={full}", *GPU_TRAIN]))
    train(compose("train", [f"run_dir={split}", *GPU_TRAIN, "train.total_kimg=0.128"]))
    train(compose("train", [f"run_dir={split}", *GPU_TRAIN, "resume=auto"]))
    a, b = load_checkpoint(full), load_checkpoint(split)
    assert a["progress"] == b["progress"]
    for key in a["rng"][0]:
        assert _same_state(a["rng"][0][key], b["rng"][0][key]), f"RNG state '{key}' differs after resume"
    worst = max(float((a["net"][k].double() - b["net"][k].double()).abs().max()) for k in a["net"])
    assert worst < 1e-4


def _same_state(x, y) -> bool:
    if torch.is_tensor(x):
        return torch.equal(x, y)
    if isinstance(x, (list, tuple)):
        return len(x) == len(y) and all(_same_state(u, v) for u, v in zip(x, y))
    if isinstance(x, dict):
        return x.keys() == y.keys() and all(_same_state(x[k], y[k]) for k in x)
    return x == y


@pytest.mark.slow  # about a minute on 2 cores: every section at tiny sizes
def test_gpu_check_script_runs_on_cpu_and_writes_its_report(tmp_path):
    """What CI can check of the GPU script: ``--cpu --quick`` runs every section (tiny sizes, gloo) and writes the
    report with all five sections and a table in each measured one."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--cpu", "--quick", "--out",
                           str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = tmp_path / f"gpu-{datetime.date.today().isoformat()}.md"
    text = report.read_text()
    for section in ("## 1. Environment", "## 2. GPU tests", "## 3. Training step", "## 4. torchrun",
                    "## 5. Sampler"):
        assert section in text, section
    assert "| ddpmpp | fp32 | no |" in text and "| dit_xl2 | bf16 | yes" in text  # every model, all three rows
    assert "resumed from" in text and "samples.npz" in text  # train, checkpoint, resume, sample
    assert "img/s at 35 NFE" in text
    assert "FAILED" not in text, text[-3000:]
