"""The on-disk sequence store written by `prott5nv preprocess` and read by training.

A data directory holds ``manifest.json`` (written last: a directory without a complete manifest is not a
store), the records in ``sequences/`` and one index per split, ``{train,val,test}.npy``: the sorted
record numbers (int64) of that split. ``sequences/`` is four flat files:

- ``residues.bin``: the upper-case residue letters of every record, each followed by ``\\n`` (so the file
  is also one sequence per line); ``offsets.npy``: int64, ``n + 1`` entries, record ``r`` is
  ``residues[offsets[r] : offsets[r + 1] - 1]``;
- ``ids.bin`` / ``id_offsets.npy``: the record ids, laid out the same way.

Splits index one shared buffer so that preprocessing writes each residue once (no copy per split).
The files are memory-mapped on first use, so random access is O(1) and a store pickles as its paths
only: DataLoader workers each reopen it lazily.
"""

from __future__ import annotations

import json
import os
import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

from ..errors import StoreError
from ..fsutil import sync_in_background

__all__ = ["SequenceStore", "StoreError", "StoreWriter", "load_manifest"]

MANIFEST = "manifest.json"
FORMAT = "prott5nv-sequence-store"
FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
SEQUENCES = "sequences"  # the directory holding every stored record; splits index into it
_BLOCK = 1 << 20  # entries per chunk when reading an index back


def _memmap(path: Path) -> np.ndarray:
    if path.stat().st_size == 0:  # np.memmap refuses empty files
        return np.empty(0, np.uint8)
    return np.memmap(path, dtype=np.uint8, mode="r")


class Int64Spool:
    """Append int64 values to a raw file (memory does not grow with the count); read back as a memory map."""

    def __init__(self, path: Path):
        self.path = path
        self._fh = open(path, "wb")  # noqa: SIM115 - closed in close()
        self.count = 0

    def append(self, values: np.ndarray) -> None:
        values = np.ascontiguousarray(values, dtype=np.int64)
        self._fh.write(values.tobytes())
        self.count += len(values)

    def close(self) -> np.ndarray:
        """Close and return the values as a read-only memory map (for random access to a few)."""
        self._fh.close()
        if self.count == 0:
            return np.empty(0, np.int64)
        return np.memmap(self.path, dtype=np.int64, mode="r")


class NpyWriter:
    """Write a 1-D int64 ``.npy`` of known length chunk by chunk through a file, not a memory map, so
    that the resident set stays one chunk however long the array."""

    def __init__(self, path: Path, count: int):
        self.path, self.count, self.written = path, count, 0
        self._fh = open(path, "wb")  # noqa: SIM115 - closed in close()
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.int64)), "fortran_order": False,
                  "shape": (count,)}  # fmt: skip
        np.lib.format.write_array_header_1_0(self._fh, header)

    def write(self, values: np.ndarray) -> None:
        self._fh.write(np.ascontiguousarray(values, dtype=np.int64).tobytes())
        self.written += len(values)

    def close(self) -> None:
        if self.written != self.count:
            raise AssertionError(f"{self.path}: wrote {self.written} of {self.count} values")
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()


def read_npy_chunks(path: Path, size: int = _BLOCK) -> Iterator[np.ndarray]:
    """The values of a 1-D ``.npy``, `size` at a time, read through a file (bounded memory)."""
    with open(path, "rb") as fh:
        version = np.lib.format.read_magic(fh)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(fh)
        left = shape[0]
        while left:
            part = np.fromfile(fh, dtype, min(size, left))
            if not len(part):
                raise StoreError(f"{path}: shorter than its header says; the store is damaged")
            left -= len(part)
            yield part


