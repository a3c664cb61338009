"""Plots and a self-contained HTML report for run analyses: PNG or SVG figures, tables, the capacity plot.

Every plotting function picks the file format from the path's suffix (``.png``, ``.svg``; :func:`save_figure`
also takes ``.pdf``). The HTML report is one file that opens offline: each image is embedded as a ``data:``
URI (``image/png`` or ``image/svg+xml``, base64, in an ``<img>``, so SVG ids and styles of several figures
cannot clash), tables are plain HTML (rows of dicts, a pandas DataFrame, or a ``{key: value}`` mapping shown
as two columns) whose columns sort on a click (a few lines of inline JavaScript, no network).

:func:`plot_capacity` draws the knowledge-capacity figure in the style of Physics of Language Models 3.3
(Allen-Zhu & Li, "Knowledge capacity scaling laws"): bits stored against parameters with the 2 and 1 bit per
parameter lines, and contours of recall over (parameters, facts), in-weight and in-tool side by side.

matplotlib is imported inside the plotting functions with the Agg backend, so importing lmlab never
touches a display or pays for matplotlib.

Usage::

    from lmlab.analysis.report import Section, plot_capacity, plot_lines, write_html_report
    png = plot_lines({"dim 64": ([1, 2, 3], [3.0, 2.1, 1.7])}, "out/loss.png", "step", "loss", "Training loss")
    svg = plot_lines({"dim 64": ([1, 2, 3], [3.0, 2.1, 1.7])}, "out/loss.svg", "step", "loss", "Training loss")
    cap = plot_capacity([{"mode": "weight", "params": 42144, "facts": 320, "bits_per_fact": 8.5, "recall": 0.96},
                         ...], "out/capacity.png")
    print(cap["contours"], cap["notes"])        # levels drawn per mode, and why a panel has none
    write_html_report("out/report.html", "My grid", [
        Section("Loss", text="Lower is better.", table=[{"run": "a", "loss": 1.7}], images=[png, svg]),
        Section("Capacity", table={"slope": 0.98, "params per fact": 63}, images=[cap["path"]]),
    ])
"""

from __future__ import annotations

import base64
import html
import math
import os
import statistics
import xml.etree.ElementTree as ET
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmlab.analysis.runs import column_order

__all__ = ["Section", "figure_format", "format_value", "image_mime", "log_ticks", "plot_capacity", "plot_lines",
           "save_figure", "write_html_report"]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FIGURE_FORMATS = {".png": "png", ".svg": "svg", ".pdf": "pdf"}  # suffix -> matplotlib format


Table = Sequence[Mapping[str, Any]] | Mapping[str, Any] | Any  # rows of dicts, a {key: value}, or a DataFrame


@dataclass
class Section:
    """One part of a report: a heading, then optional text, a table and images (PNG or SVG paths).

    ``table``: rows of dicts, a pandas DataFrame, or a ``{key: value}`` mapping (shown as two columns)."""

    heading: str
    text: str = ""
    table: Table | None = None
    images: Sequence[str | os.PathLike] = field(default_factory=list)
    columns: Sequence[str] | None = None


def format_value(v: Any) -> str:
    """Short text for a table cell: floats with 4 significant digits, None / NaN / pandas NA as empty."""
    if v is None or type(v).__name__ in ("NAType", "NaTType"):
        return ""
    if isinstance(v, float):
        if math.isnan(v):
            return ""
        if not math.isfinite(v):
            return str(v)
        return f"{v:.4g}"
    return str(v)


def _table_rows(table: Table, columns: Sequence[str] | None) -> tuple[list[Mapping[str, Any]], list[str]]:
    """``(rows, columns)`` of any table form Section accepts."""
    if hasattr(table, "to_dict") and hasattr(table, "columns"):  # a pandas DataFrame
        cols = [str(c) for c in table.columns]
        rows = [dict(zip(cols, rec)) for rec in table.itertuples(index=False, name=None)]
        return rows, list(columns) if columns is not None else cols
    if isinstance(table, Mapping):
        return [{"key": k, "value": v} for k, v in table.items()], ["key", "value"]
    rows = list(table)
    return rows, list(columns) if columns is not None else column_order(rows)


