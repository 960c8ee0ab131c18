"""Evaluate samples, checkpoints and sweeps: sample-quality metrics (FID, IS, KID, precision/recall), likelihood,
FID-vs-training curves, reference statistics and the sweep report. The work is done by the ``evaluation`` package;
this entry point composes the config, sets up torchrun and calls ``evaluation.run.run_evaluation``.

    python evaluate.py samples=<samples.npz | folder of PNGs> [data=digits]
    python evaluate.py ckpt=<run dir | checkpoint file> [eval.num_samples=2000] [eval.baselines=true]
    torchrun --standalone --nproc_per_node=8 evaluate.py ckpt=<run> eval=fid50k      # sampling split over the ranks
    python evaluate.py ckpt=<run> eval.metrics=[nll]                                  # bits/dim on the held-out split
    python evaluate.py run_dir=<run or sweep dir> eval.num_samples=10000              # FID vs kimg of every checkpoint
    python evaluate.py run_dir=<sweep dir> eval=nll                                   # every run's bits/dim (its last)
    python evaluate.py ref=true data=cifar10 data.path=<dir> [out=cifar10-32x32.npz] # reference μ, Σ (EDM's format)
    python evaluate.py report=<sweep dir> [eval.baseline_run=lognormal] [out=<dir>]   # the papers' tables
    python evaluate.py report=schedules [out=docs/figures]                            # the schedules figure
    python evaluate.py report=infonoise run_dir=<run or sweep> [out=<dir>]            # InfoNoise profiles
    python evaluate.py ckpt=<run> ema.sigma_rel=0.08 [ema.at_kimg=...]               # a post-hoc EMA length
    python evaluate.py ema_sweep=<run or sweep dir> ema.sigma_rels=[0.04,0.06,0.08,0.10,0.13]  # FID vs EMA length

Where each part is described:

- the modes and the printed table: ``evaluation/run.py``; what a result JSON records: ``evaluation/run.py``,
  ``evaluation/provenance.py``;
- the checks made before any sampling (weights, reference files, data, output): ``evaluation/preflight.py``;
- the feature extractors (Inception-v3, the digits classifier, ``auto``): ``evaluation/features.py``; DINOv2 and
  FD-DINOv2 (EDM2's preprocessing): ``evaluation/dinov2.py``;
- the FID formula: ``evaluation/frechet.py``; the metrics and their result keys: ``evaluation/metrics.py``,
  ``evaluation/feature_metrics.py`` (from features, gathered over ranks), ``evaluation/settings.py``;
- reference statistics (cached, published, ``ref=true``): ``evaluation/reference_stats.py``;
- seeds, seed repeats (EDM's minimum of three), the floor/ceiling baselines and the training hook:
  ``evaluation/protocol.py``;
- the likelihood: ``evaluation/likelihood.py``;
- curves and the images-to-target table (``run_dir=``): ``evaluation/curves.py``; what their keys hold:
  ``evaluation/curve_keys.py``;
- the sweep report (``report=``): ``evaluation/report.py``;
- post-hoc EMA (``ema.sigma_rel=``, ``ema_sweep=``): ``evaluation/posthoc.py`` (reconstruction:
  ``training/posthoc_ema.py``).
"""

from __future__ import annotations

import os
import sys
from typing import Any

from evaluation.run import run_evaluation
from training.distributed import init_distributed, shutdown_distributed


def main() -> None:
    import hydra
    from hydra.core.hydra_config import HydraConfig

    @hydra.main(version_base="1.3", config_path="configs", config_name="evaluate")
    def _main(cfg: Any) -> None:
        dist_info = None
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            dist_info = init_distributed(str(cfg.get("device", "auto")))
        try:
            run_evaluation(cfg, list(HydraConfig.get().overrides.task), dist_info)
        finally:
            if dist_info is not None:
                shutdown_distributed()

    _main()


if __name__ == "__main__":
    sys.exit(main())
