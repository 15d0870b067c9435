"""How :mod:`prott5nv.fasta` reads fast: the scanners below the public reader, chosen in one place
(:meth:`BlockScanner.scan_blocks`: the C accelerator where it was built, else numpy; the careful regex path
for any unit they do not handle).

The file is read in units of whole records (8 MiB each) by a read-ahead thread (file reads, gzip
inflation -- ISA-L's when installed -- and the caller's checksum release the GIL, so they overlap with
parsing). Each unit is parsed without per-record Python work:

* by the C accelerator (``_fastscan.c``, built by setup.py where a compiler exists): one pass, GIL
  released, two units at a time (:meth:`BlockScanner._scan_ahead`); it validates, upper-cases, deletes
  line breaks (and CR, blanks, gaps under the policy, a final '*'), applies the length window and
  writes the store's ``SEQ\nSEQ\n`` layout; the reader then reuses the unit's buffer;
* else by numpy (:meth:`BlockScanner._parse_numpy`): header lines overwritten in place, one ``translate``,
  one search for NUL to check the alphabet.

Units holding anything these do not handle (a bad character, text before the first header, an empty
record or id, a duplicate) take the careful path instead: a regex split and, for a unit with a problem,
record-by-record checking, which produces the error text of :func:`~prott5nv.sequence.clean_sequence`.
Memory stays at a few units, plus the set of seen ids when duplicate checking is on. Every error names
the file, the line of the record's header and the record id.
"""

from __future__ import annotations

import functools
import gzip
import io
import logging
import os
import queue
import re
import sys
import threading
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import compress, repeat
from typing import NamedTuple

import numpy as np

from ..errors import FastaFormatError, InputFileError, InvalidSequenceError
from ..sequence import RESIDUES, SequencePolicy, clean_sequence

try:  # the optional C accelerator (setup.py); without it the numpy path parses
    from .. import _fastscan
except ImportError:  # pragma: no cover - depends on the build
    _fastscan = None
try:  # ISA-L's inflate, about 2.5x zlib's (the optional extra `prott5nv[isal]`)
    from isal import igzip as _igzip
    from isal.isal_zlib import error as _IsalError
except ImportError:  # pragma: no cover - depends on the install
    _igzip, _IsalError = None, zlib.error

log = logging.getLogger(__name__)

_GZIP_MAGIC = b"\x1f\x8b"
_BOM = b"\xef\xbb\xbf"  # the UTF-8 byte-order mark some editors write first
_CHUNK = 8 << 20
_READ = 256 << 10  # bytes of inflated gzip data per read call
_SCAN_THREADS = 2  # units parsed at once by the C accelerator
_WHITESPACE = b" \t\r\n\v\f"
_UPPER = bytes.maketrans(b"abcdefghijklmnopqrstuvwxyz", b"ABCDEFGHIJKLMNOPQRSTUVWXYZ")
# Parsing joins the record bodies with '>' (cannot occur inside a valid body), then one translate deletes
# whitespace, upper-cases, and turns the '>' separators into '\n' (deletion applies to input bytes only).
_PACK = bytes.maketrans(b"abcdefghijklmnopqrstuvwxyz>", b"ABCDEFGHIJKLMNOPQRSTUVWXYZ\n")
_VALID = RESIDUES.encode()
_VALID_OR_SEP = _VALID + b"\n"
# One match per header line: group 1 is the id (first word), group 2 the rest of the line.
_HEADER = re.compile(rb"\n>(\S*)([^\n]*)")
_NL, _GT = ord("\n"), ord(">")
_BLANK_CODES = np.frombuffer(b" \t\r\v\f", np.uint8)  # whitespace that can occur inside a header line


