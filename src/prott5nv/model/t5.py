"""The T5 encoder-decoder, both families (see model/config.py), in one plain module.

Data flow: ids -> Embeddings -> Stack(encoder) -> hidden states; decoder ids -> Embeddings ->
Stack(decoder, cross-attending to the encoder) -> lm_logits. Each module has one forward. The pieces carry
the names of HF's ``modeling_t5.py`` where the checkpoints allow it: :class:`SelfAttention`,
:class:`EncDecAttention`, ``relative_attention_bias``, ``final_layer_norm`` (the state-dict keys stay those
of our native format; docs/checkpoints.md maps them to NeMo's and HF's).

Where to look: the attention masks are built in :func:`attention_mask`; the fused self-attention projection
``qkv`` is split into heads by :func:`split_heads` (rows ``[q; k; v]``); attention itself is :func:`attend`.

Speed-ups that change no output (skipping padding in training, cheap CPU dropout, a bf16 ReLU, weight
layouts and caches for decoding) are not here: :mod:`prott5nv.model.fast` applies them to a built model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import T5Config


# ----------------------------------------------------------------------------------------------- cache
class LayerCache:
    """Keys/values of one decoder layer during incremental decoding.

    Self-attention keys/values live in buffers ``[N, H, capacity, d_kv]`` filled up to `length` and written
    in place (no per-step ``torch.cat`` of the whole history); a full buffer doubles. Cross-attention
    keys/values (`cross`) are computed once from the encoder states.
    """

    def __init__(self, capacity: int | None = None) -> None:
        self.k: Tensor | None = None
        self.v: Tensor | None = None
        self.length = 0
        self.capacity = capacity
        self.cross: tuple[Tensor, Tensor] | None = None

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store the new keys/values ``[N, H, n, d_kv]``; return ``[N, H, length, d_kv]`` views of all."""
        start, end = self.length, self.length + k.shape[2]
        if self.k is None or self.v is None or end > self.k.shape[2]:
            self.grow(k, end)
        kbuf, vbuf = self.k, self.v
        assert kbuf is not None and vbuf is not None
        kbuf[:, :, start:end] = k
        vbuf[:, :, start:end] = v
        self.length = end
        return kbuf[:, :, :end], vbuf[:, :, :end]

    def grow(self, like: Tensor, needed: int) -> None:
        """New buffers shaped like `like` with room for at least `needed` tokens, holding what was kept."""
        old = 0 if self.k is None else self.k.shape[2]
        size = max(needed, self.capacity or 0, 2 * old)
        n, h, _, d = like.shape
        k, v = like.new_empty(n, h, size, d), like.new_empty(n, h, size, d)
        if self.k is not None and self.v is not None and self.length:
            k[:, :, : self.length] = self.k[:, :, : self.length]
            v[:, :, : self.length] = self.v[:, :, : self.length]
        self.k, self.v = k, v

    def set_cross(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Keep the cross-attention keys/values (computed once); return them as stored."""
        self.cross = (k, v)
        return self.cross

    def reorder(self, index: Tensor) -> None:
        """Keep rows `index` of the self-attention keys/values (beam search)."""
        if self.k is not None and self.v is not None and self.length:
            self.k, self.v = self.k.index_select(0, index), self.v.index_select(0, index)


class DecoderCache:
    """One :class:`LayerCache` per decoder layer (from :meth:`T5Model.new_cache`); `length` = decoder
    tokens seen so far. `capacity` presizes the buffers (e.g. to the number of tokens to generate)."""

    layer_cache = LayerCache

    def __init__(self, num_layers: int, capacity: int | None = None) -> None:
        self.layers = [self.layer_cache(capacity) for _ in range(num_layers)]

    def __getitem__(self, i: int) -> LayerCache:
        return self.layers[i]

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def length(self) -> int:
        return self.layers[0].length if self.layers else 0

    def reorder(self, index: Tensor) -> None:
        """Keep rows `index` in every layer (beam search). Cross-attention entries are identical for the
        beams of one input and beams never move between inputs, so they stay."""
        for layer in self.layers:
            layer.reorder(index)

    def truncate(self, length: int) -> None:
        """Forget the self-attention keys/values after the first `length` tokens (speculative decoding
        drops the rejected ones); the buffers stay."""
        for layer in self.layers:
            layer.length = min(layer.length, length)


# ----------------------------------------------------------------------------------------------- masks
def attention_mask(
    key_mask: Tensor | None,
    query_len: int,
    key_len: int,
    *,
    causal: bool = False,
    past_len: int = 0,
    device: torch.device | None = None,
) -> Tensor | None:
    """Boolean mask ``[B|1, 1, query_len, key_len]``: True where a query may attend to a key.

    `key_mask` is ``[B, key_len]`` (1 = real token, 0 = padding). With `causal`, query i (at absolute
    position ``past_len + i``) sees keys ``0 .. past_len + i``. Returns None when nothing is masked.
    """
    mask = None
    if key_mask is not None:
        mask = key_mask.bool()[:, None, None, :]
    if causal and past_len < key_len - 1:  # else every query sees every key (e.g. one decoding step)
        q = torch.arange(past_len, past_len + query_len, device=device)[:, None]
        k = torch.arange(key_len, device=device)[None, :]
        tri = (k <= q)[None, None]
        mask = tri if mask is None else mask & tri
    return mask


def mask_to_bias(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """Additive form of a boolean mask: 0 where allowed, the dtype's minimum where not."""
    if mask is None:
        return None
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
        ~mask, torch.finfo(dtype).min
    )


