"""Shared test set-up: small thread counts (the CI machine has 2 cores) and offline tools."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Subprocesses started by tests inherit these: one OpenMP thread each, wandb never touches the network.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HYDRA_FULL_ERROR", "1")


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """One intra-op thread in this process too, whatever OMP_NUM_THREADS says (set before any module's fixtures):
    results that depend on the order of reductions (bit-exact resumes, the legacy fixture) are compared with one
    thread, and 2 CI cores are not shared between threads of one test."""
    import torch

    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Caches (classifier weights, reference statistics) go to one per-session temporary directory."""
    cache = tmp_path_factory.getbasetemp() / "sigmalab-cache"
    monkeypatch.setenv("SIGMALAB_CACHE", str(cache))
    yield
