"""`prott5nv preprocess`: FASTA files -> filtered, de-duplicated, split, memory-mapped stores.

One streaming parse writes every record that passes the length filter to a scratch store (with its
source line); the duplicate checks and the random split then work on small per-record arrays; one
copy pass moves the records into their split stores, in file order. Memory: a few MiB of blocks plus
O(records) arrays of 8-byte values (lengths, 64-bit hashes for duplicate ids and -- with `dedup` --
sequences, split labels): about 25 bytes per record, 1.2 GB for 50M records; it does not grow with the
residues. Hash matches are confirmed on the stored bytes, so de-duplication is exact.

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
from .store import FORMAT, FORMAT_VERSION, MANIFEST, SPLITS, SequenceStore, StoreWriter, _Int64Spool

log = logging.getLogger(__name__)

HIST_BIN = 32  # length histogram: bins of 32 residues up to HIST_MAX, then one bin for longer
HIST_MAX = 1024
_COPY_BYTES = 64 << 20  # residues per block in the split copy pass


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
    scratch = StoreWriter(tmp / "_all")
    lines = _Int64Spool(tmp / "_all" / "lines.tmp")
    files = _Int64Spool(tmp / "_all" / "files.tmp")
    id_hash = _Int64Spool(tmp / "_all" / "id_hash.tmp")
    seq_hash = _Int64Spool(tmp / "_all" / "seq_hash.tmp")
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
            path, cfg.policy, skip_invalid=cfg.skip_invalid, check_duplicates=False, on_read=on_read
        )
        for block in reader.blocks():
            n = len(block.sequences)
            lengths = np.fromiter(map(len, block.sequences), np.int64, n)
            keep = (lengths >= cfg.min_length) & (lengths <= max_len)
            counts["too_long"] += int((lengths > max_len).sum())
            counts["too_short"] += int((lengths < cfg.min_length).sum())
            if keep.all():
                ids, seqs, where = block.ids, block.sequences, block.lines
            else:
                ids = list(compress(block.ids, keep))
                seqs = list(compress(block.sequences, keep))
                where = list(compress(block.lines, keep))
            scratch.add(ids, seqs)
            lines.append(np.asarray(where, np.int64))
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
    everything = SequenceStore(tmp / "_all")
    n_all = len(everything)
    keep = np.ones(n_all, bool)
    line_of, file_of = lines.close(), files.close()

    # Duplicate ids are input errors (SPEC.md §8); with skip_invalid the later record is dropped.
    same_id = lambda i, j: everything.id(i) == everything.id(j)  # noqa: E731
    for first, later in _later_duplicates(id_hash.close(), same_id):
        msg = (
            f"{paths[file_of[later]]}:{line_of[later]}: record '{everything.id(later)}': duplicate id "
            f"(first seen at {paths[file_of[first]]}:{line_of[first]})"
        )
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

    splits = _copy_splits(everything, labels, tmp)
    shutil.rmtree(tmp / "_all")
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
        "counts": {**counts, "kept": n_keep},
        "splits": splits,
        "skipped_messages": skipped_messages,
        "seconds": round(elapsed, 3),
    }


def _copy_splits(everything: SequenceStore, labels: np.ndarray, tmp: Path) -> dict[str, dict[str, Any]]:
    """Copy each record of the scratch store into the store of its split (-1: dropped), in file order."""
    m = everything._open()
    offsets, id_offsets = np.asarray(m["offsets"]), np.asarray(m["id_offsets"])
    writers = {name: StoreWriter(tmp / name) for name in SPLITS}
    spans: dict[str, list[tuple[int, int]]] = {name: [] for name in SPLITS}
    hist = {name: np.zeros(HIST_MAX // HIST_BIN + 1, np.int64) for name in SPLITS}
    n = len(everything)
    a = 0
    while a < n:
        b = int(np.searchsorted(offsets, offsets[a] + _COPY_BYTES, side="right")) - 1
        b = min(max(b, a + 1), n)
        lab = labels[a:b]
        lengths = np.diff(offsets[a : b + 1]) - 1
        id_lengths = np.diff(id_offsets[a : b + 1]) - 1
        res = np.asarray(m["residues"][offsets[a] : offsets[b]])
        ids = np.asarray(m["ids"][id_offsets[a] : id_offsets[b]])
        res_lab = np.repeat(lab, lengths + 1)
        id_lab = np.repeat(lab, id_lengths + 1)
        for code, name in enumerate(SPLITS):
            sel = lab == code
            if not sel.any():
                continue
            writers[name].add_raw(res[res_lab == code], lengths[sel], ids[id_lab == code], id_lengths[sel])
            hist[name] += np.bincount(
                np.minimum(lengths[sel] // HIST_BIN, HIST_MAX // HIST_BIN), minlength=len(hist[name])
            )
            spans[name].append((int(lengths[sel].min()), int(lengths[sel].max())))
        a = b
    out = {}
    for name, writer in writers.items():
        count, residues = writer.close()
        out[name] = {
            "sequences": count,
            "residues": residues,
            "min_length": min((s[0] for s in spans[name]), default=0),
            "max_length": max((s[1] for s in spans[name]), default=0),
            "length_histogram": {
                "bin_width": HIST_BIN, "last_bin_from": HIST_MAX, "counts": hist[name].tolist()
            },
        }
    return out
