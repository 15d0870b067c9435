"""Helpers shared by the format converters: key maps between foreign state dicts and ours."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import CheckpointError

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
