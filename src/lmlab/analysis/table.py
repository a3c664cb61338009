"""Many runs as one pandas table: one row per run (config, summary, final and best metrics), and curves in long form.

Columns of :func:`runs_table`, in this order:

- ``name`` (the run's path relative to the root it was found under), ``path``, ``steps`` (the largest step in
  its metrics.jsonl, an integer column; <NA> without metrics);
- every config key, flattened with dots as in the config tree: ``model.dim``, ``optim.lr``, ``tags.mode``
  (lists become tuples, so that any column can be grouped on); a top-level key that is one of the three above
  (the config's own ``name``) is prefixed ``config.``;
- every ``summary.json`` field, prefixed ``summary.``: ``summary.num_params``, ``summary.status``;
- ``final.METRIC`` for every metric a run logged: its value at the last step that logged it;
- ``best.METRIC`` for the metrics whose name says which way is better (:func:`best_mode`, from the last
  ``/``-part of the name): the minimum of losses, bits per byte, perplexities, errors and misses; the maximum
  of accuracies, ``correct``, recall, exact match, F1 and scores. Rates, times, sizes and counts (``lr``,
  ``grad_norm``, ``tokens_per_s``, ``peak_mem_mb``, ``recall/train/n``) get no ``best.`` column.

A run that lacks a key has NaN / None there. :func:`curves_table` gives ``(run, step, metric, value)`` rows,
one per logged number.

Usage::

    from lmlab.analysis.table import curves_table, runs_table
    df = runs_table("runs/memory")                                  # roots, globs, or RunRecords
    df.groupby("model.dim")["final.loss"].agg(["mean", "min", "max"])
    df[df["tags.mode"] == "weight"].sort_values("best.recall/train/correct")
    df, curves = runs_table(["runs/a", "runs/b/*"], curves=True)
    curves[curves.metric == "loss"].pivot_table(index="step", columns="run", values="value")
"""

from __future__ import annotations

import functools
import math
import os
import re
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Literal

from lmlab.analysis.runs import RunRecord, load_runs

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["best_mode", "curves_table", "metric_names", "runs_table", "summarize_run"]

RunsArg = str | os.PathLike | RunRecord | Sequence["str | os.PathLike | RunRecord"]

# The last "/"-separated part of a metric's name decides which way is better (see best_mode).
_NONE_RE = re.compile(r"(per_s$|_s$|^time$|_mb$|^lr$|grad_norm|^tokens|^n$|_n$|^step)", re.IGNORECASE)
_MIN_RE = re.compile(r"(loss|bpb|bits_per_byte|ppl|perplexity|error|miss|nll|cross_entropy)", re.IGNORECASE)
_MAX_RE = re.compile(r"(acc|correct|recall|precision|exact|match|f1|score|auc)", re.IGNORECASE)


@functools.lru_cache(maxsize=4096)
def best_mode(metric: str) -> Literal["min", "max"] | None:
    """Which way is better for a metric, from the last ``/``-separated part of its name.

    None for rates, times, sizes and counts (``..._per_s``, ``..._s``, ``..._mb``, ``lr``, ``grad_norm``,
    ``tokens``, ``n``), then ``"min"`` for losses, bpb, perplexities, errors, NLL and misses (``val_loss``),
    ``"max"`` for accuracies, correct, recall, precision, exact match, F1, scores and AUC
    (``recall/train/correct``, ``acc``); otherwise ``"min"`` when a part after the first names misses or errors
    (``recall/train/miss/wrong_value``), else None (``recall/train/tool_call_rate``)."""
    *parents, part = metric.split("/")
    if _NONE_RE.search(part):
        return None
    if _MIN_RE.search(part):
        return "min"
    if _MAX_RE.search(part):
        return "max"
    if any(_MIN_RE.search(p) for p in parents[1:]):  # a share of misses or errors: recall/train/miss/wrong_value
        return "min"
    return None


def _as_runs(runs: RunsArg) -> list[RunRecord]:
    if isinstance(runs, RunRecord):
        return [runs]
    if isinstance(runs, (str, os.PathLike)):
        return load_runs(runs)
    items = list(runs)
    records = [r for r in items if isinstance(r, RunRecord)]
    paths = [r for r in items if not isinstance(r, RunRecord)]
    return records + (load_runs(paths) if paths else [])


