"""Tiny-model training: wall time to 95% train recall, today's path vs the fast path, side by side in one process.

The memory app's models are tiny (tens of thousands of parameters) and its grids train hundreds of them, so what
counts is the time to the answer: the training seconds until recall on the training facts reaches ``--target``,
at the same final recall. Two variants train the same point of the memory app, one thread each, in one process:

* ``today``: the preset as it was before this benchmark's levers (every position through the output head and the
  softmax, dialogs batched in shuffled order, the preset's batch size, learning rate and steps);
* ``fast``: the output head only at target positions (``train.sparse_logits``), dialogs of similar length batched
  together (``data.length_grouping``), and the recipe given by ``--fast`` (default: the point's tuned recipe; the
  in-tool point's is compiled, ``train.compile``: traced once more with a dynamic batch width, so one graph serves
  every width).

Compilation counts as training time. By default the cache is warm, as for every run of a grid after its first: a
throwaway copy of the fast variant first trains a few steps from an empty inductor cache (timed apart:
``compile_warmup_s``, what the first run on a fresh machine pays once), and the timed variant then traces its own
model and finds the compiled kernels in that cache. ``--cold-compile`` skips the warm-up, so the timed variant
compiles from scratch. ``first_steps_s`` (the first 10 steps) and ``median_step_ms`` are reported per variant.

They alternate in chunks of ``--chunk`` steps (so that a noisy minute slows both), each evaluating recall every
``--every`` steps (the time of the evaluations is reported apart, never counted as training); a variant stops at
the target or at the end of its steps. Reported per variant: the step and the training seconds at which recall first
reached the target, exposures per fact by then, loss tokens/s and positions/s per core, achieved GFLOP/s (the
model's FLOPs per position, ``6 N + 12 L d T`` at the batch's width, over every position, for both variants) and its
share of the single-thread matmul ceiling of the variant's compute dtype (float32, or bf16 under
``train.dtype=bfloat16``; both are reported), measured each round (a 1024^3 ``torch.mm`` in each).

Points (``--point``): ``tool256`` (the quickstart's in-tool run at 256 people: 2 layers, width 64, smeared keys,
the in-tool file with its absent and practice people) and ``weight`` (an in-weight point of the capacity grid:
plain Llama, ``--weight-people`` people, ``--weight-dim`` wide). Datasets are built under ``--data`` (kept between
runs).

Usage::

    .venv/bin/python bench/train_tiny.py --point tool256            # ~10 minutes on 2 cores
    .venv/bin/python bench/train_tiny.py --point weight --every 250     # 128 people, width 64: ~6 minutes
    .venv/bin/python bench/train_tiny.py --point tool256 --fast optim.lr=1e-2 train.steps=1200

The last line of stdout is one JSON object; target (issue 14): ``speedup`` (today's seconds / fast's) >= 2.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "apps"))

from memory.build_data import build_dataset  # noqa: E402
from train_throughput import matmul_gflops  # noqa: E402  (this folder: the same ceiling as that benchmark's)

from lmlab.config import load_config  # noqa: E402
from lmlab.train.trainer import Trainer  # noqa: E402

TARGET_SPEEDUP = 2.0
# the landed presets' settings (today) and the tuned recipe of each point (fast); both start from the point's base
POINTS = {
    "tool256": {
        "data": {"people": 256, "ood": 0, "absent": 4096, "practice": 8192, "practice_style": "mixed"},
        "base": ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.smear_keys=3", "data.seq_len=512",
                 "model.max_seq_len=512", "optim.warmup_steps=30", "optim.schedule=wsd", "optim.decay_fraction=0.4",
                 "optim.min_lr_ratio=0.0"],
        "mode": "tool",
        "today": ["data.batch_size=16", "optim.lr=5e-3", "train.steps=2750"],
        # measured at 256 people (one seed, 100 questions every 100 steps): lr 1e-2 fails at batch 16 (no copying by
        # step 1,400) but copies at batch 24-32; 800 steps of 32 reach 0.97 (1,100 of 24: 0.99; today's 2,750 of 16:
        # 0.98 at step 2,400). Shorter runs are held back by when copying sets in (recall 0 until then), at step
        # ~450-500 of 32 whatever the schedule: 650 steps of 32 end at 0.81 (decay over the last 25%: 0.82; weight
        # decay 0: 0.67; warmup 100: 0.74; lr 7e-3, 1.2e-2 and 1.5e-2, beta2 0.99, init "small", batch 48 x 450: no
        # copying yet); init "width" copies from step ~450 and ends at 0.88 (700 steps: 0.94), but with seed 1 the
        # same 700-step recipe had not started copying at all (0.01): at these lengths the recipe is fragile.
        # With seed 1, 800 steps of 32 end at 0.87 (copying from step ~620) and 1,100 of 24 never copy; 1,000 steps of
        # 32 reach 0.99 (0.93 at step 900) and today's preset 0.97 at step 1,950. The default is the recipe that
        # reached the target with both seeds (seed 0, this benchmark: 0.95 at step 950, 1.33x; 800 steps: 1.72x)
        # compiled (2026-12-02): steps 1.25-1.3x faster, 95% at the same step (900-950). bf16 autocast with the
        # attention modules in float32 (train.float32_modules): compiled steps 72-80 ms vs 104 ms in float32, recall
        # 0.97 at step 900 (seed 0) and 0.93 / 0.97 at 900 / 1,000 (seed 1), as in float32; everything in bf16
        # (attention kept float32 inside, as train.dtype=bfloat16 does on CPU) was 86 ms but ended at 0.85 (seed 0)
        "fast": ["data.batch_size=32", "optim.lr=1e-2", "train.steps=1000", "train.compile=true",
                 "train.dtype=bfloat16", "train.float32_modules=[layers.*.attention]"],
    },
    "weight": {
        "data": {"people": 256, "ood": 0},
        "base": ["model.n_layers=2", "model.multiple_of=8", "data.seq_len=256", "model.max_seq_len=256",
                 "optim.warmup_steps=100", "optim.schedule=wsd", "optim.min_lr_ratio=0.0"],
        "mode": "weight",
        "today": ["data.batch_size=16", "optim.lr=3e-3", "optim.decay_fraction=0.4", "train.steps=6000"],
        # measured at 128 people, width 64 (one seed, 100 questions every 250 steps): today reaches 0.95 at step
        # 5,750 (144 exposures per fact); the same recipe cut to 4,500 steps reaches it at 4,500 (112); 3,000 steps
        # end at 0.71, batch 32 x 1,500 steps at lr 5e-3 at 0.42, batch 64 x 1,000 at lr 1e-2 at 0.60. A lower
        # learning rate memorises faster here: 3,000 steps of 16 (WSD 40%) end at 0.69 / 0.74 / 0.84 / 0.71 / 0.36
        # with lr 1e-3 / 1.5e-3 / 2e-3 / 3e-3 / 5e-3 (3e-3 with weight decay 0: 0.68, beta2 0.99: 0.61, decay over
        # 70%: 0.72); lr 2e-3 over 3,500 steps reaches 0.97 at step 3,500 (87 exposures per fact)
        # (eager: compiled, steps were ~1.15x faster but the same recipe ended at 0.92, its kernels summing in another
        # order: this recipe reaches the target only in its last steps, so a run's draw decides it)
        # bf16 autocast with the attention modules in float32 (as the in-tool point): 0.90 at the end, no faster
        # (32.5 ms per step: these 16 short rows gain nothing from bf16 matmuls), 2026-12-03
        "fast": ["data.batch_size=16", "optim.lr=2e-3", "optim.decay_fraction=0.4", "train.steps=3500"],
    },
}
FAST_PATH = ["train.sparse_logits=true", "data.length_grouping=16"]
TODAY_PATH = ["train.sparse_logits=false", "data.length_grouping=0"]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cpu_ticks() -> tuple[int, int]:
    """(all cpus' busy ticks, this process's ticks) from /proc: what others took between two reads."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    busy = sum(v) - v[3] - v[4]
    with open("/proc/self/stat") as f:
        s = f.read().rsplit(")", 1)[1].split()
    return busy, int(s[11]) + int(s[12])


