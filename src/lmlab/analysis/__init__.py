"""Analysis of many runs: read run folders, tabulate, plot, and write a self-contained HTML report.

Usage::

    from lmlab.analysis import load_runs, plot_lines, write_csv, write_html_report
    runs = load_runs("runs/my_grid")
    series = {r.name: r.series("loss") for r in runs}
    png = plot_lines(series, "out/loss.png", "step", "loss", "Training loss", logy=True)
    write_csv([{"run": r.name, "final_loss": r.final("loss")} for r in runs], "out/results.csv")
    write_html_report("out/report.html", "My grid", [{"heading": "Loss", "images": [png]}])
"""

from lmlab.analysis.report import Section, format_value, plot_lines, write_html_report
from lmlab.analysis.runs import RunRecord, flatten, load_run, load_runs, write_csv

__all__ = ["RunRecord", "Section", "flatten", "format_value", "load_run", "load_runs", "plot_lines", "write_csv",
           "write_html_report"]
