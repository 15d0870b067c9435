"""prott5nv: the ProtT5nv protein language model (T5 encoder-decoder) in plain PyTorch.

Start with :func:`load`, then ``seqs_to_hiddens`` / ``hiddens_to_embedding`` / ``seqs_to_embedding``.
Names are imported on first use, so torch-free parts (FASTA reading, preprocessing) start quickly.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "ProtT5nv": "api", "load": "api",
    "bundled_models": "checkpoint", "load_checkpoint": "checkpoint", "save_pretrained": "checkpoint",
    "CheckpointError": "errors", "ConfigError": "errors", "InvalidSequenceError": "errors",
    "ProtT5nvError": "errors", "SequenceTooLongError": "errors",
    "read_fasta": "fasta",
    "T5Config": "model.config", "preset": "model.config",
    "T5Model": "model.t5",
    "SequencePolicy": "sequence",
    "ProteinTokenizer": "tokenizer",
}  # fmt: skip
__all__ = [*sorted(_EXPORTS), "__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'prott5nv' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
