"""The training loop: build a run from its config, resume it, step, log, snapshot, evaluate and checkpoint.

Budgets and intervals are counted in images (kimg), like EDM (Karras et al. 2022, arXiv 2206.00364). One training
step: draw a global batch, split it over processes and gradient-accumulation rounds, compute the schedule-sampled,
weighted denoising loss (``diffusion.loss``), take an Adam step with a linearly ramped learning rate, update the EMA,
and let the schedule observe the per-sample errors (adaptive schedules such as InfoNoise, Raya et al. 2026,
arXiv 2602.18647, rebuild themselves from them). Between *boundaries* (a step after which a tick, grid, evaluation,
checkpoint or stop is due) nothing is read back from the device: the non-finite check is kept there and reported at
the next boundary (``training.step_checks``), so the host never waits for a GPU in the steady state.

The run directory holds ``config.yaml`` (resolved), ``metrics.jsonl`` (one JSON object per tick, ``training.logger``),
``train.log``, ``samples/grid-<kimg>kimg.png``, ``checkpoints/checkpoint-<nimg>.pt`` (see ``training.checkpoint``)
and, at the end, ``ema.safetensors``. A resumed run is identical to an uninterrupted one on CPU (same parameters bit
for bit): the data order is a pure function of (seed, images seen), and the checkpoint carries the model, EMA,
optimizer, schedule state and every RNG state (``training.rng``). SIGTERM / SIGUSR1 (cluster pre-emption) write a
checkpoint and exit with status 0 (``training.run_dir``).

Evaluation sits above training, so what needs it comes in as hooks from the entry point (``train.py``):
``evaluate_fn`` (periodic evaluation of the EMA model, ``eval.every_kimg``), ``preflight`` (the check, at start-up,
that this evaluation can run: weights, reference files, data) and ``plot_profile`` (the figure of an adaptive
schedule's learned profile at the end of a run). A failing preflight stops the run before its first step; an
evaluation that fails later is logged (``eval/error`` in metrics.jsonl and wandb, with the kimg) and training goes on.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from configs import to_plain_dict
from configs.validation import ConfigError, config_differences, validate_train_config
from data import LatentCodec, build_augment_pipe, build_dataset
from data.order import InfiniteSampler
from diffusion.loss import DenoisingLoss
from diffusion.samplers import sampler_options
from diffusion.schedules import build_schedule
from diffusion.sigma_grids import build_sigma_grid, parse_infogrid
from diffusion.weighting import build_weighting
from training.checkpoint import (
    checkpoint_name,
    export_safetensors,
    latest_checkpoint,
    load_checkpoint,
    optional_entries,
    prune_checkpoints,
    resolve_checkpoint,
    restore_optional_entries,
    save_checkpoint,
)
from training.denoiser import build_denoiser, build_uncertainty
from training.distributed import (
    DistInfo,
    all_gather_object,
    all_reduce_sum,
    barrier,
    broadcast_object,
    init_distributed,
)
from training.generate import generate_images, grid_context, save_grid
from training.logger import RunLogger, TickMeter
from training.posthoc_ema import build_ema
from training.rng import capture_rng_state, restore_rng_state
from training.run_dir import StopSignals, requeue_slurm_job, resolve_run_dir
from training.run_info import describe, print_summary
from training.step import (
    NONFINITE_MODES,
    PRECISIONS,
    autocast,
    build_adam,
    grid_labels,
    interval_due,
    learning_rate,
    loader_settings,
    micro_batch,
    set_adam_implementation,
    setup_backends,
)
from training.step_checks import NonFiniteGuard, StopVote

log = logging.getLogger("sigmalab.train")

_CONV_ARCHS = ("songunet", "dhariwalunet")

# evaluate_fn(ema_model, cfg, dataset, device, cur_kimg) -> {"kimg": ..., "eval/<metric>": ...}
EvaluateFn = Callable[[torch.nn.Module, Any, Any, torch.device, float], dict[str, Any]]
# plot_profile(run_dir) -> the path of the figure written
PlotProfileFn = Callable[[Path], Path]
# preflight(cfg, dataset) -> anything; raises when the evaluation of eval.every_kimg cannot run
PreflightFn = Callable[[Any, Any], Any]


@dataclass
class _Run:
    """What one call of ``Trainer.run`` works with besides the Trainer itself."""

    run_dir: Path
    resolved: dict
    logger: RunLogger
    meter: TickMeter
    progress: Any  # a tqdm bar on rank 0, else None


class Trainer:
    """One training run: builds everything from ``cfg``, resumes, loops, checkpoints.

    ``evaluate_fn`` is called on rank 0 every ``eval.every_kimg`` with the EMA model (required when that is set),
    ``preflight`` on rank 0 when a run starts (with ``eval.every_kimg``); ``plot_profile`` at the end of a finished
    run whose schedule has a learned profile (InfoNoise).
    """

    def __init__(self, cfg: DictConfig, dist_info: DistInfo, *, evaluate_fn: EvaluateFn | None = None,
                 plot_profile: PlotProfileFn | None = None, preflight: PreflightFn | None = None):
        self.cfg, self.dist = cfg, dist_info
        self.device, self.rank, self.world = dist_info.device, dist_info.rank, dist_info.world_size
        self.evaluate_fn, self.plot_profile = evaluate_fn, plot_profile
        self.preflight = preflight
        self._check_config()
        setup_backends(cfg.train, self.device)
        self._build_data()
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self._build_denoiser()
        self._build_objective()
        # The sampler config is used only for sample grids and evaluation: check it now, not hours into the run.
        build_sigma_grid(cfg.sampler, schedule_context=grid_context(self.denoiser),  # the grid sampling will use
                         profile_schedule=self._grid_profile())
        sampler_options(cfg.sampler)
        t = cfg.train
        self.batch = t.batch
        self.batch_per_rank = t.batch // self.world
        self.batch_gpu = t.batch_gpu or self.batch_per_rank
        self.accum_rounds = self.batch_per_rank // self.batch_gpu
        self.cur_nimg, self.step, self.skipped_steps = 0, 0, 0
        self._codec: LatentCodec | None = None

    def _check_config(self) -> None:
        t = self.cfg.train
        validate_train_config(self.cfg, world_size=self.world)
        if t.precision not in PRECISIONS:
            raise ConfigError(f"train.precision: must be one of {', '.join(PRECISIONS)}, got {t.precision!r}")
        if t.nonfinite not in NONFINITE_MODES:
            raise ConfigError(f"train.nonfinite: must be one of {', '.join(NONFINITE_MODES)}, got {t.nonfinite!r}")
        every = self.cfg.eval.get("every_kimg")
        if every and self.evaluate_fn is None:
            raise ConfigError(f"eval.every_kimg={every} asks for evaluation during training, but no evaluation hook "
                              "was given: run train.py, or pass evaluate_fn to training.trainer.train / Trainer")

    def _build_data(self) -> None:
        self.dataset = build_dataset(self.cfg.data, split="train")
        self.augment = build_augment_pipe(self.cfg.data)
        self.label_dim = self.dataset.label_dim
        self.augment_dim = self.augment.augment_dim if self.augment is not None else 0
        self.num_dims = self.dataset.num_channels * self.dataset.resolution**2

    def _build_denoiser(self) -> None:
        cfg, t = self.cfg, self.cfg.train
        self.denoiser = build_denoiser(cfg, img_resolution=self.dataset.resolution,
                                       img_channels=self.dataset.num_channels, label_dim=self.label_dim,
                                       augment_dim=self.augment_dim,
                                       latent_info=getattr(self.dataset, "latent_info", None)).to(self.device)
        self.channels_last = (t.channels_last is True or (t.channels_last == "auto" and self.device.type == "cuda"
                                                          and cfg.model.get("arch") in _CONV_ARCHS))
        if self.channels_last:
            self.denoiser.to(memory_format=torch.channels_last)

    def _build_objective(self) -> None:
        """The loss weighting, the training noise schedule and the denoising loss built from them."""
        cfg = self.cfg
        # weighting=edm2_uncertainty: the learned u(σ), trained with the denoiser (None for the fixed weightings).
        self.uncertainty = build_uncertainty(cfg)
        if self.uncertainty is not None:
            self.uncertainty.to(self.device)
        self.weighting = build_weighting(cfg.weighting, img_resolution=self.dataset.resolution,
                                         sigma_data=cfg.precond.sigma_data, uncertainty=self.uncertainty)
        self.total_nimg = int(round(cfg.train.total_kimg * 1000))
        self.schedule = build_schedule(cfg.schedule, weighting=self.weighting, img_resolution=self.dataset.resolution,
                                       image_resolution=getattr(self.dataset, "image_resolution", None),
                                       sigma_data=cfg.precond.sigma_data, total_nimg=self.total_nimg,
                                       batch_size=cfg.train.batch, num_dims=self.num_dims).to(self.device)
        self.weighting.attach_schedule(self.schedule)  # only the importance weighting uses the sampling density
        # σ's i.i.d. or stratified over the global batch (train_step draws it whole: the same on any world size).
        self.loss_fn = DenoisingLoss(self.schedule, self.weighting, sigma_draw=cfg.train.get("sigma_draw", "iid"))

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

    def build_optimisation(self) -> None:
        """The EMA, the optimizer, the loss scaler, the (DDP-wrapped, compiled) model and the noise generator."""
        t = self.cfg.train
        self.ema = build_ema(self.denoiser, t)  # train.ema: halflife (EDM) | power (EDM2, training.posthoc_ema)
        self.optimizer = build_adam(self.trained_parameters(), t, self.device)  # fused on CUDA, else foreach
        self.autocast_dtype = PRECISIONS[t.precision]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=t.precision == "fp16")
        self.model: torch.nn.Module = self.denoiser
        if self.dist.distributed:
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.denoiser, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        # train.compile: one graph for the whole loss (noise, preconditioning, network, weighting, squared error).
        # Under DDP the wrapped network is compiled instead: PyTorch's DDPOptimizer then splits its graph at the
        # gradient buckets, which needs the DDP module to be the compiled one.
        self.forward = torch.compile(self.model) if t.compile and self.dist.distributed else self.model
        self.loss_terms = torch.compile(self._loss_terms) if t.compile and not self.dist.distributed \
            else self._loss_terms
        self.guard = NonFiniteGuard(t.nonfinite, fp16=t.precision == "fp16", device=self.device,
                                    num_images=len(self.dataset), seed=self.cfg.seed, rank=self.rank,
                                    batch_per_rank=self.batch_per_rank, max_skipped=t.max_skipped_steps)
        self.stop_vote = StopVote(self.device, self.dist.distributed)
        # The global-batch noise stream (same seed on every rank); dropout and augmentation use the per-rank RNG.
        self.noise_generator = torch.Generator(device=self.device).manual_seed(self.cfg.seed)

    def trained_parameters(self) -> list[torch.nn.Parameter]:
        """What the optimizer trains: the denoiser's parameters, then the learned u(σ)'s (edm2_uncertainty)."""
        extra = [] if self.uncertainty is None else list(self.uncertainty.parameters())
        return list(self.denoiser.parameters()) + extra

    def data_stream(self) -> Iterator:
        """This rank's (images, labels) micro-batches, continuing the run's data order from ``cur_nimg``."""
        sampler = InfiniteSampler(len(self.dataset), seed=self.cfg.seed, rank=self.rank, world_size=self.world,
                                  start=self.cur_nimg, batch_size_per_rank=self.batch_per_rank)
        # The loader gets its own generator: creating its iterator draws a base seed, which must not come from (and
        # shift) the global RNG that the noise and σ draws use — otherwise a resumed run would diverge.
        generator = torch.Generator().manual_seed(self.cfg.seed * 1000 + self.rank)
        workers, pin, why = loader_settings(self.cfg.train.num_workers, self.device)
        self.loader_workers = workers
        if self.dist.is_main:
            log.info("data loader: %d worker process(es)%s (%s)", workers, ", pinned memory" if pin else "", why)
        loader = torch.utils.data.DataLoader(self.dataset, sampler=sampler, batch_size=self.batch_gpu,
                                             num_workers=workers, pin_memory=pin, persistent_workers=workers > 0,
                                             generator=generator)
        return iter(loader)

    def _loss_terms(self, images: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor, class_labels: Any,
                    augment_labels: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-sample weighted loss and unweighted error of one micro-batch (what ``train.compile`` compiles)."""
        out = self.loss_fn(self.forward, images, class_labels=class_labels, augment_labels=augment_labels,
                           sigma=sigma, noise=noise)
        return out.loss, out.mse

    # --- one optimisation step ---------------------------------------------------------------------------------------

    def train_step(self, batches: Iterator) -> dict[str, Any]:
        """One optimizer step on one global batch; returns its ``lr``, ``ema_beta``, this rank's ``loss_sum`` and
        ``mse_sum``, the global ``grad_norm`` and ``bad``, the device flag of a non-finite step (None with
        ``nonfinite=zero``). Reads nothing back from the device: ``self.guard.check`` reports non-finite steps."""
        t, device = self.cfg.train, self.device
        lr = learning_rate(t, self.cur_nimg)
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
            images, onehot, augment_labels = micro_batch(
                batches, device, augment=self.augment, channels_last=self.channels_last, label_dim=self.label_dim,
                keep=None if keep_all is None else keep_all[part])
            sync = round_idx == self.accum_rounds - 1 or not self.dist.distributed
            with contextlib.nullcontext() if sync else self.model.no_sync():
                with autocast(device, self.autocast_dtype):
                    loss, mse = self.loss_terms(images, sigma_all[part], noise_all[part], onehot, augment_labels)
                self.scaler.scale(loss.sum().div(self.batch_per_rank)).backward()
            self.schedule.update(sigma_all[part], mse)
            loss_sum += loss.detach().sum().double()
            mse_sum += mse.sum().double()
            sigmas.append(sigma_all[part])

        if self.dist.distributed and self.uncertainty is not None:  # DDP averages only the denoiser's gradients
            for p in self.uncertainty.parameters():
                if p.grad is not None:
                    all_reduce_sum(p.grad).div_(self.world)
        # Non-finite check on the global loss and the (already all-reduced) gradient norm: every rank decides alike,
        # on the device (training.step_checks: a skip happens there, the report at the next boundary).
        global_loss = all_reduce_sum(loss_sum.clone())
        grad_norm, bad = self.guard.update(self.optimizer, self.scaler, self.trained_parameters(), global_loss,
                                           grad_clip=t.grad_clip)
        self.guard.record(self.step, self.cur_nimg, bad, global_loss, grad_norm,
                          sigmas[0] if len(sigmas) == 1 else torch.cat(sigmas))
        self.cur_nimg += self.batch
        self.step += 1
        ema_beta = self.ema.update(self.denoiser, self.cur_nimg, self.batch)
        return {"lr": lr, "ema_beta": ema_beta, "loss_sum": loss_sum, "mse_sum": mse_sum, "grad_norm": grad_norm,
                "bad": bad}

    # --- checkpoints -------------------------------------------------------------------------------------------------

    def _save(self, run_dir: Path, resolved: dict, final: bool = False) -> None:
        """A checkpoint of the run (a collective call); the final one is also exported as ``ema.safetensors``."""
        rng_states = all_gather_object(capture_rng_state(self.noise_generator))
        schedule_states = all_gather_object({k: v.cpu() for k, v in self.schedule.state_dict().items()})
        if self.dist.is_main:
            path = save_checkpoint(run_dir / "checkpoints" / checkpoint_name(self.cur_nimg), {
                "config": resolved,
                "geometry": self._geometry(),
                "progress": {"cur_nimg": self.cur_nimg, "step": self.step, "skipped_steps": self.skipped_steps},
                "net": self.denoiser.state_dict(), "ema": self.ema.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                "schedule": schedule_states, "rng": rng_states, **optional_entries(self.ema, self.uncertainty),
            })
            keep_every = self.cfg.train.keep_every_kimg
            prune_checkpoints(run_dir, self.cfg.train.keep_checkpoints,
                              keep_every_nimg=None if not keep_every else int(round(keep_every * 1000)))
            log.info("saved %s%s", path, " (final)" if final else "")
            if final:
                export_safetensors(path, run_dir / "ema.safetensors", ema=True)
        barrier()

    def _geometry(self) -> dict[str, Any]:
        return {"img_resolution": self.dataset.resolution, "img_channels": self.dataset.num_channels,
                "label_dim": self.label_dim, "augment_dim": self.augment_dim,
                "latent_info": getattr(self.dataset, "latent_info", None)}

    def _save_ema_snapshots(self, run_dir: Path, resolved: dict) -> None:
        """train.ema=power: low-precision snapshots of every EMA profile (rank 0), for post-hoc EMA."""
        if self.dist.is_main and hasattr(self.ema, "save_snapshots"):
            t = self.cfg.train
            paths = self.ema.save_snapshots(run_dir, self.cur_nimg, self.step, self.batch, t.ema_snapshot_dtype,
                                            resolved, self._geometry())
            log.info("EMA snapshots at %.1f kimg: %s", self.cur_nimg / 1000, ", ".join(p.name for p in paths))

    def _resume(self, run_dir: Path, resolved: dict) -> None:
        """Continue from ``resume`` (auto: the newest checkpoint of ``run_dir``, if any) when its config matches."""
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
        self._restore(state)
        if self.dist.is_main:
            log.info("resumed from %s at %.1f kimg (step %d)", ckpt_path, self.cur_nimg / 1000, self.step)

    def _restore(self, state: dict[str, Any]) -> None:
        self.denoiser.load_state_dict(state["net"])
        self.ema.load_state_dict(state["ema"])
        restore_optional_entries(state, self.ema, self.uncertainty)  # train.ema=power, weighting=edm2_uncertainty
        fused = all(group.get("fused") for group in self.optimizer.param_groups)
        self.optimizer.load_state_dict(state["optimizer"])
        set_adam_implementation(self.optimizer, fused)  # this run's, not the checkpoint's (fused / foreach)
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
            restore_rng_state(rng_states[self.rank], self.noise_generator)
        else:
            # The global-batch noise stream is the same on every rank, so it carries over to any number of processes.
            self.noise_generator.set_state(rng_states[0]["noise"])
            if self.dist.is_main:
                log.warning("checkpoint was written by %d processes, this run has %d: per-process RNG streams "
                            "(dropout, augmentation) are re-seeded and every rank starts from rank 0's schedule "
                            "state", len(rng_states), self.world)

    # --- grids, evaluation, reports ----------------------------------------------------------------------------------

    def _preflight_evaluation(self) -> None:
        """With ``eval.every_kimg``: the ``preflight`` hook on rank 0, before the first step; if it fails, every rank
        stops with its message."""
        if not self.cfg.eval.get("every_kimg") or self.preflight is None:
            return
        failure = None
        if self.dist.is_main:
            try:
                self.preflight(self.cfg, self.dataset)
            except Exception as err:  # noqa: BLE001 - reported on every rank below
                failure = f"{type(err).__name__}: {err}"
        failure = broadcast_object(failure)
        if failure is not None:
            raise ConfigError(f"eval.every_kimg={self.cfg.eval.every_kimg}: the evaluation during training cannot "
                              f"run ({failure}); fix that, or set eval.every_kimg=null")

    def _evaluate(self, logger: RunLogger) -> None:
        """Periodic evaluation of the EMA model (``eval.every_kimg``) on rank 0, logged as ``eval/<metric>``. An error
        is logged instead (``eval/error`` with the kimg; the traceback in train.log) and training goes on."""
        if self.dist.is_main:
            kimg = self.cur_nimg / 1000
            try:
                record = self.evaluate_fn(self.ema.model, self.cfg, self.dataset, self.device, kimg)
            except Exception as err:  # noqa: BLE001 - a failed evaluation must not end the training run
                log.warning("evaluation at %.1f kimg failed; training goes on", kimg, exc_info=True)
                record = {"kimg": kimg, "eval/error": f"{type(err).__name__}: {err}"}
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
            logger.log({"step": self.step, **record})
            log.info("kimg %9.1f | %s", self.cur_nimg / 1000,
                     " | ".join(f"{k} {v:.4g}" for k, v in record.items() if k.startswith("eval/")
                                and isinstance(v, float)))
        barrier()

    def _schedule_report(self, run_dir: Path) -> None:
        """An adaptive schedule's picture of the run (InfoNoise: its profile and π over training)."""
        if self.plot_profile is None or not hasattr(self.schedule, "profile"):
            return
        try:
            log.info("InfoNoise profile: %s", self.plot_profile(run_dir))
        except (OSError, ValueError) as err:  # a missing picture must not fail a finished run
            log.warning("could not plot the InfoNoise profile: %s", err)

    def _latent_codec(self) -> LatentCodec | None:
        """The VAE decoder for grids of a latent-space run (loaded once), None for pixel data."""
        info = getattr(self.dataset, "latent_info", None)
        if info and self._codec is None:
            self._codec = LatentCodec.from_info(info, device=self.device)
        return self._codec

    def _snapshot_grid(self, path: Path) -> None:
        num = self.cfg.train.grid_seeds
        ema_model = self.ema.model
        images = generate_images(ema_model, list(range(num)), sampler_cfg=self.cfg.sampler,
                                 batch_size=min(num, 256), device=self.device,
                                 class_labels=grid_labels(num, ema_model.label_dim), binary=self.dataset.binary,
                                 profile_schedule=self._grid_profile(), latent_codec=self._latent_codec())
        path.parent.mkdir(parents=True, exist_ok=True)
        save_grid(images, path)

    # --- the loop ----------------------------------------------------------------------------------------------------

    def run(self, run_dir: Path) -> Path:
        """Train until ``train.total_kimg`` (or a stop signal), resuming per ``resume``; returns ``run_dir``."""
        cfg = self.cfg
        resolved = to_plain_dict(cfg)
        self._preflight_evaluation()
        self.build_optimisation()
        torch.manual_seed(cfg.seed + self.rank)  # per-rank noise streams (replaced by the checkpoint's on resume)
        self._resume(run_dir, resolved)
        batches = self.data_stream()
        logger = RunLogger(run_dir, cfg.logger, resolved, enabled=self.dist.is_main)
        if self.dist.is_main:
            self._start_run_dir(run_dir)
        run = _Run(run_dir, resolved, logger, TickMeter(self.cur_nimg, self.device), self._progress_bar())
        self.denoiser.train()
        try:
            with StopSignals() as signals:
                self._loop(run, batches, signals)
        finally:
            if run.progress is not None:
                run.progress.close()
            logger.close()
        if self.dist.is_main and self.cur_nimg >= self.total_nimg:
            self._schedule_report(run_dir)
            log.info("done: %.1f kimg in %s", self.cur_nimg / 1000, run_dir)
        return run_dir

    def _start_run_dir(self, run_dir: Path) -> None:
        """Rank 0: create the run directory, save the resolved config and log what is being trained."""
        t = self.cfg.train
        run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.cfg, run_dir / "config.yaml", resolve=True)
        log.info("run directory: %s", run_dir)
        log.info(describe(self.denoiser, self.dataset, self.uncertainty))
        log.info("schedule: %s | weighting: %s | batch %d = %d process(es) x %d round(s) x %d | %s%s",
                 self.schedule, self.weighting, self.batch, self.world, self.accum_rounds, self.batch_gpu,
                 t.precision, f" | {self.augment}" if self.augment is not None else "")

    def _progress_bar(self) -> Any:
        if not self.dist.is_main:
            return None
        from tqdm import tqdm

        return tqdm(total=self.total_nimg, initial=self.cur_nimg, unit="img", unit_scale=True, dynamic_ncols=True,
                    desc="training", disable=None, mininterval=1.0)

    def _loop(self, run: _Run, batches: Iterator, signals: StopSignals) -> None:
        """Steps until the budget or a stop. Between boundaries (``_boundary``) nothing is read from the device."""
        while self.cur_nimg < self.total_nimg:
            prev_nimg = self.cur_nimg
            try:
                stats = self.train_step(batches)
                run.meter.add(stats, self.batch_per_rank, self.world)
                schedule_stats = self.schedule.on_step(self.step)
            except Exception:
                # A failure that follows an unreported non-finite step (an adaptive schedule fed NaN errors, say) is
                # reported as that step's fault.
                self._report_nonfinite()
                raise
            if run.progress is not None:
                run.progress.update(self.cur_nimg - prev_nimg)
            if schedule_stats and self.dist.is_main:
                run.logger.log({"kimg": self.cur_nimg / 1000, "step": self.step,
                                **{f"schedule/{k}": v for k, v in schedule_stats.items()}})
            # Pre-emption: every rank must agree to stop at the same step (under DDP: one step after the signal).
            stop = self.stop_vote.vote(signals.received is not None)
            if self._boundary(prev_nimg, stop):
                # Non-finite steps since the last boundary are reported (or counted) before anything is logged or
                # saved, so no checkpoint holds an unreported non-finite update.
                self._report_nonfinite()
                self._periodic(run, prev_nimg, stats, stop)
            if stop:
                self._stopped(run.run_dir, signals.received)
                break

    def _report_nonfinite(self) -> None:
        """Raise for (``nonfinite=stop``) or count (``skip``) the non-finite steps since the last boundary."""
        self.guard.check(self.skipped_steps, on_skip=lambda n: setattr(self, "skipped_steps", n))

    def _boundary(self, prev_nimg: int, stop: bool) -> bool:
        """Whether anything falls due after the step that took ``prev_nimg`` to ``cur_nimg`` (alike on every rank)."""
        t = self.cfg.train
        intervals = (t.tick_kimg, t.snapshot_kimg if t.grid_seeds else None, self.cfg.eval.get("every_kimg"),
                     t.get("ema_snapshot_kimg"), t.checkpoint_kimg)
        return (stop or self.cur_nimg >= self.total_nimg
                or any(interval_due(prev_nimg, self.cur_nimg, every) for every in intervals))

    def _periodic(self, run: _Run, prev_nimg: int, stats: dict[str, Any], stop: bool) -> None:
        """What falls due after the step that took ``prev_nimg`` to ``cur_nimg``: the tick's metrics, a sample grid,
        an evaluation, EMA snapshots, a checkpoint (on their intervals; the tick and the checkpoint also at the end and
        on a stop)."""
        t = self.cfg.train
        done = self.cur_nimg >= self.total_nimg
        if done or stop or interval_due(prev_nimg, self.cur_nimg, t.tick_kimg):
            self._log_tick(run, stats)
        if self.dist.is_main and t.grid_seeds and (done or interval_due(prev_nimg, self.cur_nimg, t.snapshot_kimg)):
            self._snapshot_grid(run.run_dir / "samples" / f"grid-{self.cur_nimg // 1000:06d}kimg.png")
        if interval_due(prev_nimg, self.cur_nimg, self.cfg.eval.get("every_kimg")):
            self._evaluate(run.logger)
        # Before the checkpoint: a checkpoint at n images implies every EMA snapshot up to n was written.
        if done or interval_due(prev_nimg, self.cur_nimg, t.get("ema_snapshot_kimg")):
            self._save_ema_snapshots(run.run_dir, run.resolved)
        if done or stop or interval_due(prev_nimg, self.cur_nimg, t.checkpoint_kimg):
            self._save(run.run_dir, run.resolved, final=done)

    def _stopped(self, run_dir: Path, received: str | None) -> None:
        """After the checkpoint that a stop signal asked for: say how to continue; on SIGUSR1 requeue the job."""
        if self.dist.is_main:
            log.info("%s received: checkpointed at %.3f kimg; continue with run_dir=%s resume=auto",
                     received or "stop signal", self.cur_nimg / 1000, run_dir)
        if received == "SIGUSR1" and self.cfg.train.slurm_requeue and self.dist.is_main:
            requeue_slurm_job()

    def _log_tick(self, run: _Run, stats: dict[str, Any]) -> None:
        """The tick's metrics (a collective call) to ``metrics.jsonl``, the progress bar and the log."""
        record = run.meter.record(self.cur_nimg, self.step, self.batch, self.num_dims, lr=stats["lr"],
                                  ema_beta=stats["ema_beta"], skipped_steps=self.skipped_steps)
        if self.device.type == "cuda":
            record["peak_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        if self.dist.is_main:
            run.logger.log(record)
            if run.progress is not None and not run.progress.disable:
                run.progress.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)
            log.info("kimg %9.1f | step %7d | loss %.4f | %8.1f img/s | lr %.2e", record["kimg"], self.step,
                     record["loss"], record["img_per_s"], stats["lr"])
        run.meter.reset(self.cur_nimg)


def train(cfg: DictConfig, dist_info: DistInfo | None = None, *, evaluate_fn: EvaluateFn | None = None,
          plot_profile: PlotProfileFn | None = None, preflight: PreflightFn | None = None) -> Path | None:
    """Run (or resume) the training job described by ``cfg``; returns the run directory (None for dry runs).

    ``evaluate_fn``, ``preflight`` and ``plot_profile`` are the Trainer's evaluation hooks (``train.py`` passes
    evaluation's)."""
    dist_info = dist_info or init_distributed(cfg.device)
    trainer = Trainer(cfg, dist_info, evaluate_fn=evaluate_fn, plot_profile=plot_profile, preflight=preflight)
    if cfg.dry_run:
        if dist_info.is_main:
            print_summary(trainer)
        return None
    # Every rank uses rank 0's directory (only rank 0 writes).
    run_dir = Path(broadcast_object(str(resolve_run_dir(cfg))))
    return trainer.run(run_dir)
