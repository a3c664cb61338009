"""Load many run folders into records for analysis: config, summary and metrics of each run.

Analysis reads only run folders (DESIGN.md principle 3): every folder holding a ``config.yaml``, found
recursively, so grids that nest runs as ``runs/GRID/POINT`` are picked up too.

Loading is built for a thousand runs in seconds: YAML goes through libyaml's ``CSafeLoader`` when PyYAML has
it (the pure-Python loader is ~10x slower on a resolved config), a metrics file is parsed with one
``json.loads`` call, and the walk never descends into ``checkpoints/``. How metrics rows are read back
(``lmlab.monitor.metrics.read_metrics``): rows of steps that a resumed run re-did are dropped, rows of
different kinds at the same step (a training row and the recall evaluation of that step) are both kept, and a
malformed line (say, one cut short by a crash) is skipped with a warning instead of losing the run.

Usage::

    from lmlab.analysis import load_runs, write_csv
    runs = load_runs("runs/memory")                     # or a list of roots / glob patterns
    for r in runs:
        steps, losses = r.series("loss")
        print(r.name, r.flat_config["model.dim"], r.final("loss"), r.best("val_loss", mode="min"),
              r.first_step_reaching("recall/train/correct", 0.95))
    write_csv([{"name": r.name, "loss": r.final("loss")} for r in runs], "out/results.csv")
"""

from __future__ import annotations

import csv
import glob
import json
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from lmlab.monitor.metrics import read_metrics

log = logging.getLogger(__name__)

__all__ = ["RunRecord", "flatten", "load_run", "load_runs", "write_csv"]

_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when PyYAML was built with it


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_YAML_LOADER)  # noqa: S506 (a safe loader)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mapping -> ``{"a.b.c": value}`` (lists and other values are kept as they are)."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


@dataclass
class RunRecord:
    """One run folder: its name (relative to the root it was found under), config, summary and metric rows."""

    name: str
    path: Path
    config: dict[str, Any]
    summary: dict[str, Any] = field(default_factory=dict)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    flat_config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.flat_config:
            self.flat_config = flatten(self.config)

    def get(self, dotted: str, default: Any = None) -> Any:
        """A config value by dotted key (``"model.dim"``, ``"tags.mode"``)."""
        return self.flat_config.get(dotted, default)

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """``(steps, values)`` of the rows that carry ``key`` as a finite number, in step order."""
        steps, values = [], []
        for row in self.metrics:
            v = _number(row.get(key))
            if v is not None:
                steps.append(int(row["step"]))
                values.append(v)
        return steps, values

    def final(self, key: str) -> float | None:
        """The value of ``key`` at the last step that logged it (None if never)."""
        _, values = self.series(key)
        return values[-1] if values else None

    def best(self, key: str, mode: Literal["max", "min"] = "max") -> float | None:
        """The largest (``mode="max"``) or smallest (``"min"``) logged value of ``key`` (None if never)."""
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        _, values = self.series(key)
        if not values:
            return None
        return max(values) if mode == "max" else min(values)

    def first_step_reaching(self, key: str, threshold: float, mode: Literal["max", "min"] = "max") -> int | None:
        """The first step where ``key`` is >= threshold (``mode="max"``) or <= it (``"min"``); None if never."""
        for step, v in zip(*self.series(key)):
            if (v >= threshold) if mode == "max" else (v <= threshold):
                return step
        return None


def load_run(path: str | os.PathLike, name: str | None = None) -> RunRecord:
    """Read one run folder (config.yaml required; summary.json and metrics.jsonl optional)."""
    p = Path(path)
    config = _load_yaml((p / "config.yaml").read_text(encoding="utf-8")) or {}
    if not isinstance(config, dict):
        raise ValueError(f"{p / 'config.yaml'}: expected a mapping, got {type(config).__name__}")
    summary: dict[str, Any] = {}
    if (p / "summary.json").is_file():
        try:
            loaded = json.loads((p / "summary.json").read_text(encoding="utf-8"))
            summary = loaded if isinstance(loaded, dict) else {}
        except ValueError as e:
            log.warning("%s: unreadable summary.json (%s); ignored", p, e)
    metrics = read_metrics(p / "metrics.jsonl") if (p / "metrics.jsonl").is_file() else []
    return RunRecord(name=name or str(config.get("name") or p.name), path=p, config=config, summary=summary,
                     metrics=metrics)


def _run_dirs(root: Path) -> Iterable[Path]:
    if (root / "config.yaml").is_file():
        yield root
    if root.is_dir():
        found = []
        seen: set[tuple[int, int]] = set()
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):  # runs linked into a folder count
            st = os.stat(dirpath)
            if (st.st_dev, st.st_ino) in seen:  # a link back up the tree: do not loop
                dirnames[:] = []
                continue
            seen.add((st.st_dev, st.st_ino))
            dirnames[:] = [d for d in dirnames if d != "checkpoints"]  # checkpoint folders are not runs (and big)
            if "config.yaml" in filenames and dirpath != os.fspath(root):
                found.append(Path(dirpath))
        yield from sorted(found)


def load_runs(roots: str | os.PathLike | Sequence[str | os.PathLike]) -> list[RunRecord]:
    """Every run folder (one with a config.yaml) under the given root(s) or glob pattern(s), sorted by name.

    A run's name is its path relative to the root (``grid/point``), or the folder name for a run given
    directly. Folders inside ``checkpoints/`` are not runs.
    """
    items = [roots] if isinstance(roots, (str, os.PathLike)) else list(roots)
    records: dict[Path, RunRecord] = {}
    for item in items:
        text = os.fspath(item)
        matches = sorted(glob.glob(text)) if glob.has_magic(text) else [text]
        for match in matches:
            root = Path(match)
            for run_dir in _run_dirs(root):
                key = run_dir.resolve()
                if key in records:
                    continue
                rel = run_dir.relative_to(root).as_posix() if run_dir != root else run_dir.name
                try:
                    records[key] = load_run(run_dir, name=rel)
                except (OSError, ValueError, yaml.YAMLError) as e:
                    log.warning("skipping %s: %s", run_dir, e)
    return sorted(records.values(), key=lambda r: r.name)


def column_order(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The keys of ``rows`` in order of first appearance."""
    return list(dict.fromkeys(k for row in rows for k in row))


def write_csv(rows: Sequence[dict[str, Any]], path: str | os.PathLike,
              columns: Sequence[str] | None = None) -> Path:
    """Write rows as CSV. Columns: ``columns`` if given, else the keys in order of first appearance."""
    columns = list(columns) if columns is not None else column_order(rows)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    return p
