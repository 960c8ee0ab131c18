"""What a result says about where it comes from (issue 17, items 6 and 11): the result JSON of ``evaluate.py ckpt=``
names the checkpoint file and the training images it had seen, the sample count, the seeds, the sampler and its NFE;
sample.py samples with the run's own sampler (the same images as ``evaluate.py ckpt=`` for the same seeds) and writes
inside the run; ``device=`` reaches the work of ``ref=`` and ``run_dir=``.

Independent references: the checkpoint files written here; the NFE of EDM's samplers in closed form (Heun with N
steps: 2N - 1 network evaluations, the last step being Euler; Euler: N); ``hashlib.sha256`` of the classifier file;
the images of one mode compared array for array with the other's.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from evaluation import curves as curves_module
from evaluation import run as run_module
from evaluation.run import run_evaluation
from tests.helpers import compose, run_cli
from tests.test_eval_preflight import write_run
from training.checkpoint import export_safetensors


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run with two checkpoints (1000 and 1234 images seen) whose sampler is Heun with 4 steps, and the newest
    one's EMA exported as ema.safetensors (as the end of training writes it)."""
    run = tmp_path_factory.mktemp("sweep") / "run"
    write_run(run, ["sampler.num_steps=4"], nimg=1000, step=4)
    newest = write_run(run, ["sampler.num_steps=4"], nimg=1234, step=5)
    export_safetensors(newest, run / "ema.safetensors")
    return run


def _evaluate(args):
    return run_evaluation(compose("evaluate", [*args, "device=cpu"]), args)


@pytest.mark.parametrize("sampler,steps,nfe", [([], 4, 7), (["sampler=euler", "sampler.num_steps=5"], 5, 5)])
def test_the_result_records_checkpoint_count_seeds_sampler_and_nfe(sampler, steps, nfe, run_dir):
    record = _evaluate([f"ckpt={run_dir}", "eval.num_samples=12", "eval.batch=12", "eval.seed=3",
                        "eval.seed_repeats=2", *sampler])
    newest = run_dir / "checkpoints" / "checkpoint-0000001234.pt"
    assert record["ckpt"] == str(run_dir)  # as given
    assert record["checkpoint"] == {"path": str(newest), "cur_nimg": 1234, "kimg": 1.234, "step": 5, "weights": "ema"}
    assert record["num_samples"] == 12 and record["metrics"]["fid_digits_classifier"] > 0
    assert [r["seeds"] for r in record["repeats"]] == [[3, 14], [15, 26]]
    assert [r["num_samples"] for r in record["repeats"]] == [12, 12]
    assert record["seeds"] in ([3, 14], [15, 26])
    assert record["sampler"]["name"] == ("euler" if sampler else "heun")
    assert record["sampler"]["num_steps"] == record["num_steps"] == steps
    assert record["nfe"] == nfe
    weights = record["feature_extractor_weights"]
    with open(weights, "rb") as f:
        assert record["feature_extractor_id"] == "digits-classifier-" + hashlib.sha256(f.read()).hexdigest()[:12]
    assert record["reference"]["num_images"] > 1000
    on_disk = json.loads((run_dir / "eval-default.json").read_text())
    assert on_disk["checkpoint"] == record["checkpoint"] and on_disk["nfe"] == nfe


def test_sample_py_uses_the_runs_sampler_and_writes_inside_the_run(run_dir):
    """sample.py ckpt=<run>/ema.safetensors: the run's 4-step Heun, the same images as evaluate.py ckpt=<run>, written
    to <run>/samples; a command-line sampler key still wins; a checkpoint file's run is two levels up."""
    run_cli("sample.py", f"ckpt={run_dir / 'ema.safetensors'}", "seeds=0-9", "write_pngs=false", "batch=4")
    out = run_dir / "samples"
    meta = json.loads((out / "samples.json").read_text())
    assert (meta["sampler"]["num_steps"], meta["nfe"], meta["cur_nimg"]) == (4, 7, 1234)
    assert not (run_dir.parent / "samples").exists()
    with np.load(out / "samples.npz") as f:
        sampled = f["samples"]
    record = _evaluate([f"ckpt={run_dir}", "eval.num_samples=10", "eval.batch=10", "eval.save_samples=true"])
    with np.load(record["samples_file"]) as f:
        evaluated = f["samples"]
    assert sampled.shape == (10, 8, 8, 1) and np.array_equal(sampled, evaluated)

    ckpt = run_dir / "checkpoints" / "checkpoint-0000001234.pt"
    run_cli("sample.py", f"ckpt={ckpt}", "seeds=0-9", "write_pngs=false", "sampler.num_steps=2")
    meta = json.loads((out / "samples.json").read_text())
    assert (meta["sampler"]["name"], meta["sampler"]["num_steps"], meta["nfe"]) == ("heun", 2, 3)
    assert not (run_dir / "checkpoints" / "samples").exists()
    # evaluate.py samples= carries sample.py's record along.
    record = _evaluate([f"samples={out}", "data=digits"])
    assert record["generated_by"]["ckpt"] == str(ckpt) and record["generated_by"]["nfe"] == 3
    assert record["num_samples"] == 10


def test_ref_and_run_dir_run_on_the_requested_device(run_dir, tmp_path, monkeypatch):
    """device= reaches the feature extraction of ref= and the sampling of run_dir= (here 'meta', which 'auto' never
    picks, so the value can only come from the command line)."""
    seen = []

    def capture(*args, device=None, **kwargs):
        seen.append(str(device))
        raise RuntimeError("captured")

    monkeypatch.setattr(run_module, "compute_reference_statistics", capture)
    monkeypatch.setattr(curves_module, "evaluate_model", capture)
    for args in (["ref=true", f"out={tmp_path / 'ref.npz'}"], [f"run_dir={run_dir}", "eval.num_samples=4"]):
        with pytest.raises(RuntimeError, match="captured"):
            run_evaluation(compose("evaluate", [*args, "device=meta"]), args)
    assert seen == ["meta", "meta"]


def test_curve_points_record_count_seeds_and_nfe(run_dir):
    """run_dir=: every fid_curve.jsonl line names its checkpoint and images seen, its sample count, seeds and NFE."""
    _evaluate([f"run_dir={run_dir}", "eval.num_samples=6", "eval.batch=6"])
    entries = [json.loads(line) for line in (run_dir / "fid_curve.jsonl").read_text().splitlines()]
    assert [(e["checkpoint"], e["nimg"]) for e in entries] == [("checkpoint-0000001000.pt", 1000),
                                                                ("checkpoint-0000001234.pt", 1234)]
    assert all(e["num_samples"] == 6 and e["seeds"] == [0, 5] and e["nfe"] == 7 and e["num_steps"] == 4
               for e in entries)
