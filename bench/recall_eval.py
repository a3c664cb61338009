"""Recall evaluation speed: trained in-tool models answering memory questions with the SQL tool live.

For each run folder given (e.g. the quickstart's in-tool run at 256 people, with smeared keys, and the same run
trained with ``model.smear_keys=0``), 1,024 questions (the run's eval sets, cycled) are answered greedily:

* ``engine``: what ``lmlab.evals.recall.evaluate_recall`` runs (training-time and ``lmlab eval`` evaluations): an
  engine built for the call (continuous batching, paged KV cache, prefix cache, tool calls in worker threads)
  with every question submitted at once, at ``--max-batch`` values;
* ``engine_b<N>_p<P>``: the same, the questions split across ``P`` processes forked from this one, one thread
  each (``evals.recall.procs`` / ``lmlab eval --procs``: :func:`lmlab.comm.fork_map`), timed from the fork to
  the last share's answers;
* ``static``: the simple alternative a user would write: questions in fixed batches, every row advancing one
  token per forward through a preallocated KV cache (prompt and tool-answer tokens fed one per step, the tool run
  inline when a row emits the trigger), until every row of the batch is done.

Reported per variant: questions/s and generated tokens/s (tokens the model sampled; inserted tool answers are not
counted), recall, and the fraction of questions whose tokens equal the first variant's (the
reference). The last line of stdout is one
JSON object. Target (issue 14): >= 100k generated tokens/s on 2 cores.

The ceiling beside them (``kv_ceiling``): every decoded token's attention reads the keys and values of its whole
context in every attention layer, so keys/values bytes per generated token (from the answers' own context lengths)
against this machine's memory read bandwidth (a large float32 sum at the same threads, measured in the same run)
bounds the generated tokens/s of any decoder that keeps a float32 KV cache, before any other work is counted.

Usage::

    .venv/bin/python bench/recall_eval.py --run runs/memory/quick/mode=tool_people=256 --run runs/plain256
    .venv/bin/python bench/recall_eval.py --run RUN --questions 256 --max-batch 64 --static-batch 64   # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import deque
from pathlib import Path

import torch

from lmlab.comm import fork_map
from lmlab.config import EngineConfig
from lmlab.evals.recall import build_tool, judge, load_questions
from lmlab.inference import Engine, Request, Result, SamplingParams
from lmlab.models.smear import gather_previous
from lmlab.tokenizers import DialogTokenizer
from lmlab.train.checkpoint import load_run


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class StaticCache:
    """Keys/values of B rows that all hold the same number of tokens (every row advances one token per forward)."""

    def __init__(self, model, batch: int, max_len: int) -> None:
        c = model.cfg
        kvh, hd = c.n_kv_heads or c.n_heads, c.dim // c.n_heads
        self.k = torch.zeros(c.n_layers, batch, kvh, max_len, hd)
        self.v = torch.zeros_like(self.k)
        self.kr = torch.zeros_like(self.k) if c.smear_keys else None  # raw keys, for smeared-key models
        self.t, self.cur, self.batch = 0, 0, batch
        self.positions = torch.zeros(batch, 1, dtype=torch.long)
        self.mask: torch.Tensor | None = None

    def step(self) -> StaticCache:
        """The cache as the next forward sees it: one new token per row, at position ``t``."""
        self.cur, self.t = self.t, self.t + 1
        self.positions = torch.full((self.batch, 1), self.cur, dtype=torch.long)
        self.mask = torch.ones(1, 1, 1, self.t, dtype=torch.bool)
        return self

    def previous_keys(self, layer: int, k: torch.Tensor, n: int) -> torch.Tensor:
        self.kr[layer, :, :, self.cur] = k[:, :, 0]
        return gather_previous(self.kr[layer, :, :, : self.t], self.positions, self.positions, n)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k[layer, :, :, self.cur] = k[:, :, 0]
        self.v[layer, :, :, self.cur] = v[:, :, 0]
        return self.k[layer, :, :, : self.t], self.v[layer, :, :, : self.t]


@torch.no_grad()
def static_answers(model, dtok: DialogTokenizer, questions, tool, batch: int, max_new: int) -> list[Result]:
    """The simple static-batch greedy loop (see the module docstring); Results shaped like the engine's."""
    tok = dtok.tokenizer
    stops = {tok.special_id(s) for s in ("<|end_of_dialog|>", "<|eos|>") if s in tok.special_tokens}
    trigger, begin = tok.special_id(tool.trigger), dtok.begin_id("assistant")
    limit = model.cfg.max_seq_len
    out: list[Result] = []
    for start in range(0, len(questions), batch):
        group = questions[start:start + batch]
        prompts = [dtok.encode_prompt(q.dialog) for q in group]
        seqs = [list(p) for p in prompts]
        pending = [deque(p) for p in prompts]
        sampled, done, calls = [0] * len(group), [False] * len(group), [[] for _ in group]
        reason = [""] * len(group)
        cache = StaticCache(model, len(group), limit)
        while not all(done) and cache.t < limit:
            feed = torch.tensor([[pending[b].popleft() if pending[b] else 0] for b in range(len(group))])
            nxt = model(feed, cache=cache.step())[:, -1].argmax(-1).tolist()
            for b in range(len(group)):
                if done[b] or pending[b]:
                    continue
                t = nxt[b]
                seqs[b].append(t)
                sampled[b] += 1
                if t in stops:
                    done[b], reason[b] = True, "stop"
                elif sampled[b] >= max_new or len(seqs[b]) >= limit:
                    done[b], reason[b] = True, "length"
                elif t == trigger:
                    start_msg = max(i for i, x in enumerate(seqs[b][:-1]) if x == begin) + 1
                    call = tool.extract(tok.decode(seqs[b][start_msg:-1]))
                    try:
                        answer = str(tool(call)) if call is not None else "error: no tool call found"
                    except Exception as e:  # noqa: BLE001 - as the engine: a failing tool answers with the error
                        answer = f"error: {type(e).__name__}: {e}"
                    calls[b].append((call, answer))
                    added = tok.encode(answer) + [begin]
                    seqs[b] += added
                    pending[b].extend([t] + added)
                else:
                    pending[b].append(t)
        for b in range(len(group)):
            new = seqs[b][len(prompts[b]):]
            out.append(Result(start + b, prompts[b], new, reason[b] or "length", tok.decode(new),
                              dtok.decode_dialog(seqs[b]), 0, calls[b]))
    return out