# ----------------------------------------------------------------------------------------------- norms
class RMSNorm(nn.Module):
    """T5's LayerNorm: no mean subtraction, no bias, variance in fp32."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        var = x.float().pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(var + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


def make_norm(cfg: T5Config) -> nn.Module:
    if cfg.family == "megatron":
        return nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_epsilon)
    return RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)



# ------------------------------------------------------------------------------------------- positions
def relative_position_bucket(
    relative_position: Tensor, bidirectional: bool, num_buckets: int, max_distance: int
) -> Tensor:
    """T5's bucketing of ``key_pos - query_pos``: exact for small distances, log-spaced up to
    `max_distance`; bidirectional uses half the buckets per direction."""
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative_position > 0).long() * num_buckets
        n = relative_position.abs()
    else:
        n = (-relative_position).clamp(min=0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    large = max_exact + (
        torch.log(n.float().clamp(min=1) / max_exact)
        / math.log(max_distance / max_exact)
        * (num_buckets - max_exact)
    ).long()
    large = large.clamp(max=num_buckets - 1)
    return buckets + torch.where(is_small, n, large)


class RelativePositionBias(nn.Module):
    """Per-head additive attention bias from bucketed relative positions (computed once per stack)."""

    def __init__(self, cfg: T5Config, bidirectional: bool) -> None:
        super().__init__()
        self.bidirectional = bidirectional
        self.num_buckets = cfg.relative_attention_num_buckets
        self.max_distance = cfg.relative_attention_max_distance
        self.relative_attention_bias = nn.Embedding(self.num_buckets, cfg.num_heads)

    def forward(self, query_len: int, key_len: int, past_len: int = 0) -> Tensor:
        device = self.relative_attention_bias.weight.device
        q = torch.arange(past_len, past_len + query_len, device=device)[:, None]
        k = torch.arange(key_len, device=device)[None, :]
        buckets = relative_position_bucket(k - q, self.bidirectional, self.num_buckets, self.max_distance)
        # [1, H, Q, K], contiguous: attention kernels would otherwise copy this bias in every layer
        return self.relative_attention_bias(buckets).permute(2, 0, 1).contiguous()[None]

    @torch.no_grad()
    def init_locality_prior(self) -> None:
        """Add to the (random) bias table ALiBi's per-head penalty, -slope_h x distance, with slopes
        2^(-8h/H), h = 1..H (Press et al. 2022): the first heads start looking at near neighbours (slope
        1/4 for 4 heads: weight e^-2.5 at 10 residues), the last nearly everywhere. Attention then starts
        local, so the weak neighbour signal of protein sequences has a path from the first step instead
        of first having to be found among uniform weights. The table stays trained; the shape is T5's."""
        w = self.relative_attention_bias.weight  # [buckets, heads]
        heads = w.shape[1]
        offsets = torch.arange(-self.max_distance, self.max_distance + 1)
        buckets = relative_position_bucket(offsets, self.bidirectional, self.num_buckets, self.max_distance)
        distance = torch.full((self.num_buckets,), float(self.max_distance))  # each bucket's nearest offset
        distance.scatter_reduce_(0, buckets, offsets.abs().float(), reduce="amin")
        slopes = 2.0 ** (-8.0 * torch.arange(1, heads + 1) / heads)
        w.sub_((distance[:, None] * slopes[None, :]).to(w.dtype))


