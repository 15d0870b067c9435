"""Downstream task files: a table (CSV/TSV, gzip detected by content) or FASTA + a label table.

Columns: a sequence column (`sequence`/`seq`), one or more targets, an optional per-residue mask
(`resolved`/`mask`: a string like ``111000111``), an optional split (`split`/`set`, values train/val/test;
FLIP's boolean `validation` column moves train rows to val), an optional `id`. The target is inferred
when exactly one other column remains. Four kinds:

* ``protein-classification`` -- one class per protein (e.g. localization)
* ``protein-regression`` -- one or more numbers per protein (e.g. melting temperature)
* ``residue-classification`` -- a label string aligned to the sequence (``HHHEEECCC``)
* ``residue-regression`` -- numbers per residue, comma or space separated (``nan`` = not labelled)

Labels are encoded once: class indices (``-1`` = masked residue) or float arrays (``nan`` = masked).
Every error names the file and line of the offending row.
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, InvalidSequenceError
from ..fasta import READ_ERRORS, open_maybe_gzip, read_fasta, read_problem
from ..sequence import DEFAULT_POLICY, SequencePolicy, clean_sequence

KINDS = ("protein-classification", "protein-regression", "residue-classification", "residue-regression")
SPLITS = ("train", "val", "test")
SEQUENCE_COLUMNS = ("sequence", "seq")
ID_COLUMNS = ("id", "name", "accession")
SPLIT_COLUMNS = ("split", "set")
MASK_COLUMNS = ("resolved", "mask")
_SPLIT_VALUES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                 "dev": "val", "test": "test", "testing": "test"}  # fmt: skip
_NUMBERS = re.compile(r"[,\s]+")
_FIELD_LIMIT = 2**31 - 1  # bytes per CSV field (the csv module's default, 128 KiB, is a 128k-residue protein)


class TaskFormatError(InvalidSequenceError):
    """A task file row is malformed (lengths, classes, splits...)."""


@dataclass
class Task:
    """What is predicted: the kind, the target column(s) and, for classification, the classes in order."""

    kind: str
    targets: list[str]
    classes: list[str] | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"unknown task kind {self.kind!r}; choose one of {', '.join(KINDS)}")
        if len(self.targets) != 1 and self.kind != "protein-regression":
            raise ConfigError(f"{self.kind}: exactly one target column is supported, got {self.targets}")

    @property
    def per_residue(self) -> bool:
        return self.kind.startswith("residue")

    @property
    def classification(self) -> bool:
        return self.kind.endswith("classification")

    @property
    def out_dim(self) -> int:
        return len(self.classes or ()) if self.classification else len(self.targets)

    @property
    def target(self) -> str:
        return "+".join(self.targets)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "targets": list(self.targets), "classes": self.classes}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Task:
        return cls(kind=d["kind"], targets=list(d["targets"]), classes=d.get("classes"))


@dataclass
class TaskData:
    """Rows of a task: cleaned sequences, encoded labels, split names and where each row came from."""

    task: Task
    ids: list[str]
    sequences: list[str]
    labels: list[Any]  # int | np.ndarray (see the module docstring)
    splits: list[str]
    where: list[str] = field(default_factory=list)  # "file:line"

    def __len__(self) -> int:
        return len(self.sequences)

    def subset(self, indices: Sequence[int]) -> TaskData:
        pick = list(indices)
        return TaskData(self.task, [self.ids[i] for i in pick], [self.sequences[i] for i in pick],
                        [self.labels[i] for i in pick], [self.splits[i] for i in pick],
                        [self.where[i] for i in pick] if self.where else [])  # fmt: skip

    def split(self, name: str) -> TaskData:
        return self.subset([i for i, s in enumerate(self.splits) if s == name])

    def counts(self) -> dict[str, int]:
        return {s: self.splits.count(s) for s in SPLITS}


# ------------------------------------------------------------------------------------------ reading
@dataclass
class _Table:
    columns: list[str]
    rows: list[dict[str, str]]
    where: list[str]


def _read_table(path: Path) -> _Table:
    """A CSV/TSV table (gzip, a byte-order mark and blank lines before the header are fine)."""
    with open_maybe_gzip(path) as raw, io.TextIOWrapper(raw, encoding="utf-8", newline="") as fh:
        header_line = 0
        try:
            head = ""
            while not head.strip():
                head = fh.readline()
                header_line += 1
                if not head:
                    raise TaskFormatError(f"{path}: empty file (no FASTA records, no table header)")
        except UnicodeDecodeError as exc:
            raise TaskFormatError(
                f"{path}:{header_line}: not FASTA nor a text table (not UTF-8: {exc.reason})"
            ) from None
        except READ_ERRORS as exc:
            raise read_problem(path, header_line, exc) from None
        name = path.name.lower().removesuffix(".gz")
        delimiter = "\t" if name.endswith((".tsv", ".tab")) or ("\t" in head and "," not in head) else ","
        csv.field_size_limit(_FIELD_LIMIT)  # a long protein's sequence or per-residue labels fill one field
        reader = csv.reader(fh, delimiter=delimiter)
        columns = [c.strip() for c in next(csv.reader([head], delimiter=delimiter), [])]
        if "\0" in head:
            raise TaskFormatError(f"{path}:{header_line}: not FASTA nor a text table (binary data)")
        dup = sorted({c for c in columns if columns.count(c) > 1})
        if dup:
            raise TaskFormatError(f"{path}:{header_line}: duplicate column(s) {', '.join(dup)}")
        rows, where = [], []
        line = header_line
        try:
            for values in reader:
                start, line = line + 1, header_line + reader.line_num
                if not values or not any(v.strip() for v in values):
                    continue
                if len(values) != len(columns):
                    raise TaskFormatError(
                        f"{path}:{start}: {len(values)} fields, the header has {len(columns)}"
                    )
                rows.append({c: v.strip() for c, v in zip(columns, values, strict=True)})
                where.append(f"{path}:{start}")
        except (csv.Error, UnicodeDecodeError) as exc:
            raise TaskFormatError(f"{path}:{line + 1}: {exc}") from None
        except READ_ERRORS as exc:
            raise read_problem(path, line, exc) from None
    return _Table(columns, rows, where)


def _fasta_table(path: Path, labels: Path, policy: SequencePolicy) -> _Table:
    """FASTA records joined by id with a label table (which must have an `id` column)."""
    table = _read_table(labels)
    id_col = _pick(table.columns, ID_COLUMNS)
    if id_col is None:
        raise TaskFormatError(f"{labels}:1: a label table for a FASTA file needs an 'id' column")
    by_id = _rows_by_id(table, id_col)
    rows, where = [], []
    for rec in read_fasta(path, policy):
        if rec.id not in by_id:
            raise TaskFormatError(f"{path}:{rec.line}: record '{rec.id}' has no row in {labels}")
        rows.append({**by_id.pop(rec.id), "sequence": rec.sequence, "id": rec.id})
        where.append(f"{path}:{rec.line}")
    if by_id:
        missing = ", ".join(list(by_id)[:5])
        raise TaskFormatError(f"{labels}: {len(by_id)} id(s) not in {path}: {missing}")
    columns = ["id", "sequence"] + [c for c in table.columns if c not in (id_col, "sequence")]
    return _Table(columns, rows, where)


def _rows_by_id(table: _Table, id_col: str) -> dict[str, dict[str, str]]:
    """The rows by their id: ids name records in messages and outputs, so (as in FASTA) each is given once
    and none is empty."""
    by_id: dict[str, dict[str, str]] = {}
    first: dict[str, str] = {}
    for row, at in zip(table.rows, table.where, strict=True):
        rid = row[id_col]
        if not rid:
            raise TaskFormatError(f"{at}: empty {id_col}")
        if rid in by_id:
            raise TaskFormatError(f"{at}: record '{rid}': duplicate {id_col} (first seen at {first[rid]})")
        by_id[rid], first[rid] = row, at
    return by_id


def _pick(columns: Sequence[str], names: Sequence[str]) -> str | None:
    lower = {c.lower(): c for c in columns}
    return next((lower[n] for n in names if n in lower), None)


def is_fasta(path: Path) -> bool:
    """Whether `path` is FASTA: its first text (after blank lines, a byte-order mark) is a '>' header."""
    with open_maybe_gzip(path) as fh:
        try:
            while (chunk := fh.read(1 << 16)) and not chunk.strip():
                pass
        except READ_ERRORS as exc:
            raise read_problem(path, 1, exc) from None
    return chunk.lstrip().startswith(b">")


def read_rows(
    path: str | Path, *, labels: str | Path | None = None, policy: SequencePolicy = DEFAULT_POLICY
) -> _Table:
    """The raw rows of a task or input file (CSV/TSV, or FASTA [+ `labels` table])."""
    path = Path(path)
    if is_fasta(path):
        if labels is None:
            rows, where = [], []
            for rec in read_fasta(path, policy):
                rows.append({"id": rec.id, "sequence": rec.sequence})
                where.append(f"{path}:{rec.line}")
            return _Table(["id", "sequence"], rows, where)
        return _fasta_table(path, Path(labels), policy)
    table = _read_table(path)
    id_col = _pick(table.columns, ID_COLUMNS)
    if id_col is not None:
        _rows_by_id(table, id_col)
    return table


# -------------------------------------------------------------------------------------- the columns
@dataclass
class Columns:
    sequence: str
    targets: list[str]
    id: str | None = None
    mask: str | None = None
    split: str | None = None
    validation: str | None = None  # FLIP: boolean column marking validation rows of the train set


def resolve_columns(
    table_columns: Sequence[str],
    source: str,
    *,
    target: Sequence[str] | None = None,
    sequence_column: str | None = None,
    mask_column: str | None = None,
    split_column: str | None = None,
    require_target: bool = True,
) -> Columns:
    """Which column is what; the target is inferred when exactly one candidate is left."""

    def need(name: str, what: str) -> str:
        if name not in table_columns:
            raise ConfigError(f"{source}: no {what} column {name!r} (columns: {', '.join(table_columns)})")
        return name

    seq = need(sequence_column, "sequence") if sequence_column else _pick(table_columns, SEQUENCE_COLUMNS)
    if seq is None:
        raise ConfigError(f"{source}: no sequence column (expected one of {', '.join(SEQUENCE_COLUMNS)}; "
                          f"columns: {', '.join(table_columns)})")  # fmt: skip
    mask = need(mask_column, "mask") if mask_column else _pick(table_columns, MASK_COLUMNS)
    split = need(split_column, "split") if split_column else _pick(table_columns, SPLIT_COLUMNS)
    validation = _pick(table_columns, ("validation",)) if split else None
    id_col = _pick(table_columns, ID_COLUMNS)
    if target:
        targets = [need(t, "target") for t in target]
    else:
        taken = {seq, mask, split, validation, id_col}
        candidates = [c for c in table_columns if c not in taken]
        if len(candidates) == 1:
            targets = candidates
        elif not require_target:
            targets = []
        elif not candidates:
            raise ConfigError(f"{source}: no target column besides {', '.join(c for c in taken if c)}")
        else:
            raise ConfigError(f"{source}: several possible target columns ({', '.join(candidates)}); "
                              "choose with --target")  # fmt: skip
    return Columns(seq, targets, id_col, mask, split, validation)


def _is_float(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True


def infer_kind(values: Sequence[str], sequences: Sequence[str]) -> str:
    """protein-regression if every value is a number; residue-classification if most values are as long
    as their sequence (the others are then reported as errors); residue-regression if most are lists of
    as many numbers; else protein-classification."""
    if all(_is_float(v) for v in values):
        return "protein-regression"
    pairs = list(zip(values, sequences, strict=True))
    aligned = sum(len(v) == len(s) and not any(c.isspace() or c == "," for c in v) for v, s in pairs)
    if aligned > len(pairs) / 2:
        return "residue-classification"
    numbers = sum(len(p := _NUMBERS.split(v.strip(", "))) == len(s) and all(map(_is_float, p)) for v, s in pairs)
    if numbers > len(pairs) / 2:
        return "residue-regression"
    return "protein-classification"


def _parse_mask(value: str, length: int, where: str, column: str) -> np.ndarray:
    if len(value) != length:
        raise TaskFormatError(f"{where}: {column} has {len(value)} characters, the sequence {length} residues")
    bad = set(value) - {"0", "1"}
    if bad:
        raise TaskFormatError(f"{where}: {column} may only contain 0 and 1, found {''.join(sorted(bad))!r}")
    return np.frombuffer(value.encode(), dtype=np.uint8) == ord("1")


def _encode_label(task: Task, raw: list[str], length: int, mask: np.ndarray | None, where: str,
                  index: dict[str, int] | None) -> Any:  # fmt: skip
    name = task.target
    if task.kind == "protein-regression":
        try:
            return np.array([float(v) for v in raw], dtype=np.float32)
        except ValueError:
            raise TaskFormatError(f"{where}: {name} value {raw!r} is not a number") from None
    value = raw[0]
    if task.kind == "protein-classification":
        if value not in index:  # type: ignore[operator]
            raise TaskFormatError(f"{where}: unknown class {value!r} in {name} (known: {', '.join(index)})")
        return index[value]  # type: ignore[index]
    if task.kind == "residue-classification":
        if len(value) != length:
            raise TaskFormatError(f"{where}: {name} has {len(value)} labels, the sequence {length} residues")
        unknown = sorted(set(value) - set(index))  # type: ignore[arg-type]
        if unknown:
            raise TaskFormatError(
                f"{where}: unknown class {unknown[0]!r} in {name} at position {value.index(unknown[0]) + 1} "
                f"(known: {''.join(index)})"  # type: ignore[arg-type]
            )
        lut = np.full(256, -1, dtype=np.int64)
        for c, i in index.items():  # type: ignore[union-attr]
            lut[ord(c)] = i
        out = lut[np.frombuffer(value.encode("latin-1"), dtype=np.uint8)]
        if mask is not None:
            out[~mask] = -1
        return out
    parts = _NUMBERS.split(value.strip(", "))
    if len(parts) != length:
        raise TaskFormatError(f"{where}: {name} has {len(parts)} values, the sequence {length} residues")
    try:
        out = np.array([float(x) for x in parts], dtype=np.float32)
    except ValueError:
        raise TaskFormatError(f"{where}: {name} holds a value that is not a number") from None
    if mask is not None:
        out[~mask] = np.nan
    return out


def _split_of(row: dict[str, str], cols: Columns, where: str) -> str:
    if cols.split is None:
        return ""
    value = row[cols.split].strip().lower()
    split = _SPLIT_VALUES.get(value)
    if split is None:
        raise TaskFormatError(f"{where}: split {row[cols.split]!r} is not one of train, val, test")
    if split == "train" and cols.validation and row[cols.validation].strip().lower() in ("true", "1", "yes"):
        return "val"
    return split


def assign_splits(splits: list[str], val_fraction: float, seed: int, source: str) -> list[str]:
    """Rows without a split become train; when no row is val, a seeded `val_fraction` of train is."""
    splits = [s or "train" for s in splits]
    if "val" not in splits:
        if not 0.0 < val_fraction < 1.0:
            raise ConfigError(f"{source}: no validation rows and --val-fraction {val_fraction} is not in (0, 1)")
        train = [i for i, s in enumerate(splits) if s == "train"]
        rng = np.random.default_rng(seed)
        for i in rng.permutation(train)[: int(round(val_fraction * len(train)))]:
            splits[int(i)] = "val"
    for name in ("train", "val"):
        if name not in splits:
            raise TaskFormatError(f"{source}: the {name} split is empty")
    return splits


def load_task(
    path: str | Path,
    *,
    target: Sequence[str] | str | None = None,
    kind: str = "auto",
    labels: str | Path | None = None,
    sequence_column: str | None = None,
    mask_column: str | None = None,
    split_column: str | None = None,
    classes: Sequence[str] | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    policy: SequencePolicy = DEFAULT_POLICY,
    assign: bool = True,
) -> TaskData:
    """Read a task file (see the module docstring) into :class:`TaskData` with train/val(/test) splits.
    Classes are those of the training split (sorted) unless `classes` fixes them. `assign=False` keeps
    the split column as it is (labelled input to evaluate a trained predictor on)."""
    table = read_rows(path, labels=labels, policy=policy)
    source = str(path)
    if not table.rows:
        raise TaskFormatError(f"{source}: no rows")
    cols = resolve_columns(
        table.columns, source, target=[target] if isinstance(target, str) else target,
        sequence_column=sequence_column, mask_column=mask_column, split_column=split_column,
    )  # fmt: skip
    seqs, ids, splits, raw_labels, masks = [], [], [], [], []
    for i, (row, where) in enumerate(zip(table.rows, table.where, strict=True)):
        rid = row[cols.id] if cols.id else f"row {i + 1}"
        seq = clean_sequence(row[cols.sequence], rid, policy, source=where.rsplit(":", 1)[0],
                             line=int(where.rsplit(":", 1)[1]))  # fmt: skip
        values = [row[t] for t in cols.targets]
        empty = [t for t, v in zip(cols.targets, values, strict=True) if v == ""]
        if empty:
            raise TaskFormatError(f"{where}: empty {empty[0]} value")
        mask = _parse_mask(row[cols.mask], len(seq), where, cols.mask) if cols.mask else None
        seqs.append(seq), ids.append(rid), raw_labels.append(values), masks.append(mask)
        splits.append(_split_of(row, cols, where))
    if kind == "auto":
        kind = infer_kind([v[0] for v in raw_labels], seqs) if len(cols.targets) == 1 else "protein-regression"
    task = Task(kind, cols.targets)
    if assign:
        splits = assign_splits(splits, val_fraction, seed, source)
    index = None
    if task.classification:
        if classes:
            task.classes = list(classes)
        else:
            train_values = (v[0] for v, s in zip(raw_labels, splits, strict=True) if s == "train")
            seen = set().union(*map(set, train_values)) if task.per_residue else set(train_values)
            task.classes = sorted(seen)
        index = {c: i for i, c in enumerate(task.classes)}
        if task.per_residue and any(len(c) != 1 for c in task.classes):
            raise ConfigError("per-residue classes must be single characters")
    encoded = [_encode_label(task, v, len(s), m, w, index)
               for v, s, m, w in zip(raw_labels, seqs, masks, table.where, strict=True)]  # fmt: skip
    if task.classification and len(task.classes or ()) < 2:
        raise TaskFormatError(f"{source}: classification needs at least 2 classes in the training split, "
                              f"found {task.classes}")  # fmt: skip
    if task.kind.endswith("regression") and not all(
        np.isfinite(np.asarray(v)).any() for v in encoded
    ):  # a row with nothing to learn from
        bad = next(w for v, w in zip(encoded, table.where, strict=True) if not np.isfinite(np.asarray(v)).any())
        raise TaskFormatError(f"{bad}: no finite target value")
    return TaskData(task, ids, seqs, encoded, splits, list(table.where))


def label_text(task: Task, label: Any) -> str:
    """The file representation of one encoded label (inverse of the encoding above; masked -> '-')."""
    if task.kind == "protein-classification":
        return task.classes[int(label)]  # type: ignore[index]
    if task.kind == "residue-classification":
        return "".join(task.classes[i] if i >= 0 else "-" for i in np.asarray(label).tolist())  # type: ignore[index]
    values = np.atleast_1d(np.asarray(label, dtype=np.float64))
    return ",".join("nan" if math.isnan(v) else f"{v:.6g}" for v in values.tolist())
