"""Prediction heads on encoder features, per protein ``[B, D]`` or per residue ``[B, L, D]``.

* ``linear`` -- logistic / linear regression
* ``mlp`` -- one hidden layer, ReLU, dropout (BioNeMo's downstream MLP shape)
* ``cnn`` -- per residue only: two 1-D convolutions (kernel 7) with `hidden` (32) channels, ReLU and
  dropout 0.25 between them, as the ProtTrans / BioNeMo secondary-structure head

Inputs are standardized inside the head (feature mean/std of the training set stored as buffers), and
regression targets likewise, so a saved head is self-contained: ``config()`` + ``state_dict()``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import ConfigError
from . import HEADS


class Head(nn.Module):
    def __init__(
        self,
        kind: str,
        in_dim: int,
        out_dim: int,
        *,
        per_residue: bool,
        hidden: int = 256,
        dropout: float = 0.25,
        kernel: int = 7,
    ) -> None:
        super().__init__()
        if kind not in HEADS:
            raise ConfigError(f"unknown head {kind!r}; choose one of {', '.join(HEADS)}")
        if kind == "cnn" and not per_residue:
            raise ConfigError("the cnn head is for per-residue tasks; use linear or mlp per protein")
        self.kind, self.in_dim, self.out_dim, self.per_residue = kind, in_dim, out_dim, per_residue
        self.hidden, self.dropout_p, self.kernel = hidden, dropout, kernel
        self.register_buffer("shift", torch.zeros(in_dim))
        self.register_buffer("scale", torch.ones(in_dim))
        self.register_buffer("y_shift", torch.zeros(out_dim))
        self.register_buffer("y_scale", torch.ones(out_dim))
        if kind == "linear":
            self.net: nn.Module = nn.Linear(in_dim, out_dim)
        elif kind == "mlp":
            self.net = nn.Sequential(
                nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, out_dim)
            )
        else:
            pad = kernel // 2
            self.net = nn.Sequential(
                nn.Conv1d(in_dim, hidden, kernel, padding=pad), nn.ReLU(), nn.Dropout(dropout),
                nn.Conv1d(hidden, out_dim, kernel, padding=pad),
            )  # fmt: skip

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "in_dim": self.in_dim, "out_dim": self.out_dim, "per_residue": self.per_residue,
                "hidden": self.hidden, "dropout": self.dropout_p, "kernel": self.kernel}  # fmt: skip

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> Head:
        cfg = dict(cfg)
        return cls(cfg.pop("kind"), cfg.pop("in_dim"), cfg.pop("out_dim"), **cfg)

    @torch.no_grad()
    def fit_normalization(self, features: Sequence[np.ndarray] | None, y: Tensor | None = None) -> None:
        """Feature mean/std over the rows of training `features` (arrays ``[D]`` or ``[L, D]``, summed in
        float64 one array at a time, so per-residue features are never concatenated), and regression
        target mean/std from ``y [N, K]`` (nan ignored)."""
        if features is not None and len(features):
            total = np.zeros(self.in_dim)
            squares = np.zeros(self.in_dim)
            count = 0
            for f in features:
                f = np.asarray(f, dtype=np.float64).reshape(-1, self.in_dim)
                total += f.sum(0)
                squares += (f * f).sum(0)
                count += len(f)
            mean = total / count
            var = np.maximum(squares / count - mean * mean, 0.0) * count / max(count - 1, 1)
            self.shift.copy_(torch.from_numpy(mean))
            self.scale.copy_(torch.from_numpy(np.sqrt(var)).clamp(min=1e-6) if count > 1 else self.scale)
        if y is not None:
            self.y_shift.copy_(y.nanmean(0))
            centred = torch.where(torch.isnan(y), torch.zeros_like(y), y - self.y_shift)
            var = (centred**2).sum(0) / (~torch.isnan(y)).sum(0).clamp(min=2).sub(1)
            self.y_scale.copy_(var.sqrt().clamp(min=1e-6))

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Logits (classification) or standardized values (regression): ``[B, K]`` or ``[B, L, K]``."""
        x = (x - self.shift) / self.scale
        if mask is not None:
            x = x * mask[..., None].to(x.dtype)  # padding contributes nothing to the convolutions
        if self.kind == "cnn":
            return self.net(x.transpose(1, 2)).transpose(1, 2)
        return self.net(x)

    def values(self, out: Tensor) -> Tensor:
        """Regression outputs in the target's units."""
        return out * self.y_scale + self.y_shift
