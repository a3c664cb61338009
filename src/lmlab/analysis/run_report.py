"""``lmlab report``: one self-contained HTML report of any set of runs (summary table, curves, final values,
step-time profile and probes), with the figure files and a CSV of every run beside it.

RUNS are run folders, folders of runs (searched recursively) or glob patterns, as for ``lmlab plot``. The
report (``DIR/report.html``; figures ``DIR/*.png`` or ``*.svg``, all embedded, so the HTML opens offline on
its own; ``DIR/runs.csv``: the full :func:`lmlab.analysis.table.runs_table`) holds:

1. **Runs**: one row per run: name, the config keys that vary across the runs (those that only follow another
   one, say ``tags.data_dir`` beside ``tags.people``, and those only some configs have, written by another lmlab
   version, are named above the table instead; paths are shown relative to the folder they share), parameters,
   status, steps, final and best of the main metrics (loss, val_loss, val_bpb, every ``recall/*/correct``),
   throughput, MFU, peak memory and train time. The settings shared by every run are listed once above it.
2. **Curves** against step, grouped by ``--by KEY`` (repeatable; the runs of a group, usually seeds, drawn as
   their mean with a min-max band): loss (log y), val_loss, each ``recall/*/correct``. Without ``--by`` the
   groups are the varying config keys other than seeds (at most two, tags first), or each run on its own when
   there are four runs or fewer.
3. **Final values** against a numeric key (``--x KEY``, else the first numeric varying key among ``--by``, else
   any): final loss / recall with the runs at one x (seeds) as error bars, one line per remaining ``--by``
   group. Drawn when ``--by`` or ``--x`` is given.
4. **Step time and throughput** from the profiler columns of metrics.jsonl, averaged over each run's last
   ``LAST_ROWS`` logged rows: a stacked bar of the mean step time split into data / forward / backward /
   optimizer / other (one bar per run, or per group beyond ``MAX_BARS`` runs) and a table with tokens/s, MFU,
   peak memory, evaluation and checkpoint time.
5. **Probes** (runs with ``probes.jsonl``; at most ``--probe-runs`` runs, or groups of runs averaged per step when
   there are more): attention entropy per head over steps (a figure per run or group, a panel per attention
   module, a line per head; a group shows its first run, as head J of one seed is not head J of another),
   activation and gradient norms of the probed modules, and each probed parameter's update / weight ratio (log y).

A section without data says in one line why it is skipped. Writing into a folder that holds a report already
replaces that report's figures. Bad usage (no runs, unknown key, bad option) prints
one line ``error: ...`` and exits with status 2.

Usage::

    lmlab report runs/memory/capacity --out /tmp/capacity_report
    lmlab report 'runs/memory/observe/*' --by tags.mode --by tags.people --out out/observe --format svg
    lmlab report runs/grid --by tags.mode --x model.dim --where optim.lr=3e-3 --title "dim sweep" --out out/grid

    from lmlab.analysis.run_report import make_report
    done = make_report(load_runs("runs/grid"), "out/grid", by=["model.dim"])
    done["path"], done["images"], done["sections"]      # report.html, figure paths, {heading: skip note or ""}
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lmlab.analysis.plot import PlotError, _unknown, plot_curves, plot_final, select_runs
from lmlab.analysis.report import Section, log_ticks, save_figure, write_html_report
from lmlab.analysis.runs import RunRecord, load_runs
from lmlab.analysis.table import metric_names, runs_table, summarize_run
from lmlab.commands import run_command

log = logging.getLogger(__name__)

__all__ = ["LAST_ROWS", "MAX_BARS", "ReportError", "default_by", "main", "make_report", "step_times", "varying_keys"]

LAST_ROWS = 5  # profiler columns: the mean over each run's last rows (the first windows include warm-up)
MAX_BARS = 40  # step-time bars: one per run up to this many, else one per group
MAX_GROUPS = 24  # default grouping: a second key only while the groups stay this few
PHASES = ("data", "forward", "backward", "optim")
PHASE_COLORS = {"data": "#8c8c8c", "forward": "#1f77b4", "backward": "#ff7f0e", "optim": "#2ca02c",
                "other": "#d9d9d9"}
_RUN_COLUMNS = ("name", "path", "steps")
FIGURE_PREFIXES = ("curves_", "final_", "step_time", "probes_")  # the report's figure files (replaced on a rerun)
_SEED_RE = re.compile(r"(^|[._])seed$")


class ReportError(ValueError):
    """Bad usage of ``lmlab report`` (no runs, an unknown key, a bad option): one line."""


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_seed(key: str) -> bool:
    return bool(_SEED_RE.search(key))


def _sort_key(v: Any) -> tuple:
    if v is None:
        return (2, 0.0, "")
    return (0, float(v), "") if _is_number(v) else (1, 0.0, str(v))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=+-]+", "_", text).strip("_")[:80] or "x"


def _config_keys(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The config columns of summarize_run rows (not name/path/steps, summary.*, final.*, best.*)."""
    keys = dict.fromkeys(k for row in rows for k in row)
    return [k for k in keys if k not in _RUN_COLUMNS and not k.startswith(("summary.", "final.", "best."))]


