"""Shared by every format: key maps between foreign state dicts and ours, weights read one tensor at a time,
the strict state-dict loader, JSON."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from ..device import release_free_memory
from ..errors import CheckpointError
from ..model.config import T5Config
from ..model.t5 import T5Model, weight_dtypes

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
        if out[rule.ours].numel() >= 1 << 20:  # what reading, converting and joining freed: back to the OS
            release_free_memory()
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


class LazyTensors(Mapping[str, Tensor]):
    """The tensors of safetensors files, each read from disk when it is looked up (keys come from the
    headers; nothing is kept): a loader that converts and keeps one tensor at a time never holds a second
    copy of the weights. Reads use ``pread`` where safetensors offers it (>= 0.8): a memory map would count
    every page read towards the process's resident memory until the file is closed. `dtype` converts
    floating tensors as they are read. `extra` adds tensors already in memory (aliases)."""

    def __init__(self, files: Iterable[Path], dtype: torch.dtype | None = None,
                 extra: Mapping[str, Tensor] | None = None) -> None:  # fmt: skip
        self.dtype = dtype
        self._where: dict[str, Any] = {}
        self._extra = dict(extra or {})
        for path in files:
            handle = _open_safetensors(path)
            self._where.update(dict.fromkeys(handle.keys(), (path, handle)))

    def with_extra(self, extra: Mapping[str, Tensor]) -> LazyTensors:
        """The same files plus `extra` (which wins over a stored tensor of the same name)."""
        out = LazyTensors((), self.dtype, {**self._extra, **extra})
        out._where = self._where
        return out

    def __getitem__(self, key: str) -> Tensor:
        if key in self._extra:
            tensor = self._extra[key]
        else:
            path, handle = self._where[key]
            try:
                tensor = handle.get_tensor(key)
            except (OSError, SafetensorError) as exc:
                raise CheckpointError(f"{path}: cannot read {key}: {exc}") from None
        if self.dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(self.dtype)
        return tensor

    def __iter__(self) -> Iterator[str]:
        yield from self._where
        yield from (k for k in self._extra if k not in self._where)

    def __len__(self) -> int:
        return len(self._where.keys() | self._extra.keys())

    def __contains__(self, key: object) -> bool:
        return key in self._where or key in self._extra


def _open_safetensors(path: Path) -> Any:
    try:
        try:
            return safe_open(str(path), framework="pt", backend="pread")
        except TypeError:  # safetensors < 0.8: memory-mapped reads only
            return safe_open(str(path), framework="pt")
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(f"{path}: cannot read weights: {exc}") from None


def empty_model(config: T5Config) -> T5Model:
    """A :class:`T5Model` whose parameters are on the meta device (no memory, no initialisation), for
    :func:`load_state_dict_strict` to fill with the checkpoint's tensors themselves."""
    with torch.device("meta"):
        return T5Model(config)


def load_state_dict_strict(
    model: torch.nn.Module, state: Mapping[str, Tensor], *, source: str, dtype: torch.dtype | None = None
) -> None:
    """Load `state` into `model`, raising CheckpointError on missing/unexpected keys or shape mismatches.
    Floating tensors take the model's dtype, or with `dtype` the dtype it computes in
    (:func:`~prott5nv.model.t5.weight_dtypes`). Tensors are looked up, checked and converted one at a time,
    in model order (so the first mismatch reported is the first layer's); a model on the meta device
    (:func:`empty_model`) takes the converted tensors themselves, so loading holds one copy of the weights
    in the final dtype plus one source tensor."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: weights do not match the config (missing: {missing[:5]}, unexpected: {unexpected[:5]})"
        )
    targets = weight_dtypes(model, dtype) if dtype is not None else {}
    out: dict[str, Tensor] = {}
    for k, ref in own.items():
        tensor = state[k]
        if tuple(tensor.shape) != tuple(ref.shape):
            raise CheckpointError(
                f"{source}: weight {k} has shape {tuple(tensor.shape)}, the config implies {tuple(ref.shape)}"
            )
        converted = tensor.to(targets.get(k, ref.dtype)) if tensor.is_floating_point() else tensor
        if converted is not tensor and ref.numel() >= 1 << 20:
            del tensor
            release_free_memory()  # the source tensor, freed: back to the OS (see release_free_memory)
        out[k] = converted
    model.load_state_dict(out, assign=any(v.is_meta for v in own.values()))
