"""``lmlab sync``: replay run folders' ``metrics.jsonl`` into wandb or TensorBoard, after the fact.

For a run trained without a sink, or to rebuild one: the rows are read with
:func:`lmlab.monitor.metrics.read_metrics` (steps a resumed run re-did appear once, with their final values) and
written through the same sinks the trainer uses, so a synced run looks like one logged live:

- ``--to tensorboard``: event files in ``RUN/tb`` (``--out DIR``: in DIR; with several runs, in ``DIR/NAME`` each,
  NAME being the run folder's name, so that ``tensorboard --logdir DIR`` compares them). Replaying into a folder that
  already has event files (the live log, an earlier sync) purges them: TensorBoard shows only the replayed steps.
  The old files stay on disk (delete the folder first to save the space).
- ``--to wandb``: the run's wandb id (``RUN/wandb_id``, the one the live sink used; made if the run never logged
  to wandb), its name and config from ``RUN/config.yaml``, the project from ``--project`` or the config's
  ``logging.wandb_project``. Offline (default), the run's earlier offline folders (a live log, an earlier sync) move
  to ``RUN/wandb/superseded/`` and one complete offline run replaces them: no second run appears, and
  ``wandb sync RUN/wandb`` uploads it. ``--mode online`` uploads directly and refuses (wandb's ``resume="never"``) a
  run id the server already has: its history would be appended to, not replaced.

Exit status: 0 done; 1 a bad run folder (missing, no metrics.jsonl, a malformed line) or a sink that failed;
2 bad usage. Every RUN is checked before anything is written.

Usage::

    lmlab sync runs/NAME --to tensorboard && tensorboard --logdir runs/NAME/tb
    lmlab sync 'runs/grid-*' --to tensorboard --out runs/tb     # several runs (a quoted glob or many RUN args)
    lmlab sync runs/NAME --to wandb && wandb sync runs/NAME/wandb
    lmlab sync runs/NAME --to wandb --mode online --project lmlab
"""

from __future__ import annotations

import argparse
import glob
import logging
import math
import os
from pathlib import Path
from typing import Any

import yaml

from lmlab.monitor.metrics import TensorboardSink, WandbSink, read_metrics

log = logging.getLogger(__name__)


class SyncError(Exception):
    """A run folder that cannot be synced (exit status 1); the message names it."""


class UsageError(Exception):
    """Bad arguments (exit status 2)."""


def resolve_runs(patterns: list[str]) -> list[Path]:
    """Run folders named by the arguments (paths, or globs the shell left alone), each checked to hold a
    ``metrics.jsonl``; in the given order, without repeats."""
    runs: list[Path] = []
    for pat in patterns:
        if not os.path.exists(pat) and glob.has_magic(pat):
            matched = sorted(glob.glob(pat))
            if not matched:
                raise SyncError(f"no run folder matches {pat!r}")
        else:
            matched = [pat]
        for m in matched:
            run = Path(m)
            if not run.exists():
                raise SyncError(f"{run}: no such run folder")
            if not run.is_dir():
                raise SyncError(f"{run} is not a run folder (a folder runs/NAME with a metrics.jsonl)")
            if not (run / "metrics.jsonl").is_file():
                raise SyncError(f"{run} is not a run folder: it has no metrics.jsonl")
            if run.resolve() not in {r.resolve() for r in runs}:
                runs.append(run)
    return runs


