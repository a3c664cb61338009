"""Training throughput, lmlab's Llama vs Hugging Face ``LlamaForCausalLM`` (SDPA), side by side in one process.

Both models get the same shape, the same weights (lmlab's state dict loaded into HF through ``lmlab.hf``; the
logits are checked equal), the same batches and the same AdamW (foreach). One training step = forward +
cross-entropy + backward + AdamW step. Four variants are timed: lmlab and HF, each eager and under
``torch.compile``. Warmup steps are excluded (the compiled variants compile there; the first step's time is
reported as the compile time, from a fresh inductor cache unless ``--warm-compile-cache``, after inductor's
one-time setup has been paid on a tiny function, reported apart).

Noise control (these machines are shared and noisy, often by +-30% from one minute to the next):
- the variants run in interleaved rounds, one short block of steps each, in a rotating order;
- each round also measures the float32 matmul ceiling (a 2048^3 ``torch.mm``), so GFLOP/s and MFU are taken
  against the ceiling of the same minutes;
- a block during which *other* processes took more than ``--max-others`` of the cpus (from /proc/stat) is run
  again, at most ``--retries`` times; re-runs and the cpu share others took are reported;
- figures are medians over blocks, each ratio the median of its per-round ratios (with the min-max range);
  the fastest single step of each variant is reported too (``best``).

Achieved GFLOP/s use ``model.flops_per_token(seq_len)`` (6N + 12 L dim T, attention counted as a full square).
One lmlab and one HF eager step are also split into forward (with the loss) / backward / optimizer, the two
models alternating step by step. ``--profile`` prints torch.profiler's top ops of one step of each eager model.

Targets (from the issue): lmlab eager >= HF eager, and compiled lmlab >= 1.3 x HF eager; the JSON says whether
the median ratios meet them. Human-readable lines go to stdout (progress to stderr); the last stdout line is ONE
JSON object.

Usage::

    .venv/bin/python bench/train_throughput.py                       # full run, default shape (~5 minutes)
    .venv/bin/python bench/train_throughput.py --quick --no-compile  # smoke test, ~30 s
    .venv/bin/python bench/train_throughput.py --dim 512 --n-layers 8 --batch 8 --rounds 12
    .venv/bin/python bench/train_throughput.py --wait-idle 300       # wait for a quiet machine first
    .venv/bin/python bench/train_throughput.py --compile-mode max-autotune --profile
    .venv/bin/python bench/train_throughput.py | tail -1 | python -m json.tool

Check ``uptime`` first: on a 2-core machine another busy process makes every figure meaningless; the load
average at start and end is recorded in the JSON.
"""

from __future__ import annotations

import argparse
import copy
import gc
import hashlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.config import InitConfig, ModelConfig
from lmlab.hf import model_config_to_hf, to_hf_state_dict
from lmlab.models import build_model