class Embeddings(nn.Module):
    """Word embeddings plus, for the megatron family, learned absolute positions. One instance is shared
    by encoder and decoder, as NeMo shares its embedding module (word *and* position tables)."""

    def __init__(self, cfg: T5Config) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.position_embeddings = (
            nn.Embedding(cfg.max_position_embeddings, cfg.d_model) if cfg.absolute_positions else None
        )

    @torch.no_grad()
    def init_positions_sinusoidal(self, std: float) -> None:
        """Start the learned position table from the Transformer's sin/cos table (scaled so each entry has
        RMS `std`, the word table's init): relative offsets are then linear maps of the table, so attention
        can find neighbours from the first steps instead of first having to give random rows a structure.
        The table stays a trained parameter; the architecture does not change."""
        if self.position_embeddings is None:
            raise ValueError("this model has no absolute position table (relative positions)")
        w = self.position_embeddings.weight
        n, d = w.shape
        pos = torch.arange(n, dtype=torch.float64)[:, None]
        freq = torch.exp(-math.log(10000.0) * torch.arange(0, d, 2, dtype=torch.float64) / d)
        table = torch.zeros(n, d, dtype=torch.float64)
        table[:, 0::2] = torch.sin(pos * freq)
        table[:, 1::2] = torch.cos(pos * freq)[:, : d // 2]
        w.copy_(table * (std * math.sqrt(2)))

    def forward(self, input_ids: Tensor, past_len: int = 0) -> Tensor:
        x = self.word_embeddings(input_ids)
        if self.position_embeddings is not None:
            n = input_ids.shape[1]
            if past_len + n > self.position_embeddings.num_embeddings:
                raise ValueError(
                    f"sequence of {past_len + n} tokens exceeds the model's "
                    f"{self.position_embeddings.num_embeddings} positions"
                )
            pos = torch.arange(past_len, past_len + n, device=input_ids.device)
            x = x + self.position_embeddings(pos)[None]
        return x




# ------------------------------------------------------------------------------------------- attention
def split_heads(x: Tensor, n: int, num_heads: int, d_kv: int) -> tuple[Tensor, ...]:
    """``[B, S, n*H*D]`` -> n tensors ``[B, H, S, D]``: a fused projection's rows are ``[q; k; v]`` (n = 3,
    self-attention) or ``[k; v]`` (n = 2, cross-attention), each ``[heads, d_kv]``."""
    b, s, _ = x.shape
    return x.view(b, s, n, num_heads, d_kv).permute(2, 0, 3, 1, 4).unbind(0)


def merge_heads(x: Tensor) -> Tensor:
    """``[B, H, S, D]`` -> ``[B, S, H*D]``."""
    return x.transpose(1, 2).flatten(2)


def attention_probs(q: Tensor, k: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    """softmax(q kᵀ · scale + mask) in fp32, then q's dtype; `mask` boolean (True = attend) or additive."""
    scores = torch.matmul(q * scale if scale != 1.0 else q, k.transpose(-1, -2))
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + mask
    return torch.softmax(scores, -1, dtype=torch.float32).to(q.dtype)


def attend(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, dropout_p: float = 0.0, *, few: bool = False
) -> Tensor:
    """softmax(q kᵀ · scale + mask) v for ``[B, H, S, d_kv]`` tensors; `mask` boolean (True = attend) or
    additive. SDPA, except with `few` queries (incremental decoding: a handful of new tokens, where SDPA's
    kernels cost more to set up than the arithmetic): matmul, fp32 softmax, matmul."""
    if not few:
        if mask is not None and mask.dtype != torch.bool:
            mask = mask.to(q.dtype)  # an additive float bias must match the query dtype (autocast)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
    return torch.matmul(F.dropout(attention_probs(q, k, mask, scale), dropout_p, training=dropout_p > 0), v)


class Attention(nn.Module):
    """What :class:`SelfAttention` and :class:`EncDecAttention` share: heads, scale, attention dropout."""

    def __init__(self, cfg: T5Config) -> None:
        super().__init__()
        self.num_heads, self.d_kv = cfg.num_heads, cfg.d_kv
        self.scale = cfg.attention_scale
        self.dropout = cfg.attention_dropout_rate

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, few: bool) -> Tensor:
        """:func:`attend` with this module's scale and (in training) attention dropout."""
        return attend(q, k, v, mask, self.scale, self.dropout if self.training else 0.0, few=few)


class SelfAttention(Attention):
    """Multi-head self-attention with one fused projection `qkv` (rows ``[q; k; v]``, see
    :func:`split_heads`) and the output projection `o`. In the decoder the mask is causal, and with a
    :class:`LayerCache` only the new tokens come in; earlier keys/values are read from the cache."""

    def __init__(self, cfg: T5Config) -> None:
        super().__init__(cfg)
        inner = cfg.num_heads * cfg.d_kv
        self.qkv = nn.Linear(cfg.d_model, 3 * inner, bias=cfg.uses_bias)
        self.o = nn.Linear(inner, cfg.d_model, bias=cfg.uses_bias)

    def forward(self, x: Tensor, mask: Tensor | None, cache: LayerCache | None = None) -> Tensor:
        q, k, v = split_heads(self.qkv(x), 3, self.num_heads, self.d_kv)
        if cache is not None:
            k, v = cache.append(k, v)
        return self.o(merge_heads(self.attend(q, k, v, mask, few=cache is not None)))


class EncDecAttention(Attention):
    """Multi-head cross-attention of decoder tokens to the encoder states (`memory`): query projection `q`,
    fused key/value projection `kv` (rows ``[k; v]``), output `o`. The keys/values are computed once per
    input and kept in the :class:`LayerCache`. `memory` may have B rows for ``B * g`` decoder rows (g
    consecutive beams or samples per input): its keys/values are then repeated for each row."""

    def __init__(self, cfg: T5Config) -> None:
        super().__init__(cfg)
        inner = cfg.num_heads * cfg.d_kv
        self.q = nn.Linear(cfg.d_model, inner, bias=cfg.uses_bias)
        self.kv = nn.Linear(cfg.d_model, 2 * inner, bias=cfg.uses_bias)
        self.o = nn.Linear(inner, cfg.d_model, bias=cfg.uses_bias)

    def keys_values(self, memory: Tensor, cache: LayerCache | None) -> tuple[Tensor, Tensor]:
        """The keys/values of `memory` (from `cache` when it holds them already)."""
        if cache is not None and cache.cross is not None:
            return cache.cross
        k, v = split_heads(self.kv(memory), 2, self.num_heads, self.d_kv)
        return cache.set_cross(k, v) if cache is not None else (k, v)

    def forward(self, x: Tensor, mask: Tensor | None, memory: Tensor, cache: LayerCache | None = None) -> Tensor:
        (q,) = split_heads(self.q(x), 1, self.num_heads, self.d_kv)
        k, v = self.keys_values(memory, cache)
        if q.shape[0] != k.shape[0]:  # g decoder rows (beams, samples) per encoder row
            k, v, mask = self.repeat_memory(q.shape[0] // k.shape[0], k, v, mask)
        return self.o(merge_heads(self.attend(q, k, v, mask, few=cache is not None)))

    def repeat_memory(
        self, group: int, k: Tensor, v: Tensor, mask: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Keys, values and mask for `group` consecutive decoder rows per encoder row: each row its copy."""
        k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
        return k, v, (mask.repeat_interleave(group, 0) if mask is not None and mask.shape[0] > 1 else mask)


class MLP(nn.Module):
    """Position-wise feed-forward: `wi` -> activation -> `wo` (gated variants: `wi_0` * act(`wi_1`)...)."""

    def __init__(self, cfg: T5Config) -> None:
        super().__init__()
        bias = cfg.uses_bias
        self.gated = cfg.activation.startswith("gated-")
        act = cfg.activation.removeprefix("gated-")
        if self.gated:
            self.wi_0 = nn.Linear(cfg.d_model, cfg.d_ff, bias=bias)
            self.wi_1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=bias)
        else:
            self.wi = nn.Linear(cfg.d_model, cfg.d_ff, bias=bias)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=bias)
        self.act = {
            "relu": nn.ReLU(),
            "gelu": nn.GELU(),
            "gelu_tanh": nn.GELU(approximate="tanh"),
        }[act if act != "gelu" or not self.gated else "gelu_tanh"]  # HF gated-gelu is the tanh form
        self.dropout = nn.Dropout(cfg.dropout_rate) if cfg.family == "t5" else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        if self.gated:
            h = self.act(self.wi_0(x)) * self.wi_1(x)
        else:
            h = self.act(self.wi(x))
        return self.wo(self.dropout(h))


class Block(nn.Module):
    """One pre-norm layer: self-attention, (decoder) cross-attention, MLP, each as x + drop(f(norm(x))).
    (Attribute names are those of the native checkpoint keys: `self_attention` is HF's ``SelfAttention``,
    `cross_attention` its ``EncDecAttention``.)"""

    def __init__(self, cfg: T5Config, is_decoder: bool) -> None:
        super().__init__()
        self.self_attn_norm = make_norm(cfg)
        self.self_attention = SelfAttention(cfg)
        if is_decoder:
            self.cross_attn_norm = make_norm(cfg)
            self.cross_attention = EncDecAttention(cfg)
        self.mlp_norm = make_norm(cfg)
        self.mlp = MLP(cfg)
        self.dropout = nn.Dropout(cfg.dropout_rate)

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None,
        memory: Tensor | None = None,
        memory_mask: Tensor | None = None,
        cache: LayerCache | None = None,
    ) -> Tensor:
        x = x + self.dropout(self.self_attention(self.self_attn_norm(x), mask, cache))
        if memory is not None:
            x = x + self.dropout(self.cross_attention(self.cross_attn_norm(x), memory_mask, memory, cache))
        return x + self.dropout(self.mlp(self.mlp_norm(x)))


class Stack(nn.Module):
    """The encoder or decoder: blocks plus a final norm (and, for `t5`, the shared relative bias)."""

    def __init__(self, cfg: T5Config, num_layers: int, is_decoder: bool) -> None:
        super().__init__()
        self.is_decoder = is_decoder
        self.relative_bias = (
            RelativePositionBias(cfg, bidirectional=not is_decoder) if not cfg.absolute_positions else None
        )
        self.blocks = nn.ModuleList(Block(cfg, is_decoder) for _ in range(num_layers))
        self.final_layer_norm = make_norm(cfg)
        self.dropout = nn.Dropout(cfg.dropout_rate)

    def masks(
        self, q_len: int, key_mask: Tensor | None, memory: Tensor | None, memory_mask: Tensor | None,
        past_len: int, like: Tensor,
    ) -> tuple[Tensor | None, Tensor | None]:  # fmt: skip
        """The self-attention mask (boolean, or additive with the relative position bias) and the
        cross-attention mask, for `q_len` queries after `past_len` cached tokens."""
        k_len = past_len + q_len
        mask = attention_mask(key_mask, q_len, k_len, causal=self.is_decoder, past_len=past_len, device=like.device)
        if self.relative_bias is not None:
            bias = self.relative_bias(q_len, k_len, past_len).to(like.dtype)
            add = mask_to_bias(mask, like.dtype)
            mask = bias if add is None else bias + add
        cross = attention_mask(memory_mask, q_len, memory.shape[1]) if memory is not None else None
        return mask, cross

    def forward(
        self,
        x: Tensor,
        key_mask: Tensor | None,
        memory: Tensor | None = None,
        memory_mask: Tensor | None = None,
        cache: DecoderCache | None = None,
        past_len: int = 0,
    ) -> Tensor:
        mask, cross = self.masks(x.shape[1], key_mask, memory, memory_mask, past_len, x)
        x = self.dropout(x)
        for i, block in enumerate(self.blocks):
            x = block(x, mask, memory, cross, cache[i] if cache is not None else None)
        return self.dropout(self.final_layer_norm(x))

    def hidden_states(self, x: Tensor, key_mask: Tensor | None, layers: Sequence[int]) -> list[Tensor]:
        """(Encoder) the states after each of `layers`, in that order: 0 = the input `x`, k = block k's
        output, ``len(blocks)`` = :meth:`forward`'s output (after the final norm). Blocks above the highest
        layer asked for are not run."""
        mask, _ = self.masks(x.shape[1], key_mask, None, None, 0, x)
        x = self.dropout(x)
        wanted, n = set(layers), len(self.blocks)
        kept = {0: x} if 0 in wanted else {}
        for k in range(1, max(layers) + 1):
            x = self.blocks[k - 1](x, mask)
            if k in wanted:
                kept[k] = self.dropout(self.final_layer_norm(x)) if k == n else x
        return [kept[k] for k in layers]


# ----------------------------------------------------------------------------------------------- model
class T5Model(nn.Module):
    """Encoder-decoder with a language-model head.

    * :meth:`encode` -- the encoder's final hidden states (what embeddings are made of).
    * :meth:`decode` -- decoder hidden states, optionally incremental with a :class:`DecoderCache`.
    * :meth:`lm_logits` -- vocabulary logits from decoder hidden states.
    * :meth:`forward` -- teacher-forced logits for training.
    """

    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.encoder = Stack(config, config.num_layers, is_decoder=False)
        self.decoder = (
            Stack(config, config.num_decoder_layers, is_decoder=True) if config.num_decoder_layers else None
        )
        if self.decoder is not None:
            if config.family == "megatron":
                self.lm_head_bias = nn.Parameter(torch.zeros(config.vocab_size))
            elif not config.tie_word_embeddings:
                self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.reset_parameters()

    # --------------------------------------------------------------------------------- initialisation
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Megatron: normal(std) everywhere, output projections std/sqrt(2L), zero biases. t5: HF's
        fan-in scaled normals."""
        cfg = self.config
        std = cfg.initializer_std
        for name, p in self.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if "norm" in name:
                (p.fill_(1.0) if leaf == "weight" else p.zero_())
            elif leaf == "bias" or name == "lm_head_bias":
                p.zero_()
            elif cfg.family == "megatron":
                out_proj = name.endswith(("o.weight", "wo.weight"))
                p.normal_(0.0, std / math.sqrt(2 * max(cfg.num_layers, 1)) if out_proj else std)
            else:
                fan_in = p.shape[1] if p.dim() == 2 and "embeddings" not in name else 1
                if name.endswith("relative_attention_bias.weight"):
                    fan_in = cfg.d_model
                p.normal_(0.0, std * fan_in**-0.5)

    def init_locality_prior(self) -> None:
        """Start every relative attention bias local (see :meth:`RelativePositionBias.init_locality_prior`)."""
        biases = [m for m in self.modules() if isinstance(m, RelativePositionBias)]
        if not biases:
            raise ValueError("this model has no relative attention bias (absolute positions)")
        for bias in biases:
            bias.init_locality_prior()

    # ------------------------------------------------------------------------------------ inference
    def encode(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Encoder hidden states ``[B, S, d_model]`` after the final norm. `attention_mask`: 1 = real."""
        return self.encoder(self.embeddings(input_ids), attention_mask)

    def encode_layers(self, input_ids: Tensor, attention_mask: Tensor | None, layers: Sequence[int]) -> list[Tensor]:
        """Encoder hidden states ``[B, S, d_model]`` after each of `layers` (indexes from
        :meth:`T5Config.encoder_layers`: 0 = the embedding output, k = block k's output, ``num_layers`` =
        :meth:`encode`'s output, after the final norm -- Hugging Face's ``hidden_states`` numbering)."""
        return self.encoder.hidden_states(self.embeddings(input_ids), attention_mask, layers)

    def decode(
        self,
        decoder_input_ids: Tensor,
        encoder_hidden: Tensor,
        encoder_mask: Tensor | None = None,
        decoder_mask: Tensor | None = None,
        cache: DecoderCache | None = None,
    ) -> Tensor:
        """Decoder hidden states for `decoder_input_ids`. With `cache` (from :meth:`new_cache`), only the
        new tokens are passed in and earlier keys/values are reused. `encoder_hidden` (and `encoder_mask`)
        may have B rows for ``B * g`` decoder rows: g consecutive rows (beams, samples) per encoder input."""
        if self.decoder is None:
            raise RuntimeError("this model has no decoder (encoder-only checkpoint)")
        past = cache.length if cache is not None else 0
        x = self.embeddings(decoder_input_ids, past_len=past)
        return self.decoder(x, decoder_mask, encoder_hidden, encoder_mask, cache=cache, past_len=past)

    def new_cache(self, capacity: int | None = None) -> DecoderCache:
        """An empty :class:`DecoderCache`; `capacity` presizes it to that many decoder tokens."""
        return DecoderCache(self.config.num_decoder_layers, capacity)

    def lm_logits(self, decoder_hidden: Tensor) -> Tensor:
        cfg = self.config
        if cfg.family == "megatron":
            return F.linear(decoder_hidden, self.embeddings.word_embeddings.weight, self.lm_head_bias)
        if cfg.tie_word_embeddings:
            return F.linear(decoder_hidden * cfg.d_model**-0.5, self.embeddings.word_embeddings.weight)
        return self.lm_head(decoder_hidden)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None,
        decoder_input_ids: Tensor,
        decoder_attention_mask: Tensor | None = None,
        encoder_logits: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Teacher-forced logits ``[B, S_dec, vocab]``; with `encoder_logits`, also the LM head applied to
        the encoder's states ``[B, S_enc, vocab]`` (pretraining's auxiliary encoder loss)."""
        enc = self.encode(input_ids, attention_mask)
        logits = self.lm_logits(self.decode(decoder_input_ids, enc, attention_mask, decoder_attention_mask))
        return (logits, self.lm_logits(enc)) if encoder_logits else logits

    # ---------------------------------------------------------------------------------------- info
    def num_parameters(self) -> int:
        """Unique parameters (tied tables counted once)."""
        return sum(p.numel() for p in self.parameters())

    def describe(self) -> dict[str, Any]:
        return {**self.config.to_dict(), "parameters": self.num_parameters()}


def weight_dtypes(model: nn.Module, dtype: torch.dtype) -> dict[str, torch.dtype]:
    """The dtype each floating parameter is stored in when the model computes in `dtype`: `dtype`, except
    the parameters of ``nn.LayerNorm`` (megatron family), which stay float32 so that the normalisation keeps
    float32 accuracy (PyTorch's LayerNorm takes a half input with float32 weights)."""
    norms = {f"{name}.{p}" if name else p for name, m in model.named_modules() if isinstance(m, nn.LayerNorm)
             for p, _ in m.named_parameters(recurse=False)}  # fmt: skip
    return {name: torch.float32 if name in norms else dtype for name, p in model.named_parameters()
            if p.is_floating_point()}  # fmt: skip


def cast_weights(model: nn.Module, dtype: torch.dtype) -> None:
    """Store the weights as :func:`weight_dtypes` says, in place (half the memory in bf16/fp16 and no per-call
    casts: about 15% faster than autocast over float32 weights on CPU)."""
    targets = weight_dtypes(model, dtype)
    for name, p in model.named_parameters():
        if name in targets and p.dtype != targets[name]:
            p.data = p.data.to(targets[name])


def count_parameters(config: T5Config) -> int:
    """Parameter count of a configuration without allocating its weights."""
    with torch.device("meta"):
        return T5Model(config).num_parameters()
