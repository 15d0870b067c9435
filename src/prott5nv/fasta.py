"""Streaming FASTA reading (plain or gzip, detected by content) under the input policy of SPEC.md §8.

The file is read in blocks of whole records (a few MiB each), and each block is parsed with a handful of
C-level bytes operations (a regex split on ``\\n>``, one ``translate`` that upper-cases and drops
whitespace, one that checks the alphabet). Only blocks holding a problem (a bad character, an empty
record, a missing id, a duplicate) fall back to record-by-record checking, which produces the error text
of :func:`~prott5nv.sequence.clean_sequence`. Memory stays at a few blocks, plus the set of seen ids when
duplicate checking is on. Every error names the file, the line of the record's header and the record id.
"""

from __future__ import annotations

import gzip
import io
import logging
import os
import queue
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path

import numpy as np

from .errors import FastaFormatError, InvalidSequenceError
from .sequence import DEFAULT_POLICY, RESIDUES, SequencePolicy, clean_sequence

log = logging.getLogger(__name__)

_GZIP_MAGIC = b"\x1f\x8b"
_CHUNK = 8 << 20
_WHITESPACE = b" \t\r\n\v\f"
_UPPER = bytes.maketrans(b"abcdefghijklmnopqrstuvwxyz", b"ABCDEFGHIJKLMNOPQRSTUVWXYZ")
# Parsing joins the record bodies with '>' (cannot occur inside a valid body), then one translate deletes
# whitespace, upper-cases, and turns the '>' separators into '\n' (deletion applies to input bytes only).
_PACK = bytes.maketrans(b"abcdefghijklmnopqrstuvwxyz>", b"ABCDEFGHIJKLMNOPQRSTUVWXYZ\n")
_VALID = RESIDUES.encode()
_VALID_OR_SEP = _VALID + b"\n"
# One match per header line: group 1 is the id (first word), group 2 the rest of the line.
_HEADER = re.compile(rb"\n>(\S*)([^\n]*)")


@dataclass(frozen=True)
class FastaRecord:
    id: str
    sequence: str
    description: str = ""
    line: int = 0  # 1-based line number of the header


@dataclass
class FastaBlock:
    """The valid records of one block of a FASTA file, as bytes (what :mod:`prott5nv.data` stores)."""

    ids: list[bytes]
    sequences: list[bytes]  # cleaned: upper case, no whitespace, no trailing '*'
    descriptions: list[bytes]
    lines: list[int]  # header line of each record
    packed: bytes | None = None  # the sequences joined by b"\n", when the block needed no cleaning


class _Tap(io.RawIOBase):
    """A read-only file wrapper that shows every chunk read from disk to `callback` (checksums, progress)."""

    def __init__(self, raw: io.BufferedReader, callback: Callable[[bytes], None]):
        self._raw, self._callback = raw, callback

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        if data:
            self._callback(data)
        return data

    def readinto(self, buffer) -> int:  # type: ignore[override]
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._raw.close()
        super().close()


def open_maybe_gzip(
    path: str | os.PathLike, on_read: Callable[[bytes], None] | None = None
) -> io.BufferedIOBase:
    """Open `path` for binary reading, decompressing when its first bytes are the gzip magic.

    `on_read`, when given, sees every raw (still compressed) chunk read from disk.
    """
    f = open(path, "rb")  # noqa: SIM115 - returned to the caller
    head = f.peek(2)[:2]
    src: io.IOBase = f if on_read is None else _Tap(f, on_read)
    if head == _GZIP_MAGIC:
        return gzip.GzipFile(fileobj=src, mode="rb")  # type: ignore[return-value]
    return src  # type: ignore[return-value]


def record_id_from_header(header: str) -> str:
    """The id is the first whitespace-delimited word of the header (without `>`)."""
    parts = header.split(None, 1)
    return parts[0] if parts else ""


