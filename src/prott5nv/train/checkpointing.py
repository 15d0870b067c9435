"""Training checkpoints: a native model directory plus the trainer's state, written atomically.

``RUN_DIR/checkpoints/step_00000500/`` holds ``config.json``, ``model.safetensors``, ``tokenizer.json``
(so ``--init-from`` and ``prott5nv.load`` take it as it is), ``trainer_state.pt`` (optimizer, grad scaler,
torch RNG states, each rank's; tensors only, loaded with ``weights_only=True``) and ``trainer_state.json`` (step,
consumed samples, tokens, the training config). The last `keep_last` are kept.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import load_native, write_native
from ..errors import CheckpointError
from ..fsutil import atomic_directory
from ..model.t5 import T5Model
from ..tokenizer import ProteinTokenizer

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"step_(\d{8})")


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:08d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (incomplete ones never get their final name)."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.fullmatch(p.name) and (p / "trainer_state.json").is_file()]
    return sorted(found, key=lambda p: p.name)


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: T5Model,
    tokenizer: ProteinTokenizer,
    optimizer_state: dict[str, Any],
    scaler: torch.amp.GradScaler | None,
    state: dict[str, Any],
    keep_last: int,
    rank_rng: list[torch.Tensor] | None = None,
) -> Path:
    """Write a checkpoint (rank 0). `rank_rng`: every rank's CPU RNG state, so that each rank of a
    resumed multi-process run continues its own dropout stream."""
    path = checkpoint_dir(run_dir, step)
    with atomic_directory(path) as tmp:
        write_native(model, tokenizer, tmp)
        tensors = {
            "optimizer": optimizer_state,  # optimizer.state_dict() (under FSDP: the gathered full state)
            "scaler": scaler.state_dict() if scaler is not None else {},
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "rank_rng": rank_rng or [],
        }
        torch.save(tensors, tmp / "trainer_state.pt")
        (tmp / "trainer_state.json").write_text(json.dumps({**state, "step": step}, indent=2) + "\n")
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    log.debug("saved checkpoint %s", path)
    return path


def load_checkpoint_state(path: Path) -> tuple[T5Model, ProteinTokenizer, dict[str, Any], dict[str, Any]]:
    """Model, tokenizer, trainer tensors and trainer JSON state of a training checkpoint."""
    model, tokenizer = load_native(path)
    try:
        tensors = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=True)
        state = json.loads((path / "trainer_state.json").read_text())
    except (OSError, RuntimeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read trainer state: {exc}") from None
    return model, tokenizer, tensors, state
