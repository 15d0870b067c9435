"""Embedding a FASTA file of any size: streaming, resumable, shardable over processes.

1. **Validate** (pass 1): every record is read once and checked (alphabet, empty records, duplicate ids,
   output-name clashes, proteins over the length limit), before any compute and without leaving output
   behind. Kept in memory: the ids seen (for the duplicate and clash checks: O(records) strings), the
   first 20 too-long proteins and counts -- nothing else.
2. **Embed** (pass 2): this rank's records (record i goes to rank ``i % world_size``; with a shard
   K/N, only the shard's records: see :func:`in_shard`) are read again in
   windows of `window` records (the bounded look-ahead); each window's pieces are sorted by length and
   cut into batches of at most `batch_tokens` padded tokens (:func:`~prott5nv.data.batching.token_budget_batches`).
   Each finished batch is appended to the partial output (:mod:`.store`) and flushed, so memory stays
   bounded whatever the file size and an interrupted run resumes where it stopped: windows and batches
   depend only on the input and the settings, so a resumed run skips exactly the batches already saved
   and computes the others exactly as an uninterrupted run would (bit-identical values).
3. **Merge**: rank 0 waits for every rank's share, then writes the final file (HDF5, `.npy` directory or
   Parquet) from the partial output, proteins in input order, through a temporary and a rename, and
   removes the partial output.

Layers: by default the encoder's output (after its final norm); `layers` picks any (fair-esm's
``repr_layers`` numbering, :meth:`~prott5nv.model.config.T5Config.encoder_layers`). With one layer the
outputs are named by kind (``mean``, ``per_residue``...); with several, ``layer{k}_{kind}`` for each layer
k (0..num_layers) and kind (:func:`output_names`).

Shards (`shard` = (K, N), ``embed --shard K/N``): record i belongs to shard ``(i // window) % N + 1`` --
whole windows of `window` records dealt round-robin, so a shard computes exactly the batches a
one-process run computes for those records and the merged shards (:mod:`.shards`) equal a one-process
output bit for bit. A shard's output is an ordinary output of its records plus ``shard*`` attributes.

Long proteins follow the length policy (:mod:`.length`): refused (default, listed), truncated, or cut
into overlapping windows whose per-residue outputs are stitched (:mod:`.chunking`); poolings are then
taken over the stitched residues. A chunked protein is streamed: its windows are embedded in order, in
batches of their own, and each window's share of the residues (:func:`~.chunking.owned_spans`) is added
to the poolings (:class:`Pooler`) and appended to the partial output at once, so memory does not grow
with the protein's length (only its residue letters are held, one byte each); the merge copies
per-residue outputs into the final file block by block. Progress is reported by residues, within a
protein too.

A protein's values in the partial output (every protein, chunked or not): its per-residue rows
``[L, layers, D]`` when asked for (residue by residue, so they can be appended window by window), then
each layer's poolings (:func:`stored_outputs`); the merge reads each layer's rows back as a strided view
(:class:`~.store.DiskRows`), so several layers of a multi-million-residue protein are never held either.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..api import ProtT5nv
from ..data.batching import DEFAULT_BATCH_TOKENS, token_budget_batches
from ..errors import ConfigError, InvalidSequenceError, ProtT5nvError
from ..fasta import read_fasta
from ..sequence import DEFAULT_POLICY, SequencePolicy
from .chunking import owned_spans
from .length import DEFAULT_CHUNK_OVERLAP, LISTED, LengthPolicy, resolve
from .shards import in_shard
from .store import DiskRows, PartialRun, StoredProtein
from .writers import FORMATS, KINDS, POOLINGS, check_output, format_from_path, h5_key, open_writer, output_names

log = logging.getLogger(__name__)

@dataclass
class EmbedOptions:
    per_residue: bool = False
    poolings: tuple[str, ...] | None = None  # None: ("mean",), or () with per_residue
    batch_tokens: int = DEFAULT_BATCH_TOKENS
    max_seqs_per_batch: int | None = None
    max_length: int | None = None  # residues; None = the model's limit
    long_policy: str = "refuse"  # refuse | truncate | chunk
    chunk_size: int | None = None  # residues per window; None = the length limit
    chunk_overlap: int = DEFAULT_CHUNK_OVERLAP
    policy: SequencePolicy = field(default_factory=lambda: DEFAULT_POLICY)
    window: int = 4096  # records sorted together (bounded look-ahead)
    format: str | None = None  # h5 | npy | parquet; None = from the output name
    restart: bool = False  # discard an interrupted run's partial output instead of resuming it
    layers: int | tuple[int, ...] | None = None  # None: the last (after the final norm); see T5Config.encoder_layers
    shard: tuple[int, int] | None = None  # (K, N): the K-th (1-based) of N shards of the input
    rank: int = 0
    world_size: int = 1

    def kinds(self) -> tuple[str, ...]:
        """The outputs, in storage order: the poolings, then ``per_residue``."""
        pools = self.poolings if self.poolings is not None else (() if self.per_residue else ("mean",))
        unknown = [p for p in pools if p not in POOLINGS]
        if unknown:
            raise ConfigError(f"unknown pooling {unknown[0]!r}; choose from {', '.join(POOLINGS)}")
        kinds = tuple(dict.fromkeys(pools)) + (("per_residue",) if self.per_residue else ())
        if not kinds:
            raise ConfigError("nothing to output: give --pooling and/or --per-residue")
        return kinds

    def length(self, model: ProtT5nv) -> LengthPolicy:
        """The length policy of these options for `model`."""
        return resolve(model, self.max_length, self.long_policy, self.chunk_size, self.chunk_overlap)

    def layer_numbers(self, model: ProtT5nv) -> tuple[int, ...]:
        """The encoder layers embedded (indexes 0..num_layers; default: the last)."""
        cfg = model.config
        return (cfg.num_layers,) if self.layers is None else cfg.encoder_layers(self.layers)

    def mine(self, record: int) -> bool:
        """Whether this process embeds `record`: in the shard, and this rank's."""
        return in_shard(record, self.window, self.shard) and record % self.world_size == self.rank


