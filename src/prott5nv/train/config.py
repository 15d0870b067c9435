"""`TrainConfig`: every pretraining setting; CLI flags and YAML keys map 1:1 onto its fields."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError
from ..model.config import dataclass_from_dict
from ..precision import canonical_precision

POSITION_INITS = ("normal", "sinusoidal", "local")
OBJECTIVES = ("span", "denoise", "mixed")  # see data/masking.py


@dataclass
class TrainConfig:
    data: str = ""  # data directory written by `prott5nv preprocess`
    out: str = ""  # run directory
    preset: str = "small"  # model shape (see model/config.py PRESETS)
    model: dict[str, Any] = field(default_factory=dict)  # T5Config overrides, e.g. {"num_layers": 4}
    init_from: str | None = None  # start from these weights (native, .nemo or HF), fresh optimizer
    position_init: str = "normal"  # fresh models: NeMo's normal(std) position table, "sinusoidal", or "local"
    # (t5 family: relative attention bias starts with ALiBi's locality prior)
    max_steps: int = 1000
    max_minutes: float | None = None  # also stop (checkpoint, export) after this much training time
    micro_batch_size: int = 12
    accumulate: int = 1
    global_batch_size: int | None = None  # if set: accumulate = global / (micro * world_size)
    lr: float = 1e-4
    warmup_steps: int | None = None  # default: 1% of max_steps (NeMo warmup_ratio 0.01)
    min_lr: float = 0.0  # used only after max_steps, as NeMo's InverseSquareRootAnnealing does
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    clip_grad: float = 1.0
    precision: str = "float32"  # float32 | bfloat16 | float16 (fp32 / bf16 / fp16 accepted: prott5nv.precision)
    dropout: float | None = None  # None: the model config's (0.1)
    seq_length: int = 512
    seq_length_dec: int | None = None  # None: 256 for span corruption, seq_length when rebuilding samples
    masked_lm_prob: float = 0.15
    mean_span_length: float = 1.0
    objective: str = "span"  # span (ProtT5nv's T5 span corruption), denoise (Rostlab's), mixed (see data/masking)
    denoise_fraction: float = 0.5  # mixed: share of samples denoised
    encoder_loss_weight: float = 0.0  # denoise samples: + weight x cross-entropy of every residue predicted
    # from the encoder's own state at its position through the tied LM head (no new parameters)
    seed: int = 1234
    val_every: int = 200
    val_samples: int = 1000  # validation sequences used (the first N of the val split)
    save_every: int = 500
    keep_last: int = 3
    log_every: int = 10
    num_workers: int = 0
    device: str = "auto"
    fsdp: bool = False  # shard parameters, gradients and optimizer state over the torchrun ranks (FSDP2)
    threads: int | None = None  # torch intra-op threads per process (None: PyTorch's default)
    probe_task: str | None = None  # downstream classification task file probed during training (rank 0)
    probe_every: int = 1000  # steps between probes

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # type: ignore[assignment]  # YAML gives lists
        if self.position_init not in POSITION_INITS:
            raise ConfigError(f"position_init {self.position_init!r}: choose one of {', '.join(POSITION_INITS)}")
        if self.encoder_loss_weight < 0:
            raise ConfigError(f"encoder_loss_weight must be >= 0, got {self.encoder_loss_weight}")
        if self.encoder_loss_weight > 0 and self.objective == "span":
            raise ConfigError("encoder_loss_weight needs samples corrupted in place: --objective denoise or mixed")
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"objective {self.objective!r}: choose one of {', '.join(OBJECTIVES)}")
        self.precision = canonical_precision(self.precision)
        for name in ("max_steps", "micro_batch_size", "accumulate", "val_every", "save_every", "keep_last",
                     "log_every", "val_samples", "probe_every"):  # fmt: skip
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.fsdp and self.precision == "float16":
            raise ConfigError("--fsdp with float16: the gradient scaler's overflow checks are per rank; use bf16")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ConfigError(f"max_minutes must be positive, got {self.max_minutes}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be positive, got {self.lr}")
        if self.warmup_steps is not None and not 0 <= self.warmup_steps <= self.max_steps:
            raise ConfigError(f"warmup_steps {self.warmup_steps} must be in [0, max_steps={self.max_steps}]")

    @property
    def warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else int(0.01 * self.max_steps)

    def accumulation_for(self, world_size: int) -> int:
        """Micro-batches per rank per step, checking that the global batch divides evenly."""
        if self.global_batch_size is None:
            return self.accumulate
        per_step = self.micro_batch_size * world_size
        if self.global_batch_size % per_step:
            raise ConfigError(
                f"global_batch_size {self.global_batch_size} is not divisible by micro_batch_size "
                f"{self.micro_batch_size} x {world_size} ranks"
            )
        return self.global_batch_size // per_step

    # ------------------------------------------------------------------------------------- files
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    def save_yaml(self, path: Path) -> None:
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        return dataclass_from_dict(cls, d, "training settings")

    @classmethod
    def from_yaml(cls, path: str | Path) -> dict[str, Any]:
        """The settings in a YAML file (a dict, to be merged with CLI overrides)."""
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"{path}: cannot read config: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of settings")
        return data
