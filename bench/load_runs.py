"""Loading many run folders: lmlab's ``load_runs`` + ``runs_table`` vs the loops a user would write instead.

Generates N synthetic run folders in a temporary directory, each like a real one: a resolved ``config.yaml``
(lmlab's full default config, ~150 lines, with the grid's keys varied), a ``metrics.jsonl`` of training rows
every 100 steps plus a recall evaluation row every 10 of them (~200 rows by default), and a ``summary.json``.
Then times, in rotating order over several rounds (medians reported, min-max in brackets):

- ``lmlab``: ``load_runs(root)`` then ``runs_table(runs)`` (libyaml's CSafeLoader, one ``json.loads`` per
  metrics file, one pass per run for the final / best columns);
- ``naive_loop``: the plain loop: ``yaml.safe_load`` (pure Python), ``json.loads`` per line, the same final
  and best columns computed in Python, one DataFrame at the end;
- ``pandas_per_run``: the pandas reflex: ``yaml.safe_load``, ``pd.read_json(lines=True)`` per metrics file,
  ``pd.json_normalize`` of the config, ``ffill().iloc[-1]`` / ``min()`` / ``max()`` per run.

All three build the same table (checked: same runs, same final loss and best recall per run). The files are
freshly written, so every variant reads from the page cache: this measures parsing, not the disk. Also reported:
lmlab's time split into walking, config YAML, metrics JSON and the table, and ``curves_table`` (long form).
The last stdout line is ONE JSON object.

Usage::

    .venv/bin/python bench/load_runs.py                      # 1,000 runs x 200 rows, 3 rounds (~1-2 min)
    .venv/bin/python bench/load_runs.py --runs 200 --rounds 1 # quick
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from lmlab.analysis import load_runs  # noqa: E402
from lmlab.analysis.runs import _load_yaml, flatten  # noqa: E402
from lmlab.analysis.table import best_mode, curves_table, runs_table  # noqa: E402
from lmlab.config import Config, config_to_dict  # noqa: E402
from lmlab.monitor.metrics import read_metrics  # noqa: E402

RECALL_KEYS = ("correct", "tool_call_rate", "valid_sql_rate", "n", "miss/no_tool_call", "miss/invalid_sql",
               "miss/query_missed", "miss/value_miscopied", "miss/no_template", "miss/wrong_value")


def make_runs(root: Path, n: int, rows: int, seed: int = 0) -> None:
    """``n`` run folders under ``root/grid/point=...``: config.yaml, metrics.jsonl (~``rows`` rows), summary.json."""
    rng = random.Random(seed)
    base = config_to_dict(Config())
    train_rows = max(1, round(rows * 10 / 11))
    for i in range(n):
        dim, people, mode = (16, 24, 32, 48, 64)[i % 5], (64, 128, 256, 512)[(i // 5) % 4], ("weight", "tool")[i % 2]
        name = f"grid/point=people{people}+dim{dim}+mode{mode}+seed{i}"
        cfg = json.loads(json.dumps(base))
        cfg["name"], cfg["seed"] = name, i
        cfg["model"].update(dim=dim, n_layers=2, n_heads=2)
        cfg["train"]["steps"] = 100 * train_rows
        cfg["tags"] = {"mode": mode, "people": people, "data_dir": f"data/people{people}", "paraphrases": 4}
        d = root / name
        d.mkdir(parents=True)
        (d / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        lines, loss, recall = [], 3.0 + rng.random(), 0.0
        for k in range(1, train_rows + 1):
            step = 100 * k
            loss *= 0.97 + 0.02 * rng.random()
            lines.append({"step": step, "loss": loss, "lr": 3e-3, "grad_norm": rng.random() * 3,
                          "tokens_per_s": 1.1e5 + 1e4 * rng.random(), "loss_tokens_per_s": 5.7e4, "tokens": 5868 * step,
                          "time": 0.05 * step, "peak_mem_mb": 405.2})
            if k % 10 == 0:
                recall = min(1.0, recall + 0.1 * rng.random())
                lines.append({"step": step, **{f"recall/train/{key}": (320 if key == "n" else recall if key == "correct"
                                                                       else rng.random() * 0.1)
                                               for key in RECALL_KEYS}})
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
        (d / "summary.json").write_text(json.dumps({"status": "completed", "step": 100 * train_rows,
                                                    "num_params": 1000 * dim, "recall/train/correct": recall,
                                                    "train_time_s": 0.05 * 100 * train_rows}, indent=1))


def _finals_bests(metrics: list[dict]) -> dict:
    out: dict = {}
    for row in metrics:
        for k, v in row.items():
            if k == "step" or not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                continue
            out[f"final.{k}"] = float(v)
            mode = best_mode(k)
            if mode:
                b = out.get(f"best.{k}")
                out[f"best.{k}"] = v if b is None else (min(b, v) if mode == "min" else max(b, v))
    return out


def naive_loop(root: Path):
    """The plain loop a user writes: pure-Python YAML, json.loads per line, a DataFrame at the end."""
    import pandas as pd

    rows = []
    for cfg_path in sorted(root.glob("**/config.yaml")):
        d = cfg_path.parent
        if "checkpoints" in d.parts:
            continue
        cfg = yaml.safe_load(cfg_path.read_text())
        metrics = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines() if line.strip()]
        metrics.sort(key=lambda r: r["step"])
        summary = json.loads((d / "summary.json").read_text())
        rows.append({"name": d.relative_to(root).as_posix(), **flatten(cfg),
                     **{f"summary.{k}": v for k, v in summary.items()}, **_finals_bests(metrics)})
    return pd.DataFrame(rows)


def pandas_per_run(root: Path):
    """The pandas reflex: read_json(lines=True) per metrics file, json_normalize per config."""
    import pandas as pd

    rows = []
    for cfg_path in sorted(root.glob("**/config.yaml")):
        d = cfg_path.parent
        cfg = pd.json_normalize(yaml.safe_load(cfg_path.read_text())).iloc[0].to_dict()
        m = pd.read_json(d / "metrics.jsonl", lines=True).sort_values("step", kind="stable")
        summary = json.loads((d / "summary.json").read_text())
        row = {"name": d.relative_to(root).as_posix(), **cfg, **{f"summary.{k}": v for k, v in summary.items()}}
        row.update({f"final.{k}": v for k, v in m.ffill().iloc[-1].items() if k != "step"})
        for k in m.columns:
            mode = best_mode(k)
            if mode:
                row[f"best.{k}"] = m[k].min() if mode == "min" else m[k].max()
        rows.append(row)
    return pd.DataFrame(rows)


def lmlab_table(root: Path):
    return runs_table(load_runs(root))


def lmlab_split(root: Path) -> dict:
    """Where lmlab's time goes: walking + reading, YAML, metrics JSON, and the table, each timed alone."""
    from lmlab.analysis.runs import _run_dirs

    t0 = time.perf_counter()
    dirs = list(_run_dirs(root))
    t1 = time.perf_counter()
    for d in dirs:
        _load_yaml((d / "config.yaml").read_text(encoding="utf-8"))
    t2 = time.perf_counter()
    for d in dirs:
        read_metrics(d / "metrics.jsonl")
    t3 = time.perf_counter()
    runs = load_runs(root)
    t4 = time.perf_counter()
    runs_table(runs)
    t5 = time.perf_counter()
    curves = curves_table(runs)
    t6 = time.perf_counter()
    return {"walk_s": t1 - t0, "config_yaml_s": t2 - t1, "metrics_json_s": t3 - t2, "load_runs_s": t4 - t3,
            "runs_table_s": t5 - t4, "curves_table_s": t6 - t5, "curves_rows": len(curves)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=1000, help="run folders to generate (default 1000)")
    p.add_argument("--rows", type=int, default=200, help="metrics rows per run (default 200)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds of each variant (default 3)")
    p.add_argument("--dir", default=None, help="where to generate (default: a temporary folder, removed after)")
    args = p.parse_args(argv)
    import pandas as pd  # imported once, outside the timers

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp) / "runs"
        t = time.perf_counter()
        make_runs(root, args.runs, args.rows)
        files_mb = sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) / 2**20
        print(f"generated {args.runs} runs ({files_mb:.1f} MiB) in {time.perf_counter() - t:.1f} s", flush=True)
        print(f"yaml: CSafeLoader {'available' if hasattr(yaml, 'CSafeLoader') else 'MISSING'}; "
              f"load average {os.getloadavg()[0]:.2f}", flush=True)
        variants = {"lmlab": lmlab_table, "naive_loop": naive_loop, "pandas_per_run": pandas_per_run}
        times: dict[str, list[float]] = {k: [] for k in variants}
        tables: dict[str, pd.DataFrame] = {}
        names = list(variants)
        for rnd in range(args.rounds):
            order = names[rnd % len(names):] + names[:rnd % len(names)]  # rotate who goes first
            for k in order:
                t = time.perf_counter()
                tables[k] = variants[k](root)
                times[k].append(time.perf_counter() - t)
                print(f"round {rnd}: {k:15s} {times[k][-1]:7.2f} s", flush=True)
        split = lmlab_split(root)
        ref = tables["lmlab"].set_index("name")
        agree = {}
        for k in ("naive_loop", "pandas_per_run"):
            other = tables[k].set_index("name")
            same_runs = sorted(other.index) == sorted(ref.index)
            cols = ["final.loss", "best.recall/train/correct", "model.dim", "summary.num_params"]
            agree[k] = bool(same_runs and all(
                (ref.loc[other.index, c].astype(float) - other[c].astype(float)).abs().max() < 1e-9 for c in cols))
        med = {k: statistics.median(v) for k, v in times.items()}
        result = {
            "bench": "load_runs", "runs": args.runs, "rows_per_run": args.rows, "rounds": args.rounds,
            "files_mib": round(files_mb, 1), "columns": int(ref.shape[1] + 1),
            "seconds": {k: round(v, 3) for k, v in med.items()},
            "seconds_range": {k: [round(min(v), 3), round(max(v), 3)] for k, v in times.items()},
            "runs_per_s": {k: round(args.runs / v, 1) for k, v in med.items()},
            "speedup_vs_naive_loop": round(med["naive_loop"] / med["lmlab"], 2),
            "speedup_vs_pandas_per_run": round(med["pandas_per_run"] / med["lmlab"], 2),
            "lmlab_split_s": {k: (round(v, 3) if isinstance(v, float) else v) for k, v in split.items()},
            "tables_agree": agree, "load_average": round(os.getloadavg()[0], 2),
        }
        for k in names:
            print(f"{k:15s} {med[k]:7.2f} s  ({args.runs / med[k]:,.0f} runs/s)")
        print(f"lmlab split: {', '.join(f'{k} {v:.2f}' for k, v in split.items() if k.endswith('_s'))}")
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
