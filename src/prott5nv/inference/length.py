"""The length policy: how long a protein may be, and what happens to longer ones. Resolved once per run
from the model (:func:`resolve`) and used by every command that reads proteins (`embed`, `finetune`,
`predict`, `score`, the server and the client).

- **limit**: residues the encoder accepts: the model's (:attr:`ProtT5nv.max_length`: its positions less
  the tokenizer's suffix; None for relative-position models), or a smaller `--max-length`.
- **mode**: ``refuse`` (the default: the run stops, listing the long proteins), ``truncate`` (keep the
  first `limit` residues) or ``chunk`` (overlapping windows of `chunk_size` residues, stitched back
  together: :mod:`.chunking`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError, SequenceTooLongError
from .chunking import check_chunking, chunk_starts

MODES = ("refuse", "truncate", "chunk")
DEFAULT_CHUNK_OVERLAP = 128  # residues shared by neighbouring windows
#: Residues per sequence where the model sets no limit (relative positions) and a bound is still needed
#: (the server's per-sequence limit).
UNBOUNDED_FALLBACK = 1024
#: Encoder tokens of one pretraining sample: `score` masks proteins as pretraining did, so it sees at most
#: this many (the first 510 residues of a ProtT5nv protein), whatever the policy.
PRETRAINING_SEQ_LENGTH = 512
LISTED = 20  # long proteins named in a refusal


@dataclass(frozen=True)
class LengthPolicy:
    limit: int | None  # residues; None = no limit
    mode: str = "refuse"  # refuse | truncate | chunk
    chunk_size: int | None = None  # residues per window (chunk mode); None = the limit
    chunk_overlap: int = DEFAULT_CHUNK_OVERLAP

    @property
    def window(self) -> int | None:
        """Residues per window when long proteins are chunked, else None."""
        if self.mode != "chunk" or self.limit is None:
            return None
        return self.chunk_size or self.limit

    def too_long(self, length: int) -> bool:
        return self.limit is not None and length > self.limit

    def cut(self, seq: str) -> str:
        """`seq` as the encoder sees it in one piece: its first `limit` residues when truncating."""
        return seq[: self.limit] if self.mode == "truncate" and self.too_long(len(seq)) else seq

    def starts(self, length: int) -> list[int]:
        """Window starts of a protein of `length` residues ([0]: one piece)."""
        window = self.window
        if window is None or not self.too_long(length):
            return [0]
        return chunk_starts(length, window, self.chunk_overlap)

    def check(self, names: Sequence[str], lengths: Sequence[int], *, source: str | None = None) -> int:
        """Raise :class:`SequenceTooLongError` listing the long proteins under ``refuse``; else return how
        many are long (truncated or chunked)."""
        long = [(n, k) for n, k in zip(names, lengths, strict=True) if self.too_long(k)]
        if long and self.mode == "refuse":
            self.refuse(long[:LISTED], len(long), source=source)
        return len(long)

    def refuse(self, listed: Sequence[tuple[str, int]], total: int, *, source: str | None = None) -> None:
        """The refusal of `total` long proteins, the first ones `listed` as ``(id, residues)``."""
        shown = ", ".join(f"{rid} ({length})" for rid, length in listed)
        more = f" and {total - len(listed)} more" if total > len(listed) else ""
        where = f"{source}: " if source else ""
        raise SequenceTooLongError(
            f"{where}{total} protein(s) longer than {self.limit} residues: {shown}{more}; "
            "use --truncate to keep the first residues or --chunk to embed overlapping windows"
        )

    def describe(self) -> dict[str, Any]:
        """The settings a saved result records (chunk fields only when chunking)."""
        window = self.window
        return {"max_length": self.limit, "long_policy": self.mode, "chunk_size": window,
                "chunk_overlap": self.chunk_overlap if window is not None else None}  # fmt: skip


def resolve(
    model: Any,
    max_length: int | None = None,
    mode: str = "refuse",
    chunk_size: int | None = None,
    chunk_overlap: int = DEFAULT_CHUNK_OVERLAP,
    *,
    flag: str = "--max-length",
) -> LengthPolicy:
    """The policy for `model` (anything with ``max_length``: a loaded model, a remote one, or that limit
    itself as an int/None): `max_length` may only lower the model's limit (`flag` names it in errors)."""
    model_limit = model if model is None or isinstance(model, int) else model.max_length
    if mode not in MODES:
        raise ConfigError(f"unknown long-protein policy {mode!r}; choose from {', '.join(MODES)}")
    limit = model_limit
    if max_length is not None:
        if max_length <= 0:
            raise ConfigError(f"{flag} must be positive, got {max_length}")
        if model_limit is not None and max_length > model_limit:
            raise ConfigError(f"{flag} {max_length} exceeds the model's maximum of {model_limit} residues")
        limit = max_length
    policy = LengthPolicy(limit, mode, chunk_size, chunk_overlap)
    if policy.window is not None:
        check_chunking(policy.window, chunk_overlap, limit)
    return policy


def score_positions(model: Any) -> tuple[int, int]:
    """Encoder and decoder tokens of a scoring sample for `model`: pretraining's sample length within the
    model's positions (proteins longer than a sample are scored on their first residues)."""
    positions = model.config.max_length
    return min(PRETRAINING_SEQ_LENGTH, positions or PRETRAINING_SEQ_LENGTH), positions or PRETRAINING_SEQ_LENGTH
