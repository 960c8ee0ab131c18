"""Per-image random streams: image i of a batch draws all its randomness from its own generator seeded with seed_i.

This is what makes a generated image depend only on its seed — not on the batch size, the batch composition or the
number of ranks it was generated on — for the initial latent and for the stochastic samplers' fresh noise alike.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


class PerImageNoise:
    """A stack of ``torch.Generator``s, one per image, seeded with ``seeds`` (on ``device``)."""

    def __init__(self, seeds: Sequence[int], device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.generators = []
        for seed in seeds:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(int(seed) % (1 << 63))
            self.generators.append(gen)

    def __len__(self) -> int:
        return len(self.generators)

    def randn(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> Tensor:
        """Standard normal noise of shape [len(seeds), *shape]; row i comes from generator i."""
        rows = [torch.randn(tuple(shape), generator=g, device=self.device, dtype=dtype) for g in self.generators]
        return torch.stack(rows)

    def randn_like(self, x: Tensor) -> Tensor:
        if x.shape[0] != len(self.generators):
            raise ValueError(f"batch of {x.shape[0]} images but {len(self.generators)} generators")
        return self.randn(x.shape[1:], dtype=x.dtype)
