"""Request limits, input checks and API keys of the server, independent of the web framework.

A request that breaks a size limit is refused with 413 (too many sequences, a sequence or the request too
long, body too large); one whose content is wrong (bad residue, empty list or sequence) with 422. Both
name the offending sequence by id and index; residue errors also give the 1-based position (the
`position` field of :class:`~prott5nv.errors.InvalidSequenceError`), with the message of
:func:`prott5nv.sequence.clean_sequence`.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

from ..data.batching import DEFAULT_BATCH_TOKENS
from ..errors import ConfigError, InvalidSequenceError, ProtT5nvError
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

    def body(self) -> dict[str, Any]:
        return {"detail": [{"msg": self.message, **self.where}]}


def check_sequences(
    ids: Sequence[str], seqs: Sequence[str], encode: Callable[[str, str], T], limits: ServeLimits,
    length: Callable[[T], int] = len,
) -> list[T]:  # fmt: skip
    """Encode every sequence of a request with ``encode(sequence, id)`` and enforce `limits` (count,
    residues per sequence, residues per request). Raises :class:`RequestError` (413/422) on the first
    problem. `length` gives the residues of an encoded sequence."""
    if not seqs:
        raise RequestError(422, "sequences: the list is empty")
    if len(seqs) > limits.max_sequences:
        raise RequestError(413, f"{len(seqs)} sequences in one request; the limit is {limits.max_sequences}")
    raw_total = sum(len(s) for s in seqs)
    if raw_total > 2 * limits.max_request_residues + 1024:  # cheap guard before any cleaning work
        raise RequestError(413, f"request too long: {raw_total} characters of sequence")
    out, total = [], 0
    assert limits.max_residues is not None, "call ServeLimits.resolved() first"
    for i, (rid, seq) in enumerate(zip(ids, seqs, strict=True)):
        try:
            encoded = encode(seq, rid)
        except InvalidSequenceError as exc:
            raise RequestError(422, str(exc), id=rid, index=i, position=exc.position) from None
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
