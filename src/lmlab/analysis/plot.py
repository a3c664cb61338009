"""``lmlab plot``: metrics of many runs in one figure, curves grouped by any config key, or final values vs a key.

RUNS are run folders, folders of runs (a grid: searched recursively) or glob patterns. Keys are the columns of
:func:`lmlab.analysis.table.runs_table`: dotted config keys (``model.dim``, ``tags.mode``, ``optim.lr``),
``summary.*`` fields (``summary.num_params``), ``name``, ``steps``; metrics are the names in metrics.jsonl
(``loss``, ``val_loss``, ``recall/train/correct``). An unknown key is an error listing the close matches
(``--list-keys`` prints them all).

Two modes:

- **curves** (default): ``--y METRIC`` against ``--x`` (``step``, or another metric logged in the same rows,
  e.g. ``tokens``), one colour per value of the ``--by`` key(s) (a sequential colour map when the one key is
  numeric). The runs of one group (seeds) are drawn as their mean at each x over the runs that logged it,
  with a shaded min-max band (``--style band``, the default when x is ``step``), or as one thin line per run
  (``--style lines``, the default for any other x, whose values do not line up across runs). Without ``--by``
  each run is its own group.
- **final values** (``--final``, or ``--best`` for the best value of each run, min for losses and max for
  accuracies as in ``runs_table``): each run's last ``--y`` against a key ``--x`` (config, summary or another
  metric's final value), one line per ``--by`` group (one for all runs without ``--by``); the runs at one x
  (seeds) are aggregated as their mean with error bars spanning their min to max (``--err minmax``, default)
  or +-1 sample standard deviation (``--err std``; 0 for a single run). A string-valued x is drawn as
  categories.

``--where KEY=VALUE`` keeps the runs whose KEY equals VALUE (``KEY!=VALUE`` drops them; ``KEY=a,b`` keeps
either); repeat it to combine (and). The figure's format is the ``--out`` suffix: ``.png``, ``.svg`` or ``.pdf``.
Bad usage prints one line ``error: ...`` and exits with status 2.

Usage::

    lmlab plot runs/memory --y loss --by model.dim --logy --out out/loss.png
    lmlab plot 'runs/memory/*' --y recall/train/correct --by tags.mode --where model.dim=32 --out out/recall.svg
    lmlab plot runs/grid --final --x model.dim --y loss --by tags.mode --logx --out out/final_loss.png
    lmlab plot runs/grid --final --x summary.num_params --y recall/train/correct --err std --out out/r.png
    lmlab plot runs/grid --list-keys

    from lmlab.analysis.plot import plot_curves, plot_final
    drawn = plot_curves(load_runs("runs/grid"), "loss", "out/loss.png", by=["model.dim"])
    drawn["groups"]["32"]["runs"], drawn["groups"]["32"]["y"]     # what was drawn (labels: the --by values)
"""

from __future__ import annotations

import argparse
import difflib
import logging
import math
import os
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lmlab.analysis.report import figure_format, log_ticks, save_figure
from lmlab.analysis.runs import RunRecord, load_runs
from lmlab.analysis.table import best_mode, metric_names, summarize_run
from lmlab.commands import run_command

log = logging.getLogger(__name__)

__all__ = ["PlotError", "main", "plot_curves", "plot_final", "select_runs"]


class PlotError(ValueError):
    """Bad usage of the plot command or functions (unknown key, empty selection, bad option): one line."""


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _unknown(what: str, key: str, known: Sequence[str]) -> PlotError:
    close = difflib.get_close_matches(key, list(known), n=5, cutoff=0.5)
    # a key given without its section ("dim" for "model.dim") is a close match too
    close += [k for k in known if k.rsplit(".", 1)[-1] == key and k not in close][:5]
    if close:
        return PlotError(f"unknown {what} {key!r}; close matches: {', '.join(close)}")
    shown = ", ".join(list(known)[:12])
    more = f" and {len(known) - 12} more (--list-keys)" if len(known) > 12 else ""
    return PlotError(f"unknown {what} {key!r}; known: {shown}{more}")