class Variant:
    """One configuration trained step by step; times training and recall evaluations apart."""

    def __init__(self, name: str, overrides: list[str], run_dir: Path, a: argparse.Namespace):
        self.name = name
        self.cfg = load_config(None, overrides + [f"name={name}", f"runs_dir={run_dir}", "train.threads=1",
                                                  "logging.progress=false", "train.resume=false"])
        self.trainer = Trainer(self.cfg)
        self.trainer.train_loader.__enter__()
        self.eval_s = 0.0
        self.positions = self.targets = 0
        self.flops = 0.0
        self.curve: list[tuple[int, float, float]] = []  # (step, train seconds so far, recall)
        self.step_s: list[float] = []  # each training step's seconds
        self.hit: tuple[int, float] | None = None
        self.every = a.every
        self.facts = a.facts
        self.fact_share = a.fact_share
        self.target = a.target

    @property
    def done(self) -> bool:
        return self.hit is not None or self.trainer.step >= self.cfg.train.steps

    @property
    def train_s(self) -> float:
        return sum(self.step_s)

    def run(self, steps: int) -> None:
        t = self.trainer
        model = t.model
        for _ in range(steps):
            if self.done:
                return
            t0 = time.perf_counter()
            m = t.train_step()
            self.step_s.append(time.perf_counter() - t0)
            self.positions += m["positions"]
            self.targets += m["targets"]
            width = m["positions"] // self.cfg.data.batch_size
            self.flops += model.flops_per_token(width) * m["positions"]
            if t.step % self.every == 0 or t.step == self.cfg.train.steps:
                t0 = time.perf_counter()
                recall = t.evaluate_recall().get("recall/train/correct", 0.0)
                self.eval_s += time.perf_counter() - t0
                self.curve.append((t.step, round(self.train_s, 2), recall))
                log(f"  {self.name}: step {t.step} recall {recall:.3f} ({self.train_s:.0f} s of training)")
                if recall >= self.target:
                    self.hit = (t.step, self.train_s)

    def summary(self, ceilings: dict[str, float]) -> dict:
        """``ceilings``: the single-thread matmul ceiling (GFLOP/s) per dtype; the share is of the ceiling of the
        dtype the variant's matmuls run in (bf16 under ``train.dtype=bfloat16``, where modules kept in float32 run
        some in float32: both shares are reported)."""
        c = self.cfg
        dtype = "bfloat16" if c.train.dtype == "bfloat16" else "float32"
        gflops = self.flops / max(self.train_s, 1e-9) / 1e9
        out = {"overrides": None, "steps": self.trainer.step, "train_s": round(self.train_s, 1),
               "eval_s": round(self.eval_s, 1), "batch_size": c.data.batch_size, "lr": c.optim.lr,
               "reached": self.hit is not None,
               "step_at_target": self.hit[0] if self.hit else None,
               "train_s_at_target": round(self.hit[1], 1) if self.hit else None,
               "exposures_per_fact_at_target": (round(self.hit[0] * c.data.batch_size * self.fact_share / self.facts,
                                                      1) if self.hit else None),
               "final_recall": self.curve[-1][2] if self.curve else None,
               "loss_tokens_per_s": round(self.targets / max(self.train_s, 1e-9)),
               "positions_per_s": round(self.positions / max(self.train_s, 1e-9)),
               "gflops": round(gflops, 2), "matmul_dtype": dtype,
               "share_of_matmul_ceiling": round(gflops / ceilings[dtype], 3),
               "share_of_matmul_ceiling_by_dtype": {k: round(gflops / v, 3) for k, v in ceilings.items()},
               "first_steps_s": round(sum(self.step_s[:10]), 2),
               "median_step_ms": round(1000 * sorted(self.step_s)[len(self.step_s) // 2], 1) if self.step_s else None,
               "num_params": self.trainer.model.num_params(), "curve": self.curve}
        return out

    def close(self) -> None:
        self.trainer.train_loader.__exit__(None, None, None)


def warm_up(v: Variant, max_steps: int = 12) -> float:
    """Train a throwaway variant until it has seen two batch widths (the second retraces with a dynamic width) and
    a few steps more: the inductor cache then holds what the timed variant compiles. Returns the seconds taken."""
    widths: set[int] = set()
    t0 = time.perf_counter()
    for i in range(max_steps):
        m = v.trainer.train_step()
        widths.add(m["positions"] // v.cfg.data.batch_size)
        if len(widths) >= 2 and i >= 3:
            break
    v.close()
    return round(time.perf_counter() - t0, 1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--point", choices=sorted(POINTS), default="tool256")
    p.add_argument("--weight-people", type=int, default=128, help="people of the in-weight point")
    p.add_argument("--weight-dim", type=int, default=64, help="width of the in-weight point's model")
    p.add_argument("--target", type=float, default=0.95, help="train recall to reach")
    p.add_argument("--every", type=int, default=100, help="steps between recall evaluations")
    p.add_argument("--questions", type=int, default=100, help="questions per recall evaluation")
    p.add_argument("--chunk", type=int, default=50, help="steps per variant before the other takes its turn")
    p.add_argument("--today", nargs="*", default=None, help="overrides of today's variant (default: the preset's)")
    p.add_argument("--fast", nargs="*", default=None, help="overrides of the fast variant (default: the tuned recipe)")
    p.add_argument("--data", default=str(ROOT / "runs" / "bench" / "data"), help="datasets folder (kept)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cold-compile", action="store_true",
                   help="the fast variant compiles from an empty inductor cache (default: a throwaway copy "
                        "fills it first)")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    point = POINTS[a.point]
    data_args = dict(point["data"])
    if a.point == "weight":
        data_args["people"] = a.weight_people
    tag = "_".join(f"{k}{v}" for k, v in sorted(data_args.items()))
    data_dir = Path(a.data) / f"{a.point}_{tag}_seed{a.seed}"
    if not (data_dir / "manifest.json").is_file():
        log(f"building {data_dir}")
        build_dataset(out=str(data_dir), seed=a.seed, **data_args)
    m = json.loads((data_dir / "manifest.json").read_text())
    a.facts = m["counts"]["facts"]
    # dialogs about training facts among the training file's lines (the in-tool file also holds absent and practice
    # questions, which teach no fact): exposures per fact = steps x batch x this share / facts
    a.fact_share = a.facts * m["paraphrases"] / m["counts"]["lines"][f"{point['mode']}_train.jsonl"]
    mode = point["mode"]
    common = point["base"] + [
        "tokenizer.kind=byte", "data.kind=dialog", f"data.train_files=[{data_dir}/{mode}_train.jsonl]",
        "data.val_fraction=0", "data.packing=false", f"seed={a.seed}",
        f"evals.recall.sets=[{data_dir}/eval_train.jsonl]", f"evals.recall.max_questions={a.questions}",
        "evals.recall.save_outputs=false"]
    if mode == "tool":
        common.append(f"evals.recall.db={data_dir}/people.sqlite")
    else:
        heads = max(1, a.weight_dim // 16)
        common += [f"model.dim={a.weight_dim}", f"model.n_heads={heads}"]
    today = TODAY_PATH + (point["today"] if a.today is None else a.today)
    fast = FAST_PATH + (point["fast"] if a.fast is None else a.fast)
    tmp = Path(tempfile.mkdtemp(prefix="train_tiny_"))
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(tmp / "inductor")  # empty: read when the first compilation starts
    busy0, own0 = cpu_ticks()
    load0 = os.getloadavg()[0]
    try:
        warmup_s, compiled = None, load_config(None, common + fast).train.compile
        if compiled and not a.cold_compile:
            warmup_s = warm_up(Variant("warmup", common + fast, tmp, a))
            log(f"  compile warm-up (empty cache): {warmup_s:.1f} s")
        variants = [Variant("today", common + today, tmp, a), Variant("fast", common + fast, tmp, a)]
        ceilings: dict[str, list[float]] = {"float32": [], "bfloat16": []}
        while not all(v.done for v in variants):
            for name in ceilings:  # one thread: the core's ceilings, now
                ceilings[name].append(matmul_gflops(n=1024, dtype=getattr(torch, name)))
            for v in variants:
                v.run(a.chunk)
        out = {"point": a.point, "facts": a.facts, "target_recall": a.target,
               "inductor_cache": ("warm" if warmup_s is not None else "empty") if compiled else None,
               "compile_warmup_s": warmup_s}
        median = {}
        for name, c in ceilings.items():
            median[name] = sorted(c)[len(c) // 2]
            key = "matmul_ceiling_gflops_1thread" + ("" if name == "float32" else f"_{name}")
            out[key] = {"median": round(median[name], 1), "min": round(min(c), 1), "max": round(max(c), 1)}
        for v, ov in zip(variants, (today, fast)):
            s = v.summary(median)
            s["overrides"] = ov
            out[v.name] = s
            v.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    busy1, own1 = cpu_ticks()
    ncpu = os.cpu_count() or 1
    wall_ticks = max(busy1 - busy0, 1)
    out["other_processes_cpu_share"] = round(max(0, (busy1 - busy0) - (own1 - own0)) / wall_ticks, 2)
    out["loadavg_start_end"] = [round(load0, 2), round(os.getloadavg()[0], 2)]
    out["cpus"] = ncpu
    t, f = out["today"], out["fast"]
    if t["reached"] and f["reached"]:
        out["speedup"] = round(t["train_s_at_target"] / f["train_s_at_target"], 2)
        out["meets_target"] = out["speedup"] >= TARGET_SPEEDUP
    else:
        out["speedup"] = None
        out["meets_target"] = False
    for name in ("today", "fast"):
        s = out[name]
        print(f"{name:6s} steps {s['steps']:5d}  target at step {s['step_at_target']} after "
              f"{s['train_s_at_target']} s ({s['exposures_per_fact_at_target']} exposures/fact)  "
              f"loss tok/s {s['loss_tokens_per_s']:,}  positions/s {s['positions_per_s']:,}  "
              f"{s['gflops']} GFLOP/s = {100 * s['share_of_matmul_ceiling']:.0f}% of one core's matmul ceiling "
              f"({s['matmul_dtype']})")
    print(f"speedup (time to {a.target:.0%} train recall): {out['speedup']}")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
