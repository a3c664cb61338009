"""The light profiler: per-step timers, MFU and peak memory for metrics.jsonl; a torch.profiler window; `lmlab profile`.

Always on and near free (``bench/monitor.py`` measures it): :class:`StepTimer` times the phases of each training step
(data wait, forward, backward, optimizer) and the evaluations and checkpoints between steps, with
``time.perf_counter`` on CPU and CUDA events on GPU (read back at log time, so no extra synchronisation), and the
trainer writes their averages over each log window as ``time/*`` columns. MFU divides the achieved FLOP/s (the
model's FLOPs per token x tokens/s) by the device's peak: a table of CUDA devices by name, or on CPU a float32 matmul
peak measured once (:func:`cpu_matmul_peak`, cached per machine, thread count and torch version).

On demand (``profile.trace_start``): :class:`TraceWindow` runs a few steps under ``torch.profiler`` and writes a
Chrome / Perfetto trace (``RUN/profile/trace_stepN.json``), plus a CUDA memory snapshot when ``profile.memory`` is
set on GPU. ``lmlab profile RUN`` prints the top operators of the newest trace by self time.

Usage::

    timer = StepTimer(device)
    with timer.phase("forward"):
        loss = model(x)
    row.update(timer.window(steps=10))        # {"time/forward_ms": ..., ...}, then the window restarts
    peak = device_peak_flops(device)          # FLOP/s of one device (0 when unknown)

    lmlab train cfg.yaml profile.trace_start=20 profile.trace_steps=3
    lmlab profile runs/NAME --top 25          # or a trace file; --sort total
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import platform
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

# Dense bf16 peak FLOP/s of one device, by a substring of its name (the MFU column's denominator)
CUDA_PEAKS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "RTX 4090": 165e12,
              "V100": 125e12, "T4": 65e12}

_NULL = contextlib.nullcontext()


class StepTimer:
    """Wall time of named phases, summed over a log window.

    ``phase(name)`` is a context manager (a shared no-op when disabled); ``add(name, seconds)`` records a time
    measured elsewhere; ``window(steps)`` returns ``{"time/NAME_ms": mean per step}`` for per-step phases and
    ``{"time/NAME_s": total}`` for the ``totals`` (evaluations, checkpoints) and starts a new window.
    On CUDA a phase records two events and their elapsed time is read when the window closes (the trainer reads a
    loss every step, so they have long completed by then).
    """

    def __init__(self, device: torch.device | str = "cpu", enabled: bool = True,
                 totals: tuple[str, ...] = ("eval", "ckpt")):
        self.enabled = enabled
        self.cuda = torch.device(device).type == "cuda"
        self.totals = totals
        self._sums: dict[str, float] = defaultdict(float)
        self._events: list[tuple[str, Any, Any]] = []

    def phase(self, name: str) -> contextlib.AbstractContextManager:
        if not self.enabled:
            return _NULL
        # totals (evaluations, checkpoints) are host work between steps: wall time on any device
        return self._cuda_phase(name) if self.cuda and name not in self.totals else self._cpu_phase(name)

    @contextlib.contextmanager
    def _cpu_phase(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._sums[name] += time.perf_counter() - t0

    @contextlib.contextmanager
    def _cuda_phase(self, name: str) -> Iterator[None]:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        try:
            yield
        finally:
            end.record()
            self._events.append((name, start, end))

    def add(self, name: str, seconds: float) -> None:
        if self.enabled:
            self._sums[name] += seconds

    def window(self, steps: int) -> dict[str, float]:
        """The window's figures (empty when disabled), then a fresh window."""
        if not self.enabled:
            return {}
        for name, start, end in self._events:
            end.synchronize()
            self._sums[name] += start.elapsed_time(end) / 1000.0
        self._events.clear()
        out = {}
        for name, total in self._sums.items():
            if name in self.totals:
                out[f"time/{name}_s"] = total
            else:
                out[f"time/{name}_ms"] = 1000.0 * total / max(steps, 1)
        self._sums.clear()
        return out


