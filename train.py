"""Train a diffusion model the EDM way, with the training noise schedule as a swappable config group.

    python train.py                                   # tiny UNet on the embedded 8x8 digits (CPU, minutes)
    python train.py model=ddpmpp data=cifar10 data.path=... schedule=laplace train.total_kimg=200000
    python train.py -m schedule=lognormal,laplace,cauchy      # a sweep, one run directory per schedule
    torchrun --standalone --nproc_per_node=8 train.py ...     # data-parallel on 8 devices
    python train.py run_dir=<existing run dir>                # continue a run where it stopped (resume=auto)

Budgets and intervals are counted in images (kimg), like EDM. One training step: draw a global batch, split it over
processes and gradient-accumulation rounds, compute the schedule-sampled, weighted denoising loss
(``diffusion.loss``), take an Adam step with a linearly ramped learning rate, update the EMA, and let the schedule
observe the per-sample errors (adaptive schedules such as InfoNoise rebuild themselves from them).

The run directory holds ``config.yaml`` (resolved), ``metrics.jsonl`` (one JSON object per tick), ``train.log``,
``samples/grid-<kimg>kimg.png``, ``checkpoints/checkpoint-<nimg>.pt`` (see ``training.checkpoint``) and, at the end,
``ema.safetensors``. A resumed run is identical to an uninterrupted one on CPU (same parameters bit for bit): the
data order is a pure function of (seed, images seen), and the checkpoint carries the model, EMA, optimizer, schedule
state and every RNG state. SIGTERM / SIGUSR1 (cluster pre-emption) write a checkpoint and exit with status 0.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from configs import to_plain_dict
from configs.validation import ConfigError, config_differences, validate_train_config
from data import build_augment_pipe, build_dataset, to_model_space
from data.order import InfiniteSampler, epoch_permutation
from diffusion.loss import DenoisingLoss
from diffusion.samplers import sampler_options
from diffusion.schedules import build_schedule
from diffusion.sigma_grids import build_sigma_grid, parse_infogrid
from diffusion.weighting import build_weighting
from models import count_parameters
from training.checkpoint import (
    checkpoint_name,
    export_safetensors,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    resolve_checkpoint,
    save_checkpoint,
)
from training.denoiser import build_denoiser
from training.distributed import (
    DistInfo,
    all_gather_object,
    all_reduce_sum,
    barrier,
    broadcast_object,
    init_distributed,
    shutdown_distributed,
)
from training.ema import EMA

log = logging.getLogger("sigmalab.train")

_PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_CONV_ARCHS = ("songunet", "dhariwalunet")


# ---------------------------------------------------------------------------------------------------------------------
# Metrics: <run_dir>/metrics.jsonl always, Weights & Biases when logger=wandb.


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
# Pre-emption: SIGTERM (torchrun / SLURM shutdown) and SIGUSR1 (SLURM's --signal=USR1@<s> warning before the time
# limit) only set a flag; the loop checkpoints at the end of the current step and exits cleanly.


class StopSignals:
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


def _requeue_slurm_job() -> None:
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


# ---------------------------------------------------------------------------------------------------------------------
# Helpers


def _run_dir(cfg: DictConfig) -> Path:
    """Hydra's output directory for this job (``run_dir`` for single runs, the sweep sub-directory under -m)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except (ImportError, ValueError):
        return Path(cfg.run_dir)


