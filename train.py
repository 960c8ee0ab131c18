"""Train a diffusion model the EDM way, with the training noise schedule as a swappable config group.

    python train.py                                   # tiny UNet on the embedded 8x8 digits (CPU, minutes)
    python train.py model=ddpmpp data=cifar10 data.path=... schedule=laplace train.total_kimg=200000
    python train.py -m schedule=lognormal,laplace,cauchy      # a sweep, one run directory per schedule
    torchrun --standalone --nproc_per_node=8 train.py ...     # data-parallel on 8 devices
    python train.py run_dir=<existing run dir>                # continue a run where it stopped (resume=auto)

The training loop, the run directory's contents and the resume guarantees are ``training.trainer``'s; this entry point
parses the command line (Hydra), sets up the processes and wires in what lives above ``training``: evaluation during
training (``eval.every_kimg``) and the InfoNoise profile figure at the end of an InfoNoise run.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from training.distributed import init_distributed, shutdown_distributed
from training.trainer import train


def evaluate_during_training(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """The Trainer's ``evaluate_fn``: evaluation's periodic protocol, imported only when a run evaluates."""
    # TODO(layering): drop the fallback to evaluate.py (an entry point must not import another) once
    # evaluation/protocol.py, which takes over evaluate_during_training, has landed.
    try:
        from evaluation.protocol import evaluate_during_training as evaluate_fn
    except ImportError:
        from evaluate import evaluate_during_training as evaluate_fn
    return evaluate_fn(*args, **kwargs)


def plot_infonoise_profile(run_dir: Path) -> Path:
    """The Trainer's ``plot_profile``: the InfoNoise report figure of a finished run (matplotlib, imported late)."""
    from evaluation.infonoise_report import plot_infonoise_profile as plot

    return plot(run_dir)


def main(cfg: DictConfig) -> None:
    dist_info = init_distributed(cfg.device)
    try:
        train(cfg, dist_info, evaluate_fn=evaluate_during_training, plot_profile=plot_infonoise_profile)
    finally:
        shutdown_distributed()


def _entry() -> None:
    import hydra

    # Only rank 0 writes Hydra's .hydra/ folder and log file; the other ranks of a torchrun job stay silent.
    if int(os.environ.get("RANK", "0")) != 0:
        sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=disabled"]
    # A dry run only prints: it creates no run directory.
    if "dry_run=true" in sys.argv[1:] and "-m" not in sys.argv[1:] and "--multirun" not in sys.argv[1:]:
        sys.argv += ["hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=stdout"]
    hydra.main(version_base="1.3", config_path="configs", config_name="train")(main)()


if __name__ == "__main__":
    _entry()
