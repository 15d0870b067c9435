"""The T5 encoder-decoder, both families (see model/config.py), in one readable module.

Data flow: ids -> Embeddings -> Stack(encoder) -> hidden states; decoder ids -> Embeddings ->
Stack(decoder, cross-attending to the encoder) -> lm_logits. All attention goes through
``torch.nn.functional.scaled_dot_product_attention``; the masks it receives are built in one place,
:func:`attention_mask`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import T5Config

# A decoder cache: one dict per decoder layer holding self-attention keys/values ("k", "v") that grow
# with every decoded token, and cross-attention keys/values ("ck", "cv") computed once from the encoder.
DecoderCache = list[dict[str, Tensor]]


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
    if causal:
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
        return self.relative_attention_bias(buckets).permute(2, 0, 1)[None]  # [1, H, Q, K]


class Embeddings(nn.Module):
    """Word embeddings plus, for the megatron family, learned absolute positions. One instance is shared
    by encoder and decoder, as NeMo shares its embedding module (word *and* position tables)."""

    def __init__(self, cfg: T5Config) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.position_embeddings = (
            nn.Embedding(cfg.max_position_embeddings, cfg.d_model) if cfg.absolute_positions else None
        )

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
class Attention(nn.Module):
    """Multi-head attention. Self-attention uses one fused projection `qkv` whose rows are
    ``[q; k; v]`` (each ``[heads, d_kv]``); cross-attention has `q` and a fused `kv`."""

    def __init__(self, cfg: T5Config, cross: bool = False) -> None:
        super().__init__()
        self.cross = cross
        self.num_heads, self.d_kv = cfg.num_heads, cfg.d_kv
        inner = cfg.num_heads * cfg.d_kv
        bias = cfg.uses_bias
        if cross:
            self.q = nn.Linear(cfg.d_model, inner, bias=bias)
            self.kv = nn.Linear(cfg.d_model, 2 * inner, bias=bias)
        else:
            self.qkv = nn.Linear(cfg.d_model, 3 * inner, bias=bias)
        self.o = nn.Linear(inner, cfg.d_model, bias=bias)
        self.scale = cfg.attention_scale
        self.dropout = cfg.attention_dropout_rate

    def _heads(self, x: Tensor, n: int) -> Tensor:
        """[B, S, n*H*D] -> n tensors of [B, H, S, D]."""
        b, s, _ = x.shape
        return x.view(b, s, n, self.num_heads, self.d_kv).permute(2, 0, 3, 1, 4).unbind(0)

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None,
        memory: Tensor | None = None,
        cache: dict[str, Tensor] | None = None,
    ) -> Tensor:
        if self.cross:
            (q,) = self._heads(self.q(x), 1)
            if cache is not None and "ck" in cache:
                k, v = cache["ck"], cache["cv"]
            else:
                k, v = self._heads(self.kv(memory), 2)
                if cache is not None:
                    cache["ck"], cache["cv"] = k, v
        else:
            q, k, v = self._heads(self.qkv(x), 3)
            if cache is not None:
                if "k" in cache:
                    k = torch.cat([cache["k"], k], dim=2)
                    v = torch.cat([cache["v"], v], dim=2)
                cache["k"], cache["v"] = k, v
        if mask is not None and mask.dtype != torch.bool:
            mask = mask.to(q.dtype)  # an additive float bias must match the query dtype (autocast)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0, scale=self.scale
        )
        b, _, s, _ = out.shape
        return self.o(out.transpose(1, 2).reshape(b, s, self.num_heads * self.d_kv))


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
    """One pre-norm layer: self-attention, (decoder) cross-attention, MLP, each as x + drop(f(norm(x)))."""

    def __init__(self, cfg: T5Config, is_decoder: bool) -> None:
        super().__init__()
        self.self_attn_norm = make_norm(cfg)
        self.self_attention = Attention(cfg)
        if is_decoder:
            self.cross_attn_norm = make_norm(cfg)
            self.cross_attention = Attention(cfg, cross=True)
        self.mlp_norm = make_norm(cfg)
        self.mlp = MLP(cfg)
        self.dropout = nn.Dropout(cfg.dropout_rate)

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None,
        memory: Tensor | None = None,
        memory_mask: Tensor | None = None,
        cache: dict[str, Tensor] | None = None,
    ) -> Tensor:
        x = x + self.dropout(self.self_attention(self.self_attn_norm(x), mask, cache=cache))
        if memory is not None:
            x = x + self.dropout(
                self.cross_attention(self.cross_attn_norm(x), memory_mask, memory=memory, cache=cache)
            )
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

    def forward(
        self,
        x: Tensor,
        key_mask: Tensor | None,
        memory: Tensor | None = None,
        memory_mask: Tensor | None = None,
        cache: DecoderCache | None = None,
        past_len: int = 0,
    ) -> Tensor:
        q_len = x.shape[1]
        k_len = past_len + q_len
        mask = attention_mask(key_mask, q_len, k_len, causal=self.is_decoder, past_len=past_len, device=x.device)
        if self.relative_bias is not None:
            bias = self.relative_bias(q_len, k_len, past_len).to(x.dtype)
            add = mask_to_bias(mask, x.dtype)
            mask = bias if add is None else bias + add
        cross = attention_mask(memory_mask, q_len, memory.shape[1]) if memory is not None else None
        x = self.dropout(x)
        for i, block in enumerate(self.blocks):
            x = block(x, mask, memory, cross, cache[i] if cache is not None else None)
        return self.dropout(self.final_layer_norm(x))


# ----------------------------------------------------------------------------------------------- model
class T5Model(nn.Module):
    """Encoder-decoder with a language-model head.

    * :meth:`encode` -- the encoder's final hidden states (what embeddings are made of).
    * :meth:`decode` -- decoder hidden states, optionally incremental with a :data:`DecoderCache`.
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

    # ------------------------------------------------------------------------------------ inference
    def encode(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Encoder hidden states ``[B, S, d_model]`` after the final norm. `attention_mask`: 1 = real."""
        return self.encoder(self.embeddings(input_ids), attention_mask)

    def decode(
        self,
        decoder_input_ids: Tensor,
        encoder_hidden: Tensor,
        encoder_mask: Tensor | None = None,
        decoder_mask: Tensor | None = None,
        cache: DecoderCache | None = None,
    ) -> Tensor:
        """Decoder hidden states for `decoder_input_ids`. With `cache` (from :meth:`new_cache`), only the
        new tokens are passed in and earlier keys/values are reused."""
        if self.decoder is None:
            raise RuntimeError("this model has no decoder (encoder-only checkpoint)")
        past = cache[0]["k"].shape[2] if cache and "k" in cache[0] else 0
        x = self.embeddings(decoder_input_ids, past_len=past)
        return self.decoder(x, decoder_mask, encoder_hidden, encoder_mask, cache=cache, past_len=past)

    def new_cache(self) -> DecoderCache:
        return [{} for _ in range(self.config.num_decoder_layers)]

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
    ) -> Tensor:
        """Teacher-forced logits ``[B, S_dec, vocab]``."""
        enc = self.encode(input_ids, attention_mask)
        return self.lm_logits(self.decode(decoder_input_ids, enc, attention_mask, decoder_attention_mask))

    # ---------------------------------------------------------------------------------------- info
    def num_parameters(self) -> int:
        """Unique parameters (tied tables counted once)."""
        return sum(p.numel() for p in self.parameters())

    def describe(self) -> dict[str, Any]:
        return {**self.config.to_dict(), "parameters": self.num_parameters()}


def count_parameters(config: T5Config) -> int:
    """Parameter count of a configuration without allocating its weights."""
    with torch.device("meta"):
        return T5Model(config).num_parameters()
