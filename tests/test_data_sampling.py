"""Distributed samplers: disjoint deterministic shards, epoch shuffling, exact resume, token budgets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from prott5nv.data.batching import TokenBudgetBatchSampler, batch_stats, token_budget_batches
from prott5nv.data.sampler import DistributedShuffleSampler
from prott5nv.errors import ConfigError
from prott5nv.fasta import read_fasta


@pytest.fixture(scope="module")
def lengths(swissprot_2k: Path) -> list[int]:
    return [len(r.sequence) for r in read_fasta(swissprot_2k)]


def test_ranks_disjoint_and_cover_the_epoch() -> None:
    shards = [list(DistributedShuffleSampler(1003, r, 4, seed=9, epoch=0)) for r in range(4)]
    assert all(len(s) == 1003 // 4 for s in shards)
    seen = [i for s in shards for i in s]
    assert len(set(seen)) == len(seen) == 1000
    again = [list(DistributedShuffleSampler(1003, r, 4, seed=9, epoch=0)) for r in range(4)]
    assert again == shards
    assert list(DistributedShuffleSampler(1003, 0, 4, seed=9, epoch=1)) != shards[0]
    padded = [list(DistributedShuffleSampler(1003, r, 4, seed=9, drop_last=False)) for r in range(4)]
    assert {i for s in padded for i in s} == set(range(1003)) and all(len(s) == 251 for s in padded)
    assert list(DistributedShuffleSampler(10, 0, 1, shuffle=False)) == list(range(10))


def test_resume_sees_exactly_the_unseen_samples() -> None:
    world, consumed = 3, 3 * 57
    full = [list(DistributedShuffleSampler(500, r, world, seed=4, epoch=2)) for r in range(world)]
    for r in range(world):
        resumed = DistributedShuffleSampler(500, r, world, seed=4, epoch=2, consumed_samples=consumed)
        assert list(resumed) == full[r][consumed // world :] and len(resumed) == len(full[r]) - 57
    with pytest.raises(ConfigError, match="consumed_samples 100 must be a multiple of world_size 3"):
        DistributedShuffleSampler(500, 0, 3, consumed_samples=100)
    with pytest.raises(ConfigError, match=r"rank 3 is not in \[0, world_size=3\)"):
        DistributedShuffleSampler(500, 3, 3)


def test_token_budget_batch_sampler(lengths) -> None:
    world = 2
    samplers = [
        TokenBudgetBatchSampler(lengths, 8192, 64, rank=r, world_size=world, seed=1, bucket_size=500, max_length=510)
        for r in range(world)
    ]
    capped = np.minimum(lengths, 510)
    batches = [list(s) for s in samplers]
    assert len(batches[0]) == len(batches[1]) == len(samplers[0])
    flat = [i for rank in batches for b in rank for i in b]
    assert len(flat) == len(set(flat))
    for rank in batches:
        for b in rank:
            assert len(b) <= 64 and (len(b) * capped[b].max() <= 8192 or len(b) == 1)
    stats = samplers[0].stats()
    everything = samplers[0].epoch_batches()
    assert stats == batch_stats(capped.tolist(), everything)
    assert stats.tokens == capped[[i for b in everything for i in b]].sum()
    shuffled = batch_stats(capped.tolist(), token_budget_batches(capped.tolist(), 8192, 64, sort=False))
    assert stats.padding_waste < 0.05 < shuffled.padding_waste  # bucketing by length pays
    resumed = TokenBudgetBatchSampler(
        lengths, 8192, 64, rank=1, world_size=world, seed=1, bucket_size=500, max_length=510, consumed_batches=10
    )
    assert list(resumed) == batches[1][5:]
    samplers[0].set_epoch(1)
    assert list(samplers[0]) != batches[0]