class _OffsetsWriter:
    """Write ``offsets.npy`` (int64, ``n + 1`` entries) from item lengths as they come (each item is
    followed by one separator byte): the values go after a header of fixed size, which is written last,
    once the count is known."""

    _HEADER = 128  # a version 1.0 header padded with spaces, as the format allows (a multiple of 64)

    def __init__(self, path: Path):
        self.path, self.count, self.end = path, 0, 0
        self._fh = open(path, "wb")  # noqa: SIM115 - closed in close()
        self._fh.write(bytes(self._HEADER) + np.zeros(1, np.int64).tobytes())

    def add(self, lengths: np.ndarray) -> None:
        if len(lengths):
            offsets = np.cumsum(lengths + 1) + self.end
            self._fh.write(offsets.tobytes())
            self.count += len(lengths)
            self.end = int(offsets[-1])

    def close(self) -> None:
        header = {"descr": "<i8", "fortran_order": False, "shape": (self.count + 1,)}
        text = repr(header).encode("latin1")
        text += b" " * (self._HEADER - 10 - len(text) - 1) + b"\n"
        self._fh.seek(0)
        self._fh.write(b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text)
        self._fh.close()


class _BackgroundWriter:
    """File writes done by a thread (writes release the GIL, so they overlap with parsing). At most a few
    buffers wait; an error is raised by the next call."""

    def __init__(self) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=4)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="store-write", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is None:
                try:
                    item[0].write(item[1])
                except BaseException as exc:  # raised in the caller's thread
                    self._error = exc

    def write(self, fh: IO[bytes], data: bytes | bytearray) -> None:
        self._raise()
        self._queue.put((fh, data))

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        """Wait for the queued writes; raises the first error."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._raise()


class StoreWriter:
    """Write a ``sequences/`` directory block by block in a single streaming pass (a context manager:
    leaving it by an exception stops the writer thread and closes the files)."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._res = open(self.dir / "residues.bin", "wb", buffering=1 << 22)  # noqa: SIM115
        self._ids = open(self.dir / "ids.bin", "wb", buffering=1 << 20)  # noqa: SIM115
        self._offsets = _OffsetsWriter(self.dir / "offsets.npy")
        self._id_offsets = _OffsetsWriter(self.dir / "id_offsets.npy")
        self._writer = _BackgroundWriter()

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, *rest: object) -> None:
        if kind is not None:
            try:
                self._writer.close()
            except BaseException:  # noqa: S110 - the error that brought us here is the one to report
                pass
            for fh in (self._res, self._ids, self._offsets._fh, self._id_offsets._fh):
                fh.close()

    def add(
        self,
        packed: bytes | bytearray,
        lengths: np.ndarray,
        id_packed: bytes,
        id_lengths: np.ndarray,
    ) -> None:
        """Append records: their cleaned residues and their ids, each item followed by ``b"\\n"``, and
        the item lengths (what :class:`~prott5nv.fasta.FastaBlock` holds). The
        buffers are written later by a thread: do not change them."""
        if not len(lengths):
            return
        self._writer.write(self._res, packed)
        self._writer.write(self._ids, id_packed)
        self._offsets.add(lengths)
        self._id_offsets.add(id_lengths)

    def close(self) -> tuple[int, int]:
        """Finish the files; returns (sequences, residues). They are then flushed to disk in the
        background: call :attr:`synced` before declaring the store complete."""
        self._writer.close()
        self._res.close()
        self._ids.close()
        self._offsets.close()
        self._id_offsets.close()
        count, residues = self._offsets.count, self._offsets.end - self._offsets.count
        self.synced = sync_in_background([self.dir / name for name in ("residues.bin", "ids.bin", "offsets.npy",
                                                                       "id_offsets.npy")])  # fmt: skip
        return count, residues


