"""Process-group setup for data parallelism (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group when launched by torchrun (gloo on CPU, nccl on CUDA); else one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def shutdown_distributed(clean: bool = True) -> None:
    """Leave the process group without hanging at exit.

    Seen in CI and reproduced here (1 run in 6): a finished 2-rank gloo run whose rank 1 never exits. Its
    main thread, holding the GIL, frees the DDP reducer, whose gloo destructor joins a worker thread that
    is itself waiting for the GIL to free the last collective's tensors (pytorch#75097, #179291). So every
    rank first meets at a barrier (the others may still be writing), then sleeps briefly with the GIL
    released so that the workers finish freeing their collectives, then destroys the group. After a
    failure the group is left alone: a barrier would wait for ranks that may never arrive, and torchrun
    stops the others."""
    if dist.is_initialized() and clean:
        dist.barrier()
        time.sleep(0.2)
        dist.destroy_process_group()


def all_reduce_sum(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum a (small, CPU or device) tensor over ranks; identity for one process."""
    if info.enabled:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values
