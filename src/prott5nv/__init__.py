"""prott5nv: the ProtT5nv protein language model (T5 encoder-decoder) in plain PyTorch.

Start with :func:`load`, then ``seqs_to_hiddens`` / ``hiddens_to_embedding`` / ``seqs_to_embedding``.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .api import ProtT5nv, load
from .checkpoint import bundled_models, load_checkpoint, save_pretrained
from .errors import CheckpointError, ConfigError, InvalidSequenceError, ProtT5nvError, SequenceTooLongError
from .fasta import read_fasta
from .model.config import T5Config, preset
from .model.t5 import T5Model
from .sequence import SequencePolicy
from .tokenizer import ProteinTokenizer

__all__ = [
    "CheckpointError", "ConfigError", "InvalidSequenceError", "ProtT5nv", "ProtT5nvError", "ProteinTokenizer",
    "SequencePolicy", "SequenceTooLongError", "T5Config", "T5Model", "__version__", "bundled_models",
    "load", "load_checkpoint", "preset", "read_fasta", "save_pretrained",
]  # fmt: skip