class SequenceStore:
    """Random access to the sequences of a store directory, or -- with `records` -- of one split: a
    sorted int64 array (``.npy``) of record numbers into that directory (see the module docstring).

    Open files are never pickled: a copy sent to a DataLoader worker maps the files again on first use.
    """

    def __init__(self, directory: str | os.PathLike, records: str | os.PathLike | None = None):
        self.dir = Path(directory)
        self.records_path = Path(records) if records is not None else None
        self._maps: dict[str, np.ndarray] | None = None
        m = self._open()
        self._len = len(m["records"]) if "records" in m else len(m["offsets"]) - 1

    @classmethod
    def open(cls, data_dir: str | os.PathLike, split: str = "train") -> SequenceStore:
        """The store of `split` in a data directory written by `prott5nv preprocess` (manifest checked)."""
        manifest = load_manifest(data_dir)
        if split not in manifest["splits"]:
            raise StoreError(f"{data_dir}: no split {split!r} (have {', '.join(manifest['splits'])})")
        store = cls(Path(data_dir) / SEQUENCES, Path(data_dir) / f"{split}.npy")
        expected = manifest["splits"][split]
        if len(store) != expected["sequences"] or store.total_residues != expected["residues"]:
            raise StoreError(
                f"{data_dir}: split {split} holds {len(store)} sequences / {store.total_residues} residues but "
                f"the manifest says {expected['sequences']} / {expected['residues']}; the store is damaged"
            )
        return store

    def _open(self) -> dict[str, np.ndarray]:
        if self._maps is None:
            try:
                maps = {
                    "residues": _memmap(self.dir / "residues.bin"),
                    "offsets": np.load(self.dir / "offsets.npy", mmap_mode="r"),
                    "ids": _memmap(self.dir / "ids.bin"),
                    "id_offsets": np.load(self.dir / "id_offsets.npy", mmap_mode="r"),
                }
                if self.records_path is not None:
                    maps["records"] = np.load(self.records_path, mmap_mode="r")
            except (OSError, ValueError) as exc:
                raise StoreError(f"{self.dir}: not a readable sequence store ({exc})") from None
            n = len(maps["offsets"])
            if n == 0 or len(maps["id_offsets"]) != n or int(maps["offsets"][-1]) != len(maps["residues"]):
                raise StoreError(f"{self.dir}: offsets do not match the residue file; the store is damaged")
            if "records" in maps and len(maps["records"]) and not 0 <= int(maps["records"][-1]) < n - 1:
                raise StoreError(f"{self.records_path}: record numbers out of range; the store is damaged")
            self._maps = maps
        return self._maps

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_maps": None}

    def __len__(self) -> int:
        return self._len

    def _record(self, index: int) -> int:
        if not -self._len <= index < self._len:
            raise IndexError(f"sequence index {index} out of range for a store of {self._len}")
        index %= self._len
        m = self._open()
        return int(m["records"][index]) if "records" in m else index

    def __getitem__(self, index: int) -> bytes:
        """Residue letters of sequence `index` (ASCII bytes)."""
        r = self._record(index)
        m = self._open()
        return m["residues"][m["offsets"][r] : m["offsets"][r + 1] - 1].tobytes()

    def sequence(self, index: int) -> str:
        return self[index].decode("ascii")

    def id(self, index: int) -> str:
        r = self._record(index)
        m = self._open()
        return m["ids"][m["id_offsets"][r] : m["id_offsets"][r + 1] - 1].tobytes().decode("utf-8", "replace")

    @property
    def lengths(self) -> np.ndarray:
        """Sequence lengths (int64 array, read in full)."""
        m = self._open()
        lengths = np.diff(np.asarray(m["offsets"])) - 1
        return lengths[np.asarray(m["records"])] if "records" in m else lengths

    @property
    def total_residues(self) -> int:
        return int(self.lengths.sum())


def load_manifest(data_dir: str | os.PathLike) -> dict[str, Any]:
    """Read and check ``manifest.json``; refuses a directory left by an interrupted or failed run."""
    path = Path(data_dir) / MANIFEST
    if not Path(data_dir).is_dir():
        raise StoreError(f"{data_dir}: no such data directory")
    if not path.is_file():
        raise StoreError(
            f"{data_dir}: no {MANIFEST}: not a prott5nv data store, or its preprocess run did not finish "
            "(run `prott5nv preprocess` again)"
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise StoreError(f"{path}: unreadable manifest ({exc})") from None
    if manifest.get("format") != FORMAT or not manifest.get("complete"):
        raise StoreError(f"{path}: not a complete {FORMAT} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        version = manifest.get("format_version")
        raise StoreError(f"{path}: format version {version} (this code reads {FORMAT_VERSION})")
    return manifest