@functools.lru_cache(maxsize=8)
def _unit_table(policy: SequencePolicy) -> tuple[bytes, bytes]:
    """``translate`` arguments of the whole-array path: residues (either case) to upper case, '>' (the
    record marker) to a newline, whitespace (and gaps, under `strip_gaps`) deleted, every other byte to
    NUL -- the one value checked afterwards (other letters to X under `unknown_to_x`)."""
    table = bytearray(256)
    for c in RESIDUES.encode():
        table[c] = table[c | 0x20] = c
    if policy.unknown_to_x:
        for c in range(ord("A"), ord("Z") + 1):
            if not table[c]:
                table[c] = table[c | 0x20] = ord("X")
    table[_GT] = _NL
    return bytes(table), _WHITESPACE + (b"-." if policy.strip_gaps else b"")


@functools.lru_cache(maxsize=8)
def _scan_table(policy: SequencePolicy) -> bytes:
    """The byte table of the C accelerator (``_fastscan.c``): the upper-case residue a byte stands for,
    1 for bytes deleted (whitespace; gaps under `strip_gaps`), 2 for '*', 0 for anything else."""
    table = bytearray(_unit_table(policy)[0])
    table[_GT] = 0
    for c in _WHITESPACE:
        table[c] = 1
    if policy.strip_gaps:
        table[ord("-")] = table[ord(".")] = 1
    table[ord("*")] = 2
    return bytes(table)


@dataclass
class FastaBlock:
    """The valid records of one block of a FASTA file, column-wise as bytes (what :mod:`prott5nv.data`
    stores): no per-record Python objects unless :attr:`ids` / :attr:`sequences` are asked for."""

    packed: bytes | bytearray  # cleaned sequences (upper case, no whitespace, no final '*'), each + b"\n"
    lengths: np.ndarray  # int64, residues of each record
    id_packed: bytes  # record ids, each followed by b"\n"
    id_lengths: np.ndarray  # int64
    lines: np.ndarray  # int64, header line of each record
    descriptions: list[bytes] | None = None  # rest of each header line, when asked for

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def ids(self) -> list[bytes]:
        return self.id_packed.split(b"\n")[:-1]

    @property
    def sequences(self) -> list[bytes]:
        return bytes(self.packed).split(b"\n")[:-1]

    @classmethod
    def from_records(
        cls, ids: list[bytes], sequences: list[bytes], descriptions: list[bytes] | None, lines: list[int]
    ) -> FastaBlock:
        n = len(ids)
        return cls(
            packed=b"".join(s + b"\n" for s in sequences),
            lengths=np.fromiter(map(len, sequences), np.int64, n),
            id_packed=b"".join(i + b"\n" for i in ids),
            id_lengths=np.fromiter(map(len, ids), np.int64, n),
            lines=np.asarray(lines, np.int64).reshape(n),
            descriptions=descriptions,
        )

    def select(self, keep: np.ndarray) -> FastaBlock:
        """The records where boolean `keep` is true (copied by the C accelerator, or as runs of kept
        records -- not one by one)."""
        if keep.all():
            return self
        return FastaBlock(
            packed=_select_items(self.packed, self.lengths, keep),
            lengths=self.lengths[keep],
            id_packed=_select_items(self.id_packed, self.id_lengths, keep),
            id_lengths=self.id_lengths[keep],
            lines=self.lines[keep],
            descriptions=None if self.descriptions is None else list(compress(self.descriptions, keep)),
        )

    def id_digests(self) -> np.ndarray:
        """A 64-bit hash (int64) of each id, for duplicate detection (equal within one process)."""
        return _digests(self.id_packed, self.id_lengths)

    def sequence_digests(self) -> np.ndarray:
        """A 64-bit hash (int64) of each sequence (see :meth:`id_digests`)."""
        return _digests(self.packed, self.lengths)


def _digests(packed: bytes | bytearray, lengths: np.ndarray) -> np.ndarray:
    if _fastscan is not None:
        return np.frombuffer(_fastscan.hash_items(packed, lengths), np.int64)
    return np.fromiter(map(hash, bytes(packed).split(b"\n")[:-1]), np.int64, len(lengths))


