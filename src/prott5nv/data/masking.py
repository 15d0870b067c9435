"""Pretraining objectives -- how a protein becomes (encoder input, decoder input, labels) -- plus collation.

Three objectives (``TrainConfig.objective``), each a callable ``masker(ids, index, epoch) -> T5Sample``:

* ``span`` (:class:`T5Masker`, the default): T5 span corruption as ProtT5nv was pretrained (docs/pretraining.md).
* ``denoise`` (:class:`DenoiseMasker`): the objective Rostlab trained ProtT5 with ("BART-like MLM
  denoising"): 15% of residues corrupted in place (90% the mask token, 10% a random amino acid) and the
  decoder rebuilds the *whole* sequence, so every residue's identity has to pass through the encoder.
* ``mixed`` (:class:`MixedMasker`): each sample is one or the other (UL2's mixture of denoisers): the
  encoder keeps every residue (denoise) and the decoder still speaks the sentinel protocol that
  `score`, `infill` and `generate` use (span).

T5 span corruption in detail:

A sample is cut to ``seq_length - 2`` tokens; ``max(1, round(masked_lm_prob * L))`` of them are masked,
as single-token spans (ProtT5nv) or as spans of mean length ``mean_span_length`` (the T5 paper's random
segmentation: noise and non-noise runs alternate, their lengths random partitions). Spans are numbered
in position order; span ``i`` becomes sentinel ``i`` in the encoder input, and the target is
``sentinel_0 span_0 sentinel_1 span_1 ...``. Decoder input = decoder start + target; labels =
target + EOS. Each sample's randomness comes from ``numpy.random.default_rng((seed, epoch, index))``,
so a sample is the same whichever worker or rank builds it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ConfigError
from ..sequence import STANDARD_RESIDUES
from ..tokenizer import ProteinTokenizer


def num_masked(masked_lm_prob: float, length: int) -> int:
    """Residues masked (span) or corrupted (denoise) in a sample of `length` tokens: NeMo's
    ``max(1, round(p * L))``, the same count for every objective."""
    return max(1, int(round(masked_lm_prob * length)))


def _check_masked_lm_prob(masked_lm_prob: float) -> None:
    if not 0 < masked_lm_prob < 1:
        raise ConfigError(f"masked_lm_prob {masked_lm_prob} must be in (0, 1)")


@dataclass(frozen=True)
class T5Sample:
    """One masked sample, unpadded (int64 arrays)."""

    text_enc: np.ndarray  # encoder input: tokens with spans replaced by sentinels
    text_dec: np.ndarray  # decoder input: decoder start + target
    labels: np.ndarray  # target + EOS
    corrupted: np.ndarray | None = None  # bool per label: a residue the encoder did not see (what masked
    # perplexity is computed on); None: not recorded (scoring builds its samples itself)
    encoder_labels: np.ndarray | None = None  # per encoder position: the original residue (-100 at
    # specials); denoise samples only, for the auxiliary encoder loss


class T5Masker:
    """Builds :class:`T5Sample` from token ids, deterministically per (seed, epoch, index)."""

    def __init__(
        self,
        tokenizer: ProteinTokenizer,
        seq_length: int = 512,
        seq_length_dec: int = 256,
        masked_lm_prob: float = 0.15,
        mean_span_length: float = 1.0,
        seed: int = 0,
    ):
        if not tokenizer.has_distinct_sentinels:
            raise ConfigError(
                "the tokenizer's sentinels are collapsed onto one id: T5 span corruption could not be "
                "undone (use a tokenizer with distinct sentinels, ids 32-127)"
            )
        _check_masked_lm_prob(masked_lm_prob)
        if mean_span_length < 1:
            raise ConfigError(f"mean_span_length {mean_span_length} must be at least 1")
        self.tok = tokenizer
        self.seq_length, self.seq_length_dec = seq_length, seq_length_dec
        self.masked_lm_prob, self.mean_span_length, self.seed = masked_lm_prob, mean_span_length, seed
        self.max_tokens = seq_length - 2
        most = self.num_masked(self.max_tokens)
        spans = most if mean_span_length == 1 else self._num_spans(most, self.max_tokens)
        if spans > len(tokenizer.sentinel_ids):
            raise ConfigError(
                f"up to {spans} spans per sample (seq_length {seq_length}, masked_lm_prob {masked_lm_prob}) "
                f"but the tokenizer has only {len(tokenizer.sentinel_ids)} sentinels"
            )
        need = most + spans + 1
        if seq_length_dec < need:
            raise ConfigError(
                f"seq_length_dec {seq_length_dec} is too short: a sample of {self.max_tokens} tokens with "
                f"masked_lm_prob {masked_lm_prob} has up to {most} masked tokens in {spans} spans, so the "
                f"decoder needs {need} positions (masked + sentinels + BOS/EOS)"
            )
        self.decoder_start_id = tokenizer.decoder_start_id if tokenizer.bos_id is None else tokenizer.bos_id

    def num_masked(self, length: int) -> int:
        """How many tokens of a sample of `length` tokens are masked (NeMo: ``max(1, round(p * L))``)."""
        return num_masked(self.masked_lm_prob, length)

    def _num_spans(self, masked: int, length: int) -> int:
        spans = max(1, int(round(masked / self.mean_span_length)))
        return max(1, min(spans, masked, length - masked)) if length > masked else 1

    def span_starts_and_lengths(
        self, length: int, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """Sorted start positions and lengths of the masked spans in a sample of `length` tokens."""
        masked = self.num_masked(length)
        if self.mean_span_length == 1:
            starts = np.sort(rng.choice(length, masked, replace=False))
            return starts, np.ones(masked, np.int64)
        spans = self._num_spans(masked, length)
        noise = _random_partition(masked, spans, rng)
        gaps = _random_partition(length - masked, spans, rng)  # unmasked run before each span
        starts = np.cumsum(gaps) + np.concatenate([[0], np.cumsum(noise)[:-1]])
        return starts.astype(np.int64), noise

    def __call__(self, ids: np.ndarray, index: int, epoch: int = 0) -> T5Sample:
        """Mask the token ids of one sequence (residue ids only, no specials)."""
        tokens = np.asarray(ids, dtype=np.int64)[: self.max_tokens]
        rng = np.random.default_rng((self.seed, epoch, index))
        starts, lengths = self.span_starts_and_lengths(len(tokens), rng)
        sentinels = np.asarray(self.tok.sentinel_ids[: len(starts)], np.int64)
        span_of = np.repeat(np.arange(len(starts)), lengths)
        before = np.cumsum(lengths) - lengths  # masked tokens in earlier spans
        masked_pos = starts[span_of] + np.arange(len(span_of)) - before[span_of]
        drop = np.zeros(len(tokens), bool)
        drop[masked_pos] = True
        drop[starts] = False  # each span's first position carries its sentinel
        enc = tokens.copy()
        enc[starts] = sentinels
        enc = enc[~drop]
        if self.tok.add_eos:
            enc = np.append(enc, self.tok.eos_id)
        # target: sentinel_i followed by span_i's tokens
        target = np.empty(len(masked_pos) + len(starts), np.int64)
        slot = np.arange(len(masked_pos)) + span_of + 1  # each span's tokens follow its sentinel
        target[slot] = tokens[masked_pos]
        target[before + np.arange(len(starts))] = sentinels
        dec = np.concatenate([[self.decoder_start_id], target])
        labels = np.concatenate([target, [self.tok.eos_id]])
        corrupted = np.zeros(len(labels), bool)
        corrupted[slot] = True
        return T5Sample(text_enc=enc, text_dec=dec, labels=labels, corrupted=corrupted)


class DenoiseMasker:
    """Rostlab's ProtT5 objective ("BART-like MLM denoising"): ``max(1, round(p * L))`` residues of a
    sample of L tokens are corrupted in place -- 90% replaced by the mask token, 10% by a random standard
    amino acid (possibly itself) -- and the decoder reconstructs the whole sample: decoder input = decoder
    start + tokens, labels = tokens + EOS. The encoder input keeps its length. Deterministic per
    ``(seed, epoch, index)`` like :class:`T5Masker`."""

    def __init__(
        self,
        tokenizer: ProteinTokenizer,
        seq_length: int = 512,
        masked_lm_prob: float = 0.15,
        seed: int = 0,
        random_fraction: float = 0.1,
    ):
        _check_masked_lm_prob(masked_lm_prob)
        self.tok = tokenizer
        self.seq_length, self.masked_lm_prob, self.seed = seq_length, masked_lm_prob, seed
        self.random_fraction = random_fraction
        self.max_tokens = seq_length - 2
        # <mask> where the vocabulary has one (ProtT5nv), else the first sentinel (Rostlab's <extra_id_0>)
        self.mask_id = tokenizer.mask_id if tokenizer.mask_id is not None else tokenizer.sentinel_ids[0]
        self.standard_ids = np.asarray([tokenizer.token_to_id(a) for a in STANDARD_RESIDUES], np.int64)
        self.decoder_start_id = tokenizer.decoder_start_id if tokenizer.bos_id is None else tokenizer.bos_id

    def num_masked(self, length: int) -> int:
        return num_masked(self.masked_lm_prob, length)

    def __call__(self, ids: np.ndarray, index: int, epoch: int = 0) -> T5Sample:
        tokens = np.asarray(ids, dtype=np.int64)[: self.max_tokens]
        rng = np.random.default_rng((self.seed, epoch, index))
        positions = rng.choice(len(tokens), self.num_masked(len(tokens)), replace=False)
        replace = rng.random(len(positions)) < self.random_fraction
        enc = tokens.copy()
        enc[positions] = self.mask_id
        enc[positions[replace]] = rng.choice(self.standard_ids, int(replace.sum()))
        if self.tok.add_eos:
            enc = np.append(enc, self.tok.eos_id)
        corrupted = np.zeros(len(tokens) + 1, bool)
        corrupted[positions] = True
        encoder_labels = np.full(len(enc), -100, np.int64)
        encoder_labels[: len(tokens)] = tokens
        dec = np.concatenate([[self.decoder_start_id], tokens])
        labels = np.concatenate([tokens, [self.tok.eos_id]])
        return T5Sample(enc, dec, labels, corrupted, encoder_labels)


class MixedMasker:
    """Each sample is span-corrupted or denoised, chosen by its own ``(seed, epoch, index)`` draw:
    `denoise_fraction` of samples are :class:`DenoiseMasker` samples."""

    def __init__(self, span: T5Masker, denoise: DenoiseMasker, denoise_fraction: float = 0.5):
        if not 0 <= denoise_fraction <= 1:
            raise ConfigError(f"denoise_fraction {denoise_fraction} must be in [0, 1]")
        self.span, self.denoise, self.denoise_fraction = span, denoise, denoise_fraction
        self.max_tokens = span.max_tokens

    def is_denoise(self, index: int, epoch: int = 0) -> bool:
        # a stream of its own ("1" appended), so the sample's masks are those of the chosen masker
        return bool(np.random.default_rng((self.span.seed, epoch, index, 1)).random() < self.denoise_fraction)

    def __call__(self, ids: np.ndarray, index: int, epoch: int = 0) -> T5Sample:
        return (self.denoise if self.is_denoise(index, epoch) else self.span)(ids, index, epoch)


Masker = T5Masker | DenoiseMasker | MixedMasker


def build_masker(
    objective: str,
    tokenizer: ProteinTokenizer,
    *,
    seq_length: int = 512,
    seq_length_dec: int | None = None,
    masked_lm_prob: float = 0.15,
    mean_span_length: float = 1.0,
    denoise_fraction: float = 0.5,
    seed: int = 0,
) -> Masker:
    """The masker of a pretraining objective (see the module docstring). `seq_length_dec` None: 256 for
    span corruption (NeMo's), ``seq_length`` when the decoder rebuilds whole samples."""
    if objective not in ("span", "denoise", "mixed"):
        raise ConfigError(f"objective {objective!r}: choose one of span, denoise, mixed")
    if objective != "span" and seq_length_dec is not None and seq_length_dec < seq_length - 1:
        raise ConfigError(
            f"seq_length_dec {seq_length_dec} is too short for the {objective} objective: the decoder rebuilds "
            f"whole samples of up to {seq_length - 2} tokens, so it needs {seq_length - 1} positions"
        )
    denoise = DenoiseMasker(tokenizer, seq_length, masked_lm_prob, seed)
    if objective == "denoise":
        return denoise
    span = T5Masker(tokenizer, seq_length, seq_length_dec or 256, masked_lm_prob, mean_span_length, seed)
    return span if objective == "span" else MixedMasker(span, denoise, denoise_fraction)


def _random_partition(total: int, parts: int, rng: np.random.Generator) -> np.ndarray:
    """`total` split into `parts` positive integers, uniformly over all such partitions."""
    if parts <= 1 or total <= 1:
        return np.array([total], np.int64)
    cuts = np.sort(rng.choice(np.arange(1, total), parts - 1, replace=False))
    return np.diff(np.concatenate([[0], cuts, [total]])).astype(np.int64)


def collate_t5(
    samples: Sequence[T5Sample],
    pad_id: int,
    seq_length: int | None = None,
    seq_length_dec: int | None = None,
) -> dict[str, torch.Tensor]:
    """Stack samples into padded tensors with NeMo's names (``text_enc``, ``text_dec``, ``labels``,
    ``loss_mask``, ``enc_mask``, ``dec_mask``), ``corrupted`` (labels the encoder did not see) and
    ``encoder_labels`` (-100 where there is nothing to predict). Without
    lengths, pads to the longest sample of the batch (dynamic padding); with them, to fixed lengths
    (refusing samples that do not fit)."""
    enc_len = max(len(s.text_enc) for s in samples)
    dec_len = max(len(s.text_dec) for s in samples)
    if seq_length is not None:
        if enc_len > seq_length:
            raise ConfigError(f"a sample has {enc_len} encoder tokens, more than seq_length {seq_length}")
        enc_len = seq_length
    if seq_length_dec is not None:
        if dec_len > seq_length_dec:
            raise ConfigError(
                f"a sample has {dec_len} decoder tokens, more than seq_length_dec {seq_length_dec}"
            )
        dec_len = seq_length_dec
    b = len(samples)
    text_enc = np.full((b, enc_len), pad_id, np.int64)
    text_dec = np.full((b, dec_len), pad_id, np.int64)
    labels = np.full((b, dec_len), pad_id, np.int64)
    loss_mask = np.zeros((b, dec_len), np.int64)
    corrupted = np.zeros((b, dec_len), bool)
    encoder_labels = np.full((b, enc_len), -100, np.int64)
    for i, s in enumerate(samples):
        text_enc[i, : len(s.text_enc)] = s.text_enc
        text_dec[i, : len(s.text_dec)] = s.text_dec
        labels[i, : len(s.labels)] = s.labels
        loss_mask[i, : len(s.labels)] = 1
        if s.corrupted is not None:
            corrupted[i, : len(s.labels)] = s.corrupted
        if s.encoder_labels is not None:
            encoder_labels[i, : len(s.encoder_labels)] = s.encoder_labels
    out = {
        "text_enc": torch.from_numpy(text_enc),
        "text_dec": torch.from_numpy(text_dec),
        "labels": torch.from_numpy(labels),
        "loss_mask": torch.from_numpy(loss_mask),
        "corrupted": torch.from_numpy(corrupted),
        "encoder_labels": torch.from_numpy(encoder_labels),
    }
    out["enc_mask"] = out["text_enc"] != pad_id
    out["dec_mask"] = out["loss_mask"].bool()
    return out
