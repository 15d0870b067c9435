"""Embedding writers. Output goes to a temporary file beside the target and is renamed into place only
when the run completes, so an interrupted run never leaves a file that looks finished."""

from __future__ import annotations

import os
from pathlib import Path
from types import TracebackType
from typing import Any

import h5py
import numpy as np

from ..errors import ProtT5nvError


def h5_key(record_id: str) -> str:
    """HDF5 dataset name of a record: the FASTA id with `/` (the HDF5 path separator) replaced by `_`."""
    return record_id.replace("/", "_")


class H5Writer:
    """bio_embeddings layout: one dataset per protein named by its id, attribute `original_id`;
    `(D,)` per-protein or `(L, D)` per-residue. File attributes record how it was made."""

    def __init__(self, path: str | os.PathLike, attrs: dict[str, Any] | None = None) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise ProtT5nvError(f"{self.path}: is a directory, expected an output file name")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp_path = self.path.with_name(f".{self.path.name}.partial")
        self._file = h5py.File(self.tmp_path, "w")
        for k, v in (attrs or {}).items():
            self._file.attrs[k] = v
        self.written = 0

    def write(self, record_id: str, array: np.ndarray) -> None:
        ds = self._file.create_dataset(h5_key(record_id), data=array)
        ds.attrs["original_id"] = record_id
        self.written += 1

    def commit(self) -> None:
        self._file.close()
        os.replace(self.tmp_path, self.path)

    def abort(self) -> None:
        try:
            self._file.close()
        finally:
            self.tmp_path.unlink(missing_ok=True)

    def __enter__(self) -> H5Writer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()
