"""Decoding with the T5 decoder: greedy, beam search and sampling, plus sentinel infilling.

What generation means for a T5 protein model
--------------------------------------------
The encoder reads a protein, possibly *corrupted*: some residues (or spans of residues) are replaced by
sentinel tokens ``<extra_id_0>``, ``<extra_id_1>``, ... in order. The decoder then emits the T5 *target*
-- each sentinel followed by the residues it hides -- and ends with ``</s>``::

    encoder:  M K T <extra_id_0> L L V <extra_id_1> A
    decoder:  <extra_id_0> Y <extra_id_1> Q </s>
    filled:   M K T Y L L V Q A

:func:`generate` decodes that target token stream (greedy, beam search or sampling) for any encoder
input; :func:`infill` constrains the decoder so that it emits exactly the right sentinel and the right
number of valid residues per masked span, and returns complete sequences.

Masked-input syntax (:func:`parse_masked`): residues as usual (cleaned under the input policy), ``<mask>``
for one masked residue (each ``<mask>`` is its own single-residue span -- ProtT5nv's pretraining masked
single residues, ``max_ngram_size`` 1), and ``<mask:K>`` for one span of K residues behind a single
sentinel (T5 span corruption; an extrapolation for ProtT5nv, which never saw multi-residue spans).

Speed: the encoder runs once; the decoder is incremental with a key/value cache (self-attention keys and
values are written in place into preallocated buffers, one token per step; cross-attention keys/values are
computed once from the encoder). The beams (or samples) of one input share one copy of its encoder states
and cross-attention keys/values -- they attend as extra queries of that input -- so beam search reads
them once per step, not once per beam, and reorders only the self-attention cache. Single-query steps use
plain matmul attention, and the decoder's fp32 weights are stored column-major
(:meth:`~prott5nv.model.t5.T5Model.optimize_for_decoding`). ``use_cache=False`` recomputes the whole
prefix at every step (the reference used by the tests).

Greedy decoding of an fp32 model on CPU is speculative (``speculative=True``, the default): a step is
bound by reading the decoder's weights once per token, so an int8 copy of the decoder (a quarter of the
bytes; :func:`draft_model`, kept while the weights do not change) proposes ``draft_tokens`` tokens and
the fp32 model checks them all in one pass -- one read of its weights for several tokens. The tokens kept are
the fp32 model's own argmaxes, so the output is greedy decoding of the fp32 model; the only difference
from one token per pass is the last bits of fp32 arithmetic done in another order, which can decide a
near-tie the other way (as a different batch size can).
"""

from __future__ import annotations

import copy
import logging
import re
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError, InvalidSequenceError
from ..sequence import DEFAULT_POLICY, STANDARD_RESIDUES, SequencePolicy, clean_sequence
from ..tokenizer import ProteinTokenizer
from .t5 import DecoderCache, T5Model

log = logging.getLogger(__name__)

#: ``logits_processor(step, generated [N, step], logits [N, V]) -> logits``: applied to the raw logits of
#: every step before anything else (constraints: set forbidden ids to -inf).
LogitsProcessor = Callable[[int, Tensor, Tensor], Tensor]

_NEG = -1.0e9  # "impossible" score, as a finite number so that sums stay ordered


# ------------------------------------------------------------------------------------------ settings
@dataclass
class GenerationConfig:
    """Decoding settings; names and defaults follow transformers' `generate` where they overlap."""

    max_new_tokens: int = 64  # decoder steps, EOS included
    num_beams: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    length_penalty: float = 1.0  # beam score = sum log p / length ** length_penalty
    early_stopping: bool | str = False  # beam: True, False (heuristic) or "never"
    num_return_sequences: int = 1
    use_cache: bool = True
    speculative: bool = True  # greedy, fp32 on CPU: an int8 draft proposes, the model verifies (see above)
    draft_tokens: int = 6  # tokens proposed per verification pass

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.num_beams < 1:
            raise ConfigError(f"num_beams must be >= 1, got {self.num_beams}")
        if self.num_beams > 1 and self.do_sample:
            raise ConfigError("beam search and sampling cannot be combined (choose num_beams > 1 or do_sample)")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.num_return_sequences < 1:
            raise ConfigError(f"num_return_sequences must be >= 1, got {self.num_return_sequences}")
        if self.num_beams > 1 and self.num_return_sequences > self.num_beams:
            raise ConfigError(
                f"num_return_sequences ({self.num_return_sequences}) cannot exceed num_beams ({self.num_beams})"
            )
        if self.num_beams == 1 and not self.do_sample and self.num_return_sequences > 1:
            raise ConfigError("greedy decoding returns one sequence per input; use do_sample or num_beams")
        if self.draft_tokens < 1:
            raise ConfigError(f"draft_tokens must be >= 1, got {self.draft_tokens}")
        if self.early_stopping not in (True, False, "never"):
            raise ConfigError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")


