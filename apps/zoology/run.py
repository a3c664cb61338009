"""Zoology's associative-recall benchmark across sequence mixers: accuracy on MQAR against the memory per sequence.

Zoology (Arora et al. 2023, "Zoology: Measuring and Improving Recall in Efficient Language Models") shows that how
well a sequence mixer solves multi-query associative recall (MQAR: key-value pairs, then keys asked again) tracks
the memory it keeps per sequence: attention keeps every token (a KV cache growing with the sequence), a recurrent
mixer a fixed state. This app trains each point of a grid (mixer x width) on the ``mqar`` data kind
(:mod:`lmlab.data.mqar`, settings under ``data.mqar``) with the ordinary trainer (``lmlab.launch.run_grid``:
finished runs are skipped, unfinished ones resume), evaluates each finished run's final checkpoint on the fixed
validation set (argmax accuracy at the queries, overall, per pair count and per query-to-key distance, written to
``RUN/mqar_eval.json``; redone only when the checkpoint or the task changed), then writes beside the runs:

* ``report/results.csv``: one row per run (mixer, dim, params, state bytes, accuracy and its slices, losses, time);
* ``report/acc_vs_state.png``: accuracy against the bytes of memory per sequence, one line per mixer (the best run
  of each mixer and size over the other grid axes, e.g. a learning-rate sweep, as Zoology reports);
* ``report/acc_vs_dim.png``: the same against the model width.

Memory per sequence, float32: attention layers hold their KV cache at the sequence length (2 x seq_len x
n_kv_heads x head_dim x 4 bytes per layer); recurrent layers their state (``num_state_elements()`` x 4 bytes:
the recurrence and the convolution window). Hybrid stacks (``model.layer_mixers``) add their layers' shares.

Usage::

    .venv/bin/python apps/zoology/run.py                                        # grid.yaml: 5 mixers x 3 widths
    .venv/bin/python apps/zoology/run.py --grid apps/zoology/quick.yaml --jobs 2  # the small check (3 x 2 runs)
    .venv/bin/python apps/zoology/run.py --jobs 1 train.steps=200               # overrides apply to every run
    .venv/bin/python apps/zoology/run.py --report-only                          # evaluate and redraw, train nothing

A variant of a grid (another learning rate, more steps) goes to another ``runs_dir`` (e.g. ``runs_dir=runs/lr1e-2``):
grid points are named from ``name``, so overriding ``name`` would give every point the same folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

from lmlab.config import Config, ConfigError, config_to_dict, exit_on_config_error
from lmlab.launch import exit_on_grid_interrupt

HERE = Path(__file__).resolve().parent
log = logging.getLogger("zoology")

EVAL_FILE = "mqar_eval.json"


def mixer_label(cfg: Any) -> str:
    """The line a run belongs to: its mixer, or its per-layer mixers for a hybrid stack."""
    mixers = cfg.model.mixers()
    return mixers[0] if len(set(mixers)) == 1 else "+".join(mixers)


def state_bytes(cfg: Config, vocab_size: int = 264) -> int:
    """Bytes of memory one sequence keeps at ``data.seq_len`` (float32): KV caches of the attention layers plus the
    recurrent states of the others (the model is built on the meta device: nothing is allocated)."""
    from lmlab.models import build_model
    from lmlab.models.recurrent import state_bytes as mixer_state_bytes

    m = cfg.model
    model = build_model(m, vocab_size=m.vocab_size or vocab_size, device="meta")
    head_dim = m.dim // m.n_heads
    total = 0
    for layer in model.layers:
        if layer.kind == "attention":
            total += 2 * cfg.data.seq_len * (m.n_kv_heads or m.n_heads) * head_dim * 4
        else:
            total += mixer_state_bytes(layer.mixer)
    return total


def eval_key(cfg: Config, checkpoint: str) -> dict[str, Any]:
    """What an evaluation depends on: the checkpoint and the task (a stored result with another key is redone)."""
    return {"checkpoint": str(checkpoint), "seq_len": cfg.data.seq_len, "mqar": config_to_dict(cfg.data.mqar)}


def evaluate_run(run_dir: Path, batch_size: int = 64) -> dict[str, Any]:
    """Accuracy of a finished run's final checkpoint on its MQAR validation set; cached in RUN/mqar_eval.json."""
    from lmlab.data.mqar import evaluate_mqar
    from lmlab.train.checkpoint import load_run

    cfg, model, _, path = load_run(run_dir, with_path=True)
    key = eval_key(cfg, path)
    out = run_dir / EVAL_FILE
    if out.is_file():
        try:
            stored = json.loads(out.read_text())
            if stored.get("key") == key:
                return stored
        except ValueError:
            pass
    t0 = time.time()
    metrics = evaluate_mqar(model, cfg.data, batch_size=batch_size)
    result = {"key": key, "metrics": metrics, "eval_s": round(time.time() - t0, 2)}
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(out)
    return result


