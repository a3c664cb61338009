"""Recurrent mixers against attention: generation speed against context length, and training speed of the
parallel (scan) path against a naive token-by-token loop of the mixer's ``step``.

Models: the same stack (byte-sized vocabulary of 256, dim 128, 4 layers, SwiGLU MLP in every block) with
``model.mixer`` = attention (Llama), mingru, minlstm, hawk, mamba2; ``model.recurrent.expand`` = 1 so that every
model has about the same parameter count (each count is reported; all within ~10% of the transformer's).

1. ``generate``: ``lmlab.inference.Engine``, greedy, B = 8 requests of random prompts of length L each, ``--new``
   new tokens each, for L in ``--contexts``. All prompts are prefilled in one step (``prefill_chunk`` = B x L, so no
   request decodes while another still prefills); the requests are streamed and the time at which each gets its
   first token is taken. Prefill tokens/s = B x L / (time until the last request's first token); decode tokens/s =
   (generated tokens - B) / (time after that). The engine's own forward-time split (``stats``: prefill_s, decode_s,
   host work excluded) is reported beside it. Attention's decode reads every cached key per token (decays with L);
   a recurrent mixer's decode step is O(1) (flat in L). The models alternate within each round (rotating order);
   figures are medians over ``--rounds``.
2. ``train``: tokens/s of forward + cross-entropy + backward (no optimizer step) at B = 8, T = ``--train-len``, for
   each recurrent mixer through its parallel path (what training runs) vs the SAME model with every mixer's forward
   replaced by a plain Python loop over ``mixer.step`` (the sequential recurrence a user would write first; the
   MLPs, norms and output head still run over all T at once), and vs the transformer of about the same parameter
   count. Both paths of a mixer must give the same loss (checked, the difference reported). Variants alternate;
   medians over ``--train-rounds``. The sequential loop is timed on ``--seq-len`` tokens (default T) and
   reported as tokens/s (its cost is linear in T).

Usage::

    .venv/bin/python bench/recurrent.py                  # ~3 minutes on 2 busy cores
    .venv/bin/python bench/recurrent.py --contexts 128,512,2048,8192   # ~8 minutes (attention's prefill at 8192)
    .venv/bin/python bench/recurrent.py --quick          # smoke test, ~30 s
    .venv/bin/python bench/recurrent.py --only train | tail -1 | python -m json.tool

The machines are noisy (see bench/README.md; check ``uptime``: the load average is recorded in the JSON). The last
line of stdout is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from lmlab.config import ModelConfig
from lmlab.inference import Engine, Request, SamplingParams
from lmlab.models import build_model

RECURRENT = ("mingru", "minlstm", "hawk", "mamba2")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--expand", type=int, default=1, help="model.recurrent.expand of the recurrent mixers")
    p.add_argument("--mixers", default="attention," + ",".join(RECURRENT))
    p.add_argument("--batch", type=int, default=8, help="requests (generation) and rows (training)")
    p.add_argument("--contexts", default="128,512,2048", help="prompt lengths L of the generation part")
    p.add_argument("--new", type=int, default=64, help="new tokens per request")
    p.add_argument("--rounds", type=int, default=3, help="generation rounds (medians)")
    p.add_argument("--train-len", type=int, default=512, help="T of the training part")
    p.add_argument("--seq-len", type=int, default=0, help="T of the sequential loop (0: --train-len)")
    p.add_argument("--train-rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (0: torch's default); 1 by default: with other jobs on the 2 cores, two threads "
                        "wait on each other and the figures swing by 10x or more")
    p.add_argument("--only", default="", help="generate or train")
    p.add_argument("--quick", action="store_true", help="small smoke run")
    a = p.parse_args(argv)
    if a.quick:
        a.contexts, a.new, a.rounds, a.train_len, a.train_rounds = "64,256", 16, 1, 128, 1
        a.seq_len = a.seq_len or 64
    a.seq_len = a.seq_len or a.train_len
    return a


def config(a, mixer: str, max_len: int) -> ModelConfig:
    cfg = ModelConfig(vocab_size=256, dim=a.dim, n_layers=a.n_layers, n_heads=a.n_heads, max_seq_len=max_len,
                      mixer=mixer)
    cfg.recurrent.expand = a.expand
    return cfg


def build_models(a, max_len: int) -> dict:
    models = {}
    for m in a.mixers.split(","):
        models[m] = build_model(config(a, m, max_len), seed=0)
    return models


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ---- 1. generation against context length ------------------------------------------------------------------


def gen_once(model, prompts, new: int) -> dict:
    b, length = len(prompts), len(prompts[0])
    engine = Engine(model, pool_tokens=b * (length + new + 32), page_size=16, max_batch=b, prefill_chunk=b * length)
    params = SamplingParams(max_new_tokens=new, temperature=0)
    reqs = [Request(prompt=p, params=params) for p in prompts]
    first: dict[int, float] = {}
    counts = [0] * b
    t0 = time.perf_counter()
    for ev in engine.stream(reqs):
        if ev.tokens and ev.index not in first:
            first[ev.index] = time.perf_counter()
        counts[ev.index] += len(ev.tokens)
    t_end = time.perf_counter()
    t_first = max(first.values())
    generated = sum(counts)
    return {"prefill_s": t_first - t0, "decode_s": t_end - t_first, "generated": generated,
            "prefill_tok_s": b * length / (t_first - t0), "decode_tok_s": (generated - b) / (t_end - t_first),
            "fwd_prefill_s": engine.stats["prefill_s"], "fwd_decode_s": engine.stats["decode_s"]}


def bench_generate(a, models) -> dict:
    contexts = [int(x) for x in a.contexts.split(",")]
    g = torch.Generator().manual_seed(0)
    out: dict = {}
    names = list(models)
    for m in names:  # warm-up of every model (first-call costs, allocator)
        gen_once(models[m], [list(range(32))] * a.batch, 4)
    for length in contexts:
        prompts = [torch.randint(0, 256, (length,), generator=g).tolist() for _ in range(a.batch)]
        runs: dict = {m: [] for m in names}
        for r in range(a.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for m in order:
                with torch.no_grad():
                    runs[m].append(gen_once(models[m], prompts, a.new))
        row = {}
        for m in names:
            med = {k: statistics.median(x[k] for x in runs[m]) for k in runs[m][0]}
            row[m] = {"prefill_tok_s": round(med["prefill_tok_s"], 1), "decode_tok_s": round(med["decode_tok_s"], 1),
                      "prefill_s": round(med["prefill_s"], 3), "decode_s": round(med["decode_s"], 3),
                      "generated": int(med["generated"]),
                      "engine_forward_s": {"prefill": round(med["fwd_prefill_s"], 3),
                                           "decode": round(med["fwd_decode_s"], 3)}}
            print(f"generate L={length:>5} {m:>9}: decode {med['decode_tok_s']:>8,.0f} tok/s, prefill "
                  f"{med['prefill_tok_s']:>8,.0f} tok/s ({med['prefill_s']:.2f} s prefill, {med['decode_s']:.2f} s "
                  f"decode; forwards {med['fwd_prefill_s']:.2f} / {med['fwd_decode_s']:.2f} s)", flush=True)
        out[str(length)] = row
    # decode at the longest context over decode at the shortest: ~1 for an O(1) step, < 1 for attention
    if len(contexts) > 1:
        lo, hi = str(contexts[0]), str(contexts[-1])
        out["decode_longest_over_shortest"] = {m: round(out[hi][m]["decode_tok_s"] / out[lo][m]["decode_tok_s"], 3)
                                               for m in names}
        print("decode tok/s at L=" + hi + " / at L=" + lo + ": "
              + ", ".join(f"{m} {v:.2f}" for m, v in out["decode_longest_over_shortest"].items()), flush=True)
    return out


# ---- 2. training: parallel scan vs a sequential loop of step vs attention --------------------------------------


def _sequential_forward(mixer):
    def forward(x, resets=None, state=None):
        if resets is not None:
            raise ValueError("the sequential loop handles one document per row")
        state = mixer.init_state(x.shape[0], x.device, x.dtype) if state is None else state
        ys = []
        for t in range(x.shape[1]):
            y, state = mixer.step(x[:, t], state)
            ys.append(y)
        return torch.stack(ys, 1), state
    return forward


@contextmanager
def sequential(model):
    """Every recurrent mixer of ``model`` runs as a Python loop over its ``step`` (same weights)."""
    mixers = [layer.mixer for layer in model.layers if layer.kind != "attention"]
    for mx in mixers:
        mx.forward = _sequential_forward(mx)
    try:
        yield model
    finally:
        for mx in mixers:
            del mx.forward


def train_step(model, tokens) -> float:
    logits = model(tokens[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    loss.backward()
    model.zero_grad(set_to_none=True)
    return loss.item()


def timed_step(model, tokens, seq: bool) -> tuple[float, float]:
    t0 = time.perf_counter()
    if seq:
        with sequential(model):
            loss = train_step(model, tokens)
    else:
        loss = train_step(model, tokens)
    return time.perf_counter() - t0, loss


def bench_train(a, models) -> dict:
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 256, (a.batch, a.train_len + 1), generator=g)
    seq_tokens = tokens[:, :a.seq_len + 1]
    variants = []  # (name, model, tokens, sequential)
    if "attention" in models:
        variants.append(("attention", models["attention"], tokens, False))
    for m in models:
        if m != "attention":
            variants += [(f"{m}/parallel", models[m], tokens, False), (f"{m}/sequential", models[m], seq_tokens, True)]
    for _name, model, tok, seq in variants:  # warm-up
        model.train()
        timed_step(model, tok, seq)
    rates: dict = {v[0]: [] for v in variants}
    for r in range(a.train_rounds):
        order = variants[r % len(variants):] + variants[:r % len(variants)]
        for name, model, tok, seq in order:
            dt, _ = timed_step(model, tok, seq)
            rates[name].append(tok.shape[0] * (tok.shape[1] - 1) / dt)
    tps = {k: statistics.median(v) for k, v in rates.items()}
    out: dict = {"batch": a.batch, "train_len": a.train_len, "seq_len": a.seq_len,
                 "tokens_per_s": {k: round(v, 1) for k, v in tps.items()}}
    att = tps.get("attention")
    if att:
        print(f"train attention: {att:>8,.0f} tok/s (forward + backward, B={a.batch}, T={a.train_len})", flush=True)
    for m in models:
        if m == "attention":
            continue
        par, seq = tps[f"{m}/parallel"], tps[f"{m}/sequential"]
        diff = loss_diff(models[m], seq_tokens)
        row = {"parallel_over_sequential": round(par / seq, 2),
               "parallel_over_attention": round(par / att, 3) if att else None,
               "loss_abs_diff_parallel_vs_sequential": diff}
        out[m] = row
        print(f"train {m:>9}: parallel {par:>8,.0f} tok/s, sequential step loop {seq:>7,.0f} tok/s "
              f"({par / seq:.1f}x); parallel / attention {par / att if att else float('nan'):.2f}", flush=True)
    return out


def loss_diff(model, tokens) -> float:
    """|loss through the parallel path - loss through the sequential loop| on the same tokens and weights."""
    with torch.no_grad():
        tgt = tokens[:, 1:].reshape(-1)
        lp = F.cross_entropy(model(tokens[:, :-1]).reshape(-1, 256), tgt).item()
        with sequential(model):
            ls = F.cross_entropy(model(tokens[:, :-1]).reshape(-1, 256), tgt).item()
    return abs(lp - ls)


def main(argv=None) -> dict:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    contexts = [int(x) for x in a.contexts.split(",")]
    max_len = max(max(contexts) + a.new + 16, a.train_len + 1)
    models = build_models(a, max_len)
    only = {a.only} if a.only else {"generate", "train"}
    params = {m: n_params(x) for m, x in models.items()}
    base = params.get("attention") or next(iter(params.values()))
    print("params: " + ", ".join(f"{m} {n:,} ({n / base:.2f}x)" for m, n in params.items()), flush=True)
    result: dict = {"bench": "recurrent",
                    "shape": dict(dim=a.dim, n_layers=a.n_layers, n_heads=a.n_heads, expand=a.expand, vocab=256),
                    "params": params, "batch": a.batch, "new_tokens": a.new, "contexts": contexts,
                    "threads": torch.get_num_threads(), "rounds": a.rounds, "train_rounds": a.train_rounds,
                    "load_avg_start": list(os.getloadavg())}
    t0 = time.perf_counter()
    if "generate" in only:
        for m in models.values():
            m.eval()
        result["generate"] = bench_generate(a, models)
    if "train" in only:
        result["train"] = bench_train(a, models)
    result["load_avg_end"] = list(os.getloadavg())
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
