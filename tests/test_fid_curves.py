"""Tests of evaluate.py on a real tiny training run: FID-vs-kimg curves, the images-to-target table, distributed
sampling under torchrun, EDM's minimum-of-seeds protocol and the training-time hook.

Independent references: the curve's points recomputed here with training.generate.generate_images + compute_metrics
on the checkpoint's EMA weights; 1-process sampling for the 2-rank run; hand-computed interpolations for the table.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from evaluation import digits_classifier as dc
from evaluation.curves import kimg_to_reach, read_curve, run_curves, target_table
from evaluation.likelihood import likelihood_metrics
from evaluation.metrics import compute_metrics
from evaluation.protocol import evaluate_during_training, reference_getter
from evaluation.run import run_evaluation
from evaluation.settings import DEFAULT_EVAL
from tests.helpers import ROOT, compose, run_cli
from training.checkpoint import list_checkpoints, load_denoiser

KEY = "fid_digits_classifier"
TINY_TRAIN = ["train.batch=32", "train.total_kimg=0.096", "train.tick_kimg=0.032", "train.snapshot_kimg=0",
              "train.checkpoint_kimg=0.032", "train.keep_checkpoints=0", "train.lr_rampup_kimg=0", "train.grid_seeds=0",
              "model.model_channels=8", "model.num_blocks=1", "device=cpu"]
EVAL = ["eval.num_samples=24", "eval.batch=24", "sampler.num_steps=3", "device=cpu"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """An eval cache with the digits classifier already trained (shared by the subprocesses below)."""
    path = tmp_path_factory.mktemp("eval-cache")
    dc.load_or_train_digits_classifier(OmegaConf.load(ROOT / "configs" / "data" / "digits.yaml"), path)
    return path


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    run_cli("train.py", f"run_dir={run_dir}", *TINY_TRAIN, timeout=120)
    assert [p.name for p in list_checkpoints(run_dir)] == [f"checkpoint-{n:010d}.pt" for n in (32, 64, 96)]
    return run_dir


def _expected_fid(ckpt, cache, num_samples=24, first_seed=0):
    """The metric recomputed directly: EMA weights, the run's sampler cut to 3 steps, seeds first..first+N-1."""
    from data import build_dataset
    from training.generate import generate_images

    den, run_cfg = load_denoiser(ckpt)
    sampler = OmegaConf.merge(run_cfg.sampler, {"num_steps": 3})
    images = generate_images(den, range(first_seed, first_seed + num_samples), sampler_cfg=sampler, batch_size=64,
                             device="cpu")
    ref = build_dataset(run_cfg.data, "train")
    return compute_metrics(images, ref, data_cfg=run_cfg.data, eval_cfg={"cache_dir": str(cache)})[KEY]


