"""The training loop end to end on the embedded digits: loss goes down, resume is exact, the CLI works."""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import FAST_TRAIN, compose, run_cli
from training.checkpoint import list_checkpoints, load_checkpoint
from training.trainer import train


def _train(run_dir, *overrides, **hooks):
    cfg = compose("train", [f"run_dir={run_dir}", *FAST_TRAIN, *overrides])
    train(cfg, **hooks)
    return cfg


def test_resume_is_exact(tmp_path):
    """Stop after half the budget, resume with resume=auto: the final weights equal an uninterrupted run's."""
    full, split = tmp_path / "full", tmp_path / "split"
    _train(full)
    _train(split, "train.total_kimg=0.128")
    assert [p.name for p in list_checkpoints(split)] == ["checkpoint-0000000128.pt"]
    _train(split, "resume=auto")
    a, b = load_checkpoint(full), load_checkpoint(split)
    assert a["progress"] == b["progress"] == {"cur_nimg": 256, "step": 8, "skipped_steps": 0}
    for key in ("net", "ema"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name} differs after resume"
    for name, tensor in a["optimizer"]["state"].items():
        assert all(torch.equal(v, b["optimizer"]["state"][name][k]) for k, v in tensor.items())


def test_resume_refuses_a_different_experiment(tmp_path):
    _train(tmp_path, "train.total_kimg=0.128")
    with pytest.raises(ValueError, match=r"schedule.p_mean: -1.2 \(checkpoint\) != -0.4 \(now\)"):
        _train(tmp_path, "resume=auto", "schedule.p_mean=-0.4")


@pytest.mark.slow
def test_loss_decreases_on_digits(tmp_path):
    cfg = compose("train", [f"run_dir={tmp_path}", "train.batch=64", "train.total_kimg=19.2", "train.tick_kimg=3.2",
                            "train.snapshot_kimg=0", "train.checkpoint_kimg=0", "train.lr_rampup_kimg=1",
                            "train.grid_seeds=0"])
    train(cfg)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 6
    # At initialisation EDM's preconditioning gives a weighted loss of ~1 per dimension (unit-variance target);
    # 300 steps of training must cut it by at least a third.
    assert losses[-1] < 0.67 * losses[0], losses


def test_cli_train_then_sample(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli("train.py", f"run_dir={run_dir}", *FAST_TRAIN, "train.grid_seeds=16", "train.snapshot_kimg=0.256")
    assert "done: 0.3 kimg" in proc.stdout + proc.stderr or (run_dir / "checkpoints").is_dir()
    assert (run_dir / "config.yaml").is_file() and (run_dir / "samples" / "grid-000000kimg.png").is_file()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["kimg"] for r in records] == [0.128, 0.256]
    run_cli("sample.py", f"ckpt={run_dir}", "seeds=0-5", f"out={tmp_path / 'samples'}", "sampler.num_steps=4")
    import numpy as np

    with np.load(tmp_path / "samples" / "samples.npz") as f:
        assert f["samples"].shape == (6, 8, 8, 1) and f["samples"].dtype == np.uint8
    assert len(list((tmp_path / "samples" / "images").glob("*.png"))) == 6


def test_dry_run_prints_parameter_count(tmp_path):
    proc = run_cli("train.py", "dry_run=true", f"run_dir={tmp_path}")
    out = proc.stdout
    from models import count_parameters
    from training.denoiser import build_denoiser

    cfg = compose("train", [])
    expected = count_parameters(build_denoiser(cfg, img_resolution=8, img_channels=1))
    assert f"parameters: {expected}" in out
    assert "schedule: LogNormal(p_mean=-1.2, p_std=1.2)" in out


