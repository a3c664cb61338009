"""Generation benchmarks: lmlab's Engine against Hugging Face ``generate`` and against itself without its
prefix cache / with one request at a time. Three workloads, default shape dim 256, 4 layers, 4 heads, byte
vocabulary (264 ids), greedy, same weights in both libraries (lmlab's state dict loaded into
``LlamaForCausalLM`` through ``lmlab.hf``):

1. ``throughput``: 1, 8 and 64 requests with ragged prompts of 16-64 random tokens, 64 new tokens each.
   The engine gets all requests at once (``max_batch`` = number of requests); HF ``generate`` runs them as one
   left-padded batch with its default dynamic cache (the padding it prefills is reported). Generated tokens/s,
   counted from each output, prefill included. Greedy tokens are compared request by request; the engine / HF
   ratio is reported only when every request's tokens are equal (otherwise the two did different work).
   Targets: engine >= 2x HF at 64 requests, and never slower at 1 request.
2. ``dialog_tree``: 32 conversations x 4 user turns sharing one ~130-token system prompt; each turn is a new
   request with the whole history (previous user turns and the model's own previous answers), sent in waves
   turn by turn. Engine with vs without the prefix cache: wall time and prefill tokens computed.
   Targets: >= 3x fewer prefill tokens and >= 2x faster with the cache. Outputs must be identical. Also
   reported: the forwards' prefill / decode time of each variant, and the speed-up a cache whose prefill took
   no time would give (decoding is the same work in both).
3. ``tools``: 256 questions that each need one call to a stub tool sleeping 5 ms. The model is a SCRIPTED
   STAND-IN: the real Llama of this shape runs every forward (so compute is real), but its logits are replaced
   by a script that writes a ```sql``` call, the ``<|database|>`` trigger, then, after the tool's answer, a
   final sentence quoting the answer it reads back from its own KV cache. Engine (all questions at once,
   ``max_batch`` 64) vs the same engine fed one question at a time (timed on the first ``--seq-questions``
   questions, extrapolated to all and reported as such; ``--seq-questions 0`` times all). Both engines are built
   and warmed up outside the timers. Questions/s; the answer of every question is checked.

Usage::

    .venv/bin/python bench/generate.py                       # ~1-2 minutes
    .venv/bin/python bench/generate.py --quick               # smoke test, ~15 s
    .venv/bin/python bench/generate.py --only throughput | tail -1 | python -m json.tool

The machines are noisy (see bench/README.md): variants alternate over ``--rounds`` and figures are medians.
The last line of stdout is one JSON object with every figure and whether each target is met.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from types import SimpleNamespace

import torch
from torch import nn

from lmlab.config import InitConfig, ModelConfig
from lmlab.hf import model_config_to_hf, to_hf_state_dict
from lmlab.inference import Engine, Request, SamplingParams
from lmlab.models import build_model
from lmlab.tokenizers import ByteTokenizer, DialogTokenizer
from lmlab.tools import CodeBlockTool


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=768)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--batches", default="1,8,64", help="request counts of the throughput workload")
    p.add_argument("--conversations", type=int, default=32)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--answer-tokens", type=int, default=64, help="tokens of each model answer in the dialog tree")
    p.add_argument("--questions", type=int, default=256)
    p.add_argument("--seq-questions", type=int, default=32,
                   help="questions timed one at a time (the rate is extrapolated to all, and the output says so); "
                        "0: all")
    p.add_argument("--tool-latency", type=float, default=0.005)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--only", default="", help="comma-separated subset of throughput,dialog_tree,tools")
    p.add_argument("--quick", action="store_true", help="small smoke run")
    a = p.parse_args(argv)
    if a.quick:
        a.batches, a.new_tokens, a.rounds = "1,8", 16, 1
        a.conversations, a.turns, a.answer_tokens, a.questions, a.seq_questions = 4, 2, 8, 16, 4
    return a


def build(a):
    tok = ByteTokenizer()
    cfg = ModelConfig(vocab_size=tok.vocab_size, dim=a.dim, n_layers=a.n_layers, n_heads=a.n_heads,
                      hidden_dim=a.ffn, max_seq_len=1024, init=InitConfig())
    ours = build_model(cfg, seed=0).eval()
    import transformers

    skip = ("architectures", "model_type", "torch_dtype")
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in model_config_to_hf(cfg).items() if k not in skip},
                                      attn_implementation="sdpa")
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    # strict: every weight of the baseline comes from lmlab's model (a missed one would leave HF's random init)
    hf.load_state_dict(to_hf_state_dict(ours.state_dict(), cfg), strict=True)
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    return ours, hf, tok


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


# ---- 1. throughput ---------------------------------------------------------------------------------------


def random_prompts(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (int(torch.randint(16, 65, (), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def run_engine(model, prompts, new):
    engine = Engine(model, pool_tokens=len(prompts) * (64 + new + 16), page_size=16, max_batch=len(prompts),
                    )
    params = SamplingParams(max_new_tokens=new, temperature=0)
    return [r.tokens for r in engine.generate([Request(prompt=p, params=params) for p in prompts])]


@torch.no_grad()
def run_hf(hf, prompts, new):
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=hf.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=hf.device)
    gen = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False)
    return [row[width:].tolist() for row in gen]


def bench_throughput(a, ours, hf, tok) -> dict:
    """Generated tokens/s counted from the outputs themselves; a ratio only when both libraries generated the
    same tokens (else it would compare different work); HF's left padding reported as the extra prefill it does."""
    out = {}
    for n in [int(x) for x in a.batches.split(",")]:
        prompts = random_prompts(n, seed=n)
        variants = {"engine": lambda p=prompts: run_engine(ours, p, a.new_tokens),
                    "hf": lambda p=prompts: run_hf(hf, p, a.new_tokens)}
        for fn in variants.values():  # warm-up (allocator, first-call costs)
            fn()
        rates, outs = {v: [] for v in variants}, {}
        for r in range(a.rounds):
            for v in (list(variants) if r % 2 == 0 else list(variants)[::-1]):
                dt, outs[v] = timed(variants[v])
                rates[v].append(sum(map(len, outs[v])) / dt)
        tps = {v: statistics.median(x) for v, x in rates.items()}
        agree = sum(x == y for x, y in zip(outs["engine"], outs["hf"])) / n
        width, real = max(map(len, prompts)), sum(map(len, prompts))
        row = {"tokens_per_s": {v: round(x, 1) for v, x in tps.items()},
               "generated_tokens": {v: sum(map(len, o)) for v, o in outs.items()}, "greedy_tokens_equal_frac": agree,
               "prompt_tokens": real, "hf_padded_prompt_tokens": n * width,
               "hf_padding_frac": round(1 - real / (n * width), 3)}
        if agree == 1.0:
            row["engine_over_hf"] = round(tps["engine"] / tps["hf"], 3)
            verdict = f"{row['engine_over_hf']:.2f}x; greedy outputs equal on every request"
        else:  # different tokens: not the same work, so no ratio
            row["engine_over_hf"] = None
            verdict = f"NO RATIO: greedy outputs differ on {1 - agree:.0%} of requests"
        out[str(n)] = row
        print(f"throughput {n:>3} requests: engine {tps['engine']:,.0f} tok/s, HF {tps['hf']:,.0f} tok/s ({verdict}); "
              f"HF prefills {n * width:,} left-padded prompt tokens for {real:,} real ones "
              f"({row['hf_padding_frac']:.0%} padding)", flush=True)
    targets = {}
    if "64" in out:
        targets["engine_ge_2x_hf_at_64"] = (out["64"]["engine_over_hf"] or 0) >= 2.0
    if "1" in out:
        targets["engine_ge_hf_at_1"] = (out["1"]["engine_over_hf"] or 0) >= 1.0
    out["targets"] = targets
    return out


