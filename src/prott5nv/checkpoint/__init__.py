"""Checkpoints: finding them, telling their format apart, and loading any of them.

* :mod:`.native` -- our own format (a directory: config.json, model.safetensors, tokenizer.json).
* :mod:`.nemo` -- NeMo / BioNeMo ``.nemo`` archives of Megatron T5 (read only) into the ``megatron`` family.
* :mod:`.hf` -- Hugging Face T5 directories (Rostlab ProtT5) to and from the ``t5`` family.
* :mod:`.sentencepiece` -- the pieces of a SentencePiece model, read without executing anything.
* :mod:`._common` -- key-renaming rules and the strict state-dict loader every format uses.

:func:`load_checkpoint` accepts a bundled model name (``prott5nv-demo``), a native directory, a ``.nemo``
archive or an HF T5 directory; loading never executes code. The key tables are in docs/checkpoints.md.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, ConfigError
from ..model.t5 import T5Model, cast_weights
from ..tokenizer import ProteinTokenizer
from ._common import load_state_dict_strict, read_json
from .native import FORMAT, FORMAT_VERSION, load_native, save_pretrained, write_native

__all__ = [
    "FORMAT", "FORMAT_VERSION", "PRETRAINED_DIR", "bundled_models", "detect_format", "load_checkpoint",
    "load_native", "load_state_dict_strict", "provenance", "resolve", "save_pretrained", "write_native",
]  # fmt: skip

log = logging.getLogger(__name__)

PRETRAINED_DIR = Path(__file__).parent.parent / "pretrained"


def bundled_models() -> list[str]:
    """Names of the models shipped inside the package."""
    if not PRETRAINED_DIR.is_dir():
        return []
    return sorted(p.name for p in PRETRAINED_DIR.iterdir() if (p / "config.json").is_file())


def resolve(name_or_path: str | os.PathLike) -> Path:
    """A bundled model's directory, or the given path if it exists."""
    s = str(name_or_path)
    if s in bundled_models():
        return PRETRAINED_DIR / s
    p = Path(s).expanduser()
    if p.exists():
        return p
    known = ", ".join(bundled_models()) or "none"
    raise CheckpointError(f"no model named or at {s!r} (bundled models: {known})")


def detect_format(path: Path) -> str:
    """'native', 'nemo' or 'hf' by looking at the files (never by importing anything)."""
    if path.is_file():
        if path.suffix == ".nemo" or _is_tar(path):
            return "nemo"
        raise CheckpointError(f"{path}: not a checkpoint (expected a directory or a .nemo archive)")
    cfg = path / "config.json"
    if not cfg.is_file():
        raise CheckpointError(f"{path}: no config.json (not a prott5nv or HF checkpoint directory)")
    data = read_json(cfg)
    if data.get("format") == FORMAT:
        return "native"
    if data.get("model_type") in ("t5", "mt5") or "d_model" in data:
        return "hf"
    raise CheckpointError(f"{cfg}: neither a prott5nv nor an HF T5 config")


def _is_tar(path: Path) -> bool:
    import tarfile

    try:
        return tarfile.is_tarfile(path)
    except OSError:
        return False


def provenance(name_or_path: str | os.PathLike) -> dict[str, Any]:
    """The ``extra`` record of a native checkpoint (how it was made: training steps, data, conversions);
    empty for other formats."""
    path = resolve(name_or_path)
    if detect_format(path) != "native":
        return {}
    return dict(read_json(path / "config.json").get("extra") or {})


def load_checkpoint(
    name_or_path: str | os.PathLike, *, sentinels: str | None = None, dtype: torch.dtype | None = None
) -> tuple[T5Model, ProteinTokenizer]:
    """Model (in eval mode, on CPU) and tokenizer from a bundled name, a native directory, a `.nemo` archive
    or an HF T5 directory. `dtype` (default float32) is the precision the weights are stored in
    (:func:`~prott5nv.model.t5.weight_dtypes`); native and HF safetensors weights are read one tensor at a
    time straight into it, so a half-precision load never holds a float32 copy. `sentinels` ("distinct" or
    "collapsed") forces the sentinel layout of a `.nemo` archive (see :func:`.nemo.decide_sentinels`); other
    formats record theirs, so there it may only repeat it."""
    if sentinels not in (None, "distinct", "collapsed"):
        raise ConfigError(f"unknown sentinel layout {sentinels!r} (distinct or collapsed)")
    path = resolve(name_or_path)
    fmt = detect_format(path)
    log.debug("loading %s checkpoint from %s", fmt, path)
    dtype = dtype or torch.float32
    if fmt == "native":
        model, tokenizer = load_native(path, dtype)
    elif fmt == "nemo":
        from .nemo import load_nemo

        model, tokenizer = load_nemo(path, sentinels=sentinels)
        cast_weights(model, dtype)
    else:
        from .hf import load_hf

        model, tokenizer = load_hf(path, dtype)
    if fmt != "nemo" and sentinels is not None and sentinels != tokenizer.sentinels:
        raise ConfigError(
            f"{path}: the sentinel layout can only be chosen for .nemo archives; this {fmt} checkpoint's "
            f"tokenizer has {tokenizer.sentinels} sentinels"
        )
    return model.eval(), tokenizer
