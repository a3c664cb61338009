"""Results of the memory app: in-weight vs in-tool recall, and the parameters each needs per fact.

Reads every run folder under a root (DESIGN.md principle 3: analysis reads only run folders). A memory
run carries ``tags.mode`` ("weight" or "tool"), ``tags.people`` and ``tags.data_dir`` (the dataset
folder, whose ``manifest.json`` gives ``facts`` (top level or under ``counts``), ``bits_per_fact`` and the
data ``seed``); its metrics hold
``recall/{train,ood}/{correct,tool_call_rate,valid_sql_rate,n}`` rows. The report answers: how recall
falls with the number of facts for each mode and model size, the smallest model that reaches 95% recall
for each number of facts, and the log-log slope of that size against facts for in-weight learning (with
the parameters per fact and bits per parameter it implies), and the knowledge-capacity figure in the style of
Physics of LMs 3.3 (``lmlab.analysis.report.plot_capacity``): bits stored against parameters with the 2 bits per
parameter line, and contours of recall over (parameters, facts) for each mode.

Usage::

    .venv/bin/python apps/memory/analyze.py runs/memory/quick     # table on stdout, files in runs/memory/quick/report
    .venv/bin/python apps/memory/analyze.py runs/memory --out out/mem   # results.csv, *.png, report.html
    .venv/bin/python apps/memory/analyze.py runs/memory/capacity --out out/cap --format svg   # SVG figures

    from memory.analyze import make_report
    summary = make_report("runs/memory", "out/mem")
    print(summary["fit"]["weight"]["slope"], summary["fit"]["weight"]["params_per_fact"])
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script from any folder: make `memory.*` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
from collections import defaultdict  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from typing import Any  # noqa: E402

from lmlab.analysis import RunRecord, load_runs, plot_lines, write_csv, write_html_report  # noqa: E402
from lmlab.analysis.report import Section, format_value, plot_capacity  # noqa: E402
from lmlab.evals.recall import MISSES  # noqa: E402

log = logging.getLogger(__name__)

MODES = ("weight", "tool")
MODE_LABEL = {"weight": "in-weight", "tool": "in-tool"}
RECALL = "recall/train/correct"
COLUMNS = ["name", "mode", "people", "facts", "alpha", "bits_per_fact", "seed", "data_seed", "dim", "n_layers",
           "params", "smear_keys", "smear_queries", "smear_layers", "practice", "practice_style", "batch_size", "lr",
           "steps", "status", "restarts", "recall_train_final", "recall_train_best",
           "step_recall_95", "exposures_95", "exposures_final", "budget_exposures", "bits_per_param",
           "recall_ood_final", "recall_novel_final", "tool_call_rate_train", "valid_sql_rate_train",
           "tool_call_rate_ood", "valid_sql_rate_ood", *(f"novel_miss_{k}" for k in MISSES), "train_time_s",
           "restart_time_s"]
TABLE_COLUMNS = ["name", "mode", "facts", "seed", "params", "steps", "recall_train_final", "recall_train_best",
                 "step_recall_95", "recall_ood_final", "recall_novel_final", "tool_call_rate_train", "status"]

__all__ = ["base_budget", "capacity_fit", "convergence", "fit_loglog", "format_table", "main", "make_report",
           "min_params_for", "read_manifest", "results_rows"]


def _find_dir(data_dir: str, run_path: Path) -> Path | None:
    """A dataset folder named in a run's tags: absolute, relative to the working folder, or to a run's parents."""
    p = Path(data_dir)
    candidates = [p] if p.is_absolute() else [p, *(parent / p for parent in run_path.resolve().parents)]
    return next((c for c in candidates if (c / "manifest.json").is_file()), None)


def read_manifest(data_dir: str | os.PathLike | None, run_path: Path, cache: dict | None = None) -> dict[str, Any]:
    """The dataset's manifest.json as a dict ({} when it cannot be found or read)."""
    if not data_dir:
        return {}
    key = (str(data_dir), str(run_path))
    if cache is not None and key in cache:
        return cache[key]
    found = _find_dir(str(data_dir), run_path)
    manifest: dict[str, Any] = {}
    if found is None:
        log.warning("%s: dataset manifest %s/manifest.json not found", run_path, data_dir)
    else:
        try:
            loaded = json.loads((found / "manifest.json").read_text(encoding="utf-8"))
            manifest = loaded if isinstance(loaded, dict) else {}
        except (OSError, ValueError) as e:
            log.warning("%s: unreadable manifest (%s)", found, e)
    if cache is not None:
        cache[key] = manifest
    return manifest


