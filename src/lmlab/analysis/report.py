"""Plots and a self-contained HTML report (PNG images embedded as base64) for run analyses.

matplotlib is imported inside the plotting functions with the Agg backend, so importing lmlab never
touches a display or pays for matplotlib.

Usage::

    from lmlab.analysis.report import Section, plot_lines, write_html_report
    png = plot_lines({"dim 64": ([1, 2, 3], [3.0, 2.1, 1.7])}, "out/loss.png", "step", "loss", "Training loss")
    write_html_report("out/report.html", "My grid", [
        Section("Loss", text="Lower is better.", table=[{"run": "a", "loss": 1.7}], images=[png]),
    ])
"""

from __future__ import annotations

import base64
import html
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmlab.analysis.runs import column_order

__all__ = ["Section", "format_value", "plot_lines", "write_html_report"]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass
class Section:
    """One part of a report: a heading, then optional text, a table (rows of dicts) and images (PNG paths)."""

    heading: str
    text: str = ""
    table: Sequence[Mapping[str, Any]] | None = None
    images: Sequence[str | os.PathLike] = field(default_factory=list)
    columns: Sequence[str] | None = None


def format_value(v: Any) -> str:
    """Short text for a table cell: floats with 4 significant digits, None as empty."""
    if v is None:
        return ""
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.4g}"
    return str(v)


def _table_html(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None) -> str:
    columns = list(columns) if columns is not None else column_order(rows)
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = "\n".join(
        "<tr>" + "".join(f"<td>{html.escape(format_value(row.get(c)))}</td>" for c in columns) + "</tr>"
        for row in rows
    )
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>"


def _image_html(path: str | os.PathLike) -> str:
    p = Path(path)
    data = p.read_bytes()
    if not data.startswith(PNG_SIGNATURE):
        raise ValueError(f"{p}: not a PNG file")
    b64 = base64.b64encode(data).decode("ascii")
    return f'<figure><img alt="{html.escape(p.name)}" src="data:image/png;base64,{b64}"></figure>'


_CSS = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:0.85em;margin:1em 0}th,td{border:1px solid #ccc;padding:2px 6px;
text-align:right}th{background:#eee}img{max-width:100%}p{white-space:pre-wrap}"""


def write_html_report(path: str | os.PathLike, title: str,
                      sections: Sequence[Section | Mapping[str, Any]]) -> Path:
    """Write one self-contained HTML file. A section is a :class:`Section` or a dict with the same keys
    (``heading``, ``text``, ``table``, ``images`` or ``image``, ``columns``)."""
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
        if sec.table:
            parts.append(_table_html(sec.table, sec.columns))
        for img in sec.images:
            parts.append(_image_html(img))
    parts.append("</body></html>\n")
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("\n".join(parts), encoding="utf-8")
    return p


def plot_lines(series: Mapping[str, tuple[Sequence[float], Sequence[float]]], path: str | os.PathLike,
               xlabel: str, ylabel: str, title: str, logx: bool = False, logy: bool = False,
               markers: bool = True, styles: Mapping[str, Mapping[str, Any]] | None = None) -> Path:
    """One line per label from ``{label: (xs, ys)}``; saves a PNG and returns its path.

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
            if logy:
                ax.set_yscale("log")
            ax.legend(fontsize=7, loc="best")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, alpha=0.3, which="both")
        fig.tight_layout()
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(p, format="png", dpi=100)
    finally:
        plt.close(fig)
    return p
