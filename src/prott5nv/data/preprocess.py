"""`prott5nv preprocess`: FASTA files -> filtered, de-duplicated, split, memory-mapped stores.

One streaming parse writes every record that passes the length filter, in file order, to
``sequences/`` (see :mod:`prott5nv.data.store`); the duplicate checks and the random split then work on
per-record values, and each split is written as the sorted record numbers it owns -- no residue is
copied twice. Memory is bounded whatever the input size: a few blocks of 8 MiB; per-record values
(lengths, header lines, 64-bit hashes of ids and -- with `dedup` -- of sequences, with record numbers)
are spooled to disk, the hashes (beyond the first 4M, kept in memory) in 64 partitions by their top
bits, so finding equal hashes holds one partition (1/64 of the records, 16 bytes each, plus its sort
order) at a time; what stays in memory for the whole run is 2 bytes per record (a keep flag and a
split label): about 100 MB for 50M records. Hash matches are confirmed on the stored bytes, so
de-duplication is exact; records dropped as duplicates stay in
``sequences/`` unreferenced.

Everything is built in a hidden sibling directory and renamed into place at the end
(:func:`~prott5nv.fsutil.atomic_directory`); a run that stops early leaves no ``manifest.json`` in the
target, and :func:`~prott5nv.data.store.load_manifest` refuses it.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, InvalidSequenceError
from ..fasta import FastaReader, check_input
from ..fsutil import atomic_directory, check_output
from ..sequence import DEFAULT_POLICY, SequencePolicy
from .store import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    SEQUENCES,
    SPLITS,
    Int64Spool,
    NpyWriter,
    SequenceStore,
    StoreWriter,
    read_npy_chunks,
)

log = logging.getLogger(__name__)

HIST_BIN = 32  # length histogram: bins of 32 residues up to HIST_MAX, then one bin for longer
HIST_MAX = 1024
_CHUNK_RECORDS = 1 << 22  # records per step when writing the split indexes
#: The entries of a data directory (what `preprocess --overwrite` replaces; anything else there is kept).
DATA_FILES = (MANIFEST, SEQUENCES, *(f"{name}.npy" for name in SPLITS), "_work")


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
    ranked = np.sort(digests)  # a vectorised sort; the stable argsort below only when a digest repeats
    if not (ranked[1:] == ranked[:-1]).any():
        return []
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


class _HashPartitions:
    """(64-bit hash, record number) pairs, held in memory up to :attr:`_FLUSH` of them (64 MB) and beyond
    that spooled to disk in 64 files by the top bits of the hash: equal hashes share a file, so
    duplicates are found one file -- 1/64 of the records -- at a time."""

    _FLUSH = 1 << 22  # pairs held in memory before the first spill to the files
    _BATCH = 1 << 20  # pairs distributed to the files at a time (bounds the sort's memory)

    def __init__(self, directory: Path, name: str):
        self.paths = [directory / f"{name}.{i:02d}" for i in range(64)]
        self._hashes: list[np.ndarray] = []
        self._records: list[np.ndarray] = []
        self._pending = 0
        self._spilled = False

    def append(self, hashes: np.ndarray, records: np.ndarray) -> None:
        self._hashes.append(hashes)
        self._records.append(records)
        self._pending += len(hashes)
        if self._pending >= (self._BATCH if self._spilled else self._FLUSH):
            self._flush()

    def _take(self, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Concatenate the pending arrays (the first ones holding about `limit` pairs, when given)."""
        n, total = 0, 0
        while n < len(self._hashes) and (limit is None or total < limit):
            total += len(self._hashes[n])
            n += 1
        hashes = np.concatenate([np.empty(0, np.int64), *self._hashes[:n]])
        records = np.concatenate([np.empty(0, np.int64), *self._records[:n]])
        del self._hashes[:n], self._records[:n]
        self._pending -= total
        return hashes, records

    def _flush(self) -> None:
        if not self._spilled:
            for path in self.paths:
                path.touch()
            self._spilled = True
        while self._pending:
            self._spill(*self._take(self._BATCH))

    def _spill(self, hashes: np.ndarray, records: np.ndarray) -> None:
        part = (hashes.view(np.uint64) >> np.uint64(58)).astype(np.uint8)
        order = np.argsort(part, kind="stable")  # a radix sort for uint8; file order kept in a partition
        pairs = np.stack([hashes[order], records[order]], axis=1)
        bounds = np.searchsorted(part[order], np.arange(65))
        for i in np.flatnonzero(np.diff(bounds)).tolist():
            with open(self.paths[i], "ab") as fh:
                fh.write(pairs[bounds[i] : bounds[i + 1]].tobytes())

    def _groups(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(hashes, records) groups that hold every pair of equal hashes: all pairs at once while
        they are in memory, else one partition file at a time (each removed once read)."""
        if not self._spilled:
            yield self._take()
            return
        self._flush()
        for path in self.paths:
            data = np.fromfile(path, np.int64).reshape(-1, 2)
            path.unlink()
            yield data[:, 0], data[:, 1]

    def duplicates(
        self, same: Callable[[int, int], bool], keep: np.ndarray, shown: int
    ) -> tuple[int, list[tuple[int, int]]]:
        """Mark each later copy (a record whose hash matches an earlier kept record's and `same`
        confirms it) False in `keep`. Returns their count and the `shown` (first, later) pairs with the
        smallest `later`."""
        count, pairs = 0, []
        for hashes, records in self._groups():
            kept = keep[records]
            hashes, records = hashes[kept], records[kept]
            found = _later_duplicates(hashes, lambda i, j, r=records: same(int(r[i]), int(r[j])))
            count += len(found)
            keep[records[[later for _, later in found]]] = False
            pairs = heapq.nsmallest(
                shown, pairs + [(int(records[f]), int(records[g])) for f, g in found[:shown]], key=lambda p: p[1]
            )
        return count, pairs


def _true_positions(mask: np.ndarray, ranks: np.ndarray) -> np.ndarray:
    """Positions of the ``ranks[i]``-th true entries of `mask` (what ``np.flatnonzero(mask)[ranks]``
    gives, chunk by chunk: no array of every position)."""
    order = np.argsort(ranks)
    ranked = ranks[order]
    out = np.empty(len(ranks), np.int64)
    seen = 0
    for a in range(0, len(mask), _CHUNK_RECORDS):
        where = np.flatnonzero(mask[a : a + _CHUNK_RECORDS])
        lo, hi = np.searchsorted(ranked, [seen, seen + len(where)])
        out[order[lo:hi]] = where[ranked[lo:hi] - seen] + a
        seen += len(where)
    return out


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
    out = check_output(out_dir, inputs=inputs, overwrite=config.overwrite, kind="dir", marker=MANIFEST)
    paths = [Path(p) for p in inputs]
    if not paths:
        raise ConfigError("no input files")
    for p in paths:
        check_input(p)
    with atomic_directory(out, owns=DATA_FILES) as tmp:
        manifest = _build(paths, tmp, config, progress)
        manifest["complete"] = True
        with open(tmp / MANIFEST, "w") as fh:
            json.dump(manifest, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
    return manifest


def _build(
    paths: list[Path], tmp: Path, cfg: PreprocessConfig, progress: Callable[[int], None] | None
) -> dict[str, Any]:
    t0 = time.perf_counter()
    work = tmp / "_work"
    work.mkdir()
    lines = Int64Spool(work / "lines")  # header line of each stored record (for messages)
    first_record = [0]  # stored records of file i: first_record[i] .. first_record[i + 1] - 1
    id_hashes = _HashPartitions(work, "id_hash")
    seq_hashes = _HashPartitions(work, "seq_hash") if cfg.dedup else None
    counts = {"records": 0, "invalid": 0, "too_long": 0, "too_short": 0, "duplicate_ids": 0, "duplicates": 0}
    sources = []
    skipped_messages: list[str] = []
    stored = 0
    with StoreWriter(tmp / SEQUENCES) as scratch:
        for path in paths:
            sha = hashlib.sha256()

            def on_read(chunk: memoryview, sha=sha) -> None:  # in the read-ahead thread
                sha.update(chunk)
                if progress is not None:
                    progress(len(chunk))

            reader = FastaReader(path, cfg.policy, skip_invalid=cfg.skip_invalid, check_duplicates=False,
                                 on_read=on_read, min_length=cfg.min_length, max_length=cfg.max_length)  # fmt: skip
            for block in reader.blocks():
                scratch.add(block.packed, block.lengths, block.id_packed, block.id_lengths)
                lines.append(block.lines)
                numbers = np.arange(stored, stored + len(block))
                stored += len(block)
                id_hashes.append(block.id_digests(), numbers)
                if seq_hashes is not None:
                    seq_hashes.append(block.sequence_digests(), numbers)
            first_record.append(stored)
            for key in ("too_long", "too_short"):
                counts[key] += getattr(reader, key)
            counts["records"] += reader.records + reader.skipped
            counts["invalid"] += reader.skipped
            skipped_messages += reader.skipped_messages[: 100 - len(skipped_messages)]
            sources.append(
                {"path": str(path.resolve()), "bytes": path.stat().st_size, "sha256": sha.hexdigest(),
                 "records": reader.records + reader.skipped, "invalid": reader.skipped}
            )  # fmt: skip
        n_all, _ = scratch.close()
    t_parse = time.perf_counter() - t0
    everything = SequenceStore(tmp / SEQUENCES)
    keep = np.ones(n_all, bool)
    line_of = lines.close()

    # Duplicate ids are input errors (docs/inputs.md); with skip_invalid the later record is dropped.
    same_id = lambda i, j: everything.id(i) == everything.id(j)  # noqa: E731
    found, pairs = id_hashes.duplicates(same_id, keep, 100 if cfg.skip_invalid else 1)
    for first, later in pairs:
        where = [f"{paths[np.searchsorted(first_record, r, 'right') - 1]}:{line_of[r]}" for r in (first, later)]
        msg = f"{where[1]}: record '{everything.id(later)}': duplicate id (first seen at {where[0]})"
        if not cfg.skip_invalid:
            raise InvalidSequenceError(msg)
        log.warning("skipped invalid record: %s", msg)
        if len(skipped_messages) < 100:
            skipped_messages.append(msg)
    if found > len(pairs):
        log.warning("skipped %d more records with duplicate ids", found - len(pairs))
    counts["duplicate_ids"] = found
    if seq_hashes is not None:
        same_seq = lambda i, j: everything[i] == everything[j]  # noqa: E731
        counts["duplicates"], _ = seq_hashes.duplicates(same_seq, keep, 0)

    n_keep = int(np.count_nonzero(keep))
    if not n_keep:  # a data directory without sequences trains nothing: refused here, not at pretrain
        dropped = {"too long": counts["too_long"], "too short": counts["too_short"],
                   "invalid": counts["invalid"] + found, "duplicates": counts["duplicates"]}  # fmt: skip
        why = ", ".join(f"{n} {what}" for what, n in dropped.items() if n)
        raise ConfigError(
            f"no records kept of {counts['records']} ({why}): nothing to store; see --max-length "
            f"{cfg.max_length}, --min-length {cfg.min_length}"
        )
    n_val = split_size(cfg.val, n_keep, "val")
    n_test = split_size(cfg.test, n_keep, "test")
    if n_val + n_test > n_keep:
        raise ConfigError(
            f"--val {cfg.val} and --test {cfg.test} ask for {n_val} + {n_test} sequences but only "
            f"{n_keep} remain after filtering"
        )
    labels = keep.view(np.int8) - np.int8(1)  # 0: train, -1: dropped
    chosen = np.random.default_rng(cfg.seed).choice(n_keep, n_val + n_test, replace=False)
    records = _true_positions(keep, chosen)
    labels[records[:n_val]] = 1
    labels[records[n_val:]] = 2
    del keep, chosen, records

    splits = _write_splits(tmp / SEQUENCES / "offsets.npy", labels, tmp)
    scratch.synced()
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


def _write_splits(offsets: Path, labels: np.ndarray, out: Path) -> dict[str, dict[str, Any]]:
    """Write ``{split}.npy`` (sorted record numbers; label -1 = dropped) and each split's statistics,
    reading the record lengths from `offsets` chunk by chunk."""
    edges = HIST_MAX // HIST_BIN
    writers = [NpyWriter(out / f"{name}.npy", int(np.count_nonzero(labels == code))) for code, name in
               enumerate(SPLITS)]  # fmt: skip
    hists = [np.zeros(edges + 1, np.int64) for _ in SPLITS]
    residues, low, high = [0] * len(SPLITS), [np.iinfo(np.int64).max] * len(SPLITS), [0] * len(SPLITS)
    a, last = 0, None
    for part in read_npy_chunks(offsets, _CHUNK_RECORDS):
        if last is not None:
            part = np.concatenate([[last], part])
        last = int(part[-1])
        lengths = np.diff(part) - 1
        for code in range(len(SPLITS)):
            rows = np.flatnonzero(labels[a : a + len(lengths)] == code)
            if not len(rows):
                continue
            writers[code].write(rows + a)
            sizes = lengths[rows]
            residues[code] += int(sizes.sum())
            low[code], high[code] = min(low[code], int(sizes.min())), max(high[code], int(sizes.max()))
            hists[code] += np.bincount(np.minimum(sizes // HIST_BIN, edges), minlength=edges + 1)
        a += len(lengths)
    result = {}
    for code, name in enumerate(SPLITS):
        writers[code].close()
        count = writers[code].count
        result[name] = {
            "sequences": count,
            "residues": residues[code],
            "min_length": low[code] if count else 0,
            "max_length": high[code],
            "length_histogram": {"bin_width": HIST_BIN, "last_bin_from": HIST_MAX, "counts": hists[code].tolist()},
        }
    return result
