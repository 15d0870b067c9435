"""The Python API, mirroring BioNeMo's ProtT5nv inference wrapper.

    >>> import prott5nv
    >>> model = prott5nv.load("prott5nv-demo")
    >>> hiddens, mask = model.seqs_to_hiddens(["MKTAYIAKQR", "MSEQ"])
    >>> emb = model.hiddens_to_embedding(hiddens, mask)      # [2, d_model], mean over residues
    >>> emb = model.seqs_to_embedding(["MKTAYIAKQR", "MSEQ"])  # the same in one call

Returned positions are residues only: ProtT5nv's encoder input has no special tokens, and the trailing
`</s>` of Rostlab models is dropped, so ``hiddens[i, j]`` is residue ``j`` of sequence ``i``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .checkpoint import load_checkpoint
from .device import resolve_device, resolve_dtype
from .errors import ConfigError, SequenceTooLongError
from .model.fast import apply_speedups
from .model.quantize import QUANTIZATIONS, int8_unavailable, quantize_encoder
from .model.t5 import T5Model, cast_weights
from .sequence import DEFAULT_POLICY, SequencePolicy
from .tokenizer import ProteinTokenizer


class ProtT5nv:
    """A loaded model with its tokenizer, device and compute precision."""

    def __init__(
        self,
        model: T5Model,
        tokenizer: ProteinTokenizer,
        *,
        device: str | torch.device | None = "cpu",
        dtype: str | torch.dtype | None = None,
        name: str = "",
        quantize: str | None = None,
    ) -> None:
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.quantize = quantize
        if quantize is not None:  # refuse before any work where it cannot run fast
            if quantize not in QUANTIZATIONS:
                raise ConfigError(f"unknown quantization {quantize!r}; choose one of {', '.join(QUANTIZATIONS)}")
            reason = int8_unavailable(self.device)
            if reason:
                raise ConfigError(reason)
        self.model = apply_speedups(model.to(self.device).eval())
        if self.dtype != torch.float32:
            cast_weights(self.model, self.dtype)
        if quantize is not None:
            quantize_encoder(self.model, quantize)
        self.tokenizer = tokenizer
        self.name = name

    @property
    def config(self):  # noqa: ANN201 - T5Config
        return self.model.config

    @property
    def max_length(self) -> int | None:
        """Longest protein (residues) the encoder accepts, or None when positions are relative."""
        limit = self.config.max_length
        return None if limit is None else limit - self.tokenizer.num_special_suffix

    @property
    def embedding_dim(self) -> int:
        return self.config.d_model

    @contextlib.contextmanager
    def _precision(self) -> Iterator[None]:
        """Inference mode, and autocast for half precision (weights are already cast, see
        :func:`cast_weights`; autocast covers the float32 LayerNorm outputs and any other float32 input).
        A quantized model runs without autocast: its weights are in the compute dtype already, and its
        compiled int8 layers take the activations as they come."""
        with torch.inference_mode():
            if self.dtype == torch.float32 or self.quantize is not None:
                yield
            else:
                with torch.autocast(self.device.type, dtype=self.dtype):
                    yield

    # --------------------------------------------------------------------------------- tokenizing
    def encode(
        self,
        seqs: Sequence[str],
        ids: Sequence[str] | None = None,
        policy: SequencePolicy = DEFAULT_POLICY,
    ) -> list[np.ndarray]:
        """Clean and tokenize raw sequences; too-long ones raise :class:`SequenceTooLongError`."""
        names = list(ids) if ids is not None else [f"sequence {i + 1}" for i in range(len(seqs))]
        out = [self.tokenizer.encode(s, rid, policy) for s, rid in zip(seqs, names, strict=True)]
        limit = self.config.max_length
        if limit is not None:
            suffix = self.tokenizer.num_special_suffix
            long = [(n, len(t) - suffix) for n, t in zip(names, out, strict=True) if len(t) > limit]
            if long:
                listed = ", ".join(f"{n} ({length})" for n, length in long[:10])
                raise SequenceTooLongError(
                    f"{len(long)} sequence(s) longer than the model's maximum of {self.max_length} residues: "
                    f"{listed}"
                )
        return out

    def collate(self, token_ids: Sequence[np.ndarray]) -> tuple[Tensor, Tensor]:
        """Right-pad id arrays into ``(input_ids [B, S], attention_mask [B, S])`` on the model device."""
        longest = max(len(t) for t in token_ids)
        batch = np.full((len(token_ids), longest), self.tokenizer.pad_id, dtype=np.int64)
        mask = np.zeros((len(token_ids), longest), dtype=np.int64)
        for i, t in enumerate(token_ids):
            batch[i, : len(t)] = t
            mask[i, : len(t)] = 1
        return torch.from_numpy(batch).to(self.device), torch.from_numpy(mask).to(self.device)

    # --------------------------------------------------------------------------------- inference
    def tokens_to_hiddens(
        self, token_ids: Sequence[np.ndarray], layers: int | Sequence[int] | None = None
    ) -> tuple[Tensor, Tensor]:
        """Encoder states of tokenized sequences, special tokens removed: ``(hiddens, residue_mask)``,
        hiddens in float32 ``[B, L_max, D]``, mask bool ``[B, L_max]``. `layers` as in
        :meth:`seqs_to_hiddens`."""
        input_ids, attn = self.collate(token_ids)
        picked = None if layers is None else self.config.encoder_layers(layers)
        key_mask = None if bool(attn.all()) else attn  # no mask when nothing is padded: the same, faster
        with self._precision():
            if picked is None or picked == (self.config.num_layers,):  # the last layer: encode, as always
                hiddens = self.model.encode(input_ids, key_mask)
                hiddens = hiddens if picked is None or isinstance(layers, int) else hiddens[None]
            else:
                states = self.model.encode_layers(input_ids, key_mask, picked)
                hiddens = states[0] if isinstance(layers, int) else torch.stack(states)
        hiddens = hiddens.float()
        mask = attn.bool()
        suffix = self.tokenizer.num_special_suffix
        if suffix:
            lengths = attn.sum(1) - suffix
            mask = torch.arange(attn.shape[1], device=attn.device)[None] < lengths[:, None]
            hiddens = hiddens[..., : attn.shape[1] - suffix, :]
            mask = mask[:, : attn.shape[1] - suffix]
        return hiddens.masked_fill(~mask[..., None], 0.0), mask

    def seqs_to_hiddens(
        self,
        seqs: Sequence[str],
        ids: Sequence[str] | None = None,
        policy: SequencePolicy = DEFAULT_POLICY,
        layers: int | Sequence[int] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Per-residue encoder states ``[B, L_max, D]`` (float32) and the residue mask ``[B, L_max]``.

        `layers` (fair-esm's ``repr_layers`` convention): None or -1 is the encoder's output after its
        final norm (the default); 0 is the embedding output, k the output of block k, negative numbers
        count from the end. One number gives ``[B, L_max, D]`` of that layer; a list gives the layers
        stacked in the order given, ``[len(layers), B, L_max, D]``. Blocks above the highest layer asked
        for are not run."""
        if len(seqs) == 0:
            raise ConfigError("seqs_to_hiddens needs at least one sequence")
        return self.tokens_to_hiddens(self.encode(seqs, ids, policy), layers)

    @staticmethod
    def hiddens_to_embedding(hiddens: Tensor, mask: Tensor) -> Tensor:
        """Per-protein embedding: the mean over real residues (padding excluded), summed in float64 as
        `embed` does (so that both give the same bits for the same states); ``[B, D]``, or ``[layers, B, D]``
        from stacked layers ``[layers, B, L, D]``."""
        mask = mask.to(torch.float64)[..., None]
        lengths = mask.sum(-2).clamp(min=1.0)
        return ((hiddens.to(torch.float64) * mask).sum(-2) / lengths).to(hiddens.dtype)

    def seqs_to_embedding(
        self,
        seqs: Sequence[str],
        ids: Sequence[str] | None = None,
        policy: SequencePolicy = DEFAULT_POLICY,
        layers: int | Sequence[int] | None = None,
    ) -> Tensor:
        """Per-protein embeddings ``[B, D]`` (float32); ``[len(layers), B, D]`` for a list of `layers`
        (see :meth:`seqs_to_hiddens`)."""
        return self.hiddens_to_embedding(*self.seqs_to_hiddens(seqs, ids, policy, layers))

    def fingerprint(self) -> str:
        """A hash of everything that determines this model's embeddings: the encoder's weights, the
        tokenizer, the compute dtype and the quantization (computed on each call: the weights may have
        changed)."""
        h = hashlib.blake2b(digest_size=16)
        h.update(json.dumps(self.tokenizer.to_dict(), sort_keys=True).encode())
        h.update(str(self.dtype).encode())
        quantize = getattr(self, "quantize", None)
        if quantize is not None:
            h.update(f"quantize:{quantize}".encode())
        for name, t in sorted(self.model.state_dict().items()):
            if name.startswith("decoder.") or name == "lm_head_bias":
                continue  # embeddings use the encoder only
            t = t.detach().cpu().contiguous()
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update((t.float() if t.is_floating_point() else t).numpy().tobytes())
        return h.hexdigest()

    # --------------------------------------------------------------------------------- decoding
    # Generation, infilling and decoding from hidden states; the work is done in model/generate.py and
    # inference/infill.py (the masked-text protocol).
    def _masked_batch(self, seqs: Sequence[str] | str, ids: Sequence[str] | None, policy: SequencePolicy):
        from .inference.infill import parse_masked

        seqs = [seqs] if isinstance(seqs, str) else list(seqs)
        if not seqs:
            raise ConfigError("at least one sequence is needed")
        names = list(ids) if ids is not None else [f"sequence {i + 1}" for i in range(len(seqs))]
        masked = [parse_masked(s, self.tokenizer, n, policy) for s, n in zip(seqs, names, strict=True)]
        limit = self.config.max_length
        long = [n for n, m in zip(names, masked, strict=True) if limit is not None and len(m.encoder_ids) > limit]
        if long:
            raise SequenceTooLongError(f"longer than the model's {limit} encoder positions: {', '.join(long[:10])}")
        return masked, self.collate([m.encoder_ids for m in masked])

    def _generator(self, seed: int | None) -> torch.Generator | None:
        return None if seed is None else torch.Generator(device=self.device).manual_seed(seed)

    def generate(
        self,
        seqs: Sequence[str] | str,
        ids: Sequence[str] | None = None,
        policy: SequencePolicy = DEFAULT_POLICY,
        *,
        seed: int | None = None,
        **settings: Any,
    ) -> list:
        """Decode the T5 target of each (possibly masked, ``<mask>`` / ``<mask:K>``) protein: greedy by
        default; `settings` are :class:`~prott5nv.model.generate.GenerationConfig` fields (num_beams,
        do_sample, temperature, top_k, top_p, max_new_tokens, ...). Returns ``num_return_sequences``
        :class:`~prott5nv.inference.infill.Generated` per input, in input order."""
        from .inference.infill import describe_targets
        from .model.generate import GenerationConfig, generate
        from .tokenizer import require_distinct_sentinels

        masked, (input_ids, attn) = self._masked_batch(seqs, ids, policy)
        settings.setdefault("vocab_limit", self.tokenizer.real_vocab_size)
        if any(m.spans for m in masked):
            require_distinct_sentinels(self.tokenizer, "generation from masked input")
        tok = self.tokenizer
        with self._precision():
            out = generate(self.model, input_ids, attn, GenerationConfig(**settings),
                           decoder_start_id=tok.decoder_start_id, eos_id=tok.eos_id, pad_id=tok.pad_id,
                           generator=self._generator(seed))  # fmt: skip
        return describe_targets(out, masked, tok)

    def infill(
        self,
        seqs: Sequence[str] | str,
        ids: Sequence[str] | None = None,
        policy: SequencePolicy = DEFAULT_POLICY,
        *,
        num_samples: int = 1,
        seed: int | None = None,
        **settings: Any,
    ) -> list:
        """Fill every ``<mask>`` (one residue) / ``<mask:K>`` (K residues) with valid residues by
        constrained sentinel decoding; `num_samples` complete sequences per input (sampled, seeded by
        `seed`, when > 1). Returns one :class:`~prott5nv.inference.infill.InfillResult` per input."""
        from .inference.infill import infill

        masked, (input_ids, attn) = self._masked_batch(seqs, ids, policy)
        with self._precision():
            return infill(self.model, self.tokenizer, masked, input_ids, attn, num_samples=num_samples,
                          generator=self._generator(seed), **settings)  # fmt: skip

    def hiddens_to_seq(self, hiddens: Tensor, mask: Tensor, *, seed: int | None = None, **settings: Any) -> list[str]:
        """Decode from encoder states ``[B, L, D]`` and their mask (as :meth:`seqs_to_hiddens` returns):
        the decoded T5 target of each, sentinels shown as ``<extra_id_N>`` (BioNeMo's name, never
        implemented there). `settings` as in :meth:`generate`."""
        from .inference.infill import target_text
        from .model.generate import GenerationConfig, generate

        tok = self.tokenizer
        settings.setdefault("vocab_limit", tok.real_vocab_size)
        with self._precision():
            out = generate(self.model, None, mask.to(self.device).long(), GenerationConfig(**settings),
                           decoder_start_id=tok.decoder_start_id, eos_id=tok.eos_id, pad_id=tok.pad_id,
                           generator=self._generator(seed), encoder_hidden=hiddens.to(self.device))  # fmt: skip
        return [target_text(out.sequences[r, : int(out.lengths[r])].tolist(), tok) for r in range(len(out.lengths))]