# ---- 2. dialog tree -------------------------------------------------------------------------------------


def run_dialogs(model, dtok, a, system, users, cache: bool):
    engine = Engine(model, dtok, pool_tokens=a.conversations * 1024, page_size=16, max_batch=a.conversations,
                    prefix_cache=cache)
    # answers are kept to ASCII so that their text round-trips to the same tokens (an untrained byte model
    # otherwise writes invalid UTF-8, whose re-encoded text differs and defeats any prefix cache)
    params = SamplingParams(max_new_tokens=a.answer_tokens, temperature=0, stop_token_ids=[],
                            suppress_token_ids=list(range(128, dtok.tokenizer.vocab_size)))
    histories = [[{"source": "system", "content": system}] for _ in range(a.conversations)]
    answers = []
    for turn in range(a.turns):
        for c, h in enumerate(histories):
            h.append({"source": "user", "content": users[c][turn]})
        res = engine.generate([Request(dialog=h, params=params) for h in histories])
        for h, r in zip(histories, res):
            h.append({"source": "assistant", "content": r.text})
            answers.append(r.tokens)
    return engine.stats, answers


def bench_dialog_tree(a, ours, tok) -> dict:
    dtok = DialogTokenizer(tok)
    system = ("You are a careful assistant for a small research lab. Answer briefly, cite the table you used, "
              "and say so when you do not know.")
    users = [[f"Conversation {c}, question {t}: what about item {c * 7 + t}?" for t in range(a.turns)]
             for c in range(a.conversations)]
    for cache in (True, False):  # warm-up of both variants (first-call costs are paid by neither timed run)
        run_dialogs(ours, dtok, a, system, users, cache)
    times, stats, outs = {"cache": [], "no_cache": []}, {"cache": [], "no_cache": []}, {}
    for r in range(a.rounds):
        for v in (["cache", "no_cache"] if r % 2 == 0 else ["no_cache", "cache"]):
            dt, (st, outs[v]) = timed(lambda v=v: run_dialogs(ours, dtok, a, system, users, v == "cache"))
            times[v].append(dt)
            stats[v].append(st)
    wall = {v: statistics.median(ts) for v, ts in times.items()}
    fills = {v: st[-1]["prefill_tokens"] for v, st in stats.items()}
    split = {v: {k: round(statistics.median(s[k] for s in st), 3) for k in ("prefill_s", "decode_s")}
             for v, st in stats.items()}
    # the most any prefix cache could give on this workload: the run without it against one whose prefill
    # took no time at all (decoding, the same work in both, is left)
    ceiling = wall["no_cache"] / max(wall["cache"] - split["cache"]["prefill_s"], 1e-9)
    fill_ratio = fills["no_cache"] / max(fills["cache"], 1)
    speed = wall["no_cache"] / wall["cache"]
    same = sum(x == y for x, y in zip(outs["cache"], outs["no_cache"])) / len(outs["cache"])
    prompt_tokens = len(dtok.encode_prompt([{"source": "system", "content": system}]))
    print(f"dialog tree {a.conversations} x {a.turns} turns: prefill tokens {fills['cache']:,} with the cache vs "
          f"{fills['no_cache']:,} without ({fill_ratio:.1f}x fewer); wall {wall['cache']:.2f} s vs "
          f"{wall['no_cache']:.2f} s ({speed:.2f}x faster); answers identical on {same:.0%}", flush=True)
    print(f"  forwards: prefill {split['cache']['prefill_s']:.2f} s vs {split['no_cache']['prefill_s']:.2f} s, "
          f"decode {split['cache']['decode_s']:.2f} s vs {split['no_cache']['decode_s']:.2f} s; a cache whose "
          f"prefill took no time would be at most {ceiling:.2f}x faster", flush=True)
    return {"conversations": a.conversations, "turns": a.turns, "system_prompt_tokens": prompt_tokens,
            "answer_tokens": a.answer_tokens, "requests": a.conversations * a.turns,
            "prefill_tokens": fills, "prefill_ratio": round(fill_ratio, 2),
            "wall_s": {v: round(x, 3) for v, x in wall.items()}, "speedup": round(speed, 3),
            "forward_s": split, "speedup_ceiling_zero_prefill": round(ceiling, 3),
            "answers_identical_frac": same,
            "targets": {"prefill_ge_3x_fewer": fill_ratio >= 3.0, "ge_2x_faster": speed >= 2.0}}


