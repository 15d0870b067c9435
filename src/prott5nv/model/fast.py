"""Speed-ups for a built :class:`~prott5nv.model.t5.T5Model`, applied from outside; none changes an output.

The network in :mod:`prott5nv.model.t5` is written plainly. Each ``apply_*`` here gives some of its modules
a faster forward by switching their class to a subclass (a mixin over the plain class, torchtitan-style):
parameters, buffers, state-dict keys and the parameter order stay as they are, and applying twice is the same
as applying once. Each speed-up says what it gains and is tested (tests/test_fast.py) to compute what the
plain module computes.

* :func:`apply_packing` -- training forwards skip the padding (token-wise layers on real tokens only).
* :func:`apply_fast_dropout` -- CPU dropout masks from random bits instead of ``bernoulli_``.
* :func:`apply_cpu_inference` -- bf16 ReLU by the sign bit in inference.
* :func:`apply_grouped_cross_attention` -- beams/samples of one input read its encoder states once.
* :func:`apply_decoding_layout` -- decoder weights column-major for incremental decoding on CPU.
* :class:`DecodingCache` -- a key/value cache that reorders beams without allocating, keys stored for BLAS.

:func:`apply_speedups` applies the first four; :func:`~prott5nv.model.generate.generate` adds the decoding
layout and uses a :class:`DecodingCache`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .t5 import (
    MLP,
    Attention,
    DecoderCache,
    EncDecAttention,
    LayerCache,
    SelfAttention,
    Stack,
    T5Model,
    attention_probs,
    merge_heads,
    split_heads,
)

_COMBINED: dict[tuple[type, type], type] = {}


def _extend(module: nn.Module, mixin: type) -> None:
    """Give `module` the methods of `mixin` (placed before its class in the MRO); once only."""
    cls = type(module)
    if issubclass(cls, mixin):
        return
    combined = _COMBINED.get((mixin, cls))
    if combined is None:
        name = f"{mixin.__name__.lstrip('_')}{cls.__name__}"
        combined = type(name, (mixin, cls), {"__module__": __name__})
        _COMBINED[(mixin, cls)] = combined
        globals().setdefault(name, combined)  # picklable by name
    module.__class__ = combined


# --------------------------------------------------------------------------------------------- packing
class Packing:
    """Where the real tokens of a padded ``[B, S]`` batch are: ``[B, S, C]`` <-> ``[T, C]`` rows."""

    def __init__(self, key_mask: Tensor) -> None:
        self.shape = key_mask.shape
        self.index = key_mask.flatten().nonzero().squeeze(1)

    def unpad(self, x: Tensor) -> Tensor:
        """``[B, S, C]`` -> ``[T, C]``."""
        return x.flatten(0, 1).index_select(0, self.index)

    def pad(self, x: Tensor) -> Tensor:
        """``[T, C]`` -> ``[B, S, C]``, zeros at the padding."""
        out = x.new_zeros(self.shape[0] * self.shape[1], x.shape[-1]).index_copy(0, self.index, x)
        return out.view(*self.shape, x.shape[-1])


def _packing(mask: Tensor | None) -> Packing | None:
    return None if mask is None or bool(mask.all()) else Packing(mask.bool())


class _PackedStack:
    """Training forwards (grad enabled, no cache) over a padded batch run the blocks on the ``[T, C]`` real
    tokens; attention pads its projections back to ``[B, S, ...]`` and masks as usual."""

    def forward(self, x: Tensor, key_mask: Tensor | None, memory=None, memory_mask=None, cache=None, past_len=0):
        packing = _packing(key_mask) if cache is None and torch.is_grad_enabled() else None
        if packing is None:
            return super().forward(x, key_mask, memory, memory_mask, cache, past_len)
        mask, cross = self.masks(x.shape[1], key_mask, memory, memory_mask, past_len, x)
        memory_packing = _packing(memory_mask) if memory is not None else None
        if memory_packing is not None:
            memory = memory_packing.unpad(memory)
        for block in self.blocks:
            block.self_attention.packing = packing
            if self.is_decoder:
                block.cross_attention.packing = (packing, memory_packing)
        try:
            x = self.dropout(packing.unpad(x))
            for block in self.blocks:
                x = block(x, mask, memory, cross)
            return packing.pad(self.dropout(self.final_layer_norm(x)))
        finally:
            for block in self.blocks:
                block.self_attention.packing = None
                if self.is_decoder:
                    block.cross_attention.packing = None


class _PackedSelfAttention:
    packing: Packing | None = None

    def forward(self, x: Tensor, mask: Tensor | None, cache: LayerCache | None = None) -> Tensor:
        if self.packing is None:
            return super().forward(x, mask, cache)
        q, k, v = split_heads(self.packing.pad(self.qkv(x)), 3, self.num_heads, self.d_kv)
        return self.o(self.packing.unpad(merge_heads(self.attend(q, k, v, mask, few=False))))


class _PackedEncDecAttention:
    packing: tuple[Packing, Packing | None] | None = None

    def forward(self, x: Tensor, mask: Tensor | None, memory: Tensor, cache: LayerCache | None = None) -> Tensor:
        if self.packing is None:
            return super().forward(x, mask, memory, cache)
        packing, memory_packing = self.packing
        (q,) = split_heads(packing.pad(self.q(x)), 1, self.num_heads, self.d_kv)
        kv = self.kv(memory)
        k, v = split_heads(memory_packing.pad(kv) if memory_packing is not None else kv, 2, self.num_heads, self.d_kv)
        return self.o(packing.unpad(merge_heads(self.attend(q, k, v, mask, few=False))))


def apply_packing(model: T5Model) -> T5Model:
    """Training forwards over a padded batch run the token-wise layers (norms, projections, MLP, dropout,
    residuals: almost all of the arithmetic) on the real tokens only. Batches are padded to their longest
    protein, so this saves the padding's share of the compute: about a fifth of a training step on
    Swiss-Prot batches cut to 256 residues, more at 512. Inference (no grad) and cached decoding are
    unchanged."""
    for m in model.modules():
        if isinstance(m, Stack):
            _extend(m, _PackedStack)
        elif isinstance(m, SelfAttention):
            _extend(m, _PackedSelfAttention)
        elif isinstance(m, EncDecAttention):
            _extend(m, _PackedEncDecAttention)
    return model


# --------------------------------------------------------------------------------------------- dropout
def keep_mask(shape: torch.Size | tuple[int, ...], p: float, like: Tensor) -> Tensor:
    """Dropout keep mask of `like`'s dtype and device: 1 with probability ``1 - p`` (to within 3e-5), else 0;
    drawn from the default generator.

    Several times cheaper than ``bernoulli_`` on CPU: one 31-bit random integer per two elements, shifted
    left by one so that each 16-bit half carries at least 15 random bits, one comparison, and a cast
    (CPU kernels mixing a boolean mask with floats are slow; same-dtype ones are fast)."""
    n = math.prod(shape)
    bits = torch.empty((n + 1) // 2, dtype=torch.int32, device=like.device).random_()
    bits.bitwise_left_shift_(1)
    keep = bits.view(torch.int16)[:n] >= -32768 + round(p * 65536)
    return keep.view(torch.uint8).to(like.dtype).view(shape)


def dropout(x: Tensor, p: float) -> Tensor:
    """Inverted dropout (training): zero elements with probability `p`, scale the rest by 1/(1-p). On CPU
    with :func:`keep_mask`; elsewhere ``F.dropout`` (fused kernels)."""
    if p <= 0.0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, training=True)
    if p >= 1.0:
        return x * 0.0
    return (x * keep_mask(x.shape, p, x)).mul_(1.0 / (1.0 - p))


class _FastDropout:
    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p) if self.training else x


class _FastAttentionDropout:
    """With attention dropout on CPU, attention as matmul, fp32 softmax, :func:`dropout`, matmul (SDPA would
    materialise the scores anyway, and draw its mask with the far slower ``bernoulli_``)."""

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, few: bool) -> Tensor:
        if self.training and self.dropout > 0.0 and q.device.type == "cpu":
            return torch.matmul(dropout(attention_probs(q, k, mask, self.scale), self.dropout), v)
        return super().attend(q, k, v, mask, few)


def apply_fast_dropout(model: nn.Module) -> nn.Module:
    """Every dropout of the network (hidden and attention) draws its CPU mask with :func:`keep_mask`:
    several times cheaper than ``bernoulli_``, which otherwise takes a large share of a CPU training step.
    Same keep probability and scale; on GPUs ``F.dropout`` as before; eval mode untouched."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            _extend(m, _FastDropout)
        elif isinstance(m, Attention):
            _extend(m, _FastAttentionDropout)
    return model


