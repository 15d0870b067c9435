"""Request limits, input checks and API keys of the server, independent of the web framework.

A request over one of these limits is refused with 413 (too many sequences, a sequence or the request too
long, body too large, too many outputs or steps); one whose content is wrong (bad residue, empty
sequence, duplicate id, wrong types, settings out of range) with 422. The bounds a schema can state are in
the request models (:mod:`.schemas`); :func:`check_sequences` checks the rest. Its errors name the
offending sequence by id and index; residue errors also give the 1-based position (the `position` field of
:class:`~prott5nv.errors.InvalidSequenceError`), with the message of
:func:`prott5nv.sequence.clean_sequence`.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

from ..data.batching import DEFAULT_BATCH_TOKENS
from ..errors import ConfigError, InvalidSequenceError, ProtT5nvError, SequenceTooLongError
from ..inference.length import UNBOUNDED_FALLBACK, resolve

T = TypeVar("T")


@dataclass(frozen=True)
class ServeLimits:
    """What one request may ask for, and how the batcher groups work (CLI flags map 1:1 onto fields)."""

    max_sequences: int = 1000  # sequences per request
    max_residues: int | None = None  # residues per sequence; None = the model's limit
    max_request_residues: int = 250_000  # residues per request, all sequences together
    max_body_bytes: int = 16 * 1024 * 1024
    max_output_values: int = 8_000_000  # per-residue floats per response (residues x embedding dim)
    timeout_s: float = 120.0  # queue wait + compute, per request
    max_queue: int = 64  # requests waiting or running; more get 429
    batch_tokens: int = DEFAULT_BATCH_TOKENS  # padded tokens per model batch
    max_wait_ms: float = 5.0  # how long the batcher waits for more requests to fill a batch
    max_new_tokens: int = 512  # generation: decoder steps per output
    max_outputs: int = 16  # generation: beams / returned sequences / infill samples per input

    def check(self) -> None:
        """Refuse numbers that cannot be limits (every one must be positive)."""
        for name, value in asdict(self).items():
            if value is not None and value <= 0:
                raise ConfigError(f"serve limit {name} must be positive, got {value}")

    def resolved(self, model_max_length: int | None) -> ServeLimits:
        """Check the numbers and fill `max_residues` from the model's length policy (refuse; the fallback
        of :mod:`prott5nv.inference.length` for models without a limit)."""
        self.check()
        limit = resolve(model_max_length, self.max_residues, flag="--max-residues").limit
        return ServeLimits(**{**asdict(self), "max_residues": limit or UNBOUNDED_FALLBACK})

    @property
    def max_request_chars(self) -> int:
        """Characters of sequence text per request (whitespace, gaps and masks included), a cheap cap
        checked before any cleaning; also the longest one sequence string may be."""
        return 2 * self.max_request_residues + 1024


class RequestError(ProtT5nvError):
    """A refused request: HTTP `status`, a message, and where it went wrong (sequence id / index /
    1-based residue position) when that is known."""

    def __init__(
        self, status: int, message: str, *, id: str | None = None, index: int | None = None,
        position: int | None = None, headers: dict[str, str] | None = None,
    ) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}
        self.where = {k: v for k, v in (("id", id), ("index", index), ("position", position)) if v is not None}


def check_sequences(
    ids: Sequence[str], seqs: Sequence[str], encode: Callable[[str, str], T], limits: ServeLimits,
    length: Callable[[T], int] = len,
) -> list[T]:  # fmt: skip
    """Encode every sequence of a request with ``encode(sequence, id)`` and enforce what the request
    schema cannot (its models bound the count and each string): unique ids, residues per sequence and per
    request. Raises :class:`RequestError` (413/422) on the first problem. `length` gives the residues of
    an encoded sequence; `encode` may raise :class:`~prott5nv.errors.SequenceTooLongError` (413) itself."""
    first: dict[str, int] = {}
    for i, rid in enumerate(ids):
        if first.setdefault(rid, i) != i:
            raise RequestError(422, f"record '{rid}': duplicate id (first at index {first[rid]})", id=rid, index=i)
    raw_total = sum(len(s) for s in seqs)
    if raw_total > limits.max_request_chars:  # cheap guard before any cleaning work
        raise RequestError(413, f"request too long: {raw_total} characters of sequence; the limit is "
                           f"{limits.max_request_chars}")  # fmt: skip
    out, total = [], 0
    assert limits.max_residues is not None, "call ServeLimits.resolved() first"
    for i, (rid, seq) in enumerate(zip(ids, seqs, strict=True)):
        try:
            encoded = encode(seq, rid)
        except InvalidSequenceError as exc:
            status = 413 if isinstance(exc, SequenceTooLongError) else 422
            raise RequestError(status, str(exc), id=rid, index=i, position=exc.position) from None
        n = length(encoded)
        if n > limits.max_residues:
            raise RequestError(
                413, f"record '{rid}': {n} residues; the limit is {limits.max_residues} per sequence", id=rid, index=i
            )
        total += n
        out.append(encoded)
    if total > limits.max_request_residues:
        raise RequestError(413, f"{total} residues in one request; the limit is {limits.max_request_residues}")
    return out


def read_api_keys(path: str | os.PathLike) -> list[str]:
    """Keys from a file, one per line (blank lines and '#' comments ignored)."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise ConfigError(f"cannot read API key file {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"API key file {path} is not UTF-8 text ({exc.reason})") from None
    keys = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not keys:
        raise ConfigError(f"API key file {path} holds no key")
    return keys


def key_matches(given: str, keys: Sequence[str]) -> bool:
    """Constant-time comparison against every key (no early exit)."""
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(given.encode(), key.encode())
    return matched