def results_rows(records: Sequence[RunRecord], threshold: float = 0.95) -> list[dict[str, Any]]:
    """One row per memory run (a run with ``tags.mode`` weight or tool), in the order of ``records``."""
    rows = []
    cache: dict = {}
    for r in records:
        mode = r.get("tags.mode")
        if mode not in MODES:
            continue
        manifest = read_manifest(r.get("tags.data_dir"), r.path, cache)
        counts = manifest.get("counts") if isinstance(manifest.get("counts"), dict) else {}
        steps = r.summary.get("step")
        if steps is None and r.metrics:
            steps = max(int(row["step"]) for row in r.metrics)
        facts = manifest.get("facts", counts.get("facts"))
        per_step = _exposures_per_step(r, manifest, counts, facts)
        step95 = r.first_step_reaching(RECALL, threshold)
        best = r.best(RECALL)
        params = r.summary.get("num_params")
        bits = manifest.get("bits_per_fact")
        rows.append({
            "name": r.name,
            "mode": mode,
            "people": r.get("tags.people", manifest.get("people", counts.get("people"))),
            "facts": manifest.get("facts", counts.get("facts")),
            "alpha": float(manifest.get("alpha") or 0.0),
            "bits_per_fact": manifest.get("bits_per_fact"),
            "seed": r.get("seed"),
            "data_seed": r.get("tags.data_seed", manifest.get("seed")),
            "dim": r.get("model.dim"),
            "n_layers": r.get("model.n_layers"),
            "params": params,
            "smear_keys": r.get("model.smear_keys", 0),
            "smear_queries": bool(r.get("model.smear_queries", False)),
            "smear_layers": (" ".join(str(i) for i in r.get("model.smear_layers") or [])
                             or ("all" if r.get("model.smear_keys", 0) else "")),
            # the in-tool file's practice people and how they were drawn (lists / pseudo / mixed / varied)
            "practice": (manifest.get("build_args") or {}).get("practice", r.get("tags.practice")),
            "practice_style": (manifest.get("build_args") or {}).get("practice_style", r.get("tags.practice_style")),
            "batch_size": r.get("data.batch_size"),
            "lr": r.get("optim.lr"),
            "steps": steps,
            "status": r.summary.get("status", "unfinished"),
            # attempts that train.restart abandoned (e.g. in-tool copying that never set in) and their training time
            "restarts": int(r.summary.get("restarts") or 0),
            "recall_train_final": r.final(RECALL),
            "recall_train_best": best,
            "step_recall_95": step95,
            "exposures_95": None if per_step is None or step95 is None else round(step95 * per_step, 1),
            "exposures_final": None if per_step is None or steps is None else round(steps * per_step, 1),
            # the budget the run was given (train.steps), whether or not it stopped early
            "budget_exposures": (None if per_step is None or r.get("train.steps") is None
                                 else round(r.get("train.steps") * per_step, 1)),
            # information stored in the weights: the recalled share of the facts' bits, per parameter
            "bits_per_param": (best * facts * bits / params if mode == "weight" and None not in (best, facts, bits)
                               and params else None),
            "recall_ood_final": r.final("recall/ood/correct"),
            "tool_call_rate_train": r.final("recall/train/tool_call_rate"),
            "valid_sql_rate_train": r.final("recall/train/valid_sql_rate"),
            "tool_call_rate_ood": r.final("recall/ood/tool_call_rate"),
            "valid_sql_rate_ood": r.final("recall/ood/valid_sql_rate"),
            "recall_novel_final": r.final("recall/novel/correct"),
            **{f"novel_miss_{k}": r.final(f"recall/novel/miss/{k}") for k in MISSES},
            "train_time_s": r.summary.get("train_time_s"),
            "restart_time_s": _abandoned_time(r.path),
        })
    return rows


def _abandoned_time(run_dir: Path) -> float:
    """Training seconds of the attempts ``train.restart`` abandoned (``RUN/attempts/K/summary.json``)."""
    total = 0.0
    for summary in sorted(Path(run_dir).glob("attempts/*/summary.json")):
        try:
            total += float(json.loads(summary.read_text(encoding="utf-8")).get("train_time_s") or 0.0)
        except (ValueError, OSError):
            continue
    return round(total, 1)


