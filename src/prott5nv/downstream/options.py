"""`FitOptions`: the head and optimisation settings of a downstream run (torch-free, so the command line
derives its flags and their defaults from it without loading the model stack)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..data.batching import DEFAULT_BATCH_TOKENS
from ..errors import ConfigError


@dataclass
class FitOptions:
    """Head and optimisation settings (CLI flags map onto these)."""

    head: str = "mlp"
    hidden: int | None = None  # default: 256 (mlp), 32 (cnn, BioNeMo's cnn_dim)
    dropout: float = 0.25
    lr: float | None = None  # default: 1e-3 frozen, 1e-4 fine-tuning (the head gets head_lr_scale x)
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

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_epochs", "patience", "batch_tokens"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.unfreeze_layers is not None and self.unfreeze_layers < 0:
            raise ConfigError(f"unfreeze_layers must be >= 0, got {self.unfreeze_layers}")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (1e-4 if self.finetune else 1e-3)

    def hidden_size(self) -> int:
        return self.hidden if self.hidden is not None else (32 if self.head == "cnn" else 256)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
