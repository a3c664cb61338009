"""Redraw the README's analysis figures (docs/figures/) from committed results and real run folders.

Figures whose run folders are missing on this machine are skipped with a message (the committed PNGs stay):
- ``capacity.png``: the Physics of LMs 3.3 capacity plot from apps/memory/results/capacity.csv and
  capacity_large.csv (in-weight grids) and apps/memory/results/quickstart.csv (in-tool runs);
- ``min_params_vs_facts.png``: the smallest model reaching 95% train recall against the number of facts, one line
  per recipe (AdamW: capacity.csv / capacity_large.csv; Muon: capacity_muon_grid.csv / capacity_large_muon.csv /
  capacity_xl_muon.csv, and its 600-exposure checks: capacity_muon_grid.csv / capacity_large_muon_check.csv),
  lower bounds where no size tried reaches it, beside the paper's fit and the 10-parameters-per-fact line;
- ``recall_vs_step.png``: train recall curves of the capacity grid at 1,280 facts, by width (runs/memory/capacity);
- ``bits_vs_exposures.png``: bits stored per parameter against exposures per fact (the Physics of LMs 3.3 curve),
  the memory report's figure for the 5,120-fact grid (runs/memory/capacity_large, ``capacity_large.yaml``);
- ``final_recall_vs_people.png``: final train / novel recall against people by mode, seeds as error bars
  (runs/memory/observe, ``apps/memory/observe.yaml``);
- ``attention_entropy.png``: per-head attention entropy over training from the probes of one in-tool and one
  in-weight observe run;
- ``step_time.png``: where a training step's time goes (the profiler's ``time/*`` columns) per observe run;
- ``smollm_recipes.png``: the SmolLM2 finetunes' recall and KL to the base against facts, by recipe (plain,
  replay, replay + distillation), from the committed apps/memory/results/smollm*.csv.

Usage::

    .venv/bin/python scripts/readme_figures.py            # writes docs/figures/*.png
    .venv/bin/python scripts/readme_figures.py --runs /work/main/runs --out /tmp/figs
"""

from __future__ import annotations

import argparse
import csv
import math
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "apps"))

from lmlab.analysis import load_runs  # noqa: E402
from lmlab.analysis.plot import plot_curves, plot_final, select_runs  # noqa: E402
from lmlab.analysis.report import plot_capacity  # noqa: E402


def capacity(out: Path) -> None:
    rows = []
    for name in ("capacity.csv", "capacity_large.csv", "quickstart.csv"):
        for r in csv.DictReader(open(ROOT / "apps/memory/results" / name)):
            if not r["params"] or (name == "quickstart.csv" and r["mode"] != "tool"):
                continue  # an unfinished run; the quickstart's in-weight runs are under-trained (2,750 steps)
            rows.append({"params": float(r["params"]), "facts": float(r["facts"]), "mode": r["mode"],
                         "bits_per_fact": float(r["bits_per_fact"]), "recall": float(r["recall_train_best"])})
    drawn = plot_capacity(rows, out / "capacity.png",
                          title="Knowledge capacity: in-weight grids (capacity*.yaml), the quickstart's in-tool runs")
    print("capacity:", drawn["points"], drawn["contours"], drawn["notes"])


# (label, [(results CSV, exposures per fact the runs were given)], matplotlib style) per recipe
RECIPES = [
    ("AdamW, WSD 30% (1,200 exposures per fact; 600 at 5,120 facts)",
     [("capacity.csv", 1200), ("capacity_large.csv", 600)],
     {"color": "tab:blue", "marker": "o", "markersize": 10, "markerfacecolor": "none", "linewidth": 3, "alpha": 0.5}),
    ("Muon, WSD 60% (300 exposures per fact; in steps of 32 at 10,240 facts)",
     [("capacity_muon_grid.csv", 300), ("capacity_large_muon.csv", 300), ("capacity_xl_muon.csv", 300)],
     {"color": "tab:red", "marker": "s", "markersize": 4}),
    # the convergence check: twice the budget for the sizes just below the 300-exposure boundaries (not a full grid,
    # so the points are not joined)
    ("Muon, 600 exposures per fact (the sizes below those boundaries)",
     [("capacity_muon_grid.csv", 600), ("capacity_large_muon_check.csv", 600)],
     {"color": "tab:green", "marker": "D", "markersize": 6, "linestyle": "none"}),
]