def result_row(cfg: Config, evaluation: dict[str, Any]) -> dict[str, Any]:
    from lmlab.launch.local import read_summary

    summary = read_summary(cfg.run_dir)
    row = {"name": cfg.name, "mixer": mixer_label(cfg), "dim": cfg.model.dim, "n_layers": cfg.model.n_layers,
           "lr": cfg.optim.lr, "seed": cfg.seed, "seq_len": cfg.data.seq_len,
           "num_kv_pairs": "+".join(str(n) for n in cfg.data.mqar.num_kv_pairs),
           "params": summary.get("num_params"), "state_bytes": state_bytes(cfg), "steps": summary.get("step"),
           "train_time_s": round(summary.get("train_time_s") or 0.0, 1), "val_loss": summary.get("val_loss")}
    row.update(evaluation["metrics"])
    return row


def best_points(rows: list[dict[str, Any]], x: str) -> dict[str, tuple[list[float], list[float]]]:
    """{mixer: (xs, accs)}: per mixer and x, the best accuracy over the runs sharing them, in order of x."""
    best: dict[str, dict[float, float]] = {}
    for r in rows:
        acc = r.get("mqar/acc")
        if acc is None or (isinstance(acc, float) and math.isnan(acc)):
            continue
        pts = best.setdefault(r["mixer"], {})
        pts[r[x]] = max(acc, pts.get(r[x], -1.0))
    return {m: ([float(k) for k in sorted(p)], [p[k] for k in sorted(p)]) for m, p in best.items()}


def format_table(rows: list[dict[str, Any]]) -> str:
    cols = [("mixer", "{}"), ("dim", "{}"), ("params", "{:,}"), ("state_bytes", "{:,}"), ("mqar/acc", "{:.3f}"),
            ("val_loss", "{:.3f}"), ("train_time_s", "{:.0f}")]
    lines = ["  ".join(f"{c:>12}" for c, _ in cols)]
    for r in sorted(rows, key=lambda r: (r["mixer"], r["dim"], r["name"])):
        cells = []
        for c, fmt in cols:
            v = r.get(c)
            cells.append(f"{fmt.format(v) if v is not None else '-':>12}")
        lines.append("  ".join(cells))
    return "\n".join(lines)


def make_report(configs: list[Config], out_dir: Path, threads: int = 1) -> list[dict[str, Any]]:
    """Evaluate every finished run of ``configs``, write results.csv and the plots under ``out_dir``."""
    import torch

    from lmlab.analysis.report import plot_lines
    from lmlab.analysis.runs import write_csv
    from lmlab.launch.local import is_finished

    torch.set_num_threads(threads)
    rows = []
    for cfg in configs:
        if not is_finished(cfg.run_dir, cfg.train.steps):
            log.warning("%s: not finished, left out of the report", cfg.name)
            continue
        evaluation = evaluate_run(Path(cfg.run_dir))
        rows.append(result_row(cfg, evaluation))
        log.info("%s: mqar/acc %.3f", cfg.name, rows[-1]["mqar/acc"])
    write_csv(rows, out_dir / "results.csv")
    task = configs[0].data
    what = (f"MQAR: {task.seq_len} tokens, {'+'.join(map(str, task.mqar.num_kv_pairs))} pairs, "
            f"{task.mqar.vocab_size} ids")
    plot_lines(best_points(rows, "state_bytes"), out_dir / "acc_vs_state.png", xlabel="memory per sequence (bytes, "
               "float32: KV cache or recurrent state)", ylabel="accuracy at the queries", title=what, logx=True)
    plot_lines(best_points(rows, "dim"), out_dir / "acc_vs_dim.png", xlabel="model dim", ylabel="accuracy at the "
               "queries", title=what, logx=True)
    return rows


@exit_on_config_error
@exit_on_grid_interrupt
def main(argv: list[str] | None = None) -> int:
    from lmlab.launch import grid_app_arguments, parse_grid_app

    t0 = time.time()
    p = grid_app_arguments(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]), str(HERE / "grid.yaml"))
    a, configs = parse_grid_app(p, argv)
    for cfg in configs:
        if cfg.data.kind != "mqar":
            raise ConfigError(f"{cfg.name}: data.kind is {cfg.data.kind!r}; the zoology app trains on data.kind mqar")
    root = configs[0].run_dir.parent
    if len({c.run_dir.parent for c in configs}) != 1:
        raise ConfigError(f"{a.grid}: the runs of the grid must share one parent folder")
    failed = []
    if not a.report_only:
        from lmlab.launch import run_grid

        outcomes = run_grid(configs, jobs=a.jobs, threads=a.threads)
        failed = [o for o in outcomes if o.status == "failed"]
    rows = make_report(configs, root / "report", threads=a.threads or 1)
    print(format_table(rows))
    print(f"\n{len(rows)} of {len(configs)} runs evaluated ({time.time() - t0:.0f} s); results: "
          f"{root / 'report' / 'results.csv'}, plot: {root / 'report' / 'acc_vs_state.png'}")
    if failed:
        print(f"{len(failed)} runs failed: {', '.join(o.name for o in failed)} (see their train.log)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