class _Runs:
    """Runs with their table rows (config, summary, final / best metrics), for key lookups and filters."""

    def __init__(self, runs: Sequence[RunRecord]):
        self.runs = list(runs)
        self.rows = [summarize_run(r) for r in self.runs]
        self.keys = list(dict.fromkeys(k for row in self.rows for k in row))
        self.metrics = metric_names(self.runs)

    def run_keys(self) -> list[str]:
        """Keys that describe a run (config, summary, name, steps): what --by and --where take."""
        return [k for k in self.keys if not k.startswith(("final.", "best."))]

    def check_key(self, key: str, what: str) -> None:
        if key not in self.keys:
            raise _unknown(what, key, self.run_keys())

    def check_metric(self, metric: str, what: str, extra: Sequence[str] = ()) -> None:
        if metric not in self.metrics and metric not in extra:
            raise _unknown(what, metric, [*extra, *self.metrics])


def _parse_scalar(text: str) -> Any:
    import yaml

    for number in (int, float):  # before YAML, which reads 3e-3 (no dot) as a string
        try:
            return number(text)
        except ValueError:
            pass
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _matches(cell: Any, wanted: str) -> bool:
    value = _parse_scalar(wanted)
    if _is_number(cell) and _is_number(value):
        return float(cell) == float(value)
    return cell == value or str(cell) == wanted


def select_runs(runs: Sequence[RunRecord], where: Sequence[str] = ()) -> list[RunRecord]:
    """The runs matching every ``KEY=VALUE`` / ``KEY!=VALUE`` condition (``KEY=a,b``: either value).

    Values compare as numbers when both sides are numbers (``optim.lr=3e-3`` matches 0.003), else as YAML
    scalars or text. An unknown key or a condition without ``=`` raises :class:`PlotError`."""
    table = _Runs(runs)
    keep = list(range(len(table.runs)))
    for cond in where:
        neg = "!=" in cond
        key, sep, value = cond.partition("!=" if neg else "=")
        key = key.strip()
        if not sep or not key:
            raise PlotError(f"--where {cond!r}: expected KEY=VALUE or KEY!=VALUE")
        table.check_key(key, "--where key")
        options = [v.strip() for v in value.split(",")]
        keep = [i for i in keep if any(_matches(table.rows[i].get(key), o) for o in options) != neg]
    return [table.runs[i] for i in keep]


def _sort_key(v: Any) -> tuple:
    if v is None:
        return (2, 0, "")
    if _is_number(v):
        return (0, float(v), "")
    return (1, 0, str(v))


def _groups(table: _Runs, by: Sequence[str]) -> dict[str, tuple[tuple, list[int]]]:
    """``{label: (values, [run indices])}`` in the order of the --by values (numbers numerically)."""
    if not by:
        names = [r.name for r in table.runs]
        dup = len(set(names)) < len(names)  # the same name under two roots: show paths
        return {(str(r.path) if dup else r.name): ((r.name,), [i]) for i, r in enumerate(table.runs)}
    found: dict[tuple, list[int]] = {}
    for i, row in enumerate(table.rows):
        found.setdefault(tuple(row.get(k) for k in by), []).append(i)
    ordered = sorted(found, key=lambda vals: tuple(_sort_key(v) for v in vals))
    if len(by) == 1:  # the legend's title names the key
        return {str(vals[0]): (vals, found[vals]) for vals in ordered}
    return {", ".join(f"{k}={v}" for k, v in zip(by, vals)): (vals, found[vals]) for vals in ordered}


def _colors(groups: dict[str, tuple[tuple, list[int]]], by: Sequence[str]) -> dict[str, Any]:
    import matplotlib.pyplot as plt
    import numpy as np

    labels = list(groups)
    numeric = len(by) == 1 and len(labels) > 2 and all(_is_number(groups[g][0][0]) for g in labels)
    if numeric:  # magnitudes read as a colour ramp: dim 16 dark, dim 64 light
        cols = plt.cm.viridis(np.linspace(0.0, 0.9, len(labels)))
    elif len(labels) <= 10:
        cols = [plt.cm.tab10(i) for i in range(len(labels))]
    elif len(labels) <= 20:
        cols = [plt.cm.tab20(i) for i in range(len(labels))]
    else:
        cols = plt.cm.turbo(np.linspace(0.05, 0.95, len(labels)))
    return dict(zip(labels, cols))


