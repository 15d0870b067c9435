"""Streaming FASTA reading (plain or gzip, detected by content) under the input policy of SPEC.md §8.

Records are yielded one at a time, so memory does not grow with the file (only the set of seen ids does,
when duplicate checking is on). Every error names the file, the line and the record id.
"""

from __future__ import annotations

import gzip
import io
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .errors import FastaFormatError, InvalidSequenceError
from .sequence import DEFAULT_POLICY, RESIDUES, SequencePolicy, clean_sequence

log = logging.getLogger(__name__)

_GZIP_MAGIC = b"\x1f\x8b"
_STRIP_BYTES = b" \t\r\n\v\f"
_VALID_UPPER = RESIDUES.encode()


@dataclass(frozen=True)
class FastaRecord:
    id: str
    sequence: str
    description: str = ""
    line: int = 0  # 1-based line number of the header


def open_maybe_gzip(path: str | os.PathLike) -> io.BufferedIOBase:
    """Open `path` for binary reading, decompressing when its first bytes are the gzip magic."""
    f = open(path, "rb")  # noqa: SIM115 - returned to the caller
    head = f.peek(2)[:2] if hasattr(f, "peek") else b""
    if head == _GZIP_MAGIC:
        return gzip.GzipFile(fileobj=f, mode="rb")  # type: ignore[return-value]
    return f


def record_id_from_header(header: str) -> str:
    """The id is the first whitespace-delimited word of the header (without `>`)."""
    parts = header.split(None, 1)
    return parts[0] if parts else ""


@dataclass
class FastaReader:
    """Iterate over the records of one FASTA file.

    `skip_invalid`: instead of raising on a bad record, count it in :attr:`skipped` (with its message in
    :attr:`skipped_messages`, the first 100 kept) and go on. Structural problems (not FASTA, no records)
    still raise.
    """

    path: str | os.PathLike
    policy: SequencePolicy = DEFAULT_POLICY
    skip_invalid: bool = False
    check_duplicates: bool = True
    skipped: int = 0
    skipped_messages: list[str] = field(default_factory=list)
    records: int = 0

    def __iter__(self) -> Iterator[FastaRecord]:
        name = str(self.path)
        seen: set[str] = set()
        header: str | None = None
        header_line = 0
        chunks: list[bytes] = []
        try:
            fh = open_maybe_gzip(self.path)
        except OSError as exc:
            raise FastaFormatError(f"{name}: cannot open: {exc.strerror or exc}") from None
        with fh:
            lineno = 0
            try:
                for raw in fh:
                    lineno += 1
                    if raw.startswith(b">"):
                        if header is not None:
                            rec = self._finish(name, header, header_line, chunks, seen)
                            if rec is not None:
                                yield rec
                        header = raw[1:].decode("utf-8", errors="replace").strip()
                        header_line = lineno
                        chunks = []
                        continue
                    line = raw.strip(_STRIP_BYTES)
                    if not line:
                        continue
                    if header is None:
                        if line.startswith(b";"):  # old-style comment lines before the first record
                            continue
                        raise FastaFormatError(
                            f"{name}:{lineno}: not FASTA: expected a '>' header line before any sequence"
                        )
                    chunks.append(line)
            except (OSError, EOFError, gzip.BadGzipFile) as exc:
                raise FastaFormatError(f"{name}:{lineno}: cannot read: {exc}") from None
            if header is not None:
                rec = self._finish(name, header, header_line, chunks, seen)
                if rec is not None:
                    yield rec
        if self.records == 0 and self.skipped == 0:
            raise FastaFormatError(f"{name}: no FASTA records found")

    def _finish(
        self, name: str, header: str, line: int, chunks: list[bytes], seen: set[str]
    ) -> FastaRecord | None:
        rid = record_id_from_header(header)
        try:
            if not rid:
                raise InvalidSequenceError(f"{name}:{line}: header without an id")
            if self.check_duplicates:
                if rid in seen:
                    raise InvalidSequenceError(f"{name}:{line}: record '{rid}': duplicate id")
                seen.add(rid)
            seq = self._clean(b"".join(chunks), rid, name, line)
        except InvalidSequenceError as exc:
            if not self.skip_invalid:
                raise
            self.skipped += 1
            if len(self.skipped_messages) < 100:
                self.skipped_messages.append(str(exc))
            log.warning("skipped invalid record: %s", exc)
            return None
        self.records += 1
        description = header[len(rid):].strip()
        return FastaRecord(id=rid, sequence=seq, description=description, line=line)

    def _clean(self, data: bytes, rid: str, name: str, line: int) -> str:
        upper = data.upper()
        if upper.endswith(b"*"):
            upper = upper[:-1]
        # Fast path: everything is already a valid residue (the common case).
        if upper and not upper.translate(None, _VALID_UPPER):
            return upper.decode("ascii")
        return clean_sequence(
            data.decode("utf-8", errors="replace"), rid, self.policy, source=name, line=line
        )


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
