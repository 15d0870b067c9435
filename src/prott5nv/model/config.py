"""`T5Config`: every setting of the network, the named presets, and how a family fixes the details.

Two families share one implementation (model/t5.py):

* ``megatron`` -- ProtT5nv as NeMo's Megatron T5 built it: learned absolute positions (one table shared
  by encoder and decoder), pre-LayerNorm with bias, GELU (tanh form when NeMo's bias-GELU fusion was on),
  biases in every linear layer, attention scaled by 1/sqrt(d_kv), LM head tied to the word table plus an
  output bias.
* ``t5`` -- HF / Rostlab ProtT5: relative position buckets, RMSNorm, ReLU or gated-GELU, no biases,
  unscaled attention, LM head tied (with the d_model**-0.5 rescale) or separate.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError

FAMILIES = ("megatron", "t5")
ACTIVATIONS = ("gelu_tanh", "gelu", "relu", "gated-gelu", "gated-relu")


def dataclass_from_dict(cls: type[Any], d: dict[str, Any], what: str) -> Any:
    """`cls(**d)`, refusing unknown keys with a ConfigError that lists them ("unknown {what}: ...")."""
    unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ConfigError(f"unknown {what}: {', '.join(unknown)}")
    return cls(**d)


@dataclass
class T5Config:
    family: str = "megatron"
    vocab_size: int = 128
    d_model: int = 768
    d_ff: int = 3072
    num_heads: int = 12
    d_kv: int = 64
    num_layers: int = 12
    num_decoder_layers: int = 12
    activation: str = "gelu_tanh"
    layer_norm_epsilon: float = 1e-5
    dropout_rate: float = 0.1
    attention_dropout_rate: float = 0.1
    initializer_std: float = 0.015
    # megatron: learned absolute positions
    max_position_embeddings: int = 512
    # t5: relative position buckets
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    # t5: LM head tied to the input embedding (then the decoder output is scaled by d_model**-0.5)
    tie_word_embeddings: bool = True
    # sequence lengths used by training and by default inference limits
    seq_length: int = 512
    seq_length_dec: int = 256
    extra: dict[str, Any] = field(default_factory=dict)  # provenance (e.g. the source .nemo config)

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ConfigError(f"unknown model family {self.family!r}; choose one of {FAMILIES}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"unknown activation {self.activation!r}; choose one of {ACTIVATIONS}")
        for name in ("vocab_size", "d_model", "d_ff", "num_heads", "d_kv", "num_layers"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_decoder_layers < 0:
            raise ConfigError("num_decoder_layers must be >= 0 (0 = encoder only)")
        if self.family == "megatron" and self.seq_length > self.max_position_embeddings:
            raise ConfigError(
                f"seq_length {self.seq_length} exceeds max_position_embeddings {self.max_position_embeddings}"
            )

    # Details fixed by the family -------------------------------------------------------------------
    @property
    def uses_bias(self) -> bool:
        return self.family == "megatron"

    @property
    def absolute_positions(self) -> bool:
        return self.family == "megatron"

    @property
    def attention_scale(self) -> float:
        return self.d_kv**-0.5 if self.family == "megatron" else 1.0

    @property
    def max_length(self) -> int | None:
        """Longest encoder input the model can take (None: relative positions have no hard limit)."""
        return self.max_position_embeddings if self.absolute_positions else None

    def encoder_layers(self, layers: int | Sequence[int]) -> tuple[int, ...]:
        """Encoder layer numbers (fair-esm's ``repr_layers`` convention) as indexes ``0..num_layers``:
        0 is the embedding output, k the output of block k, ``num_layers`` (or -1) the encoder's output
        after its final norm (what embeddings are by default); negative numbers count from the end
        (``-1`` = ``num_layers``, ``-(num_layers + 1)`` = 0). Out of range or repeated layers are refused."""
        given = [layers] if isinstance(layers, int) else list(layers)
        n = self.num_layers
        if not given:
            raise ConfigError("no layer given")
        out: list[int] = []
        for k in given:
            if isinstance(k, bool) or not isinstance(k, int) or not -(n + 1) <= k <= n:
                raise ConfigError(f"layer {k!r} is not a layer of this {n}-layer encoder: use 0..{n} or "
                                  f"-{n + 1}..-1 (0 = the embedding output, -1 = the last, after its final norm)")
            k = k % (n + 1)
            if k in out:
                raise ConfigError(f"layer {k} is given twice (negative numbers count from the end: -1 = {n})")
            out.append(k)
        return tuple(out)

    # Serialisation -----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> T5Config:
        return dataclass_from_dict(cls, d, "model config keys")

    def replace(self, **changes: Any) -> T5Config:
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, T5Config] = {
    # Tests and smoke runs: a few hundred thousand parameters.
    "tiny": T5Config(d_model=64, d_ff=256, num_heads=4, d_kv=16, num_layers=2, num_decoder_layers=2),
    # The demo model's shape: trainable on a laptop CPU in hours.
    "small": T5Config(d_model=256, d_ff=1024, num_heads=4, d_kv=64, num_layers=6, num_decoder_layers=2),
    # ProtT5nv as published (BioNeMo 23.06): 12+12 layers, hidden 768, FFN 3072, 12 heads.
    "prott5nv-base": T5Config(),
    # Rostlab ProtT5-XL-UniRef50 shape (HF T5, relu, 24+24 layers, d_model 1024, 32 heads of 128).
    "prot_t5_xl": T5Config(
        family="t5", d_model=1024, d_ff=16384, num_heads=32, d_kv=128, num_layers=24, num_decoder_layers=24,
        activation="relu", layer_norm_epsilon=1e-6, dropout_rate=0.1, attention_dropout_rate=0.1,
        initializer_std=1.0, max_position_embeddings=0,
    ),
}  # fmt: skip


def preset(name: str) -> T5Config:
    """A copy of the named preset (see :data:`PRESETS`)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name], extra={})
