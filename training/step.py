"""The pieces of one optimisation step that need no Trainer: the learning-rate ramp, preparing a micro-batch,
mixed precision, the optimizer and the loader settings, the intervals of the loop, and naming the images of a step
that went non-finite.

``Trainer.train_step`` (``training.trainer``) puts them together.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from typing import Any

import torch

from data import to_model_space
from data.order import epoch_permutation

# train.precision -> the autocast dtype of the network's forward pass (None: plain fp32)
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


LR_SCHEDULES = ("constant", "edm2_inv_sqrt")


def learning_rate(train_cfg: Any, cur_nimg: int) -> float:
    """``train.lr``, ramped up linearly over the first ``train.lr_rampup_kimg`` (none when that is 0).

    ``train.lr_schedule=edm2_inv_sqrt`` also decays it as EDM2 (Karras et al. 2024, arXiv 2312.02696, Sec. 2,
    config B): lr = train.lr / √max(t / t_ref, 1), t the images seen and t_ref = ``train.lr_ref_kimg`` (EDM2's
    "decay" in batches times the batch: 70k x 2048 images at img512, 35k x 2048 at img64), times the same warm-up.
    A pure function of the images seen, so a resumed run continues it exactly."""
    t = train_cfg
    lr = t.lr
    if t.get("lr_schedule", "constant") == "edm2_inv_sqrt":
        lr = lr / math.sqrt(max(cur_nimg / (t.lr_ref_kimg * 1000.0), 1.0))
    return lr * (min(cur_nimg / (t.lr_rampup_kimg * 1000.0), 1.0) if t.lr_rampup_kimg > 0 else 1.0)


NONFINITE_MODES = ("stop", "skip", "zero")


@torch.no_grad()
def zero_nonfinite_gradients(parameters: Iterator[torch.Tensor]) -> None:
    """``train.nonfinite=zero``, what EDM2's training code does (Karras et al. 2024, arXiv 2312.02696): every NaN or
    ±inf gradient element becomes 0 and the step is taken; in place, on the device, no host synchronisation."""
    for p in parameters:
        if p.grad is not None:
            torch.nan_to_num_(p.grad, nan=0.0, posinf=0.0, neginf=0.0)


def interval_due(prev_nimg: int, cur_nimg: int, every_kimg: float | None) -> bool:
    """True when a multiple of ``every_kimg`` was crossed between prev_nimg (exclusive) and cur_nimg (inclusive)."""
    if not every_kimg:
        return False
    every = every_kimg * 1000.0
    return math.floor(cur_nimg / every) > math.floor(prev_nimg / every)


def grid_labels(num: int, label_dim: int) -> torch.Tensor | None:
    """Class labels for a sample grid: class i on row i (cycling), so a conditional grid reads class by class."""
    if not label_dim:
        return None
    side = max(1, int(math.ceil(math.sqrt(num))))
    return torch.arange(num) // side % label_dim


def setup_backends(train_cfg: Any, device: torch.device) -> None:
    """On CUDA: TF32 matmuls and convolutions as ``train.tf32`` says, and cuDNN's autotuner (fixed shapes)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = bool(train_cfg.tf32)
        torch.backends.cudnn.allow_tf32 = bool(train_cfg.tf32)
        torch.backends.cudnn.benchmark = True


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast to ``dtype`` on ``device``'s type, or nothing for fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def build_adam(params: list[torch.nn.Parameter], train_cfg: Any, device: torch.device) -> torch.optim.Adam:
    """Adam with ``train.lr``, ``betas``, ``eps``, ``weight_decay``, in its fastest exact implementation:
    ``train.fused_adam`` auto = the fused kernel on CUDA, the multi-tensor (foreach) one elsewhere; true = fused
    everywhere (CPU included); false = foreach. On the CPU foreach gives the same numbers, bit for bit, as PyTorch's
    default per-parameter loop (the fused CPU kernel does not), with one launch per operation for all tensors."""
    t = train_cfg
    fused = t.fused_adam is True or (t.fused_adam == "auto" and device.type == "cuda")
    return torch.optim.Adam(params, lr=t.lr, betas=tuple(t.betas), eps=t.eps, weight_decay=t.weight_decay,
                            fused=fused or None, foreach=None if fused else True)


