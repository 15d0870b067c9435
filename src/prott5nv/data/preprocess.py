"""`prott5nv preprocess`: FASTA files -> filtered, de-duplicated, split, memory-mapped stores.

One streaming parse writes every record that passes the length filter, in file order, to
``sequences/`` (see :mod:`prott5nv.data.store`); the duplicate checks and the random split then work on
per-record arrays, and each split is written as the sorted record numbers it owns -- no residue is
copied twice. Memory: a few blocks of 8 MiB plus O(records) arrays of 8-byte values (lengths, 64-bit
hashes of ids and -- with `dedup` -- of sequences, the sort order of one of them): about 30 bytes per
record, ~1.5 GB for 50M records, independent of the residues. Hash matches are confirmed on the stored
bytes, so de-duplication is exact; records dropped as duplicates stay in ``sequences/`` unreferenced.

Everything is built in a hidden sibling directory and renamed into place at the end; a run that stops
early leaves no ``manifest.json`` in the target, and :func:`~prott5nv.data.store.load_manifest` refuses it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from itertools import compress
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, InvalidSequenceError
from ..fasta import FastaReader
from ..sequence import DEFAULT_POLICY, SequencePolicy
from .store import FORMAT, FORMAT_VERSION, MANIFEST, SEQUENCES, SPLITS, SequenceStore, StoreWriter, _Int64Spool

log = logging.getLogger(__name__)

HIST_BIN = 32  # length histogram: bins of 32 residues up to HIST_MAX, then one bin for longer
HIST_MAX = 1024
_CHUNK_RECORDS = 1 << 22  # records per step when writing the split indexes


@dataclass(frozen=True)
class PreprocessConfig:
    """Settings of one preprocess run (the CLI flags map 1:1 onto these)."""

    max_length: int | None = 512  # drop longer sequences (ProtT5nv); None keeps all
    min_length: int = 1
    dedup: bool = False  # drop exact duplicate sequences (the first occurrence is kept)
    val: int | float = 0  # a count (int) or a fraction in [0, 1) of the kept sequences
    test: int | float = 0
    seed: int = 0
    skip_invalid: bool = False
    policy: SequencePolicy = field(default_factory=lambda: DEFAULT_POLICY)
    overwrite: bool = False


def split_size(value: int | float, total: int, name: str) -> int:
    """A split size given as a count (int) or as a fraction (float in [0, 1)) of `total`."""
    if isinstance(value, float):
        if not 0 <= value < 1:
            raise ConfigError(f"--{name} {value}: a fraction must be in [0, 1) (or give a count)")
        return int(round(value * total))
    if value < 0:
        raise ConfigError(f"--{name} {value}: must not be negative")
    return int(value)


def _check_config(cfg: PreprocessConfig) -> None:
    if cfg.min_length < 1:
        raise ConfigError(f"--min-length {cfg.min_length}: must be at least 1")
    if cfg.max_length is not None and cfg.max_length < cfg.min_length:
        raise ConfigError(f"--max-length {cfg.max_length} is below --min-length {cfg.min_length}")
    for name in ("val", "test"):
        split_size(getattr(cfg, name), 0, name)  # validates the form


def _later_duplicates(digests: np.ndarray, same: Callable[[int, int], bool]) -> list[tuple[int, int]]:
    """(first, later) pairs of items whose 64-bit digests match and that `same` confirms equal."""
    order = np.argsort(digests, kind="stable")
    ranked = digests[order]
    hits = np.flatnonzero(ranked[1:] == ranked[:-1])
    pairs: list[tuple[int, int]] = []
    group: list[int] = []
    for k in hits.tolist():  # runs of equal digests, in file order within a run (stable sort)
        if group and group[-1] != int(order[k]):
            group = []
        if not group:
            group = [int(order[k])]
        later = int(order[k + 1])
        first = next((g for g in group if same(g, later)), None)
        if first is not None:
            pairs.append((first, later))
        group.append(later)
    return sorted(pairs, key=lambda p: p[1])


def preprocess(
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    config: PreprocessConfig = PreprocessConfig(),  # noqa: B008 - frozen
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Build a data directory from FASTA `inputs` (see the module docstring); returns the manifest.

    `progress` is called with the number of raw bytes read as the files are parsed.
    """
    _check_config(config)
    out = Path(out_dir)
    if out.exists() and not config.overwrite:
        raise ConfigError(f"{out}: already exists (use --overwrite to replace it)")
    paths = [Path(p) for p in inputs]
    if not paths:
        raise ConfigError("no input files")
    for p in paths:
        if not p.is_file():
            raise ConfigError(f"{p}: no such file")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        manifest = _build(paths, tmp, config, progress)
        manifest["complete"] = True
        with open(tmp / MANIFEST, "w") as fh:
            json.dump(manifest, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _build(
    paths: list[Path], tmp: Path, cfg: PreprocessConfig, progress: Callable[[int], None] | None
) -> dict[str, Any]:
    t0 = time.perf_counter()
    scratch = StoreWriter(tmp / SEQUENCES)
    work = tmp / "_work"
    work.mkdir()
    ordinals = _Int64Spool(work / "ordinals")  # a record's number among its file's valid records
    files = _Int64Spool(work / "files")
    id_hash = _Int64Spool(work / "id_hash")
    seq_hash = _Int64Spool(work / "seq_hash")
    max_len = cfg.max_length if cfg.max_length is not None else np.iinfo(np.int64).max
    counts = {"records": 0, "invalid": 0, "too_long": 0, "too_short": 0, "duplicate_ids": 0, "duplicates": 0}
    sources = []
    skipped_messages: list[str] = []
    for file_index, path in enumerate(paths):
        digest = hashlib.sha256()

        def on_read(chunk: bytes, digest=digest) -> None:
            digest.update(chunk)
            if progress is not None:
                progress(len(chunk))

        reader = FastaReader(
            path, cfg.policy, skip_invalid=cfg.skip_invalid, check_duplicates=False, on_read=on_read,
            track_lines=False,
        )  # fmt: skip
        for block in reader.blocks():
            n = len(block.sequences)
            lengths = np.fromiter(map(len, block.sequences), np.int64, n)
            keep = (lengths >= cfg.min_length) & (lengths <= max_len)
            counts["too_long"] += int((lengths > max_len).sum())
            counts["too_short"] += int((lengths < cfg.min_length).sum())
            number = np.arange(reader.records - n, reader.records)
            packed = block.packed
            if keep.all():
                ids, seqs = block.ids, block.sequences
            else:
                packed = None
                ids = list(compress(block.ids, keep))
                seqs = list(compress(block.sequences, keep))
                lengths, number = lengths[keep], number[keep]
            scratch.add(ids, seqs, lengths, packed)
            ordinals.append(number)
            files.append(np.full(len(ids), file_index, np.int64))
            id_hash.append(np.fromiter(map(hash, ids), np.int64, len(ids)))
            if cfg.dedup:
                seq_hash.append(np.fromiter(map(hash, seqs), np.int64, len(seqs)))
        counts["records"] += reader.records + reader.skipped
        counts["invalid"] += reader.skipped
        skipped_messages += reader.skipped_messages[: 100 - len(skipped_messages)]
        sources.append(
            {"path": str(path.resolve()), "bytes": path.stat().st_size, "sha256": digest.hexdigest(),
             "records": reader.records + reader.skipped, "invalid": reader.skipped}
        )  # fmt: skip
    scratch.close()
    t_parse = time.perf_counter() - t0
    everything = SequenceStore(tmp / SEQUENCES)
    n_all = len(everything)
    keep = np.ones(n_all, bool)
    ordinal_of, file_of = ordinals.close(), files.close()

    # Duplicate ids are input errors (SPEC.md §8); with skip_invalid the later record is dropped.
    same_id = lambda i, j: everything.id(i) == everything.id(j)  # noqa: E731
    pairs = _later_duplicates(id_hash.close(), same_id)
    named = pairs[: 1 if not cfg.skip_invalid else 100]  # messages that name lines (one re-read per file)
    line = _header_lines(paths, file_of, ordinal_of, {r for pair in named for r in pair}, cfg.policy)
    for first, later in pairs:
        where = [f"{paths[file_of[r]]}" + (f":{line[r]}" if r in line else "") for r in (first, later)]
        msg = f"{where[1]}: record '{everything.id(later)}': duplicate id (first seen at {where[0]})"
        if not cfg.skip_invalid:
            raise InvalidSequenceError(msg)
        log.warning("skipped invalid record: %s", msg)
        if len(skipped_messages) < 100:
            skipped_messages.append(msg)
        keep[later] = False
        counts["duplicate_ids"] += 1
    if cfg.dedup:
        digests = seq_hash.close()
        candidates = np.flatnonzero(keep)
        pairs = _later_duplicates(
            digests[candidates], lambda i, j: everything[int(candidates[i])] == everything[int(candidates[j])]
        )
        for _, later in pairs:
            keep[candidates[later]] = False
        counts["duplicates"] = len(pairs)
        del digests, candidates
    else:
        seq_hash.close()

    n_keep = int(keep.sum())
    n_val = split_size(cfg.val, n_keep, "val")
    n_test = split_size(cfg.test, n_keep, "test")
    if n_val + n_test > n_keep:
        raise ConfigError(
            f"--val {cfg.val} and --test {cfg.test} ask for {n_val} + {n_test} sequences but only "
            f"{n_keep} remain after filtering"
        )
    labels = np.full(n_all, -1, np.int8)
    kept = np.flatnonzero(keep)
    labels[kept] = 0
    chosen = np.random.default_rng(cfg.seed).choice(n_keep, n_val + n_test, replace=False)
    labels[kept[chosen[:n_val]]] = 1
    labels[kept[chosen[n_val:]]] = 2
    del kept, chosen, keep

    splits = _write_splits(everything.lengths, labels, tmp)
    shutil.rmtree(work)
    elapsed = time.perf_counter() - t0
    settings = asdict(cfg)
    settings.pop("overwrite")
    log.info("parsed %d records in %.1f s, total %.1f s", counts["records"], t_parse, elapsed)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "complete": False,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": settings,
        "sources": sources,
        "counts": {**counts, "kept": n_keep, "stored": n_all},
        "splits": splits,
        "skipped_messages": skipped_messages,
        "seconds": round(elapsed, 3),
    }


