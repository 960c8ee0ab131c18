"""Splitting an evaluation's images over the ranks of a torchrun job and gathering the results in order.

Image i always comes from seed ``first + i``; rank r of w works on the contiguous slice ``rank_slice(n, r, w)`` and
the parts are concatenated in rank order, so the result is the one of a single process whatever the number of
ranks.

What crosses ranks is small: the features of the images (``gather_to_main``: rank 0 receives every rank's rows in
rank order, in chunks of at most ``GATHER_CHUNK_BYTES`` per message, so no rank ever holds another's images), the
likelihood's per-image numbers (``gather_rows``). Where images themselves must reach rank 0 (``eval.save_samples``),
``gather_to_main`` hands each chunk to a sink that writes it out, so rank 0 holds one chunk at a time: 50,000
ImageNet-512 images are about 39 GB, their Inception features 0.4 GB.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from training.distributed import all_gather_object, get_rank, get_world_size, is_distributed

__all__ = ["GATHER_CHUNK_BYTES", "rank_slice", "rank_split", "gather_rows", "gather_to_main"]

GATHER_CHUNK_BYTES = 64 * 2**20  # largest message of gather_to_main (per chunk; one chunk in flight at a time)


def rank_slice(n: int, rank: int, world: int) -> range:
    """Contiguous part ``rank`` of ``world`` of range(n) (sizes differ by at most one; in rank order they tile n)."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def rank_split(distributed: bool) -> tuple[bool, int, int]:
    """(whether to split over a process group, this rank, the world size); (False, 0, 1) without a group."""
    on = bool(distributed) and is_distributed()
    return on, (get_rank() if on else 0), (get_world_size() if on else 1)


def gather_rows(part: Tensor, distributed: bool) -> Tensor:
    """Concatenate every rank's rows in rank order (on every rank); identity without a process group. For small
    results (per-image numbers); features and images go through ``gather_to_main``."""
    if not distributed:
        return part
    parts = [p for p in all_gather_object(part.cpu()) if p.numel()]
    return torch.cat(parts) if parts else part


def _comm_device() -> torch.device:
    """Where tensors must be for the process group's backend (NCCL: this rank's GPU)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_to_main(part: Tensor, distributed: bool, sink: Callable[[Tensor], None] | None = None,
                   chunk_bytes: int = GATHER_CHUNK_BYTES) -> Tensor | None:
    """Every rank's rows, in rank order, on rank 0 only; the other ranks get None.

    Each rank sends its rows to rank 0 in chunks of at most ``chunk_bytes`` (point to point, one rank after the
    other, so that the rows arrive in order). With ``sink``, rank 0 hands every chunk to it (its own rows first) and
    keeps nothing: memory stays bounded by one chunk whatever the number of rows. Without a process group: ``part``
    itself (or ``sink(part)``). Ranks may hold no rows; every rank must call it.
    """
    if not distributed:
        if sink is None:
            return part
        sink(part)
        return None
    rank, world = get_rank(), get_world_size()
    shapes = all_gather_object((tuple(part.shape), str(part.dtype).removeprefix("torch.")))
    row_shape, dtype = next(((s[1:], d) for s, d in shapes if s[0]), (tuple(part.shape[1:]), str(part.dtype)))
    dtype = getattr(torch, dtype.removeprefix("torch."))
    row_bytes = max(1, int(torch.Size(row_shape).numel()) * torch.empty((), dtype=dtype).element_size())
    chunk_rows = max(1, chunk_bytes // row_bytes)
    device = _comm_device()
    kept: list[Tensor] = []
    take = sink if sink is not None else kept.append
    if rank == 0 and part.shape[0]:
        for start in range(0, part.shape[0], chunk_rows):
            take(part[start:start + chunk_rows].cpu())
    for src in range(1, world):
        rows = shapes[src][0][0]
        for start in range(0, rows, chunk_rows):
            n = min(chunk_rows, rows - start)
            if rank == src:
                dist.send(part[start:start + n].contiguous().to(device), dst=0)
            elif rank == 0:
                buffer = torch.empty((n, *row_shape), dtype=dtype, device=device)
                dist.recv(buffer, src=src)
                take(buffer.cpu())
    if rank != 0:
        return None
    if sink is not None:
        return None
    return torch.cat(kept) if kept else part[:0].cpu()
