"""Generation throughput: lmlab's Engine vs lmlab's static-batch ``generate`` vs Hugging Face ``generate``.

The three run the same weights (lmlab's state dict loaded into ``LlamaForCausalLM`` through ``lmlab.hf``), greedy,
on the same requests: ``--n-requests`` prompts of 16-64 random tokens. Two workloads:

* ``uniform``: every request wants ``--new-tokens`` tokens;
* ``ragged``: request ``i`` wants between 8 and 2 x ``--new-tokens`` tokens (continuous batching refills a
  finished slot at once; a static batch runs until its longest request is done, HF then throws the rest away).

The static-batch variants take the requests ``--batch`` at a time (HF with left padding and its default dynamic
cache); the engine gets them all and keeps up to ``--batch`` running. Throughput counts only the tokens each
request asked for (useful tokens), prefill included in the time. The engine's tokens are compared with lmlab's
``generate`` (both exact to full recompute; a mismatch can only come from float ties), reported as a fraction.

Usage::

    .venv/bin/python bench/generate.py                      # ~2-3 minutes
    .venv/bin/python bench/generate.py --quick              # smoke test
    .venv/bin/python bench/generate.py --batch 64 --n-requests 128 | tail -1 | python -m json.tool

The machines are noisy (see bench/README.md): variants alternate over ``--rounds`` and figures are medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

from lmlab.config import InitConfig, ModelConfig
from lmlab.hf import model_config_to_hf, to_hf_state_dict
from lmlab.inference import Engine, Request, SamplingParams, generate
from lmlab.models import build_model


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=768)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--n-requests", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--no-hf", action="store_true", help="skip Hugging Face")
    p.add_argument("--quick", action="store_true", help="small smoke run")
    a = p.parse_args(argv)
    if a.quick:
        a.n_requests, a.batch, a.new_tokens, a.rounds = 16, 8, 16, 1
    return a


def build(a):
    cfg = ModelConfig(vocab_size=a.vocab, dim=a.dim, n_layers=a.n_layers, n_heads=a.n_heads, hidden_dim=a.ffn,
                      max_seq_len=512, init=InitConfig())
    ours = build_model(cfg, seed=0).eval()
    hf = None
    if not a.no_hf:
        import transformers

        skip = ("architectures", "model_type", "torch_dtype")
        hf_cfg = transformers.LlamaConfig(**{k: v for k, v in model_config_to_hf(cfg).items() if k not in skip},
                                          attn_implementation="sdpa")
        hf = transformers.LlamaForCausalLM(hf_cfg).eval()
        hf.load_state_dict(to_hf_state_dict(ours.state_dict(), cfg), strict=False)
        hf.generation_config.eos_token_id = None
        hf.generation_config.pad_token_id = 0
    return ours, hf


def workload(a, ragged: bool):
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, a.vocab, (int(torch.randint(16, 65, (), generator=g)),), generator=g).tolist()
               for _ in range(a.n_requests)]
    new = [int(torch.randint(8, 2 * a.new_tokens + 1, (), generator=g)) if ragged else a.new_tokens
           for _ in range(a.n_requests)]
    return prompts, new


def run_engine(model, a, prompts, new):
    pool = a.batch * (64 + 2 * a.new_tokens)
    engine = Engine(model, pool_tokens=pool, page_size=16, max_batch=a.batch, prefill_chunk=1024,
                    prefix_cache=False)
    reqs = [Request(prompt=p, params=SamplingParams(max_new_tokens=n, temperature=0)) for p, n in zip(prompts, new)]
    return [r.tokens for r in engine.generate(reqs)]


def run_static(model, a, prompts, new):
    out = []
    for i in range(0, len(prompts), a.batch):
        params = [SamplingParams(max_new_tokens=n, temperature=0) for n in new[i:i + a.batch]]
        out += generate(model, prompts[i:i + a.batch], params)
    return out


@torch.no_grad()
def run_hf(hf, a, prompts, new):
    out = []
    for i in range(0, len(prompts), a.batch):
        ps, ns = prompts[i:i + a.batch], new[i:i + a.batch]
        width = max(map(len, ps))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in ps])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ps])
        gen = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max(ns), min_new_tokens=max(ns),
                          do_sample=False)
        out += [row[width:width + n].tolist() for row, n in zip(gen, ns)]
    return out


def main(argv=None) -> dict:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    ours, hf = build(a)
    variants = {"engine": lambda p, n: run_engine(ours, a, p, n), "static": lambda p, n: run_static(ours, a, p, n)}
    if hf is not None:
        variants["hf"] = lambda p, n: run_hf(hf, a, p, n)
    result: dict = {"bench": "generate", "shape": dict(dim=a.dim, n_layers=a.n_layers, n_heads=a.n_heads, ffn=a.ffn,
                                                       vocab=a.vocab), "batch": a.batch, "n_requests": a.n_requests,
                    "new_tokens": a.new_tokens, "threads": torch.get_num_threads(),
                    "load_avg_start": os.getloadavg()[0]}
    for name, ragged in (("uniform", False), ("ragged", True)):
        prompts, new = workload(a, ragged)
        useful = sum(new)
        times: dict[str, list[float]] = {v: [] for v in variants}
        outs = {}
        for r in range(a.rounds):
            order = list(variants)[r % len(variants):] + list(variants)[:r % len(variants)]
            for v in order:
                t0 = time.perf_counter()
                outs[v] = variants[v](prompts, new)
                times[v].append(time.perf_counter() - t0)
                log(f"{name} round {r} {v}: {useful / times[v][-1]:,.0f} tokens/s")
        tps = {v: useful / statistics.median(ts) for v, ts in times.items()}
        same = sum(x == y for x, y in zip(outs["engine"], outs["static"])) / len(prompts)
        entry = {"useful_tokens": useful, "tokens_per_s": {v: round(x, 1) for v, x in tps.items()},
                 "engine_equals_static": same}
        for v in variants:
            if v != "engine":
                entry[f"engine_over_{v}"] = round(tps["engine"] / tps[v], 3)
        result[name] = entry
        print(f"{name}: " + ", ".join(f"{v} {x:,.0f} tok/s" for v, x in tps.items()) + f"; engine == static on "
              f"{same:.0%} of requests", flush=True)
    result["load_avg_end"] = os.getloadavg()[0]
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