def _header_lines(
    paths: list[Path], file_of: np.ndarray, ordinal_of: np.ndarray, records: set[int], policy: SequencePolicy
) -> dict[int, int]:
    """Header line of each stored record in `records` (for error messages: re-reads their files once)."""
    out: dict[int, int] = {}
    for f in sorted({int(file_of[r]) for r in records}):
        wanted = {int(ordinal_of[r]): r for r in records if file_of[r] == f}
        seen = 0
        for block in FastaReader(paths[f], policy, skip_invalid=True, check_duplicates=False).blocks():
            for o in [o for o in wanted if seen <= o < seen + len(block.lines)]:
                out[wanted.pop(o)] = block.lines[o - seen]
            seen += len(block.lines)
            if not wanted:
                break
    return out


def _write_splits(lengths: np.ndarray, labels: np.ndarray, out: Path) -> dict[str, dict[str, Any]]:
    """Write ``{split}.npy`` (sorted record numbers; label -1 = dropped) and each split's statistics."""
    result = {}
    edges = HIST_MAX // HIST_BIN
    for code, name in enumerate(SPLITS):
        count = int((labels == code).sum())
        index = np.lib.format.open_memmap(out / f"{name}.npy", mode="w+", dtype=np.int64, shape=(count,))
        hist = np.zeros(edges + 1, np.int64)
        done = residues = 0
        low, high = np.iinfo(np.int64).max, 0
        for a in range(0, len(labels), _CHUNK_RECORDS):
            rows = np.flatnonzero(labels[a : a + _CHUNK_RECORDS] == code) + a
            if not len(rows):
                continue
            index[done : done + len(rows)] = rows
            done += len(rows)
            sizes = lengths[rows]
            residues += int(sizes.sum())
            low, high = min(low, int(sizes.min())), max(high, int(sizes.max()))
            hist += np.bincount(np.minimum(sizes // HIST_BIN, edges), minlength=edges + 1)
        index.flush()
        del index
        result[name] = {
            "sequences": count,
            "residues": residues,
            "min_length": low if count else 0,
            "max_length": high,
            "length_histogram": {"bin_width": HIST_BIN, "last_bin_from": HIST_MAX, "counts": hist.tolist()},
        }
    return result
