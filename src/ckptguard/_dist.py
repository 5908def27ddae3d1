"""Thin helpers over torch.distributed that also work when no process group exists.

ckptguard runs the same code path with one process and under torchrun; these helpers make the
single-process case a world of size one instead of a branch in every caller.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def new_cpu_group() -> dist.ProcessGroup | None:
    """A gloo group for ckptguard's own collectives and DCP's.

    Keeping checkpoint traffic off the training group avoids two known traps: NCCL cannot move
    the CPU objects DCP exchanges, and a barrier on the group an ``async_save`` background thread
    is using can deadlock (KempnerForge#102/#104). Every rank must call this at the same point.
    """
    if not is_distributed():
        return None
    return dist.new_group(backend="gloo")


def barrier(group: dist.ProcessGroup | None) -> None:
    if is_distributed():
        dist.barrier(group=group)


def broadcast_object(obj: Any, group: dist.ProcessGroup | None, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def all_gather_object(obj: Any, group: dist.ProcessGroup | None) -> list[Any]:
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out
