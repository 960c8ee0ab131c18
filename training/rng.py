"""The random-number-generator states of a process: captured into checkpoints, restored on resume, and preserved
around work that must not perturb a run (evaluation during training).

One place for what a bit-exact resume needs: the global torch CPU generator, every CUDA device's generator and the
run's own noise generator (σ and noise draws). ``preserved_rng`` also restores Python's and NumPy's global states.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch


def capture_rng_state(noise_generator: torch.Generator | None = None) -> dict[str, Any]:
    """``{"torch": ..., ["noise": ...], ["cuda": [...]]}``: what ``restore_rng_state`` puts back."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if noise_generator is not None:
        state["noise"] = noise_generator.get_state()
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any], noise_generator: torch.Generator | None = None) -> None:
    """Put back a ``capture_rng_state`` result (CUDA states only where CUDA is available now)."""
    torch.set_rng_state(state["torch"])
    if noise_generator is not None:
        noise_generator.set_state(state["noise"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def preserved_rng(device: str | torch.device) -> Iterator[None]:
    """Restore the global torch (CPU and ``device`` if CUDA), NumPy and Python RNG states on exit."""
    device = torch.device(device)
    py_state, np_state = random.getstate(), np.random.get_state()  # noqa: NPY002 - the legacy global state itself
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)  # noqa: NPY002