TARGET_EAGER = 1.0  # lmlab eager / HF eager
TARGET_COMPILED = 1.3  # compiled lmlab / HF eager


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    g = p.add_argument_group("shape")
    g.add_argument("--dim", type=int, default=256, help="model width")
    g.add_argument("--n-layers", type=int, default=4, help="transformer blocks")
    g.add_argument("--n-heads", type=int, default=4, help="query heads")
    g.add_argument("--n-kv-heads", type=int, default=None, help="key/value heads (GQA); default: n_heads")
    g.add_argument("--ffn", type=int, default=768, help="SwiGLU hidden size")
    g.add_argument("--vocab", type=int, default=256, help="vocabulary size")
    g.add_argument("--seq", type=int, default=256, help="tokens per row")
    g.add_argument("--batch", type=int, default=16, help="rows per step")
    g.add_argument("--tie-embeddings", action="store_true", help="share embedding and output head")
    t = p.add_argument_group("timing")
    t.add_argument("--warmup", type=int, default=3, help="untimed steps per variant (compilation happens here)")
    t.add_argument("--steps", type=int, default=2, help="timed steps per block")
    t.add_argument("--rounds", type=int, default=10, help="rounds; each runs one block of every variant")
    t.add_argument("--split-steps", type=int, default=6, help="steps of each eager model timed phase by phase")
    t.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    t.add_argument("--compile-mode", default=None, help="torch.compile mode (default: torch's default)")
    t.add_argument("--warm-compile-cache", action="store_true",
                   help="reuse inductor's on-disk cache (default: a fresh temporary one: cold compile times)")
    t.add_argument("--quick", action="store_true", help="smoke test: warmup 1, 1 step x 2 rounds, 2 split steps")
    t.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    t.add_argument("--wait-idle", type=float, default=0.0, metavar="S",
                   help="first wait up to S seconds for a 5 s window where other processes use < 10%% of the cpus")
    t.add_argument("--max-others", type=float, default=0.10, metavar="F",
                   help="re-run a timed block if other processes took more than this fraction of the cpus")
    t.add_argument("--retries", type=int, default=3, help="re-runs allowed per contended block")
    t.add_argument("--profile", action="store_true", help="print torch.profiler top ops of one eager step each")
    o = p.add_argument_group("optimizer")
    o.add_argument("--lr", type=float, default=1e-3)
    o.add_argument("--weight-decay", type=float, default=0.1)
    o.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.quick:
        a.warmup, a.steps, a.rounds, a.split_steps = 1, 1, 2, 2
    if min(a.warmup, a.steps, a.rounds, a.split_steps) < 1:
        p.error("--warmup, --steps, --rounds and --split-steps must be >= 1")
    return a


# ---------------------------------------------------------------- models, data, steps


def build_pair(a: argparse.Namespace):
    """The lmlab model and an HF LlamaForCausalLM holding the same weights; checked to give the same logits."""
    import transformers

    cfg = ModelConfig(
        vocab_size=a.vocab, dim=a.dim, n_layers=a.n_layers, n_heads=a.n_heads, n_kv_heads=a.n_kv_heads,
        hidden_dim=a.ffn, max_seq_len=max(a.seq, 2048), tie_embeddings=a.tie_embeddings, init=InitConfig(),
    )
    ours = build_model(cfg, seed=a.seed)
    skip = ("architectures", "model_type", "torch_dtype")  # config.json keys, not LlamaConfig arguments
    hf_kw = {k: v for k, v in model_config_to_hf(cfg).items() if k not in skip}
    hf_cfg = transformers.LlamaConfig(**hf_kw, attn_implementation="sdpa")
    hf_cfg.use_cache = False  # training: no KV cache to build (what a user training HF would set)
    hf = transformers.LlamaForCausalLM(hf_cfg)
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(ours.state_dict(), cfg), strict=False)
    allowed = {"lm_head.weight"} if cfg.tie_embeddings else set()
    if unexpected or set(missing) - allowed:
        raise RuntimeError(f"weights do not map onto HF: missing {missing}, unexpected {unexpected}")
    if cfg.tie_embeddings:
        hf.tie_weights()
    if hf.config._attn_implementation != "sdpa":
        raise RuntimeError(f"HF attention is {hf.config._attn_implementation!r}, wanted 'sdpa'")
    x = torch.randint(0, a.vocab, (2, min(a.seq, 64)), generator=torch.Generator().manual_seed(a.seed + 1))
    with torch.no_grad():
        diff = (ours(x) - hf(input_ids=x, use_cache=False).logits).abs().max().item()
    if diff > 1e-4:
        raise RuntimeError(f"lmlab and HF logits differ by {diff:.2e} on the same weights")
    return cfg, ours, hf, diff


