"""The native checkpoint format: a directory of three files, read without executing code::

    config.json        {"format": "prott5nv", "format_version": 1, "model": {...T5Config...}}
    model.safetensors  the weights (tied tables stored once; keys: docs/checkpoints.md)
    tokenizer.json     the tokenizer description (ProteinTokenizer.to_dict)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..errors import CheckpointError, ConfigError
from ..fsutil import atomic_directory
from ..model.config import T5Config
from ..model.t5 import T5Model
from ..tokenizer import ProteinTokenizer
from ._common import CHECKPOINT_FILES, LazyTensors, empty_model, load_state_dict_strict, read_json

FORMAT = "prott5nv"
FORMAT_VERSION = 1


def write_native(
    model: T5Model,
    tokenizer: ProteinTokenizer,
    directory: Path,
    *,
    dtype: torch.dtype | None = None,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write the three files of a native checkpoint into an existing `directory` (not atomic)."""
    state = {
        k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
        for k, v in model.state_dict().items()
    }
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    config: dict[str, Any] = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": model.config.to_dict()}
    if extra:
        config["extra"] = extra
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (directory / "tokenizer.json").write_text(json.dumps(tokenizer.to_dict(), indent=1) + "\n")


def save_pretrained(
    model: T5Model,
    tokenizer: ProteinTokenizer,
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write `model` and `tokenizer` as a native checkpoint directory, atomically (temp dir + rename).
    `dtype` converts floating weights (e.g. bfloat16 to halve the size)."""
    with atomic_directory(path, owns=CHECKPOINT_FILES) as tmp:
        write_native(model, tokenizer, tmp, dtype=dtype, extra=extra)
    return Path(path)


def load_native(path: Path, dtype: torch.dtype | None = None) -> tuple[T5Model, ProteinTokenizer]:
    """Model (on CPU) and tokenizer of a native checkpoint directory. The weights are read one
    tensor at a time straight into `dtype` (see :func:`~prott5nv.model.t5.weight_dtypes`; None: float32):
    no float32 copy of a model loaded in half precision is ever held."""
    data = read_json(path / "config.json")
    if data.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {data['format_version']} is newer than this prott5nv "
            f"supports ({FORMAT_VERSION}); upgrade prott5nv"
        )
    try:
        config = T5Config.from_dict(data["model"])
        tokenizer = ProteinTokenizer.from_dict(read_json(path / "tokenizer.json"))
    except (KeyError, TypeError, ConfigError) as exc:
        raise CheckpointError(f"{path}: invalid checkpoint description: {exc}") from None
    if tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(
            f"{path}: tokenizer has {tokenizer.vocab_size} tokens but the model only {config.vocab_size}"
        )
    weights = path / "model.safetensors"
    model = empty_model(config)
    load_state_dict_strict(model, LazyTensors([weights]), source=str(weights), dtype=dtype or torch.float32)
    return model, tokenizer