def _rank(key: str, rows: Sequence[Mapping[str, Any]]) -> tuple[int, int]:
    """Which of several keys that split the runs alike to show, or to group by: short scalars before tuples,
    paths and long text, and the experiment's own labels (tags.*) and ``seed`` before other keys."""
    long = any(isinstance(v, tuple) or len(str(v)) > 24 or (isinstance(v, str) and v.startswith("/"))
               for v in (r.get(key) for r in rows))
    return (int(long), 0 if key.startswith("tags.") or key == "seed" else 1)


def varying_keys(rows: Sequence[Mapping[str, Any]]) -> tuple[list[str], dict[str, Any], dict[str, str], list[str]]:
    """``(varying, common, follows, partial)`` over :func:`~lmlab.analysis.table.summarize_run` rows.

    ``varying``: config keys taking two or more values (the config's own ``name`` left out), one per way of
    splitting the runs: of keys that split them alike, the first by :func:`_rank`; ``follows``: the others,
    each mapped to the key it follows; ``common``: keys with one value in every run; ``partial``: keys that some
    runs' configs lack and the others all set alike (configs written by another lmlab version), which would
    otherwise look varying."""
    keys = _config_keys(rows)
    common: dict[str, Any] = {}
    partial: list[str] = []
    parts: dict[tuple, list[str]] = {}
    for k in keys:
        if k == "config.name":
            continue
        values = [r.get(k) for r in rows]
        present = {r[k] for r in rows if k in r}
        if len(set(values)) == 1:
            common[k] = values[0]
            continue
        if len(present) == 1 and any(k not in r for r in rows):
            partial.append(k)
            continue
        first: dict[Any, int] = {}  # the partition, as "index of the first run with my value" per run
        parts.setdefault(tuple(first.setdefault(v, i) for i, v in enumerate(values)), []).append(k)
    varying, follows = [], {}
    order = {k: i for i, k in enumerate(keys)}
    for same in parts.values():
        lead = min(same, key=lambda k: (*_rank(k, rows), order[k]))
        varying.append(lead)
        follows.update({k: lead for k in same if k != lead})
    varying.sort(key=order.__getitem__)
    return varying, common, follows, partial


def _group(rows: Sequence[Mapping[str, Any]], by: Sequence[str]) -> dict[tuple, list[int]]:
    found: dict[tuple, list[int]] = {}
    for i, row in enumerate(rows):
        found.setdefault(tuple(row.get(k) for k in by), []).append(i)
    return {v: found[v] for v in sorted(found, key=lambda vals: tuple(_sort_key(x) for x in vals))}


def _label(by: Sequence[str], values: tuple) -> str:
    if len(by) == 1:
        return f"{by[0]}={values[0]}"
    return ", ".join(f"{k}={v}" for k, v in zip(by, values))


def default_by(rows: Sequence[Mapping[str, Any]], varying: Sequence[str]) -> list[str]:
    """The grouping when ``--by`` is not given: none (each run on its own) for four runs or fewer or when only
    seeds vary; else the first varying non-seed key (tags first, short values first) and a second one while
    the groups stay at most ``MAX_GROUPS``."""
    if len(rows) <= 4:
        return []
    cands = sorted((k for k in varying if not _is_seed(k)), key=lambda k: (_rank(k, rows)[0], _rank(k, rows)[1]))
    if not cands:
        return []
    by = [cands[0]]
    for k in cands[1:]:
        if len(_group(rows, [*by, k])) <= MAX_GROUPS:
            by.append(k)
            break
    return by