@dataclass
class EmbedSummary:
    proteins: int  # in the output (this rank's share on ranks > 0)
    residues: int
    truncated: int
    chunked: int
    resumed: int  # proteins found already embedded by an interrupted run
    computed_residues: int  # residues embedded by this run
    seconds: float
    output: str

    @property
    def residues_per_second(self) -> float:
        return self.computed_residues / self.seconds if self.seconds else 0.0

    def line(self) -> str:
        notes = [f"{self.truncated} truncated"] if self.truncated else []
        notes += [f"{self.chunked} chunked"] if self.chunked else []
        extra = "".join(f", {n}" for n in notes)
        resumed = f"; {self.resumed} resumed from an interrupted run" if self.resumed else ""
        return (
            f"embedded {self.proteins} proteins ({self.residues} residues{extra}) in {self.seconds:.1f} s "
            f"({self.residues_per_second:.0f} residues/s{resumed}) -> {self.output}"
        )


@dataclass
class ScanResult:
    records: int = 0
    too_long: int = 0
    too_long_listed: list[tuple[str, int]] = field(default_factory=list)  # the first 20
    shard_proteins: int = 0  # this rank's share
    shard_residues: int = 0  # residues this rank will embed (after truncation)
    shard_too_long: int = 0  # this rank's proteins over the length limit (truncated or chunked)
    selected: int = 0  # records of the shard (all ranks; all records without a shard)


def scan_fasta(
    path: str | os.PathLike, policy: SequencePolicy, length: LengthPolicy, opt: EmbedOptions | None = None
) -> ScanResult:
    """Pass 1: validate every record (see module docstring)."""
    opt = opt or EmbedOptions()
    out = ScanResult()
    keys: dict[str, str] = {}  # output name -> id (O(records) memory, like the reader's duplicate check)
    for i, rec in enumerate(read_fasta(path, policy)):
        key = h5_key(rec.id)
        if key in keys:
            raise InvalidSequenceError(
                f"{path}:{rec.line}: record '{rec.id}': its output name '{key}' clashes with record '{keys[key]}'"
            )
        keys[key] = rec.id
        n = len(rec.sequence)
        long = length.too_long(n)
        if long:
            out.too_long += 1
            if len(out.too_long_listed) < LISTED:
                out.too_long_listed.append((rec.id, n))
            n = len(length.cut(rec.sequence))
        if in_shard(i, opt.window, opt.shard):
            out.selected += 1
            if i % opt.world_size == opt.rank:
                out.shard_proteins += 1
                out.shard_residues += n
                out.shard_too_long += long
        out.records += 1
    return out


