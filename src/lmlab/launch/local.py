"""Run many configs (a grid) as training subprocesses on this machine, skipping finished runs.

Each run is ``python -m lmlab.train RUN_DIR/launch.yaml train.threads=T`` with stdout and stderr appended to
``RUN_DIR/train.log``; at most ``jobs`` run at once. A run whose ``summary.json`` says it finished
("completed" or "stopped ...") is skipped, a run folder with a checkpoint is resumed by the trainer itself.
A failing run is reported with the tail of its log and does not stop the others. Ctrl-C or SIGTERM sends
SIGTERM to every running child (each finishes its step, checkpoints and exits 143), waits for them, then
raises :class:`GridInterrupted`, so launching the grid again picks up where it stopped.

Usage::

    from lmlab.config import load_grid
    from lmlab.launch import run_grid, run_state
    configs = load_grid("apps/memory/grid.yaml")
    for cfg in configs:
        print(cfg.name, run_state(cfg.run_dir))       # done / partial / new
    outcomes = run_grid(configs, jobs=2)              # threads per run default to cpu_count // jobs
    failed = [o for o in outcomes if o.status == "failed"]

The executor is pluggable: anything with ``start(cmd, log_path, env) -> handle`` where the handle has
``poll()``, ``terminate()`` and ``wait()`` (as :class:`subprocess.Popen` does) can replace
:class:`LocalExecutor`, e.g. a Slurm executor built on submitit.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from lmlab.config import ConfigError, config_diff, config_to_dict, load_config, save_config

logger = logging.getLogger(__name__)

RunState = Literal["done", "partial", "new"]


class GridInterrupted(KeyboardInterrupt):
    """The grid was stopped by SIGINT or SIGTERM after its running children were told to checkpoint and exit."""

    def __init__(self, signum: int):
        super().__init__(f"grid interrupted by {signal.Signals(signum).name}")
        self.signum = signum

    def report(self) -> int:
        """Say on stderr that the grid stopped and how to resume it; returns the exit status (128 + signal)."""
        print(f"{self}: the running runs saved checkpoints; the same command resumes the grid", file=sys.stderr)
        return 128 + self.signum


def exit_on_grid_interrupt(fn: Callable[..., int]) -> Callable[..., int]:
    """Decorator for grid apps' entry points: a :class:`GridInterrupted` (the runs have saved their checkpoints)
    ends the command with one line on stderr and exit status 128 + the signal, not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> int:
        try:
            return fn(*args, **kwargs)
        except GridInterrupted as e:
            return e.report()

    return wrapper


@dataclass
class RunOutcome:
    """What happened to one run of a grid: status "done" (skipped, already finished), "ran" or "failed"."""

    name: str
    status: Literal["done", "ran", "failed"]
    returncode: int | None
    seconds: float
    run_dir: Path | None = None
    log_tail: str = ""


def read_summary(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The run's ``summary.json`` as a dict, or {} when it is missing or unreadable."""
    path = Path(run_dir) / "summary.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def is_finished(run_dir: str | os.PathLike, steps: int | None = None) -> bool:
    """True when summary.json says the run completed or was stopped by a stop condition (e.g. train.max_time).

    ``steps``: the steps the config asks for now; a run that completed fewer (``train.steps`` was raised
    since) is not finished: launching it again resumes it to the new count.
    """
    summary = read_summary(run_dir)
    status = str(summary.get("status", ""))
    if status == "completed":
        done = summary.get("step")
        return steps is None or not isinstance(done, int) or done >= steps
    return status.startswith("stopped")


def changed_since(cfg: Any) -> list[str]:
    """What differs between ``cfg`` and the config its run folder's run trained with (``config.yaml``), as
    :func:`lmlab.config.config_diff` lines; the thread count, which the launcher sets per launch, is left out.
    Empty when the folder holds no config; one line saying so when it cannot be read."""
    saved = Path(cfg.run_dir) / "config.yaml"
    if not saved.is_file():
        return []
    try:
        old = config_to_dict(load_config(saved, schema=type(cfg)))
    except Exception as e:  # noqa: BLE001 - an old or foreign config: report it, never fail the grid over it
        return [f"{saved} unreadable ({e})"]
    return [c for c in config_diff(old, config_to_dict(cfg)) if not c.startswith("train.threads:")]


ATTEMPT_FILE = "attempt.json"


def read_attempt(run_dir: Path) -> dict[str, Any]:
    """The attempt a run folder trains (train.restart): ``{"attempt": k, "seed_offset": n, "history": [...]}``;
    attempt 0, offset 0 when the folder has no ``attempt.json``."""
    path = Path(run_dir) / ATTEMPT_FILE
    if not path.is_file():
        return {"attempt": 0, "seed_offset": 0, "history": []}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return {"attempt": int(data["attempt"]), "seed_offset": int(data["seed_offset"]),
                "history": list(data.get("history", []))}
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{path}: not a readable attempt record ({e}); it names the seed offset of this run's "
                          "checkpoints: restore it, or delete the run folder to start over") from None


