"""Decoding with the T5 decoder: greedy, beam search and sampling.

What generation means for a T5 protein model
--------------------------------------------
The encoder reads a protein, possibly *corrupted*: some residues (or spans of residues) are replaced by
sentinel tokens ``<extra_id_0>``, ``<extra_id_1>``, ... in order. The decoder then emits the T5 *target*
-- each sentinel followed by the residues it hides -- and ends with ``</s>``::

    encoder:  M K T <extra_id_0> L L V <extra_id_1> A
    decoder:  <extra_id_0> Y <extra_id_1> Q </s>
    filled:   M K T Y L L V Q A

:func:`generate` decodes that target token stream (greedy, beam search or sampling) for any encoder
input; :func:`prott5nv.inference.infill.infill` constrains the decoder so that it emits exactly the right
sentinel and the right number of valid residues per masked span, and returns complete sequences.

Speed: the encoder runs once; the decoder is incremental with a key/value cache (self-attention keys and
values are written in place into preallocated buffers, one token per step; cross-attention keys/values are
computed once from the encoder). The beams (or samples) of one input share one copy of its encoder states
and cross-attention keys/values -- they attend as extra queries of that input -- so beam search reads
them once per step, not once per beam, and reorders only the self-attention cache. Single-query steps use
plain matmul attention, and the decoder's fp32 weights are stored column-major
(:func:`~prott5nv.model.fast.apply_decoding_layout`). ``use_cache=False`` recomputes the whole
prefix at every step (the reference used by the tests).

Greedy decoding of an fp32 model on CPU is speculative by default: see :mod:`prott5nv.model.speculative`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ConfigError
from .decoding import Emitted, GenerationConfig, GenerationOutput, LogitsProcessor, Stepper
from .fast import apply_decoding_layout, apply_grouped_cross_attention
from .speculative import draft_model, greedy_speculative, speculates
from .t5 import T5Model

__all__ = ["GenerationConfig", "GenerationOutput", "LogitsProcessor", "generate"]

_NEG = -1.0e9  # "impossible" score, as a finite number so that sums stay ordered


def _warp(logits: Tensor, cfg: GenerationConfig) -> Tensor:
    """Temperature, then top-k, then nucleus (top-p) filtering of fp32 logits. However small the
    temperature or top-p, the most likely token stays possible (no row is left without a token)."""
    if cfg.temperature != 1.0:
        scaled = logits / cfg.temperature
        if not bool(torch.isfinite(scaled.amax(-1)).all()):  # a temperature so small that it overflows:
            top = logits.amax(-1, keepdim=True)  # its limit, the most likely token(s)
            scaled = torch.where(logits == top, 0.0, float("-inf"))
        logits = scaled
    if cfg.top_k and cfg.top_k < logits.shape[-1]:
        kth = torch.topk(logits, cfg.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= cfg.top_p  # mass before this token already >= p
        drop_sorted[:, 0] = False  # a top_p below float32's smallest number would drop every token
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits



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
    apply_grouped_cross_attention(model)  # the rows of one input share its encoder states
    if cfg.use_cache:
        apply_decoding_layout(model)
    # the decoder's rows are `expand` consecutive beams/samples per input; they share the encoder states
    expand = cfg.num_beams if cfg.num_beams > 1 else cfg.num_return_sequences
    decoder = Stepper(model, encoder_hidden, attention_mask, cfg.use_cache, cfg.max_new_tokens, cfg.vocab_limit)
    if cfg.num_beams > 1:
        return _beam_search(decoder, encoder_hidden.shape[0], cfg, decoder_start_id, eos_id, pad_id, logits_processor)
    if speculates(model, cfg, logits_processor):
        proposer = draft_model(model)
        memory = encoder_hidden.to(proposer.embeddings.word_embeddings.weight.dtype)
        draft = Stepper(proposer, memory, attention_mask, True, cfg.max_new_tokens, cfg.vocab_limit)
        return greedy_speculative(decoder, draft, cfg, decoder_start_id, eos_id, pad_id)
    return _greedy_or_sample(decoder, encoder_hidden.shape[0] * expand, cfg, decoder_start_id, eos_id, pad_id,
                             generator, logits_processor)  # fmt: skip


def _greedy_or_sample(
    decoder: Stepper,
    n: int,
    cfg: GenerationConfig,
    start_id: int,
    eos_id: int,
    pad_id: int,
    generator: torch.Generator | None,
    processor: LogitsProcessor | None,
) -> GenerationOutput:
    out = Emitted(n, start_id, eos_id, pad_id, decoder.memory.device)
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



def _beam_search(
    decoder: Stepper,
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