def _rng_state(noise_generator: torch.Generator) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "noise": noise_generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any], noise_generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    noise_generator.set_state(state["noise"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _interval_due(prev_nimg: int, cur_nimg: int, every_kimg: float | None) -> bool:
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


def describe(denoiser: torch.nn.Module, dataset: Any) -> str:
    return (f"dataset: {dataset.name} ({len(dataset)} images, {dataset.num_channels}x{dataset.resolution}x"
            f"{dataset.resolution}, {dataset.label_dim or 'no'} class labels)\n"
            f"parameters: {count_parameters(denoiser)}")


def _flops_line(net: torch.nn.Module, dataset: Any, label_dim: int) -> str:
    """'GFLOPs per forward' of one image, in DiT's convention (multiply-adds), measured with torch's FLOP counter."""
    try:
        from models.flops import count_flops
    except ImportError:
        return ""
    try:
        flops = count_flops(net, img_resolution=dataset.resolution, img_channels=dataset.num_channels,
                            label_dim=label_dim)
    except Exception as err:  # noqa: BLE001 - FLOP counting is informative only
        return f"GFLOPs per forward: unavailable ({err})"
    return (f"GFLOPs per forward: {flops / 2e9:.3f} (multiply-adds per image, DiT's convention; "
            f"{flops / 1e9:.3f} counting a multiply-add as 2)")


def _setup_backends(cfg: DictConfig, device: torch.device) -> None:
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = bool(cfg.train.tf32)
        torch.backends.cudnn.allow_tf32 = bool(cfg.train.tf32)
        torch.backends.cudnn.benchmark = True


# ---------------------------------------------------------------------------------------------------------------------
# Training


class Trainer:
    """One training run: builds everything from ``cfg``, resumes, loops, checkpoints."""

    def __init__(self, cfg: DictConfig, dist_info: DistInfo):
        self.cfg, self.dist = cfg, dist_info
        self.device, self.rank, self.world = dist_info.device, dist_info.rank, dist_info.world_size
        t = cfg.train
        validate_train_config(cfg, world_size=self.world)
        if t.precision not in _PRECISIONS:
            raise ConfigError(f"train.precision: must be one of {', '.join(_PRECISIONS)}, got {t.precision!r}")
        if t.nonfinite not in ("stop", "skip"):
            raise ConfigError(f"train.nonfinite: must be 'stop' or 'skip', got {t.nonfinite!r}")
        _setup_backends(cfg, self.device)

        self.dataset = build_dataset(cfg.data, split="train")
        self.augment = build_augment_pipe(cfg.data)
        self.label_dim = self.dataset.label_dim
        self.augment_dim = self.augment.augment_dim if self.augment is not None else 0
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.denoiser = build_denoiser(cfg, img_resolution=self.dataset.resolution,
                                       img_channels=self.dataset.num_channels, label_dim=self.label_dim,
                                       augment_dim=self.augment_dim).to(self.device)
        self.channels_last = (t.channels_last is True or (t.channels_last == "auto" and self.device.type == "cuda"
                                                          and cfg.model.get("arch") in _CONV_ARCHS))
        if self.channels_last:
            self.denoiser.to(memory_format=torch.channels_last)
        self.weighting = build_weighting(cfg.weighting, img_resolution=self.dataset.resolution,
                                         sigma_data=cfg.precond.sigma_data)
        self.total_nimg = int(round(t.total_kimg * 1000))
        self.schedule = build_schedule(cfg.schedule, weighting=self.weighting, img_resolution=self.dataset.resolution,
                                       sigma_data=cfg.precond.sigma_data, total_nimg=self.total_nimg,
                                       batch_size=t.batch,
                                       num_dims=self.dataset.num_channels * self.dataset.resolution**2
                                       ).to(self.device)
        self.weighting.attach_schedule(self.schedule)  # only the importance weighting uses the sampling density
        self.loss_fn = DenoisingLoss(self.schedule, self.weighting)
        # The sampler config is used only for sample grids and evaluation: check it now, not hours into the run.
        build_sigma_grid(cfg.sampler, schedule_context={"img_resolution": self.dataset.resolution},
                         profile_schedule=self._grid_profile())
        sampler_options(cfg.sampler)
        self.batch = t.batch
        self.batch_per_rank = t.batch // self.world
        self.batch_gpu = t.batch_gpu or self.batch_per_rank
        self.accum_rounds = self.batch_per_rank // self.batch_gpu
        self.cur_nimg, self.step, self.skipped_steps = 0, 0, 0

    def _grid_profile(self) -> Any:
        """For ``sampler.steps_from=infonoise[...]`` (InfoGrid): the live InfoNoise profile's step density."""
        parsed = parse_infogrid(self.cfg.sampler.get("steps_from"))
        if parsed is None:
            return None
        if not hasattr(self.schedule, "step_density"):
            raise ConfigError(f"sampler.steps_from={self.cfg.sampler.steps_from} places steps by a learned InfoNoise "
                              f"profile, but this run trains with schedule={self.cfg.schedule.name}; use "
                              "schedule=infonoise or another sampler.steps_from")
        variant, weight = parsed
        return self.schedule.step_density(variant, **({} if weight is None else {"edm_weight": weight}))

    # --- set-up that only real runs need ---------------------------------------------------------------------------

    def _build_optimisation(self) -> None:
        t = self.cfg.train
        self.ema = EMA(self.denoiser, halflife_kimg=t.ema_halflife_kimg, rampup_ratio=t.ema_rampup_ratio)
        fused = (t.fused_adam is True or (t.fused_adam == "auto" and self.device.type == "cuda")) or None
        self.optimizer = torch.optim.Adam(self.denoiser.parameters(), lr=t.lr, betas=tuple(t.betas), eps=t.eps,
                                          weight_decay=t.weight_decay, fused=fused)
        self.autocast_dtype = _PRECISIONS[t.precision]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=t.precision == "fp16")
        self.model: torch.nn.Module = self.denoiser
        if self.dist.distributed:
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.denoiser, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.forward = torch.compile(self.model) if t.compile else self.model
        # The global-batch noise stream (same seed on every rank); dropout and augmentation use the per-rank RNG.
        self.noise_generator = torch.Generator(device=self.device).manual_seed(self.cfg.seed)

    def _resume(self, run_dir: Path, resolved: dict) -> None:
        cfg = self.cfg
        ckpt_path = None
        if cfg.resume == "auto":
            ckpt_path = latest_checkpoint(run_dir)
        elif cfg.resume is not None:
            ckpt_path = resolve_checkpoint(cfg.resume)
        if ckpt_path is None:
            return
        state = load_checkpoint(ckpt_path)
        diffs = config_differences(state["config"], resolved)
        if diffs:
            raise ConfigError(f"cannot resume {ckpt_path}: its config differs from this run's in\n  "
                              + "\n  ".join(diffs))
        self.denoiser.load_state_dict(state["net"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        if "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        progress = state["progress"]
        self.cur_nimg, self.step = int(progress["cur_nimg"]), int(progress["step"])
        self.skipped_steps = int(progress.get("skipped_steps", 0))
        # Per-process state (RNG streams, an adaptive schedule's not-yet-reduced statistics) is stored per rank.
        rng_states, schedule_states = state["rng"], state["schedule"]
        same_world = len(rng_states) == self.world
        self.schedule.load_state_dict(schedule_states[self.rank if same_world else 0])
        if same_world:
            _set_rng_state(rng_states[self.rank], self.noise_generator)
        else:
            # The global-batch noise stream is the same on every rank, so it carries over to any number of processes.
            self.noise_generator.set_state(rng_states[0]["noise"])
            if self.dist.is_main:
                log.warning("checkpoint was written by %d processes, this run has %d: per-process RNG streams "
                            "(dropout, augmentation) are re-seeded and every rank starts from rank 0's schedule "
                            "state", len(rng_states), self.world)
        if self.dist.is_main:
            log.info("resumed from %s at %.1f kimg (step %d)", ckpt_path, self.cur_nimg / 1000, self.step)

    def _data_stream(self):
        sampler = InfiniteSampler(len(self.dataset), seed=self.cfg.seed, rank=self.rank, world_size=self.world,
                                  start=self.cur_nimg, batch_size_per_rank=self.batch_per_rank)
        # The loader gets its own generator: creating its iterator draws a base seed, which must not come from (and
        # shift) the global RNG that the noise and σ draws use — otherwise a resumed run would diverge.
        generator = torch.Generator().manual_seed(self.cfg.seed * 1000 + self.rank)
        workers = self.cfg.train.num_workers
        loader = torch.utils.data.DataLoader(self.dataset, sampler=sampler, batch_size=self.batch_gpu,
                                             num_workers=workers, pin_memory=self.device.type == "cuda",
                                             persistent_workers=workers > 0, generator=generator)
        return iter(loader)

    def _batch_indices(self, start_nimg: int) -> list[int]:
        """The dataset indices this rank trained on in the step that began at ``start_nimg`` (for error reports)."""
        n = len(self.dataset)
        first = start_nimg + self.rank * self.batch_per_rank
        out = []
        for p in range(first, first + self.batch_per_rank):
            out.append(int(epoch_permutation(n, self.cfg.seed, p // n)[p % n]))
        return out

    # --- one optimisation step ---------------------------------------------------------------------------------------

    def _train_step(self, batches) -> dict[str, Any]:
        t, device = self.cfg.train, self.device
        lr = t.lr * (min(self.cur_nimg / (t.lr_rampup_kimg * 1000.0), 1.0) if t.lr_rampup_kimg > 0 else 1.0)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        mse_sum = torch.zeros((), dtype=torch.float64, device=device)
        sigmas = []
        # σ, noise and label-dropout decisions for the whole *global* batch come from one generator that is identical
        # on every rank; each (rank, accumulation round) uses its slice. The result therefore does not depend on how
        # the batch is split over processes and rounds (up to float summation order).
        shape = (self.dataset.num_channels, self.dataset.resolution, self.dataset.resolution)
        sigma_all, noise_all = self.loss_fn.draw(self.batch, shape, device, generator=self.noise_generator)
        keep_all = None
        if self.label_dim and t.label_dropout > 0:
            keep_all = torch.rand(self.batch, 1, device=device, generator=self.noise_generator) >= t.label_dropout
        for round_idx in range(self.accum_rounds):
            lo = self.rank * self.batch_per_rank + round_idx * self.batch_gpu
            part = slice(lo, lo + self.batch_gpu)
            images, labels = next(batches)
            images = to_model_space(images.to(device, non_blocking=True))
            augment_labels = None
            if self.augment is not None:
                images, augment_labels = self.augment(images)
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            onehot = None
            if self.label_dim:
                onehot = torch.nn.functional.one_hot(labels.to(device).long(), self.label_dim).float()
                if keep_all is not None:
                    onehot = onehot * keep_all[part]
            sync = round_idx == self.accum_rounds - 1 or not self.dist.distributed
            with contextlib.nullcontext() if sync else self.model.no_sync():
                with (torch.autocast(device.type, dtype=self.autocast_dtype) if self.autocast_dtype is not None
                      else contextlib.nullcontext()):
                    out = self.loss_fn(self.forward, images, class_labels=onehot, augment_labels=augment_labels,
                                       sigma=sigma_all[part], noise=noise_all[part])
                self.scaler.scale(out.loss.sum().div(self.batch_per_rank)).backward()
            self.schedule.update(out.sigma, out.mse)
            loss_sum += out.loss.detach().sum().double()
            mse_sum += out.mse.sum().double()
            sigmas.append(out.sigma.detach())

        # Non-finite check on the global loss and the (already all-reduced) gradient norm: every rank decides alike.
        self.scaler.unscale_(self.optimizer)
        max_norm = t.grad_clip if t.grad_clip is not None else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.denoiser.parameters(), max_norm)
        global_loss = all_reduce_sum(loss_sum.clone())
        finite = bool(torch.isfinite(global_loss)) and (t.precision == "fp16" or bool(torch.isfinite(grad_norm)))
        if finite:
            self.scaler.step(self.optimizer)
        self.scaler.update()
        start_nimg = self.cur_nimg
        self.cur_nimg += self.batch
        self.step += 1
        if not finite:
            self._non_finite(start_nimg, torch.cat(sigmas), global_loss, grad_norm)
        ema_beta = self.ema.update(self.denoiser, self.cur_nimg, self.batch)
        return {"lr": lr, "ema_beta": ema_beta, "loss_sum": loss_sum, "mse_sum": mse_sum, "grad_norm": grad_norm,
                "finite": finite}

    def _non_finite(self, start_nimg: int, sigma: torch.Tensor, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        what = "loss" if not torch.isfinite(loss) else "gradient"
        indices = self._batch_indices(start_nimg)
        shown = ", ".join(map(str, indices[:16])) + (", ..." if len(indices) > 16 else "")
        message = (f"non-finite {what} at step {self.step - 1} ({start_nimg / 1000:.3f} kimg): loss {float(loss)}, "
                   f"grad norm {float(grad_norm)}, σ in [{float(sigma.min()):.4g}, {float(sigma.max()):.4g}], "
                   f"dataset indices (rank {self.rank}) [{shown}]")
        if self.cfg.train.nonfinite == "stop":
            raise FloatingPointError(message + "; the last checkpoint is intact: resume from it with a lower train.lr"
                                     " or train.grad_clip, or set train.nonfinite=skip")
        self.skipped_steps += 1
        log.warning("%s — step skipped (%d so far)", message, self.skipped_steps)
        if self.skipped_steps > self.cfg.train.max_skipped_steps:
            raise FloatingPointError(f"{message}; more than train.max_skipped_steps="
                                     f"{self.cfg.train.max_skipped_steps} steps skipped")

    # --- checkpoints, grids, evaluation ------------------------------------------------------------------------------

    def _save(self, run_dir: Path, resolved: dict, final: bool = False) -> None:
        rng_states = all_gather_object(_rng_state(self.noise_generator))
        schedule_states = all_gather_object({k: v.cpu() for k, v in self.schedule.state_dict().items()})
        if self.dist.is_main:
            path = save_checkpoint(run_dir / "checkpoints" / checkpoint_name(self.cur_nimg), {
                "config": resolved,
                "geometry": {"img_resolution": self.dataset.resolution, "img_channels": self.dataset.num_channels,
                             "label_dim": self.label_dim, "augment_dim": self.augment_dim,
                             "latent_info": getattr(self.dataset, "latent_info", None)},
                "progress": {"cur_nimg": self.cur_nimg, "step": self.step, "skipped_steps": self.skipped_steps},
                "net": self.denoiser.state_dict(), "ema": self.ema.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                "schedule": schedule_states, "rng": rng_states,
            })
            keep_every = self.cfg.train.keep_every_kimg
            prune_checkpoints(run_dir, self.cfg.train.keep_checkpoints,
                              keep_every_nimg=None if not keep_every else int(round(keep_every * 1000)))
            log.info("saved %s%s", path, " (final)" if final else "")
            if final:
                export_safetensors(path, run_dir / "ema.safetensors", ema=True)
        barrier()

    def _evaluate(self, logger: RunLogger) -> None:
        """Periodic evaluation of the EMA model (``eval.every_kimg``) on rank 0, logged as ``eval/<metric>``."""
        if self.dist.is_main:
            import evaluate

            record = evaluate.evaluate_during_training(self.ema.model, self.cfg, self.dataset, self.device,
                                                       self.cur_nimg / 1000)
            logger.log({"step": self.step, **record})
            log.info("kimg %9.1f | %s", self.cur_nimg / 1000,
                     " | ".join(f"{k} {v:.4g}" for k, v in record.items() if k.startswith("eval/")
                                and isinstance(v, float)))
        barrier()

    def _schedule_report(self, run_dir: Path) -> None:
        """An adaptive schedule's picture of the run (InfoNoise: its profile and π over training)."""
        if not hasattr(self.schedule, "profile"):
            return
        from evaluation.infonoise_report import plot_infonoise_profile

        try:
            log.info("InfoNoise profile: %s", plot_infonoise_profile(run_dir))
        except (OSError, ValueError) as err:  # a missing picture must not fail a finished run
            log.warning("could not plot the InfoNoise profile: %s", err)

    def _latent_codec(self) -> Any:
        """The VAE decoder for grids of a latent-space run (loaded once), None for pixel data."""
        info = getattr(self.dataset, "latent_info", None)
        if info and not hasattr(self, "_codec"):
            from data import LatentCodec

            self._codec = LatentCodec.from_info(info, device=self.device)
        return getattr(self, "_codec", None)

    def _snapshot_grid(self, path: Path) -> None:
        from training.generate import generate_images, save_grid

        num = self.cfg.train.grid_seeds
        ema_model = self.ema.model
        images = generate_images(ema_model, list(range(num)), sampler_cfg=self.cfg.sampler,
                                 batch_size=min(num, 256), device=self.device,
                                 class_labels=_grid_labels(num, ema_model.label_dim), binary=self.dataset.binary,
                                 profile_schedule=self._grid_profile(), latent_codec=self._latent_codec())
        path.parent.mkdir(parents=True, exist_ok=True)
        save_grid(images, path)

    # --- the loop ----------------------------------------------------------------------------------------------------

    def run(self, run_dir: Path) -> Path:
        cfg, t = self.cfg, self.cfg.train
        resolved = to_plain_dict(cfg)
        self._build_optimisation()
        torch.manual_seed(cfg.seed + self.rank)  # per-rank noise streams (replaced by the checkpoint's on resume)
        self._resume(run_dir, resolved)
        batches = self._data_stream()
        logger = RunLogger(run_dir, cfg.logger, resolved, enabled=self.dist.is_main)
        if self.dist.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
            log.info("run directory: %s", run_dir)
            log.info(describe(self.denoiser, self.dataset))
            log.info("schedule: %s | weighting: %s | batch %d = %d process(es) x %d round(s) x %d | %s%s",
                     self.schedule, self.weighting, self.batch, self.world, self.accum_rounds, self.batch_gpu,
                     t.precision, f" | {self.augment}" if self.augment is not None else "")

        num_dims = self.dataset.num_channels * self.dataset.resolution**2
        tick = {"nimg": self.cur_nimg, "time": time.time(), "sums": torch.zeros(4, dtype=torch.float64,
                                                                                 device=self.device)}
        progress = None
        if self.dist.is_main:
            from tqdm import tqdm

            progress = tqdm(total=self.total_nimg, initial=self.cur_nimg, unit="img", unit_scale=True,
                            dynamic_ncols=True, desc="training", disable=None, mininterval=1.0)
        stop_flag = torch.zeros((), device=self.device)
        self.denoiser.train()
        try:
            with StopSignals() as signals:
                while self.cur_nimg < self.total_nimg:
                    prev_nimg = self.cur_nimg
                    stats = self._train_step(batches)
                    # loss, mse, images, grad norm (summed per tick; the norm is the same on every rank)
                    tick["sums"] += torch.stack([stats["loss_sum"], stats["mse_sum"],
                                                 stats["loss_sum"].new_tensor(self.batch_per_rank),
                                                 stats["grad_norm"].double() / self.world])
                    schedule_stats = self.schedule.on_step(self.step)
                    if progress is not None:
                        progress.update(self.cur_nimg - prev_nimg)
                    # Pre-emption: every rank must agree to stop at the same step.
                    stop_flag.fill_(1.0 if signals.received else 0.0)
                    stop = bool(all_reduce_sum(stop_flag) > 0) if self.dist.distributed else bool(signals.received)
                    done = self.cur_nimg >= self.total_nimg

                    if schedule_stats and self.dist.is_main:
                        logger.log({"kimg": self.cur_nimg / 1000, "step": self.step,
                                    **{f"schedule/{k}": v for k, v in schedule_stats.items()}})
                    if done or stop or _interval_due(prev_nimg, self.cur_nimg, t.tick_kimg):
                        self._log_tick(tick, stats, num_dims, logger, progress)
                    if self.dist.is_main and t.grid_seeds and (
                            done or _interval_due(prev_nimg, self.cur_nimg, t.snapshot_kimg)):
                        self._snapshot_grid(run_dir / "samples" / f"grid-{self.cur_nimg // 1000:06d}kimg.png")
                    if _interval_due(prev_nimg, self.cur_nimg, cfg.eval.get("every_kimg")):
                        self._evaluate(logger)
                    if done or stop or _interval_due(prev_nimg, self.cur_nimg, t.checkpoint_kimg):
                        self._save(run_dir, resolved, final=done)
                    if stop:
                        if self.dist.is_main:
                            log.info("%s received: checkpointed at %.3f kimg; continue with run_dir=%s resume=auto",
                                     signals.received or "stop signal", self.cur_nimg / 1000, run_dir)
                        if signals.received == "SIGUSR1" and t.slurm_requeue and self.dist.is_main:
                            _requeue_slurm_job()
                        break
        finally:
            if progress is not None:
                progress.close()
            logger.close()
        if self.dist.is_main and self.cur_nimg >= self.total_nimg:
            self._schedule_report(run_dir)
            log.info("done: %.1f kimg in %s", self.cur_nimg / 1000, run_dir)
        return run_dir

    def _log_tick(self, tick: dict, stats: dict, num_dims: int, logger: RunLogger, progress: Any) -> None:
        totals = all_reduce_sum(tick["sums"].clone())
        images = float(totals[2])
        elapsed = time.time() - tick["time"]
        kimg_done = (self.cur_nimg - tick["nimg"]) / 1000
        steps_done = max(kimg_done * 1000 / self.batch, 1e-9)
        record = {
            "kimg": self.cur_nimg / 1000, "step": self.step,
            "loss": float(totals[0]) / max(images, 1) / num_dims,  # weighted loss per dimension
            "mse": float(totals[1]) / max(images, 1) / num_dims,  # unweighted ‖D − y‖² per dimension
            "grad_norm": float(totals[3]) / steps_done,
            "lr": stats["lr"], "ema_beta": stats["ema_beta"], "skipped_steps": self.skipped_steps,
            "img_per_s": kimg_done * 1000 / max(elapsed, 1e-9),
            "sec_per_kimg": elapsed / max(kimg_done, 1e-9),
            "time": time.time(),
        }
        if self.device.type == "cuda":
            record["peak_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        if self.dist.is_main:
            logger.log(record)
            if progress is not None and not progress.disable:
                progress.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)
            log.info("kimg %9.1f | step %7d | loss %.4f | %8.1f img/s | lr %.2e", record["kimg"], self.step,
                     record["loss"], record["img_per_s"], stats["lr"])
        tick["sums"].zero_()
        tick["nimg"], tick["time"] = self.cur_nimg, time.time()


def train(cfg: DictConfig, dist_info: DistInfo | None = None) -> Path | None:
    """Run (or resume) the training job described by ``cfg``; returns the run directory (None for dry runs)."""
    dist_info = dist_info or init_distributed(cfg.device)
    trainer = Trainer(cfg, dist_info)
    if cfg.dry_run:
        if dist_info.is_main:
            print(OmegaConf.to_yaml(cfg, resolve=True))
            print(f"schedule: {trainer.schedule}\nweighting: {trainer.weighting}")
            if trainer.augment is not None:
                print(f"augmentation: {trainer.augment}")
            print(describe(trainer.denoiser, trainer.dataset))
            flops = _flops_line(trainer.denoiser.net, trainer.dataset, trainer.label_dim)
            if flops:
                print(flops)
        return None
    run_dir = Path(broadcast_object(str(_run_dir(cfg))))  # every rank uses rank 0's directory (only rank 0 writes)
    return trainer.run(run_dir)


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
    # A dry run only prints: it creates no run directory.
    if "dry_run=true" in sys.argv[1:] and "-m" not in sys.argv[1:] and "--multirun" not in sys.argv[1:]:
        sys.argv += ["hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=stdout"]
    hydra.main(version_base="1.3", config_path="configs", config_name="train")(main)()


if __name__ == "__main__":
    _entry()