def _table_html(table: Table, columns: Sequence[str] | None) -> str:
    rows, columns = _table_rows(table, columns)
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = "\n".join(
        "<tr>" + "".join(f"<td>{html.escape(format_value(row.get(c)))}</td>" for c in columns) + "</tr>"
        for row in rows
    )
    return (f'<div class="scroll"><table class="sortable">\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n'
            "</tbody>\n</table></div>")


def image_mime(data: bytes) -> str | None:
    """``"image/png"`` or ``"image/svg+xml"`` when ``data`` is a PNG or a well-formed SVG document, else None."""
    if data.startswith(PNG_SIGNATURE):
        return "image/png"
    head = data[:4096].lstrip().lower()
    if head.startswith((b"<?xml", b"<svg", b"<!doctype svg", b"<!--")) and b"<svg" in head:
        try:
            root = ET.fromstring(data)
        except ET.ParseError:
            return None
        if root.tag in ("svg", "{http://www.w3.org/2000/svg}svg"):
            return "image/svg+xml"
    return None


def _image_html(path: str | os.PathLike) -> str:
    p = Path(path)
    data = p.read_bytes()
    mime = image_mime(data)
    if mime is None:
        raise ValueError(f"{p}: not a PNG or SVG file")
    b64 = base64.b64encode(data).decode("ascii")
    return f'<figure><img alt="{html.escape(p.name)}" src="data:{mime};base64,{b64}"></figure>'


_CSS = """body{font-family:sans-serif;max-width:1400px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:0.85em;margin:1em 0}th,td{border:1px solid #ccc;padding:2px 6px;
text-align:right}th{background:#eee;cursor:pointer;user-select:none}img{max-width:100%}p{white-space:pre-wrap}
figure{margin:1em 0}div.scroll{overflow-x:auto;max-width:100%}"""

# Click a column heading to sort the table by it (numbers as numbers, empty cells last); click again to reverse.
_JS = """document.querySelectorAll("table.sortable").forEach(function (table) {
  table.querySelectorAll("th").forEach(function (th, col) {
    th.addEventListener("click", function () {
      var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
      var dir = th.dataset.dir === "asc" ? -1 : 1;
      table.querySelectorAll("th").forEach(function (h) { delete h.dataset.dir; });
      th.dataset.dir = dir === 1 ? "asc" : "desc";
      function key(row) {
        var t = row.cells[col].textContent.trim(), n = Number(t);
        return t === "" ? null : (isNaN(n) ? t : n);
      }
      rows.sort(function (a, b) {
        var x = key(a), y = key(b);
        if (x === null || y === null) { return (x === null) - (y === null); }
        if (typeof x !== typeof y) { return typeof x === "number" ? -dir : dir; }
        return x < y ? -dir : x > y ? dir : 0;
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
});"""


def write_html_report(path: str | os.PathLike, title: str,
                      sections: Sequence[Section | Mapping[str, Any]]) -> Path:
    """Write one self-contained HTML file. A section is a :class:`Section` or a dict with the same keys
    (``heading``, ``text``, ``table``, ``images`` or ``image``, ``columns``). Images must be PNG or SVG files
    (checked: anything else raises ValueError naming the file); tables of any form :class:`Section` takes."""
    parts = [f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>",
             f"<style>{_CSS}</style></head><body>", f"<h1>{html.escape(title)}</h1>"]
    for sec in sections:
        if isinstance(sec, Mapping):
            images = list(sec.get("images") or [])
            if sec.get("image"):
                images.append(sec["image"])
            sec = Section(heading=str(sec.get("heading", "")), text=str(sec.get("text") or ""),
                          table=sec.get("table"), images=images, columns=sec.get("columns"))
        parts.append(f"<h2>{html.escape(sec.heading)}</h2>")
        if sec.text:
            parts.append(f"<p>{html.escape(sec.text)}</p>")
        if sec.table is not None and len(sec.table):
            parts.append(_table_html(sec.table, sec.columns))
        for img in sec.images:
            parts.append(_image_html(img))
    parts.append(f"<script>{_JS}</script>\n</body></html>\n")
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("\n".join(parts), encoding="utf-8")
    return p


