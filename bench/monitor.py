"""Overhead of the profiler's timers and of probes on a training step, at the Shakespeare shape, in one process.

One Trainer (apps/shakespeare/quick.yaml's model and batch: dim 192, 6 layers, 6 heads, 16 x 128 byte tokens, on
synthetic text so that nothing needs downloading) runs blocks of optimizer steps in rotating order under:
- ``plain``: timers off, no probes (what a run pays with ``profile.timers=false``);
- ``timers``: the default, every step timed (data wait, forward, backward, optimizer);
- ``probes``: timers on and every step recorded by probes on every attention and feed-forward module plus every
  parameter (``probes.every=1``: the cost of one recorded step);
- ``trace``: the step under an active ``torch.profiler`` (what the trace window costs while it records).
Steps keep training the same model, so every variant sees the same shapes. A ratio is the median over rounds of
(variant block time / plain block time in the same round). The timers' own cost is also measured directly (a
million enter/exit pairs, timed alone), which on a noisy machine bounds the overhead far more tightly than the A/B
difference: ``timer_overhead_direct`` = the 6 phases a step opens x their cost / the plain step time.
Probes at ``every=K`` cost (recorded - plain) / K per step on average: reported for K = 100.

Usage::

    .venv/bin/python bench/monitor.py                  # ~2-4 minutes on 2 cores
    .venv/bin/python bench/monitor.py --rounds 3 --block 2   # smoke test
    .venv/bin/python bench/monitor.py | tail -1 | python -m json.tool

The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from lmlab.config import load_config
from lmlab.monitor.profiler import StepTimer
from lmlab.train import Trainer

ROOT = Path(__file__).resolve().parents[1]


def build_trainer(tmp: Path, threads: int) -> Trainer:
    corpus = tmp / "corpus.txt"
    words = "thou art the sun and moon of all my days , sweet love , good night".split()
    g = torch.Generator().manual_seed(0)
    corpus.write_text(" ".join(words[i] for i in torch.randint(len(words), (400_000,), generator=g).tolist()))
    cfg = load_config(ROOT / "apps/shakespeare/quick.yaml", [
        f"runs_dir={tmp}", f"data.train_files=[{corpus}]", "data.prefetch=none", "logging.progress=false",
        f"train.threads={threads}", "profile.measure_peak=false"])
    trainer = Trainer(cfg)
    trainer.train_loader.__enter__()
    return trainer


def timer_cost_ns(n: int = 1_000_000) -> float:
    """Seconds per ``with timer.phase(...)`` enter/exit pair, minus the loop's own cost, in ns."""
    timer = StepTimer("cpu")
    t0 = time.perf_counter()
    for _ in range(n):
        with timer.phase("forward"):
            pass
    timed = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(n):
        pass
    empty = time.perf_counter() - t0
    return 1e9 * (timed - empty) / n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--block", type=int, default=4, help="steps per variant per round")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from lmlab.config import ProbesConfig
    from lmlab.monitor.probes import build_probes

    with tempfile.TemporaryDirectory() as tmp:
        tr = build_trainer(Path(tmp), args.threads)
        probe_cfg = ProbesConfig(modules=["layers.*.attention", "layers.*.feed_forward"], params=["*"], every=1)
        probes = build_probes(probe_cfg, tr.model, Path(tmp) / "probes_run")

        def run(variant: str) -> float:
            tr.timer.enabled = variant != "plain"
            tr.probes = probes if variant == "probes" else None
            t0 = time.perf_counter()
            if variant == "trace":
                from torch.profiler import ProfilerActivity, profile
                with profile(activities=[ProfilerActivity.CPU], record_shapes=True):
                    for _ in range(args.block):
                        tr.train_step()
            else:
                for _ in range(args.block):
                    tr.train_step()
            dt = (time.perf_counter() - t0) / args.block
            tr.timer.window(args.block)  # discard the figures
            return dt

        variants = ["plain", "timers", "probes", "trace"]
        for _ in range(args.warmup):
            tr.train_step()
        times: dict[str, list[float]] = {v: [] for v in variants}
        ratios: dict[str, list[float]] = {v: [] for v in variants if v != "plain"}
        for r in range(args.rounds):
            order = variants[r % len(variants):] + variants[: r % len(variants)]
            got = {v: run(v) for v in order}
            for v in variants:
                times[v].append(got[v])
            for v in ratios:
                ratios[v].append(got[v] / got["plain"])
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{v} {1000 * got[v]:.1f} ms" for v in variants),
                  file=sys.stderr, flush=True)
        probes.close()
        rows = sum(1 for _ in open(Path(tmp) / "probes_run" / "probes.jsonl"))
    cost_ns = timer_cost_ns()
    plain_ms = 1000 * statistics.median(times["plain"])
    ratio = {v: statistics.median(x) for v, x in ratios.items()}
    out = {
        "bench": "monitor", "shape": "dim 192, 6 layers, 6 heads, batch 16 x 128 (apps/shakespeare/quick.yaml)",
        "threads": args.threads, "rounds": args.rounds, "block": args.block,
        "step_ms": {v: round(1000 * statistics.median(x), 2) for v, x in times.items()},
        "ratio_vs_plain": {v: round(x, 4) for v, x in ratio.items()},
        "ratio_range": {v: [round(min(x), 3), round(max(x), 3)] for v, x in ratios.items()},
        "timer_phase_ns": round(cost_ns, 1),
        "timer_overhead_direct": round(6 * cost_ns / 1e6 / plain_ms, 6),
        "probes_overhead_every_100": round((ratio["probes"] - 1) / 100, 5),
        "probe_rows_written": rows,
        "load_avg": os.getloadavg()[0],
        "target_timer_overhead": 0.01,
    }
    out["timer_target_met"] = out["timer_overhead_direct"] < 0.01
    print(f"plain step {plain_ms:.1f} ms; timers x{ratio['timers']:.3f} (A/B, median over rounds), "
          f"{cost_ns:.0f} ns per phase -> {100 * out['timer_overhead_direct']:.4f}% of a step; a recorded probe "
          f"step x{ratio['probes']:.2f} (every 100: +{100 * out['probes_overhead_every_100']:.3f}%); "
          f"torch.profiler active x{ratio['trace']:.2f}")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