# ------------------------------------------------------------------------------------------------------------------
# Peak FLOP/s
# ------------------------------------------------------------------------------------------------------------------
def _cache_dir() -> Path:
    root = os.environ.get("LMLAB_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or
                                                         os.path.expanduser("~/.cache"), "lmlab")
    return Path(root)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure_matmul_flops(n: int = 1024, repeats: int = 8, dtype: torch.dtype = torch.float32,
                         device: str | torch.device = "cpu") -> float:
    """Best FLOP/s of an (n x n) @ (n x n) matmul over ``repeats`` runs (after one warm-up)."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    c = torch.empty(n, n, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    torch.mm(a, b, out=c)
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b, out=c)
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


def cpu_matmul_peak(threads: int | None = None, refresh: bool = False) -> float:
    """The float32 matmul FLOP/s this CPU reaches with ``threads`` torch threads (default: the current setting),
    measured once and cached in ``~/.cache/lmlab/peak_flops.json`` (``$LMLAB_CACHE``) per CPU model, thread count
    and torch version (~0.3 s the first time). ``refresh`` measures again and keeps the larger figure (a busy machine
    measures low; ``train.peak_flops`` overrides it)."""
    threads = threads or torch.get_num_threads()
    key = hashlib.sha1(f"{_cpu_name()}|{threads}|{torch.__version__}|float32".encode()).hexdigest()[:16]
    path = _cache_dir() / "peak_flops.json"
    cache: dict[str, Any] = {}
    if path.is_file():
        try:
            cache = json.loads(path.read_text())
        except ValueError:
            cache = {}
    cached = float(cache[key].get("flops", 0)) if isinstance(cache.get(key), dict) else 0.0
    if not refresh and cached > 0:
        return cached
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        # other work on the machine only lowers a measurement: the cache keeps the best one seen
        flops = max(measure_matmul_flops(), cached)
    finally:
        torch.set_num_threads(old)
    cache[key] = {"flops": flops, "cpu": _cpu_name(), "threads": threads, "torch": torch.__version__,
                  "measured": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, indent=1))
        tmp.replace(path)
    except OSError as e:  # a read-only home: measure again next time
        log.debug("could not cache the CPU peak in %s: %s", path, e)
    return flops


def device_peak_flops(device: torch.device, measure_cpu: bool = True) -> tuple[float, str]:
    """Peak FLOP/s of one device and where the figure comes from: the table for known CUDA devices (dense bf16),
    a measured float32 matmul on CPU (when ``measure_cpu``), else 0."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = next((p for key, p in CUDA_PEAKS.items() if key in name), 0.0)
        return peak, (f"table ({name})" if peak else f"unknown device {name}")
    if device.type == "cpu" and measure_cpu:
        return cpu_matmul_peak(), f"measured float32 matmul, {torch.get_num_threads()} threads"
    return 0.0, "unknown"


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far: the CUDA allocator's peak on GPU, the process's peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# ------------------------------------------------------------------------------------------------------------------
# torch.profiler window
# ------------------------------------------------------------------------------------------------------------------
class TraceWindow:
    """Runs optimizer steps ``start .. start + steps - 1`` under ``torch.profiler`` (after ``warmup`` untraced steps
    under it) and writes ``RUN/profile/trace_stepSTART[_rankR].json``; with ``memory`` on CUDA also a memory
    snapshot ``memory_stepSTART[_rankR].pickle``. ``begin(step)`` before each step, ``end(step)`` after it; a run
    resumed past the window traces nothing."""

    def __init__(self, cfg: Any, run_dir: Path, device: torch.device, rank: int = 0, world_size: int = 1):
        self.cfg = cfg
        self.dir = Path(run_dir) / "profile"
        self.device = device
        self.suffix = f"_rank{rank}" if world_size > 1 else ""
        self.first = cfg.trace_start - cfg.trace_warmup  # the first step run under the profiler
        self.last = cfg.trace_start + cfg.trace_steps - 1
        self._prof: Any = None
        self.trace_path: Path | None = None

    def begin(self, step: int) -> None:
        if self._prof is not None or step != self.first:
            return
        from torch.profiler import ProfilerActivity, profile, schedule

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        self.dir.mkdir(parents=True, exist_ok=True)
        self.trace_path = self.dir / f"trace_step{self.cfg.trace_start}{self.suffix}.json"
        path = self.trace_path

        def ready(prof: Any) -> None:
            prof.export_chrome_trace(str(path))

        self._prof = profile(activities=activities, record_shapes=self.cfg.record_shapes,
                             with_stack=self.cfg.with_stack, profile_memory=self.cfg.memory,
                             schedule=schedule(wait=0, warmup=self.cfg.trace_warmup, active=self.cfg.trace_steps,
                                               repeat=1),
                             on_trace_ready=ready)
        if self.cfg.memory and self.device.type == "cuda":
            torch.cuda.memory._record_memory_history(max_entries=100_000)
        self._prof.__enter__()
        log.info("profiling steps %d..%d (%d warm-up) into %s", self.cfg.trace_start, self.last,
                 self.cfg.trace_warmup, path)

    def end(self, step: int) -> None:
        if self._prof is None:
            return
        self._prof.step()
        if step >= self.last:
            self.close()

    def close(self) -> None:
        """Stop the profiler (the trace is written when its active window completed)."""
        if self._prof is None:
            return
        prof, self._prof = self._prof, None
        prof.__exit__(None, None, None)
        if self.cfg.memory and self.device.type == "cuda":
            snap = self.dir / f"memory_step{self.cfg.trace_start}{self.suffix}.pickle"
            torch.cuda.memory._dump_snapshot(str(snap))
            torch.cuda.memory._record_memory_history(enabled=None)
            log.info("CUDA memory snapshot: %s (open it at pytorch.org/memory_viz)", snap)
        if self.trace_path is not None and self.trace_path.is_file():
            log.info("trace written: %s (open it in ui.perfetto.dev; `lmlab profile` lists its top operators)",
                     self.trace_path)