def _finish(fig: Any, ax: Any, path: str | os.PathLike, title: str, xlabel: str, ylabel: str, legend_title: str,
            logx: bool, logy: bool, n_groups: int, legend: bool = True) -> Path:
    if logx:
        ax.set_xscale("log")
        log_ticks(ax.xaxis)
    if logy:
        ax.set_yscale("log")
        log_ticks(ax.yaxis)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3, which="both")
    if n_groups and legend:
        outside = n_groups > 12
        ax.legend(title=legend_title or None, fontsize=7, title_fontsize=8, ncol=1 + n_groups // 30,
                  **({"loc": "upper left", "bbox_to_anchor": (1.01, 1.0)} if outside else {"loc": "best"}))
    elif not n_groups:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    return save_figure(fig, path)


def _xy(run: RunRecord, x: str, y: str) -> list[tuple[float, float]]:
    """(x, y) of the rows of ``run`` that carry both as finite numbers (x = "step" or a metric)."""
    return [(float(row[x]), float(row[y])) for row in run.metrics
            if _is_number(row.get(x)) and _is_number(row.get(y))]


def plot_curves(runs: Sequence[RunRecord], y: str, path: str | os.PathLike, x: str = "step",
                by: Sequence[str] = (), style: str | None = None, logx: bool = False, logy: bool = False,
                title: str | None = None) -> dict[str, Any]:
    """Curves of metric ``y`` against ``x`` (module docstring: groups, band vs lines); saves by the suffix.

    Returns ``{"path", "x", "y", "style", "groups": {label: {"runs", "x", "y", "lo", "hi"}}, "skipped"}``: per
    group its runs (names), the x values and the mean (``y``), min (``lo``) and max (``hi``) over its runs at
    each x; ``skipped``: runs that logged no (x, y) pair."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure_format(path)
    style = style or ("band" if x == "step" else "lines")
    if style not in ("band", "lines"):
        raise PlotError(f"--style must be band or lines, got {style!r}")
    table = _Runs(runs)
    if not table.runs:
        raise PlotError("no runs to plot")
    for key in by:
        table.check_key(key, "--by key")
    table.check_metric(y, "--y metric")
    if x != "step":
        table.check_metric(x, "--x metric", extra=["step"])
    series = {i: _xy(r, x, y) for i, r in enumerate(table.runs)}
    skipped = [table.runs[i].name for i, pts in series.items() if not pts]
    if len(skipped) == len(table.runs):
        raise PlotError(f"none of the {len(table.runs)} runs logged {y!r} against {x!r} in the same rows")
    groups = _groups(table, by)
    colors = _colors(groups, by)
    out: dict[str, Any] = {"x": x, "y": y, "style": style, "groups": {}, "skipped": skipped}
    fig, ax = plt.subplots(figsize=(8, 5))
    try:
        for label, (_, idx) in groups.items():
            members = [i for i in idx if series[i]]
            if not members:
                continue
            at: dict[float, list[float]] = {}
            for i in members:
                for xv, yv in series[i]:
                    at.setdefault(xv, []).append(yv)
            xs = sorted(at)
            mean = [statistics.fmean(at[v]) for v in xs]
            lo = [min(at[v]) for v in xs]
            hi = [max(at[v]) for v in xs]
            names = [table.runs[i].name for i in members]
            out["groups"][label] = {"runs": names, "n_runs": len(names), "x": xs, "y": mean, "lo": lo, "hi": hi}
            color = colors[label]
            text = label if len(members) == 1 or not by else f"{label} ({len(members)} runs)"
            if style == "band" or len(members) == 1:
                ax.plot(xs, mean, color=color, lw=1.6, label=text)
                if len(members) > 1:
                    ax.fill_between(xs, lo, hi, color=color, alpha=0.18, lw=0)
            else:
                for n, i in enumerate(members):
                    ax.plot([p[0] for p in series[i]], [p[1] for p in series[i]], color=color, lw=0.9, alpha=0.7,
                            label=text if n == 0 else None)
        band = " (mean; band: min-max over runs)" if style == "band" and any(
            len(g["runs"]) > 1 for g in out["groups"].values()) else ""
        out["path"] = _finish(fig, ax, path, title or f"{y} vs {x}" + (f" by {', '.join(by)}" if by else "") + band,
                              x, y, ", ".join(by), logx, logy, len(out["groups"]))
    finally:
        plt.close(fig)
    return out


def plot_final(runs: Sequence[RunRecord], x: str, y: str, path: str | os.PathLike, by: Sequence[str] = (),
               stat: str = "final", err: str = "minmax", logx: bool = False, logy: bool = False,
               title: str | None = None) -> dict[str, Any]:
    """Each run's final (``stat="final"``) or best (``"best"``) ``y`` against key ``x``, one line per ``by`` group
    (one for all runs without ``by``), the runs at one x as their mean with error bars (``err``: ``"minmax"`` or
    ``"std"``, sample std).

    ``x``: a run key (config, ``summary.*``), or a metric (its final value). ``y``: a metric, or any table
    column (``summary.num_params``, ``best.loss``). Returns ``{"path", "x", "y", "groups": {label: {"x",
    "y", "lo", "hi", "n", "runs"}}, "skipped"}`` where lo/hi are the ends of the error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure_format(path)
    if stat not in ("final", "best"):
        raise PlotError(f"stat must be final or best, got {stat!r}")
    if err not in ("minmax", "std"):
        raise PlotError(f"--err must be minmax or std, got {err!r}")
    table = _Runs(runs)
    if not table.runs:
        raise PlotError("no runs to plot")
    for key in by:
        table.check_key(key, "--by key")
    if x in table.keys:
        xcol = x
    elif x in table.metrics:
        xcol = f"final.{x}"
    else:
        raise _unknown("--x key", x, [*table.run_keys(), *table.metrics])
    if y in table.metrics:
        if stat == "best" and best_mode(y) is None:
            raise PlotError(f"--best: no best value for {y!r} (neither a loss-like nor an accuracy-like name); "
                            "use --final")
        ycol = f"{stat}.{y}"
    elif y in table.keys:
        ycol = y
    else:
        raise _unknown("--y metric", y, [*table.metrics, *table.keys])
    points = {i: (row.get(xcol), row.get(ycol)) for i, row in enumerate(table.rows)}
    skipped = [table.runs[i].name for i, (xv, yv) in points.items() if xv is None or not _is_number(yv)]
    usable = {i: p for i, p in points.items() if table.runs[i].name not in skipped}
    if not usable:
        raise PlotError(f"no run has both {xcol!r} and a number for {ycol!r}")
    numeric_x = all(_is_number(xv) for xv, _ in usable.values())
    if logx and not numeric_x:
        raise PlotError(f"--logx needs a numeric --x; {x!r} has values such as "
                        f"{next(str(xv) for xv, _ in usable.values() if not _is_number(xv))!r}")
    categories = sorted({xv for xv, _ in usable.values()}, key=_sort_key)
    position = {c: float(c) if numeric_x else float(n) for n, c in enumerate(categories)}
    # without --by every run is in one group: the runs at one x are aggregated all the same
    groups = _groups(table, by) if by else {"all runs": ((), list(range(len(table.runs))))}
    colors = _colors(groups, by)
    out: dict[str, Any] = {"x": x, "y": ycol, "groups": {}, "skipped": skipped}
    fig, ax = plt.subplots(figsize=(8, 5))
    try:
        n_groups = len(groups)
        for g, (label, (_, idx)) in enumerate(groups.items()):
            at: dict[Any, list[float]] = {}
            names: dict[Any, list[str]] = {}
            for i in idx:
                if i in usable:
                    xv, yv = usable[i]
                    at.setdefault(xv, []).append(float(yv))
                    names.setdefault(xv, []).append(table.runs[i].name)
            if not at:
                continue
            xs = sorted(at, key=_sort_key)
            mean = [statistics.fmean(at[v]) for v in xs]
            if err == "minmax":
                lo = [min(at[v]) for v in xs]
                hi = [max(at[v]) for v in xs]
            else:
                sd = [statistics.stdev(at[v]) if len(at[v]) > 1 else 0.0 for v in xs]
                lo = [m - s for m, s in zip(mean, sd)]
                hi = [m + s for m, s in zip(mean, sd)]
            # categories: small side-by-side offsets so that the error bars of groups do not overlap
            shift = 0.0 if numeric_x else (g - (n_groups - 1) / 2) * min(0.25, 0.8 / max(n_groups, 1))
            px = [position[v] + shift for v in xs]
            yerr = [[m - a for m, a in zip(mean, lo)], [b - m for m, b in zip(mean, hi)]]
            ax.errorbar(px, mean, yerr=yerr, color=colors[label], marker="o", ms=5, capsize=3, lw=1.4, label=label)
            out["groups"][label] = {"x": xs, "y": mean, "lo": lo, "hi": hi, "n": [len(at[v]) for v in xs],
                                    "runs": [names[v] for v in xs], "n_runs": sum(len(at[v]) for v in xs)}
        if not numeric_x:
            ax.set_xticks([position[c] for c in categories], [str(c) for c in categories])
        what = f"{stat} {y}" if y in table.metrics else y
        bars = "min-max over runs" if err == "minmax" else "+-1 std over runs"
        out["path"] = _finish(fig, ax, path, title or f"{what} vs {x} (mean; bars: {bars})", x, what,
                              ", ".join(by), logx, logy, len(out["groups"]), legend=bool(by))
    finally:
        plt.close(fig)
    return out


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, status 2 (main catches it)
        raise PlotError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="lmlab plot", description=__doc__.split("\n\n")[0],
                epilog="Keys: dotted config keys, summary.*, name, steps; --list-keys prints them.")
    p.add_argument("runs", nargs="+", metavar="RUNS", help="run folders, folders of runs, or glob patterns")
    p.add_argument("--y", help="metric to plot (loss, val_loss, recall/train/correct, ...)")
    p.add_argument("--x", default=None, help="curves: step (default) or a metric; --final: a key or a metric")
    p.add_argument("--by", action="append", default=[], metavar="KEY",
                   help="group runs by this key (one colour per value); repeat for several keys")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--final", action="store_true", help="plot each run's final --y against --x")
    mode.add_argument("--best", action="store_true", help="like --final with each run's best --y (min loss, max acc)")
    p.add_argument("--where", action="append", default=[], metavar="KEY=VALUE",
                   help="keep runs with KEY=VALUE (KEY!=VALUE drops them, KEY=a,b keeps either); repeatable")
    p.add_argument("--style", choices=["band", "lines"], default=None,
                   help="curves: mean with a min-max band per group, or one line per run")
    p.add_argument("--err", choices=["minmax", "std"], default="minmax",
                   help="--final error bars: min-max over the runs at one x (default) or +-1 sample std")
    p.add_argument("--logx", action="store_true", help="log-scale x axis")
    p.add_argument("--logy", action="store_true", help="log-scale y axis")
    p.add_argument("--title", default=None, help="figure title")
    p.add_argument("--out", default="plot.png", help="output file; its suffix picks the format: .png, .svg, .pdf "
                                                     "(default plot.png)")
    p.add_argument("--list-keys", action="store_true", help="print the keys and metrics of the runs and exit")
    return p