@dataclass
class GenerationOutput:
    """Decoded targets, ``num_return_sequences`` consecutive rows per input.

    `sequences` ``[N, T]``: generated ids, decoder start token excluded, padded with the pad id after
    EOS. `lengths` ``[N]``: tokens generated per row (EOS included). `token_logprobs` ``[N, T]``: log-prob
    of each chosen token under the model (after logits processors, before temperature/top-k/top-p; 0 at
    padding). `scores` ``[N]``: greedy/sampling: the sum of `token_logprobs`; beam search: that sum
    divided by ``length ** length_penalty`` (transformers' `sequences_scores`).
    """

    sequences: Tensor
    lengths: Tensor
    token_logprobs: Tensor
    scores: Tensor


# -------------------------------------------------------------------------------------- the stepper
class _Decoder:
    """One decoder step at a time, with or without the key/value cache."""

    def __init__(self, model: T5Model, memory: Tensor, memory_mask: Tensor | None, use_cache: bool, steps: int) -> None:
        self.model, self.memory, self.memory_mask = model, memory, memory_mask
        self.cache: DecoderCache | None = model.new_cache(capacity=steps) if use_cache else None

    def logits(self, tokens: Tensor) -> Tensor:
        """Next-token logits (fp32) ``[N, V]`` given all decoder tokens so far ``[N, t]``."""
        x = tokens[:, -1:] if self.cache is not None else tokens
        hidden = self.model.decode(x, self.memory, self.memory_mask, cache=self.cache)
        return self.model.lm_logits(hidden[:, -1]).float()

    def feed(self, tokens: Tensor) -> Tensor:
        """Logits (fp32) ``[N, m, V]`` after each of the tokens ``[N, m]`` not yet in the cache (the cached
        prefix is skipped), which then join it."""
        assert self.cache is not None
        hidden = self.model.decode(tokens[:, self.cache.length :], self.memory, self.memory_mask, cache=self.cache)
        return self.model.lm_logits(hidden).float()

    def reorder(self, index: Tensor) -> None:
        """Keep rows `index` (beam search; see :meth:`DecoderCache.reorder`)."""
        if self.cache is not None:
            self.cache.reorder(index)