def _select_items(packed: bytes | bytearray, lengths: np.ndarray, keep: np.ndarray) -> bytes:
    """The items of `packed` (each of `lengths` bytes plus a separator) where `keep` is true."""
    if _fastscan is not None:
        return _fastscan.compact(packed, lengths, keep.view(np.uint8))
    edges = np.diff(keep.astype(np.int8), prepend=np.int8(0), append=np.int8(0))
    first, stop = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    return b"".join(_take_runs(packed, lengths, first, stop))


def _take_runs(packed: bytes | bytearray, lengths: np.ndarray, first: np.ndarray, stop: np.ndarray) -> list:
    """Views of items ``first[i]:stop[i]`` of `packed` (items of `lengths` bytes, each followed by one
    separator)."""
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths + 1, out=offsets[1:])
    view = memoryview(packed).toreadonly()
    return [view[a:b] for a, b in zip(offsets[first].tolist(), offsets[stop].tolist(), strict=True)]


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The positions ``starts[i] .. starts[i] + lengths[i] - 1`` of all items, concatenated, and where
    each item begins in that concatenation."""
    offsets = np.cumsum(lengths) - lengths
    total = int(offsets[-1] + lengths[-1]) if len(lengths) else 0
    return np.repeat(starts - offsets, lengths) + np.arange(total), offsets


class _Tap(io.RawIOBase):
    """A read-only file wrapper that shows every chunk read from disk to `callback` (checksums, progress).
    The chunk is a read-only view, valid during the call only."""

    def __init__(self, raw: io.BufferedReader, callback: Callable[[memoryview], None]):
        self._raw, self._callback = raw, callback

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[override]
        n = self._raw.readinto(buffer)
        if n:
            with memoryview(buffer) as view, view[:n] as chunk, chunk.toreadonly() as seen:
                self._callback(seen)
        return n

    def close(self) -> None:
        self._raw.close()
        super().close()


#: What reading a damaged input raises (truncated or corrupt gzip data, an I/O error).
READ_ERRORS = (OSError, EOFError, zlib.error, _IsalError)


def read_problem(path: str | os.PathLike, line: int, exc: BaseException) -> InputFileError:
    """The one error for an input that cannot be read to its end, naming the last line read (gzip data is
    inflated in blocks: the damage is in that line or within the next block's worth of text)."""
    what = exc.strerror if isinstance(exc, OSError) and exc.strerror else f"truncated or damaged gzip data ({exc})"
    return InputFileError(f"{path}:{line}: cannot read past this line: {what}")


def check_input(path: str | os.PathLike) -> None:
    """Raise :class:`~prott5nv.errors.InputFileError` now if `path` cannot be opened and read (missing, a
    directory, no permission, not gzip after all): commands check every input before any work."""
    with open_maybe_gzip(path):
        pass


def open_maybe_gzip(
    path: str | os.PathLike, on_read: Callable[[memoryview], None] | None = None
) -> io.BufferedIOBase:
    """Open `path` for binary reading, decompressing when its first bytes are the gzip magic, and past a
    UTF-8 byte-order mark (what some editors write first: the text after it is read). A file that cannot
    be opened (missing, a directory, not readable) raises :class:`~prott5nv.errors.InputFileError`.

    `on_read`, when given, sees every raw (still compressed) chunk read from disk.
    """
    try:
        f = open(path, "rb")  # noqa: SIM115 - returned to the caller
    except OSError as exc:
        raise InputFileError(f"{path}: cannot open: {exc.strerror or exc}") from None
    try:
        head = f.peek(2)[:2]
        stream: io.BufferedIOBase = f if on_read is None else io.BufferedReader(_Tap(f, on_read))
        if head == _GZIP_MAGIC:
            opener = _igzip.IGzipFile if _igzip is not None else gzip.GzipFile
            stream = opener(fileobj=stream, mode="rb")  # type: ignore[assignment]
        if stream.peek(len(_BOM))[: len(_BOM)] == _BOM:
            stream.read(len(_BOM))
    except READ_ERRORS as exc:
        f.close()
        raise read_problem(path, 1, exc) from None
    return stream


def record_id_from_header(header: str) -> str:
    """The id is the first whitespace-delimited word of the header (without `>`)."""
    parts = header.split(None, 1)
    return parts[0] if parts else ""


class _Unreadable(Exception):
    """Reading failed (:data:`READ_ERRORS`) after `newlines` newlines of the unit being read: the
    consumer, which knows the unit's first line, names the line where the data ends."""

    def __init__(self, cause: BaseException, newlines: int = 0) -> None:
        super().__init__(str(cause))
        self.cause, self.newlines = cause, newlines


def _fill(fh: io.IOBase, view: memoryview) -> int:
    """Read into `view` until it is full or the file ends; returns the byte count. A read error raises
    :class:`_Unreadable` with the newlines read into `view` before it (gzip data is read :data:`_READ`
    bytes at a time: a gzip reader that fails loses what it inflated for the failing read)."""
    done = 0
    step = _READ if isinstance(fh, gzip.GzipFile) else len(view)  # ISA-L's IGzipFile is one too
    while done < len(view):
        try:
            n = fh.readinto(view[done : done + step])  # type: ignore[attr-defined]
        except READ_ERRORS as exc:
            raise _Unreadable(exc, view[:done].tobytes().count(b"\n")) from None
        if not n:
            break
        done += n
    return done


class _Unit(NamedTuple):
    """Whole records: a fresh bytearray that starts with ``\n`` (the file's first unit with a virtual one)
    and ends with ``\n`` (one is added at the end of the file), and -- for the numpy path -- what the
    read-ahead thread found."""

    buf: bytearray
    newlines: np.ndarray | None = None  # positions of every newline
    heads: np.ndarray | None = None  # indices into `newlines` of those followed by '>' (header starts)
    gts: int = 0  # count of '>' anywhere


def _scan(buf: bytearray) -> _Unit:
    """Index a unit for the numpy path."""
    a = np.frombuffer(buf, np.uint8)
    nl = np.flatnonzero(a == _NL)
    return _Unit(buf, nl, np.flatnonzero(a[nl[:-1] + 1] == _GT), int(np.count_nonzero(a == _GT)))


def _buffer(size: int, spare: queue.SimpleQueue | None) -> bytearray:
    """A bytearray of `size` bytes: a spare one (a consumed unit's) when there is one -- its memory is
    already mapped, where a fresh one costs page faults -- else a new one."""
    try:
        buf = spare.get_nowait() if spare is not None else bytearray(size)
    except queue.Empty:
        return bytearray(size)
    if len(buf) < size:
        buf += bytes(size - len(buf))
    else:
        del buf[size:]
    return buf


def _read_units(fh: io.IOBase, index: bool, spare: queue.SimpleQueue | None = None) -> Iterator[_Unit]:
    """Split the file into units of whole records (see :class:`_Unit`), each ending before the last
    header of a chunk; `index`: scan each unit for the numpy path; `spare`: consumed units' buffers to
    reuse. A record longer than a chunk makes the next read larger (no quadratic copying)."""
    carry = bytearray(b"\n")
    while True:
        buf = _buffer(len(carry) + max(_CHUNK, len(carry)), spare)
        buf[: len(carry)] = carry
        try:
            with memoryview(buf) as view:
                got = _fill(fh, view[len(carry) :])
        except _Unreadable as exc:  # the carry's newlines too (its first is the unit's leading one)
            raise _Unreadable(exc.cause, exc.newlines + carry.count(b"\n") - 1) from None
        end = len(carry) + got
        del buf[end:]
        if not got:  # end of file: what is left is the last unit
            if buf.strip():
                if not buf.endswith(b"\n"):
                    buf += b"\n"
                yield _scan(buf) if index else _Unit(buf)
            return
        # the last header starts the carry; one right after the last newline waits for the next round
        cut = buf.rfind(b"\n>", 1)
        if cut < 0:  # one record so far: read on
            carry = buf
            continue
        carry = buf[cut:]
        del buf[cut + 1 :]
        yield _scan(buf) if index else _Unit(buf)


def _prefetch(items: Iterator) -> Iterator:
    """Run the iterator `items` in a thread, a few items ahead: file reads, gzip inflation, the `on_read`
    checksum and numpy scans release the GIL, so they overlap with parsing."""
    out: queue.Queue = queue.Queue(maxsize=3)
    stop = threading.Event()
    done = object()

    def put(item: object) -> None:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def work() -> None:
        try:
            for item in items:
                put(item)
                if stop.is_set():
                    return
            put(done)
        except BaseException as exc:  # handed to the consumer, raised there
            put(exc)

    thread = threading.Thread(target=work, name="fasta-read", daemon=True)
    thread.start()
    try:
        while True:
            item = out.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
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


class BlockScanner:
    """The parsing half of :class:`prott5nv.fasta.FastaReader` (which holds these settings and counters)."""

    policy: SequencePolicy
    skip_invalid: bool
    check_duplicates: bool
    skipped: int
    skipped_messages: list[str]
    records: int
    min_length: int
    max_length: int | None
    too_short: int
    too_long: int
    raw: bool

    def scan_blocks(self, fh: io.IOBase, name: str, describe: bool) -> Iterator[FastaBlock]:
        """The valid records of the open file `fh` (named `name` in messages), block by block. The one
        place where the parser is chosen: the C accelerator when it was built, else numpy; either hands a
        unit it cannot take to the careful path."""
        seen: set[bytes] = set()
        use_c = _fastscan is not None and not self.raw
        base = 1  # line number of the first line after the unit's leading newline
        try:
            # the C path leaves a unit's buffer unreferenced once parsed: the reader reuses it
            spare: queue.SimpleQueue | None = queue.SimpleQueue() if use_c else None
            units = _prefetch(_read_units(fh, index=not use_c, spare=spare))
            scanned = self._scan_ahead(units) if use_c else zip(units, repeat(None))
            for unit, got in scanned:
                if self.raw:  # text as written: the careful path keeps it
                    parsed = None
                elif use_c:
                    parsed = self._parse_c(unit.buf, got, base, seen, describe)
                else:
                    parsed = self._parse_numpy(unit, base, seen, describe)
                if parsed is None:
                    block, newlines = self._parse(bytes(unit.buf), base, name, seen), unit.buf.count(b"\n") - 1
                else:
                    block, newlines = parsed
                if not use_c or parsed is None:
                    block = self._filter(block)
                base += newlines
                if len(block):
                    yield block
                if spare is not None:
                    spare.put(unit.buf)
        except _Unreadable as exc:  # truncated or damaged gzip data: it ends in the unit after `base`
            raise read_problem(name, base + exc.newlines, exc.cause) from None

    # ------------------------------------------------------------------ unit parsing
    def _scan_ahead(self, units: Iterator[_Unit]) -> Iterator[tuple[_Unit, tuple | None]]:
        """Each unit with its ``_fastscan.scan`` result, in order; the scans (GIL released) run in
        :data:`_SCAN_THREADS` threads, a few units ahead. Line numbers come out relative to the unit."""
        table, longest = _scan_table(self.policy), self.max_length if self.max_length is not None else sys.maxsize

        def scan(buf: bytearray) -> tuple | None:
            return _fastscan.scan(buf, len(buf), table, 0, self.min_length, longest)

        with ThreadPoolExecutor(_SCAN_THREADS, thread_name_prefix="fasta-scan") as pool:
            ahead: deque = deque()
            failed = None
            try:
                for unit in units:
                    ahead.append((unit, pool.submit(scan, unit.buf)))
                    if len(ahead) > _SCAN_THREADS:
                        first, future = ahead.popleft()
                        yield first, future.result()
            except _Unreadable as exc:  # the units read before the failure are parsed first
                failed = exc
            while ahead:
                first, future = ahead.popleft()
                yield first, future.result()
            if failed is not None:
                raise failed

    def _parse_c(
        self, buf: bytearray, got: tuple | None, base: int, seen: set[bytes], describe: bool
    ) -> tuple[FastaBlock, int] | None:
        """Finish a unit scanned by the C accelerator (one pass, GIL released; see ``_fastscan.c``);
        returns the block and the unit's newline count, or None for the careful path (as
        :meth:`_parse_numpy`)."""
        if got is None:
            return None
        packed, lengths, id_packed, id_lengths, lines, spans, newlines, too_short, too_long = got
        lengths = np.frombuffer(lengths, np.int64)
        if self.check_duplicates:
            new = set(id_packed.split(b"\n")[:-1])
            if len(new) != len(lengths) or not seen.isdisjoint(new):
                return None
            seen |= new
        self.too_short += too_short
        self.too_long += too_long
        self.records += len(lengths) + too_short + too_long
        descriptions = None
        if describe:
            span = np.frombuffer(spans, np.int64).reshape(-1, 2).tolist()
            descriptions = [bytes(buf[s:t]) for s, t in span]
        block = FastaBlock(
            packed=packed,
            lengths=lengths,
            id_packed=id_packed,
            id_lengths=np.frombuffer(id_lengths, np.int64),
            lines=np.frombuffer(lines, np.int64) + base,
            descriptions=descriptions,
        )
        return block, newlines

    def _filter(self, block: FastaBlock) -> FastaBlock:
        """Drop (and count) the records outside the length window (the C path filters as it parses)."""
        if self.min_length <= 1 and self.max_length is None:
            return block
        short = block.lengths < self.min_length
        long = block.lengths > self.max_length if self.max_length is not None else np.zeros_like(short)
        self.too_short += int(np.count_nonzero(short))
        self.too_long += int(np.count_nonzero(long))
        return block.select(~(short | long))

    def _parse_numpy(
        self, unit: _Unit, base: int, seen: set[bytes], describe: bool
    ) -> tuple[FastaBlock, int] | None:
        """Parse a unit with whole-array operations (the path without the C accelerator); returns the
        block and the unit's newline count, or None (unit left as it was) when it holds
        anything unusual: text before the first header, '*' or another invalid character, a '>' not
        starting a header, an empty record or id, a duplicate id. The careful path then handles it.
        Lower case, CR, blanks (and gaps / unknown letters under the policy) are handled here.

        Record r: header '>' at h, header text up to the newline at e, residue lines up to the newline
        at m (the one before the next header, or the unit's last). Header lines are overwritten with
        newlines and each m with '>', so one ``translate`` (:func:`_unit_table`: newlines deleted, '>'
        to newline, residues upper-cased, anything else to NUL) leaves the store's ``SEQ\\nSEQ\\n``,
        and a single search for NUL proves every byte valid. A '>' anywhere but at a header start
        (`gts` counts them all) sends the unit to the careful path, so no marker can be forged.
        """
        buf, nl, heads = unit.buf, unit.newlines, unit.heads
        if not len(heads) or heads[0] != 0 or len(heads) != unit.gts:
            return None
        a = np.frombuffer(buf, np.uint8)
        n = len(heads)
        h = nl[heads] + 1
        e = nl[heads + 1]
        nxt = np.append(heads[1:], len(nl) - 1)
        m = nl[nxt]
        lengths = (m - e - 1) - (nxt - heads - 2)  # bytes between e and m, less the newlines among them
        text, starts = _ranges(h + 1, e - h)  # header texts with their newlines
        header_bytes = a[text]
        id_lengths = e - h - 1
        blanks = np.flatnonzero(header_bytes < 33)
        blanks = blanks[np.isin(header_bytes[blanks], _BLANK_CODES)]
        if len(blanks):  # the id ends at the first blank of its header
            owner = np.searchsorted(starts, blanks, "right") - 1
            first = np.ones(len(owner), bool)
            first[1:] = owner[1:] != owner[:-1]
            id_lengths[owner[first]] = blanks[first] - starts[owner[first]]
        if not (lengths.all() and id_lengths.all()):
            return None
        if len(blanks):  # keep each id and the byte after it, made a newline
            ids = header_bytes[np.arange(len(text)) - np.repeat(starts, e - h) <= np.repeat(id_lengths, e - h)]
            ids[np.cumsum(id_lengths + 1) - 1] = _NL
            id_packed = ids.tobytes()
        else:  # the header lines are the ids
            id_packed = header_bytes.tobytes()
        descriptions = None
        if describe:
            after = (h + 1 + id_lengths).tolist()
            descriptions = [bytes(buf[s:t]) for s, t in zip(after, e.tolist(), strict=True)]
        a[text] = _NL
        a[h] = _NL
        a[m] = _GT
        packed = buf.translate(*_unit_table(self.policy))
        good = b"\0" not in packed
        if good and len(packed) != n + int(lengths.sum()):  # CR, blanks or gaps were deleted: count again
            lengths = np.diff(np.flatnonzero(np.frombuffer(packed, np.uint8) == _NL), prepend=-1) - 1
            good = bool(lengths.all())
        if good and self.check_duplicates:
            new = set(id_packed.split(b"\n")[:-1])
            good = len(new) == n and seen.isdisjoint(new)
            if good:
                seen |= new
        if not good:  # put the unit back as it was
            a[m] = _NL
            a[h] = _GT
            a[text] = header_bytes
            return None
        self.records += n
        block = FastaBlock(
            packed=packed,
            lengths=lengths,
            id_packed=id_packed,
            id_lengths=id_lengths,
            lines=base + heads,
            descriptions=descriptions,
        )
        return block, len(nl) - 1

    def _parse(self, raw: bytes, base: int, name: str, seen: set[bytes]) -> FastaBlock:
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
            return FastaBlock.from_records([], [], [], [])
        lines = _header_lines(bodies, base + pre.count(b"\n"))
        joined = b">".join(bodies).translate(_PACK, _WHITESPACE)
        odd = joined.translate(None, _VALID_OR_SEP)
        if odd and not odd.strip(b"*"):  # only stop symbols: fine if each ends its record
            stops = joined.count(b"*\n") + joined.endswith(b"*")
            if stops == len(odd):
                joined = joined.replace(b"*\n", b"\n").removesuffix(b"*")
                odd = b""
        seqs = joined.split(b"\n")
        fast = not odd and len(seqs) == len(bodies) and b"" not in seqs and b"" not in ids and not self.raw
        if fast and self.check_duplicates:
            new = set(ids)
            fast = len(new) == len(ids) and seen.isdisjoint(new)
            if fast:
                seen |= new
        if fast:
            self.records += len(ids)
            return FastaBlock.from_records(ids, seqs, descs, lines)
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
        out: tuple[list, list, list, list] = ([], [], [], [])
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
            for column, value in zip(out, (rid, seq, desc, line), strict=True):
                column.append(value)
        return FastaBlock.from_records(*out)

    def _clean(self, body: bytes, rid: bytes, name: str, line: int) -> bytes:
        if self.raw and body.translate(None, _WHITESPACE):
            return body.translate(None, _WHITESPACE)
        seq = body.translate(_UPPER, _WHITESPACE).removesuffix(b"*")
        if seq and not seq.translate(None, _VALID):
            return seq
        text, shown = body.decode("utf-8", errors="replace"), rid.decode("utf-8", errors="replace")
        return clean_sequence(text, shown, self.policy, source=name, line=line).encode()
