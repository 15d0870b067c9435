"""Token-budget batching: group sequences of similar length so padding is small and memory is bounded.

The cost of a batch is its padded size, ``len(batch) * max(lengths in batch)`` -- what the attention and
MLP actually compute -- as in fair-esm's `toks_per_batch`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError

#: Padded tokens per inference batch (embed, score, finetune/predict, the server): the one default.
DEFAULT_BATCH_TOKENS = 4096


@dataclass(frozen=True)
class BatchStats:
    batches: int
    tokens: int  # real tokens
    padded_tokens: int  # tokens including padding

    @property
    def padding_waste(self) -> float:
        """Fraction of computed positions that are padding."""
        return 1.0 - self.tokens / self.padded_tokens if self.padded_tokens else 0.0


def token_budget_batches(
    lengths: Sequence[int], max_tokens: int, max_seqs: int | None = None, *, sort: bool = True
) -> list[list[int]]:
    """Split indices ``0..len(lengths)-1`` into batches whose padded size stays within `max_tokens`
    (and at most `max_seqs` sequences). With `sort`, indices are taken longest first so each batch
    holds similar lengths; a single sequence longer than the budget forms a batch of its own.
    """
    if max_tokens <= 0:
        raise ValueError("max_tokens must be positive")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i]) if sort else list(range(len(lengths)))
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        n = lengths[i]
        new_longest = max(longest, n)
        too_many = max_seqs is not None and len(current) >= max_seqs
        if current and (new_longest * (len(current) + 1) > max_tokens or too_many):
            batches.append(current)
            current, new_longest = [], n
        current.append(i)
        longest = new_longest
    if current:
        batches.append(current)
    return batches


def batch_stats(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> BatchStats:
    tokens = sum(lengths[i] for b in batches for i in b)
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches if b)
    return BatchStats(batches=len(batches), tokens=tokens, padded_tokens=padded)


class TokenBudgetBatchSampler:
    """Training batches under a token budget, for one rank of a data-parallel job.

    Each epoch: shuffle all indices with ``(seed, epoch)``, cut the order into buckets of `bucket_size`
    sequences, batch each bucket with :func:`token_budget_batches` (similar lengths together, padded size
    within `max_tokens`), shuffle the batches, cut to a multiple of `world_size` and give rank r every
    `world_size`-th batch from r. `consumed_batches` (global, all ranks) resumes inside an epoch.
    Lengths are capped at `max_length` (the masked sample's length), so the cost matches what is computed.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        max_tokens: int,
        max_seqs: int | None = None,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        epoch: int = 0,
        consumed_batches: int = 0,
        bucket_size: int = 10_000,
        max_length: int | None = None,
    ):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is not in [0, world_size={world_size})")
        lengths = np.asarray(lengths, dtype=np.int64)
        self.lengths = np.minimum(lengths, max_length) if max_length is not None else lengths
        self.max_tokens, self.max_seqs, self.bucket_size = max_tokens, max_seqs, bucket_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.epoch, self.consumed_batches = epoch, consumed_batches
        if consumed_batches % world_size:
            raise ConfigError(f"consumed_batches {consumed_batches}: not a multiple of {world_size} ranks")

    def set_epoch(self, epoch: int, consumed_batches: int = 0) -> None:
        self.epoch, self.consumed_batches = epoch, consumed_batches

    def epoch_batches(self) -> list[list[int]]:
        """All ranks' batches of the current epoch, in global order (cut to a multiple of world_size)."""
        rng = np.random.default_rng((self.seed, self.epoch))
        order = rng.permutation(len(self.lengths))
        batches: list[list[int]] = []
        for a in range(0, len(order), self.bucket_size):
            bucket = order[a : a + self.bucket_size]
            for b in token_budget_batches(self.lengths[bucket].tolist(), self.max_tokens, self.max_seqs):
                batches.append(bucket[b].tolist())
        perm = rng.permutation(len(batches))
        usable = len(batches) - len(batches) % self.world_size
        return [batches[i] for i in perm[:usable]]

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.epoch_batches()
        return iter(batches[self.consumed_batches + self.rank :: self.world_size])

    def __len__(self) -> int:
        return (len(self.epoch_batches()) - self.consumed_batches) // self.world_size

    def stats(self) -> BatchStats:
        """Real vs padded tokens over this epoch's batches (all ranks): see ``padding_waste``."""
        return batch_stats(self.lengths.tolist(), self.epoch_batches())