def recipe_boundaries(files: list[tuple[str, float]], threshold: float = 0.95) -> tuple[dict, dict]:
    """For one recipe's committed CSVs: {facts: smallest params reaching threshold} (the memory report's rule,
    ``min_params_for``, at each file's budget) and, where no size tried reaches it, {facts: largest params tried}
    (a lower bound)."""
    from memory.analyze import min_params_for

    reached: dict[float, float] = {}
    tried: dict[float, float] = {}
    for name, budget in files:
        path = ROOT / "apps/memory/results" / name
        if not path.is_file():
            continue
        rows = [{"mode": r["mode"], "facts": float(r["facts"]), "alpha": float(r["alpha"] or 0), "params":
                 float(r["params"]), "recall_train_best": float(r["recall_train_best"]), "budget_exposures":
                 float(r["budget_exposures"]), "bits_per_fact": r["bits_per_fact"]}
                for r in csv.DictReader(open(path)) if r["params"] and r["recall_train_best"]]
        for m in min_params_for(rows, threshold, budget=budget):
            reached[m["facts"]] = min(reached.get(m["facts"], m["params"]), m["params"])
        for r in rows:
            if float(f"{r['budget_exposures']:.2g}") == float(f"{budget:.2g}"):
                tried[r["facts"]] = max(tried.get(r["facts"], 0.0), r["params"])
    return reached, {f: p for f, p in tried.items() if f not in reached}