# ------------------------------------------------------------------------------------------------------------------
# Reading traces: `lmlab profile`
# ------------------------------------------------------------------------------------------------------------------
class TraceError(ValueError):
    """A trace that cannot be read (missing, not JSON, no events); the message names the file."""


def load_trace_events(path: str | os.PathLike) -> list[dict[str, Any]]:
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TraceError(f"{p}: no such trace") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise TraceError(f"{p}: not a Chrome trace (JSON: {e})") from None
    events = data.get("traceEvents") if isinstance(data, dict) else data
    if not isinstance(events, list):
        raise TraceError(f"{p}: no traceEvents list")
    return [e for e in events if isinstance(e, dict)]


def top_operators(events: list[dict[str, Any]], categories: tuple[str, ...] = ("cpu_op",),
                  sort: str = "self") -> list[dict[str, Any]]:
    """Aggregate complete events (``ph == "X"``) of the given categories by name: calls, total time and self time
    (total minus the time of events of the same categories nested inside it on the same thread), in microseconds,
    sorted by ``sort`` ("self" or "total"), largest first."""
    by_thread: dict[tuple[Any, Any], list[dict[str, Any]]] = defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and e.get("cat") in categories and "dur" in e and "ts" in e:
            by_thread[(e.get("pid"), e.get("tid"))].append(e)
    stats: dict[str, dict[str, Any]] = {}
    for evs in by_thread.values():
        evs.sort(key=lambda e: (float(e["ts"]), -float(e["dur"])))
        stack: list[list[Any]] = []  # [end, event, child time]
        for e in evs:
            ts, dur = float(e["ts"]), float(e["dur"])
            while stack and stack[-1][0] <= ts:
                _close(stack.pop(), stats)
            if stack:
                stack[-1][2] += dur
            stack.append([ts + dur, e, 0.0])
        while stack:
            _close(stack.pop(), stats)
    key = "self_us" if sort == "self" else "total_us"
    return sorted(stats.values(), key=lambda s: s[key], reverse=True)


def _close(frame: list[Any], stats: dict[str, dict[str, Any]]) -> None:
    end, e, child = frame
    s = stats.setdefault(e["name"], {"name": e["name"], "calls": 0, "total_us": 0.0, "self_us": 0.0})
    s["calls"] += 1
    s["total_us"] += float(e["dur"])
    s["self_us"] += max(float(e["dur"]) - child, 0.0)


def find_trace(target: str | os.PathLike) -> Path:
    """A trace file, or the newest ``profile/trace_*.json`` of a run folder."""
    p = Path(target)
    if p.is_file():
        return p
    if not p.is_dir():
        raise TraceError(f"{p}: neither a run folder nor a trace file")
    traces = sorted((p / "profile").glob("trace_*.json"), key=lambda f: f.stat().st_mtime)
    if not traces:
        raise TraceError(f"{p}: no profile/trace_*.json; train with profile.trace_start=N to record one")
    return traces[-1]


def format_top(rows: list[dict[str, Any]], top: int, title: str) -> str:
    total_self = sum(r["self_us"] for r in rows) or 1.0
    width = min(max((len(r["name"]) for r in rows[:top]), default=10), 70)
    lines = [title, f"{'operator':<{width}}  {'calls':>7}  {'self ms':>10}  {'self %':>6}  {'total ms':>10}"]
    for r in rows[:top]:
        name = r["name"] if len(r["name"]) <= width else r["name"][: width - 3] + "..."
        lines.append(f"{name:<{width}}  {r['calls']:>7}  {r['self_us'] / 1000:>10.2f}  "
                     f"{100 * r['self_us'] / total_self:>5.1f}%  {r['total_us'] / 1000:>10.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``lmlab profile RUN|TRACE [--top N] [--sort self|total]``."""
    parser = argparse.ArgumentParser(prog="lmlab profile", description="Print the top operators of a torch.profiler "
                                     "trace: a run folder's newest profile/trace_*.json, or a trace file.")
    parser.add_argument("target", help="run folder (runs/NAME) or a Chrome trace JSON file")
    parser.add_argument("--top", type=int, default=20, help="operators listed (default 20)")
    parser.add_argument("--sort", choices=("self", "total"), default="self",
                        help="order by self time (default) or total time including nested operators")
    args = parser.parse_args(argv)
    if args.top <= 0:
        print("error: --top must be positive", file=sys.stderr)
        return 2
    try:
        path = find_trace(args.target)
        events = load_trace_events(path)
    except TraceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    cpu = top_operators(events, ("cpu_op",), args.sort)
    if not cpu:
        print(f"error: {path}: no operator events (cpu_op) in the trace", file=sys.stderr)
        return 1
    print(format_top(cpu, args.top, f"{path}: CPU operators by {args.sort} time"))
    gpu = top_operators(events, ("kernel", "gpu_memcpy", "gpu_memset"), args.sort)
    if gpu:
        print()
        print(format_top(gpu, args.top, "GPU kernels"))
    return 0
