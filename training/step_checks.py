"""What the training step needs to know from the device, found out without waiting for it.

On a GPU every read of a device value on the host (``bool(t)``, ``t.item()``, ``float(t)``, ``t.cpu()``) stalls the
host until the device has finished all queued work: the next step cannot be queued while the current one runs, and
CUDA-graph capture or whole-step compilation become impossible. The step therefore keeps its checks on the device:

- **Non-finite steps** (``train.nonfinite``). Each step computes a device flag ``bad`` = the global loss or the global
  gradient norm is not finite (fp16: the loss only; gradient overflow is the loss scaler's business) and keeps it,
  with that step's loss, gradient norm and σ range, in a list. ``NonFiniteGuard.check`` reads the list once, at the
  next *boundary* — a step after which the Trainer logs a tick, writes a grid or a checkpoint, evaluates or stops — and
  reports exactly as a per-step check would: the step, its kimg, the σ range and the dataset indices of its images.
  Since every checkpoint is written at a boundary, after the check, a checkpoint never holds an unreported
  non-finite update.

  ``stop`` raises at the boundary (the steps after the bad one are wasted, nothing of them is saved). ``skip`` must
  leave the weights as if the step had not happened, decided on the device: a fused optimizer (CUDA's default) gets
  the flag as its ``found_inf`` (the kernel skips the update and undoes its step count, the mechanism of
  ``torch.amp.GradScaler``); another optimizer on the CPU has its parameters and state snapshotted before the step
  and restored with ``torch.where`` (exact: each element is either the old or the new value); anywhere else (a
  non-fused optimizer on a GPU) the flag is read on the host before the step, as before.
- **Stopping together** (``StopVote``). Under DDP every rank must stop at the same step after SIGTERM/SIGUSR1. The
  local flags are summed with an all-reduce whose result is read one step later, by when it has arrived: the ranks
  agree, one step late, and the host never waits for the current step.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from training.distributed import all_reduce_sum
from training.step import batch_indices, non_finite_message, zero_nonfinite_gradients

log = logging.getLogger("sigmalab.train")


@dataclass
class _StepRecord:
    """One step's non-finite evidence, still on the device."""

    step: int          # the step's index (0-based: the number of steps before it)
    start_nimg: int    # images seen before it
    bad: torch.Tensor  # bool, 0-dim
    loss: torch.Tensor
    grad_norm: torch.Tensor
    sigma: torch.Tensor  # this rank's σ of the step