def set_adam_implementation(optimizer: torch.optim.Optimizer, fused: bool) -> None:
    """After ``load_state_dict`` (which takes ``fused``/``foreach`` from the checkpoint): this run's implementation,
    with each parameter's step count where it expects it (fused: a float32 tensor on the parameter's device;
    foreach: on the CPU)."""
    for group in optimizer.param_groups:
        group["fused"], group["foreach"] = (True, None) if fused else (None, True)
        for p in group["params"]:
            step = optimizer.state.get(p, {}).get("step")
            if torch.is_tensor(step):
                optimizer.state[p]["step"] = step.to(p.device if fused else "cpu", torch.float32)


def loader_settings(num_workers: Any, device: torch.device) -> tuple[int, bool, str]:
    """(worker processes, pin_memory, why) of the training DataLoader for ``train.num_workers`` on ``device``.

    ``auto``: on a GPU, min(8, c − 1) workers, c = the CPUs this process may use divided by the processes on the
    node (torchrun's ``LOCAL_WORLD_SIZE``), and pinned memory, so that reading overlaps the step and copies to the
    device are asynchronous; on the CPU no workers: the step itself uses every core, a worker would take its threads
    away, and the in-memory datasets of CPU runs (the digits) cost under 1% of a step to read. A number is used as
    given (pinned memory on a GPU)."""
    cuda = device.type == "cuda"
    if num_workers != "auto":
        return int(num_workers), cuda, "train.num_workers"
    if not cuda:
        return 0, False, "auto: CPU training uses the cores itself"
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # set by torchrun
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    workers = max(1, min(8, cpus // max(local_world_size, 1) - 1))
    return workers, True, f"auto: {cpus} CPUs for {local_world_size} process(es) on this node"


def micro_batch(batches: Iterator, device: torch.device, *, augment: Any = None, channels_last: bool = False,
                label_dim: int = 0, keep: torch.Tensor | None = None) -> tuple[Any, Any, Any]:
    """The next (images, labels) of ``batches`` on ``device``, in model space: (images, one-hot labels or None,
    augment labels or None). ``augment`` is the augmentation pipe; ``keep`` the label-dropout mask of the slice of the
    global batch this micro-batch is (a dropped label becomes an all-zero one-hot vector)."""
    images, labels = next(batches)
    images = to_model_space(images.to(device, non_blocking=True))
    augment_labels = None
    if augment is not None:
        images, augment_labels = augment(images)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    onehot = None
    if label_dim:
        onehot = torch.nn.functional.one_hot(labels.to(device, non_blocking=True).long(), label_dim).float()
        if keep is not None:
            onehot = onehot * keep
    return images, onehot, augment_labels


def batch_indices(num_images: int, seed: int, first: int, count: int) -> list[int]:
    """The dataset indices at positions ``first`` .. ``first + count - 1`` of the run's data order (for reports)."""
    out = []
    for p in range(first, first + count):
        out.append(int(epoch_permutation(num_images, seed, p // num_images)[p % num_images]))
    return out


def non_finite_message(step: int, start_nimg: int, loss: torch.Tensor, grad_norm: torch.Tensor, sigma: torch.Tensor,
                       rank: int, indices: list[int]) -> str:
    """What went non-finite in ``step``, at which σ, and on which dataset images (the first 16 of this rank's)."""
    what = "loss" if not torch.isfinite(loss) else "gradient"
    shown = ", ".join(map(str, indices[:16])) + (", ..." if len(indices) > 16 else "")
    return (f"non-finite {what} at step {step} ({start_nimg / 1000:.3f} kimg): loss {float(loss)}, "
            f"grad norm {float(grad_norm)}, σ in [{float(sigma.min()):.4g}, {float(sigma.max()):.4g}], "
            f"dataset indices (rank {rank}) [{shown}]")