def _exposures_per_step(r: RunRecord, manifest: dict, counts: dict, facts: Any) -> float | None:
    """Dialogs about each training fact seen per optimizer step (in-weight runs: every training dialog teaches one
    fact; the in-tool files also hold absent and practice questions, which teach no fact): None when unknown."""
    if r.get("tags.mode") != "weight" or not facts:
        return None
    batch = r.get("data.batch_size")
    lines = (counts.get("lines") or {}).get("weight_train.jsonl")
    paraphrases = manifest.get("paraphrases")
    if not batch or not lines or not paraphrases:
        return None
    accum = r.get("train.grad_accum") or 1
    return batch * accum * (facts * paraphrases / lines) / facts


def _budget_key(value: Any) -> float | None:
    """Budgets (exposures per fact) equal to 2 significant digits count as the same budget."""
    return None if value is None else float(f"{float(value):.2g}")


def min_params_for(rows: Sequence[dict[str, Any]], threshold: float = 0.95,
                   budget: float | None = None) -> list[dict[str, Any]]:
    """For each (mode, facts, alpha): the smallest ``params`` whose mean over seeds of best train recall >= threshold.

    Seeds of one size under one budget are averaged. With ``budget`` (exposures per fact), only the runs given that
    budget count (to 2 significant digits), so that a capacity curve compares sizes under one training budget.
    Returns rows ``{mode, facts, alpha, params, recall, seeds, bits_per_fact}`` sorted by mode, alpha, facts; a
    (mode, facts, alpha) that no model size reaches is left out.
    """
    groups: dict[tuple, list[float]] = defaultdict(list)
    bits: dict[tuple, Any] = {}
    for row in rows:
        if row.get("facts") is None or row.get("params") is None or row.get("recall_train_best") is None:
            continue
        if budget is not None and _budget_key(row.get("budget_exposures")) != _budget_key(budget):
            continue
        # seeds of one size under one budget are averaged; other budgets are other settings, not seeds
        key = (row["mode"], row["facts"], float(row.get("alpha") or 0.0), row["params"],
               _budget_key(row.get("budget_exposures")))
        groups[key].append(float(row["recall_train_best"]))
        bits.setdefault(key[:3], row.get("bits_per_fact"))
    best: dict[tuple, dict[str, Any]] = {}
    for (mode, facts, alpha, params, _), recalls in groups.items():
        mean = statistics.fmean(recalls)
        k = (mode, facts, alpha)
        if mean >= threshold and (k not in best or params < best[k]["params"]):
            best[k] = {"mode": mode, "facts": facts, "alpha": alpha, "params": params, "recall": mean,
                       "seeds": len(recalls), "bits_per_fact": bits.get(k)}
    order = {m: i for i, m in enumerate(MODES)}
    return sorted(best.values(), key=lambda d: (order.get(d["mode"], len(order)), d["alpha"], d["facts"]))


def base_budget(rows: Sequence[dict[str, Any]], mode: str = "weight") -> float | None:
    """The budget (exposures per fact) that the most numbers of facts of ``mode`` were trained with (ties: the
    smaller budget): the one a capacity curve across numbers of facts should compare at. None without budgets."""
    facts_at: dict[float, set] = defaultdict(set)
    for r in rows:
        b = _budget_key(r.get("budget_exposures"))
        if r.get("mode") == mode and b is not None and r.get("facts") is not None:
            facts_at[b].add(r["facts"])
    if not facts_at:
        return None
    return min(facts_at, key=lambda b: (-len(facts_at[b]), b))


def convergence(rows: Sequence[dict[str, Any]], threshold: float = 0.95, mode: str = "weight") -> list[dict[str, Any]]:
    """Does the smallest size reaching ``threshold`` move when the budget grows? For each (facts, alpha) of
    ``mode`` trained under two or more budgets: one row per budget with the smallest params reaching it (None when
    none of the sizes tried at that budget does), the largest size tried, and ``ratio_to_base``: the smallest
    params at the base (first) budget over those at this one (1.0: the figure did not move)."""
    budgets: dict[tuple, set] = defaultdict(set)
    for r in rows:
        b = _budget_key(r.get("budget_exposures"))
        if r.get("mode") == mode and b is not None and r.get("facts") is not None:
            budgets[(r["facts"], float(r.get("alpha") or 0.0))].add(b)
    out = []
    for (facts, alpha), bs in sorted(budgets.items()):
        if len(bs) < 2:
            continue
        base = None
        for b in sorted(bs):
            hit = [m for m in min_params_for(rows, threshold, budget=b)
                   if m["mode"] == mode and m["facts"] == facts and m["alpha"] == alpha]
            tried = [r for r in rows if r.get("mode") == mode and r.get("facts") == facts
                     and float(r.get("alpha") or 0.0) == alpha and _budget_key(r.get("budget_exposures")) == b
                     and r.get("params") is not None]
            params = hit[0]["params"] if hit else None
            if base is None:
                base = params
            out.append({"facts": facts, "alpha": alpha, "budget_exposures": b, "min_params": params,
                        "sizes_tried": len(tried), "smallest_tried": min((r["params"] for r in tried), default=None),
                        "ratio_to_base": (base / params) if base and params else None})
    return out


