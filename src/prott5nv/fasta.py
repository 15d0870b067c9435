"""Reading FASTA files, plain or gzip (detected by content), under the input policy (docs/inputs.md).

:func:`read_fasta` yields :class:`FastaRecord` ``(id, sequence, description, line)``; :class:`FastaReader`
adds counts, ``skip_invalid``, a length window and :meth:`FastaReader.blocks` (records column-wise, what
preprocessing stores). Sequences are cleaned as :func:`~prott5nv.sequence.clean_sequence` does; every error
names the file, the line of the record's header and the record id.

How it is fast (a read-ahead thread, the C or numpy scanner, the careful path for odd input) is
:mod:`prott5nv.data.fastscan`'s business.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .data.fastscan import (
    READ_ERRORS,
    BlockScanner,
    FastaBlock,
    check_input,
    open_maybe_gzip,
    read_problem,
    record_id_from_header,
)
from .errors import FastaFormatError
from .sequence import DEFAULT_POLICY, SequencePolicy

__all__ = [
    "READ_ERRORS", "FastaBlock", "FastaReader", "FastaRecord", "check_input", "open_maybe_gzip", "read_fasta",
    "read_problem", "record_id_from_header", "write_fasta",
]  # fmt: skip


@dataclass(frozen=True)
class FastaRecord:
    id: str
    sequence: str
    description: str = ""
    line: int = 0  # 1-based line number of the header


@dataclass
class FastaReader(BlockScanner):
    """Iterate over the records of one FASTA file.

    `skip_invalid`: instead of raising on a bad record, count it in :attr:`skipped` (with its message in
    :attr:`skipped_messages`, the first 100 kept) and go on. Structural problems (not FASTA, no records)
    still raise. `on_read` sees every raw chunk read from disk (for checksums and progress; a read-only
    view valid during the call). Valid records shorter than `min_length` or longer than `max_length`
    are counted in :attr:`too_short` / :attr:`too_long` (and in :attr:`records`) but not yielded, and
    their ids are not checked for duplicates. `raw`: sequences as written (case kept, whitespace
    removed, nothing else checked but emptiness) for text that carries more than residues -- the masked
    proteins of `generate`/`infill`, checked by their own parser; the file is read as always otherwise
    (ids, duplicates, line numbers, gzip, errors).
    """

    path: str | os.PathLike
    policy: SequencePolicy = DEFAULT_POLICY
    skip_invalid: bool = False
    check_duplicates: bool = True
    skipped: int = 0
    skipped_messages: list[str] = field(default_factory=list)
    records: int = 0
    on_read: Callable[[memoryview], None] | None = None
    min_length: int = 1
    max_length: int | None = None
    too_short: int = 0
    too_long: int = 0
    raw: bool = False

    def __iter__(self) -> Iterator[FastaRecord]:
        for block in self._iter_blocks(describe=True):
            for rid, seq, desc, line in zip(
                block.ids, block.sequences, block.descriptions or (), block.lines.tolist(), strict=True
            ):
                yield FastaRecord(
                    id=rid.decode("utf-8", errors="replace"),
                    sequence=seq.decode("utf-8", errors="replace") if self.raw else seq.decode("ascii"),
                    description=desc.decode("utf-8", errors="replace").strip(),
                    line=line,
                )

    def blocks(self) -> Iterator[FastaBlock]:
        """Yield the valid records block by block (column-wise bytes, no per-record objects: the fast
        path; :attr:`FastaBlock.descriptions` is None)."""
        return self._iter_blocks(describe=False)

    def _iter_blocks(self, describe: bool) -> Iterator[FastaBlock]:
        name = str(self.path)
        with open_maybe_gzip(self.path, self.on_read) as fh:
            yield from self.scan_blocks(fh, name, describe)
        if self.records == 0 and self.skipped == 0:
            raise FastaFormatError(f"{name}: no FASTA records found")


def read_fasta(
    path: str | os.PathLike,
    policy: SequencePolicy = DEFAULT_POLICY,
    *,
    skip_invalid: bool = False,
    check_duplicates: bool = True,
) -> Iterator[FastaRecord]:
    """Yield the records of `path` (see :class:`FastaReader`)."""
    return iter(FastaReader(path, policy, skip_invalid=skip_invalid, check_duplicates=check_duplicates))


def write_fasta(records: list[tuple[str, str]], path: str | os.PathLike, width: int = 60) -> None:
    """Write `(id, sequence)` pairs as FASTA (used for samples and tests)."""
    with open(Path(path), "w") as fh:
        for rid, seq in records:
            fh.write(f">{rid}\n")
            for i in range(0, len(seq), width):
                fh.write(seq[i : i + width] + "\n")
