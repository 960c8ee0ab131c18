"""Train a diffusion model the EDM way, with the training noise schedule as a swappable config group.

    python train.py                                   # tiny UNet on the embedded 8x8 digits (CPU, minutes)
    python train.py model=ddpmpp data=cifar10 data.path=... schedule=laplace train.total_kimg=200000
    python train.py -m schedule=lognormal,laplace,cauchy      # a sweep, one run directory per schedule
    torchrun --standalone --nproc_per_node=8 train.py ...     # data-parallel on 8 devices
    python train.py run_dir=<existing run dir> resume=auto    # continue a run where it stopped

Budgets and intervals are counted in images (kimg), like EDM. One training step: draw a global batch, split it over
processes and (optionally) gradient-accumulation rounds, compute the schedule-sampled, weighted denoising loss
(``diffusion.loss``), take an Adam step with a linearly ramped learning rate, update the EMA, and let the schedule
observe the per-sample errors (adaptive schedules such as InfoNoise rebuild themselves from them).

The run directory holds ``config.yaml`` (resolved), ``metrics.jsonl`` (one JSON object per tick), ``train.log``,
``samples/grid-<kimg>.png`` and ``checkpoints/checkpoint-<nimg>.pt`` (see ``models.checkpoint``); a resumed run is
identical to an uninterrupted one on CPU (same parameters bit for bit): the data order is a pure function of
(seed, images seen), and the checkpoint carries the model, EMA, optimizer, schedule state and every RNG state.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from configs import to_plain_dict
from configs.validation import ConfigError, config_differences, validate_train_config
from data import build_dataset, to_model_space
from data.sampler import InfiniteSampler
from diffusion.loss import DenoisingLoss
from diffusion.preconditioning import build_denoiser
from diffusion.schedules import build_schedule
from diffusion.weighting import build_weighting
from models import count_parameters
from models.checkpoint import (checkpoint_name, latest_checkpoint, load_checkpoint, prune_checkpoints,
                               resolve_checkpoint, save_checkpoint)
from models.distributed import (DistInfo, all_gather_object, all_reduce_sum, barrier, broadcast_object,
                                init_distributed, shutdown_distributed)
from models.ema import EMA

log = logging.getLogger("sigmalab.train")


# ---------------------------------------------------------------------------------------------------------------------
# Metrics: <run_dir>/metrics.jsonl always, Weights & Biases when logger=wandb.


class RunLogger:
    """Appends one JSON object per call to ``metrics.jsonl``; mirrors it to wandb if configured (rank 0 only)."""

    def __init__(self, run_dir: Path, logger_cfg: Any, config: dict, enabled: bool = True):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.wandb_run = None
        if not enabled:
            return
        if logger_cfg.name == "wandb":
            self.wandb_run = self._init_wandb(run_dir, logger_cfg, config)
        elif logger_cfg.name != "local":
            raise ConfigError(f"logger: unknown logger '{logger_cfg.name}'; valid choices: local, wandb")

    @staticmethod
    def _init_wandb(run_dir: Path, cfg: Any, config: dict):
        if cfg.mode not in ("online", "offline", "disabled"):
            raise ConfigError(f"logger.mode: must be online, offline or disabled, got {cfg.mode!r}")
        import wandb

        # A stable id stored in the run directory makes a resumed run continue the same wandb run.
        id_file = run_dir / "wandb_id.txt"
        run_id = id_file.read_text().strip() if id_file.exists() else wandb.util.generate_id()
        id_file.write_text(run_id)
        return wandb.init(project=cfg.project, entity=cfg.entity, group=cfg.group, tags=list(cfg.tags),
                          mode=cfg.mode, dir=str(run_dir), config=config, name=run_dir.name, id=run_id,
                          resume="allow")

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record, allow_nan=True) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in record.items() if isinstance(v, (int, float))},
                               step=int(record.get("step", 0)))

    def close(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


# ---------------------------------------------------------------------------------------------------------------------
# Helpers


def _run_dir(cfg: DictConfig) -> Path:
    """Hydra's output directory for this job (``run_dir`` for single runs, the sweep sub-directory under -m)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except (ImportError, ValueError):
        return Path(cfg.run_dir)


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _interval_due(prev_nimg: int, cur_nimg: int, every_kimg: float) -> bool:
    """True when a multiple of ``every_kimg`` was crossed between prev_nimg (exclusive) and cur_nimg (inclusive)."""
    if not every_kimg:
        return False
    every = every_kimg * 1000.0
    return math.floor(cur_nimg / every) > math.floor(prev_nimg / every)