# ------------------------------------------------------------------------------------------- inference
class _SignBitReLU:
    def forward(self, h: Tensor) -> Tensor:
        if h.dtype == torch.bfloat16 and not torch.is_grad_enabled():
            # clamping the int16 view at 0 zeroes exactly the negative values, in place and vectorized
            return h.view(torch.int16).clamp_min_(0).view(torch.bfloat16)
        return super().forward(h)


def apply_cpu_inference(model: nn.Module) -> nn.Module:
    """ReLU of bf16 activations in inference by their sign bit (PyTorch's bf16 relu kernel is about 6x
    slower on CPU): exactly the same values. Note: it overwrites its input, which in the MLP is the fresh
    output of `wi`."""
    for m in model.modules():
        if isinstance(m, MLP) and isinstance(m.act, nn.ReLU):
            _extend(m.act, _SignBitReLU)
    return model


class _GroupedEncDecAttention:
    def repeat_memory(
        self, group: int, k: Tensor, v: Tensor, mask: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        return k, v, mask  # no copies: `attend` takes each input's rows as extra queries

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, few: bool) -> Tensor:
        n, h, s, d = q.shape
        b = k.shape[0]
        if n == b:
            return super().attend(q, k, v, mask, few)
        if n % b:
            raise ValueError(f"{n} decoder rows cannot share {b} encoder rows (need a multiple of {b})")
        group = n // b
        q = q.view(b, group, h, s, d).transpose(1, 2).reshape(b, h, group * s, d)
        out = super().attend(q, k, v, mask, few)
        return out.view(b, h, group, s, d).transpose(1, 2).reshape(n, h, s, d)