def test_curve_of_a_tiny_run_is_written_resumed_and_plotted(tiny_run, cache, tmp_path):
    proc = run_cli("evaluate.py", f"run_dir={tiny_run}", f"eval.cache_dir={cache}", *EVAL, timeout=180)
    lines = (tiny_run / "fid_curve.jsonl").read_text().splitlines()
    entries = [json.loads(line) for line in lines]
    assert [e["nimg"] for e in entries] == [32, 64, 96]
    assert [e["kimg"] for e in entries] == [0.032, 0.064, 0.096]
    assert len({e["settings_key"] for e in entries}) == 1 and entries[0]["num_samples"] == 24
    last = entries[-1]["metrics"][KEY]
    assert last == pytest.approx(_expected_fid(list_checkpoints(tiny_run)[-1], cache), rel=1e-6)
    png = (tiny_run / "fid_curve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    table = (tiny_run / "fid_curve.md").read_text()
    assert "| tiny | 3 | 0.096 |" in table and f"{last:.4g}" in table and table in proc.stdout

    # Resumable: the same settings evaluate nothing again; other settings add their own points.
    cfg = compose("evaluate", [f"run_dir={tiny_run}", f"eval.cache_dir={cache}", *EVAL])
    out = run_curves(cfg, [*EVAL])
    assert len((tiny_run / "fid_curve.jsonl").read_text().splitlines()) == 3
    assert [v for _, v in out["runs"]["tiny"]] == [e["metrics"][KEY] for e in entries]
    # A line cut short by a crash is ignored (and its checkpoint would be evaluated again).
    with open(tiny_run / "fid_curve.jsonl", "a") as f:
        f.write('{"run": "tiny", "checkpoint": "checkpoint-00')
    assert len(read_curve(tiny_run)) == 3

    # A sweep: two copies of the run (one of them the baseline) -> both found, identical curves, speed-up 1.00x.
    sweep = tmp_path / "sweep"
    for name in ("lognormal", "other"):
        (sweep / name / "checkpoints").mkdir(parents=True)
        for ckpt in list_checkpoints(tiny_run):
            shutil.copy(ckpt, sweep / name / "checkpoints" / ckpt.name)
    shutil.copy(tiny_run / "fid_curve.jsonl", sweep / "lognormal" / "fid_curve.jsonl")  # already evaluated
    cfg = compose("evaluate", [f"run_dir={sweep}", f"eval.cache_dir={cache}", "eval.baseline_run=lognormal", *EVAL])
    out = run_curves(cfg, [*EVAL])
    assert set(out["runs"]) == {"lognormal", "other"}
    assert out["runs"]["other"] == out["runs"]["lognormal"]
    assert out["summary"]["target"] == pytest.approx(last)  # the baseline's final value
    assert out["summary"]["rows"]["other"]["speedup"] == pytest.approx(1.0)
    assert "1.00x" in out["table"] and (sweep / "fid_curve.png").is_file()


def test_target_table_interpolation_and_speedup():
    curves = {"base": [(10, 40.0), (20, 20.0), (30, 10.0), (40, 8.0)],
              "fast": [(10, 30.0), (20, 12.0), (30, 6.0), (40, 5.0)],
              "slow": [(10, 90.0), (20, 60.0)]}
    table, summary = target_table(curves, metric="fid", target=10.0, baseline="base")
    rows = summary["rows"]
    assert rows["base"]["first_kimg"] == 30 and rows["base"]["kimg"] == pytest.approx(30.0)
    # fast crosses 10 between (20, 12) and (30, 6): log-linear t = ln(12/10)/ln(12/6).
    t = math.log(1.2) / math.log(2.0)
    assert rows["fast"]["first_kimg"] == 30 and rows["fast"]["kimg"] == pytest.approx(20 + 10 * t)
    assert rows["fast"]["speedup"] == pytest.approx(30 / (20 + 10 * t))
    assert rows["slow"]["kimg"] is None and "not reached" in table
    _, lin = target_table(curves, metric="fid", target=10.0, baseline="base", interpolation="linear")
    assert lin["rows"]["fast"]["kimg"] == pytest.approx(20 + 10 * (12 - 10) / (12 - 6))
    _, none = target_table(curves, metric="fid", target=10.0, interpolation="none")
    assert none["rows"]["fast"]["kimg"] == 30 and none["rows"]["fast"]["speedup"] is None
    # Default target: the baseline's final value (InfoNoise's speed-up definition).
    _, default = target_table(curves, metric="fid", baseline="base")
    assert default["target"] == 8.0 and default["rows"]["fast"]["kimg"] < 30
    with pytest.raises(ValueError, match="eval.baseline_run='nope' matches 0 runs; runs: base, fast, slow"):
        target_table(curves, metric="fid", baseline="nope")
    with pytest.raises(ValueError, match="unknown eval.target_interpolation 'cubic'.*loglinear, linear, none"):
        kimg_to_reach(curves["base"], 10.0, "cubic")


def test_two_ranks_sample_the_same_images_as_one(tiny_run, cache, tmp_path):
    """torchrun with 2 gloo ranks: 21 seeds split 11 + 10, gathered; identical to one process; NLL split too."""
    ckpt = list_checkpoints(tiny_run)[-1]
    out = tmp_path / "dist.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    args = [f"ckpt={ckpt}", f"eval.cache_dir={cache}", "eval.num_samples=21", "eval.batch=4", "sampler.num_steps=3",
            "eval.save_samples=true", "eval.metrics=[fid,nll]", "eval.nll_num_images=5", "eval.nll_tolerance=1e-3",
            "device=cpu", f"out={out}"]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "evaluate.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["world_size"] == 2 and record["seeds"] == [0, 20]
    with np.load(record["samples_file"]) as npz:
        two_ranks, seeds = torch.from_numpy(npz["samples"]).permute(0, 3, 1, 2), npz["seeds"]
    assert seeds.tolist() == list(range(21))

    from training.generate import generate_images

    den, run_cfg = load_denoiser(ckpt)
    sampler = OmegaConf.merge(run_cfg.sampler, {"num_steps": 3})
    one_rank = generate_images(den, range(21), sampler_cfg=sampler, batch_size=21, device="cpu")
    assert torch.equal(two_ranks, one_rank)
    # The metrics of the gathered set are those of the one-process set, and the NLL of 5 images split 3 + 2.
    settings = {**DEFAULT_EVAL, "cache_dir": str(cache), "nll_num_images": 5, "nll_tolerance": 1e-3}
    nll, details = likelihood_metrics(den, run_cfg.data, settings, sampler, device="cpu")
    assert record["metrics"]["nll_ode_bpd"] == pytest.approx(nll["nll_ode_bpd"], rel=1e-5)
    assert record["likelihood"]["num_images"] == details["num_images"] == 5
    fid = compute_metrics(one_rank, reference_getter(run_cfg.data, settings)(),
                          data_cfg=run_cfg.data, eval_cfg=settings)[KEY]
    assert record["metrics"][KEY] == pytest.approx(fid, rel=1e-6)


