"""The masked-text protocol: parse ``"MKT<mask>LLV<mask:3>A"`` into encoder ids and spans, decode with the
decoder constrained to fill exactly those spans (:func:`infill`), and read generated targets back
(:func:`describe_targets`). See :mod:`prott5nv.model.generate` for what a T5 target is.

Masked-input syntax (:func:`parse_masked`): residues as usual (cleaned under the input policy), ``<mask>``
for one masked residue (each ``<mask>`` is its own single-residue span -- ProtT5nv's pretraining masked
single residues, ``max_ngram_size`` 1), and ``<mask:K>`` for one span of K residues behind a single
sentinel (T5 span corruption; an extrapolation for ProtT5nv, which never saw multi-residue spans).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError, InvalidSequenceError, SequenceTooLongError
from ..model.generate import GenerationConfig, GenerationOutput, generate
from ..model.t5 import T5Model
from ..sequence import DEFAULT_POLICY, STANDARD_RESIDUES, SequencePolicy, clean_sequence, location
from ..tokenizer import ProteinTokenizer, require_distinct_sentinels

__all__ = [
    "STANDARD_RESIDUES", "Generated", "InfillResult", "MaskedInput", "describe_targets", "fill_spans", "infill",
    "infill_template", "parse_masked", "split_target", "target_text",
]  # fmt: skip

_MASK_RE = re.compile(r"<mask(?::(\d+))?>", re.IGNORECASE)


@dataclass
class MaskedInput:
    """A protein with masked spans: `residues` holds ``?`` at masked positions; `spans` the ``(start,
    length)`` of each span (0-based, in order); `encoder_ids` the residues with span j replaced by
    sentinel j (plus the layout's trailing ``</s>``, if any)."""

    text: str
    residues: str
    spans: list[tuple[int, int]]
    encoder_ids: np.ndarray

    @property
    def num_masked(self) -> int:
        return sum(n for _, n in self.spans)


def parse_masked(
    text: str,
    tokenizer: ProteinTokenizer,
    record_id: str | None = None,
    policy: SequencePolicy = DEFAULT_POLICY,
    max_residues: int | None = None,
    *,
    source: str | None = None,
    line: int | None = None,
) -> MaskedInput:
    """Parse ``"MKT<mask>LLV<mask:3>A"`` (see the module docstring) into encoder ids and spans. Errors
    name the record (and `source`:`line`, the file and header line it came from, when given) and the
    position in the protein, masked residues counted. With `max_residues`, a protein longer than that
    (masked residues included) raises :class:`~prott5nv.errors.SequenceTooLongError` before its text is
    built (``<mask:99999999>``)."""
    who = location(record_id, source, line) if record_id is not None or source else "input"
    body = text.strip()
    body = body[:-1] if body.endswith("*") else body
    parts: list[str] = []
    spans: list[tuple[int, int]] = []
    ids: list[int] = []
    pos = 0
    for i, piece in enumerate(_MASK_RE.split(body)):
        if i % 2 == 0:  # residues between masks
            if not piece.strip():
                continue
            seq = clean_sequence(piece, record_id, policy, source=source, line=line, offset=pos, final_stop=False)
            parts.append(seq)
            ids.extend(tokenizer.encode_residues(seq, record_id).tolist())
            pos += len(seq)
            continue
        n = 1 if piece is None else int(piece)  # <mask> or <mask:K>
        if n < 1:
            raise InvalidSequenceError(f"{who}: <mask:{piece}> must hide at least one residue")
        if max_residues is not None and pos + n > max_residues:
            raise SequenceTooLongError(f"{who}: more than {max_residues} residues (masked ones included)")
        if len(spans) >= tokenizer.num_sentinels:
            raise InvalidSequenceError(f"{who}: more than {tokenizer.num_sentinels} masked spans (one sentinel each)")
        ids.append(tokenizer.sentinel(len(spans)))
        spans.append((pos, n))
        parts.append("?" * n)
        pos += n
    if not ids:
        raise InvalidSequenceError(f"{who}: empty sequence")
    if tokenizer.add_eos:
        ids.append(tokenizer.eos_id)
    return MaskedInput(text, "".join(parts), spans, np.asarray(ids, dtype=np.int64))


def split_target(ids: Sequence[int], tokenizer: ProteinTokenizer) -> list[str] | None:
    """Residue strings behind sentinel 0, 1, ... of a decoded target (stops at EOS/pad). None when the
    sentinels are not 0, 1, 2, ... in order or residues come before the first one."""
    spans: list[str] = []
    sentinel_index = {s: i for i, s in enumerate(tokenizer.sentinel_ids)}
    for i in (int(x) for x in ids):
        if i in (tokenizer.eos_id, tokenizer.pad_id):
            break
        if i in sentinel_index:
            if sentinel_index[i] != len(spans):
                return None
            spans.append("")
        elif not spans:
            return None
        else:
            tok = tokenizer.tokens[i]
            spans[-1] += tok if len(tok) == 1 else ""
    return spans


def fill_spans(masked: MaskedInput, spans: Sequence[str]) -> str | None:
    """`masked.residues` with span j replaced by ``spans[j]`` (any length); None if spans are missing."""
    if len(spans) < len(masked.spans):
        return None
    out, prev = [], 0
    for (start, n), fill in zip(masked.spans, spans, strict=False):
        out += [masked.residues[prev:start], fill]
        prev = start + n
    out.append(masked.residues[prev:])
    return "".join(out)


@dataclass
class InfillResult:
    """Completed sequences of one masked input: `samples[k]` is a full sequence of the input's length,
    `probabilities[k][j]` the model's probability of the residue chosen at ``positions[j]`` (0-based),
    renormalised over the allowed residues (temperature / top-k / top-p not applied)."""

    input: str
    positions: list[int]
    samples: list[str] = field(default_factory=list)
    probabilities: list[np.ndarray] = field(default_factory=list)


def infill_template(masked: Sequence[MaskedInput], tokenizer: ProteinTokenizer) -> Tensor:
    """The target each input must produce: ``[N, T]`` with forced ids (sentinel j, EOS, then pad) and -1
    where the decoder chooses a residue."""
    rows = []
    for m in masked:
        row: list[int] = []
        for j, (_, n) in enumerate(m.spans):
            row += [tokenizer.sentinel(j)] + [-1] * n
        rows.append(row + [tokenizer.eos_id])
    width = max(len(r) for r in rows)
    return torch.tensor([r + [tokenizer.pad_id] * (width - len(r)) for r in rows], dtype=torch.long)


def infill(
    model: T5Model,
    tokenizer: ProteinTokenizer,
    masked: Sequence[MaskedInput],
    input_ids: Tensor,
    attention_mask: Tensor,
    *,
    num_samples: int = 1,
    do_sample: bool | None = None,
    num_beams: int = 1,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    residues: str = STANDARD_RESIDUES,
) -> list[InfillResult]:
    """Fill the masked spans of collated `masked` inputs by constrained sentinel decoding.

    At every step the logits are masked so that the decoder emits sentinel j where span j starts, then
    exactly as many residues (from `residues`) as the span hides, and EOS at the end. Sampling (default
    when ``num_samples > 1``) draws `num_samples` fills per input; greedy or beam search give the most
    likely one(s).
    """
    require_distinct_sentinels(tokenizer, "infilling")
    if do_sample is None:
        do_sample = num_samples > 1 and num_beams == 1
    bad = sorted(set(residues) - set(tokenizer.tokens))
    if bad or not residues:
        raise ConfigError(f"residues allowed for infilling must be letters of the vocabulary, got {residues!r}")
    template = infill_template(masked, tokenizer)
    cfg = GenerationConfig(
        max_new_tokens=template.shape[1], num_beams=num_beams, do_sample=do_sample, temperature=temperature,
        top_k=top_k, top_p=top_p, num_return_sequences=num_samples, length_penalty=0.0,
        vocab_limit=tokenizer.real_vocab_size,
    )  # fmt: skip
    cfg.validate()
    expand = num_beams if num_beams > 1 else num_samples
    forced = template.repeat_interleave(expand, dim=0).to(input_ids.device)
    vocab = model.config.vocab_size
    residue_mask = torch.zeros(vocab, dtype=torch.bool, device=input_ids.device)
    residue_mask[[tokenizer.token_to_id(r) for r in residues]] = True

    def constrain(step: int, generated: Tensor, logits: Tensor) -> Tensor:
        want = forced[:, step]
        allowed = F.one_hot(want.clamp(min=0), vocab).bool()
        allowed = torch.where((want >= 0)[:, None], allowed, residue_mask[None])
        return logits.masked_fill(~allowed, float("-inf"))

    out = generate(
        model, input_ids, attention_mask, cfg, decoder_start_id=tokenizer.decoder_start_id,
        eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, generator=generator, logits_processor=constrain,
    )  # fmt: skip
    free = template == -1
    results = []
    for i, m in enumerate(masked):
        positions = [start + k for start, n in m.spans for k in range(n)]
        res = InfillResult(m.text, positions)
        for r in range(i * num_samples, (i + 1) * num_samples):
            chosen = out.sequences[r, : free.shape[1]][free[i]].tolist()
            seq = list(m.residues)
            for p, tok in zip(positions, chosen, strict=True):
                seq[p] = tokenizer.tokens[tok]
            res.samples.append("".join(seq))
            res.probabilities.append(out.token_logprobs[r, : free.shape[1]][free[i]].exp().cpu().numpy())
        results.append(res)
    return results


@dataclass
class Generated:
    """One decoded target. `target`: the token stream with sentinels shown as ``<extra_id_N>`` (EOS and
    padding dropped); `filled`: the input with each masked span replaced by what followed its sentinel
    (None when the target does not name every span in order); `score`: see :class:`GenerationOutput`."""

    input: str
    target: str
    token_ids: list[int]
    score: float
    filled: str | None


def target_text(ids: Sequence[int], tokenizer: ProteinTokenizer) -> str:
    """A decoded target as text: residues as letters, sentinels as ``<extra_id_N>``, EOS/padding dropped."""
    kept = [i for i in ids if i not in (tokenizer.eos_id, tokenizer.pad_id)]
    return tokenizer.decode(kept, skip_special_tokens=False)


def describe_targets(
    out: GenerationOutput, masked: Sequence[MaskedInput], tokenizer: ProteinTokenizer
) -> list[Generated]:
    """Turn :func:`generate` output (rows grouped per input) into :class:`Generated` records."""
    per_input = out.sequences.shape[0] // len(masked)
    results = []
    for r in range(out.sequences.shape[0]):
        m = masked[r // per_input]
        ids = out.sequences[r, : int(out.lengths[r])].tolist()
        spans = split_target(ids, tokenizer)
        filled = fill_spans(m, spans) if spans is not None else None
        results.append(
            Generated(m.text, target_text(ids, tokenizer), ids, float(out.scores[r]), filled)
        )
    return results