def load(
    name_or_path: str | os.PathLike = "prott5nv-demo",
    *,
    device: str | torch.device | None = "cpu",
    dtype: str | torch.dtype | None = None,
    sentinels: str | None = None,
    quantize: str | None = None,
) -> ProtT5nv:
    """Load a bundled model by name, a native checkpoint directory, a `.nemo` archive or an HF T5
    directory. `device` "auto" picks CUDA when available; `dtype` "bfloat16"/"float16" stores the weights
    in that precision (LayerNorms stay float32) and runs under autocast; "auto" is bfloat16 where the
    device supports it, else float32. `sentinels` ("distinct" or "collapsed") overrides the sentinel
    layout a `.nemo` archive is read with (see :func:`~prott5nv.checkpoint.load_checkpoint`). `quantize`
    "int8" runs the encoder's linear layers in int8 on CPU (:mod:`prott5nv.model.quantize`; needs a CPU
    with AVX512-VNNI or AMX and a C++ compiler, else a ConfigError says why, before the weights are read)."""
    dev = resolve_device(device)
    if quantize is not None and quantize in QUANTIZATIONS and (reason := int8_unavailable(dev)):
        raise ConfigError(reason)
    dtype = resolve_dtype(dtype, dev)
    model, tokenizer = load_checkpoint(name_or_path, sentinels=sentinels, dtype=dtype)  # read straight into dtype
    return ProtT5nv(model, tokenizer, device=dev, dtype=dtype, name=str(name_or_path), quantize=quantize)
