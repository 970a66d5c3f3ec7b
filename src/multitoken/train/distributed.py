"""Data-parallel helpers for `torchrun`: gradients are averaged once per step, explicitly.

The per-head backward calls backward n + 1 times per micro-batch (and again per micro-batch with
gradient accumulation). DDP's reducer hooks into one backward per forward and would have to be fooled
with no_sync(); instead every rank accumulates its local gradients and one flat all-reduce per dtype
averages them after the last micro-batch, which is what DDP computes, with no wrapper around the model.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def setup() -> tuple[int, int]:
    """(rank, world_size); starts the process group when launched by torchrun with more than one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return dist.get_rank(), dist.get_world_size()


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean_(tensors: list[torch.Tensor]) -> None:
    """Average tensors across ranks in place, one flat buffer per dtype (few large messages)."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    world = dist.get_world_size()
    for group in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.all_reduce(flat)
        flat /= world
        for t, part in zip(group, flat.split([t.numel() for t in group])):
            t.copy_(part.view_as(t))


def all_reduce_sum_(t: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(t)
    return t


def broadcast_(tensors: list[torch.Tensor], src: int = 0) -> None:
    for t in tensors:
        dist.broadcast(t, src)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