def _prefetch(fh: io.IOBase) -> Iterator[bytes]:
    """Yield chunks of `fh` read ahead by a thread: file reads, gzip inflation and the `on_read` checksum
    release the GIL, so they overlap with parsing."""
    chunks: queue.Queue = queue.Queue(maxsize=3)
    stop = threading.Event()

    def put(item: object) -> None:
        while not stop.is_set():
            try:
                chunks.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def work() -> None:
        try:
            while not stop.is_set():
                chunk = fh.read(_CHUNK)
                put(chunk)
                if not chunk:
                    return
        except BaseException as exc:  # handed to the consumer, raised there
            put(exc)

    thread = threading.Thread(target=work, name="fasta-read", daemon=True)
    thread.start()
    try:
        while True:
            item = chunks.get()
            if isinstance(item, BaseException):
                raise item
            if not item:
                return
            yield item
    finally:
        stop.set()
        thread.join()


def _header_lines(bodies: list[bytes], first: int) -> list[int]:
    """Line numbers of the headers of consecutive records, given the first one's."""
    newlines = np.fromiter(map(bytes.count, bodies, repeat(b"\n")), np.int64, len(bodies))
    starts = np.empty(len(bodies), np.int64)
    starts[:1] = first
    np.cumsum(newlines[:-1] + 1, out=starts[1:])
    starts[1:] += first
    return starts.tolist()


def _blocks(fh: io.IOBase) -> Iterator[bytes]:
    """Yield the file as blocks that each start with ``\\n>`` (the first with a virtual ``\\n``), so that
    every block holds whole records. A record longer than a chunk is gathered without re-copying."""
    pieces = [b"\n"]
    size = 1  # total length of pieces
    for chunk in _prefetch(fh):
        cut = chunk.rfind(b"\n>")
        if cut >= 0:
            cut += size
        elif chunk[:1] == b">" and pieces[-1].endswith(b"\n"):
            cut = size - 1
        else:
            pieces.append(chunk)
            size += len(chunk)
            continue
        data = b"".join([*pieces, chunk])
        if cut > 0:
            yield data[:cut]
            data = data[cut:]
        pieces, size = [data], len(data)
    data = b"".join(pieces)
    if data.strip():
        yield data


