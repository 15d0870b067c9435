"""The one precision vocabulary of every command and setting: PyTorch's dtype names (``float32``,
``bfloat16``, ``float16``), with the short spellings (``fp32``, ``bf16``, ``fp16``) accepted as aliases.
Plain strings (no torch import), so the command line can build its flags cheaply."""

from __future__ import annotations

from .errors import ConfigError

PRECISIONS = ("float32", "bfloat16", "float16")
ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
#: Every accepted spelling, short ones first (as `pretrain --precision` always listed them).
SPELLINGS = (*ALIASES, *PRECISIONS)


def canonical_precision(name: str, what: str = "precision") -> str:
    """`name` in the canonical vocabulary (aliases mapped); :class:`ConfigError` naming `what` otherwise."""
    if name in PRECISIONS:
        return name
    if name in ALIASES:
        return ALIASES[name]
    raise ConfigError(f"{what} {name!r}: choose one of {', '.join(SPELLINGS)}")