def apply_grouped_cross_attention(model: nn.Module) -> nn.Module:
    """When g decoder rows (beams, samples) share one encoder input, cross-attention takes each input's g
    rows as extra queries of that input: its keys/values are read once per step, not copied and read g
    times (beam search with 4 beams: a quarter of the cross-attention reads)."""
    for m in model.modules():
        if isinstance(m, EncDecAttention):
            _extend(m, _GroupedEncDecAttention)
    return model


def apply_speedups(model: T5Model) -> T5Model:
    """All the speed-ups that hold in every mode: packing, fast dropout, CPU inference, grouped
    cross-attention (the decoding layout is applied by generate, in eval mode)."""
    for apply in (apply_packing, apply_fast_dropout, apply_cpu_inference, apply_grouped_cross_attention):
        apply(model)
    return model


# -------------------------------------------------------------------------------------------- decoding
@torch.no_grad()
def apply_decoding_layout(model: T5Model) -> T5Model:
    """Store the decoder's fp32 CPU linear weights column-major: same values, shapes and state-dict keys,
    other strides. Incremental decoding multiplies a few rows by every weight, and MKL does that about
    1.5-2x faster with a column-major weight than with the row-major one `nn.Linear` keeps (bf16 weights are
    faster row-major and stay). Idempotent; skipped in training mode so that training keeps the usual
    layout."""
    if model.decoder is None or model.training:
        return model
    for module in model.decoder.modules():
        if isinstance(module, nn.Linear):
            w = module.weight
            if w.device.type == "cpu" and w.dtype == torch.float32 and w.stride(0) != 1:
                w.data = w.data.t().contiguous().t()
    return model


class SpareLayerCache(LayerCache):
    """A :class:`LayerCache` that (1) stores cross-attention keys transposed in memory, the layout in which
    the BLAS multiplies by them fastest, and (2) reorders beams by gathering into a spare pair of buffers,
    which then become the cache (one read and one write per step, no allocation)."""

    def __init__(self, capacity: int | None = None) -> None:
        super().__init__(capacity)
        self.spare: tuple[Tensor, Tensor] | None = None

    def grow(self, like: Tensor, needed: int) -> None:
        super().grow(like, needed)
        self.spare = None

    def set_cross(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return super().set_cross(k.transpose(-1, -2).contiguous().transpose(-1, -2), v.contiguous())

    def reorder(self, index: Tensor) -> None:
        if self.k is not None and self.v is not None and self.length:
            n = self.length
            if self.spare is None:
                self.spare = (torch.empty_like(self.k), torch.empty_like(self.v))
            k, v = self.spare
            torch.index_select(self.k[:, :, :n], 0, index, out=k[:, :, :n])
            torch.index_select(self.v[:, :, :n], 0, index, out=v[:, :, :n])
            self.spare = (self.k, self.v)
            self.k, self.v = k, v


class DecodingCache(DecoderCache):
    """A :class:`~prott5nv.model.t5.DecoderCache` of :class:`SpareLayerCache` layers."""

    layer_cache = SpareLayerCache