def plot_lines(series: Mapping[str, tuple[Sequence[float], Sequence[float]]], path: str | os.PathLike,
               xlabel: str, ylabel: str, title: str, logx: bool = False, logy: bool = False,
               markers: bool = True, styles: Mapping[str, Mapping[str, Any]] | None = None) -> Path:
    """One line per label from ``{label: (xs, ys)}``; saves a PNG or SVG (by the suffix) and returns its path.

    ``styles``: extra matplotlib ``plot`` keywords per label (e.g. ``{"fit": {"linestyle": "--"}}``).
    Empty series are skipped; with nothing to draw the figure says "no data" instead of failing.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    try:
        drawn = 0
        for label, (xs, ys) in series.items():
            pts = [(x, y) for x, y in zip(xs, ys) if x is not None and y is not None]
            if not pts:
                continue
            kwargs: dict[str, Any] = {"marker": "o" if markers else None, "markersize": 3, "label": str(label)}
            kwargs.update((styles or {}).get(label, {}))
            ax.plot([x for x, _ in pts], [y for _, y in pts], **kwargs)
            drawn += 1
        if not drawn:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        else:
            if logx:
                ax.set_xscale("log")
                log_ticks(ax.xaxis)
            if logy:
                ax.set_yscale("log")
                log_ticks(ax.yaxis)
            ax.legend(fontsize=7, loc="best")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, alpha=0.3, which="both")
        fig.tight_layout()
        p = save_figure(fig, path)
    finally:
        plt.close(fig)
    return p


def figure_format(path: str | os.PathLike) -> str:
    """matplotlib's format name for a figure path (``"png"``, ``"svg"``, ``"pdf"``); ValueError for others."""
    p = Path(path)
    fmt = FIGURE_FORMATS.get(p.suffix.lower())
    if fmt is None:
        raise ValueError(f"{p}: unsupported figure format {p.suffix or '(no suffix)'!r}; use .png, .svg or .pdf")
    return fmt


def save_figure(fig: Any, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Save a matplotlib figure in the format its suffix names (``.png``, ``.svg``, ``.pdf``); return the path.

    SVG text is drawn as paths (matplotlib's default) so the file needs no fonts; it carries no date and its
    element ids hash the content with a fixed salt, so the same figure gives the same bytes."""
    p = Path(path)
    fmt = figure_format(p)
    p.parent.mkdir(parents=True, exist_ok=True)
    import matplotlib

    metadata = {"Date": None} if fmt == "svg" else {"CreationDate": None} if fmt == "pdf" else None
    with matplotlib.rc_context({"svg.hashsalt": "lmlab"}):  # element ids from the content, not a random salt
        fig.savefig(p, format=fmt, dpi=dpi, metadata=metadata)
    return p


CAPACITY_MODES = {"weight": "in-weight", "tool": "in-tool"}


def _human(v: float, _pos: Any = None) -> str:
    """Tick text: 20k, 1.5M, 320."""
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:g}{suffix}"
    return f"{v:g}"


def log_ticks(axis: Any, values: Sequence[float] | None = None) -> None:
    """Readable ticks on a log axis (call it once the limits are set): the given values when there are a few,
    else 1-2-5 steps over up to 3 decades and powers of ten beyond, written as 320, 20k, 1.5M."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter

    if values is not None and 0 < len(set(values)) <= 8:
        axis.set_major_locator(FixedLocator(sorted(set(values))))
    else:
        lo, hi = sorted(axis.get_view_interval())
        decades = math.log10(hi / lo) if lo > 0 and hi > 0 else 99.0
        axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0) if decades <= 3 else (1.0,)))
    axis.set_major_formatter(FuncFormatter(_human))
    axis.set_minor_formatter(NullFormatter())


def _padded(lo: float, hi: float, factor: float = 1.4) -> tuple[float, float]:
    return lo / factor, hi * factor


def _capacity_points(rows: Any, keys: Mapping[str, str]) -> list[dict[str, Any]]:
    """Rows (dicts or a DataFrame) -> points with positive params and facts and a finite recall."""
    records = rows.to_dict("records") if hasattr(rows, "to_dict") and hasattr(rows, "columns") else list(rows)
    points = []
    for r in records:
        vals = {k: r.get(col) for k, col in keys.items()}
        num = {}
        for k in ("params", "facts", "recall", "bits_per_fact"):
            v = vals[k]
            num[k] = float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None
        if num["params"] is None or num["facts"] is None or num["recall"] is None \
                or num["params"] <= 0 or num["facts"] <= 0:
            continue
        mode = vals["mode"] if vals["mode"] in CAPACITY_MODES else "weight"
        points.append({**num, "mode": mode})
    return points


