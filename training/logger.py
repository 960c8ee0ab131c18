"""A run's metrics: ``<run_dir>/metrics.jsonl`` always, Weights & Biases when ``logger=wandb``; and the per-tick
training record (loss, MSE, gradient norm, throughput) that goes into them.

Weights & Biases: the run's files go into the run directory (``dir=<run_dir>``: ``<run_dir>/wandb/offline-run-*``
with ``logger.mode=offline``, synced later with ``wandb sync``). The wandb run id is made here once and kept in
``<run_dir>/wandb_id.txt``, so a resumed run (``resume=auto``) continues the same wandb run (``resume="allow"``);
a run started from another run's checkpoint in a new directory is a new wandb run. ``logger.mode`` is passed to
``wandb.init``, where it takes precedence over ``WANDB_MODE``.
"""

from __future__ import annotations

import json
import secrets
import string
import time
from pathlib import Path
from typing import Any

import torch

from configs.validation import ConfigError
from data.atomic import atomic_write_text
from training.distributed import all_reduce_sum

WANDB_ID_FILE = "wandb_id.txt"
_ID_ALPHABET = string.ascii_lowercase + string.digits


def wandb_run_id(run_dir: Path) -> str:
    """The wandb run id of ``run_dir``: read from ``wandb_id.txt``, else made (8 random lowercase letters and digits,
    like wandb's own ids) and written there atomically."""
    id_file = run_dir / WANDB_ID_FILE
    if id_file.is_file():
        run_id = id_file.read_text().strip()
        if run_id:
            return run_id
    run_id = "".join(secrets.choice(_ID_ALPHABET) for _ in range(8))
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(id_file, run_id + "\n")
    return run_id


class RunLogger:
    """Appends one JSON object per call to ``metrics.jsonl``; mirrors it to wandb if configured (rank 0 only)."""

    def __init__(self, run_dir: Path, logger_cfg: Any, config: dict, enabled: bool = True):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.wandb_run = None
        if logger_cfg.name not in ("local", "wandb"):
            raise ConfigError(f"logger: unknown logger '{logger_cfg.name}'; valid choices: local, wandb")
        if enabled and logger_cfg.name == "wandb":
            self.wandb_run = self._init_wandb(run_dir, logger_cfg, config)

    @staticmethod
    def _init_wandb(run_dir: Path, cfg: Any, config: dict):
        if cfg.mode not in ("online", "offline", "disabled"):
            raise ConfigError(f"logger.mode: must be online, offline or disabled, got {cfg.mode!r}")
        import wandb

        run_id = wandb_run_id(run_dir)  # stable: a resumed run continues the same wandb run
        return wandb.init(project=cfg.project, entity=cfg.entity, group=cfg.group, tags=list(cfg.tags),
                          mode=cfg.mode, dir=str(run_dir), config=config, name=run_dir.name, id=run_id,
                          resume="allow")

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record, allow_nan=True) + "\n")
        if self.wandb_run is not None:  # numbers, and messages such as eval/error
            self.wandb_run.log({k: v for k, v in record.items() if isinstance(v, (int, float, str))},
                               step=int(record.get("step", 0)))

    def close(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


class TickMeter:
    """What one tick (``train.tick_kimg``) of training sums up, per rank: the weighted loss, the unweighted MSE, the
    images and the gradient norm; ``record`` reduces the sums over ranks into the tick's metrics.

    ``add`` runs every step and stays on the device (no host read, no host-to-device copy: the image count is a
    host number); ``record`` reads the sums once per tick."""

    def __init__(self, cur_nimg: int, device: torch.device):
        self.nimg, self.time = cur_nimg, time.time()
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)
        self.images = 0  # this rank's images in the tick

    def add(self, stats: dict[str, Any], images: int, world_size: int) -> None:
        """Add one step's ``stats`` (``loss_sum``, ``mse_sum``, ``grad_norm``) over this rank's ``images``."""
        # The gradient norm is the same on every rank: each adds its share, so the sum over ranks counts it once.
        self.sums += torch.stack([stats["loss_sum"], stats["mse_sum"], stats["grad_norm"].double() / world_size])
        self.images += images

    def record(self, cur_nimg: int, step: int, batch: int, num_dims: int, lr: float, ema_beta: float,
               skipped_steps: int) -> dict[str, Any]:
        """The tick's metrics (a collective call: every rank must make it). Losses are per image and dimension."""
        local = torch.cat([self.sums, self.sums.new_tensor([float(self.images)])])
        loss, mse, grad_norm, images = all_reduce_sum(local).tolist()
        elapsed = time.time() - self.time
        kimg_done = (cur_nimg - self.nimg) / 1000
        steps_done = max(kimg_done * 1000 / batch, 1e-9)
        return {
            "kimg": cur_nimg / 1000, "step": step,
            "loss": loss / max(images, 1) / num_dims,  # weighted loss per dimension
            "mse": mse / max(images, 1) / num_dims,  # unweighted ‖D − y‖² per dimension
            "grad_norm": grad_norm / steps_done,
            "lr": lr, "ema_beta": ema_beta, "skipped_steps": skipped_steps,
            "img_per_s": kimg_done * 1000 / max(elapsed, 1e-9),
            "sec_per_kimg": elapsed / max(kimg_done, 1e-9),
            "time": time.time(),
        }

    def reset(self, cur_nimg: int) -> None:
        self.sums.zero_()
        self.images = 0
        self.nimg, self.time = cur_nimg, time.time()
