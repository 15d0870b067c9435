"""The pieces every search algorithm shares: settings (:class:`GenerationConfig`), output
(:class:`GenerationOutput`), one decoder step at a time (:class:`Stepper`) and the record of emitted tokens
(:class:`Emitted`). The algorithms are in :mod:`prott5nv.model.generate` and :mod:`prott5nv.model.speculative`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ConfigError
from .fast import DecodingCache
from .t5 import T5Model

#: ``logits_processor(step, generated [N, step], logits [N, V]) -> logits``: applied to the raw logits of
#: every step before anything else (constraints: set forbidden ids to -inf).
LogitsProcessor = Callable[[int, Tensor, Tensor], Tensor]


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
    #: speculation gives up (one token per pass from then on) when, after `speculation_trial` passes, the
    #: draft has kept fewer than this share of the tokens it proposed: a draft that disagrees that often costs
    #: more than it saves (see model/speculative.py); 0 = never give up
    min_acceptance: float = 0.5
    speculation_trial: int = 4
    #: speculate only when the decoder's fp32 weights are at least this many bytes: only then is a step bound
    #: by reading them. With a draft that agrees on every token (random weights, 8 proteins, 2 threads) the
    #: speed-up over one token per pass was 0.66x at 1 MiB, 0.98x at 8 MiB (the demo's size), 1.12x at 54 MiB,
    #: 1.29x at 96 MiB, 1.48x at base size (433 MiB); 0 = at any size
    speculation_min_bytes: int = 64 << 20
    #: ids >= this are never emitted: the rows of the embedding table past the tokenizer's real vocabulary
    #: (padding to a multiple of 128, as NeMo's ``decode()`` masks ids >= ``tokenizer.vocab_size``); None =
    #: every row of the table. Set from the tokenizer by the caller (the model does not know its tokenizer).
    vocab_limit: int | None = None

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
        if not 0.0 <= self.min_acceptance <= 1.0:
            raise ConfigError(f"min_acceptance must be in [0, 1], got {self.min_acceptance}")
        if self.speculation_min_bytes < 0:
            raise ConfigError(f"speculation_min_bytes must be >= 0, got {self.speculation_min_bytes}")
        if self.speculation_trial < 1:
            raise ConfigError(f"speculation_trial must be >= 1, got {self.speculation_trial}")
        if self.vocab_limit is not None and self.vocab_limit < 1:
            raise ConfigError(f"vocab_limit must be >= 1, got {self.vocab_limit}")
        if self.early_stopping not in (True, False, "never"):
            raise ConfigError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")


@dataclass
class GenerationOutput:
    """Decoded targets, ``num_return_sequences`` consecutive rows per input.

    `sequences` ``[N, T]``: generated ids, decoder start token excluded, padded with the pad id after
    EOS. `lengths` ``[N]``: tokens generated per row (EOS included). `token_logprobs` ``[N, T]``: log-prob
    of each chosen token under the model (after logits processors, before temperature/top-k/top-p; 0 at
    padding). `scores` ``[N]``: greedy/sampling: the sum of `token_logprobs`; beam search: that sum
    divided by ``length ** length_penalty`` (transformers' `sequences_scores`). Speculative greedy decoding
    also counts its work: `passes`, the model's verification passes, `proposed` and `accepted`, the drafted
    tokens checked and kept (None for the other algorithms; tokens emitted by the one-token passes after
    speculation gave up are in neither).
    """

    sequences: Tensor
    lengths: Tensor
    token_logprobs: Tensor
    scores: Tensor
    passes: int | None = None
    proposed: int | None = None
    accepted: int | None = None


# -------------------------------------------------------------------------------------- the stepper
class Stepper:
    """One decoder step at a time, with or without the key/value cache. Every logit any search algorithm
    sees comes from here, so this is the one place where ids >= `vocab_limit` are set to -inf."""

    def __init__(self, model: T5Model, memory: Tensor, memory_mask: Tensor | None, use_cache: bool, steps: int,
                 vocab_limit: int | None = None) -> None:  # fmt: skip
        self.model, self.memory, self.memory_mask = model, memory, memory_mask
        self.cache: DecodingCache | None = DecodingCache(len(model.decoder.blocks), steps) if use_cache else None
        self.vocab_limit = vocab_limit

    def _lm_logits(self, hidden: Tensor) -> Tensor:
        logits = self.model.lm_logits(hidden).float()
        if self.vocab_limit is not None and self.vocab_limit < logits.shape[-1]:
            logits[..., self.vocab_limit :] = float("-inf")
        return logits

    def logits(self, tokens: Tensor) -> Tensor:
        """Next-token logits (fp32) ``[N, V]`` given all decoder tokens so far ``[N, t]``."""
        x = tokens[:, -1:] if self.cache is not None else tokens
        hidden = self.model.decode(x, self.memory, self.memory_mask, cache=self.cache)
        return self._lm_logits(hidden[:, -1])

    def feed(self, tokens: Tensor) -> Tensor:
        """Logits (fp32) ``[N, m, V]`` after each of the tokens ``[N, m]`` not yet in the cache (the cached
        prefix is skipped), which then join it."""
        assert self.cache is not None
        hidden = self.model.decode(tokens[:, self.cache.length :], self.memory, self.memory_mask, cache=self.cache)
        return self._lm_logits(hidden)

    def reorder(self, index: Tensor) -> None:
        """Keep rows `index` (beam search; see :meth:`~prott5nv.model.t5.DecoderCache.reorder`)."""
        if self.cache is not None:
            self.cache.reorder(index)



class Emitted:
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