def _merge_duplicates(points: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One point per (params, facts): recall averaged (seeds, or budgets the caller did not filter out)."""
    groups: dict[tuple[float, float], list[float]] = defaultdict(list)
    for p in points:
        groups[(p["params"], p["facts"])].append(p["recall"])
    return [{"params": k[0], "facts": k[1], "recall": statistics.fmean(v), "n": len(v)} for k, v in groups.items()]


def _recall_contours(ax: Any, points: Sequence[Mapping[str, Any]], levels: Sequence[float]) -> tuple[list, str]:
    """Contours of recall over (log params, log facts) on ``ax``; returns (levels drawn, why none / which not)."""
    import numpy as np
    from matplotlib.tri import LinearTriInterpolator, Triangulation

    if len(points) < 3:
        return [], f"no contour: {len(points)} grid point(s), a contour needs 3 or more"
    facts = {p["facts"] for p in points}
    params = {p["params"] for p in points}
    if len(facts) < 2:
        return [], f"no contour: one number of facts ({int(next(iter(facts))):,}); the grid needs two or more"
    if len(params) < 2:
        return [], f"no contour: one model size ({int(next(iter(params))):,} params); the grid needs two or more"
    x = np.log10([p["params"] for p in points])
    y = np.log10([p["facts"] for p in points])
    z = np.array([p["recall"] for p in points])
    try:
        tri = Triangulation(x, y)
        interp = LinearTriInterpolator(tri, z)
    except (ValueError, RuntimeError) as e:  # qhull: all points on one line
        return [], f"no contour: the grid points cannot be triangulated ({str(e).splitlines()[0][:80]})"
    gx, gy = np.meshgrid(np.linspace(x.min(), x.max(), 200), np.linspace(y.min(), y.max(), 200))
    gz = interp(gx, gy)
    lo, hi = float(z.min()), float(z.max())
    inside = [lv for lv in levels if lo < lv < hi]
    missed = [lv for lv in levels if lv not in inside]
    why = f"recall {lo:.2f}-{hi:.2f} never crosses {', '.join(f'{lv:g}' for lv in missed)}" if missed else ""
    if not inside:
        return [], "no contour: " + why
    cs = ax.contour(10 ** gx, 10 ** gy, gz, levels=inside, colors="k", linewidths=1.2,
                    linestyles=["--", "-.", "-"][-len(inside):] if len(inside) <= 3 else "-")
    ax.clabel(cs, fmt=lambda v: f"{v:g}", fontsize=8, inline=True)
    return inside, why


def plot_capacity(rows: Any, path: str | os.PathLike, *, recall: str = "recall", params: str = "params",
                  facts: str = "facts", bits_per_fact: str = "bits_per_fact", mode: str = "mode",
                  levels: Sequence[float] = (0.5, 0.9, 0.95), title: str = "Knowledge capacity",
                  annotate: bool = True) -> dict[str, Any]:
    """The capacity figure of Physics of LMs 3.3, from result rows (dicts or a DataFrame) with the columns
    named by the keyword arguments: parameters, facts, bits per fact, recall, and mode ("weight" / "tool";
    anything else counts as in-weight).

    (a) **Bits stored vs parameters**, log-log: bits = facts x bits_per_fact x recall, the information of the
    facts the model answers exactly (a lower bound on what it holds: a partly right answer counts for
    nothing), with the 2 and 1 bit-per-parameter lines; points coloured by the number of facts, a thin line
    joining the sizes of one number of facts and a dotted ceiling at all of its bits. In-tool runs (hollow
    triangles) fetch facts from the database, so their bits are retrieved, not stored: they may pass 2/param.
    (b, c) **Recall over (parameters, facts)** for in-weight and in-tool, sharing axes: the grid points
    coloured by recall (duplicates at one (params, facts) averaged), and contour lines at ``levels``
    interpolated linearly over a triangulation in log-log space. A panel too sparse for contours (fewer than
    3 points, one number of facts or one size, or a recall range that never crosses a level) still shows its
    points, and says why on the panel.

    Returns ``{"path", "points": {mode: n}, "contours": {mode: [levels drawn]}, "notes": [...],
    "max_bits_per_param"}`` (the last: the most bits per parameter an in-weight point stores; None without one).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import ListedColormap, LogNorm, Normalize

    figure_format(path)  # a bad suffix fails before any drawing
    keys = {"params": params, "facts": facts, "recall": recall, "bits_per_fact": bits_per_fact, "mode": mode}
    points = _capacity_points(rows, keys)
    notes: list[str] = []
    out: dict[str, Any] = {"points": {m: sum(p["mode"] == m for p in points) for m in CAPACITY_MODES},
                           "contours": {m: [] for m in CAPACITY_MODES}, "notes": notes, "max_bits_per_param": None}
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.2), constrained_layout=True)
    ax_bits, *ax_modes = axes
    ax_modes[1].sharex(ax_modes[0])
    ax_modes[1].sharey(ax_modes[0])
    try:
        all_facts = sorted({p["facts"] for p in points})
        fnorm = LogNorm(vmin=all_facts[0], vmax=all_facts[-1]) if len(all_facts) > 1 else None
        fcmap = ListedColormap(plt.cm.viridis(np.linspace(0.0, 0.85, 256)))  # no pale yellow on white
        fcolor = (lambda f: fcmap(fnorm(f))) if fnorm else (lambda f: fcmap(0.4))

        # (a) bits stored against parameters
        with_bits = [p for p in points if p["bits_per_fact"] is not None]
        drawn = [p for p in with_bits if p["recall"] > 0]
        if len(with_bits) < len(points):
            notes.append(f"(a): {len(points) - len(with_bits)} point(s) without bits per fact are not drawn")
        if len(drawn) < len(with_bits):
            notes.append(f"(a): {len(with_bits) - len(drawn)} point(s) with recall 0 (no bits) are off the log axis")
        for m, marker in (("weight", "o"), ("tool", "^")):
            pts = [p for p in drawn if p["mode"] == m]
            if not pts:
                continue
            for f in sorted({p["facts"] for p in pts}):
                line = sorted((p["params"], p["facts"] * p["bits_per_fact"] * p["recall"]) for p in pts
                              if p["facts"] == f)
                style = "-" if m == "weight" else ":"
                ax_bits.plot([a for a, _ in line], [b for _, b in line], style, color=fcolor(f), lw=0.8, alpha=0.6)
            colors = [fcolor(p["facts"]) for p in pts]
            ax_bits.scatter([p["params"] for p in pts], [p["facts"] * p["bits_per_fact"] * p["recall"] for p in pts],
                            marker=marker, s=42, zorder=3, label=CAPACITY_MODES[m],
                            c=colors if m == "weight" else "none", edgecolors="k" if m == "weight" else colors,
                            linewidths=0.5 if m == "weight" else 1.5)
        if drawn:
            xs = [p["params"] for p in drawn]
            lo_x, hi_x = min(xs) / 1.5, max(xs) * 1.5
            for f in sorted({p["facts"] for p in drawn if p["mode"] == "weight"}):  # all the facts' bits
                total = max(p["facts"] * p["bits_per_fact"] for p in drawn if p["facts"] == f)
                ax_bits.hlines(total, lo_x, hi_x, colors=[fcolor(f)], linestyles="dotted", lw=1, alpha=0.8)
            grid = np.geomspace(lo_x, hi_x, 50)
            ys = [p["facts"] * p["bits_per_fact"] * p["recall"] for p in drawn]
            refs = [(2, "-", 1.4, "0.25"), (1, "--", 1.2, "0.35")]
            if min(y / x for x, y in zip(xs, ys)) < 0.5:  # models far below capacity: a guide at 0.1 too
                refs.append((0.1, ":", 1.0, "0.5"))
            for bits, style, lw, color in refs:
                ax_bits.plot(grid, bits * grid, style, color=color, lw=lw, label=f"{bits:g} bit/parameter")
            ax_bits.set_xscale("log")
            ax_bits.set_yscale("log")
            ax_bits.set_xlim(lo_x, hi_x)
            ax_bits.set_ylim(min(min(ys), refs[-1][0] * lo_x) / 1.5, max(max(ys), 2 * hi_x) * 1.3)
            log_ticks(ax_bits.xaxis)
            log_ticks(ax_bits.yaxis)
            ax_bits.legend(fontsize=8, loc="upper left")
            stored = [p for p in drawn if p["mode"] == "weight"]
            if stored:  # in-tool bits are fetched, not stored: the record is an in-weight one
                best = max(stored, key=lambda p: p["facts"] * p["bits_per_fact"] * p["recall"] / p["params"])
                ratio = best["facts"] * best["bits_per_fact"] * best["recall"] / best["params"]
                out["max_bits_per_param"] = ratio
                ax_bits.text(0.98, 0.02, f"in-weight, most stored: {ratio:.3g} bits/param ({_human(best['params'])} "
                             f"params, {_human(best['facts'])} facts)",
                             transform=ax_bits.transAxes, ha="right", va="bottom", fontsize=8)
            if fnorm:
                cb = fig.colorbar(plt.cm.ScalarMappable(norm=fnorm, cmap=fcmap), ax=ax_bits, pad=0.01)
                cb.set_label("facts")
                log_ticks(cb.ax.yaxis, all_facts)
        else:
            ax_bits.text(0.5, 0.5, "no data: no point with params, facts,\nbits per fact and recall > 0",
                         ha="center", va="center", transform=ax_bits.transAxes)
        ax_bits.set_xlabel("parameters")
        ax_bits.set_ylabel("bits stored = facts x bits/fact x recall")
        ax_bits.set_title("(a) bits stored vs parameters (dotted: all the facts' bits)", fontsize=10)
        ax_bits.grid(True, which="both", alpha=0.25)

        # (b), (c) recall over (parameters, facts)
        rnorm = Normalize(vmin=0.0, vmax=1.0)
        for letter, m, ax in zip("bc", CAPACITY_MODES, ax_modes):
            pts = _merge_duplicates([p for p in points if p["mode"] == m])
            label = CAPACITY_MODES[m]
            ax.set_title(f"({letter}) {label}: recall over (parameters, facts)", fontsize=10)
            ax.set_xlabel("parameters")
            ax.set_ylabel("facts")
            if not pts:
                ax.text(0.5, 0.5, f"no {label} runs", ha="center", va="center", transform=ax.transAxes)
                notes.append(f"({letter}) {label}: no runs")
                continue
            ax.set_xscale("log")
            ax.set_yscale("log")
            drawn_levels, why = _recall_contours(ax, pts, levels)
            out["contours"][m] = drawn_levels
            ax.scatter([p["params"] for p in pts], [p["facts"] for p in pts], c=[p["recall"] for p in pts],
                            cmap="RdYlGn", norm=rnorm, s=60, edgecolors="k", linewidths=0.5, zorder=3)
            if annotate and len(pts) <= 60:
                for p in pts:
                    ax.annotate(f"{p['recall']:.2f}", (p["params"], p["facts"]), textcoords="offset points",
                                xytext=(0, 7), ha="center", fontsize=7, zorder=4)
            if why:
                notes.append(f"({letter}) {label}: {why}")
                ax.text(0.02, 0.02, why, transform=ax.transAxes, fontsize=8, va="bottom", ha="left",
                        bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "0.7"})
            ax.grid(True, which="both", alpha=0.25)
            # the two panels share their axes: limits over every point, so neither hides the other's
            ax.set_xlim(*_padded(min(p["params"] for p in points), max(p["params"] for p in points)))
            ax.set_ylim(*_padded(min(p["facts"] for p in points), max(p["facts"] for p in points)))
            log_ticks(ax.xaxis)
            log_ticks(ax.yaxis, [p["facts"] for p in points])
        if points:
            cb = fig.colorbar(plt.cm.ScalarMappable(norm=rnorm, cmap="RdYlGn"), ax=list(ax_modes), pad=0.01)
            cb.set_label("recall")
        fig.suptitle(title)
        out["path"] = save_figure(fig, path)
    finally:
        plt.close(fig)
    return out