def min_params_vs_facts(out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lmlab.analysis.report import log_ticks, save_figure

    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs_all = []
    for label, files, style in RECIPES:
        reached, lower = recipe_boundaries(files)
        xs = sorted(reached)
        xs_all += xs + list(lower)
        ax.plot(xs, [reached[x] for x in xs], label=label, **style)
        if lower:
            ax.plot(list(lower), list(lower.values()), linestyle="none", marker="^", markersize=8,
                    markerfacecolor="none", color=style["color"], label="  no size tried reaches 95%: a lower bound")
    lo, hi = min(xs_all) / 1.5, max(xs_all) * 1.5
    grid = [lo, hi]
    # the paper's fitted line (~27k parameters at 1k facts, ~569k at 65k) and the target of 10 per fact
    slope = math.log(569e3 / 27e3) / math.log(65e3 / 1e3)
    ax.plot(grid, [27e3 * (x / 1e3) ** slope for x in grid], "k--", linewidth=1,
            label=f"the paper's fit (27k at 1k facts, 569k at 65k; facts^{slope:.2f})")
    ax.plot(grid, [10 * x for x in grid], "k:", linewidth=1, label="10 parameters per fact (the target)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    log_ticks(ax.xaxis)
    log_ticks(ax.yaxis)
    ax.set_xlabel("facts (5 per person)")
    ax.set_ylabel("smallest model reaching 95% train recall (params)")
    ax.set_title("In-weight capacity: plain Llama, 2 layers, byte tokens")
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    save_figure(fig, out / "min_params_vs_facts.png")
    plt.close(fig)
    print("min_params_vs_facts.png")


def observe_figures(runs_dir: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lmlab.monitor.probes import read_probes

    large = runs_dir / "memory/capacity_large"
    if large.is_dir():
        from memory.analyze import make_report

        with tempfile.TemporaryDirectory() as tmp:
            make_report(large, tmp, runs=sorted(p for p in large.iterdir() if (p / "config.yaml").is_file()))
            shutil.copy(Path(tmp) / "bits_vs_exposures.png", out / "bits_vs_exposures.png")
        print("bits_vs_exposures.png")
    cap = runs_dir / "memory/capacity"
    if cap.is_dir():
        plot_curves(select_runs(load_runs(cap), ["tags.people=256"]), "recall/train/correct",
                    out / "recall_vs_step.png", by=["model.dim"],
                    title="In-weight, 1,280 facts: train recall by width (flat lr, then the WSD decay)")
        print("recall_vs_step.png")
    obs = runs_dir / "memory/observe"
    runs = [r for r in load_runs(obs) if r.summary.get("status", "").startswith(("completed", "stopped"))] \
        if obs.is_dir() else []
    if not runs:
        print(f"skipped the observe figures: no finished runs under {obs}")
        return
    for metric, name in (("recall/train/correct", "train"), ("recall/novel/correct", "novel")):
        plot_final(runs, "tags.people", metric, out / f"final_recall_{name}_vs_people.png", by=["tags.mode"],
                   logx=True, title=f"Final {name} recall vs people (seeds: mean, min-max bars)")
        print(f"final_recall_{name}_vs_people.png")
    picks = [next((r for r in runs if r.get("tags.mode") == m and r.get("tags.people") == 256), None)
             for m in ("tool", "weight")]
    picks = [r for r in picks if r is not None and (r.path / "probes.jsonl").is_file()]
    if picks:
        fig, axes = plt.subplots(len(picks), 2, figsize=(11, 3.4 * len(picks)), squeeze=False, sharex=True)
        for row, run in zip(axes, picks):
            probes = read_probes(run.path)
            for ax, layer in zip(row, (0, 1)):
                prefix = f"attn_entropy/layers.{layer}.attention/h"
                heads = sorted({k for p in probes for k in p if k.startswith(prefix)})
                for h in heads:
                    ax.plot([p["step"] for p in probes], [p.get(h) for p in probes], label=h.rsplit("/", 1)[1])
                ax.set_title(f"{run.get('tags.mode')}, {run.get('tags.people')} people: layer {layer}")
                ax.set_ylabel("attention entropy (nats)")
                ax.grid(alpha=0.3)
                ax.legend(fontsize=7, ncol=2)
        for ax in axes[-1]:
            ax.set_xlabel("step")
        fig.suptitle("Per-head attention entropy over training (probes, every 100 steps)")
        fig.tight_layout()
        fig.savefig(out / "attention_entropy.png", dpi=100)
        plt.close(fig)
        print("attention_entropy.png")
    parts = ("data", "forward", "backward", "optim")
    fig, ax = plt.subplots(figsize=(9, 3.8))
    names, bottoms = [], None
    rows = []
    for run in runs:
        last = [m for m in run.metrics if "time/step_ms" in m and "time/forward_ms" in m]
        if not last:
            continue
        m = last[-1]
        names.append(f"{run.get('tags.mode')} {run.get('tags.people')} s{run.get('seed')}")
        vals = [m.get(f"time/{p}_ms", 0.0) for p in parts]
        rows.append(vals + [max(m["time/step_ms"] - sum(vals), 0.0)])
    if rows:
        bottoms = [0.0] * len(rows)
        for i, label in enumerate(parts + ("other",)):
            ax.bar(names, [r[i] for r in rows], bottom=bottoms, label=label)
            bottoms = [b + r[i] for b, r in zip(bottoms, rows)]
        ax.set_ylabel("ms per step (last log window)")
        ax.set_title("Where a training step's time goes (profiler timers; one thread each, shared machine)")
        ax.legend(fontsize=8)
        plt.setp(ax.get_xticklabels(), rotation=20, ha="right", fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "step_time.png", dpi=100)
        print("step_time.png")
    plt.close(fig)


#: (label, CSV files, row filter, style) of the SmolLM2 recipes drawn in smollm_recipes.png
SMOLLM_RECIPES = (
    ("plain, lr 1e-4", ("smollm.csv",), lambda r: True, "-"),
    ("replay, lr 1e-4", ("smollm_replay.csv",), lambda r: True, "--"),
    ("replay, lr 3e-5", ("smollm_lowlr.csv",), lambda r: "lr=3e-05" in r["name"] or "lr3e-05" in r["name"], "-."),
    ("replay + distillation (in-tool lr 3e-5, in-weight 1e-4)", ("smollm_distill.csv", "smollm_distill_n.csv"),
     lambda r: ("3e-05" in r["name"]) == (r["mode"] == "tool"), ":"),
)


def smollm_recipes(out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = ROOT / "apps/memory/results"
    fig, axes = plt.subplots(1, 2, figsize=(13, 3.8))
    for label, files, keep, style in SMOLLM_RECIPES:
        rows = [r for f in files if (results / f).is_file() for r in csv.DictReader(open(results / f)) if keep(r)]
        for mode, marker, color in (("weight", "o", "C0"), ("tool", "s", "C1")):
            pts = sorted((int(r["facts"]), float(r["recall/train/correct"]), float(r["kl"]))
                         for r in rows if r["mode"] == mode)
            if not pts:
                continue
            facts, recall, kl = zip(*pts)
            axes[0].plot(facts, recall, marker + style, color=color, label=f"in-{mode}, {label}")
            axes[1].plot(facts, kl, marker + style, color=color)
    axes[1].axhline(0.03, color="gray", lw=0.8)
    axes[1].text(52, 0.033, "paper, in-tool: KL <= 0.03", fontsize=7, color="gray")
    axes[1].set_yscale("log")
    axes[1].set_yticks([0.02, 0.05, 0.1, 0.2, 0.5], ["0.02", "0.05", "0.1", "0.2", "0.5"])
    for ax, title in zip(axes, ("recall of the training facts (SQL tool live)", "KL to the base (nats/token)")):
        ax.set_xscale("log")
        ax.set_xticks([50, 100, 200], ["50", "100", "200"])
        ax.minorticks_off()
        ax.tick_params(which="minor", left=False)
        ax.set_xlabel("facts")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    fig.legend(fontsize=7, loc="center right")
    fig.suptitle("SmolLM2-135M-Instruct finetunes, one seed: what each recipe costs the base", fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.7, 1))
    fig.savefig(out / "smollm_recipes.png", dpi=110)
    plt.close(fig)
    print("smollm_recipes.png")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", default=str(ROOT / "runs"), help="runs folder (default: ./runs)")
    ap.add_argument("--out", default=str(ROOT / "docs/figures"), help="output folder (default: docs/figures)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    capacity(out)
    min_params_vs_facts(out)
    smollm_recipes(out)
    observe_figures(Path(args.runs), out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
