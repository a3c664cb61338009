"""RL rollout speed and where an RL step's time goes (lmlab.train.grpo, apps/rl).

From a GRPO config (its ``train.init_from`` model, its questions, its database, its sampling settings):

* ``engine``: one step's rollouts as GRPOTrainer draws them: every question's ``rl.group_size`` answers submitted
  at once to the generation engine (continuous batching, paged KV cache, the prefix cache sharing each question's
  prompt, tool calls in worker threads);
* ``one_at_a_time``: the same answers (same seeds) generated one request after the other (an engine of
  ``max_batch`` 1, KV cache on, no prefix cache): what a loop over ``generate`` calls gives. Its outputs must
  equal the engine's (checked: ``identical``);
* ``step``: ``--steps`` full GRPO steps (rollouts, rewards, the update) on a copy of the run; the share of the
  step spent generating vs training, from the trainer's own timers.

Rates count sampled tokens (inserted tool answers are not counted). The last line of stdout is one JSON object.

Usage::

    .venv/bin/python bench/rl.py --config apps/rl/configs/r1.yaml              # after python -m apps.rl.train ...
    .venv/bin/python bench/rl.py --config apps/rl/configs/r1.yaml --rounds 3 --steps 5 runs_dir=/tmp/rl
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from lmlab.config import load_config
from lmlab.inference import Engine, Request, SamplingParams
from lmlab.train.grpo import GRPOTrainer, rollout_seed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="a GRPO config (train.objective: grpo)")
    ap.add_argument("--rounds", type=int, default=3, help="timed repetitions of each variant (median reported)")
    ap.add_argument("--steps", type=int, default=5, help="GRPO steps timed for the generate / train split")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("overrides", nargs="*", help="dotted.key=value overrides of the config")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench_rl_"))
    try:
        cfg = load_config(args.config, [*args.overrides, f"train.threads={args.threads}"])
        # a scratch copy of the run so the benchmark never writes into the real one
        cfg = dataclasses.replace(cfg, name="bench", runs_dir=str(work),
                                  train=dataclasses.replace(cfg.train, steps=args.steps, ckpt_every=0, log_every=1),
                                  evals=dataclasses.replace(cfg.evals, recall=dataclasses.replace(
                                      cfg.evals.recall, sets=[], every=0)))
        trainer = GRPOTrainer(cfg)
        rl = cfg.rl
        batch = trainer.train_loader.next_batch()
        seed = rl.seed if rl.seed is not None else cfg.seed
        requests = [Request(dialog=q.dialog, id=(i, g), params=SamplingParams(
            max_new_tokens=rl.max_new_tokens, temperature=rl.temperature, seed=rollout_seed(seed, 1, i, g)))
            for i, q in batch for g in range(rl.group_size)]
        model = trainer.model.eval()
        tools = [trainer.tool] if trainer.tool is not None else []
        batched = Engine.from_config(model, trainer.dialog_tokenizer, cfg.engine, tools=tools)
        single = Engine.from_config(model, trainer.dialog_tokenizer,
                                    dataclasses.replace(cfg.engine, max_batch=1, prefix_cache=False), tools=tools)
        out: dict[str, object] = {"config": args.config, "questions": len(batch), "group_size": rl.group_size,
                                  "answers": len(requests), "threads": args.threads,
                                  "num_params": trainer.model.num_params()}
        results = {}
        for name, run in (("engine", lambda: (batched.clear_cache(), batched.generate(requests))[1]),
                          ("one_at_a_time", lambda: [single.generate([r])[0] for r in requests])):
            times = []
            for _ in range(args.rounds):
                t0 = time.perf_counter()
                res = run()
                times.append(time.perf_counter() - t0)
            results[name] = res
            sampled = sum(sum(r.sampled_mask()) for r in res)
            med = statistics.median(times)
            out[name] = {"s": round(med, 3), "sampled_tokens": sampled, "tokens_per_s": round(sampled / med, 1),
                         "answers_per_s": round(len(requests) / med, 2),
                         "tool_calls": sum(len(r.tool_calls) for r in res)}
            print(name, json.dumps(out[name]), flush=True)
        out["identical"] = [r.tokens for r in results["engine"]] == [r.tokens for r in results["one_at_a_time"]]
        out["speedup"] = round(out["engine"]["tokens_per_s"] / out["one_at_a_time"]["tokens_per_s"], 2)
        model.train()
        trainer.train_loader.load_state_dict({**trainer.train_loader.state_dict(), "epoch": 0, "index": 0})
        trainer.fit()
        rows = [json.loads(x) for x in (work / "bench" / "metrics.jsonl").read_text().splitlines()]
        rows = [r for r in rows if "rl/rollout_s" in r]
        gen = sum(r["rl/rollout_s"] for r in rows)
        train = sum(r["rl/train_s"] for r in rows)
        out["step"] = {"steps": len(rows), "step_s": round((gen + train) / max(len(rows), 1), 3),
                       "generate_share": round(gen / max(gen + train, 1e-9), 3),
                       "train_share": round(train / max(gen + train, 1e-9), 3),
                       "rollout_tokens_per_s": round(statistics.median(r["rl/rollout_tokens_per_s"] for r in rows), 1)}
        print(json.dumps(out, sort_keys=True))
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
