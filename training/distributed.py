"""Process-group set-up for multi-process training and sampling (``torchrun``, SLURM), and small collective helpers.

``torchrun`` (and ``submitit`` under SLURM) start one process per device and set RANK, WORLD_SIZE and LOCAL_RANK
(SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID are used when only those exist). ``init_distributed`` turns that into a
process group — NCCL on CUDA, gloo on CPU — and pins each process to its device. With a single process nothing is
initialised and every helper below degrades to the single-process case.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(*names: str, default: int) -> int:
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            return int(value)
    return default


def resolve_device(spec: str, local_rank: int = 0) -> torch.device:
    """'auto' → the local rank's GPU when CUDA is available, else CPU; otherwise ``torch.device(spec)``."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={spec} requested but CUDA is not available; use device=cpu or device=auto")
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
    return device


def init_distributed(device_spec: str = "auto", timeout_s: int = 1800) -> DistInfo:
    """Initialise the default process group if this process was launched as one of several."""
    world_size = _env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)
    rank = _env_int("RANK", "SLURM_PROCID", default=0)
    local_rank = _env_int("LOCAL_RANK", "SLURM_LOCALID", default=0)
    device = resolve_device(device_spec, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ and "SLURM_JOB_NODELIST" in os.environ:
            _rendezvous_from_slurm()
        if "MASTER_ADDR" not in os.environ:
            raise RuntimeError("WORLD_SIZE > 1 but MASTER_ADDR is not set: launch multi-process runs with torchrun "
                               "(or hydra/launcher=submitit_slurm), which sets the rendezvous variables")
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def _rendezvous_from_slurm() -> None:
    """Under SLURM without torchrun (e.g. hydra/launcher=submitit_slurm, one task per GPU): the first node of the job
    is the rendezvous host and the port is derived from the job id, so every task computes the same address."""
    import subprocess

    nodelist = os.environ["SLURM_JOB_NODELIST"]
    try:
        hosts = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                               check=True, timeout=60).stdout.split()
    except (OSError, subprocess.SubprocessError):
        hosts = [nodelist.split(",")[0].split("[")[0]]  # a single host, or a best effort without scontrol
    os.environ["MASTER_ADDR"] = hosts[0]
    os.environ.setdefault("MASTER_PORT", str(20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000))


def shutdown_distributed() -> None:
    """Barrier, then destroy the process group (without the barrier gloo jobs sometimes abort at exit)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (no-op for one process); returns the tensor."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(obj, src: int = 0):
    """``obj`` from rank ``src`` on every rank."""
    if not is_distributed():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def all_gather_object(obj) -> list:
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
