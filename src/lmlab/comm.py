"""Work split across the processes of a torch.distributed job (torchrun, Slurm), gathered back in order.

Usage::

    results = split_gather(requests, lambda mine: engine.generate(mine))   # one process: engine.generate(requests)

Process ``r`` of ``w`` handles items ``r, r + w, r + 2w, ...`` (each needs a model of its own: a replica, not a
shard); every process gets the whole list of results in the items' order, equal to one process doing all.

On one machine without a process group, :func:`fork_map` splits the same way across forked processes::

    results = fork_map(requests, lambda mine: engine.generate(mine), procs=2)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = ["fork_map", "process_group", "split_gather"]


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


def fork_map(items: Sequence[T], fn: Callable[[list[T]], Sequence[Any]], procs: int) -> list[Any]:
    """``fn`` over ``items`` split across ``procs`` processes of this machine, results gathered in item order
    (one result per item): process ``r`` takes items ``r, r + procs, ...``. This process takes share 0; the
    others are forked from it, so they start at once and share its model (copy on write): nothing is pickled but
    each share's results. Every process, this one included while it works, runs torch on one thread: a forked
    process must not enter the OpenMP pool its parent started (GNU OpenMP hangs there: a forked worker with 2
    threads did, after the parent had run a 2-thread matmul), and the small-batch work this is for (decoding)
    gains little from a second thread. Linux only (fork); ``procs <= 1`` or a single item runs ``fn(items)`` here.

    Forked workers ignore the stop signals (the parent decides: an exception here, Ctrl-C included, kills them)
    and die with the parent. A worker's exception is raised here as itself (a DataError stays a DataError: a
    command reports it in one line), its traceback attached as a note; one that does not survive pickling comes
    back as a RuntimeError carrying that traceback. A worker that dies without answering is named with its exit
    code."""
    items = list(items)
    procs = min(procs, len(items))
    if procs <= 1:
        return list(fn(items))
    if not hasattr(os, "fork"):
        raise RuntimeError(f"fork_map: {procs} processes need os.fork (Linux); use 1")
    import multiprocessing as mp

    import torch

    ctx = mp.get_context("fork")
    workers = []
    try:
        for r in range(1, procs):
            recv, send = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_fork_worker, args=(fn, items[r::procs], send), daemon=True,
                            name=f"lmlab-fork-{r}")
            p.start()
            send.close()
            workers.append((r, p, recv))
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            parts = [_checked(list(fn(items[0::procs])), len(items[0::procs]), 0)]
        finally:
            torch.set_num_threads(before)
        for r, p, recv in workers:
            try:
                ok, payload = recv.recv()
            except EOFError:
                p.join()
                raise RuntimeError(f"fork_map: worker {r} of {procs} died without answering "
                                   f"(exit code {p.exitcode})") from None
            if not ok:
                exc, tb = payload
                where = f"fork_map: worker {r} of {procs} failed:\n{tb}"
                if exc is None:
                    raise RuntimeError(where)
                if hasattr(exc, "add_note"):  # (Python >= 3.11)
                    exc.add_note(where)
                raise exc
            parts.append(_checked(payload, len(items[r::procs]), r))
    finally:
        for _, p, recv in workers:
            recv.close()
            if p.is_alive():
                p.kill()
            p.join()
    out: list[Any] = [None] * len(items)
    for r, part in enumerate(parts):
        out[r::procs] = part
    return out


def _checked(results: list[Any], n: int, r: int) -> list[Any]:
    if len(results) != n:
        raise ValueError(f"fork_map: fn returned {len(results)} results for the {n} items of share {r}")
    return results


def _fork_worker(fn: Callable, items: list, send: Any) -> None:
    """A forked worker: ``fn(items)`` sent back as ``(True, results)``, or ``(False, (exception or None,
    traceback))``."""
    import pickle
    import signal
    import traceback

    import torch

    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(s, signal.SIG_IGN)
    try:  # die with the parent (a parent killed by SIGKILL leaves no one to read the answer)
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    torch.set_num_threads(1)
    try:
        msg = (True, list(fn(items)))
    except BaseException as e:  # noqa: BLE001 - everything goes back to the parent, which raises it
        try:  # the exception itself when it survives the trip (some classes cannot be rebuilt from their args)
            pickle.loads(pickle.dumps(e))
        except Exception:  # noqa: BLE001
            e = None
        msg = (False, (e, traceback.format_exc()))
    send.send(msg)
    send.close()
