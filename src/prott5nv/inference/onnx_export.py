"""ONNX export of the encoder: ``(input_ids [B, S] int64, attention_mask [B, S] int64) -> hidden
[B, S, D] float32`` with dynamic batch and length axes, for ONNX Runtime and other engines.

Positions are tokens as the model sees them (for Rostlab models the trailing `</s>` is included; drop it
as :meth:`~prott5nv.api.ProtT5nv.tokens_to_hiddens` does). Weights are exported in float32.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..model.t5 import T5Model

log = logging.getLogger(__name__)


class EncoderOnly(nn.Module):
    """The encoder as a module of its own (what is traced)."""

    def __init__(self, model: T5Model) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.model.encode(input_ids, attention_mask)


def export_onnx(model: T5Model, path: str | os.PathLike, *, opset: int = 17) -> Path:
    """Write the encoder of `model` (float32, eval) to `path` through a temporary and a rename."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: is a directory, expected an output file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    model = model.float().eval()
    ids = torch.full((2, 8), 5, dtype=torch.long)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    try:
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                EncoderOnly(model).eval(), (ids, mask), str(tmp), input_names=["input_ids", "attention_mask"],
                output_names=["hidden"], opset_version=opset, dynamo=False,
                dynamic_axes={"input_ids": {0: "batch", 1: "length"}, "attention_mask": {0: "batch", 1: "length"},
                              "hidden": {0: "batch", 1: "length"}},
            )  # fmt: skip
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    log.debug("exported encoder to %s", path)
    return path
