"""The native checkpoint format and name resolution.

A native checkpoint is a directory::

    config.json        {"format": "prott5nv", "format_version": 1, "model": {...T5Config...}}
    model.safetensors  the weights (tied tables stored once)
    tokenizer.json     the tokenizer description (ProteinTokenizer.to_dict)

Loading never executes code. :func:`load_checkpoint` also accepts bundled model names
(``prott5nv-demo``), ``.nemo`` archives and HF T5 directories (via :mod:`prott5nv.interop`).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import CheckpointError, ConfigError
from .fsutil import atomic_directory
from .model.config import T5Config
from .model.t5 import T5Model
from .tokenizer import ProteinTokenizer

log = logging.getLogger(__name__)

FORMAT = "prott5nv"
FORMAT_VERSION = 1
PRETRAINED_DIR = Path(__file__).parent / "pretrained"


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
    data = _read_json(cfg)
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


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read JSON: {exc}") from None


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
    with atomic_directory(path) as tmp:
        write_native(model, tokenizer, tmp, dtype=dtype, extra=extra)
    return Path(path)


def provenance(name_or_path: str | os.PathLike) -> dict[str, Any]:
    """The ``extra`` record of a native checkpoint (how it was made: training steps, data, conversions);
    empty for other formats."""
    path = resolve(name_or_path)
    if detect_format(path) != "native":
        return {}
    return dict(_read_json(path / "config.json").get("extra") or {})


def load_native(path: Path) -> tuple[T5Model, ProteinTokenizer]:
    data = _read_json(path / "config.json")
    if data.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {data['format_version']} is newer than this prott5nv "
            f"supports ({FORMAT_VERSION}); upgrade prott5nv"
        )
    try:
        config = T5Config.from_dict(data["model"])
        tokenizer = ProteinTokenizer.from_dict(_read_json(path / "tokenizer.json"))
    except (KeyError, TypeError, ConfigError) as exc:
        raise CheckpointError(f"{path}: invalid checkpoint description: {exc}") from None
    if tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(
            f"{path}: tokenizer has {tokenizer.vocab_size} tokens but the model only {config.vocab_size}"
        )
    weights = path / "model.safetensors"
    try:
        state = load_file(str(weights))
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(f"{weights}: cannot read weights: {exc}") from None
    model = T5Model(config)
    load_state_dict_strict(model, state, source=str(weights))
    return model, tokenizer


def load_state_dict_strict(model: T5Model, state: dict[str, torch.Tensor], *, source: str) -> None:
    """Load `state` into `model`, raising CheckpointError on missing/unexpected keys or shape mismatches.
    Floating tensors are cast to the model's dtype."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: weights do not match the config (missing: {missing[:5]}, unexpected: {unexpected[:5]})"
        )
    for k, ref in own.items():  # in model order, so the first mismatch reported is the first layer's
        if tuple(state[k].shape) != tuple(ref.shape):
            raise CheckpointError(
                f"{source}: weight {k} has shape {tuple(state[k].shape)}, the config implies {tuple(ref.shape)}"
            )
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})


def load_checkpoint(name_or_path: str | os.PathLike) -> tuple[T5Model, ProteinTokenizer]:
    """Model (in eval mode, fp32, on CPU) and tokenizer from a bundled name, a native directory, a
    `.nemo` archive or an HF T5 directory."""
    path = resolve(name_or_path)
    fmt = detect_format(path)
    log.debug("loading %s checkpoint from %s", fmt, path)
    if fmt == "native":
        model, tokenizer = load_native(path)
    elif fmt == "nemo":
        from .interop.nemo import load_nemo

        model, tokenizer = load_nemo(path)
    else:
        from .interop.hf import load_hf

        model, tokenizer = load_hf(path)
    return model.float().eval(), tokenizer
