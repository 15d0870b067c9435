"""Shared by every format: key maps between foreign state dicts and ours, the strict state-dict loader, JSON."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import CheckpointError

#: Every file a checkpoint directory of either format (native, HF) may hold: what `convert --overwrite`
#: replaces in an existing one (anything else there, a model card, is kept).
HF_TOKENIZER_FILE = "prott5nv_tokenizer.json"  # our tokenizer beside an HF T5 directory's files
CHECKPOINT_FILES = ("config.json", "model.safetensors", "tokenizer.json", HF_TOKENIZER_FILE)

Transform = Callable[[list[Tensor]], Tensor]


def concat(parts: list[Tensor]) -> Tensor:
    """Default transform: one source tensor as is, several concatenated along rows (e.g. q, k, v)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)


@dataclass(frozen=True)
class KeyRule:
    """Our parameter `ours` is built from the foreign tensors `theirs` by `transform`."""

    ours: str
    theirs: tuple[str, ...]
    transform: Transform = concat


def apply_rules(
    state: dict[str, Tensor],
    rules: Iterable[KeyRule],
    *,
    source: str,
    ignore: Callable[[str], bool] = lambda key: False,
) -> dict[str, Tensor]:
    """Build our state dict from a foreign one. Every foreign key must be used by a rule or ignored, and
    every rule's keys must exist: anything else is a CheckpointError naming the keys (never a silent
    half-load)."""
    out: dict[str, Tensor] = {}
    used: set[str] = set()
    missing: list[str] = []
    for rule in rules:
        absent = [k for k in rule.theirs if k not in state]
        if absent:
            missing += absent
            continue
        out[rule.ours] = rule.transform([state[k] for k in rule.theirs])
        used.update(rule.theirs)
    unexpected = sorted(k for k in state if k not in used and not ignore(k))
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: weights do not match the configuration (missing: {missing[:6]}"
            f"{' ...' if len(missing) > 6 else ''}; unexpected: {unexpected[:6]}"
            f"{' ...' if len(unexpected) > 6 else ''})"
        )
    return out


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read JSON: {exc}") from None


def load_state_dict_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], *, source: str) -> None:
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