def fit_loglog(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Least squares ``log10(y) = slope * log10(x) + intercept``; needs two distinct positive xs."""
    pts = [(math.log10(x), math.log10(y)) for x, y in zip(xs, ys) if x and y and x > 0 and y > 0]
    if len({x for x, _ in pts}) < 2:
        raise ValueError(f"a log-log fit needs at least two distinct positive x values, got {list(xs)}")
    mx = statistics.fmean(x for x, _ in pts)
    my = statistics.fmean(y for _, y in pts)
    slope = sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)
    return slope, my - slope * mx


def capacity_fit(min_rows: Sequence[dict[str, Any]], mode: str = "weight") -> dict[str, Any]:
    """Fit min params vs facts for one mode: slope, intercept (log10), median params per fact, bits per param.

    With fewer than two points the slope and intercept are None (the medians still come when there is one).
    """
    pts = [r for r in min_rows if r["mode"] == mode and not r.get("alpha")]  # independent facts (alpha 0) only
    out: dict[str, Any] = {"mode": mode, "points": len(pts), "slope": None, "intercept": None,
                           "params_per_fact": None, "bits_per_param": None, "params_per_added_fact": None,
                           "largest_facts": None, "params_per_fact_largest": None, "bits_per_param_largest": None}
    if not pts:
        return out
    top = max(pts, key=lambda r: r["facts"])
    out["largest_facts"] = top["facts"]
    out["params_per_fact_largest"] = top["params"] / top["facts"]
    if top.get("bits_per_fact") is not None:
        out["bits_per_param_largest"] = top["facts"] * top["bits_per_fact"] / top["params"]
    if len({r["facts"] for r in pts}) >= 2:  # least squares of params against facts: the cost of one more fact
        mx = statistics.fmean(r["facts"] for r in pts)
        my = statistics.fmean(r["params"] for r in pts)
        out["params_per_added_fact"] = (sum((r["facts"] - mx) * (r["params"] - my) for r in pts)
                                        / sum((r["facts"] - mx) ** 2 for r in pts))
    out["params_per_fact"] = statistics.median(r["params"] / r["facts"] for r in pts)
    bpp = [r["facts"] * r["bits_per_fact"] / r["params"] for r in pts if r.get("bits_per_fact") is not None]
    out["bits_per_param"] = statistics.median(bpp) if bpp else None
    try:
        out["slope"], out["intercept"] = fit_loglog([r["facts"] for r in pts], [r["params"] for r in pts])
    except ValueError:
        pass
    return out


def _size_key(row: dict[str, Any]) -> tuple:
    return (row.get("dim"), row.get("n_layers"))


def _size_label(row: dict[str, Any]) -> str:
    params = row.get("params")
    p = f", {params / 1e6:.2g}M" if isinstance(params, (int, float)) and params >= 1e5 else (
        f", {params:,} params" if params else "")
    return f"d{row.get('dim')} L{row.get('n_layers')}{p}"


def _by_facts(rows: Sequence[dict[str, Any]], key: str) -> dict[str, tuple[list, list]]:
    """One series per (mode, model size): mean over seeds of ``key`` at each number of facts."""
    groups: dict[tuple, dict[Any, list[float]]] = defaultdict(lambda: defaultdict(list))
    labels: dict[tuple, str] = {}
    for row in rows:
        if row.get("facts") is None or row.get(key) is None:
            continue
        g = (MODES.index(row["mode"]), *(_size_key(row)))
        groups[g][row["facts"]].append(float(row[key]))
        labels.setdefault(g, f"{MODE_LABEL[row['mode']]} {_size_label(row)}")
    out = {}
    for g in sorted(groups, key=lambda k: tuple(-1 if v is None else v for v in k)):
        facts = sorted(groups[g])
        out[labels[g]] = (facts, [statistics.fmean(groups[g][f]) for f in facts])
    return out


def _bits_vs_exposures(records: Sequence[RunRecord], rows: Sequence[dict[str, Any]]) -> dict[str, tuple[list, list]]:
    """One curve per in-weight run: bits stored per parameter (train recall x facts x bits per fact / params) at
    each recall evaluation, against exposures per fact by then."""
    by_name = {row["name"]: row for row in rows}
    out: dict[str, tuple[list, list]] = {}
    for r in records:
        row = by_name.get(r.name)
        if not row or row["mode"] != "weight" or None in (row["facts"], row["bits_per_fact"], row["params"]):
            continue
        per_step = row["exposures_final"] / row["steps"] if row.get("exposures_final") and row.get("steps") else None
        steps, values = r.series(RECALL)
        if per_step is None or not steps:
            continue
        scale = row["facts"] * row["bits_per_fact"] / row["params"]
        pts = [(s * per_step, v * scale) for s, v in zip(steps, values) if s > 0]
        if pts:
            out[f"{row['facts']} facts, {_size_label(row)}"] = ([x for x, _ in pts], [y for _, y in pts])
    return out


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] = TABLE_COLUMNS) -> str:
    """A plain fixed-width text table."""
    cells = [[format_value(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def make_report(root: str | os.PathLike, out_dir: str | os.PathLike, threshold: float = 0.95,
                runs: Sequence[str | os.PathLike] | None = None, fmt: str = "png") -> dict[str, Any]:
    """Write results.csv, six figures (``fmt``: "png" or "svg") and report.html under ``out_dir``; return a summary
    dict (with the fits). The runs are every run folder under ``root``, or only the folders ``runs`` (e.g. one
    grid's runs, so that older runs left in the same folder stay out)."""
    if fmt not in ("png", "svg"):
        raise ValueError(f"fmt must be png or svg, got {fmt!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = load_runs(root if runs is None else [r for r in runs if Path(r, "config.yaml").is_file()])
    rows = results_rows(records, threshold)
    notes: list[str] = []
    if not rows:
        notes.append(f"no memory runs (run folders with tags.mode weight/tool) under {root}")
    missing = sorted(r["name"] for r in rows if r["facts"] is None)
    if missing:
        notes.append(f"{len(missing)} run(s) without a readable dataset manifest (no facts count): "
                     + ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""))
    files = {"csv": write_csv(rows, out / "results.csv", COLUMNS)}

    files["recall_vs_facts"] = plot_lines(
        _by_facts(rows, "recall_train_final"), out / f"recall_vs_facts.{fmt}", "facts", "final train recall",
        "Recall of training facts vs number of facts", logx=True)

    # in-weight: the capacity curve compares sizes under the budget most numbers of facts were given (longer
    # budgets are the convergence check, reported apart); in-tool: every run counts
    budget = base_budget(rows, "weight")
    mins = [m for m in min_params_for(rows, threshold, budget=budget) if m["mode"] == "weight"] + [
        m for m in min_params_for(rows, threshold) if m["mode"] != "weight"]
    conv = convergence(rows, threshold)
    fits = {m: capacity_fit(mins, m) for m in MODES}
    series: dict[str, tuple[list, list]] = {}
    styles: dict[str, dict[str, Any]] = {}
    pct = f"{threshold:.0%}"
    for m in MODES:
        pts = [r for r in mins if r["mode"] == m]
        if not pts:
            notes.append(f"{MODE_LABEL[m]}: no model size reaches {pct} train recall; no curve of minimum parameters")
            continue
        series[f"{MODE_LABEL[m]} (min params for {pct})"] = ([r["facts"] for r in pts], [r["params"] for r in pts])
    for m in MODES:  # numbers of facts that no size reached: a lower bound, drawn at the largest size tried
        reached = {r["facts"] for r in mins if r["mode"] == m}
        largest: dict[int, int] = {}
        for r in rows:
            if r.get("mode") == m and r.get("facts") is not None and r.get("params") is not None \
                    and r["facts"] not in reached:
                largest[r["facts"]] = max(largest.get(r["facts"], 0), r["params"])
        if largest:
            label = f"{MODE_LABEL[m]}: not reached (needs more than the largest size)"
            series[label] = (sorted(largest), [largest[f] for f in sorted(largest)])
            styles[label] = {"linestyle": "none", "marker": "^", "markersize": 7, "fillstyle": "none",
                             "color": "C0" if m == "weight" else "C1"}
    w = fits["weight"]
    if w["slope"] is not None:
        xs = sorted({r["facts"] for r in mins if r["mode"] == "weight"})
        label = f"in-weight fit: params ~ facts^{w['slope']:.2f} ({w['params_per_fact']:.3g} params/fact)"
        series[label] = (xs, [10 ** w["intercept"] * x ** w["slope"] for x in xs])
        styles[label] = {"linestyle": "--", "marker": None, "color": "gray"}
    elif w["points"]:
        notes.append("in-weight: fewer than two numbers of facts reach the threshold; no slope fitted")
    files["min_params_vs_facts"] = plot_lines(
        series, out / f"min_params_vs_facts.{fmt}", "facts", "parameters", f"Smallest model reaching {pct} recall",
        logx=True, logy=True, styles=styles)

    # the capacity figure: in-weight at the budget the sizes are compared at (as above), in-tool all runs
    cap_rows = [{**r, "recall": r["recall_train_best"]} for r in rows
                if r["mode"] != "weight" or budget is None
                or _budget_key(r.get("budget_exposures")) == _budget_key(budget)]
    cap_title = (f"Knowledge capacity (Physics of LMs 3.3 style): best train recall of {len(cap_rows)} runs"
                 + (f", in-weight at {budget:g} exposures per fact" if budget else ""))
    capacity = plot_capacity(cap_rows, out / f"capacity.{fmt}", title=cap_title)
    files["capacity"] = capacity["path"]

    step_series = {}
    for r in records:
        if r.get("tags.mode") in MODES:
            steps, values = r.series(RECALL)
            if steps:
                step_series[f"{MODE_LABEL[r.get('tags.mode')]} {r.name}"] = (steps, values)
    if not step_series and rows:
        notes.append("no run logged recall/train/correct")
    files["recall_vs_step"] = plot_lines(step_series, out / f"recall_vs_step.{fmt}", "step", "train recall",
                                         "Train recall during training, with and without the tool")
    alphas = sorted({r["alpha"] for r in rows if r["mode"] == "weight" and r.get("facts")})
    if len(alphas) > 1:  # the compressibility experiment: params per fact against alpha, beside its bits per fact
        series_a: dict[str, tuple[list, list]] = {}
        for facts in sorted({r["facts"] for r in mins if r["mode"] == "weight" and r["alpha"] in alphas}):
            pts = sorted((r["alpha"], r["params"] / facts) for r in mins
                         if r["mode"] == "weight" and r["facts"] == facts)
            series_a[f"{facts} facts: min params per fact for {pct}"] = ([a for a, _ in pts], [v for _, v in pts])
        bits_a = sorted({(r["alpha"], r["bits_per_fact"]) for r in rows
                         if r["mode"] == "weight" and r.get("bits_per_fact") is not None})
        series_a["bits per fact to store (given the family rule)"] = ([a for a, _ in bits_a], [b for _, b in bits_a])
        files["alpha"] = plot_lines(series_a, out / f"params_vs_alpha.{fmt}",
                                    "alpha (share of family-determined values)", "parameters per fact / bits per fact",
                                    "In-weight: compressibility", logy=True)
    files["bits_vs_exposures"] = plot_lines(
        _bits_vs_exposures(records, rows), out / f"bits_vs_exposures.{fmt}", "exposures per fact",
        "bits stored per parameter", "In-weight: bits per parameter vs exposures (Physics of LMs 3.3)", logx=True)
    ood = _by_facts(rows, "recall_ood_final")
    if not ood and rows:
        notes.append("no run logged recall/ood/correct")
    files["ood_recall"] = plot_lines(ood, out / f"ood_recall.{fmt}", "facts", "final OOD recall",
                                     "Recall on out-of-distribution questions vs facts", logx=True)

    fit_lines = []
    for m in MODES:
        f = fits[m]
        if f["slope"] is not None:
            fit_lines.append(f"{MODE_LABEL[m]}: min params ~ facts^{f['slope']:.3f} over {f['points']} points; "
                             f"median {f['params_per_fact']:.4g} params/fact"
                             + (f", {f['bits_per_param']:.3g} bits/param" if f["bits_per_param"] is not None else ""))
        if m == "weight" and f["params_per_added_fact"] is not None:
            fit_lines.append(f"in-weight: {f['params_per_added_fact']:.3g} params per added fact (linear fit); at the "
                             f"largest number of facts ({f['largest_facts']}): {f['params_per_fact_largest']:.3g} "
                             f"params/fact, {f['bits_per_param_largest']:.3g} bits/param")
    if budget is not None and any(r["mode"] == "weight" for r in rows):
        fit_lines.append(f"in-weight sizes compared at {budget:g} exposures per fact (the budget most numbers of "
                         "facts were trained with)")
    for c in conv:
        if c["ratio_to_base"] is not None and c["ratio_to_base"] != 1.0:
            fit_lines.append(f"convergence, {c['facts']} facts: {c['budget_exposures']:g} exposures per fact moves the "
                             f"smallest size by {c['ratio_to_base']:.3g}x")
    counts = ", ".join(f"{sum(r['mode'] == m for r in rows)} {MODE_LABEL[m]}" for m in MODES)
    intro = f"{len(rows)} memory runs under {root} ({counts}); threshold {pct} train recall."
    sections = [
        Section("Summary", text="\n".join([intro, *fit_lines, *notes])),
        Section(f"Smallest model reaching {pct} recall", table=mins,
                text="" if mins else f"No (mode, facts) reaches {pct}.", images=[files["min_params_vs_facts"]]),
        *([Section("Convergence: the smallest size under a larger budget", table=conv,
                   text="In-weight, per number of facts trained under two or more budgets (exposures per fact): the "
                        "smallest size reaching the threshold at each; ratio_to_base: smallest params at the first "
                        "budget over this one.")] if conv else []),
        Section("Knowledge capacity (Physics of LMs 3.3)", images=[files["capacity"]],
                text="(a) Bits stored = facts x bits per fact x best train recall (only exactly recalled facts count: "
                     "a lower bound on what a model holds), against parameters, with the 2 and 1 bit per parameter "
                     "lines of Allen-Zhu & Li; in-tool runs read facts from the database, so their bits are retrieved, "
                     "not stored. (b, c) Recall over (parameters, facts), contours interpolated in log-log space; "
                     "seeds at one point are averaged." + "".join(f"\n{n}" for n in capacity["notes"])),
        Section("Recall vs facts", images=[files["recall_vs_facts"]]),
        Section("Recall during training", images=[files["recall_vs_step"]]),
        *([Section("Compressibility (alpha)", images=[files["alpha"]])] if "alpha" in files else []),
        Section("Bits per parameter vs exposures", images=[files["bits_vs_exposures"]],
                text="In-weight runs: recalled share of the facts' information (bits) per parameter at each "
                     "evaluation, against the dialogs seen per fact."),
        Section("Out-of-distribution recall", images=[files["ood_recall"]]),
        Section("All runs", table=rows, columns=COLUMNS, text="" if rows else "No runs."),
    ]
    files["html"] = write_html_report(out / "report.html", "Memory: in-weight vs in-tool learning", sections)
    return {"runs": len(rows), "modes": {m: sum(r["mode"] == m for r in rows) for m in MODES},
            "threshold": threshold, "min_params": mins, "fit": fits, "budget": budget, "convergence": conv,
            "notes": notes,
            "files": {k: str(v) for k, v in files.items()}, "rows": rows}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", help="folder of memory run folders (searched recursively)")
    parser.add_argument("--out", default=None, help="output folder (default: ROOT/report)")
    parser.add_argument("--threshold", type=float, default=0.95, help="recall counted as learned (default 0.95)")
    parser.add_argument("--format", choices=["png", "svg"], default="png", help="figure format (default png)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = Path(args.out) if args.out else Path(args.root) / "report"
    summary = make_report(args.root, out, args.threshold, fmt=args.format)
    print(format_table(summary["rows"]))
    for m in MODES:
        f = summary["fit"][m]
        if f["slope"] is not None:
            print(f"{MODE_LABEL[m]}: min params ~ facts^{f['slope']:.3f}; {f['params_per_fact']:.4g} params/fact"
                  + (f"; {f['bits_per_param']:.3g} bits/param" if f["bits_per_param"] is not None else ""))
    for note in summary["notes"]:
        print(f"note: {note}")
    print(f"wrote {summary['files']['html']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
