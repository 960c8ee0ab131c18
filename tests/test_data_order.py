"""Tests of data.order.InfiniteSampler: epoch coverage across ranks, exact resumption, seeding, sharding layout."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from data import InfiniteSampler


def take(sampler, count):
    return list(itertools.islice(iter(sampler), count))


def global_stream(n, seed, world_size, b, steps, shuffle=True, start=0):
    """Rebuild the global stream by interleaving the ranks' batches: step s = rank 0's b, rank 1's b, ..."""
    per_rank = [
        take(
            InfiniteSampler(
                n, seed=seed, rank=r, world_size=world_size, batch_size_per_rank=b, shuffle=shuffle, start=start
            ),
            steps * b,
        )
        for r in range(world_size)
    ]
    return [i for s in range(steps) for r in range(world_size) for i in per_rank[r][s * b : (s + 1) * b]]


@pytest.mark.parametrize("n,b", [(10, 3), (12, 3), (7, 5)])
def test_two_ranks_cover_each_epoch_exactly_once(n, b):
    world, steps = 2, 11
    stream = global_stream(n, seed=3, world_size=world, b=b, steps=steps)
    epochs = len(stream) // n
    assert epochs >= 3
    for e in range(epochs):
        assert sorted(stream[e * n : (e + 1) * n]) == list(range(n)), f"epoch {e}"
    # epochs are shuffled differently
    assert stream[:n] != stream[n : 2 * n]


def test_unshuffled_layout_closed_form():
    # without shuffling stream[p] = p mod n, and rank r's j-th item of step s is stream[s*B + r*b + j]
    n, b, world = 7, 2, 3
    B = b * world
    for r in range(world):
        got = take(InfiniteSampler(n, seed=0, rank=r, world_size=world, batch_size_per_rank=b, shuffle=False), 5 * b)
        expected = [(s * B + r * b + j) % n for s in range(5) for j in range(b)]
        assert got == expected


@pytest.mark.parametrize("world", [1, 2])
def test_resume_from_start_is_exact_continuation(world):
    n, b, seed = 13, 4, 7
    B = b * world
    for r in range(world):
        full = take(InfiniteSampler(n, seed=seed, rank=r, world_size=world, batch_size_per_rank=b), 40 * b)
        for k in (1, 3, 10, 17):
            resumed = InfiniteSampler(n, seed=seed, rank=r, world_size=world, batch_size_per_rank=b, start=k * B)
            assert take(resumed, 20 * b) == full[k * b : (k + 20) * b], (r, k)


def test_seeds_give_different_orders_and_same_seed_same_order():
    a = take(InfiniteSampler(100, seed=0, batch_size_per_rank=10), 300)
    assert a == take(InfiniteSampler(100, seed=0, batch_size_per_rank=10), 300)
    assert a != take(InfiniteSampler(100, seed=1, batch_size_per_rank=10), 300)
    # iterating again restarts at `start`
    s = InfiniteSampler(100, seed=0, batch_size_per_rank=10)
    assert take(s, 50) == take(s, 50)


def test_dataloader_batches_follow_global_layout():
    n, b, world = 9, 2, 2
    data = TensorDataset(torch.arange(n))
    stream = global_stream(n, seed=5, world_size=world, b=b, steps=6)
    for r in range(world):
        sampler = InfiniteSampler(n, seed=5, rank=r, world_size=world, batch_size_per_rank=b)
        batches = [batch[0].tolist() for batch in itertools.islice(DataLoader(data, batch_size=b, sampler=sampler), 6)]
        assert batches == [stream[s * b * world + r * b : s * b * world + (r + 1) * b] for s in range(6)]


def test_bad_arguments():
    with pytest.raises(ValueError, match="multiple of the global batch 8"):
        InfiniteSampler(10, seed=0, rank=0, world_size=2, batch_size_per_rank=4, start=4)
    with pytest.raises(ValueError, match="rank"):
        InfiniteSampler(10, seed=0, rank=2, world_size=2, batch_size_per_rank=4)
    with pytest.raises(ValueError, match="dataset_size"):
        InfiniteSampler(0, seed=0, batch_size_per_rank=4)
    with pytest.raises(ValueError, match="batch_size_per_rank"):
        InfiniteSampler(10, seed=0, batch_size_per_rank=0)
