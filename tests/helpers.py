"""Utilities shared by the tests: composing the real Hydra configs and running the real CLIs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs"

# A training budget that takes seconds on one CPU core, for tests that exercise the loop rather than the result.
FAST_TRAIN = [
    "train.batch=32", "train.total_kimg=0.256", "train.tick_kimg=0.128", "train.snapshot_kimg=0",
    "train.checkpoint_kimg=0.128", "train.lr_rampup_kimg=0", "train.grid_seeds=0", "model.model_channels=8",
    "model.num_blocks=1",
]


def compose(config_name: str = "train", overrides: list[str] | None = None):
    """The config ``python <entry>.py <overrides>`` would see."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides or []))


def run_cli(script: str, *args: str, cwd: Path = ROOT, timeout: int = 600, check: bool = True,
            env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``python <script> <args>`` from the repository root and return the completed process."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "1",
                **(env or {})}
    proc = subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def write_random_inception_weights(path: Path) -> Path:
    """A randomly initialised Inception-v3 weights file in torch-fidelity's layout (no download): Kaiming-normal
    weights (seed 0) and zero biases, since the default init makes activations vanish through its ~95 layers."""
    import pytest
    import torch
    import torch_fidelity.feature_extractor_inceptionv3 as fi
    from torch import nn

    mp = pytest.MonkeyPatch()
    mp.setattr(fi, "load_state_dict_from_url", lambda *a, **k: {})
    mp.setattr(fi.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None)
    try:
        model = fi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    finally:
        mp.undo()
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, generator=g)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    torch.save(model.state_dict(), path)
    return path