def has_checkpoint(run_dir: str | os.PathLike) -> bool:
    """True when the run folder holds at least one complete checkpoint (the trainer resumes from it)."""
    # The layout of lmlab.train.checkpoint (step_N/meta.json), read without importing torch.
    return any((Path(run_dir) / "checkpoints").glob("step_*/meta.json"))


def run_state(run_dir: str | os.PathLike, steps: int | None = None) -> RunState:
    """"done" (finished, see :func:`is_finished`), "partial" (has a checkpoint to resume from) or "new"."""
    if is_finished(run_dir, steps):
        return "done"
    return "partial" if has_checkpoint(run_dir) else "new"


def log_tail(path: str | os.PathLike, lines: int = 20) -> str:
    """The last ``lines`` lines of a text file ("" if it cannot be read)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    # tqdm redraws with carriage returns: keep the last state of each line
    out = [ln.rsplit("\r", 1)[-1] for ln in text.splitlines()]
    return "\n".join(out[-lines:])


class RunHandle(Protocol):
    """A started run (subprocess.Popen fits): ``poll`` is None while it runs, then the exit status."""

    def poll(self) -> int | None: ...

    def terminate(self) -> None: ...

    def wait(self, timeout: float | None = None) -> int: ...


class Executor(Protocol):
    """Starts one training command; returns a handle to watch and stop it."""

    def start(self, cmd: Sequence[str], log_path: Path, env: dict[str, str]) -> RunHandle: ...


class LocalExecutor:
    """Runs each command as a subprocess of this machine, in its own session (a terminal's Ctrl-C reaches
    only the grid runner, which forwards exactly one SIGTERM: a second signal would make the trainer stop
    without saving)."""

    def start(self, cmd: Sequence[str], log_path: Path, env: dict[str, str]) -> RunHandle:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as f:  # the child keeps its own copy of the descriptor
            f.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
            f.flush()
            return subprocess.Popen(list(cmd), stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=env, start_new_session=True)


@dataclass
class _Running:
    name: str
    run_dir: Path
    handle: RunHandle
    t0: float = field(default_factory=time.time)


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask: a Slurm allocation or a container's cpuset, not the
    whole host as ``os.cpu_count()`` counts), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # no affinity masks on this platform (macOS)
        return max(1, os.cpu_count() or 1)


def default_threads(jobs: int) -> int:
    """CPU threads per run when ``jobs`` run at once: the usable cores shared evenly, at least 1."""
    return max(1, usable_cpus() // max(1, jobs))


def _fmt_time(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def run_grid(
    configs: Sequence[Any],
    jobs: int = 1,
    threads: int | None = None,
    log: Callable[[str], Any] = print,
    executor: Executor | None = None,
    poll_interval: float = 0.2,
) -> list[RunOutcome]:
    """Train every config that has not finished, ``jobs`` at a time; return one outcome per config, in order.

    ``threads``: CPU threads per run (``OMP_NUM_THREADS`` and ``train.threads``); None: a thread count set in
    the config wins, else ``cpu_count // jobs``. Raises :class:`GridInterrupted` on SIGINT/SIGTERM after the
    running children have saved and exited.
    """
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    executor = executor or LocalExecutor()
    t_grid = time.time()
    outcomes: dict[int, RunOutcome] = {}
    pending: list[int] = []
    for i, cfg in enumerate(configs):
        if is_finished(cfg.run_dir, cfg.train.steps):
            outcomes[i] = RunOutcome(cfg.name, "done", None, 0.0, Path(cfg.run_dir))
            changed = changed_since(cfg)
            note = ""
            if changed:  # finished under another config (e.g. an edited preset): its results are the old config's
                more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
                note = (f"; its config.yaml differs from this one: {'; '.join(changed[:3])}{more} (delete "
                        f"{cfg.run_dir} to train it again)")
            log(f"[skip] {cfg.name}: already finished{note}")
        else:
            pending.append(i)
    total = len(pending)
    running: dict[int, _Running] = {}
    finished = 0

    def start(i: int) -> None:
        cfg = configs[i]
        run_dir = Path(cfg.run_dir)
        n_threads = threads or (cfg.train.threads if getattr(cfg.train, "threads", 0) else default_threads(jobs))
        launch = save_config(cfg, run_dir / "launch.yaml")
        cmd = [sys.executable, "-m", "lmlab.train", str(launch), f"train.threads={n_threads}"]
        env = {**os.environ, "OMP_NUM_THREADS": str(n_threads), "PYTHONUNBUFFERED": "1"}
        state = "resume" if has_checkpoint(run_dir) else "start"
        running[i] = _Running(cfg.name, run_dir, executor.start(cmd, run_dir / "train.log", env))
        log(f"[{state}] {cfg.name} ({len(running)} running, {total - finished - len(running)} waiting, "
            f"{n_threads} threads) log: {run_dir / 'train.log'}")

    def reap(i: int, rc: int) -> None:
        nonlocal finished
        r = running.pop(i)
        finished += 1
        dt = time.time() - r.t0
        progress = f"{finished}/{total}, grid {_fmt_time(time.time() - t_grid)}"
        if rc == 0:
            outcomes[i] = RunOutcome(r.name, "ran", rc, dt, r.run_dir)
            log(f"[done] {r.name} in {_fmt_time(dt)} ({progress})")
        else:
            tail = log_tail(r.run_dir / "train.log")
            outcomes[i] = RunOutcome(r.name, "failed", rc, dt, r.run_dir, tail)
            indented = "\n".join("    " + ln for ln in tail.splitlines()[-10:] if ln.strip())
            log(f"[FAILED] {r.name}: exit status {rc} after {_fmt_time(dt)} ({progress}); "
                f"end of {r.run_dir / 'train.log'}:\n{indented}")

    def on_signal(signum: int, frame: Any) -> None:
        raise GridInterrupted(signum)

    old_handlers: dict[int, Any] = {}
    try:
        for s in (signal.SIGINT, signal.SIGTERM):
            old_handlers[s] = signal.signal(s, on_signal)
    except ValueError:  # not the main thread: the caller handles signals
        old_handlers = {}
    queue = list(pending)
    try:
        while queue or running:
            while queue and len(running) < jobs:
                start(queue.pop(0))
            for i in list(running):
                rc = running[i].handle.poll()
                if rc is not None:
                    reap(i, rc)
            if running:
                time.sleep(poll_interval)
    except KeyboardInterrupt as e:  # GridInterrupted included
        signum = e.signum if isinstance(e, GridInterrupted) else signal.SIGINT
        for s in old_handlers:  # a second Ctrl-C while waiting stops the wait, not the children's saves
            signal.signal(s, signal.SIG_IGN)
        log(f"[interrupt] {signal.Signals(signum).name}: asking {len(running)} running run(s) to checkpoint "
            "and exit")
        for r in running.values():
            try:
                r.handle.terminate()
            except OSError:
                pass
        for r in running.values():
            rc = r.handle.wait()
            log(f"[stopped] {r.name}: exit status {rc}")
        if isinstance(e, GridInterrupted):
            raise
        raise GridInterrupted(signal.SIGINT) from None
    finally:
        for s, h in old_handlers.items():
            signal.signal(s, h)
    ran = sum(o.status == "ran" for o in outcomes.values())
    failed = sum(o.status == "failed" for o in outcomes.values())
    log(f"grid: {ran} ran, {failed} failed, {len(configs) - total} already done in {_fmt_time(time.time() - t_grid)}")
    return [outcomes[i] for i in range(len(configs))]


def grid_app_arguments(parser: Any, default_grid: str, jobs: int = 2, report_help: str = "") -> Any:
    """The flags every grid app shares (apps/memory, apps/zoology, ...): ``--grid``, ``--jobs``, ``--threads``,
    ``--report-only``; the app adds its own, then :func:`parse_grid_app` adds the trailing overrides and parses."""
    parser.add_argument("--grid", default=default_grid, help=f"grid YAML (default: {Path(default_grid).name})")
    parser.add_argument("--jobs", type=int, default=jobs,
                        help="runs trained at once (threads are split between them; default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run (default: train.threads if "
                        "set, else cpus // jobs, at least 1)")
    parser.add_argument("--report-only", action="store_true",
                        help=report_help or "train nothing: evaluate finished runs and rebuild the report")
    return parser


def parse_grid_app(parser: Any, argv: list[str] | None) -> tuple[Any, list]:
    """Parse a grid app's command line (overrides last), set up logging, and load the grid: ``(args, configs)``."""
    import logging

    from lmlab.config import load_grid

    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides applied to every run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args, load_grid(args.grid, args.overrides)