def _grid_labels(num: int, label_dim: int) -> torch.Tensor | None:
    """Class labels for a sample grid: class i on row i (cycling), so a conditional grid reads class by class."""
    if not label_dim:
        return None
    side = max(1, int(math.ceil(math.sqrt(num))))
    return torch.arange(num) // side % label_dim


def _snapshot_grid(ema_model: torch.nn.Module, cfg: DictConfig, dataset: Any, device: torch.device,
                   path: Path) -> None:
    from sample import generate_images, save_grid

    num = cfg.train.grid_seeds
    images = generate_images(ema_model, list(range(num)), sampler_cfg=cfg.sampler, batch_size=min(num, 256),
                             device=device, class_labels=_grid_labels(num, ema_model.label_dim),
                             binary=dataset.binary)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_grid(images, path)


def describe(denoiser: torch.nn.Module, dataset: Any) -> str:
    return (f"dataset: {dataset.name} ({len(dataset)} images, {dataset.num_channels}x{dataset.resolution}x"
            f"{dataset.resolution}, {dataset.label_dim or 'no'} class labels)\n"
            f"parameters: {count_parameters(denoiser)}")


# ---------------------------------------------------------------------------------------------------------------------
# Training


def train(cfg: DictConfig, dist_info: DistInfo | None = None) -> Path | None:
    """Run (or resume) the training job described by ``cfg``; returns the run directory (None for dry runs)."""
    dist_info = dist_info or init_distributed(cfg.device)
    device, rank, world = dist_info.device, dist_info.rank, dist_info.world_size
    validate_train_config(cfg, world_size=world)

    # --- data, model, optimisation objects --------------------------------------------------------------------------
    dataset = build_dataset(cfg.data, split="train")
    label_dim = dataset.label_dim
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    denoiser = build_denoiser(cfg, img_resolution=dataset.resolution, img_channels=dataset.num_channels,
                              label_dim=label_dim).to(device)
    weighting = build_weighting(cfg.weighting, img_resolution=dataset.resolution, sigma_data=cfg.precond.sigma_data)
    schedule = build_schedule(cfg.schedule, weighting=weighting, img_resolution=dataset.resolution,
                              sigma_data=cfg.precond.sigma_data, total_nimg=int(round(cfg.train.total_kimg * 1000)),
                              batch_size=cfg.train.batch).to(device)
    weighting.attach_schedule(schedule)  # only the importance weighting uses the sampling density
    loss_fn = DenoisingLoss(schedule, weighting)

    if cfg.dry_run:
        if dist_info.is_main:
            print(OmegaConf.to_yaml(cfg, resolve=True))
            print(f"schedule: {schedule}\nweighting: {weighting}")
            print(describe(denoiser, dataset))
        return None

    run_dir = _run_dir(cfg)
    run_dir = Path(broadcast_object(str(run_dir)))  # every rank writes (rank 0 only) into rank 0's directory
    ema = EMA(denoiser, halflife_kimg=cfg.train.ema_halflife_kimg, rampup_ratio=cfg.train.ema_rampup_ratio)
    optimizer = torch.optim.Adam(denoiser.parameters(), lr=cfg.train.lr, betas=tuple(cfg.train.betas),
                                 eps=cfg.train.eps, weight_decay=cfg.train.weight_decay)
    resolved = to_plain_dict(cfg)

    # --- resume ------------------------------------------------------------------------------------------------------
    cur_nimg, step = 0, 0
    torch.manual_seed(cfg.seed + rank)  # per-rank noise streams
    ckpt_path = None
    if cfg.resume == "auto":
        ckpt_path = latest_checkpoint(run_dir)
        if ckpt_path is None and dist_info.is_main:
            log.info("resume=auto: no checkpoint in %s yet, starting from scratch", run_dir)
    elif cfg.resume is not None:
        ckpt_path = resolve_checkpoint(cfg.resume)
    if ckpt_path is not None:
        state = load_checkpoint(ckpt_path)
        diffs = config_differences(state["config"], resolved)
        if diffs:
            raise ConfigError(f"cannot resume {ckpt_path}: its config differs from this run's in\n  "
                              + "\n  ".join(diffs))
        denoiser.load_state_dict(state["net"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        cur_nimg, step = int(state["progress"]["cur_nimg"]), int(state["progress"]["step"])
        # Per-process state (RNG streams, an adaptive schedule's not-yet-reduced statistics) is stored per rank.
        rng_states, schedule_states = state["rng"], state["schedule"]
        same_world = len(rng_states) == world
        schedule.load_state_dict(schedule_states[rank if same_world else 0])
        if same_world:
            _set_rng_state(rng_states[rank])
        elif dist_info.is_main:
            log.warning("checkpoint was written by %d processes, this run has %d: noise streams are re-seeded and "
                        "every rank starts from rank 0's schedule state", len(rng_states), world)
        if dist_info.is_main:
            log.info("resumed from %s at %.1f kimg (step %d)", ckpt_path, cur_nimg / 1000, step)

    # --- distributed wrapper and data stream -------------------------------------------------------------------------
    model: torch.nn.Module = denoiser
    if dist_info.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            denoiser, device_ids=[device.index] if device.type == "cuda" else None)
    batch = cfg.train.batch
    batch_per_rank = batch // world
    batch_gpu = cfg.train.batch_gpu or batch_per_rank
    accum_rounds = batch_per_rank // batch_gpu
    sampler = InfiniteSampler(len(dataset), seed=cfg.seed, rank=rank, world_size=world, start=cur_nimg,
                              batch_size_per_rank=batch_per_rank)
    # The loader gets its own generator: creating its iterator draws a base seed, which must not come from (and
    # shift) the global RNG that the noise and σ draws use — otherwise a resumed run would diverge.
    loader_generator = torch.Generator().manual_seed(cfg.seed * 1000 + rank)
    loader = torch.utils.data.DataLoader(dataset, sampler=sampler, batch_size=batch_gpu,
                                         num_workers=cfg.train.num_workers, pin_memory=device.type == "cuda",
                                         persistent_workers=cfg.train.num_workers > 0, generator=loader_generator)
    batches = iter(loader)

    # --- run directory -----------------------------------------------------------------------------------------------
    logger = RunLogger(run_dir, cfg.logger, resolved, enabled=dist_info.is_main)
    if dist_info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
        log.info("run directory: %s", run_dir)
        log.info(describe(denoiser, dataset))
        log.info("schedule: %s | weighting: %s | batch %d = %d process(es) x %d round(s) x %d", schedule,
                 weighting, batch, world, accum_rounds, batch_gpu)

    total_nimg = int(round(cfg.train.total_kimg * 1000))
    num_dims = dataset.num_channels * dataset.resolution**2
    tick_start_nimg, tick_start_time = cur_nimg, time.time()
    tick_loss = torch.zeros((), dtype=torch.float64, device=device)
    tick_mse = torch.zeros((), dtype=torch.float64, device=device)
    tick_count = torch.zeros((), dtype=torch.float64, device=device)
    progress = None
    if dist_info.is_main:
        from tqdm import tqdm

        progress = tqdm(total=total_nimg, initial=cur_nimg, unit="img", unit_scale=True, dynamic_ncols=True,
                        desc="training", disable=None, mininterval=1.0)

    def save(final: bool = False) -> None:
        rng_states = all_gather_object(_rng_state())
        schedule_states = all_gather_object({k: v.cpu() for k, v in schedule.state_dict().items()})
        if dist_info.is_main:
            path = save_checkpoint(run_dir / "checkpoints" / checkpoint_name(cur_nimg), {
                "config": resolved,
                "geometry": {"img_resolution": dataset.resolution, "img_channels": dataset.num_channels,
                             "label_dim": label_dim, "augment_dim": 0},
                "progress": {"cur_nimg": cur_nimg, "step": step},
                "net": denoiser.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                "schedule": schedule_states, "rng": rng_states,
            })
            prune_checkpoints(run_dir, cfg.train.keep_checkpoints)
            log.info("saved %s%s", path, " (final)" if final else "")
        barrier()

    # --- the loop ----------------------------------------------------------------------------------------------------
    denoiser.train()
    try:
        while cur_nimg < total_nimg:
            lr = cfg.train.lr
            if cfg.train.lr_rampup_kimg > 0:
                lr *= min(cur_nimg / (cfg.train.lr_rampup_kimg * 1000.0), 1.0)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            step_loss = torch.zeros((), dtype=torch.float64, device=device)
            sigmas = []
            for round_idx in range(accum_rounds):
                images, labels = next(batches)
                images = to_model_space(images.to(device, non_blocking=True))
                onehot = None
                if label_dim:
                    onehot = torch.nn.functional.one_hot(labels.to(device).long(), label_dim).float()
                    if cfg.train.label_dropout > 0:
                        keep = torch.rand(onehot.shape[0], 1, device=device) >= cfg.train.label_dropout
                        onehot = onehot * keep
                sync = round_idx == accum_rounds - 1 or not dist_info.distributed
                with contextlib.nullcontext() if sync else model.no_sync():
                    out = loss_fn(model, images, class_labels=onehot)
                    out.loss.sum().div(batch_per_rank).backward()
                schedule.update(out.sigma, out.mse)
                step_loss += out.loss.detach().sum().double()
                tick_mse += out.mse.sum().double()
                sigmas.append(out.sigma.detach())
            if not torch.isfinite(step_loss):
                sigma = torch.cat(sigmas)
                raise FloatingPointError(
                    f"non-finite loss at step {step} ({cur_nimg / 1000:.1f} kimg), σ in [{float(sigma.min()):.4g}, "
                    f"{float(sigma.max()):.4g}]; resume from the last checkpoint with a lower train.lr or "
                    "train.grad_clip")
            if cfg.train.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(denoiser.parameters(), cfg.train.grad_clip)
            optimizer.step()
            prev_nimg = cur_nimg
            cur_nimg += batch
            step += 1
            ema_beta = ema.update(denoiser, cur_nimg, batch)
            schedule_stats = schedule.on_step(step)
            tick_loss += step_loss
            tick_count += batch_per_rank
            if progress is not None:
                progress.update(cur_nimg - prev_nimg)
            done = cur_nimg >= total_nimg

            if schedule_stats and dist_info.is_main:
                logger.log({"kimg": cur_nimg / 1000, "step": step, **{f"schedule/{k}": v
                                                                      for k, v in schedule_stats.items()}})
            if done or _interval_due(prev_nimg, cur_nimg, cfg.train.tick_kimg):
                totals = all_reduce_sum(torch.stack([tick_loss, tick_mse, tick_count]))
                elapsed = time.time() - tick_start_time
                record = {
                    "kimg": cur_nimg / 1000, "step": step,
                    "loss": float(totals[0] / totals[2] / num_dims),  # weighted loss per dimension
                    "mse": float(totals[1] / totals[2] / num_dims),  # unweighted ‖D − y‖² per dimension
                    "lr": lr, "ema_beta": ema_beta,
                    "img_per_s": (cur_nimg - tick_start_nimg) / max(elapsed, 1e-9),
                    "sec_per_kimg": elapsed / max((cur_nimg - tick_start_nimg) / 1000, 1e-9),
                    "time": time.time(),
                }
                if dist_info.is_main:
                    logger.log(record)
                    msg = (f"kimg {record['kimg']:9.1f} | step {step:7d} | loss {record['loss']:.4f} | "
                           f"{record['img_per_s']:8.1f} img/s | lr {lr:.2e}")
                    if progress is not None and not progress.disable:
                        progress.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)
                    log.info(msg)
                tick_loss.zero_()
                tick_mse.zero_()
                tick_count.zero_()
                tick_start_nimg, tick_start_time = cur_nimg, time.time()
            if dist_info.is_main and cfg.train.grid_seeds and (
                    done or _interval_due(prev_nimg, cur_nimg, cfg.train.snapshot_kimg)):
                _snapshot_grid(ema.model, cfg, dataset, device,
                               run_dir / "samples" / f"grid-{cur_nimg // 1000:06d}kimg.png")
            if done or _interval_due(prev_nimg, cur_nimg, cfg.train.checkpoint_kimg):
                save(final=done)
    finally:
        if progress is not None:
            progress.close()
        logger.close()
    if dist_info.is_main:
        log.info("done: %.1f kimg in %s", cur_nimg / 1000, run_dir)
    return run_dir


def main(cfg: DictConfig) -> None:
    dist_info = init_distributed(cfg.device)
    try:
        train(cfg, dist_info)
    finally:
        shutdown_distributed()


def _entry() -> None:
    import hydra

    # Only rank 0 writes Hydra's .hydra/ folder and log file; the other ranks of a torchrun job stay silent.
    if int(os.environ.get("RANK", "0")) != 0:
        sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=disabled"]
    hydra.main(version_base="1.3", config_path="configs", config_name="train")(main)()


if __name__ == "__main__":
    _entry()