def run_config(run_dir: Path) -> dict[str, Any]:
    """The run's saved config as a plain dict (``{}`` without a config.yaml); read as YAML, not validated, so that
    a run of an older lmlab still syncs."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return {}
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise SyncError(f"{path}: not valid YAML ({e})") from None
    return cfg if isinstance(cfg, dict) else {}


def load_rows(run_dir: Path) -> list[dict[str, Any]]:
    try:
        return read_metrics(run_dir / "metrics.jsonl", strict=True)
    except ValueError as e:  # a malformed line or a row without a step, named by file and line
        raise SyncError(str(e)) from None


def sync_tensorboard(run_dir: Path, rows: list[dict[str, Any]], out: Path) -> str:
    sink = TensorboardSink(out, start_step=0, flush_secs=120)
    try:
        for row in rows:
            sink.log(row)
    finally:
        sink.close()
    return str(out)


def sync_wandb(run_dir: Path, rows: list[dict[str, Any]], project: str | None, mode: str) -> str:
    cfg = run_config(run_dir)
    logging_cfg = cfg.get("logging") if isinstance(cfg.get("logging"), dict) else {}
    project = project or logging_cfg.get("wandb_project") or "lmlab"
    name = str(cfg.get("name") or run_dir.resolve().name)
    try:
        # offline: start_step=inf replays every row of metrics.jsonl into one fresh run replacing the earlier ones
        sink = WandbSink(run_dir, project, name, mode=mode, config=cfg, start_step=math.inf, resume="never")
    except Exception as e:  # noqa: BLE001 - wandb's errors (a server refusal, no login) come in many types
        raise SyncError(f"{run_dir}: wandb refused the run: {type(e).__name__}: {e}") from None
    try:
        if mode != "offline":  # offline, the sink replayed them already
            for row in rows:
                sink.log(row)
        where = f"{sink.dir} (upload: wandb sync {run_dir / 'wandb'})" if mode == "offline" else f"project {project}"
    finally:
        sink.close()
    return f"wandb run {sink.id} '{name}', {where}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmlab sync", description="Replay run folders' metrics.jsonl into wandb or TensorBoard (steps a "
        "resumed run re-did appear once). Offline wandb runs replace the run's earlier ones (same id); a TensorBoard "
        "folder that has events is purged and rewritten.",
        epilog="exit status: 0 done; 1 a bad run folder or a failed sink (one line on stderr); 2 bad usage.")
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run folder(s) runs/NAME, or a quoted glob")
    parser.add_argument("--to", required=True, choices=("wandb", "tensorboard"), help="the sink to replay into")
    parser.add_argument("--project", help="wandb project (default: the run's logging.wandb_project, else lmlab)")
    parser.add_argument("--mode", choices=("offline", "online"), default="offline",
                        help="wandb mode (default offline: RUN/wandb, then `wandb sync RUN/wandb` uploads it)")
    parser.add_argument("--out", help="TensorBoard folder (default RUN/tb; with several runs, OUT/NAME for each)")
    return parser


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()

    def error(message: str):  # one line, not argparse's usage block
        raise UsageError(message)

    parser.error = error  # type: ignore[method-assign]
    return parser.parse_args(argv)


def tensorboard_dirs(runs: list[Path], out: str | None) -> list[Path]:
    """Where each run's events go: RUN/tb; OUT for one run; OUT/NAME for several."""
    if not out:
        return [run / "tb" for run in runs]
    if len(runs) == 1:
        return [Path(out)]
    names = [run.resolve().name for run in runs]
    if clash := sorted({n for n in names if names.count(n) > 1}):
        raise UsageError(f"several runs are named {clash[0]!r}: with --out, sync them one at a time")
    return [Path(out) / name for name in names]


def _check_installed(to: str) -> None:
    import importlib.util

    module, package = ("wandb", "wandb") if to == "wandb" else ("tensorboard", "tensorboard")
    if importlib.util.find_spec(module) is None:
        raise SyncError(f"--to {to} needs {package} (pip install {package})")


def main(argv: list[str] | None = None) -> int:
    """``lmlab sync ...``: 0 on success, 2 on bad usage, 1 when a run cannot be synced."""
    from lmlab.commands import run_command

    return run_command(_run, argv, UsageError, SyncError, prog="lmlab sync")


def _run(argv: list[str] | None) -> int:
    args = _parse(argv)
    if args.to == "tensorboard" and (args.project or args.mode != "offline"):
        raise UsageError("--project and --mode are for --to wandb")
    if args.to == "wandb" and args.out:
        raise UsageError("--out is for --to tensorboard (wandb writes RUN/wandb)")
    _check_installed(args.to)
    runs = resolve_runs(args.runs)
    outs = tensorboard_dirs(runs, args.out) if args.to == "tensorboard" else [None] * len(runs)
    todo = [(run, load_rows(run), out) for run, out in zip(runs, outs)]  # all checked before any is written
    for run, rows, out in todo:
        if out is not None:
            dest = sync_tensorboard(run, rows, out)
        else:
            dest = sync_wandb(run, rows, args.project, args.mode)
        steps = f"steps {rows[0]['step']}..{rows[-1]['step']}" if rows else "no steps"
        print(f"{run}: {len(rows)} rows ({steps}) -> {dest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