# ----------------------------------------------------------------------------------------- outputs
class Pooler:
    """The poolings of one protein from its per-residue states ``[n, layers, D]`` (or ``[n, D]``; float32)
    given run by run, in order (a chunked protein: window by window): O(layers x D) memory whatever the
    length. The mean is summed in float64. The one pooling code of `embed`."""

    def __init__(self, kinds: tuple[str, ...]) -> None:
        self.kinds = tuple(k for k in kinds if k != "per_residue")
        self.residues = 0
        self._sum: np.ndarray | None = None
        self._max: np.ndarray | None = None
        self._first: np.ndarray | None = None

    def add(self, states: np.ndarray) -> None:
        if not len(states):
            return
        if "mean" in self.kinds:
            total = states.sum(0, dtype=np.float64)
            self._sum = total if self._sum is None else self._sum + total
        if "max" in self.kinds:
            top = states.max(0)
            self._max = top if self._max is None else np.maximum(self._max, top)
        if "first" in self.kinds and self._first is None:
            self._first = states[0].copy()
        self.residues += len(states)

    def result(self) -> dict[str, np.ndarray]:
        """Each pooling (``[layers, D]``, or ``(D,)``, float32), in `kinds` order."""
        values = {"mean": None if self._sum is None else (self._sum / self.residues).astype(np.float32),
                  "max": self._max, "first": self._first}  # fmt: skip
        return {k: values[k] for k in self.kinds}


def stored_outputs(
    stored: StoredProtein, kinds: tuple[str, ...], layers: tuple[int, ...], dim: int
) -> dict[str, np.ndarray | DiskRows]:
    """One protein's outputs, by output name (:func:`output_names`), read back from the partial output,
    whose layout is: the per-residue rows ``[L, layers, D]`` (when asked for) first, then each layer's
    poolings (layers in order, kinds in order). Large per-residue outputs come as
    :class:`~.store.DiskRows` (one strided view per layer, read block by block by the writers)."""
    pools = [k for k in kinds if k != "per_residue"]
    rows = stored.rows(0, stored.length, dim, len(layers)) if "per_residue" in kinds else None
    pos = stored.length * len(layers) * dim if rows is not None else 0
    out: dict[str, Any] = {}
    names = iter(output_names(kinds, layers))
    for k in range(len(layers)):
        for kind in kinds:
            if kind == "per_residue":
                out[next(names)] = rows[k]
            else:
                out[next(names)] = stored.read(pos + (k * len(pools) + pools.index(kind)) * dim, dim)
    return out


class _Streamed:
    """A protein's outputs being written, run of residues by run, into `run` (per-residue rows at once,
    poolings accumulated and written after the last run): the stored layout of :func:`stored_outputs`."""

    def __init__(self, protein: _Protein, kinds: tuple[str, ...], run: PartialRun) -> None:
        self.protein, self.run = protein, run
        self.rows = "per_residue" in kinds
        self.pooler = Pooler(kinds)
        self.offset = run.tell()

    def add(self, states: np.ndarray) -> bool:
        """Add the next run of residues ``[n, layers, D]``; True when the protein is complete."""
        if self.rows:
            self.run.write(states)
        self.pooler.add(states)
        return self.pooler.residues == self.protein.length

    def finish(self) -> tuple[int, str, int, int, int]:
        """Write the poolings (layer by layer, kinds in order); the protein's journal entry."""
        pooled = list(self.pooler.result().values())  # each [layers, D]
        if pooled:
            self.run.write(np.stack(pooled, axis=1))  # [layers, poolings, D]
        p = self.protein
        return p.record, p.id, p.length, self.offset, self.run.tell() - self.offset


