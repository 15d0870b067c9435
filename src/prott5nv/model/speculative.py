"""Speculative greedy decoding.

Greedy decoding of an fp32 model on CPU is speculative (``speculative=True``, the default): a step is
bound by reading the decoder's weights once per token, so an int8 copy of the decoder (a quarter of the
bytes; :func:`draft_model`, kept while the weights do not change) proposes ``draft_tokens`` tokens and
the fp32 model checks them all in one pass -- one read of its weights for several tokens. The tokens kept are
the fp32 model's own argmaxes, so the output is greedy decoding of the fp32 model; the only difference
from one token per pass is the last bits of fp32 arithmetic done in another order, which can decide a
near-tie the other way (as a different batch size can).

It pays only where a step is bound by reading the weights, and only while the draft agrees with the model.
Size: even a draft that agrees on every token gains nothing on a decoder that stays in cache (0.98x at the
demo's 8 MiB, 1.12x at 54 MiB, 1.48x at base size's 433 MiB), so models whose decoder weights are under
``speculation_min_bytes`` (64 MiB) decode one token per pass. Agreement: on random weights the int8 copy
agrees on nearly every token; on the re-shipped demo model it kept 67% of its drafts rebuilding whole
proteins and 25% on span-corruption targets (and lost time on both: 0.75x and 0.82x, too small to gain); on
a base-size model trained for 213 steps it kept 99-100% (1.35-1.68x faster than one token per pass), since
such a briefly trained model still repeats a few residues. So after ``speculation_trial`` (4) passes, a
draft that has kept less than ``min_acceptance`` (half) of what it proposed is dropped and the rest is
decoded one token per pass: the decisions depend on the model's size and the tokens, never on timing, so
the output stays the same.
"""

from __future__ import annotations

import copy
import logging
import warnings
import weakref

import torch

from .decoding import Emitted, GenerationConfig, GenerationOutput, LogitsProcessor, Stepper
from .t5 import T5Model

log = logging.getLogger(__name__)

_DRAFTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> (weights' versions, draft)


def _decoder_copy(model: T5Model) -> T5Model:
    """A copy of `model` without its encoder, linear weights row-major (as quantization and bf16 want)."""
    copied = copy.deepcopy(model, memo={id(model.encoder): None}).eval()  # the encoder "copies" as None
    for module in copied.modules():
        if isinstance(module, torch.nn.Linear):
            module.weight.data = module.weight.data.contiguous()  # undo apply_decoding_layout
    return copied


def draft_model(model: T5Model) -> T5Model:
    """A cheap copy of `model`'s decoder side (no encoder) for speculative greedy decoding: its linear
    layers dynamically quantized to int8 (PyTorch's fbgemm/qnnpack kernels: a quarter of the fp32 bytes),
    or in bf16 where this PyTorch cannot quantize. (Not the encoder's :class:`~.quantize.Int8Linear`: at
    decoding's 1-8 rows fbgemm multiplied 1.5-2.3x faster than ``torch._int_mm`` at base size's shapes.)
    Made once and reused while the fp32 weights are unchanged (their in-place versions are compared)."""
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


def speculates(model: T5Model, cfg: GenerationConfig, processor: LogitsProcessor | None) -> bool:
    """Whether :func:`~prott5nv.model.generate.generate` decodes greedily by speculation here."""
    weight = model.embeddings.word_embeddings.weight
    return (cfg.speculative and cfg.use_cache and not cfg.do_sample and cfg.num_beams == 1 and processor is None
            and weight.device.type == "cpu" and weight.dtype == torch.float32 and not model.training
            and decoder_bytes(model) >= cfg.speculation_min_bytes)  # fmt: skip


def decoder_bytes(model: T5Model) -> int:
    """The bytes of the decoder's weights: what a one-token step reads (``speculation_min_bytes``)."""
    return sum(p.numel() * p.element_size() for p in model.decoder.parameters())


def greedy_speculative(
    main: Stepper, draft: Stepper, cfg: GenerationConfig, start_id: int, eos_id: int, pad_id: int
) -> GenerationOutput:
    """Greedy decoding of `main`, `cfg.draft_tokens` tokens proposed by `draft` per pass of `main` (see
    the module docstring). A pass keeps the proposed tokens that every unfinished row's `main` argmax
    agrees with, then `main`'s own next token; both caches forget what was not kept."""
    assert main.cache is not None and draft.cache is not None
    out = Emitted(main.memory.shape[0], start_id, eos_id, pad_id, main.memory.device)
    passes = proposed = kept = 0
    while len(out) < cfg.max_new_tokens and not bool(out.done.all()):
        if passes >= cfg.speculation_trial and kept < cfg.min_acceptance * proposed:
            break  # the draft disagrees too often to pay for itself: one token per pass from here
        k = min(cfg.draft_tokens, cfg.max_new_tokens - len(out))
        proposal = known = out.tokens
        for _ in range(k):
            proposal = torch.cat([proposal, draft.feed(proposal)[:, -1].argmax(-1, keepdim=True)], dim=1)
        logits = main.feed(proposal)[:, -(k + 1) :]  # after the last known token and after each proposed one
        best = logits.argmax(-1)
        agree = (best[:, :k] == proposal[:, known.shape[1] :]) | out.done[:, None]
        accepted = int(agree.long().cumprod(1).sum(1).min())
        passes, proposed, kept = passes + 1, proposed + k, kept + accepted
        logp = logits.log_softmax(-1)
        for j in range(accepted + 1):
            if len(out) == cfg.max_new_tokens or bool(out.done.all()):
                break
            out.append(best[:, j], logp[:, j])
        main.cache.truncate(known.shape[1] + accepted)
        draft.cache.truncate(known.shape[1] + accepted)
    while len(out) < cfg.max_new_tokens and not bool(out.done.all()):  # after giving up
        logits = main.feed(out.tokens)[:, -1]
        out.append(logits.argmax(-1), logits.log_softmax(-1))
    result = out.output()
    result.passes, result.proposed, result.accepted = passes, proposed, kept
    return result