@pytest.mark.parametrize("override,message", [
    ("train.batch=0", "train.batch: must be a positive integer"),
    ("train.batch_gpu=5", "train.batch_gpu: 5 must divide the per-process batch 128"),
    ("train.label_dropout=0.1", "train.label_dropout: label dropout needs a class-conditional model"),
    ("schedule=nope", "Could not find 'schedule/nope'"),
    ("schedule.p_std=-1", "schedule.p_std must be > 0"),
    ("model.embedding_type=wavelet", "embedding_type"),
])
def test_bad_config_values_fail_fast_with_clear_errors(tmp_path, override, message):
    proc = run_cli("train.py", f"run_dir={tmp_path}", override, check=False)
    assert proc.returncode != 0
    assert message in proc.stdout + proc.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_periodic_evaluation_is_logged_and_keeps_resume_exact(tmp_path):
    """eval.every_kimg logs the classifier-FID to metrics.jsonl, and evaluating does not perturb training."""
    evaluated, plain = tmp_path / "evaluated", tmp_path / "plain"
    from evaluation.protocol import evaluate_during_training  # the hook train.py wires into the Trainer

    extra = ["eval.every_kimg=0.128", "eval.num_samples_during_training=50", "sampler.num_steps=4"]
    _train(evaluated, *extra, evaluate_fn=evaluate_during_training)
    _train(plain)
    records = [json.loads(line) for line in (evaluated / "metrics.jsonl").read_text().splitlines()]
    fids = [r["eval/fid_digits_classifier"] for r in records if "eval/fid_digits_classifier" in r]
    assert len(fids) == 2 and all(f > 0 for f in fids)
    a, b = load_checkpoint(evaluated), load_checkpoint(plain)
    assert all(torch.equal(a["net"][k], b["net"][k]) for k in a["net"])


def test_periodic_evaluation_needs_its_hook(tmp_path):
    """training/ cannot import evaluation/: without the hook that train.py passes, eval.every_kimg fails fast."""
    with pytest.raises(ValueError, match="eval.every_kimg=0.128 asks for evaluation during training"):
        _train(tmp_path, "eval.every_kimg=0.128")
    assert not (tmp_path / "checkpoints").exists()


def test_the_entry_point_wires_the_evaluation_hooks():
    """train.py hands the Trainer evaluation's protocol and its preflight (only when eval.every_kimg asks for them)
    and the InfoNoise profile figure."""
    import train as entry
    from evaluation.infonoise_report import plot_infonoise_profile
    from evaluation.protocol import evaluate_during_training, preflight_during_training

    assert entry.hooks(compose("train", [])) == {"plot_profile": plot_infonoise_profile}
    assert entry.hooks(compose("train", ["eval.every_kimg=10"])) == {
        "plot_profile": plot_infonoise_profile, "evaluate_fn": evaluate_during_training,
        "preflight": preflight_during_training}


def test_a_failing_evaluation_is_logged_and_training_goes_on(tmp_path):
    """An evaluation that raises (offline Inception, a bug) is logged with its kimg; the run still finishes, with the
    same weights as a run without evaluation."""
    calls = []

    def broken(model, cfg, dataset, device, kimg):
        calls.append(kimg)
        raise RuntimeError("Inception weights unavailable (simulated)")

    _train(tmp_path / "broken", "eval.every_kimg=0.128", evaluate_fn=broken)
    _train(tmp_path / "plain")
    records = [json.loads(line) for line in (tmp_path / "broken" / "metrics.jsonl").read_text().splitlines()]
    errors = [r for r in records if "eval/error" in r]
    assert calls == [0.128, 0.256]
    assert [(r["kimg"], r["step"]) for r in errors] == [(0.128, 4), (0.256, 8)]
    assert all(r["eval/error"] == "RuntimeError: Inception weights unavailable (simulated)" for r in errors)
    a, b = load_checkpoint(tmp_path / "broken"), load_checkpoint(tmp_path / "plain")
    assert a["progress"]["cur_nimg"] == 256
    assert all(torch.equal(a["net"][k], b["net"][k]) for k in a["net"])


def test_the_evaluation_preflight_stops_a_run_before_its_first_step(tmp_path):
    """eval.every_kimg with a weights file that does not exist: the run stops at start-up, naming the file, before
    any training step or checkpoint, and the periodic evaluation is never reached."""
    from evaluation.protocol import evaluate_during_training, preflight_during_training

    def never(*args):
        raise AssertionError("evaluation reached")

    with pytest.raises(ValueError, match=r"eval.every_kimg=0.128: the evaluation during training cannot run "
                                         r"\(FileNotFoundError: eval.feature_extractor_weights_path=/nonexistent/"):
        _train(tmp_path, "eval.every_kimg=0.128", "eval.feature_extractor=inception-v3-compat",
               "eval.feature_extractor_weights_path=/nonexistent/inception.pth", evaluate_fn=never,
               preflight=preflight_during_training)
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()
    # The same hook accepts a sound evaluation set-up (the digits classifier, trained and cached on first use).
    _train(tmp_path / "ok", "eval.every_kimg=0.256", "eval.num_samples_during_training=20", "sampler.num_steps=2",
           evaluate_fn=evaluate_during_training, preflight=preflight_during_training)
    assert (tmp_path / "ok" / "checkpoints").is_dir()