def _numeric_key(rows: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> str | None:
    for k in keys:
        if not _is_seed(k) and all(_is_number(r.get(k)) for r in rows) and len({r.get(k) for r in rows}) > 1:
            return k
    return None


def _mean(values: Sequence[float]) -> float | None:
    vals = [v for v in values if _is_number(v)]
    return statistics.fmean(vals) if vals else None


def step_times(run: RunRecord, last: int = LAST_ROWS) -> dict[str, Any]:
    """Profiler figures of one run from metrics.jsonl: the mean over its last ``last`` rows carrying each column
    of the step time (``step_ms``) and its phases (``data_ms`` ... ``optim_ms``; ``other_ms``: the rest of the
    step), tokens/s and MFU; the largest ``peak_mem_mb``; the total ``eval_s`` and ``ckpt_s`` (each row holds the
    time spent since the previous one). Keys without data are absent."""
    out: dict[str, Any] = {}

    def tail(key: str) -> list[float]:
        return [float(r[key]) for r in run.metrics if _is_number(r.get(key))][-last:]

    for key, name in [("time/step_ms", "step_ms"), *((f"time/{p}_ms", f"{p}_ms") for p in PHASES),
                      ("tokens_per_s", "tokens_per_s"), ("loss_tokens_per_s", "loss_tokens_per_s"), ("mfu", "mfu")]:
        vals = tail(key)
        if vals:
            out[name] = statistics.fmean(vals)
    if "step_ms" in out and any(f"{p}_ms" in out for p in PHASES):
        out["other_ms"] = max(0.0, out["step_ms"] - sum(out.get(f"{p}_ms", 0.0) for p in PHASES))
    peaks = [float(r["peak_mem_mb"]) for r in run.metrics if _is_number(r.get("peak_mem_mb"))]
    if peaks:
        out["peak_mem_mb"] = max(peaks)
    for key, name in (("time/eval_s", "eval_s"), ("time/ckpt_s", "ckpt_s")):
        vals = [float(r[key]) for r in run.metrics if _is_number(r.get(key))]
        if vals:
            out[name] = sum(vals)
    return out


def _train_time(run: RunRecord, row: Mapping[str, Any]) -> float | None:
    t = row.get("summary.train_time_s")
    if _is_number(t):
        return float(t)
    t = row.get("final.time")
    return float(t) if _is_number(t) else None


def _main_metrics(metrics: Sequence[str]) -> list[str]:
    main = [m for m in ("loss", "val_loss", "val_bpb") if m in metrics]
    return main + sorted(m for m in metrics if re.fullmatch(r"recall/[^/]+/correct", m))


def _round(v: Any, digits: int) -> Any:
    if not _is_number(v):
        return v
    return int(round(v)) if digits == 0 else round(float(v), digits)


class _Report:
    """The state one report is built from: runs, their table rows, the grouping, the output folder."""

    def __init__(self, runs: Sequence[RunRecord], out: Path, by: Sequence[str] | None, x: str | None, fmt: str,
                 probe_runs: int):
        self.runs = list(runs)
        self.rows = [summarize_run(r) for r in self.runs]
        self.metrics = metric_names(self.runs)
        self.out = out
        self.fmt = fmt
        self.probe_runs = probe_runs
        self.varying, self.common, self.follows, self.partial = varying_keys(self.rows)
        self.by_given = by is not None and len(by) > 0
        self.by = list(by) if self.by_given else default_by(self.rows, self.varying)
        self.x = x
        self.images: list[Path] = []
        self.figures: set[Path] = set()
        self.sections: list[Section] = []
        self.notes: dict[str, str] = {}
        self.probe_units: dict[str, list[dict[str, Any]]] = {}

    def figure(self, stem: str) -> Path:
        path = self.out / f"{_slug(stem)}.{self.fmt}"
        n = 2
        while path in self.figures:  # two labels with the same slug
            path = self.out / f"{_slug(stem)}_{n}.{self.fmt}"
            n += 1
        self.figures.add(path)
        return path

    def add(self, heading: str, text: str = "", table: Any = None, images: Sequence[Path] = (),
            columns: Sequence[str] | None = None) -> None:
        self.images.extend(images)
        self.sections.append(Section(heading, text=text, table=table, images=list(images), columns=columns))
        self.notes[heading] = ""

    def skip(self, heading: str, why: str) -> None:
        self.sections.append(Section(heading, text=f"Skipped: {why}."))
        self.notes[heading] = why

    def grouping_text(self) -> str:
        if self.by_given:
            return f"grouped by {', '.join(self.by)} (--by)"
        if self.by:
            return (f"grouped by {', '.join(self.by)} (the varying config keys, seeds left out; --by KEY to choose); "
                    "the runs of a group are drawn as their mean with a min-max band")
        return "each run on its own (--by KEY to group runs)"

    def groups(self) -> dict[str, list[int]]:
        """``{label: run indices}`` of the current grouping (each run on its own without one)."""
        if not self.by:
            return {r.name: [i] for i, r in enumerate(self.runs)}
        return {_label(self.by, vals): idx for vals, idx in _group(self.rows, self.by).items()}


# ---- 1. summary table -------------------------------------------------------------------------------------


def _text(v: Any) -> str:
    if isinstance(v, str) and (not v.strip() or v != v.strip() or "\n" in v):
        return repr(v)  # an empty or whitespace value stays visible
    return str(v)


def _common_text(common: Mapping[str, Any]) -> str:
    by_section: dict[str, list[str]] = {}
    for k, v in common.items():
        section, _, rest = k.partition(".")
        if not rest:
            section, rest = "", k
        by_section.setdefault(section, []).append(f"{rest}={_text(v)}")
    return "\n".join(f"{s + ': ' if s else ''}{', '.join(items)}" for s, items in by_section.items())


def _partial_text(rows: Sequence[Mapping[str, Any]], partial: Sequence[str]) -> str:
    """``parallel.* (9 keys) in 2 of 18 runs; ...``: keys only some configs have, by section."""
    found: dict[tuple[str, int], list[str]] = {}
    for k in partial:
        n = sum(k in r for r in rows)
        found.setdefault((k.rsplit(".", 1)[0] if "." in k else k, n), []).append(k)
    items = [(f"{keys[0]}" if len(keys) == 1 else f"{prefix}.* ({len(keys)} keys)") + f" in {n} of {len(rows)} runs"
             for (prefix, n), keys in found.items()]
    return "; ".join(items)


def _short_paths(values: Sequence[Any]) -> tuple[list[Any], str | None]:
    """Absolute paths (or tuples of them) shown relative to the folder they all share: ``(values, that folder)``;
    the values as they are (and None) when they are not all paths."""
    def parts(v: Any) -> list[str] | None:
        items = list(v) if isinstance(v, tuple) else [v]
        return items if items and all(isinstance(x, str) and x.startswith("/") for x in items) else None

    split = [parts(v) for v in values if v is not None]
    if not split or any(x is None for x in split):
        return list(values), None
    root = os.path.commonpath([x for items in split for x in items])
    if root == "/":
        return list(values), None

    def short(v: Any) -> Any:
        if v is None:
            return None
        items = [os.path.relpath(x, root) for x in (v if isinstance(v, tuple) else [v])]
        return items[0] if len(items) == 1 else ", ".join(items)

    return [short(v) for v in values], root


def _status(row: Mapping[str, Any]) -> str:
    """summary.json's status up to its first ':' (the rest is in runs.csv), saying so when the metrics went on
    past it (a run resumed, or still going)."""
    status = row.get("summary.status")
    if not status:
        return "" if any(k.startswith("summary.") for k in row) else "no summary.json"
    status = str(status).split(":", 1)[0]
    done, steps = row.get("summary.step"), row.get("steps")
    if _is_number(done) and _is_number(steps) and steps > done:
        return f"{status} at step {int(done)}; metrics go on to {int(steps)}"
    return str(status)


def _summary(rep: _Report) -> None:
    keys = sorted(rep.varying, key=lambda k: (k not in rep.by, _is_seed(k)))
    metric_cols = []
    for m in _main_metrics(rep.metrics):
        metric_cols.append(f"final.{m}")
        if any(f"best.{m}" in row for row in rep.rows):
            metric_cols.append(f"best.{m}")
    table = []
    for run, row in zip(rep.runs, rep.rows):
        cells: dict[str, Any] = {"name": run.name, **{k: row.get(k) for k in keys}}
        cells["params"] = row.get("summary.num_params")
        cells["status"] = _status(row)
        cells["steps"] = row.get("steps")
        cells.update({c: row.get(c) for c in metric_cols})
        cells["tokens_per_s"] = _round(row.get("final.tokens_per_s"), 0)
        cells["mfu"] = row.get("final.mfu")
        cells["peak_mem_mb"] = _round(row.get("final.peak_mem_mb"), 1)
        cells["train_time_s"] = _round(_train_time(run, row), 1)
        table.append(cells)
    rooted = []
    for k in keys:
        values, root = _short_paths([t[k] for t in table])
        if root is not None:
            rooted.append(f"{k} under {root}")
            for t, v in zip(table, values):
                t[k] = v
    columns = ["name", *keys, "params", "status", "steps", *metric_cols, "tokens_per_s", "mfu", "peak_mem_mb",
               "train_time_s"]
    columns = [c for c in columns if c in ("name", *keys) or any(t.get(c) not in (None, "") for t in table)]
    lines = [f"{len(rep.runs)} runs; curves {rep.grouping_text()}.",
             "Columns: the config keys that vary across the runs, then final.* (the last logged value) and best.* "
             "(min of losses, max of recall) of the main metrics; every column of every run is in runs.csv."]
    if rooted:
        lines.append("Paths relative to the folder they share: " + "; ".join(rooted) + ".")
    if rep.follows:
        lead: dict[str, list[str]] = {}
        for k, v in rep.follows.items():
            lead.setdefault(v, []).append(k)
        lines.append("Also varying, in step with a column: " + "; ".join(
            f"{', '.join(ks)} (with {v})" for v, ks in lead.items()) + ".")
    if rep.partial:
        lines.append("Set in only some runs' configs (the others, written by another lmlab version, lack them; "
                     "values in runs.csv): " + _partial_text(rep.rows, rep.partial) + ".")
    if rep.common:
        lines.append("Common settings (the same in every run):\n" + _common_text(rep.common))
    rep.add("Runs", text="\n".join(lines), table=table, columns=columns)


# ---- 2. curves, 3. final values ---------------------------------------------------------------------------


def _curves(rep: _Report) -> None:
    wanted = [m for m in ("loss", "val_loss") if m in rep.metrics]
    wanted += sorted(m for m in rep.metrics if re.fullmatch(r"recall/[^/]+/correct", m))
    if not wanted:
        rep.skip("Curves", "no run logged loss, val_loss or recall/*/correct")
        return
    images = []
    for m in wanted:
        drawn = plot_curves(rep.runs, m, rep.figure(f"curves_{m}"), by=rep.by, logy="loss" in m,
                            title=f"{m} vs step")
        images.append(Path(drawn["path"]))
    rep.add("Curves", text=f"Against step, {rep.grouping_text()}; losses on a log axis.", images=images)


def _final(rep: _Report) -> None:
    heading = "Final values"
    if not rep.by_given and not rep.x:
        rep.skip(heading, "pass --by KEY (and a numeric key varies) or --x KEY to plot final values against a key")
        return
    x = rep.x or _numeric_key(rep.rows, rep.by) or _numeric_key(rep.rows, rep.varying)
    if x is None:
        rep.skip(heading, "no numeric config key other than a seed varies across the runs (--x KEY picks one)")
        return
    by = [k for k in rep.by if k != x]
    wanted = [m for m in ("loss", "val_loss") if m in rep.metrics]
    wanted += sorted(m for m in rep.metrics if re.fullmatch(r"recall/[^/]+/correct", m))
    if not wanted:
        rep.skip(heading, "no run logged loss, val_loss or recall/*/correct")
        return
    xs = [r.get(x) for r in rep.rows if _is_number(r.get(x))]
    logx = bool(xs) and min(xs) > 0 and max(xs) / min(xs) >= 16
    images = []
    for m in wanted:
        try:
            drawn = plot_final(rep.runs, x, m, rep.figure(f"final_{m}_vs_{x}"), by=by, logx=logx, logy="loss" in m)
        except PlotError as e:  # say, no run has both x and this metric
            log.info("final %s vs %s: %s", m, x, e)
            continue
        images.append(Path(drawn["path"]))
    if not images:
        rep.skip(heading, f"no run has both {x} and a final loss or recall")
        return
    rep.add(heading, text=f"Each run's last logged value against {x}" + (f", one line per {', '.join(by)}" if by
            else "") + "; the runs at one x (seeds, other settings) as their mean, bars from min to max.",
            images=images)


# ---- 4. step time and throughput --------------------------------------------------------------------------


def _bar_figure(labels: Sequence[str], parts: Sequence[Mapping[str, float]], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(labels)
    width = max(len(s) for s in labels)
    fig, ax = plt.subplots(figsize=(9 + min(width, 60) * 0.06, 1.6 + 0.32 * n), layout="constrained")
    try:
        ys = list(range(n))[::-1]
        left = [0.0] * n
        for phase in (*PHASES, "other"):
            vals = [p.get(f"{phase}_ms", 0.0) for p in parts]
            if not any(vals):
                continue
            ax.barh(ys, vals, left=left, color=PHASE_COLORS[phase], label=phase, height=0.7, edgecolor="white",
                    linewidth=0.5)
            left = [a + b for a, b in zip(left, vals)]
        for y, p in zip(ys, parts):
            ax.text(p["step_ms"], y, f" {p['step_ms']:.3g} ms", va="center", fontsize=7)
        ax.set_yticks(ys, labels, fontsize=7 if n > 12 else 8)
        ax.set_xlim(0, max(p["step_ms"] for p in parts) * 1.15)
        ax.set_xlabel("mean step time (ms)")
        ax.set_title(title, fontsize=10)
        ax.grid(True, axis="x", alpha=0.3)
        fig.legend(fontsize=8, loc="outside lower center", ncol=5)
        return save_figure(fig, path)
    finally:
        plt.close(fig)


def _profile(rep: _Report) -> None:
    heading = "Step time and throughput"
    times = [step_times(r) for r in rep.runs]
    rows = []
    for run, t, row in zip(rep.runs, times, rep.rows):
        if not t:
            continue
        cells: dict[str, Any] = {"name": run.name}
        for k in ("step_ms", *(f"{p}_ms" for p in PHASES), "other_ms"):
            cells[k] = _round(t.get(k), 2)
        cells["tokens_per_s"] = _round(t.get("tokens_per_s"), 0)
        cells["loss_tokens_per_s"] = _round(t.get("loss_tokens_per_s"), 0)
        cells["mfu"] = t.get("mfu")
        cells["peak_mem_mb"] = _round(t.get("peak_mem_mb"), 1)
        cells["eval_s"] = _round(t.get("eval_s"), 1)
        cells["ckpt_s"] = _round(t.get("ckpt_s"), 1)
        cells["train_time_s"] = _round(_train_time(run, row), 1)
        rows.append(cells)
    if not rows:
        rep.skip(heading, "no run logged profiler columns (time/*_ms, tokens_per_s, mfu, peak_mem_mb) in metrics.jsonl")
        return
    columns = [c for c in rows[0] if any(r.get(c) is not None for r in rows)]
    text = [f"Means over each run's last {LAST_ROWS} logged rows (eval_s, ckpt_s: totals; peak_mem_mb: the "
            "largest). other_ms: the part of the step outside the four timed phases."]
    images = []
    timed = [(i, t) for i, t in enumerate(times) if "other_ms" in t]
    if not timed:
        text.append("No step-time breakdown: no run logged time/{data,forward,backward,optim}_ms "
                    "(profile.timers in the config).")
    else:
        if len(timed) <= MAX_BARS:
            labels = [rep.runs[i].name for i, _ in timed]
            parts = [t for _, t in timed]
            what = "one bar per run"
        else:
            have = {i for i, _ in timed}
            labels, parts = [], []
            for label, idx in rep.groups().items():
                mine = [times[i] for i in idx if i in have]
                if not mine:
                    continue
                labels.append(f"{label} ({len(mine)})")
                parts.append({k: _mean([t.get(k, 0.0) for t in mine]) or 0.0
                              for k in ("step_ms", *(f"{p}_ms" for p in PHASES), "other_ms")})
            what = f"one bar per group ({', '.join(rep.by)}), the mean of its runs" if rep.by else "one bar per run"
            if len(labels) > MAX_BARS:
                text.append(f"Showing the first {MAX_BARS} of {len(labels)} bars.")
                labels, parts = labels[:MAX_BARS], parts[:MAX_BARS]
        images.append(_bar_figure(labels, parts, rep.figure("step_time"),
                                  f"Mean step time by phase ({what})"))
        if len(timed) < len(rows):
            text.append(f"{len(rows) - len(timed)} run(s) without step timers are in the table only.")
    rep.add(heading, text="\n".join(text), table=rows, columns=columns, images=images)


# ---- 5. probes ---------------------------------------------------------------------------------------------


Units = list[tuple[str, list[dict[str, Any]]]]  # (label, probe rows) of a run or a group of runs


def _probe_units(rep: _Report) -> tuple[Units, Units, str]:
    """``(units, head_units, note)``: the probe rows of each shown run, or of each group averaged per step; for
    per-head plots a group's first run instead (head J of one seed is not head J of another); a note."""
    from lmlab.monitor.probes import read_probes

    have = [i for i, r in enumerate(rep.runs) if (r.path / "probes.jsonl").is_file()]
    rows = {i: read_probes(rep.runs[i].path) for i in have}
    have = [i for i in have if rows[i]]
    if not have:
        return [], [], ""
    if len(have) <= rep.probe_runs:
        units = [(rep.runs[i].name, rows[i]) for i in have]
        return units, units, f"{len(have)} run(s) with probes.jsonl"
    units, heads = [], []
    for label, idx in rep.groups().items():
        mine = [i for i in idx if i in rows and rows[i]]
        if not mine:
            continue
        many = len(mine) > 1
        units.append((label + (f" (mean of {len(mine)} runs)" if many else ""), _mean_rows([rows[i] for i in mine])))
        first = rep.runs[mine[0]].name
        heads.append((f"{label}, its first run {first}" if many and rep.by else label, rows[mine[0]]))
    note = f"{len(have)} runs with probes.jsonl, " + (f"grouped by {', '.join(rep.by)}" if rep.by else "each")
    if len(units) > rep.probe_runs:  # spread over the groups' order, so that the first key's values all show
        k = rep.probe_runs
        pick = sorted({round(i * (len(units) - 1) / max(k - 1, 1)) for i in range(k)})
        note += f"; showing {len(pick)} of the {len(units)} groups, evenly spread (--probe-runs N for more)"
        units, heads = [units[i] for i in pick], [heads[i] for i in pick]
    return units, heads, note


def _mean_rows(runs_rows: Sequence[Sequence[Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """Probe rows of several runs averaged per step and key (over the runs that recorded that step)."""
    at: dict[int, dict[str, list[float]]] = {}
    for rows in runs_rows:
        for row in rows:
            slot = at.setdefault(int(row["step"]), {})
            for k, v in row.items():
                if k != "step" and _is_number(v):
                    slot.setdefault(k, []).append(float(v))
    return [{"step": s, **{k: statistics.fmean(v) for k, v in at[s].items()}} for s in sorted(at)]


def _series(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pts = [(int(r["step"]), float(r[key])) for r in rows if _is_number(r.get(key))]
    return [p[0] for p in pts], [p[1] for p in pts]


def _names(rows: Sequence[Mapping[str, Any]], prefix: str, suffix: str) -> list[str]:
    """The MODULE parts of keys ``prefix/MODULE/suffix`` (suffix a regex), in order of first appearance."""
    pat = re.compile(rf"{re.escape(prefix)}/(.+)/{suffix}$")
    found: dict[str, None] = {}
    for row in rows:
        for k in row:
            m = pat.match(k)
            if m:
                found.setdefault(m.group(1), None)
    return list(found)


def _palette(n: int) -> list[Any]:
    import matplotlib.pyplot as plt
    import numpy as np

    if n <= 10:
        return [plt.cm.tab10(i) for i in range(n)]
    return list(plt.cm.viridis(np.linspace(0.0, 0.9, n)))


def _grid(n: int, cols: int, panel: tuple[float, float], **kw: Any) -> tuple[Any, list[Any]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = min(cols, n)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(panel[0] * ncols + 1.5, panel[1] * nrows + 0.8), squeeze=False,
                             layout="constrained", **kw)
    flat = [ax for row in axes for ax in row]
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _legend(ax: Any, n: int) -> None:
    if n:
        ax.legend(fontsize=7, ncol=1 + n // 8, loc="best")


def _entropy_figures(rep: _Report, units: Units) -> list[Path]:
    import matplotlib.pyplot as plt

    images = []
    values = [v for _, rows in units for r in rows for k, v in r.items()
              if k.startswith("attn_entropy/") and _is_number(v)]
    lo, hi = min(values), max(values)
    pad = 0.05 * (hi - lo or 1.0)
    for label, rows in units:
        modules = _names(rows, "attn_entropy", r"h\d+")
        if not modules:
            continue
        fig, axes = _grid(len(modules), 4, (4.2, 3.0), sharex=True, sharey=True)
        try:
            for i, ax in enumerate(axes):
                module = modules[i]
                heads = sorted({int(k.rsplit("/h", 1)[1]) for r in rows for k in r
                                if k.startswith(f"attn_entropy/{module}/h")})
                for color, h in zip(_palette(len(heads)), heads):
                    ax.plot(*_series(rows, f"attn_entropy/{module}/h{h}"), color=color, lw=1.3, label=f"h{h}")
                ax.set_title(module, fontsize=9)
                ax.set_xlabel("step" if i + 4 >= len(modules) else "")
                ax.set_ylabel("entropy (nats)" if i % 4 == 0 else "")
                ax.set_ylim(lo - pad, hi + pad)
                ax.grid(True, alpha=0.3)
            _legend(axes[0], len(heads))
            fig.suptitle(f"Attention entropy per head: {label}", fontsize=10)
            stem = label.partition(", its first run")[0]  # the group's label names the file
            images.append(save_figure(fig, rep.figure(f"probes_entropy_{stem}")))
        finally:
            plt.close(fig)
    return images


def _lines_figure(rep: _Report, units: Units, panels: Sequence[tuple[str, str]], stem: str,
                  title: str) -> Path | None:
    """A panel per unit and ``(prefix, stat)`` (keys ``prefix/NAME/stat``; a row per unit when there are several
    pairs), a line per NAME coloured alike in every panel, log y. None when no unit has such keys."""
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(n for _, rows in units for p, s in panels for n in _names(rows, p, s)))
    if not names:
        return None
    colors = dict(zip(names, _palette(len(names))))
    n = len(units) * len(panels)
    ncols = len(panels) if len(panels) > 1 else min(2, n)
    fig, axes = _grid(n, ncols, (5.2, 2.8), sharex=True, sharey="col" if len(panels) > 1 else True)
    try:
        for u, (label, rows) in enumerate(units):
            for j, (prefix, stat) in enumerate(panels):
                i = u * len(panels) + j
                ax = axes[i]
                for name in names:
                    steps, vals = _series(rows, f"{prefix}/{name}/{stat}")
                    pos = [(s, v) for s, v in zip(steps, vals) if v > 0]
                    if pos:
                        ax.plot([s for s, _ in pos], [v for _, v in pos], color=colors[name], lw=1.2, label=name)
                ax.set_yscale("log")
                what = f"{prefix} {stat}" if len(panels) > 1 else ""
                ax.set_title(": ".join(t for t in (label if len(units) > 1 else "", what) if t), fontsize=9)
                ax.set_xlabel("step" if i + ncols >= n else "")
                ax.grid(True, alpha=0.3, which="both")
        for ax in axes:  # once every panel is drawn: the shared limits are final
            log_ticks(ax.yaxis)
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", fontsize=7, ncol=min(4, len(names)))
        fig.suptitle(title + (f": {units[0][0]}" if len(units) == 1 else ""), fontsize=10)
        return save_figure(fig, rep.figure(stem))
    finally:
        plt.close(fig)


def _probes(rep: _Report) -> None:
    units, heads, note = _probe_units(rep)
    rep.probe_units = dict(units)
    if not units:
        rep.skip("Probes", "no run has a probes.jsonl (probes.modules / probes.params in the config)")
        return
    keys = {k for _, rows in units for r in rows for k in r}
    heading = "Probes: attention entropy per head"
    if any(k.startswith("attn_entropy/") for k in keys):
        grouped = " A group shows its first run: head J of one seed is not head J of another." if heads != units else ""
        rep.add(heading, text=f"{note}. Entropy (nats) of each head's attention distribution, averaged over the "
                f"query positions of the recorded step; the same y range in every panel.{grouped}",
                images=_entropy_figures(rep, heads))
    else:
        rep.skip(heading, f"{note}, none with attn_entropy/* columns (an attention module in probes.modules)")
    heading = "Probes: activation and gradient norms"
    panels = [(p, "norm") for p in ("act", "grad") if any(k.startswith(f"{p}/") for k in keys)]
    fig = _lines_figure(rep, units, panels, "probes_norms", "Mean L2 norm per token of module outputs (act) "
                        "and of the loss gradient with respect to them (grad)") if panels else None
    if fig:
        rep.add(heading, text=f"{note}.", images=[fig])
    else:
        rep.skip(heading, f"{note}, none with act/* or grad/* columns (probes.modules)")
    heading = "Probes: update / weight ratio"
    fig = _lines_figure(rep, units, [("param", "update_ratio")], "probes_update_ratio",
                        "||w_after - w_before|| / ||w_before|| of each optimizer step")
    if fig:
        rep.add(heading, text=f"{note}. Per probed parameter, on a log axis.", images=[fig])
    else:
        rep.skip(heading, f"{note}, none with param/* columns (probes.params)")


# ---- the report --------------------------------------------------------------------------------------------


def _check_key(rows: Sequence[Mapping[str, Any]], key: str, what: str) -> None:
    known = list(dict.fromkeys(k for row in rows for k in row if not k.startswith(("final.", "best."))))
    if key not in known:
        raise ReportError(str(_unknown(what, key, known)))


def make_report(runs: Sequence[RunRecord], out_dir: str | os.PathLike, by: Sequence[str] | None = None,
                x: str | None = None, fmt: str = "png", title: str | None = None, probe_runs: int = 4,
                intro: str = "") -> dict[str, Any]:
    """Write ``out_dir/report.html`` (sections in the module docstring), its figures and ``runs.csv``.

    ``by``: group keys (None or empty: the default grouping, :func:`default_by`); ``x``: the key of the final
    values plot; ``fmt``: ``"png"`` or ``"svg"``. Returns ``{"path", "csv", "images", "sections": {heading:
    why it was skipped, or ""}, "by", "runs", "probes": {label: the probe rows drawn}}``. Raises
    :class:`ReportError` for no runs or an unknown key."""
    if not runs:
        raise ReportError("no runs to report on")
    if fmt not in ("png", "svg"):
        raise ReportError(f"--format must be png or svg, got {fmt!r}")
    if probe_runs < 1:
        raise ReportError(f"--probe-runs must be at least 1, got {probe_runs}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ReportError(f"--out {out}: exists and is not a folder")
    rep = _Report(runs, out, by, x, fmt, probe_runs)
    for key in rep.by if rep.by_given else ():
        _check_key(rep.rows, key, "--by key")
    if x is not None:
        _check_key(rep.rows, x, "--x key")
        if not any(_is_number(r.get(x)) for r in rep.rows):
            raise ReportError(f"--x {x}: not a number in any run")
    out.mkdir(parents=True, exist_ok=True)
    if (out / "report.html").is_file():  # a report written here before: its figures go (names may differ now)
        for stale in out.iterdir():
            if stale.suffix in (".png", ".svg") and stale.name.startswith(FIGURE_PREFIXES):
                stale.unlink()
    csv_path = out / "runs.csv"
    runs_table(rep.runs).to_csv(csv_path, index=False)
    _summary(rep)
    if intro:
        rep.sections[0].text = intro + "\n" + rep.sections[0].text
    _curves(rep)
    _final(rep)
    _profile(rep)
    _probes(rep)
    path = write_html_report(out / "report.html", title or f"Report: {len(rep.runs)} runs", rep.sections)
    return {"path": path, "csv": csv_path, "images": rep.images, "sections": rep.notes, "by": rep.by,
            "runs": [r.name for r in rep.runs], "probes": rep.probe_units}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, status 2 (main catches it)
        raise ReportError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="lmlab report", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", metavar="RUNS", help="run folders, folders of runs, or glob patterns")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for report.html, the figures and runs.csv")
    p.add_argument("--by", action="append", default=[], metavar="KEY",
                   help="group runs by this key in curves and probes (repeatable); default: the varying config "
                        "keys other than seeds, at most two")
    p.add_argument("--x", default=None, metavar="KEY", help="numeric key of the final-values plot")
    p.add_argument("--where", action="append", default=[], metavar="KEY=VALUE",
                   help="keep runs with KEY=VALUE (KEY!=VALUE drops them, KEY=a,b keeps either); repeatable")
    p.add_argument("--format", choices=["png", "svg"], default="png", help="figure format (default png)")
    p.add_argument("--probe-runs", type=int, default=4, metavar="N",
                   help="probes: at most this many runs (or groups, when more runs have probes) (default 4)")
    p.add_argument("--title", default=None, help="the report's title")
    return p


def _run(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    runs = load_runs(args.runs)
    if not runs:
        raise ReportError(f"no run folders (with a config.yaml) under {' '.join(args.runs)}")
    if args.where:
        try:
            runs = select_runs(runs, args.where)
        except PlotError as e:
            raise ReportError(str(e)) from None
        if not runs:
            raise ReportError(f"no run matches --where {' '.join(args.where)}")
    intro = f"Runs from {' '.join(args.runs)}" + (f" where {' and '.join(args.where)}" if args.where else "") + "."
    done = make_report(runs, args.out, by=args.by, x=args.x, fmt=args.format, title=args.title,
                       probe_runs=args.probe_runs, intro=intro)
    skipped = [h for h, why in done["sections"].items() if why]
    print(f"wrote {done['path']} ({len(done['runs'])} runs, {len(done['images'])} figures"
          + (f"; skipped: {', '.join(skipped)}" if skipped else "") + f") and {done['csv']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``lmlab report ...``: 0 on success, 2 (one line ``error: ...`` on stderr) on bad usage."""
    return run_command(_run, argv, ReportError)


if __name__ == "__main__":
    raise SystemExit(main())
