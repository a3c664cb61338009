"""Background batch building for the loader: a thread or a spawned process filling a bounded queue.

A prefetcher runs :func:`lmlab.data.base.iterate_batches` from a given position and hands over
``("batch", (epoch, index, batch))`` items, then ``("end", None)`` when a finite iteration is done; an
exception in the producer is re-raised in the consumer. Because batches are pure functions of their
position, the consumer's position alone is the loader state: whatever the producer has built ahead is
simply discarded on ``close()`` or when the loader jumps to another position.

The process variant uses the ``spawn`` start method (safe with threads and torch in the parent, and the
same on every platform). The child imports numpy, the lmlab data sources and the script's ``__main__``
module (so torch too when the script imports it), then receives the source, pickled, through a pipe: token
shards travel as file names, text and dialog data as whole arrays, on every (re)start. Both variants stop
promptly on ``close()``, never block interpreter exit (daemon thread / daemon process) and never leave a
child behind.

Usage (the loader does this for you)::

    from lmlab.data.prefetch import make_prefetcher
    pipe = make_prefetcher("thread", source, epoch=0, index=0, infinite=True, depth=2)
    kind, item = pipe.get()      # ("batch", (0, 0, {"inputs": ..., "targets": ...}))
    pipe.close()
"""

from __future__ import annotations

import multiprocessing as mp
import pickle
import queue
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

from lmlab.data.base import BatchSource, iterate_batches

__all__ = ["DirectPipe", "ProcessPrefetcher", "ThreadPrefetcher", "make_prefetcher"]

_POLL = 0.1  # seconds between checks of the stop flag while a queue is full or empty


class DirectPipe:
    """No prefetch: batches are built in the caller's thread when asked for."""

    def __init__(self, source: BatchSource, epoch: int, index: int, infinite: bool, depth: int = 0) -> None:
        self._it: Iterator | None = iterate_batches(source, epoch, index, infinite)

    def get(self) -> tuple[str, Any]:
        if self._it is None:
            return "end", None
        try:
            return "batch", next(self._it)
        except StopIteration:
            self._it = None
            return "end", None

    def close(self) -> None:
        self._it = None


def _produce(source: BatchSource, epoch: int, index: int, infinite: bool, q: Any, stop: Any) -> None:
    """Producer loop shared by the thread and the process: fill ``q`` until done or ``stop`` is set."""

    def put(item: tuple[str, Any]) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=_POLL)
                return True
            except queue.Full:
                continue
        return False

    try:
        for item in iterate_batches(source, epoch, index, infinite):
            if not put(("batch", item)):
                return
        put(("end", None))
    except BaseException as e:  # handed to the consumer, which re-raises it
        try:
            pickle.dumps(e)
        except Exception:
            e = RuntimeError(f"{type(e).__name__}: {e}")
        put(("error", e))


class _QueuePipe:
    """Consumer side common to both prefetchers."""

    q: Any
    worker: Any
    what: str

    def get(self) -> tuple[str, Any]:
        if self.q is None:
            raise RuntimeError(f"the {self.what} prefetcher is closed")
        while True:
            try:
                kind, item = self.q.get(timeout=_POLL * 5)
            except queue.Empty:
                if self.worker.is_alive():
                    continue
                try:  # the worker may have put its last item just before exiting
                    kind, item = self.q.get(timeout=_POLL * 5)
                except queue.Empty:
                    code = getattr(self.worker, "exitcode", None)
                    raise RuntimeError(
                        f"the {self.what} prefetcher stopped without a result (exit code {code})"
                    ) from None
            if kind == "error":
                self.close()
                raise item
            return kind, item


class ThreadPrefetcher(_QueuePipe):
    """Builds up to ``depth`` batches ahead in a daemon thread."""

    what = "thread"

    def __init__(self, source: BatchSource, epoch: int, index: int, infinite: bool, depth: int = 2) -> None:
        self.q: Any = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.worker = threading.Thread(
            target=_produce, args=(source, epoch, index, infinite, self.q, self.stop), daemon=True,
            name="lmlab-prefetch",
        )
        self.worker.start()

    def close(self) -> None:
        if self.q is None:
            return
        self.stop.set()
        while self.worker.is_alive():
            try:  # free a slot in case the producer is blocked on a full queue
                self.q.get_nowait()
            except queue.Empty:
                pass
            self.worker.join(timeout=_POLL)
        self.q = None


class ProcessPrefetcher(_QueuePipe):
    """Builds up to ``depth`` batches ahead in a spawned daemon process (no GIL contention with training)."""

    what = "process"

    def __init__(self, source: BatchSource, epoch: int, index: int, infinite: bool, depth: int = 2) -> None:
        ctx = mp.get_context("spawn")
        self.q: Any = ctx.Queue(maxsize=depth)
        self.stop = ctx.Event()
        recv, send = ctx.Pipe(duplex=False)
        self.worker = ctx.Process(
            target=_process_main, args=(recv, epoch, index, infinite, self.q, self.stop), daemon=True,
            name="lmlab-prefetch",
        )
        self.worker.start()
        recv.close()
        # The source (a whole token array for text data) is sent after the start, not as a Process argument:
        # spawn writes the arguments while holding the child's end of its pipe open, so a child that dies
        # while starting (e.g. a script without the __main__ guard) would block that write forever.
        try:
            send.send(source)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the child is gone: get() reports its exit code
        except BaseException:  # e.g. an unpicklable source: the child sees EOF and exits
            send.close()
            self.close()
            raise
        finally:
            send.close()

    def close(self, timeout: float = 10.0) -> None:
        if self.q is None:
            return
        self.stop.set()
        deadline = time.monotonic() + timeout
        while self.worker.is_alive() and time.monotonic() < deadline:
            try:  # drain so that the child's queue feeder is never stuck on a full pipe
                self.q.get(timeout=_POLL / 2)
            except (queue.Empty, OSError, EOFError):
                pass
            self.worker.join(timeout=_POLL / 2)
        if self.worker.is_alive():
            self.worker.terminate()
            self.worker.join(timeout=5)
        if not self.worker.is_alive():
            self.worker.close()
        self.q.close()
        self.q.join_thread()
        self.q = None


def _process_main(conn: Any, epoch: int, index: int, infinite: bool, q: Any, stop: Any) -> None:
    # Ctrl-C reaches the whole process group: the parent decides (a trainer finishes its step and saves), then
    # stops this process through ``stop``; a KeyboardInterrupt here would instead end training with an error.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with conn:
        try:
            source = conn.recv()
        except EOFError:  # the parent failed to send the source and raises the error itself
            return
    try:
        _produce(source, epoch, index, infinite, q, stop)
    finally:
        if stop.is_set():  # nobody will read what is still buffered: do not wait to flush it at exit
            q.cancel_join_thread()


def make_prefetcher(
    kind: str, source: BatchSource, epoch: int, index: int, infinite: bool, depth: int = 2
) -> DirectPipe | ThreadPrefetcher | ProcessPrefetcher:
    """A pipe of batches from (epoch, index): ``kind`` is "none", "thread" or "process"."""
    classes = {"none": DirectPipe, "thread": ThreadPrefetcher, "process": ProcessPrefetcher}
    if kind not in classes:
        raise ValueError(f"prefetch must be one of {sorted(classes)}, got {kind!r}")
    if depth < 1:
        raise ValueError(f"prefetch depth must be positive, got {depth}")
    return classes[kind](source, epoch, index, infinite, depth)