# ----------------------------------------------------------------------------------------- pipeline
@dataclass
class _Protein:
    record: int
    id: str
    length: int  # residues embedded
    starts: list[int]  # window starts ([0]: one piece)
    spans: list[tuple[int, int]]  # the residues taken from each window (:func:`~.chunking.owned_spans`)


@dataclass
class _Piece:
    protein: int  # index into the window's proteins
    k: int  # window number within the protein
    seq: str  # its residues (what the model, local or remote, is given)


def _settings(
    model: ProtT5nv, input_path: str | os.PathLike, opt: EmbedOptions, kinds, fmt, length, layers: tuple[int, ...]
) -> dict:
    """What must match for a partial output to be resumed (input identity included)."""
    st = os.stat(input_path)
    config = json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode()
    return {
        "prott5nv_version": __version__,
        "input": str(Path(input_path).resolve()), "input_bytes": st.st_size, "input_mtime_ns": st.st_mtime_ns,
        "model": model.name, "model_config_sha1": hashlib.sha1(config).hexdigest(),
        "dtype": str(model.dtype).removeprefix("torch."), "device": model.device.type,
        "layers": list(layers), "outputs": list(kinds), "format": fmt, "long_policy": opt.long_policy,
        "max_length": length.limit, "chunk_size": length.window,
        "chunk_overlap": opt.chunk_overlap if opt.long_policy == "chunk" else None,
        "batch_tokens": opt.batch_tokens, "max_seqs_per_batch": opt.max_seqs_per_batch, "window": opt.window,
        "shard": None if opt.shard is None else "{}/{}".format(*opt.shard),
        "world_size": opt.world_size, "policy": dataclasses.asdict(opt.policy),
        "layout": "rows-then-poolings",  # rows [L, layers, D], poolings by layer (stored_outputs); no other resumes
    }  # fmt: skip


# Settings that may differ between the shards of one input (where and how each shard ran, not what it
# computed); the rest, with the input's content digest and the model's weights fingerprint, must match.
_LOCAL_SETTINGS = ("input", "input_mtime_ns", "model", "device", "format", "shard", "world_size")