def make_batches(a: argparse.Namespace, n: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` fixed (inputs, targets) batches of random token ids, the same for every variant."""
    g = torch.Generator().manual_seed(a.seed + 2)
    out = []
    for _ in range(n):
        row = torch.randint(0, a.vocab, (a.batch, a.seq + 1), generator=g)
        out.append((row[:, :-1].contiguous(), row[:, 1:].contiguous()))
    return out


def logits_fn(model: nn.Module, is_hf: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    if is_hf:
        return lambda x: model(input_ids=x, use_cache=False).logits
    return lambda x: model(x)


class Variant:
    """One model + its own AdamW + its own copy of the initial weights; ``step()`` is one training step."""

    def __init__(self, name: str, model: nn.Module, is_hf: bool, compiled: bool, a: argparse.Namespace):
        self.name, self.is_hf, self.compiled = name, is_hf, compiled
        self.model = copy.deepcopy(model).train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=a.lr, betas=(0.9, 0.95), eps=1e-8,
                                     weight_decay=a.weight_decay, foreach=True)
        run = torch.compile(self.model, mode=a.compile_mode) if compiled else self.model
        self.logits = logits_fn(run, is_hf)
        self.vocab = a.vocab
        self.first_step_s = float("nan")
        self.losses: list[float] = []
        self.block_tps: list[float] = []
        self.step_s: list[float] = []

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.logits(x).reshape(-1, self.vocab), y.reshape(-1))

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss(x, y)
        loss.backward()
        self.opt.step()
        return loss.item()


# ---------------------------------------------------------------- measurements


class CpuShare:
    """Fraction of the machine's CPU time used by *other* processes between ``start()`` and ``stop()``.

    Reads /proc/stat (all CPUs) and /proc/self/stat (this process); None where /proc is missing. A figure
    well above 0 means another process competed for the cores and the timings of that span are suspect.
    """

    def __init__(self):
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.t0 = self.busy0 = self.own0 = None

    @staticmethod
    def _busy() -> int:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v) - v[3] - (v[4] if len(v) > 4 else 0)  # all minus idle and iowait

    @staticmethod
    def _own() -> int:
        with open("/proc/self/stat") as f:
            v = f.read().rsplit(")", 1)[1].split()
        return int(v[11]) + int(v[12])  # utime + stime (fields 14 and 15)

    def start(self) -> None:
        try:
            self.t0, self.busy0, self.own0 = time.perf_counter(), self._busy(), self._own()
        except (OSError, ValueError, IndexError):
            self.t0 = None

    def stop(self) -> float | None:
        if self.t0 is None:
            return None
        wall = time.perf_counter() - self.t0
        others = (self._busy() - self.busy0) - (self._own() - self.own0)
        return max(0.0, others / self.tick / (wall * (os.cpu_count() or 1)))


def contended(fn: Callable[[], object], what: str, max_others: float, retries: int) -> tuple[object, float | None, int]:
    """Run ``fn``; run it again (up to ``retries`` times) while other processes took > ``max_others`` of the cpus.

    Returns (fn's result, the others' cpu share during the kept run, the number of re-runs).
    """
    for attempt in range(retries + 1):
        gc.collect()
        share = CpuShare()
        share.start()
        out = fn()
        other = share.stop()
        if other is None or other <= max_others or attempt == retries:
            return out, other, attempt
        log(f"  {what}: other processes took {100 * other:.0f}% of the cpus; running it again")
        time.sleep(2.0)
    raise AssertionError("unreachable")


def matmul_gflops(n: int = 2048, reps: int = 3, dtype: torch.dtype = torch.float32) -> float:
    """Best GFLOP/s of ``reps`` n x n x n matmuls in ``dtype`` (after one warmup): the machine's practical ceiling."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    out = torch.empty(n, n, dtype=dtype)
    torch.mm(a, b, out=out)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def compile_setup() -> float:
    """Seconds to compile a tiny forward + backward: inductor's one-time costs (C++ header, compile workers).

    Paid here, they do not land on whichever model happens to compile first.
    """
    lin = nn.Linear(8, 8)
    fn = torch.compile(lambda x: F.silu(lin(x)).sum())
    t0 = time.perf_counter()
    fn(torch.randn(4, 8, requires_grad=True)).backward()
    return time.perf_counter() - t0


def run_block(v: Variant, batches, first: int, steps: int) -> list[float]:
    """Seconds of each of ``steps`` consecutive training steps."""
    out = []
    for s in range(steps):
        t0 = time.perf_counter()
        v.step(*batches[(first + s) % len(batches)])
        out.append(time.perf_counter() - t0)
    return out


def split_steps(variants: list[Variant], batches, n: int) -> dict[str, dict[str, float]]:
    """Median ms of forward (with the loss), backward and optimizer; the variants alternate step by step."""
    times = {v.name: {"forward": [], "backward": [], "optimizer": []} for v in variants}
    for i in range(n):
        x, y = batches[i % len(batches)]
        for v in variants if i % 2 == 0 else variants[::-1]:
            v.opt.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            loss = v.loss(x, y)
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
            v.opt.step()
            t3 = time.perf_counter()
            d = times[v.name]
            d["forward"].append(t1 - t0), d["backward"].append(t2 - t1), d["optimizer"].append(t3 - t2)
    out = {}
    for name, d in times.items():
        ms = {k: round(1e3 * statistics.median(s), 1) for k, s in d.items()}
        ms["total"] = round(sum(ms.values()), 1)
        out[name] = ms
    return out


def profile_step(v: Variant, batches, top: int = 15) -> None:
    from torch.profiler import ProfilerActivity, profile

    v.step(*batches[0])
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        v.step(*batches[1])
    print(f"\n== torch.profiler: one {v.name} step, top {top} ops by self CPU time ==", file=sys.stderr)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top), file=sys.stderr)


def wait_idle(limit_s: float, window_s: float = 5.0, max_frac: float = 0.10) -> dict[str, float | bool | None]:
    """Sleep in ``window_s`` windows until other processes use < ``max_frac`` of the cpus (or ``limit_s`` passes)."""
    share, t0 = CpuShare(), time.perf_counter()
    while True:
        share.start()
        time.sleep(window_s)
        frac = share.stop()
        waited = time.perf_counter() - t0
        if frac is None or frac < max_frac or waited >= limit_s:
            return {"waited_s": round(waited, 1), "idle": frac is not None and frac < max_frac,
                    "others_frac": None if frac is None else round(frac, 3)}
        log(f"waiting for the cpus: other processes use {100 * frac:.0f}% ({waited:.0f}/{limit_s:.0f} s)")


def file_sha(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    except OSError:
        return "unreadable"


def spread(xs: list[float], nd: int = 3) -> dict[str, float]:
    return {"median": round(statistics.median(xs), nd), "min": round(min(xs), nd), "max": round(max(xs), nd)}


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    waited = wait_idle(a.wait_idle) if a.wait_idle > 0 else None
    load_start = os.getloadavg()
    log(f"load average at start: {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f} "
        f"on {os.cpu_count()} cpus, torch threads {torch.get_num_threads()}")

    import transformers

    import lmlab.models.transformer as tf_mod

    cfg, ours, hf, logit_diff = build_pair(a)
    flops_tok = ours.flops_per_token(a.seq)
    tokens_per_step = a.batch * a.seq
    batches = make_batches(a)
    log(f"{ours.num_params() / 1e6:.2f}M params, {flops_tok / 1e6:.1f} MFLOP/token, "
        f"{tokens_per_step} tokens/step, lmlab-vs-HF max logit diff {logit_diff:.1e}")

    cache_dir = None
    if not a.no_compile and not a.warm_compile_cache:  # cold compile times: nothing reused from earlier runs
        cache_dir = tempfile.mkdtemp(prefix="bench_inductor_")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
    setup_s = None
    if not a.no_compile:
        setup_s = compile_setup()
        log(f"compile setup (a tiny function; one-time costs): {setup_s:.1f} s")
    variants = [Variant("lmlab_eager", ours, False, False, a), Variant("hf_eager", hf, True, False, a)]
    if not a.no_compile:
        variants += [Variant("lmlab_compiled", ours, False, True, a), Variant("hf_compiled", hf, True, True, a)]
    by_name = {v.name: v for v in variants}

    # Warmup, excluded from timing; the first step of a compiled variant is its compile time.
    for v in variants:
        for i in range(a.warmup):
            t0 = time.perf_counter()
            v.losses.append(v.step(*batches[i % len(batches)]))
            if i == 0:
                v.first_step_s = time.perf_counter() - t0
        log(f"warmup {v.name}: first step {v.first_step_s:.2f} s, loss {v.losses[0]:.4f}")
    ref_loss = variants[0].losses[0]  # same weights + same data: the first losses agree
    first_loss_diff = max(abs(v.losses[0] - ref_loss) for v in variants)

    # Timed rounds: the matmul ceiling, then one block of each variant, in a rotating order.
    per_round: list[dict[str, float]] = []
    ceilings: list[float] = []
    others: list[float] = []
    reruns = 0
    for r in range(a.rounds):
        ceil, other, n = contended(matmul_gflops, "matmul ceiling", a.max_others, a.retries)
        ceilings.append(ceil)
        reruns += n
        rates = {}
        for v in variants[r % len(variants):] + variants[: r % len(variants)]:
            secs, other, n = contended(lambda v=v, r=r: run_block(v, batches, r * a.steps, a.steps),
                                       f"{v.name} block", a.max_others, a.retries)
            reruns += n
            rates[v.name] = a.steps * tokens_per_step / sum(secs)
            v.block_tps.append(rates[v.name])
            v.step_s.extend(secs)
            if other is not None:
                others.append(other)
        per_round.append(rates)
        log(f"round {r + 1}/{a.rounds}: ceiling {ceil:.0f} GFLOP/s; "
            + ", ".join(f"{n} {t:,.0f}" for n, t in rates.items()) + " tokens/s")

    eager = [by_name["lmlab_eager"], by_name["hf_eager"]]
    split = split_steps(eager, batches, a.split_steps)
    if a.profile:
        for v in eager:
            profile_step(v, batches)
    load_end = os.getloadavg()
    if cache_dir:
        shutil.rmtree(cache_dir, ignore_errors=True)

    # ------------------------------------------------------------ results
    ceiling = statistics.median(ceilings)

    def paired(num: str, den: str) -> dict[str, float] | None:
        if num not in by_name or den not in by_name:
            return None
        out = spread([r[num] / r[den] for r in per_round])
        out["best"] = round(min(by_name[den].step_s) / min(by_name[num].step_s), 3)  # fastest step vs fastest step
        return out

    variants_out = {}
    for v in variants:
        tps = statistics.median(v.block_tps)
        gflops = tps * flops_tok / 1e9
        best = tokens_per_step / min(v.step_s)
        variants_out[v.name] = {
            "tokens_per_s": round(tps), "tokens_per_s_min": round(min(v.block_tps)),
            "tokens_per_s_max": round(max(v.block_tps)), "tokens_per_s_best_step": round(best),
            "ms_per_step": round(1e3 * tokens_per_step / tps, 1), "gflops": round(gflops, 1),
            "mfu": round(gflops / ceiling, 3), "mfu_per_round": spread(
                [r[v.name] * flops_tok / 1e9 / c for r, c in zip(per_round, ceilings)]),
            "first_step_s": round(v.first_step_s, 2),
        }
    ratios = {"lmlab_over_hf_eager": paired("lmlab_eager", "hf_eager"),
              "lmlab_compiled_over_hf_eager": paired("lmlab_compiled", "hf_eager"),
              "lmlab_compiled_over_hf_compiled": paired("lmlab_compiled", "hf_compiled"),
              "hf_compiled_over_hf_eager": paired("hf_compiled", "hf_eager"),
              "lmlab_compiled_over_lmlab_eager": paired("lmlab_compiled", "lmlab_eager")}

    def target(r: dict | None, goal: float) -> dict | None:
        return None if r is None else {"target": goal, "ratio": r["median"], "met": r["median"] >= goal}

    targets = {"lmlab_eager_ge_hf_eager": target(ratios["lmlab_over_hf_eager"], TARGET_EAGER),
               "lmlab_compiled_ge_1.3x_hf_eager": target(ratios["lmlab_compiled_over_hf_eager"], TARGET_COMPILED)}
    result = {
        "bench": "train_throughput",
        "shape": {"dim": a.dim, "n_layers": a.n_layers, "n_heads": a.n_heads, "n_kv_heads": a.n_kv_heads or a.n_heads,
                  "ffn": a.ffn, "vocab": a.vocab, "seq": a.seq, "batch": a.batch, "tie_embeddings": a.tie_embeddings,
                  "dtype": "float32", "device": "cpu", "params": ours.num_params(),
                  "flops_per_token": flops_tok, "tokens_per_step": tokens_per_step},
        "timing": {"warmup": a.warmup, "steps_per_block": a.steps, "rounds": a.rounds, "quick": a.quick,
                   "statistic": "median over blocks; ratios: median of per-round ratios, best: fastest steps"},
        "optimizer": {"name": "AdamW", "foreach": True, "lr": a.lr, "betas": [0.9, 0.95],
                      "weight_decay": a.weight_decay},
        "variants": variants_out,
        "ratios": ratios,
        "targets": targets,
        "compile_s": {**{v.name: round(v.first_step_s, 1) for v in variants if v.compiled},
                      **({"one_time_setup": round(setup_s, 1)} if setup_s is not None else {})},
        "compile_mode": a.compile_mode or "default",
        "compile_cache": "warm (inductor's on-disk cache)" if a.warm_compile_cache else "cold (fresh temporary cache)",
        "split_ms": split,
        "matmul_ceiling_gflops": {**spread(ceilings, 1), "n": 2048, "per": "round"},
        "checks": {"max_logit_diff": logit_diff, "first_loss_max_diff": first_loss_diff,
                   "first_loss": round(ref_loss, 5)},
        "torch": torch.__version__, "transformers": transformers.__version__,
        "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "load_avg_start": [round(x, 2) for x in load_start], "load_avg_end": [round(x, 2) for x in load_end],
        "wait_idle": waited,
        "other_processes_cpu_frac": (
            {"median": round(statistics.median(others), 3), "max": round(max(others), 3),
             "blocks_over_limit": sum(o > a.max_others for o in others), "limit": a.max_others,
             "reruns": reruns} if others else None
        ),
        "lmlab_transformer_sha": file_sha(Path(tf_mod.__file__)),
        "hf_use_cache": False,
    }

    print(f"shape {a.dim}d x {a.n_layers}L, {a.n_heads} heads, ffn {a.ffn}, vocab {a.vocab}, "
          f"batch {a.batch} x seq {a.seq}, float32, {torch.get_num_threads()} threads, torch {torch.__version__}")
    oth = result["other_processes_cpu_frac"] or {}
    print(f"matmul ceiling {ceiling:.1f} GFLOP/s (rounds {min(ceilings):.0f}-{max(ceilings):.0f}); load "
          f"{load_start[0]:.2f} -> {load_end[0]:.2f}; other processes took {100 * oth.get('median', 0):.0f}% "
          f"of the cpus in the median block ({reruns} re-runs, {oth.get('blocks_over_limit', 0)} blocks kept "
          f"over {100 * a.max_others:.0f}%)")
    for n, v in variants_out.items():
        print(f"  {n:16s} {v['tokens_per_s']:>7,} tokens/s ({v['tokens_per_s_min']:,}-{v['tokens_per_s_max']:,}, "
              f"best step {v['tokens_per_s_best_step']:,})  {v['ms_per_step']:7.1f} ms/step  "
              f"{v['gflops']:6.1f} GFLOP/s  MFU {v['mfu']:.2f}  first step {v['first_step_s']:.1f} s")
    for n, r in ratios.items():
        if r:
            print(f"  {n:34s} {r['median']:.3f}  (rounds {r['min']:.3f}-{r['max']:.3f}; best steps {r['best']:.3f})")
    for n, s in split.items():
        print(f"  split {n:12s} forward {s['forward']:.1f} ms, backward {s['backward']:.1f} ms, "
              f"optimizer {s['optimizer']:.1f} ms")
    for n, t in targets.items():
        if t:
            print(f"  target {n}: ratio {t['ratio']:.3f} vs {t['target']} -> {'MET' if t['met'] else 'NOT met'}")
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