def _run(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    runs = load_runs(args.runs)
    if not runs:
        raise PlotError(f"no run folders (with a config.yaml) under {' '.join(args.runs)}")
    if args.list_keys:
        table = _Runs(runs)
        print(f"{len(runs)} runs")
        print("keys (--by, --where, --final --x):")
        for k in table.run_keys():
            values = sorted({str(row.get(k)) for row in table.rows})
            print(f"  {k}: {', '.join(values[:6])}{' ...' if len(values) > 6 else ''}")
        print("metrics (--y, --x):")
        for m in table.metrics:
            print(f"  {m}")
        return 0
    if not args.y:
        raise PlotError("--y METRIC is required (--list-keys shows the metrics)")
    try:
        figure_format(args.out)
    except ValueError as e:
        raise PlotError(f"--out {e}") from None
    runs = select_runs(runs, args.where)
    if not runs:
        raise PlotError(f"no run matches --where {' '.join(args.where)}")
    if args.final or args.best:
        if not args.x:
            raise PlotError("--final/--best need --x KEY (e.g. --x model.dim)")
        if args.style:
            raise PlotError("--style is for curves; --final draws mean and error bars")
        drawn = plot_final(runs, args.x, args.y, args.out, by=args.by, stat="best" if args.best else "final",
                           err=args.err, logx=args.logx, logy=args.logy, title=args.title)
    else:
        drawn = plot_curves(runs, args.y, args.out, x=args.x or "step", by=args.by, style=args.style,
                            logx=args.logx, logy=args.logy, title=args.title)
    n = sum(g["n_runs"] for g in drawn["groups"].values())
    skipped = len(drawn["skipped"])
    print(f"wrote {drawn['path']} ({len(drawn['groups'])} group(s), {n} run(s)"
          + (f"; {skipped} run(s) without {args.y}" if skipped else "") + ")")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``lmlab plot ...``: 0 on success, 2 (one line ``error: ...`` on stderr) on bad usage."""
    return run_command(_run, argv, PlotError)


if __name__ == "__main__":
    raise SystemExit(main())
