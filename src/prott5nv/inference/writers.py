"""Embedding writers: HDF5 (bio_embeddings layout), a directory of `.npy` files, or Parquet; and
:func:`read_output`, which reads any of them back (what `prott5nv merge` reads shards with).

Every writer builds its output under a temporary name beside the target and renames it into place only
on :meth:`commit`, so a reader never sees a half-written file. Outputs ("kinds") are the poolings
``mean``/``max``/``first`` (``(D,)`` per protein) and ``per_residue`` (``(L, D)``). A per-residue output
may come as an array or as rows on disk (:class:`~prott5nv.inference.store.DiskRows`, a long protein's):
HDF5 and ``.npy`` copy those block by block; Parquet, whose row is one value, reads them whole.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from types import TracebackType
from typing import Any

import h5py
import numpy as np

from ..errors import ConfigError, ProtT5nvError
from ..fsutil import check_output as check_path
from ..fsutil import replace_path
from . import store
from .store import DiskRows

POOLINGS = ("mean", "max", "first")
KINDS = (*POOLINGS, "per_residue")
FORMATS = ("h5", "npy", "parquet")
NPY_INDEX = "index.tsv"  # every .npy output directory has one: what marks it as ours
NPY_FILES = (NPY_INDEX, "attrs.tsv", "*.npy")  # what --overwrite replaces in one (anything else is kept)


def h5_key(record_id: str) -> str:
    """Dataset (and `.npy` file) name of a record: the FASTA id with `/` replaced by `_`."""
    return record_id.replace("/", "_")


def per_residue(name: str) -> bool:
    """Whether output `name` (a kind, or ``layer{k}_{kind}``) holds ``(L, D)`` per-residue arrays."""
    return name == "per_residue" or name.endswith("_per_residue")


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

    def __init__(
        self, path: str | os.PathLike, kinds: tuple[str, ...], attrs: dict[str, Any] | None, dim: int | None = None
    ) -> None:
        self.path = Path(path)
        self.kinds, self.attrs, self.dim = kinds, dict(attrs or {}), dim
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
    """bio_embeddings layout: one dataset per protein named by its id (attributes `original_id` and
    `record`, its position in the input), at the root when there is one output kind, else under one group
    per kind (`/mean/ID`, `/per_residue/ID`).
    File attributes record how the file was made."""

    def __init__(self, path: str | os.PathLike, kinds: tuple[str, ...] = ("mean",), attrs: dict | None = None,
                 dim: int | None = None) -> None:  # fmt: skip
        super().__init__(path, kinds, attrs, dim)
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
            ds.attrs["record"] = record
        self.written += 1

    def _close(self) -> None:
        self._file.close()


class NpyWriter(Writer):
    """A directory: `ID.npy` per protein (`ID.KIND.npy` when several kinds) and `index.tsv` listing
    record number, id, length and the file of each kind, in the order written."""

    owns = NPY_FILES

    def __init__(self, path: str | os.PathLike, kinds: tuple[str, ...] = ("mean",), attrs: dict | None = None,
                 dim: int | None = None) -> None:  # fmt: skip
        super().__init__(path, kinds, attrs, dim)
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

    def __init__(self, path: str | os.PathLike, kinds: tuple[str, ...] = ("mean",), attrs: dict | None = None,
                 dim: int | None = None) -> None:  # fmt: skip
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise ConfigError("Parquet output needs pyarrow: pip install 'prott5nv[parquet]'") from None
        super().__init__(path, kinds, attrs, dim)
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
        fields += [pa.field(k, pa.list_(vec) if per_residue(k) else vec) for k in self.kinds]
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
            if per_residue(kind):
                offsets = np.concatenate([[0], np.cumsum([len(a) for a in arrays])]).astype(np.int32)
                vectors = pa.ListArray.from_arrays(pa.array(offsets), vectors)
            cols[kind] = vectors
        self._writer.write_table(pa.Table.from_pydict(cols, schema=schema))
        self._rows, self._floats = [], 0

    def _close(self) -> None:
        self._flush()
        if self._writer is None and self.dim is not None:  # no protein (an empty shard): the schema only
            self._writer = self._pq.ParquetWriter(self.tmp_path, self._schema(self.dim))
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


def open_writer(
    fmt: str, path: str | os.PathLike, kinds: tuple[str, ...], attrs: dict | None = None, dim: int | None = None
) -> Writer:
    """A writer of format `fmt` ("h5", "npy" or "parquet") for outputs `kinds` (the names of the arrays
    each protein has); `dim`, the embedding width, lets an output without proteins have its schema."""
    if fmt not in WRITERS:
        raise ConfigError(f"unknown output format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return WRITERS[fmt](path, kinds, attrs, dim)


# ------------------------------------------------------------------------------------------- reading
StoredRecord = tuple[int, str, int, dict[str, Any]]  # record, id, length (HDF5: 0), arrays by name


class H5Rows:
    """A per-residue dataset of an HDF5 output, read in blocks of at most :data:`~.store.BLOCK_BYTES` as
    :class:`~.store.DiskRows` is (what `merge` copies a long protein's rows with: never whole)."""

    def __init__(self, dataset: h5py.Dataset) -> None:
        self.dataset, self.shape, self.dtype = dataset, dataset.shape, dataset.dtype

    def blocks(self) -> Iterator[tuple[int, np.ndarray]]:
        rows, dim = self.shape
        step = max(1, store.BLOCK_BYTES // (self.dtype.itemsize * dim))
        for lo in range(0, rows, step):
            yield lo, self.dataset[lo : lo + step]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:  # noqa: ANN001 - numpy's protocol
        out = self.dataset[()]
        return out if dtype is None else out.astype(dtype)


def _h5_array(dataset: h5py.Dataset) -> np.ndarray | H5Rows:
    """A dataset read whole, or as :class:`H5Rows` when it is larger than a block."""
    return H5Rows(dataset) if dataset.ndim == 2 and dataset.nbytes > store.BLOCK_BYTES else dataset[()]


def _npy_array(path: Path, files: ExitStack) -> np.ndarray | DiskRows:
    """A `.npy` file read whole, or, when it holds more than a block of float32 rows, as
    :class:`~.store.DiskRows` over the open file (closed by `files`)."""
    if path.stat().st_size <= store.BLOCK_BYTES:
        return np.load(path)
    fh = files.enter_context(open(path, "rb"))
    version = np.lib.format.read_magic(fh)
    read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    if version not in read_header:
        return np.load(path)
    shape, fortran, dtype = read_header[version](fh)
    if len(shape) != 2 or fortran or dtype != DiskRows.dtype:
        return np.load(path)
    return DiskRows(fh.fileno(), fh.tell(), shape)


class StoredOutput:
    """An output of any format read back: `attrs` (how it was made; text for .npy and Parquet), `kinds`
    (its array names, in storage order: :func:`output_names`), `count` (proteins) and :meth:`proteins`."""

    def __init__(self, path: str | os.PathLike, fmt: str) -> None:
        self.path, self.fmt = Path(path), fmt
        self._rows: list[tuple[int, str]] = []  # h5: (record, dataset name); npy: (record, index line)
        if fmt == "h5":
            with h5py.File(self.path, "r") as f:
                self.attrs: dict[str, Any] = dict(f.attrs)
                self.kinds = _names_from_attrs(self.attrs)
                datasets = f if len(self.kinds) == 1 else f[self.kinds[0]]
                self._rows = sorted((int(datasets[k].attrs["record"]), k) for k in datasets)
            self.count = len(self._rows)
        elif fmt == "npy":
            attrs = (self.path / "attrs.tsv").read_text().splitlines()
            self.attrs = dict(line.split("\t", 1) for line in attrs if line)
            header, *lines = (self.path / NPY_INDEX).read_text().splitlines()
            self.kinds = tuple(header.split("\t")[3:])
            self._rows = sorted((int(line.split("\t", 1)[0]), line) for line in lines)
            self.count = len(self._rows)
        else:
            import pyarrow.parquet as pq

            meta = pq.ParquetFile(self.path)
            metadata = meta.schema_arrow.metadata or {}
            self.attrs = {k.decode(): v.decode() for k, v in metadata.items() if not k.startswith(b"ARROW:")}
            self.kinds = tuple(meta.schema_arrow.names[3:])
            self.count = meta.metadata.num_rows

    def proteins(self) -> Iterator[StoredRecord]:
        """``(record, id, length, {name: array})`` of every protein: by record number for HDF5 and .npy,
        in the stored order for Parquet (the input order, as embed writes it). HDF5 and .npy arrays larger
        than :data:`~.store.BLOCK_BYTES` come as rows on disk (:class:`H5Rows`, :class:`~.store.DiskRows`,
        valid until the next protein is asked for), which the writers copy block by block."""
        if self.fmt == "h5":
            with h5py.File(self.path, "r") as f:
                groups = [f] * len(self.kinds) if len(self.kinds) == 1 else [f[k] for k in self.kinds]
                for record, key in self._rows:
                    arrays = {k: _h5_array(g[key]) for k, g in zip(self.kinds, groups, strict=True)}
                    yield record, str(groups[0][key].attrs["original_id"]), 0, arrays
        elif self.fmt == "npy":
            for _, line in self._rows:
                record, rid, length, *files = line.split("\t")
                with ExitStack() as opened:
                    arrays = {k: _npy_array(self.path / f, opened) for k, f in zip(self.kinds, files, strict=True)}
                    yield int(record), rid, int(length), arrays
        else:
            yield from self._parquet_rows()

    def _parquet_rows(self) -> Iterator[StoredRecord]:
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(self.path).iter_batches():
            columns: dict[str, list[np.ndarray]] = {}
            for kind in self.kinds:
                col = batch.column(kind)
                if per_residue(kind):  # a list of fixed-size lists per row
                    offsets = col.offsets.to_numpy()
                    offsets = offsets - offsets[0]
                    rows = col.flatten()
                    flat = rows.flatten().to_numpy().reshape(-1, rows.type.list_size)
                    columns[kind] = [flat[a:b] for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
                else:
                    columns[kind] = list(col.flatten().to_numpy().reshape(-1, col.type.list_size))
            records, ids, lengths = (batch.column(c).to_pylist() for c in ("record", "id", "length"))
            for i, record in enumerate(records):
                yield record, ids[i], lengths[i], {k: columns[k][i] for k in self.kinds}


def output_names(kinds: tuple[str, ...], layers: tuple[int, ...]) -> tuple[str, ...]:
    """What the outputs are called, in storage order: the kinds for one layer; ``layer{k}_{kind}`` for
    each layer (in the order given) and kind with several."""
    if len(layers) == 1:
        return kinds
    return tuple(f"layer{k}_{kind}" for k in layers for kind in kinds)


def _names_from_attrs(attrs: dict[str, Any]) -> tuple[str, ...]:
    """An output's array names from its attributes (pooling, per_residue, layers), as written by embed."""
    pools = [p for p in str(attrs.get("pooling", "mean")).split(",") if p and p != "none"]
    kinds = (*pools, *(("per_residue",) if bool(attrs.get("per_residue")) else ()))
    layers = tuple(int(k) for k in str(attrs.get("layers", "-1")).split(","))
    return output_names(kinds, layers)


def read_output(path: str | os.PathLike) -> StoredOutput:
    """An embedding output (HDF5 file, `.npy` directory or Parquet file; the format from what `path` is)
    opened for reading."""
    p = Path(path)
    if p.is_dir():
        if not (p / NPY_INDEX).is_file():
            raise ProtT5nvError(f"{path}: a directory without {NPY_INDEX}, not an output of embed")
        return StoredOutput(p, "npy")
    if not p.is_file():
        raise ProtT5nvError(f"{path}: no such file or directory")
    with open(p, "rb") as fh:
        magic = fh.read(8)
    if magic == b"\x89HDF\r\n\x1a\n":
        return StoredOutput(p, "h5")
    if magic[:4] == b"PAR1":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise ConfigError("reading Parquet needs pyarrow: pip install 'prott5nv[parquet]'") from None
        return StoredOutput(p, "parquet")
    raise ProtT5nvError(f"{path}: not an HDF5 file, Parquet file or .npy directory written by embed")
