"""Deterministic, resumable sampling for data-parallel training.

Every rank computes the same epoch permutation from ``(seed, epoch)`` and takes every
``world_size``-th sample starting at its rank, so ranks see disjoint shards. ``consumed_samples``
counts samples of this epoch already consumed by *all* ranks together (as Megatron counts them): a job
restarted with that number sees exactly the samples it had not seen.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from ..errors import ConfigError


def epoch_permutation(num_samples: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The global sample order of one epoch."""
    if not shuffle:
        return np.arange(num_samples)
    return np.random.default_rng((seed, epoch)).permutation(num_samples)


class DistributedShuffleSampler:
    """Indices for one rank and one epoch (a `torch.utils.data.Sampler`-compatible iterable).

    With `drop_last` the epoch is cut to a multiple of `world_size` so every rank gets as many
    samples; without it the permutation is padded by wrapping around.
    """

    def __init__(
        self,
        num_samples: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        epoch: int = 0,
        consumed_samples: int = 0,
        *,
        shuffle: bool = True,
        drop_last: bool = True,
    ):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is not in [0, world_size={world_size})")
        if num_samples < world_size:
            raise ConfigError(f"{num_samples} samples cannot feed {world_size} ranks")
        self.num_samples, self.rank, self.world_size = num_samples, rank, world_size
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        per_rank = num_samples // world_size if drop_last else -(-num_samples // world_size)
        self.samples_per_epoch = per_rank * world_size
        self.set_epoch(epoch, consumed_samples)

    def set_epoch(self, epoch: int, consumed_samples: int = 0) -> None:
        """Start `epoch`, skipping the first `consumed_samples` (global count, a multiple of world_size)."""
        if consumed_samples % self.world_size or not 0 <= consumed_samples <= self.samples_per_epoch:
            raise ConfigError(
                f"consumed_samples {consumed_samples} must be a multiple of world_size {self.world_size} "
                f"in [0, {self.samples_per_epoch}]"
            )
        self.epoch, self.consumed_samples = epoch, consumed_samples

    def __len__(self) -> int:
        return (self.samples_per_epoch - self.consumed_samples) // self.world_size

    def __iter__(self) -> Iterator[int]:
        order = epoch_permutation(self.num_samples, self.seed, self.epoch, self.shuffle)
        if self.samples_per_epoch > len(order):
            order = np.concatenate([order, order[: self.samples_per_epoch - len(order)]])
        mine = order[self.consumed_samples + self.rank : self.samples_per_epoch : self.world_size]
        return iter(mine.tolist())
