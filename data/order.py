"""The data order: ``InfiniteSampler``, an infinite, DDP-sharded, resumable stream of dataset indices (a torch
``Sampler`` for the ``DataLoader``) whose state is a single number: the global image position.

The global stream of indices is epoch after epoch of a permutation of 0..n-1:

    stream[p] = perm_e[p mod n],  e = p div n,  perm_e = torch.randperm(n, generator=seeded(seed, e))

(``perm_e = arange(n)`` without shuffling), where ``seeded(seed, e)`` is a torch generator seeded from
``numpy.random.SeedSequence([seed, e])``. With b = batch_size_per_rank and B = b * world_size, global batch s covers
stream positions [s B, (s + 1) B) and rank r takes the slice [s B + r b, s B + (r + 1) b). An ``InfiniteSampler``
built with ``start = cur_nimg`` (a multiple of B) yields exactly what an uninterrupted one would yield from that point
on, so a resumed run needs no data-order state. Memory is one permutation (the current epoch's); each epoch costs one
``randperm``.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler

__all__ = ["InfiniteSampler", "epoch_permutation"]


def epoch_permutation(n: int, seed: int, epoch: int, shuffle: bool = True) -> torch.Tensor:
    """The order of epoch ``epoch`` of the global stream: int64 [n]."""
    if not shuffle:
        return torch.arange(n)
    state = np.random.SeedSequence([int(seed), int(epoch)]).generate_state(1, dtype=np.uint64)[0]
    generator = torch.Generator().manual_seed(int(state))
    return torch.randperm(n, generator=generator)


class InfiniteSampler(Sampler[int]):
    """Yields this rank's dataset indices forever, starting at global stream position ``start`` (see module doc).

    Iterating again starts again at ``start``. Use with ``DataLoader(dataset, batch_size=batch_size_per_rank,
    sampler=...)``: the k-th batch of rank r is then slice r of global batch ``start / B + k``.
    """

    def __init__(
        self,
        dataset_size: int,
        *,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        start: int = 0,
        batch_size_per_rank: int,
    ) -> None:
        if dataset_size <= 0:
            raise ValueError(f"dataset_size must be positive, got {dataset_size}")
        if seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed}")
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if batch_size_per_rank <= 0:
            raise ValueError(f"batch_size_per_rank must be positive, got {batch_size_per_rank}")
        global_batch = batch_size_per_rank * world_size
        if start < 0 or start % global_batch:
            raise ValueError(
                f"start={start} must be a non-negative multiple of the global batch {global_batch} "
                f"(batch_size_per_rank={batch_size_per_rank} x world_size={world_size})"
            )
        self.dataset_size = int(dataset_size)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.shuffle = bool(shuffle)
        self.start = int(start)
        self.batch_size_per_rank = int(batch_size_per_rank)
        self.global_batch = global_batch

    def __iter__(self) -> Iterator[int]:
        n, b, B = self.dataset_size, self.batch_size_per_rank, self.global_batch  # noqa: N806
        epoch, order = -1, []
        p = self.start + self.rank * b  # first stream position of this rank's slice of the current global batch
        while True:
            for q in range(p, p + b):
                e, i = divmod(q, n)
                if e != epoch:
                    epoch, order = e, epoch_permutation(n, self.seed, e, self.shuffle).tolist()
                yield order[i]
            p += B