def _cell(v: Any) -> Any:
    if isinstance(v, list):
        return tuple(_cell(x) for x in v)
    if isinstance(v, dict):  # an empty mapping (flatten keeps those as values)
        return None if not v else str(v)
    return v


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def summarize_run(run: RunRecord) -> dict[str, Any]:
    """One row of :func:`runs_table` as a dict (one pass over the run's metrics)."""
    values: dict[str, list] = {}
    for row in run.metrics:  # rows are in step order: the last value of a key is its final one
        for k, v in row.items():
            t = type(v)
            if (t is float or t is int) and v - v == 0:  # finite numbers (not bools, NaN or inf)
                vs = values.get(k)
                if vs is None:
                    values[k] = [v]
                else:
                    vs.append(v)
    steps = max(values.pop("step", ()), default=None)
    final = {k: float(vs[-1]) for k, vs in values.items()}
    best = {}
    for k, vs in values.items():
        mode = best_mode(k)
        if mode is not None:
            best[k] = float(min(vs) if mode == "min" else max(vs))
    out: dict[str, Any] = {"name": run.name, "path": str(run.path), "steps": steps}
    for k, v in run.flat_config.items():
        out[f"config.{k}" if k in out else k] = _cell(v)  # the config's own "name" becomes config.name
    for k, v in run.summary.items():
        out[f"summary.{k}"] = _cell(v)
    for k, v in final.items():
        out[f"final.{k}"] = v
    for k, v in best.items():
        out[f"best.{k}"] = v
    return out


def runs_table(runs: RunsArg, curves: bool = False) -> pd.DataFrame | tuple[pd.DataFrame, pd.DataFrame]:
    """One row per run (columns in the module docstring), sorted by name; with ``curves=True`` the pair
    ``(table, curves_table(runs))``. ``runs``: run records, or roots / globs to :func:`load_runs`."""
    import pandas as pd

    records = _as_runs(runs)
    rows = [summarize_run(r) for r in records]
    columns: dict[str, None] = dict.fromkeys(["name", "path", "steps"])
    groups: dict[str, dict[str, None]] = {"config": {}, "summary.": {}, "final.": {}, "best.": {}}
    for row in rows:
        for k in row:
            if k in columns:
                continue
            prefix = next((p for p in ("summary.", "final.", "best.") if k.startswith(p)), "config")
            groups[prefix].setdefault(k, None)
    for prefix, keys in groups.items():
        columns.update(dict.fromkeys(sorted(keys) if prefix in ("final.", "best.") else keys))
    table = pd.DataFrame.from_records(rows, columns=list(columns))
    if all(float(v).is_integer() for v in table["steps"].dropna()):
        table["steps"] = table["steps"].astype("Int64")  # whole steps stay integers; a run without metrics: <NA>
    if curves:
        return table, curves_table(records)
    return table


def curves_table(runs: RunsArg, metrics: Iterable[str] | None = None) -> pd.DataFrame:
    """Long form: one ``(run, step, metric, value)`` row per finite number logged; ``metrics`` keeps only those."""
    import pandas as pd

    wanted = None if metrics is None else set(metrics)
    run_col: list[str] = []
    step_col: list[float] = []
    metric_col: list[str] = []
    value_col: list[float] = []
    for r in _as_runs(runs):
        for row in r.metrics:
            step = row.get("step")
            if not _is_number(step):
                continue
            for k, v in row.items():
                if k != "step" and _is_number(v) and (wanted is None or k in wanted):
                    run_col.append(r.name)
                    step_col.append(step)
                    metric_col.append(k)
                    value_col.append(float(v))
    return pd.DataFrame({"run": run_col, "step": step_col, "metric": metric_col, "value": value_col})


def metric_names(runs: Sequence[RunRecord]) -> list[str]:
    """Every metric any of ``runs`` logged, in order of first appearance."""
    names: dict[str, None] = {}
    for r in runs:
        for row in r.metrics:
            for k in row:
                if k != "step":
                    names.setdefault(k, None)
    return list(names)
