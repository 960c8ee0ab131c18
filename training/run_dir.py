"""Where a run lives and how it stops: the run directory, pre-emption signals and SLURM requeueing.

Pre-emption: SIGTERM (torchrun / SLURM shutdown) and SIGUSR1 (SLURM's ``--signal=USR1@<s>`` warning before the time
limit) only set a flag; the Trainer checkpoints at the end of the current step and exits cleanly. With
``train.slurm_requeue`` a SIGUSR1 also requeues the job, which restarts in the same run directory and resumes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

log = logging.getLogger("sigmalab.train")


def resolve_run_dir(cfg: Any) -> Path:
    """Hydra's output directory for this job (``run_dir`` for single runs, the sweep sub-directory under -m); plain
    ``cfg.run_dir`` when no Hydra job is running (a config composed in a test or a script)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except (ImportError, ValueError):
        return Path(cfg.run_dir)


class StopSignals:
    """Context manager: while active, SIGTERM and SIGUSR1 set ``received`` (the signal's name) instead of killing."""

    SIGNALS = ("SIGTERM", "SIGUSR1")

    def __init__(self):
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        for name in self.SIGNALS:
            signum = getattr(signal, name, None)
            if signum is not None:
                with contextlib.suppress(ValueError):  # not the main thread: leave the handlers alone
                    self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def requeue_slurm_job() -> None:
    """Ask SLURM to requeue this job (it then restarts in the same run directory and resumes)."""
    job = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
    if job and os.environ.get("SLURM_ARRAY_TASK_ID"):
        job = f"{job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    if not job:
        return
    try:
        subprocess.run(["scontrol", "requeue", job], check=True, timeout=60)
        log.info("requeued SLURM job %s", job)
    except (OSError, subprocess.SubprocessError) as err:
        log.warning("could not requeue SLURM job %s: %s", job, err)
