"""Embedding a FASTA file: validate everything first, then stream length-sorted token-budget batches
through the encoder and write each protein as soon as it is computed.

Pass 1 reads the whole file cheaply (ids, lengths, policy checks) so that bad input, duplicate ids and
too-long proteins are reported before any compute and without leaving output behind. Pass 2 reads it
again in windows of `window` records; each window is sorted by length and cut into batches of at most
`batch_tokens` padded tokens, so memory stays bounded whatever the file size.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .. import __version__
from ..api import ProtT5nv
from ..data.batching import token_budget_batches
from ..errors import ConfigError, InvalidSequenceError, SequenceTooLongError
from ..fasta import read_fasta
from ..sequence import DEFAULT_POLICY, SequencePolicy
from .writers import H5Writer, h5_key

log = logging.getLogger(__name__)


@dataclass
class EmbedOptions:
    per_residue: bool = False
    batch_tokens: int = 4096
    max_seqs_per_batch: int | None = None
    max_length: int | None = None  # residues; None = the model's limit
    truncate: bool = False  # else refuse proteins over the limit
    policy: SequencePolicy = field(default_factory=lambda: DEFAULT_POLICY)
    window: int = 4096  # records sorted together (bounded look-ahead)


@dataclass
class EmbedSummary:
    proteins: int
    residues: int
    truncated: int
    seconds: float
    output: str

    @property
    def residues_per_second(self) -> float:
        return self.residues / self.seconds if self.seconds else 0.0

    def line(self) -> str:
        trunc = f", {self.truncated} truncated" if self.truncated else ""
        return (
            f"embedded {self.proteins} proteins ({self.residues} residues{trunc}) in {self.seconds:.1f} s "
            f"({self.residues_per_second:.0f} residues/s) -> {self.output}"
        )


def effective_max_length(model: ProtT5nv, requested: int | None) -> int | None:
    limit = model.max_length
    if requested is None:
        return limit
    if requested <= 0:
        raise ConfigError(f"--max-length must be positive, got {requested}")
    if limit is not None and requested > limit:
        raise ConfigError(f"--max-length {requested} exceeds the model's maximum of {limit} residues")
    return requested


def scan_fasta(path: str | os.PathLike, policy: SequencePolicy, limit: int | None) -> tuple[int, int, list]:
    """Pass 1: validate every record. Returns (records, residues, [(id, length) over the limit])."""
    n = residues = 0
    too_long: list[tuple[str, int]] = []
    keys: dict[str, str] = {}
    for rec in read_fasta(path, policy):
        key = h5_key(rec.id)
        if key in keys:
            raise InvalidSequenceError(
                f"{path}:{rec.line}: record '{rec.id}': its output name '{key}' clashes with record '{keys[key]}'"
            )
        keys[key] = rec.id
        n += 1
        residues += len(rec.sequence)
        if limit is not None and len(rec.sequence) > limit:
            too_long.append((rec.id, len(rec.sequence)))
    return n, residues, too_long


def embed_fasta(
    model: ProtT5nv,
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    options: EmbedOptions | None = None,
    on_batch: Callable[[int, int], None] | None = None,
    on_start: Callable[[int, int], None] | None = None,
) -> EmbedSummary:
    """Embed every protein of a FASTA file into an HDF5 file (see module docstring).

    `on_start(records, residues)` is called after validation, `on_batch(proteins, residues)` after each
    batch (the CLI drives its progress bar with them).
    """
    opt = options or EmbedOptions()
    if opt.batch_tokens <= 0:
        raise ConfigError(f"--batch-tokens must be positive, got {opt.batch_tokens}")
    limit = effective_max_length(model, opt.max_length)
    n_records, n_residues, too_long = scan_fasta(input_path, opt.policy, limit)
    if too_long and not opt.truncate:
        listed = ", ".join(f"{rid} ({length})" for rid, length in too_long[:20])
        more = f" and {len(too_long) - 20} more" if len(too_long) > 20 else ""
        raise SequenceTooLongError(
            f"{input_path}: {len(too_long)} protein(s) longer than {limit} residues: {listed}{more}; "
            "use --truncate to keep the first residues"
        )
    if on_start:
        on_start(n_records, n_residues)
    attrs = {
        "model": model.name,
        "prott5nv_version": __version__,
        "per_residue": opt.per_residue,
        "pooling": "none" if opt.per_residue else "mean",
        "dtype": str(model.dtype).removeprefix("torch."),
        "max_length": limit if limit is not None else -1,
    }
    start = time.perf_counter()
    computed = 0
    with H5Writer(output_path, attrs) as writer:
        window: list[tuple[str, np.ndarray]] = []
        for rec in read_fasta(input_path, opt.policy):
            seq = rec.sequence if limit is None else rec.sequence[:limit]
            window.append((rec.id, model.tokenizer.encode(seq, rec.id)))
            if len(window) >= opt.window:
                computed += _embed_window(model, window, writer, opt, on_batch)
                window = []
        if window:
            computed += _embed_window(model, window, writer, opt, on_batch)
    seconds = time.perf_counter() - start
    summary = EmbedSummary(
        proteins=writer.written, residues=computed, truncated=len(too_long), seconds=seconds,
        output=str(output_path),
    )  # fmt: skip
    log.debug(summary.line())
    return summary


def _embed_window(
    model: ProtT5nv,
    window: list[tuple[str, np.ndarray]],
    writer: H5Writer,
    opt: EmbedOptions,
    on_batch: Callable[[int, int], None] | None,
) -> int:
    lengths = [len(t) for _, t in window]
    residues = 0
    for batch in token_budget_batches(lengths, opt.batch_tokens, opt.max_seqs_per_batch):
        hiddens, mask = model.tokens_to_hiddens([window[i][1] for i in batch])
        if opt.per_residue:
            lens = mask.sum(1).tolist()
            arrays = [hiddens[j, :n].cpu().numpy() for j, n in enumerate(lens)]
        else:
            arrays = list(model.hiddens_to_embedding(hiddens, mask).cpu().numpy())
        n_res = int(mask.sum())
        for j, i in enumerate(batch):
            writer.write(window[i][0], arrays[j])
        residues += n_res
        if on_batch:
            on_batch(len(batch), n_res)
    return residues
