"""Scoring proteins with the T5 objective, and single-/multi-site variant effects.

Masked-token loss (`score_fasta`, `prott5nv score`)
    Each protein is corrupted exactly as in pretraining (:class:`~prott5nv.data.masking.T5Masker`:
    15 % of the residues, single-residue spans, each replaced by the next sentinel; proteins are cut to the
    first ``seq_length - 2`` = 510 residues). The mask of a protein depends only on ``(seed, its sequence)``
    -- the masker's sample index is the CRC-32 of the sequence -- so scores do not depend on file order or
    batching. The decoder is teacher-forced on the target ``sentinel_0 r_0 sentinel_1 r_1 ... </s>``.
    **loss** = mean cross-entropy (natural log, full-vocabulary softmax) over the *masked residues* only,
    i.e. the target positions that hold a residue (sentinels and EOS are excluded); **perplexity** =
    exp(loss). The overall perplexity is residue-weighted: exp(sum of all residue losses / number of masked
    residues).

Pseudo-likelihood (`pseudo_likelihood=True`, `prott5nv score --pll`)
    Every residue in turn (of the first 510) is the only one masked -- replaced by sentinel 0, target
    ``sentinel_0 r_i </s>`` -- and log p(r_i) is summed: the all-positions pseudo-log-likelihood of ESM and
    ProtTrans. The CSV has the same columns: n_masked = residues scored, loss = -PLL / n_masked, perplexity
    = the pseudo-perplexity. It costs one encoder pass per residue, so rows are batched within a protein by
    the token budget. No randomness: the seed does not matter.

Variant effects (`score_variants`, `prott5nv score-variants`)
    For a variant like ``A23G`` (1-based position; ``A23G:K45R`` for several sites) the mutated positions are
    masked with sentinels 0, 1, ... in the wild-type sequence, so wild type and mutant see the *same*
    encoder input, and the decoder scores the targets ``sentinel_0 A ...`` and ``sentinel_0 G ...``.
    score = log p(mutant residues) - log p(wild-type residues) (nats). Swapping wild type and mutant
    negates the score exactly.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import re
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..api import ProtT5nv
from ..data.batching import DEFAULT_BATCH_TOKENS, token_budget_batches
from ..data.masking import T5Masker, T5Sample, collate_t5
from ..errors import ConfigError, InvalidSequenceError
from ..fasta import read_fasta
from ..fsutil import atomic_text_file
from ..sequence import DEFAULT_POLICY, SequencePolicy, clean_sequence
from ..tokenizer import require_distinct_sentinels
from .length import score_positions

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------ masked-token loss
@dataclass
class ProteinScore:
    id: str
    length: int  # residues in the protein (the first 510 are scored)
    n_masked: int
    nll: float  # summed cross-entropy over the masked residues (nats)

    @property
    def loss(self) -> float:
        return self.nll / self.n_masked

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)


@dataclass
class ScoreSummary:
    proteins: int
    masked: int
    nll: float
    seconds: float
    output: str
    pseudo: bool = False  # all-positions pseudo-likelihood instead of one masking

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.masked) if self.masked else float("nan")

    def line(self) -> str:
        what = "residues each masked alone" if self.pseudo else "masked residues"
        return (
            f"scored {self.proteins} proteins, {self.masked} {what}: loss {self.nll / max(self.masked, 1):.4f} "
            f"nats, {'pseudo-' if self.pseudo else ''}perplexity {self.perplexity:.3f} (residue-weighted) "
            f"in {self.seconds:.1f} s -> {self.output}"
        )


def make_masker(model: ProtT5nv, seed: int, masked_lm_prob: float = 0.15) -> T5Masker:
    """The pretraining masker for this model (refuses collapsed sentinels)."""
    require_distinct_sentinels(model.tokenizer, "scoring")
    seq_length, seq_length_dec = score_positions(model)
    return T5Masker(model.tokenizer, seq_length, seq_length_dec, masked_lm_prob=masked_lm_prob, seed=seed)


def mask_protein(masker: T5Masker, residue_ids: np.ndarray, sequence: str) -> T5Sample:
    """The masked sample of one protein: randomness keyed by (seed, CRC-32 of the sequence)."""
    return masker(residue_ids, index=zlib.crc32(sequence.encode()))


@torch.no_grad()
def residue_nll(model: ProtT5nv, samples: Sequence[T5Sample]) -> list[tuple[float, int]]:
    """``(summed cross-entropy, masked residues)`` per sample: teacher-forced decoding of the targets,
    summed over label positions that are residues (not sentinels, EOS or padding)."""
    batch = {k: v.to(model.device) for k, v in collate_t5(samples, model.tokenizer.pad_id).items()}
    with model._precision():
        logits = model.model(batch["text_enc"], batch["enc_mask"].long(), batch["text_dec"], batch["dec_mask"].long())
    logp = logits.float().log_softmax(-1)
    nll = -logp.gather(-1, batch["labels"][..., None]).squeeze(-1)
    residues = torch.tensor(model.tokenizer.residue_ids, device=model.device)
    counted = batch["dec_mask"] & torch.isin(batch["labels"], residues)
    sums = (nll * counted).sum(1).tolist()
    return [(s, int(n)) for s, n in zip(sums, counted.sum(1).tolist(), strict=True)]


def mask_sequences(
    model: ProtT5nv,
    seqs: Sequence[str],
    ids: Sequence[str] | None = None,
    *,
    seed: int = 0,
    masked_lm_prob: float = 0.15,
    policy: SequencePolicy = DEFAULT_POLICY,
) -> tuple[list[str], list[T5Sample]]:
    """Clean each raw sequence under `policy` (a bad one raises :class:`InvalidSequenceError` naming its id
    and position) and mask it as in pretraining: ``(cleaned sequences, samples)``."""
    masker = make_masker(model, seed, masked_lm_prob)
    names = list(ids) if ids is not None else [f"sequence {i + 1}" for i in range(len(seqs))]
    cleaned = [clean_sequence(seq, rid, policy) for seq, rid in zip(seqs, names, strict=True)]
    samples = [
        mask_protein(masker, model.tokenizer.encode_residues(seq, rid), seq)
        for seq, rid in zip(cleaned, names, strict=True)
    ]
    return cleaned, samples


def score_samples(
    model: ProtT5nv,
    samples: Sequence[T5Sample],
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    on_batch: Callable[[int], None] | None = None,
) -> list[tuple[float, int]]:
    """``(summed cross-entropy, masked residues)`` of every sample, in input order, computed in
    length-sorted token-budget batches (each sample's result does not depend on its batch)."""
    if batch_tokens <= 0:
        raise ConfigError(f"batch_tokens must be positive, got {batch_tokens}")
    out: list[tuple[float, int]] = [(0.0, 0)] * len(samples)
    lengths = [len(s.text_enc) + len(s.text_dec) for s in samples]
    for batch in token_budget_batches(lengths, batch_tokens):
        for i, result in zip(batch, residue_nll(model, [samples[i] for i in batch]), strict=True):
            out[i] = result
        if on_batch:
            on_batch(len(batch))
    return out


def pseudo_likelihood_samples(model: ProtT5nv, residue_ids: np.ndarray) -> list[T5Sample]:
    """One sample per residue of the first 510 (what masked scoring sees): that residue alone replaced by
    sentinel 0, decoder target ``sentinel_0 r_i </s>``."""
    tok = model.tokenizer
    require_distinct_sentinels(tok, "pseudo-likelihood scoring")
    s0 = tok.sentinel(0)
    tokens = np.asarray(residue_ids, np.int64)[: make_masker(model, 0).max_tokens]
    suffix = np.array([tok.eos_id] * tok.num_special_suffix, np.int64)
    samples = []
    for i, r in enumerate(tokens.tolist()):
        enc = np.concatenate([tokens, suffix])
        enc[i] = s0
        samples.append(T5Sample(enc, np.array([tok.decoder_start_id, s0, r], np.int64), np.array([s0, r, tok.eos_id])))
    return samples


def pseudo_likelihood(
    model: ProtT5nv, residue_ids: np.ndarray, batch_tokens: int = DEFAULT_BATCH_TOKENS
) -> tuple[float, int]:
    """``(-PLL, residues scored)`` of one protein (see the module docstring), in token-budget batches."""
    samples = pseudo_likelihood_samples(model, residue_ids)
    rows = max(1, batch_tokens // (len(samples) + 4))
    nll = sum(s for lo in range(0, len(samples), rows) for s, _ in residue_nll(model, samples[lo : lo + rows]))
    return nll, len(samples)


def _score_cleaned(
    model: ProtT5nv,
    seqs: Sequence[str],
    ids: Sequence[str],
    *,
    seed: int,
    masked_lm_prob: float,
    batch_tokens: int,
    policy: SequencePolicy,
    pseudo: bool,
    on_batch: Callable[[int], None] | None = None,
) -> list[ProteinScore]:
    """Scores of sequences (cleaned under `policy` first; a bad one raises naming its id)."""
    if batch_tokens <= 0:
        raise ConfigError(f"batch_tokens must be positive, got {batch_tokens}")
    if pseudo:
        cleaned = [clean_sequence(seq, rid, policy) for seq, rid in zip(seqs, ids, strict=True)]
        scored = []
        for seq, rid in zip(cleaned, ids, strict=True):
            scored.append(pseudo_likelihood(model, model.tokenizer.encode_residues(seq, rid), batch_tokens))
            if on_batch:
                on_batch(1)
    else:
        cleaned, samples = mask_sequences(model, seqs, ids, seed=seed, masked_lm_prob=masked_lm_prob, policy=policy)
        scored = score_samples(model, samples, batch_tokens, on_batch)
    return [ProteinScore(rid, len(seq), n, nll) for rid, seq, (nll, n) in zip(ids, cleaned, scored, strict=True)]


def score_sequences(
    model: ProtT5nv,
    seqs: Sequence[str],
    ids: Sequence[str] | None = None,
    *,
    seed: int = 0,
    masked_lm_prob: float = 0.15,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    policy: SequencePolicy = DEFAULT_POLICY,
    pseudo_likelihood: bool = False,
) -> list[ProteinScore]:
    """Masked-token loss (or, with `pseudo_likelihood`, the all-positions pseudo-likelihood) of each
    sequence of a list: the numbers :func:`score_fasta` writes."""
    names = list(ids) if ids is not None else [f"sequence {i + 1}" for i in range(len(seqs))]
    return _score_cleaned(model, seqs, names, seed=seed, masked_lm_prob=masked_lm_prob, batch_tokens=batch_tokens,
                          policy=policy, pseudo=pseudo_likelihood)  # fmt: skip


def score_fasta(
    model: ProtT5nv,
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    *,
    seed: int = 0,
    masked_lm_prob: float = 0.15,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    policy: SequencePolicy = DEFAULT_POLICY,
    pseudo_likelihood: bool = False,
    on_start: Callable[[int], None] | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> ScoreSummary:
    """Masked-token loss (or, with `pseudo_likelihood`, the all-positions pseudo-likelihood) of every
    protein of a FASTA file, written as CSV ``id,length,n_masked,loss,perplexity`` in input order
    (atomically). See the module docstring for what is averaged."""
    if batch_tokens <= 0:
        raise ConfigError(f"batch_tokens must be positive, got {batch_tokens}")
    records = [(r.id, r.sequence) for r in read_fasta(input_path, policy)]  # validates the whole file first
    if on_start:
        on_start(len(records))
    start = time.perf_counter()
    scores = _score_cleaned(
        model, [s for _, s in records], [r for r, _ in records], seed=seed, masked_lm_prob=masked_lm_prob,
        batch_tokens=batch_tokens, policy=policy, pseudo=pseudo_likelihood, on_batch=on_batch,
    )  # fmt: skip
    with atomic_text_file(output_path) as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "length", "n_masked", "loss", "perplexity"])
        for s in scores:
            writer.writerow([s.id, s.length, s.n_masked, f"{s.loss:.6f}", f"{s.perplexity:.6f}"])
    summary = ScoreSummary(
        proteins=len(scores), masked=sum(s.n_masked for s in scores), nll=sum(s.nll for s in scores),
        seconds=time.perf_counter() - start, output=str(output_path), pseudo=pseudo_likelihood,
    )  # fmt: skip
    log.debug(summary.line())
    return summary


# ------------------------------------------------------------------------------------- variants
_VARIANT_RE = re.compile(r"([A-Z])(\d+)([A-Z])")


@dataclass(frozen=True)
class VariantScore:
    variant: str
    score: float  # log p(mutant) - log p(wild type), nats
    log_p_wt: float
    log_p_mut: float


def parse_variant(text: str, sequence: str) -> list[tuple[int, str, str]]:
    """``"A23G"`` or ``"A23G:K45R"`` -> ``[(22, "A", "G"), ...]`` (0-based, sorted), checked against
    the wild-type `sequence`."""
    sites = []
    for part in text.strip().upper().split(":"):
        m = _VARIANT_RE.fullmatch(part)
        if not m:
            raise InvalidSequenceError(f"variant {text!r}: expected the form A23G (wild type, position, mutant)")
        wt, pos, mut = m.group(1), int(m.group(2)), m.group(3)
        if not 1 <= pos <= len(sequence):
            raise InvalidSequenceError(f"variant {text!r}: position {pos} is outside the sequence (1..{len(sequence)})")
        if sequence[pos - 1] != wt:
            raise InvalidSequenceError(
                f"variant {text!r}: the wild-type residue at position {pos} is {sequence[pos - 1]}, not {wt}"
            )
        sites.append((pos - 1, wt, mut))
    sites.sort()
    if len({p for p, _, _ in sites}) != len(sites):
        raise InvalidSequenceError(f"variant {text!r}: a position is mutated twice")
    return sites


@torch.no_grad()
def score_variants(
    model: ProtT5nv,
    sequence: str,
    variants: Sequence[str],
    *,
    policy: SequencePolicy = DEFAULT_POLICY,
    batch_rows: int = 64,
    name: str = "wild type",
) -> list[VariantScore]:
    """Log-likelihood ratio of each variant of `sequence` (see the module docstring), in input order.
    `name`: how messages about the wild type name it."""
    tok = model.tokenizer
    require_distinct_sentinels(tok, "variant scoring")
    wt_ids = model.encode([sequence], [name], policy)[0]
    seq = tok.decode(wt_ids[: len(wt_ids) - tok.num_special_suffix])  # the cleaned wild type
    parsed = [parse_variant(v, seq) for v in variants]
    for v, sites in zip(variants, parsed, strict=True):
        for _, _, mut in sites:
            tok.encode_residues(mut, f"variant {v}")
    # one row per (variant, wt|mut); rows of a site set share their encoder input
    rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for sites in parsed:
        enc = wt_ids.copy()  # single-residue spans: each sentinel takes its residue's place
        for j, (p, _, _) in enumerate(sites):
            enc[p] = tok.sentinel(j)
        for letters in ([wt for _, wt, _ in sites], [mut for _, _, mut in sites]):
            target = [t for j, r in enumerate(letters) for t in (tok.sentinel(j), tok.token_to_id(r))]
            dec = np.array([tok.decoder_start_id, *target], np.int64)
            labels = np.array([*target, tok.eos_id], np.int64)
            rows.append((enc, dec, labels))
    logps: list[float] = []
    for lo in range(0, len(rows), batch_rows):
        chunk = [T5Sample(e, d, lab) for e, d, lab in rows[lo : lo + batch_rows]]
        logps += [-nll for nll, _ in residue_nll(model, chunk)]
    return [
        VariantScore(v, logps[2 * i + 1] - logps[2 * i], logps[2 * i], logps[2 * i + 1])
        for i, v in enumerate(variants)
    ]