# ---- 3. tools -----------------------------------------------------------------------------------------


class ScriptedToolModel(nn.Module):
    """A scripted stand-in: runs ``llama`` on every forward (real compute through the engine's paged cache)
    but replaces its logits by a script. The script needs each query's token context: an extra cache layer
    (index ``llama.cfg.n_layers``) stores each token id as its key, read back through the engine's pages.

    For question ``What is item N?`` it writes ``Let me check.\\n```sql\\nSELECT v FROM items WHERE id = N\\n```"``
    and ``<|database|>``; after the tool's answer it writes ``Item N is <answer read from the context>.`` and
    ``<|end_of_dialog|>``.
    """

    def __init__(self, llama, dtok):
        super().__init__()
        self.llama = llama
        c = llama.cfg
        self.cfg = SimpleNamespace(vocab_size=c.vocab_size, n_layers=c.n_layers + 1, n_heads=c.n_heads,
                                   n_kv_heads=c.n_kv_heads, dim=c.dim, max_seq_len=c.max_seq_len)
        self.tok = dtok.tokenizer
        self.user, self.assistant, self.db = (dtok.begin_id(s) for s in ("user", "assistant", "database"))
        self.db_trigger, self.end = self.db, dtok.end_id

    def script(self, ctx: list[int]) -> int:
        if self.user not in ctx or self.assistant not in ctx:
            return 0
        a = [i for i, t in enumerate(ctx) if t == self.assistant]
        item = self.tok.decode(ctx[ctx.index(self.user) + 1:a[0]]).removeprefix("What is item ").rstrip("?")
        if len(a) == 1:
            turn = self.tok.encode(f"Let me check.\n```sql\nSELECT v FROM items WHERE id = {item}\n```")
            turn.append(self.db_trigger)
        else:
            answer = self.tok.decode(ctx[ctx.index(self.db) + 1:a[1]])
            turn = self.tok.encode(f"Item {item} is {answer}.") + [self.end]
        i = len(ctx) - a[-1] - 1
        return turn[i] if i < len(turn) else 0

    def forward(self, tokens, cache):
        logits = self.llama(tokens, cache=cache)
        b, t = tokens.shape
        h, d = self.cfg.n_kv_heads or self.cfg.n_heads, self.cfg.dim // self.cfg.n_heads
        ids = tokens.float()[:, None, :, None].expand(b, h, t, d)
        keys, _ = cache.update(self.cfg.n_layers - 1, ids, ids)
        keys = keys[:, 0, :, 0].long()
        out = torch.zeros_like(logits)
        mask = cache.mask[:, 0]
        # the engine reads only the last position of each segment: where the next query does not see every
        # key this one sees (another sequence, or padding); the script runs there only
        last = torch.ones(b, t, dtype=torch.bool)
        last[:, :-1] = (mask[:, :-1] & ~mask[:, 1:]).any(-1)
        for r, c in last.nonzero().tolist():
            out[r, c, self.script(keys[r, mask[r, c]].tolist())] = 1.0
        return out


