"""Work split across the processes of a torch.distributed job (torchrun, Slurm), gathered back in order.

Usage::

    results = split_gather(requests, lambda mine: engine.generate(mine))   # one process: engine.generate(requests)

Process ``r`` of ``w`` handles items ``r, r + w, r + 2w, ...`` (each needs a model of its own: a replica, not a
shard); every process gets the whole list of results in the items' order, equal to one process doing all.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = ["process_group", "split_gather"]


def process_group() -> tuple[int, int]:
    """(rank, world size) of the initialised default process group, or (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def split_gather(items: Sequence[T], fn: Callable[[list[T]], Sequence[Any]],
                 split: tuple[int, int] | None = None) -> list[Any]:
    """``fn`` over this process's share of ``items`` (one result per item), every process's results gathered in
    item order. ``split=(rank, world)`` overrides the default process group's; world 1 runs ``fn(items)``. Every
    process of the group must call it (an all-gather)."""
    rank, world = split or process_group()
    if world == 1:
        return list(fn(list(items)))
    import torch.distributed as dist

    mine = list(fn(list(items[rank::world])))
    if len(mine) != len(items[rank::world]):
        raise ValueError(f"split_gather: fn returned {len(mine)} results for {len(items[rank::world])} items")
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, mine)
    out: list[Any] = [None] * len(items)
    for r, part in enumerate(parts):
        out[r::world] = part
    return out
