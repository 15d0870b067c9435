"""The resumable partial output of `embed`: a hidden directory beside the target, ``.OUT.partial/``.

    settings.json     how the run was configured; a resume with other settings is refused
    rank{r}.bin       rank r's results, float32, appended batch by batch
    rank{r}.journal   one JSON line per batch: [record number, id, length, byte offset, bytes] per protein
    rank{r}.done      rank r has finished its share

A batch's data is appended and flushed (and fsynced) *before* its journal line, so after a crash
(Ctrl-C, SIGKILL, power loss) every complete journal line describes data that is on disk. On resume the
journal is cut after its last complete line, the data file after the last byte that line points to, and
the proteins it lists are skipped. Nothing here is HDF5, so a kill cannot corrupt a half-written
container: the final file is written from these pieces at the end, through a temporary and a rename.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError

log = logging.getLogger(__name__)


#: Bytes read at once from the partial output: a protein's per-residue rows beyond this are handed to the
#: writers as :class:`DiskRows` (read block by block), never whole.
BLOCK_BYTES = 16 << 20


@dataclass(frozen=True)
class DiskRows:
    """A float32 ``(rows, dim)`` array in a file, read in blocks of at most :data:`BLOCK_BYTES`: the
    per-residue output of a long protein, written out without being held. Row i starts at value
    ``i * stride`` from `offset` (`stride` None: `dim`, the rows are contiguous); a stride of
    ``layers * dim`` reads one layer's column of ``[rows, layers, dim]`` rows."""

    fd: int
    offset: int
    shape: tuple[int, int]
    stride: int | None = None  # values from one row's start to the next's
    dtype = np.dtype(np.float32)

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.shape[1] * 4

    def blocks(self) -> Iterator[tuple[int, np.ndarray]]:
        """``(first row, rows)`` blocks in order (C-contiguous arrays)."""
        rows, dim = self.shape
        stride = self.stride or dim
        step = max(1, BLOCK_BYTES // (4 * stride))
        for lo in range(0, rows, step):
            n = min(step, rows - lo)
            raw = os.pread(self.fd, ((n - 1) * stride + dim) * 4, self.offset + lo * stride * 4)
            values = np.frombuffer(raw, np.float32)
            if stride == dim:
                yield lo, values.reshape(n, dim)
            else:  # every stride-th run of dim values
                yield lo, np.lib.stride_tricks.as_strided(values, (n, dim), (stride * 4, 4), writeable=False).copy()

    def __array__(self, dtype=None, copy=None) -> np.ndarray:  # noqa: ANN001 - numpy's protocol
        out = np.concatenate([b for _, b in self.blocks()]) if self.shape[0] else np.empty(self.shape, np.float32)
        return out if dtype is None else out.astype(dtype)


@dataclass(frozen=True)
class StoredProtein:
    """One protein of the partial output; its data is read on demand (valid until the next protein is
    asked for)."""

    record: int  # position of the record in the input file (0-based)
    id: str
    length: int  # residues embedded (after truncation)
    fd: int  # the rank's data file, open
    offset: int  # where the protein's float32 values start in it
    nbytes: int  # how many bytes they take (see embed: per-residue rows first, then the poolings)

    def read(self, start: int = 0, count: int | None = None) -> np.ndarray:
        """`count` float32 values (default: all) from value `start` on."""
        count = self.nbytes // 4 - start if count is None else count
        return np.frombuffer(os.pread(self.fd, count * 4, self.offset + start * 4), np.float32)

    def rows(self, start: int, rows: int, dim: int, layers: int = 1) -> list[np.ndarray | DiskRows]:
        """Each layer's ``(rows, dim)`` array of the ``(rows, layers, dim)`` block of values from `start` on:
        in memory when the block is small, else :class:`DiskRows` (strided when there are several layers)."""
        if rows * layers * dim * 4 <= BLOCK_BYTES:
            block = self.read(start, rows * layers * dim).reshape(rows, layers, dim)
            return [block[:, 0]] if layers == 1 else [np.ascontiguousarray(block[:, k]) for k in range(layers)]
        stride = layers * dim
        return [DiskRows(self.fd, self.offset + (start + k * dim) * 4, (rows, dim), stride) for k in range(layers)]

    @property
    def data(self) -> np.ndarray:
        """All of its values."""
        return self.read()


def partial_path(target: str | os.PathLike) -> Path:
    target = Path(target)
    return target.with_name(f".{target.name}.partial")


class PartialRun:
    """One rank's view of the partial directory: recover, append batches, mark done; rank 0 merges."""

    def __init__(self, target: str | os.PathLike, settings: dict[str, Any], rank: int = 0, world_size: int = 1):
        self.dir = partial_path(target)
        self.settings = settings
        self.rank, self.world_size = rank, world_size
        self._bin = self._journal = None
        self.resumed = 0  # proteins found already done

    # ---------------------------------------------------------------------------------- opening
    def open(self, n_records: int, restart: bool = False) -> np.ndarray:
        """Create or reopen the directory; return a bool array marking the records already written."""
        self.dir.mkdir(parents=True, exist_ok=True)
        settings_file = self.dir / "settings.json"
        bin_path, journal_path = self._paths(self.rank)
        if restart:
            for p in (bin_path, journal_path, self._done_path(self.rank)):
                p.unlink(missing_ok=True)
        stored = _read_json(settings_file)
        if stored is not None and stored != self.settings and not restart:
            diff = sorted(k for k in {*stored, *self.settings} if stored.get(k) != self.settings.get(k))
            shown = "; ".join(f"{k}: {stored.get(k)!r} before, {self.settings.get(k)!r} now" for k in diff[:6])
            raise ConfigError(
                f"{self.dir} holds an interrupted run with other settings ({shown}); rerun with the same "
                "settings to resume it, or pass --restart to discard it"
            )
        if stored != self.settings:
            tmp = self.dir / f".settings.{self.rank}.tmp"
            tmp.write_text(json.dumps(self.settings, indent=1, sort_keys=True))
            os.replace(tmp, settings_file)
        done = np.zeros(n_records, dtype=bool)
        end = _recover(bin_path, journal_path, done)
        self.resumed = int(done.sum())
        if bin_path.exists():
            os.truncate(bin_path, end)  # drop the data of a batch whose journal line never made it
        self._bin = open(bin_path, "ab")
        self._journal = open(journal_path, "ab")
        if self.resumed:
            log.info("resuming %s: %d proteins already embedded", self.dir, self.resumed)
        return done

    def _paths(self, rank: int) -> tuple[Path, Path]:
        return self.dir / f"rank{rank}.bin", self.dir / f"rank{rank}.journal"

    def _done_path(self, rank: int) -> Path:
        return self.dir / f"rank{rank}.done"

    # ---------------------------------------------------------------------------------- writing
    def tell(self) -> int:
        """Where the next values written go in this rank's data file."""
        return self._bin.tell()

    def write(self, data: np.ndarray) -> None:
        """Append float32 values to the data file: not durable, nor part of the run, until a :meth:`commit`
        lists the protein they belong to (a protein's values are written contiguously, possibly over many
        calls: a long protein window by window)."""
        self._bin.write(np.ascontiguousarray(data, dtype=np.float32).data)

    def commit(self, entries: list[tuple[int, str, int, int, int]]) -> None:
        """Durably record finished proteins ``(record, id, length, offset, bytes)`` whose values were
        written: the data is synced first, then one journal line (a batch)."""
        if not entries:
            return
        _sync(self._bin)
        self._journal.write(json.dumps([list(e) for e in entries], separators=(",", ":")).encode() + b"\n")
        _sync(self._journal)

    def append(self, proteins: list[tuple[int, str, int, np.ndarray]]) -> None:
        """Durably add one batch of finished proteins ``(record, id, length, float32 data)``."""
        entries = []
        for record, rid, length, data in proteins:
            offset = self.tell()
            self.write(data)
            entries.append((record, rid, length, offset, self.tell() - offset))
        self.commit(entries)

    def finish(self) -> None:
        """Close this rank's files and mark its share complete."""
        self.close()
        self._done_path(self.rank).write_text("done\n")

    def close(self) -> None:
        for fh in (self._bin, self._journal):
            if fh is not None:
                fh.close()
        self._bin = self._journal = None

    # ---------------------------------------------------------------------------------- merging
    def wait_for_ranks(self, poll: float = 0.5) -> None:
        """Block until every rank has marked its share done (a file barrier: no process group needed)."""
        waiting = [r for r in range(self.world_size) if not self._done_path(r).exists()]
        if waiting:
            log.info("waiting for ranks %s to finish", waiting)
        while waiting:
            time.sleep(poll)
            waiting = [r for r in waiting if not self._done_path(r).exists()]

    def proteins(self) -> Iterator[StoredProtein]:
        """Every stored protein, rank by rank in the order they were written (deterministic for a
        given input and settings, interrupted or not)."""
        for rank in range(self.world_size):
            bin_path, journal_path = self._paths(rank)
            if not bin_path.exists() or not bin_path.stat().st_size:
                continue
            with open(bin_path, "rb") as data, open(journal_path, "rb") as journal:
                for line in journal:  # read, not memory-mapped: mapped pages would count as resident
                    for record, rid, length, offset, nbytes in json.loads(line):
                        yield StoredProtein(record, rid, length, data.fileno(), offset, nbytes)

    def in_order(self, order: Iterable[tuple[int, int]]) -> Iterator[StoredProtein]:
        """The stored proteins in the order of `order`, ``(record, rank)`` pairs (the embedder gives input
        order), whatever order their batches were written in. Journal entries read ahead of the one wanted
        are kept until asked for: about a window's worth, since each window's batches are written
        together. Ends early at a record that is not stored (the caller counts)."""
        entries: dict[int, Iterator[list]] = {}
        ahead: dict[int, dict[int, list]] = {}
        files: dict[int, Any] = {}
        try:
            for record, rank in order:
                if rank not in entries:
                    bin_path, journal_path = self._paths(rank)
                    entries[rank], ahead[rank] = _journal_entries(journal_path), {}
                    files[rank] = open(bin_path, "rb") if bin_path.exists() else None
                buffered = ahead[rank]
                while record not in buffered:
                    entry = next(entries[rank], None)
                    if entry is None:
                        return
                    buffered[entry[0]] = entry
                _, rid, length, offset, nbytes = buffered.pop(record)
                yield StoredProtein(record, rid, length, files[rank].fileno(), offset, nbytes)
        finally:
            for fh in files.values():
                if fh is not None:
                    fh.close()

    def remove(self) -> None:
        self.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def _sync(fh) -> None:  # noqa: ANN001 - a binary file object
    fh.flush()
    os.fsync(fh.fileno())


def _journal_entries(path: Path) -> Iterator[list]:
    """The ``[record, id, length, offset, bytes]`` entries of a journal, in the order written."""
    if not path.exists():
        return
    with open(path, "rb") as journal:
        for line in journal:
            yield from json.loads(line)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _recover(bin_path: Path, journal_path: Path, done: np.ndarray) -> int:
    """Mark the proteins of the journal's complete lines in `done`; cut both files after them.
    Returns the length of valid data in the bin file."""
    size = bin_path.stat().st_size if bin_path.exists() else 0
    valid, end = 0, 0
    if journal_path.exists():
        raw = journal_path.read_bytes()
        pos = 0
        while (nl := raw.find(b"\n", pos)) >= 0:
            try:
                entries = json.loads(raw[pos:nl])
                last = max(offset + nbytes for _, _, _, offset, nbytes in entries)
            except (ValueError, TypeError):
                break
            if last > size:  # data not on disk (cannot happen after a plain kill; be safe anyway)
                break
            for record, *_ in entries:
                done[record] = True
            pos, valid, end = nl + 1, nl + 1, max(end, last)
        if valid < len(raw):
            log.info("%s: dropping an incomplete last batch", journal_path)
            with open(journal_path, "r+b") as fh:
                fh.truncate(valid)
    return end
