"""Embedding writers: HDF5 (bio_embeddings layout), a directory of `.npy` files, or Parquet.

Every writer builds its output under a temporary name beside the target and renames it into place only
on :meth:`commit`, so a reader never sees a half-written file. Outputs ("kinds") are the poolings
``mean``/``max``/``first`` (``(D,)`` per protein) and ``per_residue`` (``(L, D)``). A per-residue output
may come as an array or as rows on disk (:class:`~prott5nv.inference.store.DiskRows`, a long protein's):
HDF5 and ``.npy`` copy those block by block; Parquet, whose row is one value, reads them whole.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from types import TracebackType
from typing import Any

import h5py
import numpy as np

from ..errors import ConfigError, ProtT5nvError
from ..fsutil import check_output as check_path
from ..fsutil import replace_path

POOLINGS = ("mean", "max", "first")
KINDS = (*POOLINGS, "per_residue")
FORMATS = ("h5", "npy", "parquet")
NPY_INDEX = "index.tsv"  # every .npy output directory has one: what marks it as ours
NPY_FILES = (NPY_INDEX, "attrs.tsv", "*.npy")  # what --overwrite replaces in one (anything else is kept)


def h5_key(record_id: str) -> str:
    """Dataset (and `.npy` file) name of a record: the FASTA id with `/` replaced by `_`."""
    return record_id.replace("/", "_")


def format_from_path(path: str | os.PathLike) -> str | None:
    """Output format implied by the name: `.parquet`/`.pq` -> parquet, `.h5`/`.hdf5`/`.hdf` -> h5, no
    suffix (or `.npy`) -> npy (a directory); None for any other suffix, which :func:`check_output`
    refuses rather than read it as a directory name (`-o emb.txt` made a directory of .npy files)."""
    suffix = Path(path).suffix.lower()
    if suffix in (".parquet", ".pq"):
        return "parquet"
    if suffix in (".h5", ".hdf5", ".hdf"):
        return "h5"
    if suffix in ("", ".npy"):
        return "npy"
    return None


class Writer:
    """Base class: temporary-then-rename lifecycle and the count of proteins written."""

    owns: tuple[str, ...] | None = None  # directory outputs: the entries written (others are kept)

    def __init__(self, path: str | os.PathLike, kinds: tuple[str, ...], attrs: dict[str, Any] | None) -> None:
        self.path = Path(path)
        self.kinds, self.attrs = kinds, dict(attrs or {})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp_path = self.path.with_name(f".{self.path.name}.tmp")
        self._remove(self.tmp_path)
        self.written = 0

    def write(self, record: int, record_id: str, length: int, outputs: dict[str, np.ndarray]) -> None:
        """Store one protein: its input position, id, residue count and one array per kind."""
        raise NotImplementedError

    def _close(self) -> None:
        pass

    @staticmethod
    def _remove(path: Path) -> None:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)

    def commit(self) -> None:
        self._close()
        if self.path.is_dir() and not self.tmp_path.is_dir():
            raise ProtT5nvError(f"{self.path}: is a directory, expected an output file name")
        if self.path.exists() and self.path.is_dir() != self.tmp_path.is_dir():
            self._remove(self.path)
        replace_path(self.tmp_path, self.path, self.owns)

    def abort(self) -> None:
        try:
            self._close()
        finally:
            self._remove(self.tmp_path)

    def __enter__(self) -> Writer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


class H5Writer(Writer):
    """bio_embeddings layout: one dataset per protein named by its id (attribute `original_id`), at the
    root when there is one output kind, else under one group per kind (`/mean/ID`, `/per_residue/ID`).
    File attributes record how the file was made."""

    def __init__(self, path: str | os.PathLike, kinds: tuple[str, ...] = ("mean",), attrs: dict | None = None):
        super().__init__(path, kinds, attrs)
        if self.path.is_dir():
            raise ProtT5nvError(f"{self.path}: is a directory, expected an output file name")
        self._file = h5py.File(self.tmp_path, "w")
        for k, v in self.attrs.items():
            self._file.attrs[k] = v
        self._groups = {k: self._file if len(kinds) == 1 else self._file.create_group(k) for k in kinds}

    def write(self, record: int, record_id: str, length: int, outputs: dict[str, np.ndarray]) -> None:
        for kind in self.kinds:
            value, group, key = outputs[kind], self._groups[kind], h5_key(record_id)
            if isinstance(value, np.ndarray):
                ds = group.create_dataset(key, data=value)
            else:  # rows on disk, copied block by block
                ds = group.create_dataset(key, shape=value.shape, dtype=value.dtype)
                for lo, block in value.blocks():
                    ds[lo : lo + len(block)] = block
            ds.attrs["original_id"] = record_id
        self.written += 1

    def _close(self) -> None:
        self._file.close()


class NpyWriter(Writer):
    """A directory: `ID.npy` per protein (`ID.KIND.npy` when several kinds) and `index.tsv` listing
    record number, id, length and the file of each kind, in the order written."""

    owns = NPY_FILES

    def __init__(self, path: str | os.PathLike, kinds: tuple[str, ...] = ("mean",), attrs: dict | None = None):
        super().__init__(path, kinds, attrs)
        self.tmp_path.mkdir()
        self._index = open(self.tmp_path / NPY_INDEX, "w")
        self._index.write("\t".join(["record", "id", "length", *kinds]) + "\n")

    def write(self, record: int, record_id: str, length: int, outputs: dict[str, np.ndarray]) -> None:
        key = h5_key(record_id)
        names = [f"{key}.npy" if len(self.kinds) == 1 else f"{key}.{k}.npy" for k in self.kinds]
        for kind, name in zip(self.kinds, names, strict=True):
            value = outputs[kind]
            if isinstance(value, np.ndarray):
                np.save(self.tmp_path / name, value)
                continue
            with open(self.tmp_path / name, "wb") as fh:  # rows on disk: the .npy header, then block by block
                header = {"descr": np.lib.format.dtype_to_descr(value.dtype), "fortran_order": False,
                          "shape": value.shape}  # fmt: skip
                np.lib.format.write_array_header_1_0(fh, header)
                for _, block in value.blocks():
                    fh.write(block.data)
        self._index.write("\t".join([str(record), record_id, str(length), *names]) + "\n")
        self.written += 1

    def _close(self) -> None:
        self._index.close()
        with open(self.tmp_path / "attrs.tsv", "w") as fh:
            fh.writelines(f"{k}\t{v}\n" for k, v in self.attrs.items())


class ParquetWriter(Writer):
    """One row per protein: `record` (input position), `id`, `length`, then one column per kind
    (pooled: fixed-size lists of D floats; per_residue: a list of such rows). Needs pyarrow."""

    ROW_GROUP_FLOATS = 16 << 20

    def __init__(self, path: str | os.PathLike, kinds: tuple[str, ...] = ("mean",), attrs: dict | None = None):
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise ConfigError("Parquet output needs pyarrow: pip install 'prott5nv[parquet]'") from None
        super().__init__(path, kinds, attrs)
        if self.path.is_dir():
            raise ProtT5nvError(f"{self.path}: is a directory, expected an output file name")
        self._pa, self._pq = pa, pq
        self._writer = None
        self._rows: list[tuple[int, str, int, dict[str, np.ndarray]]] = []
        self._floats = 0

    def _schema(self, dim: int):  # noqa: ANN202 - pyarrow.Schema
        pa = self._pa
        vec = pa.list_(pa.float32(), dim)
        fields = [pa.field("record", pa.int64()), pa.field("id", pa.string()), pa.field("length", pa.int32())]
        fields += [pa.field(k, pa.list_(vec) if k == "per_residue" else vec) for k in self.kinds]
        meta = {str(k): str(v) for k, v in self.attrs.items()}
        return pa.schema(fields, metadata=meta)

    def write(self, record: int, record_id: str, length: int, outputs: dict[str, np.ndarray]) -> None:
        outputs = {k: np.asarray(v) for k, v in outputs.items()}  # a row is one value: rows on disk read whole
        self._rows.append((record, record_id, length, outputs))
        self._floats += sum(outputs[k].size for k in self.kinds)
        self.written += 1
        if self._floats >= self.ROW_GROUP_FLOATS:
            self._flush()

    def _flush(self) -> None:
        if not self._rows:
            return
        pa = self._pa
        dim = self._rows[0][3][self.kinds[0]].shape[-1]
        if self._writer is None:
            self._writer = self._pq.ParquetWriter(self.tmp_path, self._schema(dim))
        schema = self._writer.schema
        cols: dict[str, Any] = {
            "record": pa.array([r[0] for r in self._rows], pa.int64()),
            "id": pa.array([r[1] for r in self._rows], pa.string()),
            "length": pa.array([r[2] for r in self._rows], pa.int32()),
        }
        for kind in self.kinds:
            arrays = [r[3][kind] for r in self._rows]
            flat = pa.array(np.concatenate([a.reshape(-1) for a in arrays]), pa.float32())
            vectors = pa.FixedSizeListArray.from_arrays(flat, dim)
            if kind == "per_residue":
                offsets = np.concatenate([[0], np.cumsum([len(a) for a in arrays])]).astype(np.int32)
                vectors = pa.ListArray.from_arrays(pa.array(offsets), vectors)
            cols[kind] = vectors
        self._writer.write_table(pa.Table.from_pydict(cols, schema=schema))
        self._rows, self._floats = [], 0

    def _close(self) -> None:
        self._flush()
        if self._writer is not None:
            self._writer.close()


def check_output(
    fmt: str | None, path: str | os.PathLike, inputs: tuple[str | os.PathLike, ...] = (), *, overwrite: bool = True
) -> None:
    """Refuse, before any compute, an output that could not be written at the end, or whose writing would
    lose data (:func:`~prott5nv.fsutil.check_output`; the API replaces a previous output: a file, or a
    directory of `.npy` files with its ``index.tsv``, never anything else; the CLI only with --overwrite),
    or whose name gives no format (`fmt` None: :func:`format_from_path` found none)."""
    npy = fmt == "npy"
    marker = NPY_INDEX if npy else None
    check_path(path, inputs=inputs, overwrite=overwrite, kind="dir" if npy else "file", marker=marker)
    if fmt is None:
        raise ConfigError(
            f"output '{path}': '{Path(path).suffix}' names no embedding format (.h5/.hdf5/.hdf: HDF5, .parquet/.pq: "
            "Parquet, no suffix: a directory of .npy files); give --format to choose one"
        )
    if fmt == "parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise ConfigError("Parquet output needs pyarrow: pip install 'prott5nv[parquet]'") from None


WRITERS: dict[str, type[Writer]] = {"h5": H5Writer, "npy": NpyWriter, "parquet": ParquetWriter}


def open_writer(fmt: str, path: str | os.PathLike, kinds: tuple[str, ...], attrs: dict | None = None) -> Writer:
    """A writer of format `fmt` ("h5", "npy" or "parquet") for outputs `kinds`."""
    if fmt not in WRITERS:
        raise ConfigError(f"unknown output format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return WRITERS[fmt](path, kinds, attrs)
