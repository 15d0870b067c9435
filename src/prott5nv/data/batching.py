"""Token-budget batching: group sequences of similar length so padding is small and memory is bounded.

The cost of a batch is its padded size, ``len(batch) * max(lengths in batch)`` -- what the attention and
MLP actually compute -- as in fair-esm's `toks_per_batch`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


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