def _shard_settings(model: ProtT5nv, input_path: str | os.PathLike, settings: dict, records: int) -> dict:
    """What the shards of one input must share (:func:`~prott5nv.inference.shards.merge_shards` compares it)."""
    digest = hashlib.blake2b(digest_size=16)
    with open(input_path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    fingerprint = getattr(model, "fingerprint", None)
    return {
        **{k: v for k, v in settings.items() if k not in _LOCAL_SETTINGS},
        "input_blake2b": digest.hexdigest(), "input_records": records,
        "model_fingerprint": fingerprint() if callable(fingerprint) else None,
    }  # fmt: skip


def _check_options(opt: EmbedOptions) -> None:
    if opt.batch_tokens <= 0:
        raise ConfigError(f"--batch-tokens must be positive, got {opt.batch_tokens}")
    if opt.window <= 0:
        raise ConfigError(f"window must be positive, got {opt.window}")
    if opt.format is not None and opt.format not in FORMATS:
        raise ConfigError(f"unknown output format {opt.format!r}; choose one of {', '.join(FORMATS)}")
    if opt.world_size < 1 or not 0 <= opt.rank < opt.world_size:
        raise ConfigError(f"rank {opt.rank} is not in [0, world_size={opt.world_size})")
    if opt.shard is not None and not 1 <= opt.shard[0] <= opt.shard[1]:
        raise ConfigError(f"shard {opt.shard[0]}/{opt.shard[1]}: expected K/N with 1 <= K <= N")


def embed_fasta(
    model: ProtT5nv,
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    options: EmbedOptions | None = None,
    on_batch: Callable[[int, int], None] | None = None,
    on_start: Callable[[int, int], None] | None = None,
) -> EmbedSummary:
    """Embed every protein of a FASTA file (see module docstring); resumes an interrupted run.

    `on_start(proteins, residues)` is called after validation with this rank's share, `on_batch(proteins,
    residues)` as proteins are saved or found already saved (the CLI drives its progress bar with them).
    """
    opt = options or EmbedOptions()
    _check_options(opt)
    kinds = opt.kinds()
    layers = opt.layer_numbers(model)
    fmt = opt.format or format_from_path(output_path)
    check_output(fmt, output_path, inputs=(input_path,))
    length = opt.length(model)
    scan = scan_fasta(input_path, opt.policy, length, opt)
    if scan.too_long and length.mode == "refuse":
        length.refuse(scan.too_long_listed, scan.too_long, source=str(input_path))
    if opt.shard is not None and not scan.selected:
        windows = -(-scan.records // opt.window)
        log.warning("shard %d/%d of %s is empty: its %d records make %d window(s) of --window %d records; "
                    "a smaller --window spreads them over more shards", *opt.shard, input_path, scan.records,
                    windows, opt.window)  # fmt: skip
    settings = _settings(model, input_path, opt, kinds, fmt, length, layers)
    run = PartialRun(output_path, settings, opt.rank, opt.world_size)
    done = run.open(scan.records, restart=opt.restart)
    if on_start:
        on_start(scan.shard_proteins, scan.shard_residues)
    start = time.perf_counter()
    try:
        computed = _embed_shard(model, input_path, opt, kinds, layers, length, done, run, on_batch)
    except KeyboardInterrupt:
        run.close()
        log.warning("interrupted: the proteins saved so far are in %s; rerun the same command to resume", run.dir)
        raise
    except BaseException:
        run.close()
        raise
    run.finish()
    chunking = length.window is not None
    summary = EmbedSummary(
        proteins=scan.shard_proteins, residues=scan.shard_residues,
        truncated=0 if chunking else scan.shard_too_long, chunked=scan.shard_too_long if chunking else 0,
        resumed=run.resumed, computed_residues=computed,
        seconds=0.0, output=str(output_path),
    )  # fmt: skip
    if opt.rank == 0:
        run.wait_for_ranks()
        attrs = _attrs(model, kinds, layers, length)
        if opt.shard is not None:
            attrs.update(shard="{}/{}".format(*opt.shard), shard_records=scan.selected,
                         shard_settings=json.dumps(_shard_settings(model, input_path, settings, scan.records),
                                                   sort_keys=True))  # fmt: skip
        order = ((i, i % opt.world_size) for i in range(scan.records) if in_shard(i, opt.window, opt.shard))
        summary.proteins, summary.residues = _merge(
            run, fmt, output_path, kinds, layers, attrs, order, scan.selected, model.embedding_dim
        )
        run.remove()
    else:
        summary.output = f"{run.dir} (rank {opt.rank}; rank 0 merges)"
    summary.seconds = time.perf_counter() - start
    log.debug(summary.line())
    return summary


def _attrs(model: ProtT5nv, kinds: tuple[str, ...], layers: tuple[int, ...], length: LengthPolicy) -> dict:
    pools = [k for k in kinds if k != "per_residue"]
    return {
        "model": model.name,
        "prott5nv_version": __version__,
        "per_residue": "per_residue" in kinds,
        "pooling": ",".join(pools) if pools else "none",
        "layers": ",".join(map(str, layers)),
        "dtype": str(model.dtype).removeprefix("torch."),
        **{k: -1 if v is None else v for k, v in length.describe().items()},
    }


def _windows(
    model: ProtT5nv, input_path: str | os.PathLike, opt: EmbedOptions, length: LengthPolicy
) -> Iterator[tuple[list[_Protein], list[_Piece]]]:
    """This process's records in windows of `opt.window`, each protein cut into its pieces (a shard keeps
    whole windows of the input, so its windows are the one-process run's windows)."""
    proteins: list[_Protein] = []
    pieces: list[_Piece] = []
    for i, rec in enumerate(read_fasta(input_path, opt.policy)):
        if not opt.mine(i):
            continue
        seq = length.cut(rec.sequence)
        starts = length.starts(len(seq))
        size = length.window if len(starts) > 1 else len(seq)
        for k, s in enumerate(starts):
            pieces.append(_Piece(len(proteins), k, seq[s : s + size]))
        proteins.append(_Protein(i, rec.id, len(seq), starts, owned_spans(len(seq), starts, size)))
        if len(proteins) >= opt.window:
            yield proteins, pieces
            proteins, pieces = [], []
    if proteins:
        yield proteins, pieces


def _embed_shard(
    model: ProtT5nv,
    input_path: str | os.PathLike,
    opt: EmbedOptions,
    kinds: tuple[str, ...],
    layers: tuple[int, ...],
    length: LengthPolicy,
    done: np.ndarray,
    run: PartialRun,
    on_batch: Callable[[int, int], None] | None,
) -> int:
    """Embed this process's proteins not yet `done`, appending each batch to `run`. Returns residues
    computed.

    Per window of records: the proteins in one piece go in length-sorted token-budget batches; then the
    windows of chunked proteins, in order (a protein's windows one after another, a batch of equal-length
    windows at a time), each protein streamed into `run` (:class:`_Streamed`) as its windows come."""
    computed = 0
    suffix = model.tokenizer.num_special_suffix
    for proteins, pieces in _windows(model, input_path, opt, length):
        skipped = [p for p in proteins if done[p.record]]
        if skipped and on_batch:
            on_batch(len(skipped), sum(p.length for p in skipped))
        todo = [i for i, piece in enumerate(pieces) if not done[proteins[piece.protein].record]]
        batches = []
        for chunked in (False, True):
            group = [i for i in todo if (len(proteins[pieces[i].protein].starts) > 1) == chunked]
            lengths = [len(pieces[i].seq) + suffix for i in group]  # encoder tokens
            cut = token_budget_batches(lengths, opt.batch_tokens, opt.max_seqs_per_batch, sort=not chunked)
            batches += [[group[j] for j in b] for b in cut]
        streams: dict[int, _Streamed] = {}
        for batch in batches:
            seqs = [pieces[i].seq for i in batch]
            if opt.layers is None:  # the default: the encoder's output, as it always was
                hiddens, mask = model.seqs_to_hiddens(seqs)
                hiddens = hiddens[None]
            else:
                hiddens, mask = model.seqs_to_hiddens(seqs, layers=list(layers))
            states = hiddens.cpu().numpy()  # [layers, B, L, D]
            finished, residues = [], 0
            for j, i in enumerate(batch):
                piece = pieces[i]
                prot = proteins[piece.protein]
                stream = streams.get(piece.protein) or streams.setdefault(piece.protein, _Streamed(prot, kinds, run))
                lo, hi = prot.spans[piece.k]
                start = prot.starts[piece.k]
                residues += hi - lo
                # [n, layers, D], contiguous: the stored row order, and the same sums whatever the layers
                if stream.add(np.ascontiguousarray(states[:, j, lo - start : hi - start].transpose(1, 0, 2))):
                    finished.append(streams.pop(piece.protein).finish())
            run.commit(finished)
            for record, *_ in finished:
                done[record] = True
            computed += int(mask.sum())
            if on_batch:
                on_batch(len(finished), residues)
    return computed


def _merge(
    run: PartialRun,
    fmt: str,
    output_path: str | os.PathLike,
    kinds: tuple[str, ...],
    layers: tuple[int, ...],
    attrs: dict,
    order: Iterator[tuple[int, int]],
    expected: int,
    dim: int,
) -> tuple[int, int]:
    """Write the final output from the partial one: the proteins of `order` ((record, rank) in input
    order), `expected` of them. Returns (proteins, residues)."""
    proteins = residues = 0
    with open_writer(fmt, output_path, output_names(kinds, layers), attrs, dim=dim) as writer:
        for stored in run.in_order(order):
            writer.write(stored.record, stored.id, stored.length, stored_outputs(stored, kinds, layers, dim))
            proteins += 1
            residues += stored.length
        if proteins != expected:
            raise ProtT5nvError(
                f"{run.dir}: holds {proteins} proteins, the input has {expected}; rerun with --restart to start over"
            )
    return proteins, residues


__all__ = [
    "KINDS", "EmbedOptions", "EmbedSummary", "Pooler", "embed_fasta", "output_names", "scan_fasta", "stored_outputs",
]  # fmt: skip
