"""Splitting an evaluation's images over the ranks of a torchrun job and gathering the results in order.

Image i always comes from seed ``first + i``; rank r of w works on the contiguous slice ``rank_slice(n, r, w)`` and
the parts are concatenated in rank order, so the result is the one of a single process whatever the number of
ranks.
"""

from __future__ import annotations

import torch
from torch import Tensor

from training.distributed import all_gather_object, get_rank, get_world_size, is_distributed

__all__ = ["rank_slice", "rank_split", "gather_rows"]


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
    """Concatenate every rank's rows in rank order (on every rank); identity without a process group."""
    if not distributed:
        return part
    parts = [p for p in all_gather_object(part.cpu()) if p.numel()]
    return torch.cat(parts) if parts else part

