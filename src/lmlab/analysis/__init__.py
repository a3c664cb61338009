"""Analysis of many runs: read run folders, tabulate (pandas), plot, and write a self-contained HTML report.

Modules: ``runs`` (load run folders: config, summary, metrics), ``table`` (one row per run as a DataFrame,
curves in long form), ``report`` (line plots, the knowledge-capacity figure, PNG / SVG, the HTML report),
``plot`` (the ``lmlab plot`` command). Importing this package loads neither matplotlib nor pandas.

Usage::

    from lmlab.analysis import load_runs, plot_lines, runs_table, write_csv, write_html_report
    runs = load_runs("runs/my_grid")
    df = runs_table(runs)                                   # name, model.dim, summary.num_params, final.loss, ...
    print(df.groupby("model.dim")["final.loss"].mean())
    series = {r.name: r.series("loss") for r in runs}
    png = plot_lines(series, "out/loss.png", "step", "loss", "Training loss", logy=True)   # or out/loss.svg
    write_csv([{"run": r.name, "final_loss": r.final("loss")} for r in runs], "out/results.csv")
    write_html_report("out/report.html", "My grid", [{"heading": "Loss", "table": df, "images": [png]}])

    lmlab plot runs/my_grid --y loss --by model.dim --out out/loss.svg      # the command line
"""

from lmlab.analysis.report import Section, format_value, plot_capacity, plot_lines, save_figure, write_html_report
from lmlab.analysis.runs import RunRecord, flatten, load_run, load_runs, write_csv
from lmlab.analysis.table import best_mode, curves_table, runs_table

__all__ = ["RunRecord", "Section", "best_mode", "curves_table", "flatten", "format_value", "load_run", "load_runs",
           "plot_capacity", "plot_lines", "runs_table", "save_figure", "write_csv",
           "write_html_report"]
