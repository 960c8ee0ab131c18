"""Train a diffusion model the EDM way, with the training noise schedule as a swappable config group.

    python train.py                                   # tiny UNet on the embedded 8x8 digits (CPU, minutes)
    python train.py model=ddpmpp data=cifar10 data.path=... schedule=laplace train.total_kimg=200000
    python train.py -m schedule=lognormal,laplace,cauchy      # a sweep, one run directory per schedule
    torchrun --standalone --nproc_per_node=8 train.py ...     # data-parallel on 8 devices
    python train.py run_dir=<existing run dir>                # continue a run where it stopped (resume=auto)

The training loop, the run directory's contents and the resume guarantees are ``training.trainer``'s; this entry point
parses the command line (Hydra), sets up the processes and wires in what lives above ``training``: evaluation during
training (``eval.every_kimg``: the periodic protocol and its start-up preflight, so that an evaluation that cannot run
stops the run before its first step) and the InfoNoise profile figure at the end of an InfoNoise run.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from omegaconf import DictConfig

from evaluation.infonoise_report import plot_infonoise_profile
from training.distributed import init_distributed, shutdown_distributed
from training.trainer import train


def hooks(cfg: DictConfig) -> dict[str, Any]:
    """What the Trainer gets from the layer above it: evaluation's periodic protocol and its preflight when
    ``eval.every_kimg`` is set (imported only then: they load the feature extractors' libraries) and the InfoNoise
    profile figure."""
    wired: dict[str, Any] = {"plot_profile": plot_infonoise_profile}
    if cfg.eval.get("every_kimg"):
        from evaluation.protocol import evaluate_during_training, preflight_during_training

        wired["evaluate_fn"] = evaluate_during_training
        wired["preflight"] = preflight_during_training
    return wired


def main(cfg: DictConfig) -> None:
    dist_info = init_distributed(cfg.device)
    try:
        train(cfg, dist_info, **hooks(cfg))
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