class NonFiniteGuard:
    """``train.nonfinite`` without host synchronisation: flags kept on the device, read at boundaries (see above)."""

    def __init__(self, mode: str, *, fp16: bool, device: torch.device, num_images: int, seed: int, rank: int,
                 batch_per_rank: int, max_skipped: int):
        self.mode, self.fp16, self.device = mode, fp16, device
        self.num_images, self.seed, self.rank, self.batch_per_rank = num_images, seed, rank, batch_per_rank
        self.max_skipped = max_skipped
        self.pending: list[_StepRecord] = []

    # --- during the step -----------------------------------------------------------------------------------------

    def flag(self, global_loss: torch.Tensor, grad_norm: torch.Tensor | None) -> torch.Tensor | None:
        """The device flag of a non-finite step (None with ``nonfinite=zero``, which never skips); the loss alone
        when ``grad_norm`` is None or in fp16."""
        if self.mode == "zero":
            return None
        bad = ~torch.isfinite(global_loss)
        if not self.fp16 and grad_norm is not None:
            bad = bad | ~torch.isfinite(grad_norm)
        return bad

    def poison_for_scaler(self, bad: torch.Tensor | None, grads: list[torch.Tensor]) -> None:
        """fp16 with ``skip``: a non-finite loss makes every gradient NaN (a multiply by 1 otherwise, exact), so that
        the loss scaler's own ``found_inf`` skips the step and backs off the scale, on the device."""
        if bad is None or self.mode != "skip" or not grads:
            return
        factor = torch.where(bad, torch.full((), float("nan"), device=bad.device),
                             torch.ones((), device=bad.device))
        torch._foreach_mul_(grads, factor)

    def update(self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, params: list[torch.Tensor],
               global_loss: torch.Tensor, grad_clip: float | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """After the backward pass: unscale (fp16), the global gradient norm (one pass; the scaling pass only when
        clipping at ``grad_clip``), the non-finite flag, the optimizer step under the policy, the loss scaler's
        update. Returns (gradient norm, flag), both on the device."""
        grads = [p.grad for p in params if p.grad is not None]
        if scaler.is_enabled():  # fp16 + skip: a non-finite loss becomes non-finite gradients for the scaler
            self.poison_for_scaler(self.flag(global_loss, None), grads)
        scaler.unscale_(optimizer)
        if self.mode == "zero":  # EDM2: NaN/inf gradient elements become 0, the step is taken
            zero_nonfinite_gradients(params)
        grad_norm = torch.nn.utils.get_total_norm(grads)
        if grad_clip is not None:
            torch.nn.utils.clip_grads_with_norm_(params, grad_clip, grad_norm)
        bad = self.flag(global_loss, grad_norm)
        self.optimizer_step(optimizer, scaler, bad)
        scaler.update()
        return grad_norm, bad

    def optimizer_step(self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                       bad: torch.Tensor | None) -> None:
        """``scaler.step(optimizer)``, skipped on the device when ``bad`` and ``nonfinite=skip``."""
        if bad is None or self.mode != "skip" or scaler.is_enabled():
            # stop: the run raises at the next boundary, before any save; zero: always step; fp16: the loss scaler
            # skips non-finite gradients itself (poison_for_scaler made a non-finite loss one).
            scaler.step(optimizer)
            return
        if _is_fused(optimizer):
            optimizer.found_inf = bad.to(torch.float32)
            try:
                optimizer.step()
            finally:
                del optimizer.found_inf
        elif self.device.type == "cpu":
            _masked_step(optimizer, bad)
        elif not bool(bad):  # a non-fused optimizer on an accelerator: the one host read left (use fused Adam)
            optimizer.step()

    def record(self, step: int, start_nimg: int, bad: torch.Tensor | None, loss: torch.Tensor,
               grad_norm: torch.Tensor, sigma: torch.Tensor) -> None:
        if bad is not None:
            self.pending.append(_StepRecord(step, start_nimg, bad, loss, grad_norm, sigma))

    # --- at a boundary -------------------------------------------------------------------------------------------

    def check(self, skipped_steps: int, on_skip: Callable[[int], None]) -> None:
        """Read the flags of the steps since the last boundary (one host read); report each non-finite step: raise
        (``stop``) or count it as skipped (``skip``: ``on_skip`` gets the new count of skipped steps, then raise once
        more than ``max_skipped`` were)."""
        if not self.pending:
            return
        pending, self.pending = self.pending, []
        flags = torch.stack([r.bad for r in pending]).tolist()
        for record, bad in zip(pending, flags, strict=True):
            if not bad:
                continue
            indices = batch_indices(self.num_images, self.seed, record.start_nimg + self.rank * self.batch_per_rank,
                                    self.batch_per_rank)
            message = non_finite_message(record.step, record.start_nimg, record.loss, record.grad_norm,
                                         record.sigma, self.rank, indices)
            if self.mode == "stop":
                raise FloatingPointError(message + "; the last checkpoint is intact: resume from it with a lower "
                                         "train.lr or train.grad_clip, or set train.nonfinite=skip")
            skipped_steps += 1
            on_skip(skipped_steps)
            log.warning("%s — step skipped (%d so far)", message, skipped_steps)
            if skipped_steps > self.max_skipped:
                raise FloatingPointError(f"{message}; more than train.max_skipped_steps={self.max_skipped} steps "
                                         "skipped")


def _is_fused(optimizer: torch.optim.Optimizer) -> bool:
    return all(group.get("fused") for group in optimizer.param_groups)


@torch.no_grad()
def _masked_step(optimizer: torch.optim.Optimizer, bad: torch.Tensor) -> None:
    """``optimizer.step()`` whose effect is undone element by element where ``bad``: parameters and per-parameter
    state return to their values before the step (state the step created returns to zero), the step count to its
    old value. No host read; costs a copy of the parameters and state per step (``nonfinite=skip`` on CPU only)."""
    saved = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is None:
                continue
            state = optimizer.state.get(p, {})
            saved.append((p, p.detach().clone(), {k: v.clone() for k, v in state.items()
                                                  if torch.is_tensor(v) and k != "step"}))
    optimizer.step()
    for p, p_old, state_old in saved:
        p.copy_(torch.where(bad, p_old, p))
        for key, value in optimizer.state[p].items():
            if not torch.is_tensor(value):
                continue
            if key == "step":
                value.sub_(bad.to(value.dtype))
            else:
                old = state_old.get(key)
                value.copy_(torch.where(bad, torch.zeros_like(value) if old is None else old, value))


class StopVote:
    """Whether every rank should stop (a stop signal reached any of them), agreed one step late without a host wait.

    ``vote(local)`` all-reduces this step's local flag and returns the verdict of the previous step's vote, whose
    result has arrived by then (a pinned host copy and a CUDA event; gloo's all-reduce is synchronous anyway). A single
    process needs no vote: its own flag is the answer, at once."""

    def __init__(self, device: torch.device, distributed: bool):
        self.device, self.distributed = device, distributed
        self.cuda = device.type == "cuda"
        self._previous: tuple[torch.Tensor, torch.cuda.Event | None] | None = None
        self._buffers = [torch.zeros((), pin_memory=self.cuda) for _ in range(2)] if distributed else []
        self._turn = 0

    def vote(self, local: bool) -> bool:
        if not self.distributed:
            return local
        flag = torch.full((), 1.0 if local else 0.0, device=self.device)  # a fill kernel: no host-to-device copy
        all_reduce_sum(flag)
        host = self._buffers[self._turn]
        self._turn ^= 1
        host.copy_(flag, non_blocking=self.cuda)
        event = None
        if self.cuda:
            event = torch.cuda.Event()
            event.record()
        previous, self._previous = self._previous, (host, event)
        if previous is None:
            return False
        if previous[1] is not None:
            previous[1].synchronize()  # the previous step's vote: done long ago, unless the device is a step behind
        return bool(previous[0] > 0)
