"""`FitOptions`: the head and optimisation settings of a downstream run (torch-free, so the command line
derives its flags and their defaults from it without loading the model stack)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..data.batching import DEFAULT_BATCH_TOKENS
from ..errors import ConfigError

#: LoRA target names (``--lora-targets``) -> the encoder projections they adapt. The attention's q, k and v
#: are one fused projection (``qkv``, rows ``[q; k; v]``), so they are adapted together (one low-rank
#: update of the fused matrix, as peft adapts GPT-2's fused ``c_attn``): name all three, or ``qkv``.
LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "q": ("self_attention.qkv",), "k": ("self_attention.qkv",), "v": ("self_attention.qkv",),
    "qkv": ("self_attention.qkv",), "o": ("self_attention.o",),
    "wi": ("mlp.wi", "mlp.wi_0", "mlp.wi_1"), "wo": ("mlp.wo",),
}  # fmt: skip


@dataclass
class FitOptions:
    """Head and optimisation settings (CLI flags map onto these)."""

    head: str = "mlp"
    hidden: int | None = None  # default: 256 (mlp), 32 (cnn, BioNeMo's cnn_dim)
    dropout: float = 0.25
    lr: float | None = None  # default: 1e-3 frozen, 1e-4 fine-tuning, 3e-4 LoRA (the head gets head_lr_scale x)
    weight_decay: float = 0.0
    batch_size: int = 64  # proteins per batch
    max_epochs: int = 100
    patience: int = 10  # epochs without a better val score before stopping
    class_weights: bool = False  # "balanced": n / (classes * count)
    seed: int = 0
    # fine-tuning
    finetune: bool = False
    unfreeze_layers: int | None = None  # top N encoder blocks trained (None: all)
    batch_tokens: int = DEFAULT_BATCH_TOKENS
    warmup_steps: int = 0
    max_steps: int | None = None
    head_lr_scale: float = 10.0
    # LoRA (peft): adapters on the frozen encoder's projections
    lora: bool = False
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: str = "q,k,v,o"

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_epochs", "patience", "batch_tokens"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.unfreeze_layers is not None and self.unfreeze_layers < 0:
            raise ConfigError(f"unfreeze_layers must be >= 0, got {self.unfreeze_layers}")
        if self.lora:
            if self.finetune:
                raise ConfigError("--lora trains adapters on the frozen encoder, --finetune the encoder: choose one")
            if self.unfreeze_layers is not None:
                raise ConfigError("--unfreeze-layers is for --finetune; --lora keeps every encoder weight frozen")
            if self.lora_rank <= 0 or self.lora_alpha <= 0:
                raise ConfigError(f"lora_rank and lora_alpha must be positive, got {self.lora_rank}, {self.lora_alpha}")
            self.lora_modules()  # checks the target names

    @property
    def trains_encoder(self) -> bool:
        """Whether training runs through the encoder (full fine-tuning or LoRA) rather than on features."""
        return self.finetune or self.lora

    def lora_modules(self) -> list[str]:
        """The encoder projections (names inside a block, e.g. ``self_attention.qkv``) `lora_targets` adapt."""
        names = [t.strip() for t in self.lora_targets.split(",") if t.strip()]
        unknown = [t for t in names if t not in LORA_TARGETS]
        if unknown or not names:
            raise ConfigError(f"lora_targets {self.lora_targets!r}: choose from {', '.join(LORA_TARGETS)}")
        qkv = {"q", "k", "v"} & set(names)
        if qkv and qkv != {"q", "k", "v"}:
            raise ConfigError(f"lora_targets {self.lora_targets!r}: q, k and v are one fused projection in this "
                              "model; name all three (or qkv)")  # fmt: skip
        return sorted({m for t in names for m in LORA_TARGETS[t]})

    def lora_spec(self) -> dict[str, Any]:
        """What a LoRA predictor records to rebuild its adapters: rank, alpha and the adapted projections."""
        return {"rank": self.lora_rank, "alpha": self.lora_alpha, "modules": self.lora_modules()}

    @property
    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        return 1e-4 if self.finetune else 3e-4 if self.lora else 1e-3

    def hidden_size(self) -> int:
        return self.hidden if self.hidden is not None else (32 if self.head == "cnn" else 256)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