def bench_tools(a, ours, tok) -> dict:
    dtok = DialogTokenizer(tok)
    model = ScriptedToolModel(ours, dtok).eval()
    table = {i: str((i * 7919) % 1000) for i in range(a.questions)}
    calls = []

    def db(sql: str) -> str:
        time.sleep(a.tool_latency)
        calls.append(sql)
        return table[int(sql.rsplit("=", 1)[1])]

    tool = CodeBlockTool(db, language="sql")
    params = SamplingParams(max_new_tokens=200, temperature=0)
    reqs = [Request(dialog=[{"source": "user", "content": f"What is item {i}?"}], params=params)
            for i in range(a.questions)]

    def engine():
        return Engine(model, dtok, pool_tokens=64 * 256, page_size=16, max_batch=64, prefill_chunk=1024,
                      tools=[tool])

    def correct(res):
        return sum(r.dialog[-1]["content"] == f"Item {i} is {table[i]}." and len(r.tool_calls) == 1
                   for i, r in enumerate(res))

    batched, one_by_one = engine(), engine()  # both built (pools allocated) outside the timers
    for eng in (batched, one_by_one):  # warm-up of both
        eng.generate(reqs[:8])
    calls.clear()
    t_batch, res = timed(lambda: batched.generate(reqs))
    ok, n_calls = correct(res), len(calls)
    n_seq = a.questions if a.seq_questions <= 0 else min(a.seq_questions, a.questions)
    t_seq, seq_res = timed(lambda: [one_by_one.generate([r])[0] for r in reqs[:n_seq]])
    ok_seq = correct(seq_res)
    qps, qps_seq = a.questions / t_batch, n_seq / t_seq
    gen_tokens = sum(len(r.tokens) for r in res)
    extrapolated = n_seq < a.questions
    how = (f"timed on the first {n_seq} of {a.questions} questions and extrapolated" if extrapolated
           else f"timed on all {a.questions} questions")
    print(f"tools {a.questions} questions (scripted stand-in model, {a.tool_latency * 1e3:g} ms tool): "
          f"{t_batch:.2f} s, {qps:,.1f} questions/s batched vs {qps_seq:,.1f}/s one at a time ({how}) "
          f"({qps / qps_seq:.1f}x); correct {ok}/{a.questions} (one at a time {ok_seq}/{n_seq})", flush=True)
    return {"model": "scripted stand-in (real Llama forward, scripted logits)", "questions": a.questions,
            "tool_latency_s": a.tool_latency, "tool_calls": n_calls, "tokens_per_question": gen_tokens / a.questions,
            "batched_s": round(t_batch, 3), "questions_per_s": round(qps, 2),
            "sequential_questions_timed": n_seq, "sequential_extrapolated": extrapolated,
            "sequential_questions_per_s": round(qps_seq, 2),
            "sequential_s" + ("_extrapolated" if extrapolated else ""): round(a.questions / qps_seq, 2),
            "speedup": round(qps / qps_seq, 2), "correct_frac": ok / a.questions,
            "sequential_correct_frac": ok_seq / n_seq}


def main(argv=None) -> dict:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    ours, hf, tok = build(a)
    only = set(a.only.split(",")) if a.only else {"throughput", "dialog_tree", "tools"}
    result: dict = {"bench": "generate", "shape": dict(dim=a.dim, n_layers=a.n_layers, n_heads=a.n_heads, ffn=a.ffn,
                                                       vocab=tok.vocab_size),
                    "new_tokens": a.new_tokens, "threads": torch.get_num_threads(), "rounds": a.rounds,
                    "load_avg_start": os.getloadavg()[0]}
    t0 = time.perf_counter()
    if "throughput" in only:
        result["throughput"] = bench_throughput(a, ours, hf, tok)
    if "dialog_tree" in only:
        result["dialog_tree"] = bench_dialog_tree(a, ours, tok)
    if "tools" in only:
        result["tools"] = bench_tools(a, ours, tok)
    result["targets"] = {k: v for part in ("throughput", "dialog_tree") if part in result
                         for k, v in result[part]["targets"].items()}
    result["load_avg_end"] = os.getloadavg()[0]
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
