"""Shards of an embedding run: which records ``embed --shard K/N`` embeds (:func:`in_shard`), and
`prott5nv merge OUT SHARD...`, which joins the outputs of shards 1..N into one output.

Record i belongs to shard ``(i // window) % N + 1``: whole windows of `window` records (``--window``,
the pipeline's look-ahead) dealt round-robin. A window's batches depend only on its records and the
settings, so a shard computes exactly the batches a one-process run computes for those records -- same
shapes, same padding -- and its values are the one-process values bit for bit (on the same kind of
hardware and thread count; other hardware agrees to float rounding). An input of fewer than N windows
leaves some shards empty: give a smaller ``--window``.

A shard's output is an ordinary output (HDF5, `.npy` directory or Parquet) of its records, with three more
attributes: ``shard`` ("K/N"), ``shard_records`` (how many proteins it must hold) and ``shard_settings``
(JSON: everything that decides the values -- the input's size, content digest and record count, the
model's weights fingerprint and configuration, precision, layers, outputs, length policy, batching and
window, input policy, version). Before writing anything, the merge checks that

* every shard 1..N is given exactly once (a missing or repeated shard is refused, naming it);
* all were made with the same settings (the first setting that differs is named);
* each is complete (it holds its ``shard_records`` proteins) and holds only its own records (record i
  belongs to shard ``(i // window) % N + 1``; checked as they are read), so the shards are disjoint and
  cover the input;

then it writes the proteins in input order (large per-residue arrays of HDF5 and .npy shards copied block
by block) through a temporary, renamed into place only when every check passed, with the attributes of a
one-process run (the ``shard*`` ones dropped): the file a one-process ``embed`` with the same settings
writes, bit for bit in its embeddings. The merged output has the shards' format.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError, ProtT5nvError
from .writers import StoredOutput, StoredRecord, check_output, format_from_path, open_writer, read_output

SHARD_ATTRS = ("shard", "shard_records", "shard_settings")


def in_shard(record: int, window: int, shard: tuple[int, int] | None) -> bool:
    """Whether input record `record` (0-based) is in shard ``(K, N)``: record i is in shard
    ``(i // window) % N + 1`` (every record when `shard` is None)."""
    return shard is None or (record // window) % shard[1] == shard[0] - 1


def shard_size(records: int, window: int, shard: tuple[int, int]) -> int:
    """How many of an input's `records` records are in `shard` (:func:`in_shard`)."""
    k, n = shard
    windows = -(-records // window)
    size = len(range(k - 1, windows, n)) * window
    if windows and (windows - 1) % n == k - 1:  # the last window is short
        size -= windows * window - records
    return size


def parse_shard(text: str) -> tuple[int, int]:
    """``"K/N"`` (1 <= K <= N) as ``(K, N)``."""
    k, sep, n = text.partition("/")
    try:
        shard = (int(k), int(n)) if sep else None
    except ValueError:
        shard = None
    if shard is None or not 1 <= shard[0] <= shard[1]:
        raise ConfigError(f"--shard {text!r}: expected K/N with 1 <= K <= N (e.g. 1/4 .. 4/4)")
    return shard


class ShardError(ProtT5nvError):
    """The shards given to merge are incomplete, overlapping or were made with other settings."""


@dataclass
class MergeSummary:
    shards: int
    proteins: int
    seconds: float
    output: str

    def line(self) -> str:
        return f"merged {self.shards} shards ({self.proteins} proteins) in {self.seconds:.1f} s -> {self.output}"


@dataclass
class _Shard:
    path: str
    output: StoredOutput
    k: int
    n: int
    records: int  # proteins it must hold
    settings: dict[str, Any]


def _open_shard(path: str | os.PathLike) -> _Shard:
    if not Path(path).exists():
        raise ShardError(f"{path}: no such file or directory (a shard writes its output only when it finishes)")
    out = read_output(path)
    if "shard" not in out.attrs:
        raise ShardError(f"{path}: not a shard (no 'shard' attribute): make shards with `embed --shard K/N`")
    try:
        k, n = parse_shard(str(out.attrs["shard"]))
        settings = json.loads(str(out.attrs["shard_settings"]))
        records = int(out.attrs["shard_records"])
    except (ConfigError, KeyError, ValueError) as exc:
        raise ShardError(f"{path}: damaged shard attributes ({exc})") from None
    return _Shard(str(path), out, k, n, records, settings)


def _differences(a: dict[str, Any], b: dict[str, Any]) -> str:
    keys = sorted(k for k in {*a, *b} if a.get(k) != b.get(k))
    return "; ".join(f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in keys[:3])


def check_shards(paths: Sequence[str | os.PathLike]) -> list[_Shard]:
    """Open and check the shards (see the module docstring); returns them ordered 1..N."""
    if not paths:
        raise ShardError("no shard given")
    shards = [_open_shard(p) for p in paths]
    first = shards[0]
    for s in shards[1:]:
        if s.n != first.n:
            raise ShardError(f"{s.path} is shard {s.k}/{s.n} but {first.path} is {first.k}/{first.n}: shards of "
                             "different runs")  # fmt: skip
        if s.settings != first.settings:
            raise ShardError(f"{s.path} was made with other settings than {first.path} "
                             f"({_differences(first.settings, s.settings)})")  # fmt: skip
        if s.output.fmt != first.output.fmt:
            raise ShardError(f"{s.path} is {s.output.fmt}, {first.path} is {first.output.fmt}: one format per merge")
    by_k: dict[int, _Shard] = {}
    for s in shards:
        if s.k in by_k:
            raise ShardError(f"shard {s.k}/{s.n} is given twice: {by_k[s.k].path} and {s.path}")
        by_k[s.k] = s
    missing = [k for k in range(1, first.n + 1) if k not in by_k]
    if missing:
        names = ", ".join(f"{k}/{first.n}" for k in missing)
        raise ShardError(f"missing shard{'s' if len(missing) > 1 else ''} {names}: give the output of every shard")
    total, window = int(first.settings["input_records"]), int(first.settings["window"])
    for k, s in sorted(by_k.items()):
        expected = shard_size(total, window, (k, s.n))
        if s.records != expected or s.output.count != expected:
            raise ShardError(f"{s.path}: holds {s.output.count} of shard {k}/{s.n}'s {expected} proteins (incomplete "
                             "or altered: rerun that shard)")  # fmt: skip
    return [by_k[k] for k in sorted(by_k)]


def _in_input_order(shards: list[_Shard], total: int, window: int) -> Iterator[StoredRecord]:
    """Every protein of the input, record 0 first, each from its shard (its record number checked)."""
    n = len(shards)
    streams = [s.output.proteins() for s in shards]
    for i in range(total):
        k = (i // window) % n
        stored = next(streams[k], None)
        if stored is None or stored[0] != i:
            got = "nothing" if stored is None else f"record {stored[0]}"
            raise ShardError(f"{shards[k].path}: expected record {i} of shard {k + 1}/{n}, found {got}")
        yield stored


def merge_shards(
    paths: Sequence[str | os.PathLike], output: str | os.PathLike, *, fmt: str | None = None
) -> MergeSummary:
    """Check the shards (:func:`check_shards`) and write them as one output (see the module docstring)."""
    start = time.perf_counter()
    shards = check_shards(paths)
    first = shards[0]
    fmt = fmt or format_from_path(output)
    check_output(fmt, output, inputs=tuple(s.path for s in shards))  # fmt None (no format in the name): refused
    if fmt != first.output.fmt:
        raise ConfigError(f"the shards are {first.output.fmt}, the output {output} would be {fmt}: merge writes "
                          "the shards' format (name the output accordingly)")  # fmt: skip
    attrs = {k: v for k, v in first.output.attrs.items() if k not in SHARD_ATTRS}
    total, window = int(first.settings["input_records"]), int(first.settings["window"])
    proteins = 0
    with open_writer(fmt, output, first.output.kinds, attrs) as writer:
        for record, rid, length, arrays in _in_input_order(shards, total, window):
            writer.write(record, rid, length, arrays)
            proteins += 1
    return MergeSummary(len(shards), proteins, time.perf_counter() - start, str(output))


__all__ = ["MergeSummary", "ShardError", "check_shards", "in_shard", "merge_shards", "parse_shard", "shard_size"]
