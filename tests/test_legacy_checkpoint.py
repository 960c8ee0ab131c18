"""Checkpoints written before the ``training/`` and ``evaluation/`` packages existed still load, resume bit-exactly
and sample (tests/fixtures/legacy_run/README.md says how the fixture was made, and by which commit).

Independent reference: the fixture's own run continued to 256 images with the old code (``final_256.safetensors``);
resuming its first checkpoint with today's code must give the same weights to the last bit.
"""

from __future__ import annotations

import shutil

import numpy as np
import torch
from safetensors.torch import load_file

from tests.helpers import ROOT, run_cli
from training.checkpoint import load_checkpoint, load_denoiser

FIXTURE = ROOT / "tests" / "fixtures" / "legacy_run"
# The command that made the fixture (its README), minus run_dir.
FIXTURE_OVERRIDES = [
    "train.batch=32", "train.total_kimg=0.256", "train.tick_kimg=0.128", "train.snapshot_kimg=0",
    "train.checkpoint_kimg=0.128", "train.lr_rampup_kimg=0", "train.grid_seeds=0", "model.model_channels=8",
    "model.num_blocks=1", "schedule=infonoise", "schedule.refresh_every=2", "schedule.min_count=1",
    "schedule.warmup_steps=2", "train.keep_checkpoints=0",
]


def _copy_fixture(tmp_path):
    run = tmp_path / "legacy_run"
    shutil.copytree(FIXTURE / "checkpoints", run / "checkpoints")
    shutil.copy(FIXTURE / "config.yaml", run / "config.yaml")
    return run


def test_legacy_checkpoint_loads_and_builds_its_denoiser():
    state = load_checkpoint(FIXTURE / "checkpoints" / "checkpoint-0000000128.pt")
    assert state["progress"]["cur_nimg"] == 128 and state["config"]["schedule"]["name"] == "infonoise"
    denoiser, cfg = load_denoiser(FIXTURE / "checkpoints" / "checkpoint-0000000128.pt", ema=True)
    assert (denoiser.img_resolution, denoiser.img_channels) == (8, 1)
    for name, tensor in denoiser.state_dict().items():
        assert torch.equal(tensor, state["ema"][name]), name


def test_legacy_checkpoint_resumes_bit_exactly(tmp_path):
    run = _copy_fixture(tmp_path)
    run_cli("train.py", f"run_dir={run}", "resume=auto", *FIXTURE_OVERRIDES)
    final = load_checkpoint(run / "checkpoints" / "checkpoint-0000000256.pt")
    assert final["progress"]["cur_nimg"] == 256 and final["progress"]["step"] == 8
    expected = load_file(str(FIXTURE / "final_256.safetensors"))
    for key in ("net", "ema"):
        for name, tensor in final[key].items():
            assert torch.equal(tensor, expected[f"{key}.{name}"]), f"{key}.{name} differs from the old code's run"


def test_legacy_checkpoint_samples(tmp_path):
    run = _copy_fixture(tmp_path)
    out = tmp_path / "samples"
    run_cli("sample.py", f"ckpt={run}", "seeds=0-7", "sampler.num_steps=4", f"out={out}", "write_pngs=false")
    with np.load(out / "samples.npz") as f:
        samples, seeds = f["samples"], f["seeds"]
    assert samples.shape == (8, 8, 8, 1) and samples.dtype == np.uint8
    assert seeds.tolist() == list(range(8))
    assert samples.std() > 0  # not a constant image
