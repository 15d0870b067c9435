"""Fully sharded data parallelism for pretraining (``pretrain --fsdp``): PyTorch's FSDP2 ``fully_shard``.

Each encoder and decoder block, then the whole model (embeddings, final norms, LM head bias), becomes a
unit whose parameters live as 1/N shards (DTensors) on each of the N ranks; a unit's full weights are
all-gathered for its forward and backward and freed after, gradients are reduce-scattered (averaged over
ranks, as DDP averages them), so gradients and AdamW's two moments stay sharded too. A rank holds
about 16/N bytes per parameter of training state in fp32 instead of DDP's 16. The loss is normalised
over the global batch exactly as under DDP, so the two compute the same steps (tested on CPU/gloo).

Checkpoints stay the native format every other command reads: the full state is gathered on rank 0 on
save (model weights as ``model.safetensors``; the optimizer state keyed by parameter index as
``optimizer.state_dict()`` keys it, so a checkpoint of one rank, DDP or FSDP resumes under any of them)
and sharded again on resume.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from ..model.t5 import T5Model
from .distributed import DistInfo

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered into rank 0's CPU memory


def shard_model(model: T5Model, device: torch.device, info: DistInfo) -> T5Model:
    """Shard `model` in place over all ranks: one FSDP unit per encoder/decoder block, then the root."""
    mesh = init_device_mesh(device.type, (info.world_size,))
    for stack in (model.encoder, model.decoder):
        if stack is not None:
            for block in stack.blocks:
                fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def gather_model(model: T5Model, info: DistInfo) -> T5Model | None:
    """A plain (unsharded, CPU) copy of a sharded model on rank 0, None on the other ranks. Collective:
    every rank must call it."""
    state = get_model_state_dict(model, options=_FULL)
    if not info.is_main:
        return None
    with torch.device("meta"):  # no memory, no random draws: the weights come from `state`
        plain = T5Model(model.config)
    plain.load_state_dict(state, assign=True)
    return plain.train(model.training)


def _parameter_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of each parameter in the optimizer's order (index i of ``optimizer.state_dict()``)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def gather_optimizer_state(model: T5Model, optimizer: torch.optim.Optimizer, info: DistInfo) -> dict[str, Any]:
    """The full optimizer state on rank 0, keyed by parameter index as ``optimizer.state_dict()`` keys it
    (empty on the other ranks). Collective."""
    state = get_optimizer_state_dict(model, optimizer, options=_FULL)
    if not info.is_main:
        return {}
    index = {n: i for i, n in enumerate(_parameter_names(model, optimizer))}
    return {
        "state": {index[n]: v for n, v in state["state"].items()},
        "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]],
    }


def load_optimizer_state(model: T5Model, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Shard a full optimizer state (keyed by parameter index, as saved) into the optimizer of a sharded
    model; every rank passes the full state."""
    names = _parameter_names(model, optimizer)
    named = {
        "state": {names[int(i)]: v for i, v in state["state"].items()},
        "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in state["param_groups"]],
    }
    set_optimizer_state_dict(model, optimizer, named, options=StateDictOptions(full_state_dict=True))


def set_gradient_sync(model: nn.Module, sync: bool) -> None:
    """Reduce-scatter gradients after this backward (the last micro-batch) or keep accumulating them
    unsharded (the others): FSDP's counterpart of DDP's ``no_sync``."""
    model.set_requires_gradient_sync(sync)  # type: ignore[operator]