@dataclass
class FastaReader:
    """Iterate over the records of one FASTA file.

    `skip_invalid`: instead of raising on a bad record, count it in :attr:`skipped` (with its message in
    :attr:`skipped_messages`, the first 100 kept) and go on. Structural problems (not FASTA, no records)
    still raise. `on_read` sees every raw chunk read from disk (for checksums and progress).
    `track_lines=False` leaves :attr:`FastaBlock.lines` empty in :meth:`blocks` where no record of the
    block has a problem (saves a pass; error messages still name lines).
    """

    path: str | os.PathLike
    policy: SequencePolicy = DEFAULT_POLICY
    skip_invalid: bool = False
    check_duplicates: bool = True
    skipped: int = 0
    skipped_messages: list[str] = field(default_factory=list)
    records: int = 0
    on_read: Callable[[bytes], None] | None = None
    track_lines: bool = True

    def __iter__(self) -> Iterator[FastaRecord]:
        for block in self._iter_blocks(track_lines=True):
            for rid, seq, desc, line in zip(
                block.ids, block.sequences, block.descriptions, block.lines, strict=True
            ):
                yield FastaRecord(
                    id=rid.decode("utf-8", errors="replace"),
                    sequence=seq.decode("ascii"),
                    description=desc.decode("utf-8", errors="replace").strip(),
                    line=line,
                )

    def blocks(self) -> Iterator[FastaBlock]:
        """Yield the valid records block by block (bytes, no per-record objects: the fast path)."""
        return self._iter_blocks(self.track_lines)

    def _iter_blocks(self, track_lines: bool) -> Iterator[FastaBlock]:
        name = str(self.path)
        seen: set[bytes] = set()
        try:
            fh = open_maybe_gzip(self.path, self.on_read)
        except OSError as exc:
            raise FastaFormatError(f"{name}: cannot open: {exc.strerror or exc}") from None
        base = 1  # line number of the first line after the block's leading newline
        with fh:
            try:
                for raw in _blocks(fh):
                    block = self._parse(raw, base, name, seen, track_lines)
                    base += raw.count(b"\n")
                    if block.ids:
                        yield block
            except (OSError, EOFError, gzip.BadGzipFile) as exc:
                raise FastaFormatError(f"{name}:{base}: cannot read: {exc}") from None
        if self.records == 0 and self.skipped == 0:
            raise FastaFormatError(f"{name}: no FASTA records found")

    # ------------------------------------------------------------------ block parsing
    def _parse(self, raw: bytes, base: int, name: str, seen: set[bytes], track_lines: bool) -> FastaBlock:
        parts = _HEADER.split(raw)
        pre = parts[0]
        if pre.strip():
            for i, text in enumerate(pre.split(b"\n")):
                text = text.strip()
                if text and not text.startswith(b";"):  # ';' lines: old-style comments before records
                    raise FastaFormatError(
                        f"{name}:{base + i - 1}: not FASTA: expected a '>' header line before any sequence"
                    )
        ids, descs, bodies = parts[1::3], parts[2::3], parts[3::3]
        if not bodies:
            return FastaBlock([], [], [], [])
        joined = b">".join(bodies).translate(_PACK, _WHITESPACE)
        odd = joined.translate(None, _VALID_OR_SEP)
        if odd and not odd.strip(b"*"):  # only stop symbols: fine if each ends its record
            stops = joined.count(b"*\n") + joined.endswith(b"*")
            if stops == len(odd):
                joined = joined.replace(b"*\n", b"\n").removesuffix(b"*")
                odd = b""
        seqs = joined.split(b"\n")
        fast = not odd and len(seqs) == len(bodies) and b"" not in seqs and b"" not in ids
        if fast and self.check_duplicates:
            new = set(ids)
            fast = len(new) == len(ids) and seen.isdisjoint(new)
            if fast:
                seen |= new
        lines = _header_lines(bodies, base + pre.count(b"\n")) if track_lines or not fast else []
        if fast:
            self.records += len(ids)
            return FastaBlock(ids, seqs, descs, lines, packed=joined)
        return self._parse_slowly(ids, descs, bodies, lines, name, seen)

    def _parse_slowly(
        self,
        ids: list[bytes],
        descs: list[bytes],
        bodies: list[bytes],
        lines: list[int],
        name: str,
        seen: set[bytes],
    ) -> FastaBlock:
        out = FastaBlock([], [], [], [])
        for rid, desc, body, line in zip(ids, descs, bodies, lines, strict=True):
            try:
                if not rid:  # the header starts with blanks: the id is the first word after them
                    rid = record_id_from_header(desc.decode("utf-8", errors="replace")).encode()
                    if not rid:
                        raise InvalidSequenceError(f"{name}:{line}: header without an id")
                    desc = desc.split(None, 1)[1] if len(desc.split(None, 1)) > 1 else b""
                if self.check_duplicates:
                    if rid in seen:
                        shown = rid.decode("utf-8", errors="replace")
                        raise InvalidSequenceError(f"{name}:{line}: record '{shown}': duplicate id")
                    seen.add(rid)
                seq = self._clean(body, rid, name, line)
            except InvalidSequenceError as exc:
                if not self.skip_invalid:
                    raise
                self.skipped += 1
                if len(self.skipped_messages) < 100:
                    self.skipped_messages.append(str(exc))
                log.warning("skipped invalid record: %s", exc)
                continue
            self.records += 1
            out.ids.append(rid)
            out.sequences.append(seq)
            out.descriptions.append(desc)
            out.lines.append(line)
        return out

    def _clean(self, body: bytes, rid: bytes, name: str, line: int) -> bytes:
        seq = body.translate(_UPPER, _WHITESPACE).removesuffix(b"*")
        if seq and not seq.translate(None, _VALID):
            return seq
        text, shown = body.decode("utf-8", errors="replace"), rid.decode("utf-8", errors="replace")
        return clean_sequence(text, shown, self.policy, source=name, line=line).encode()


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