def _warp(logits: Tensor, cfg: GenerationConfig) -> Tensor:
    """Temperature, then top-k, then nucleus (top-p) filtering of fp32 logits."""
    if cfg.temperature != 1.0:
        logits = logits / cfg.temperature
    if cfg.top_k and cfg.top_k < logits.shape[-1]:
        kth = torch.topk(logits, cfg.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= cfg.top_p  # mass before this token already >= p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


_DRAFTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> (weights' versions, draft)


def _decoder_copy(model: T5Model) -> T5Model:
    """A copy of `model` without its encoder, linear weights row-major (as quantization and bf16 want)."""
    copied = copy.deepcopy(model, memo={id(model.encoder): None}).eval()  # the encoder "copies" as None
    for module in copied.modules():
        if isinstance(module, torch.nn.Linear):
            module.weight.data = module.weight.data.contiguous()  # undo optimize_for_decoding's layout
    return copied


def draft_model(model: T5Model) -> T5Model:
    """A cheap copy of `model`'s decoder side (no encoder) for speculative greedy decoding: its linear
    layers dynamically quantized to int8 (PyTorch's fbgemm/qnnpack kernels: a quarter of the fp32 bytes),
    or in bf16 where this PyTorch cannot quantize. Made once and reused while the fp32 weights are
    unchanged (their in-place versions are compared)."""
    versions = tuple((id(p), p._version) for p in model.parameters())
    kept = _DRAFTS.get(model)
    if kept is not None and kept[0] == versions:
        return kept[1]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao quantization is deprecated; the bf16 draft remains
            draft = torch.ao.quantization.quantize_dynamic(_decoder_copy(model), {torch.nn.Linear},
                                                           dtype=torch.qint8, inplace=True)  # fmt: skip
            probe = draft.decoder.blocks[0].mlp  # quantized kernels may exist but not run here: try one
            probe(torch.zeros(1, model.config.d_model))
    except Exception as exc:  # noqa: BLE001 - any failure: fall back to the bf16 draft
        log.debug("int8 draft unavailable (%s); using bf16", exc)
        draft = _decoder_copy(model).to(torch.bfloat16)
    _DRAFTS[model] = (versions, draft)
    return draft


def _speculates(model: T5Model, cfg: GenerationConfig, processor: LogitsProcessor | None) -> bool:
    weight = model.embeddings.word_embeddings.weight
    return (cfg.speculative and cfg.use_cache and not cfg.do_sample and cfg.num_beams == 1 and processor is None
            and weight.device.type == "cpu" and weight.dtype == torch.float32 and not model.training)  # fmt: skip


# ---------------------------------------------------------------------------------------- generate
@torch.no_grad()
def generate(
    model: T5Model,
    input_ids: Tensor | None,
    attention_mask: Tensor | None,
    config: GenerationConfig | None = None,
    *,
    decoder_start_id: int,
    eos_id: int,
    pad_id: int,
    generator: torch.Generator | None = None,
    logits_processor: LogitsProcessor | None = None,
    encoder_hidden: Tensor | None = None,
) -> GenerationOutput:
    """Decode T5 targets for a batch of encoder inputs (right-padded ids + mask, 1 = real token).

    Pass `encoder_hidden` ``[B, S, D]`` (with `attention_mask`) instead of `input_ids` to decode from
    precomputed encoder states. `generator` seeds sampling. See :class:`GenerationOutput`.
    """
    cfg = config or GenerationConfig()
    cfg.validate()
    limit = model.config.max_length
    if limit is not None and cfg.max_new_tokens + 1 > limit:
        raise ConfigError(f"max_new_tokens {cfg.max_new_tokens} exceeds the decoder's {limit - 1} positions")
    if encoder_hidden is None:
        if input_ids is None:
            raise ConfigError("generate needs input_ids or encoder_hidden")
        encoder_hidden = model.encode(input_ids, attention_mask)
    if cfg.use_cache:
        model.optimize_for_decoding()
    # the decoder's rows are `expand` consecutive beams/samples per input; they share the encoder states
    expand = cfg.num_beams if cfg.num_beams > 1 else cfg.num_return_sequences
    decoder = _Decoder(model, encoder_hidden, attention_mask, cfg.use_cache, cfg.max_new_tokens)
    if cfg.num_beams > 1:
        return _beam_search(decoder, encoder_hidden.shape[0], cfg, decoder_start_id, eos_id, pad_id, logits_processor)
    if _speculates(model, cfg, logits_processor):
        proposer = draft_model(model)
        memory = encoder_hidden.to(proposer.embeddings.word_embeddings.weight.dtype)
        draft = _Decoder(proposer, memory, attention_mask, True, cfg.max_new_tokens)
        return _greedy_speculative(decoder, draft, cfg, decoder_start_id, eos_id, pad_id)
    return _greedy_or_sample(decoder, encoder_hidden.shape[0] * expand, cfg, decoder_start_id, eos_id, pad_id,
                             generator, logits_processor)  # fmt: skip


class _Emitted:
    """The tokens chosen so far for ``n`` rows, one token per row per step: finished rows (past EOS) get
    the pad id and log-prob 0."""

    def __init__(self, n: int, start_id: int, eos_id: int, pad_id: int, device: torch.device) -> None:
        self.tokens = torch.full((n, 1), start_id, dtype=torch.long, device=device)
        self.logprobs: list[Tensor] = []
        self.done = torch.zeros(n, dtype=torch.bool, device=device)
        self.lengths = torch.zeros(n, dtype=torch.long, device=device)
        self.eos_id, self.pad_id = eos_id, pad_id

    def __len__(self) -> int:
        return len(self.logprobs)

    def append(self, nxt: Tensor, logp: Tensor) -> None:
        """Take `nxt` ``[N]``, scored by the log-probs `logp` ``[N, V]``."""
        done = self.done
        self.logprobs.append(logp.gather(1, nxt[:, None]).squeeze(1).masked_fill(done, 0.0))
        nxt = nxt.masked_fill(done, self.pad_id)
        self.lengths += (~done).long()
        self.tokens = torch.cat([self.tokens, nxt[:, None]], dim=1)
        done |= nxt == self.eos_id

    def output(self) -> GenerationOutput:
        token_logprobs = torch.stack(self.logprobs, dim=1)
        return GenerationOutput(self.tokens[:, 1:], self.lengths, token_logprobs, token_logprobs.sum(1))


def _greedy_or_sample(
    decoder: _Decoder,
    n: int,
    cfg: GenerationConfig,
    start_id: int,
    eos_id: int,
    pad_id: int,
    generator: torch.Generator | None,
    processor: LogitsProcessor | None,
) -> GenerationOutput:
    out = _Emitted(n, start_id, eos_id, pad_id, decoder.memory.device)
    for step in range(cfg.max_new_tokens):
        logits = decoder.logits(out.tokens)
        if processor is not None:
            logits = processor(step, out.tokens[:, 1:], logits)
        if cfg.do_sample:
            probs = _warp(logits, cfg).softmax(-1)
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        else:
            nxt = logits.argmax(-1)
        out.append(nxt, logits.log_softmax(-1))
        if bool(out.done.all()):
            break
    return out.output()


def _greedy_speculative(
    main: _Decoder, draft: _Decoder, cfg: GenerationConfig, start_id: int, eos_id: int, pad_id: int
) -> GenerationOutput:
    """Greedy decoding of `main`, `cfg.draft_tokens` tokens proposed by `draft` per pass of `main` (see
    the module docstring). A pass keeps the proposed tokens that every unfinished row's `main` argmax
    agrees with, then `main`'s own next token; both caches forget what was not kept."""
    assert main.cache is not None and draft.cache is not None
    out = _Emitted(main.memory.shape[0], start_id, eos_id, pad_id, main.memory.device)
    while len(out) < cfg.max_new_tokens and not bool(out.done.all()):
        k = min(cfg.draft_tokens, cfg.max_new_tokens - len(out))
        proposal = known = out.tokens
        for _ in range(k):
            proposal = torch.cat([proposal, draft.feed(proposal)[:, -1].argmax(-1, keepdim=True)], dim=1)
        logits = main.feed(proposal)[:, -(k + 1) :]  # after the last known token and after each proposed one
        best = logits.argmax(-1)
        agree = (best[:, :k] == proposal[:, known.shape[1] :]) | out.done[:, None]
        accepted = int(agree.long().cumprod(1).sum(1).min())
        logp = logits.log_softmax(-1)
        for j in range(accepted + 1):
            if len(out) == cfg.max_new_tokens or bool(out.done.all()):
                break
            out.append(best[:, j], logp[:, j])
        main.cache.truncate(known.shape[1] + accepted)
        draft.cache.truncate(known.shape[1] + accepted)
    return out.output()


def _beam_search(
    decoder: _Decoder,
    batch: int,
    cfg: GenerationConfig,
    start_id: int,
    eos_id: int,
    pad_id: int,
    processor: LogitsProcessor | None,
) -> GenerationOutput:
    """Beam search with transformers' stopping semantics (length penalty, `early_stopping` True / False /
    "never"): keep `num_beams` running hypotheses and the `num_beams` best finished ones per input."""
    nb, steps = cfg.num_beams, cfg.max_new_tokens
    device = decoder.memory.device
    keep = 2 * nb  # candidates per input: enough to still have nb running ones if nb of them end in EOS
    # running hypotheses [B, nb, steps]
    run_tok = torch.full((batch, nb, steps), pad_id, dtype=torch.long, device=device)
    run_lp = torch.zeros((batch, nb, steps), device=device)
    run_score = torch.zeros((batch, nb), device=device)
    run_score[:, 1:] = _NEG  # all beams start identical: only the first may expand at step 0
    # finished hypotheses
    fin_tok = run_tok.clone()
    fin_lp = run_lp.clone()
    fin_len = torch.zeros((batch, nb), dtype=torch.long, device=device)
    fin_score = torch.full((batch, nb), _NEG, device=device)
    fin_full = torch.zeros((batch, nb), dtype=torch.bool, device=device)
    can_improve = torch.ones((batch, 1), dtype=torch.bool, device=device)
    offsets = (torch.arange(batch, device=device) * nb)[:, None]
    prefix = torch.full((batch * nb, 1), start_id, dtype=torch.long, device=device)
    first_k = torch.arange(keep, device=device)[None] < nb  # only the top nb candidates may finish

    for t in range(steps):
        tokens = torch.cat([prefix, run_tok[:, :, :t].reshape(batch * nb, t)], dim=1)
        logits = decoder.logits(tokens)
        if processor is not None:
            logits = processor(t, tokens[:, 1:], logits)
        logp = logits.log_softmax(-1)
        vocab = logp.shape[-1]
        total = (logp.view(batch, nb, vocab) + run_score[:, :, None]).view(batch, nb * vocab)
        cand_score, cand_idx = total.topk(keep, dim=1)
        beam, tok = cand_idx // vocab, cand_idx % vocab
        cand_tok = run_tok.gather(1, beam[:, :, None].expand(-1, -1, steps)).clone()
        cand_tok[:, :, t] = tok
        cand_lp = run_lp.gather(1, beam[:, :, None].expand(-1, -1, steps)).clone()
        cand_lp[:, :, t] = logp.view(batch, nb * vocab).gather(1, cand_idx)
        ends = (tok == eos_id) | (t + 1 == steps)

        # running beams for the next step: the best candidates that did not end
        alive_score = cand_score + ends.float() * _NEG
        pick = alive_score.topk(nb, dim=1).indices
        run_tok = cand_tok.gather(1, pick[:, :, None].expand(-1, -1, steps))
        run_lp = cand_lp.gather(1, pick[:, :, None].expand(-1, -1, steps))
        run_score = alive_score.gather(1, pick)

        # finished hypotheses: merge the candidates that ended now (length-normalised) with the old ones
        gen_len = t + 1
        normed = cand_score / gen_len**cfg.length_penalty
        closed = ~(ends & first_k) | ~can_improve
        if cfg.early_stopping is True:
            closed = closed | fin_full.all(1, keepdim=True)
        normed = normed + closed.float() * _NEG
        all_score = torch.cat([fin_score, normed], dim=1)
        best = all_score.topk(nb, dim=1).indices
        fin_score = all_score.gather(1, best)
        fin_tok = torch.cat([fin_tok, cand_tok], 1).gather(1, best[:, :, None].expand(-1, -1, steps))
        fin_lp = torch.cat([fin_lp, cand_lp], 1).gather(1, best[:, :, None].expand(-1, -1, steps))
        fin_len = torch.cat([fin_len, torch.full_like(cand_score, gen_len, dtype=torch.long)], 1).gather(1, best)
        fin_full = torch.cat([fin_full, ends & first_k & ~closed], 1).gather(1, best)

        decoder.reorder((beam.gather(1, pick) + offsets).view(-1))

        # can a running beam still beat the worst finished one?
        hypothetical = steps if (cfg.early_stopping == "never" and cfg.length_penalty > 0) else gen_len
        best_running = run_score[:, :1] / hypothetical**cfg.length_penalty
        worst_finished = torch.where(fin_full, fin_score.min(1, keepdim=True).values, torch.full_like(fin_score, _NEG))
        can_improve = can_improve & (best_running > worst_finished).any(1, keepdim=True)
        if not bool(can_improve.any()) or bool(ends.all()):
            break
        if cfg.early_stopping is True and bool(fin_full.all()):
            break

    r = cfg.num_return_sequences
    lengths = fin_len[:, :r].reshape(-1)
    width = int(lengths.max())
    return GenerationOutput(
        fin_tok[:, :r, :width].reshape(batch * r, width),
        lengths,
        fin_lp[:, :r, :width].reshape(batch * r, width),
        fin_score[:, :r].reshape(-1),
    )


# --------------------------------------------------------------------------- masked inputs, targets
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
) -> MaskedInput:
    """Parse ``"MKT<mask>LLV<mask:3>A"`` (see the module docstring) into encoder ids and spans."""
    who = record_id or "input"
    body = text.strip()
    body = body[:-1] if body.endswith("*") else body
    parts: list[str] = []
    spans: list[tuple[int, int]] = []
    ids: list[int] = []
    pos = 0
    for i, piece in enumerate(_MASK_RE.split(body)):
        if i % 2 == 0:  # residues between masks
            if "*" in piece:
                raise InvalidSequenceError(f"{who}: stop symbol '*' inside the sequence")
            if not piece.strip():
                continue
            seq = clean_sequence(piece, record_id, policy)
            parts.append(seq)
            ids.extend(tokenizer.encode_residues(seq, record_id).tolist())
            pos += len(seq)
            continue
        n = 1 if piece is None else int(piece)  # <mask> or <mask:K>
        if n < 1:
            raise InvalidSequenceError(f"{who}: <mask:{piece}> must hide at least one residue")
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
    from ..interop.nemo import require_distinct_sentinels  # refuses collapsed (NeMo >= 1.13) sentinels

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
