"""lmlab.comm.fork_map: work split across processes forked from this one, gathered in item order."""

from __future__ import annotations

import multiprocessing
import os
import re
import sys
import time

import pytest
import torch

from lmlab.comm import fork_map
from lmlab.data.errors import DataError


def test_results_come_back_in_item_order_from_every_process():
    items = list(range(11))  # 11 over 3: shares of 4, 4, 3
    out = fork_map(items, lambda mine: [(x * x, os.getpid()) for x in mine], procs=3)
    assert [sq for sq, _ in out] == [x * x for x in items]
    pids = [pid for _, pid in out]
    assert len(set(pids)) == 3 and pids[0::3] == [os.getpid()] * 4  # share 0 is this process's
    assert all(len(set(pids[r::3])) == 1 for r in range(3))
    assert fork_map(items, lambda mine: [x + 1 for x in mine], procs=1) == [x + 1 for x in items]
    assert fork_map([5], lambda mine: [os.getpid() for _ in mine], procs=4) == [os.getpid()]  # 1 item: here
    assert fork_map([], lambda mine: [], procs=2) == []
    assert multiprocessing.active_children() == []


def test_every_process_runs_one_thread_and_this_one_gets_its_own_back():
    """Forked after this process ran a matmul on 2 threads (its OpenMP pool is up), the workers compute on one."""
    before = torch.get_num_threads()
    try:
        a = torch.randn(512, 512)
        torch.set_num_threads(1)
        ref = (a @ a).sum().item()  # (its rounding depends on the threads)
        torch.set_num_threads(2)
        (a @ a).sum().item()

        def fn(mine):
            return [(torch.get_num_threads(), (a @ a).sum().item()) for _ in mine]

        assert fork_map(list(range(4)), fn, procs=2) == [(1, ref)] * 4
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


class Unrebuildable(Exception):
    def __init__(self, code: int):  # pickled with args ("code 3",): cannot be rebuilt from them
        super().__init__(f"code {code + 0}")


def test_a_worker_failure_is_raised_here_with_its_traceback_and_nothing_is_left_running():
    def fn(mine):
        if os.getpid() != parent:
            raise DataError("eval_x.jsonl: question 3: bad dialog")
        return mine

    parent = os.getpid()
    with pytest.raises(DataError) as info:
        fork_map(list(range(6)), fn, procs=2)
    assert str(info.value) == "eval_x.jsonl: question 3: bad dialog"  # what a command prints, in one line
    if sys.version_info >= (3, 11):  # the worker's own traceback comes along
        assert re.search(r"worker 1 of 2 failed:[\s\S]*in fn[\s\S]*DataError", "\n".join(info.value.__notes__))
    assert multiprocessing.active_children() == []

    def odd(mine):
        if os.getpid() != parent:
            raise Unrebuildable(3)
        return mine

    with pytest.raises(RuntimeError, match=r"worker 1 of 2 failed:[\s\S]*Unrebuildable: code 3"):
        fork_map(list(range(6)), odd, procs=2)

    def dies(mine):
        if os.getpid() != parent:
            os._exit(7)
        return mine

    with pytest.raises(RuntimeError, match="worker 1 of 2 died without answering .exit code 7."):
        fork_map(list(range(6)), dies, procs=2)
    with pytest.raises(ValueError, match="fn returned 1 results for the 3 items of share 0"):
        fork_map(list(range(6)), lambda mine: mine[:1], procs=2)
    assert multiprocessing.active_children() == []


def test_a_failure_here_kills_the_workers_at_once():
    queue = multiprocessing.get_context("fork").SimpleQueue()
    workers: list[int] = []

    def fn(mine):
        if os.getpid() == parent:
            workers.extend([queue.get(), queue.get()])  # both workers are up
            raise KeyboardInterrupt  # e.g. Ctrl-C while this process answers its share
        queue.put(os.getpid())
        time.sleep(600)  # would hold the test for 10 minutes if left running
        return mine

    parent = os.getpid()
    t0 = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        fork_map(list(range(4)), fn, procs=3)
    assert time.perf_counter() - t0 < 60
    assert multiprocessing.active_children() == [] and len(set(workers)) == 2
    for pid in workers:
        with pytest.raises(ProcessLookupError):  # reaped, not just signalled
            os.kill(pid, 0)
