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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ProtT5nvError

MANIFEST = "manifest.json"
FORMAT = "prott5nv-sequence-store"
FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
SEQUENCES = "sequences"  # the directory holding every stored record; splits index into it
_BLOCK = 1 << 20  # entries per chunk when converting lengths to offsets


class StoreError(ProtT5nvError):
    """A data directory is missing, incomplete (interrupted preprocess) or inconsistent."""


def _memmap(path: Path) -> np.ndarray:
    if path.stat().st_size == 0:  # np.memmap refuses empty files
        return np.empty(0, np.uint8)
    return np.memmap(path, dtype=np.uint8, mode="r")


class _Int64Spool:
    """Append int64 values to a raw file in chunks (memory does not grow with the count)."""

    def __init__(self, path: Path):
        self.path = path
        self._fh = open(path, "wb")  # noqa: SIM115 - closed in close()
        self.count = 0

    def append(self, values: np.ndarray) -> None:
        values = np.ascontiguousarray(values, dtype=np.int64)
        self._fh.write(values.tobytes())
        self.count += len(values)

    def close(self) -> np.ndarray:
        """Close and return the values as a read-only memory map."""
        self._fh.close()
        if self.count == 0:
            return np.empty(0, np.int64)
        return np.memmap(self.path, dtype=np.int64, mode="r")


def _write_offsets(lengths: np.ndarray, path: Path) -> None:
    """``offsets.npy`` from item lengths (each item is followed by one separator byte), chunk by chunk."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.int64, shape=(len(lengths) + 1,))
    out[0] = 0
    total = 0
    for a in range(0, len(lengths), _BLOCK):
        part = np.cumsum(np.asarray(lengths[a : a + _BLOCK], dtype=np.int64) + 1) + total
        out[a + 1 : a + 1 + len(part)] = part
        total = int(part[-1])
    out.flush()
    del out


class StoreWriter:
    """Write one split directory, sequence by sequence or block by block, in a single streaming pass."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._res = open(self.dir / "residues.bin", "wb", buffering=1 << 22)  # noqa: SIM115
        self._ids = open(self.dir / "ids.bin", "wb", buffering=1 << 20)  # noqa: SIM115
        self._lengths = _Int64Spool(self.dir / "lengths.tmp")
        self._id_lengths = _Int64Spool(self.dir / "id_lengths.tmp")

    def add(
        self,
        ids: Sequence[bytes],
        sequences: Sequence[bytes],
        lengths: np.ndarray | None = None,
        packed: bytes | None = None,
    ) -> np.ndarray:
        """Append records (ids and cleaned residue bytes; their lengths and ``b"\\n".join(sequences)``
        when known, to save work); returns the lengths."""
        if not sequences:
            return np.empty(0, np.int64)
        self._res.write(packed if packed is not None else b"\n".join(sequences))
        self._res.write(b"\n")
        self._ids.write(b"\n".join(ids))
        self._ids.write(b"\n")
        if lengths is None:
            lengths = np.fromiter(map(len, sequences), np.int64, len(sequences))
        self._lengths.append(lengths)
        self._id_lengths.append(np.fromiter(map(len, ids), np.int64, len(ids)))
        return lengths

    def close(self) -> tuple[int, int]:
        """Finish the files; returns (sequences, residues)."""
        self._res.close()
        self._ids.close()
        lengths = self._lengths.close()
        id_lengths = self._id_lengths.close()
        _write_offsets(lengths, self.dir / "offsets.npy")
        _write_offsets(id_lengths, self.dir / "id_offsets.npy")
        count, residues = len(lengths), int(lengths.sum()) if len(lengths) else 0
        del lengths, id_lengths
        for tmp in ("lengths.tmp", "id_lengths.tmp"):
            (self.dir / tmp).unlink()
        for name in ("residues.bin", "ids.bin", "offsets.npy", "id_offsets.npy"):
            with open(self.dir / name, "rb+") as fh:
                os.fsync(fh.fileno())
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