def test_minimum_over_seed_repeats(tiny_run, cache):
    cfg = compose("evaluate", [f"ckpt={tiny_run}", f"eval.cache_dir={cache}", "eval.seed_repeats=3",
                               "eval.num_samples=12", "eval.batch=12", "sampler.num_steps=3", "device=cpu"])
    record = run_evaluation(cfg, ["sampler.num_steps=3"])
    ranges = [r["seeds"] for r in record["repeats"]]
    assert ranges == [[0, 11], [12, 23], [24, 35]]
    values = [r["metrics"][KEY] for r in record["repeats"]]
    assert record["metrics"][KEY] == min(values) and len(set(values)) == 3
    expected = _expected_fid(list_checkpoints(tiny_run)[-1], cache, num_samples=12, first_seed=12)
    assert values[1] == pytest.approx(expected, rel=1e-6)
    assert set(record["columns"]) == {"seeds 0-11", "seeds 12-23", "seeds 24-35", "min of 3"}


def test_evaluate_during_training_restores_state(tiny_run, cache):
    from data import build_dataset

    den, run_cfg = load_denoiser(list_checkpoints(tiny_run)[-1])
    cfg = OmegaConf.merge(run_cfg, {"eval": {"cache_dir": str(cache), "num_samples_during_training": 16,
                                             "batch": 16, "metrics": ["fid", "nll"], "nll_num_images": 2,
                                             "nll_tolerance": 1e-2}, "sampler": {"num_steps": 3}})
    train = build_dataset(cfg.data, "train")
    den.train()
    torch.manual_seed(123)
    np.random.seed(5)  # noqa: NPY002 - the legacy global state is what must survive
    out = evaluate_during_training(den, cfg, train, "cpu", cur_kimg=0.096)
    after = (torch.rand(3), np.random.rand())  # noqa: NPY002
    torch.manual_seed(123)
    np.random.seed(5)  # noqa: NPY002 - the legacy global state is what must survive
    assert torch.equal(after[0], torch.rand(3)) and after[1] == np.random.rand()  # noqa: NPY002 - untouched
    assert den.training  # mode restored
    assert out["kimg"] == 0.096 and out["eval/num_samples"] == 16
    assert set(out) >= {f"eval/{KEY}", "eval/nll_ode_bpd", "eval/nll_ode_bpd_sem", "eval/seconds"}
    assert out[f"eval/{KEY}"] == pytest.approx(_expected_fid(list_checkpoints(tiny_run)[-1], cache, 16), rel=1e-6)


def test_argument_errors(tiny_run, cache, tmp_path):
    with pytest.raises(ValueError, match="exactly one of samples.*run_dir.*ref=true"):
        run_evaluation(compose("evaluate", [f"ckpt={tiny_run}", f"run_dir={tiny_run}"]))
    with pytest.raises(FileNotFoundError, match="run_dir not found"):
        run_evaluation(compose("evaluate", [f"run_dir={tmp_path}/none"]))
    with pytest.raises(ValueError, match="no runs under"):
        run_evaluation(compose("evaluate", [f"run_dir={tmp_path}"]))
    with pytest.raises(ValueError, match="nll, which needs the model"):
        run_evaluation(compose("evaluate", [f"samples={tmp_path}/x.npz", "eval.metrics=[nll]"]))
    with pytest.raises(ValueError, match="eval.seed_repeats needs ckpt"):
        run_evaluation(compose("evaluate", [f"samples={tmp_path}/x.npz", "eval.seed_repeats=3"]))
    with pytest.raises(ValueError, match="eval.curve_metric='kid_x' is not among the evaluated metrics: " + KEY):
        run_curves(compose("evaluate", [f"run_dir={tiny_run}", f"eval.cache_dir={cache}",
                                        "eval.curve_metric=kid_x", *EVAL]), EVAL)