def sampled_tokens(results: list[Result], tok) -> int:
    """Tokens the model generated: everything after the prompt but the inserted tool answers (+ their begin token)."""
    return sum(len(r.tokens) - sum(len(tok.encode(a)) + 1 for _, a in r.tool_calls) for r in results)


@torch.no_grad()
def engine_answers(model, dtok: DialogTokenizer, questions, tool, max_batch: int, max_new: int) -> list[Result]:
    """What ``evaluate_recall`` runs: an engine built for the call, every question submitted at once."""
    engine = Engine.from_config(model, dtok, EngineConfig(max_batch=max_batch, pool_tokens=max_batch * 256),
                                tools=[tool])
    params = SamplingParams(max_new_tokens=max_new, temperature=0)
    return engine.generate([Request(dialog=q.dialog, params=params, id=i) for i, q in enumerate(questions)])


def read_bandwidth_gbps(mib: int = 512, rounds: int = 5) -> float:
    """Memory read bandwidth: the best of ``rounds`` sums over a float32 buffer far larger than the caches."""
    x = torch.ones(mib * 2**20 // 4)
    x.sum()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best / 1e9


def kv_ceiling(model, results: list[Result], gbps: float) -> dict:
    """Keys/values bytes the decode steps read per sampled token (float32, every attention layer, the context each
    sampled token was decoded from: its prompt plus the tokens before it), and the tokens/s that ``gbps`` of reads
    allows at that rate."""
    cfg = model.cfg
    layers = sum(m == "attention" for m in cfg.mixers())
    kv_heads = cfg.n_kv_heads or cfg.n_heads
    per_position = layers * 2 * kv_heads * (cfg.dim // cfg.n_heads) * 4  # bytes of one cached token's keys + values
    contexts, sampled = 0, 0
    for r in results:
        for i, keep in enumerate(r.sampled_mask()):
            if keep:
                contexts += len(r.prompt) + i
                sampled += 1
    per_token = per_position * contexts / max(sampled, 1)
    return {"mean_context": round(contexts / max(sampled, 1), 1), "kv_bytes_per_token": round(per_token),
            "read_gbps": round(gbps, 2), "tokens_per_s": round(gbps * 1e9 / per_token)}


def summarise(name, questions, results, seconds, tok, reference) -> dict:
    recall = sum(judge(q, r, tool_live=True)["correct"] for q, r in zip(questions, results)) / len(questions)
    same = sum(x.tokens == y.tokens for x, y in zip(results, reference)) / len(results)
    gen = sampled_tokens(results, tok)
    row = {"s": round(seconds, 3), "questions_per_s": round(len(questions) / seconds, 1),
           "generated_tokens": gen, "generated_tokens_per_s": round(gen / seconds, 1), "recall": round(recall, 4),
           "same_tokens_as_reference": same}
    log(f"  {name}: {row['questions_per_s']:.1f} questions/s, {row['generated_tokens_per_s']:,.0f} generated "
        f"tokens/s, recall {recall:.3f}, answers equal the reference's on {same:.0%}")
    return row


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", action="append", required=True, help="an in-tool run folder (repeatable)")
    p.add_argument("--questions", type=int, default=1024)
    p.add_argument("--max-batch", default="64,256", help="engine max_batch values")
    p.add_argument("--static-batch", type=int, default=256, help="batch of the static loop (0: skip it)")
    p.add_argument("--max-new-tokens", type=int, default=160)
    p.add_argument("--rounds", type=int, default=1, help="timed repetitions of each variant (median)")
    p.add_argument("--threads", type=int, default=0, help="torch threads of the one-process variants (0: torch's)")
    p.add_argument("--procs", type=lambda x: [int(n) for n in x.split(",")], default=[2],
                   help="process counts of the forked variants (comma-separated; each process one thread), run at "
                        "the last --max-batch; 1: none")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    result: dict = {"bench": "recall_eval", "questions": a.questions, "threads": torch.get_num_threads(),
                    "load_avg_start": os.getloadavg()[0], "runs": {}}
    for run in a.run:
        cfg, model, tokenizer = load_run(run)
        dtok = DialogTokenizer(tokenizer)
        rc = cfg.evals.recall
        pool = [q for s in rc.sets for q in load_questions(s)]
        questions = [pool[i % len(pool)] for i in range(a.questions)]
        tool = build_tool(rc.db)
        log(f"{run}: smear_keys={cfg.model.smear_keys}, {model.num_params():,} params, {len(questions)} questions")
        row: dict = {"run": str(run), "smear_keys": cfg.model.smear_keys, "params": model.num_params()}
        batches = [int(x) for x in a.max_batch.split(",")]
        variants = [(f"engine_b{mb}", mb, 1) for mb in batches]
        variants += [(f"engine_b{batches[-1]}_p{n}", batches[-1], n) for n in a.procs if n > 1]
        variants += [("static", a.static_batch, 1)] if a.static_batch else []
        reference = None
        for name, batch, procs in variants:
            answer = static_answers if name == "static" else engine_answers
            if procs > 1:  # what evals.recall.procs / lmlab eval --procs run: each forked process answers a share
                def answer(model, dtok, qs, tool, batch, max_new, procs=procs):
                    return fork_map(qs, lambda mine: engine_answers(model, dtok, mine, tool, batch, max_new), procs)
            answer(model, dtok, questions[:batch], tool, batch, a.max_new_tokens)  # warm-up
            times, results = [], None
            for _ in range(a.rounds):
                t0 = time.perf_counter()
                results = answer(model, dtok, questions, tool, batch, a.max_new_tokens)
                times.append(time.perf_counter() - t0)
            reference = reference or results
            row[name] = summarise(name, questions, results, statistics.median(times), tokenizer, reference)
        row["kv_ceiling"] = kv_ceiling(model, reference, read_bandwidth_gbps())
        log(f"  ceiling: {row['kv_ceiling']['kv_bytes_per_token']:,} bytes of keys/values read per generated token "
            f"(mean context {row['kv_ceiling']['mean_context']}) at {row['kv_ceiling']['read_gbps']} GB/s of reads: "
            f"<= {row['kv_ceiling']['tokens_per_s']:,} generated tokens/s")
        result["runs"][Path(run).name] = row
    result["load_avg_end"] = os.getloadavg()[0]
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
