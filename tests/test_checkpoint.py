"""Checkpoint files: atomic writes, safe loading, pruning."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from training import checkpoint as ckpt


def _state(value: float) -> dict:
    return {"config": {"seed": 0}, "net": {"w": torch.full((3,), value)}, "progress": {"cur_nimg": 0, "step": 0}}


def test_round_trip_and_listing(tmp_path):
    for nimg in (2000, 1000, 3000):
        ckpt.save_checkpoint(tmp_path / "checkpoints" / ckpt.checkpoint_name(nimg), _state(nimg))
    names = [p.name for p in ckpt.list_checkpoints(tmp_path)]
    assert names == ["checkpoint-0000001000.pt", "checkpoint-0000002000.pt", "checkpoint-0000003000.pt"]
    state = ckpt.load_checkpoint(tmp_path)  # a run directory resolves to its newest checkpoint
    assert torch.equal(state["net"]["w"], torch.full((3,), 3000.0))
    assert state["format"] == ckpt.FORMAT and state["version"] == ckpt.VERSION


def test_failed_save_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / ckpt.checkpoint_name(1000)
    ckpt.save_checkpoint(path, _state(1.0))

    def exploding_save(obj, f, *args, **kwargs):
        f.write(b"partial garbage")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", exploding_save)
    with pytest.raises(OSError, match="No space left"):
        ckpt.save_checkpoint(path, _state(2.0))
    monkeypatch.undo()
    assert torch.equal(ckpt.load_checkpoint(path)["net"]["w"], torch.full((3,), 1.0))
    assert sorted(os.listdir(path.parent)) == [path.name]  # no temporary file left behind


def test_prune_keeps_newest(tmp_path):
    for nimg in range(1000, 6000, 1000):
        ckpt.save_checkpoint(tmp_path / "checkpoints" / ckpt.checkpoint_name(nimg), _state(nimg))
    ckpt.prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-0000004000.pt",
                                                                  "checkpoint-0000005000.pt"]
    ckpt.prune_checkpoints(tmp_path, keep=0)  # 0 keeps everything
    assert len(ckpt.list_checkpoints(tmp_path)) == 2


def test_rejects_foreign_and_malicious_files(tmp_path):
    plain = tmp_path / "plain.pt"
    torch.save({"net": {}}, plain)
    with pytest.raises(ckpt.CheckpointError, match="not a sigmalab checkpoint"):
        ckpt.load_checkpoint(plain)

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as f:
        pickle.dump({"format": ckpt.FORMAT, "version": ckpt.VERSION, "x": Evil()}, f)
    with pytest.raises(ckpt.CheckpointError, match="not a readable sigmalab checkpoint"):
        ckpt.load_checkpoint(evil)
    assert not (tmp_path / "pwned").exists()

    with pytest.raises(FileNotFoundError, match="no checkpoints in run directory"):
        ckpt.load_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        ckpt.load_checkpoint(tmp_path / "missing.pt")


def test_version_mismatch_is_reported(tmp_path):
    path = tmp_path / "c.pt"
    torch.save({"format": ckpt.FORMAT, "version": 999}, path)
    with pytest.raises(ckpt.CheckpointError, match="version 999"):
        ckpt.load_checkpoint(path)
