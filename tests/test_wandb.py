"""logger=wandb with the real wandb library, offline, end to end: the run directory holds the offline run, a resumed
run continues the same wandb run (same id), and what the Trainer logs (a failed evaluation's message included)
reaches wandb's own run file.

wandb is never mocked here; ``WANDB_MODE=offline`` is set explicitly (conftest.py makes it ``disabled`` for every
other test), so nothing touches the network.
"""

from __future__ import annotations

import json

from tests.helpers import FAST_TRAIN, compose
from training.checkpoint import load_checkpoint
from training.logger import WANDB_ID_FILE
from training.trainer import train


def _offline_runs(run_dir):
    return sorted((run_dir / "wandb").glob("offline-run-*"))


def test_wandb_offline_run_lives_in_the_run_dir_and_resumes_with_the_same_id(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run"

    def broken(model, cfg, dataset, device, kimg):
        raise RuntimeError("simulated evaluation failure")

    base = [f"run_dir={run_dir}", *FAST_TRAIN, "logger=wandb", "logger.mode=offline", "eval.every_kimg=0.128"]
    train(compose("train", [*base, "train.total_kimg=0.128"]), evaluate_fn=broken)
    run_id = (run_dir / WANDB_ID_FILE).read_text().strip()
    (first,) = _offline_runs(run_dir)
    assert first.name.endswith(f"-{run_id}")  # wandb names the folder offline-run-<time>-<run id>
    assert (first / f"run-{run_id}.wandb").is_file()

    train(compose("train", [*base, "resume=auto"]), evaluate_fn=broken)  # continues to 0.256 kimg
    assert load_checkpoint(run_dir)["progress"]["cur_nimg"] == 256
    assert (run_dir / WANDB_ID_FILE).read_text().strip() == run_id
    runs = _offline_runs(run_dir)
    assert len(runs) == 2 and all(r.name.endswith(f"-{run_id}") for r in runs)  # the same wandb run, resumed
    # What the Trainer logged went to wandb: the tick metrics and the failed evaluation's message, in each part.
    for run in runs:
        data = (run / f"run-{run_id}.wandb").read_bytes()
        assert b"loss" in data and b"eval/error" in data and b"simulated evaluation failure" in data
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["kimg"] for r in records if "eval/error" in r] == [0.128, 0.256]
