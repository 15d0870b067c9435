"""Optimizer and learning-rate schedule of the ProtT5nv recipe (docs/training.md).

AdamW (decoupled weight decay, as apex FusedAdam's default adam_w_mode), decay 0.01 on weights and
embeddings and none on norm parameters and biases (NeMo's `get_params_for_weight_decay_optimization`);
NeMo's InverseSquareRootAnnealing for the learning rate.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..model.t5 import RMSNorm
from .config import TrainConfig

_NORMS = (nn.LayerNorm, RMSNorm)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decayed (linear weights, embeddings) and not (norm parameters, every bias)."""
    no_decay: set[int] = set()
    for module in model.modules():
        if isinstance(module, _NORMS):
            no_decay.update(id(p) for p in module.parameters(recurse=False))
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("bias", "lm_head_bias"):  # NeMo: "any param named bias" (tokens_head.bias included)
            no_decay.add(id(p))
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if id(p) not in no_decay], "weight_decay": weight_decay},
        {"params": [p for p in params if id(p) in no_decay], "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay
    )


def inverse_sqrt_lr(step: int, base_lr: float, warmup: int, max_steps: int, min_lr: float = 0.0) -> float:
    """NeMo InverseSquareRootAnnealing at optimizer step `step` (0-based):
    ``base*(step+1)/(W+1)`` while step <= W, then ``base*sqrt((W+1)/(step+1))``; `min_lr` only after
    `max_steps` (no floor during the decay)."""
    if step <= warmup:
        return base_lr * (step + 1) / (warmup + 1)
    if step > max_steps:
        return min_lr
    return base_lr * math.sqrt((warmup + 1) / (step + 1))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
