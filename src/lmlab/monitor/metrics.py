"""Metrics sinks: ``metrics.jsonl`` in the run folder (always), optionally wandb and TensorBoard.

Every row is one JSON object with a ``step`` and plain numbers; training rows, validation rows (``val_*`` keys) and
other evaluations (``recall/...``) share the file. Analysis code reads only this file, so a resumed run appends to
it and rows of steps that are re-done after a resume are dropped when it is read back (:func:`read_metrics`).

A resumed run (same process, or a new one after a Slurm requeue) continues the same wandb run and the same
TensorBoard log, and each step shows once in both:

- **TensorBoard** (``RUN/tb``): a writer opened on a folder that already holds event files writes a purge marker
  (``SummaryWriter(purge_step=start_step + 1)``): TensorBoard hides every event of an earlier writer at a step after
  ``start_step``, so re-done steps show with their new values only. Only finite numbers are written (None, NaN,
  strings and booleans are skipped).
- **wandb**: the run id is made once and kept in ``RUN/wandb_id`` (a renamed ``cfg.name`` changes the display name
  only). Rows are logged with the trainer's step as the x-axis metric ``trainer/step``
  (``define_metric("*", step_metric="trainer/step")``), never as wandb's own ``step``, so re-done steps are accepted
  (wandb drops rows whose ``step`` goes backwards). Offline (the default), ``RUN/wandb`` holds one complete run: a
  resume moves the earlier offline folders to ``RUN/wandb/superseded/`` and replays ``metrics.jsonl`` up to
  ``start_step`` into a fresh one, so ``wandb sync RUN/wandb`` uploads every step once. Online, the run is resumed
  (``resume="allow"``); wandb's history is append-only there, so the rows of re-done steps logged before the crash
  stay beside the new ones (offline logging, then ``wandb sync``, avoids that). Everything wandb writes goes under
  ``RUN/wandb`` (its service log and caches too, unless ``WANDB_CACHE_DIR`` / ``WANDB_DATA_DIR`` are set); it prints
  nothing, captures no console output, collects no system metrics, and its service process ends with the sink.

Usage::

    sink = build_sinks(cfg, run_dir, start_step=step)   # on rank 0 only; step: where a resumed run goes on from
    sink.log({"step": 10, "loss": 2.3, "lr": 1e-3})
    sink.close()
    rows = read_metrics(run_dir / "metrics.jsonl")
    wandb_run_id(run_dir)                               # the run's wandb id (made and stored on first use)

``lmlab sync RUN --to wandb|tensorboard`` (lmlab.monitor.sync) replays a run folder into either sink afterwards.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import secrets
import shutil
import string
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

WANDB_ID_FILE = "wandb_id"
STEP_METRIC = "trainer/step"  # wandb's x-axis for every metric: the trainer's step


class JsonlSink:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = self.path.open("a", buffering=1)

    def log(self, row: dict[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        self._f.write(json.dumps(clean) + "\n")

    def close(self) -> None:
        self._f.close()


def _finite_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def wandb_run_id(run_dir: str | os.PathLike, create: bool = True) -> str | None:
    """The run folder's wandb run id, from ``RUN/wandb_id``. Made on first use (``create``): the id of the newest
    wandb folder already in ``RUN/wandb`` (a run logged before the id was stored, under its name), else 8 random
    lowercase letters and digits. Written atomically (a concurrent maker's id wins); None when absent and not
    ``create``."""
    path = Path(run_dir) / WANDB_ID_FILE
    if path.is_file() and (stored := path.read_text(encoding="utf-8").strip()):
        return stored
    if not create:
        return None
    segments = sorted(Path(run_dir).glob("wandb/*/run-*.wandb"), key=lambda p: p.stat().st_mtime)
    if segments:
        new = segments[-1].stem.removeprefix("run-")
    else:
        new = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{WANDB_ID_FILE}.{os.getpid()}.tmp")
    tmp.write_text(new + "\n", encoding="utf-8")
    try:
        if path.is_file():  # empty (cut short): replace it
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails if another process stored one meanwhile
    except FileExistsError:  # theirs wins
        pass
    finally:
        tmp.unlink(missing_ok=True)
    return path.read_text(encoding="utf-8").strip()


@contextlib.contextmanager
def _wandb_env(wandb_dir: Path) -> Iterator[None]:
    """While wandb starts its service process: the service log and caches it writes under ``wandb_dir`` instead of
    ``~/.cache/wandb`` (unless the user chose other folders)."""
    changes = {k: str(wandb_dir / sub) for k, sub in (("WANDB_CACHE_DIR", "cache"), ("WANDB_DATA_DIR", "data"))
               if k not in os.environ}
    os.environ.update(changes)
    try:
        yield
    finally:
        for k in changes:
            os.environ.pop(k, None)


def supersede_offline_runs(wandb_dir: Path, run_id: str, keep: Path | None = None) -> list[Path]:
    """Move the offline run folders of ``run_id`` in ``wandb_dir`` but ``keep`` to ``wandb_dir/superseded/`` (out
    of the reach of ``wandb sync wandb_dir``, which looks one level down); returns their new paths."""
    moved = []
    for seg in sorted(wandb_dir.glob(f"offline-run-*-{run_id}*")):
        if keep is not None and seg.resolve() == keep.resolve():
            continue
        if seg.is_dir() and not seg.is_symlink() and (seg / f"run-{run_id}.wandb").is_file():
            dest = wandb_dir / "superseded" / seg.name
            dest.parent.mkdir(exist_ok=True)
            if dest.exists():
                shutil.rmtree(dest)
            moved.append(Path(shutil.move(str(seg), dest)))
    return moved


class WandbSink:
    """Rows to a wandb run that a resume continues (see the module docstring).

    ``start_step``: the step a resumed run goes on from. Offline, the rows of ``RUN/metrics.jsonl`` up to it are
    replayed into a fresh offline run that replaces the earlier ones. ``resume``: wandb's ``resume`` online
    ("allow": continue the run or make it; "never": fail if it exists)."""

    def __init__(self, run_dir: str | os.PathLike, project: str, name: str, mode: str = "offline",
                 config: dict | None = None, start_step: int | float = 0, resume: str = "allow"):
        try:
            import wandb
        except ImportError:
            from lmlab.config import ConfigError

            raise ConfigError("logging.wandb=true needs wandb (pip install wandb); or set logging.wandb=false") \
                from None
        self.run_dir = Path(run_dir)
        self.mode = mode
        self.id = wandb_run_id(self.run_dir)
        wandb_dir = self.run_dir / "wandb"
        wandb_dir.mkdir(parents=True, exist_ok=True)
        history: list[dict[str, Any]] = []
        metrics = self.run_dir / "metrics.jsonl"
        if mode == "offline" and start_step > 0 and metrics.is_file():
            history = [r for r in read_metrics(metrics) if r["step"] <= start_step]
        settings = wandb.Settings(silent=True, console="off", x_disable_stats=True, x_disable_meta=True,
                                  x_disable_machine_info=True, x_save_requirements=False, disable_git=True,
                                  save_code=False)
        with _wandb_env(wandb_dir):
            # offline, the folder is the whole run (replayed history included): a fresh run, not a resumed one
            self._run = wandb.init(project=project, name=name, id=self.id, mode=mode, dir=str(self.run_dir),
                                   config=config or {}, resume=None if mode == "offline" else resume,
                                   settings=settings)
        if mode == "offline":  # only once the new run exists: a failed start leaves the earlier ones in place
            moved = supersede_offline_runs(wandb_dir, self.id, keep=self.dir)
            if moved:
                log.info("wandb: %d earlier offline run folder(s) of %s moved to %s; metrics.jsonl up to step %s "
                         "replayed into %s", len(moved), self.id, wandb_dir / "superseded", start_step, self.dir)
        self._run.define_metric(STEP_METRIC)
        self._run.define_metric("*", step_metric=STEP_METRIC)
        for row in history:
            self.log(row)

    @property
    def dir(self) -> Path:
        """The folder of this wandb run (``RUN/wandb/offline-run-...`` offline)."""
        return Path(self._run.dir).parent

    def log(self, row: dict[str, Any]) -> None:
        data = {k: v for k, v in row.items() if k != "step" and v is not None
                and not (isinstance(v, float) and not math.isfinite(v))}
        data[STEP_METRIC] = row["step"]
        self._run.log(data)

    def close(self) -> None:
        import wandb

        self._run.finish()
        if wandb.run is None:  # end wandb's service process with the run (else it lives until the process exits)
            wandb.teardown()


class TensorboardSink:
    """Finite numbers to TensorBoard event files in ``log_dir``; on a folder that already has event files, events
    of earlier writers at steps after ``start_step`` are purged (hidden by TensorBoard)."""

    def __init__(self, log_dir: str | os.PathLike, start_step: int = 0, flush_secs: int = 10):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            from lmlab.config import ConfigError

            raise ConfigError("logging.tensorboard=true needs tensorboard (pip install tensorboard), or set "
                              "logging.tensorboard=false") from None
        self.log_dir = Path(log_dir)
        resumed = any(self.log_dir.glob("events.out.tfevents.*"))
        self._w = SummaryWriter(str(self.log_dir), purge_step=start_step + 1 if resumed else None,
                                flush_secs=flush_secs)
        if resumed:  # the writer opens its file (with the purge marker) on the first event: open it now, so that a
            self._w._get_file_writer()  # run stopped before it logs anything still hides the steps it re-does

    def log(self, row: dict[str, Any]) -> None:
        for k, v in row.items():
            if k != "step" and _finite_number(v):
                self._w.add_scalar(k, v, row["step"])

    def close(self) -> None:
        self._w.close()


class MultiSink:
    def __init__(self, sinks: list):
        self.sinks = sinks

    def log(self, row: dict[str, Any]) -> None:
        for s in self.sinks:
            s.log(row)

    def close(self) -> None:
        for s in self.sinks:
            s.close()


def build_sinks(cfg: Any, run_dir: Path, start_step: int = 0) -> MultiSink:
    """The jsonl sink plus the optional ones the config turns on. ``start_step``: the step a resumed run continues
    from (rows of later steps logged before the resume are re-done)."""
    from lmlab.config import config_to_dict

    sinks: list = [JsonlSink(run_dir / "metrics.jsonl")]
    lc = cfg.logging
    try:
        if lc.wandb and lc.wandb_mode != "disabled":
            sinks.append(WandbSink(run_dir, lc.wandb_project, cfg.name, lc.wandb_mode, config_to_dict(cfg),
                                   start_step=start_step))
        if lc.tensorboard:
            sinks.append(TensorboardSink(run_dir / "tb", start_step=start_step))
    except BaseException:
        MultiSink(sinks).close()
        raise
    return MultiSink(sinks)


def read_metrics(path: str | os.PathLike, strict: bool = False) -> list[dict[str, Any]]:
    """Rows of a metrics.jsonl, in step order; when a resumed run re-did steps, only its rows of those steps stay.

    Rows of one process come in step order, several at a step with disjoint keys (training, validation, recall). A
    row whose step is below the last row's starts a re-done stretch: the earlier rows from its step on are dropped.
    A row that repeats a key already logged at its step (a re-done step; the final evaluation after a periodic one
    at the last step) replaces the earlier rows at that step that share a key with it. A malformed line (one cut
    by a crash) or a row without a numeric step is skipped with a warning naming the file and line; ``strict``
    raises ValueError instead. The file is parsed in one go when it is well formed (several times faster than
    line by line: analysis reads thousands of runs)."""
    p = Path(path)
    text = p.read_text(encoding="utf-8")
    lines = [(no, line) for no, line in enumerate(text.split("\n"), 1) if line.strip()]
    try:
        rows = list(zip((no for no, _ in lines), json.loads("[" + ",".join(line for _, line in lines) + "]")))
    except json.JSONDecodeError:
        rows = []
        for no, line in lines:
            try:
                rows.append((no, json.loads(line)))
            except json.JSONDecodeError as e:
                message = f"{p}:{no}: malformed JSON ({e.msg} at column {e.colno})"
                if strict:
                    raise ValueError(message) from None
                log.warning("%s; line skipped", message)
    kept: list[dict[str, Any]] = []
    for no, row in rows:
        step = row.get("step") if isinstance(row, dict) else None
        if not isinstance(step, (int, float)) or isinstance(step, bool) or not math.isfinite(step):
            message = f"{p}:{no}: not a metrics row (no numeric step)"
            if strict:
                raise ValueError(message)
            log.warning("%s; line skipped", message)
            continue
        keys = row.keys() - {"step"}
        if kept and kept[-1]["step"] > step:
            while kept and kept[-1]["step"] >= step:
                kept.pop()
        else:
            first = len(kept)
            while first and kept[first - 1]["step"] == step:
                first -= 1
            kept[first:] = [r for r in kept[first:] if not keys & (r.keys() - {"step"})]
        kept.append(row)
    return kept
