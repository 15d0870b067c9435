"""prott5nv: the ProtT5nv protein language model (T5 encoder-decoder) in plain PyTorch."""

from __future__ import annotations

__version__ = "0.1.0"
