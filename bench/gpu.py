"""GPU benchmarks on one CUDA device, each side by side with what a user would pick instead, in one process.

1. ``ceiling``: the device's bf16 matmul rate (an 8192^3 ``torch.mm``, mean of 10 after 3 warm-ups), the ceiling
   MFU is also read against (beside the datasheet's dense bf16 peak from lmlab's device table).
2. ``train``: one training step (forward + cross-entropy + backward + AdamW, fused) under bf16 autocast with float32
   weights, lmlab's Llama vs HF ``LlamaForCausalLM`` (SDPA) on the same weights and batches, eager and under
   ``torch.compile``; tokens/s, achieved TFLOP/s (``flops_per_token``: 6N + attention) and MFU. Variants alternate
   in blocks of steps over rounds (medians); CUDA is synchronised around each block.
3. ``trainer``: ``lmlab train`` itself (data loader, schedule, clipping, logging, compile) for a few dozen steps at
   the same shape with a byte vocabulary, on random bytes: the tokens/s and MFU that its metrics log.
4. ``generate``: the engine vs HF ``generate`` (left padding, dynamic cache) at 1 / 64 / 256 requests, greedy, 128
   new tokens, float32 weights (outputs compared request by request: a ratio only where they all agree) and bf16
   weights (agreement reported, not required: the libraries' bf16 kernels round differently).

Usage (on a GPU box; the last stdout line is one JSON object)::

    python bench/gpu.py                      # ~5 minutes on an H200
    python bench/gpu.py --only train,generate --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate import bench_throughput  # noqa: E402
from generate import build as build_generation_pair  # noqa: E402
from train_throughput import build_pair, logits_fn, make_batches  # noqa: E402

from lmlab.monitor.metrics import read_metrics  # noqa: E402
from lmlab.monitor.profiler import device_peak_flops  # noqa: E402


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default="ceiling,train,trainer,generate", help="parts to run, comma-separated")
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--n-layers", type=int, default=12)
    p.add_argument("--n-heads", type=int, default=12)
    p.add_argument("--ffn", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=5, help="timed steps per block")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--trainer-steps", type=int, default=60)
    p.add_argument("--gen-batches", default="1,64,256")
    p.add_argument("--gen-layers", type=int, default=12, help="layers of the generation model (width --dim)")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", default=None, help="also write the JSON here after each part (a run cut short keeps "
                   "what it measured)")
    a = p.parse_args(argv)
    a.n_kv_heads, a.tie_embeddings, a.lr, a.weight_decay = None, False, 1e-3, 0.1
    return a


def sync_time(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def bf16_ceiling(n: int = 8192, reps: int = 10) -> float:
    x = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        x @ y
    return 2 * n**3 * reps / sync_time(lambda: [x @ y for _ in range(reps)])


class GpuVariant:
    """One model on the GPU with its own fused AdamW; ``step`` runs one bf16-autocast training step."""

    def __init__(self, name, model, is_hf, compiled, a):
        self.name = name
        self.model = model.to("cuda").train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=a.lr, betas=(0.9, 0.95), weight_decay=a.weight_decay,
                                     fused=True)
        self.logits = logits_fn(torch.compile(self.model) if compiled else self.model, is_hf)
        self.vocab, self.first_step_s, self.losses, self.tps = a.vocab, float("nan"), [], []

    def step(self, x, y) -> None:
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = self.logits(x)
        loss = F.cross_entropy(logits.float().reshape(-1, self.vocab), y.reshape(-1))
        loss.backward()
        self.opt.step()
        self.losses.append(loss.detach())


def bench_train(a, peak: float, ceiling: float | None) -> dict:
    import copy

    cfg, ours, hf, diff = build_pair(a)  # on CPU, float32: logits checked equal
    flops_tok = ours.flops_per_token(a.seq)
    batches = [(x.cuda(), y.cuda()) for x, y in make_batches(a)]
    specs = [("lmlab_eager", ours, False, False), ("hf_eager", hf, True, False)]
    if not a.no_compile:
        specs += [("lmlab_compiled", ours, False, True), ("hf_compiled", hf, True, True)]
    variants = [GpuVariant(n, copy.deepcopy(m), is_hf, c, a) for n, m, is_hf, c in specs]
    for v in variants:
        v.first_step_s = sync_time(lambda v=v: v.step(*batches[0]))
        for i in range(1, a.warmup):
            v.step(*batches[i % len(batches)])
        log(f"warmup {v.name}: first step {v.first_step_s:.1f} s, loss {v.losses[0].item():.4f}")
    first = [v.losses[0].item() for v in variants]
    tokens = a.steps * a.batch * a.seq
    for r in range(a.rounds):
        for v in variants[r % len(variants):] + variants[: r % len(variants)]:
            dt = sync_time(lambda v=v: [v.step(*batches[i % len(batches)]) for i in range(a.steps)])
            v.tps.append(tokens / dt)
        log(f"round {r + 1}: " + ", ".join(f"{v.name} {v.tps[-1]:,.0f}" for v in variants) + " tokens/s")
    out = {"params": ours.num_params(), "flops_per_token": flops_tok, "tokens_per_step": a.batch * a.seq,
           "max_logit_diff_cpu": diff, "first_loss_spread": max(first) - min(first), "variants": {}}
    for v in variants:
        tps = statistics.median(v.tps)
        out["variants"][v.name] = {
            "tokens_per_s": round(tps), "tflops": round(tps * flops_tok / 1e12, 1),
            "mfu": round(tps * flops_tok / peak, 3) if peak else None,
            "of_measured_ceiling": round(tps * flops_tok / ceiling, 3) if ceiling else None,
            "first_step_s": round(v.first_step_s, 2), "rounds_tokens_per_s": [round(x) for x in v.tps]}
    tps = {n: r["tokens_per_s"] for n, r in out["variants"].items()}
    out["lmlab_over_hf_eager"] = round(tps["lmlab_eager"] / tps["hf_eager"], 3)
    if "lmlab_compiled" in tps:
        out["lmlab_compiled_over_hf_compiled"] = round(tps["lmlab_compiled"] / tps["hf_compiled"], 3)
    for n, r in out["variants"].items():
        print(f"train {n}: {r['tokens_per_s']:,} tokens/s, {r['tflops']} TFLOP/s, MFU {r['mfu']}, "
              f"first step {r['first_step_s']} s", flush=True)
    del variants
    torch.cuda.empty_cache()
    return out


def bench_trainer(a) -> dict:
    """``lmlab train`` at the same shape (byte vocabulary) on random bytes; what its metrics log."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "bytes.txt"
        g = torch.Generator().manual_seed(a.seed)
        data.write_text("".join(chr(c) for c in torch.randint(32, 127, (4_000_000,), generator=g).tolist()))
        config = Path(tmp) / "base.yaml"
        config.write_text("name: gpu\n")
        for compiled in ([False] if a.no_compile else [False, True]):
            name = "compiled" if compiled else "eager"
            args = [f"name={name}", f"runs_dir={tmp}/runs", f"data.train_files=[{data}]", "data.val_fraction=0",
                    f"model.dim={a.dim}", f"model.n_layers={a.n_layers}", f"model.n_heads={a.n_heads}",
                    f"model.hidden_dim={a.ffn}", f"model.max_seq_len={a.seq}", f"data.seq_len={a.seq}",
                    f"data.batch_size={a.batch}", f"train.steps={a.trainer_steps}", "train.log_every=10",
                    "train.device=cuda", f"train.compile={str(compiled).lower()}", "logging.progress=false",
                    "data.prefetch=thread"]
            t0 = time.perf_counter()
            p = subprocess.run([sys.executable, "-m", "lmlab.cli", "train", str(config), *args], capture_output=True,
                               text=True)
            wall = time.perf_counter() - t0
            if p.returncode:
                out[name] = {"error": p.stderr[-2000:]}
                log(f"trainer {name} failed:\n{p.stderr[-2000:]}")
                continue
            rows = [r for r in read_metrics(Path(tmp) / "runs" / name / "metrics.jsonl") if "mfu" in r]
            last = rows[-3:]  # past compilation and warm-up
            out[name] = {"tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in last)),
                         "mfu": round(statistics.median(r["mfu"] for r in last), 3),
                         "peak_mem_mb": round(max(r.get("peak_mem_mb", 0) for r in last)),
                         "loss_first": rows[0]["loss"], "loss_last": rows[-1]["loss"], "wall_s": round(wall, 1)}
            print(f"trainer {name}: {out[name]['tokens_per_s']:,} tokens/s, MFU {out[name]['mfu']} "
                  f"(lmlab train's own metrics, last 3 log windows), {wall:.0f} s in all", flush=True)
    return out


def bench_generate(a) -> dict:
    ns = SimpleNamespace(dim=a.dim, n_layers=a.gen_layers, n_heads=a.n_heads, ffn=a.ffn, batches=a.gen_batches,
                         new_tokens=a.new_tokens, rounds=2)
    ours, hf, tok = build_generation_pair(ns)
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        ours, hf = ours.to("cuda", dtype), hf.to("cuda", dtype)
        name = str(dtype).removeprefix("torch.")
        print(f"generate, {name} weights:", flush=True)
        out[name] = bench_throughput(ns, ours, hf, tok)
        out[name].pop("targets", None)
    return out


def main(argv=None) -> dict:
    a = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench/gpu.py needs a CUDA device")
    parts = set(a.only.split(","))
    dev = torch.device("cuda")
    peak, source = device_peak_flops(dev)
    res = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__, "peak_flops": peak,
           "peak_source": source, "shape": {k: getattr(a, k) for k in ("dim", "n_layers", "n_heads", "ffn", "vocab",
                                                                         "seq", "batch")}}
    ceiling = None
    if "ceiling" in parts:
        ceiling = bf16_ceiling()
        res["bf16_matmul_ceiling_tflops"] = round(ceiling / 1e12, 1)
        print(f"bf16 matmul 8192^3: {ceiling / 1e12:.0f} TFLOP/s (table peak {peak / 1e12:.0f})", flush=True)
    for part, fn in (("train", lambda: bench_train(a, peak, ceiling)), ("trainer", lambda: bench_trainer(a)),
                     ("generate", lambda: bench_generate(a))):
        if part in parts:
            t0 = time.perf_counter()
            try:
                res[part] = fn()
            except Exception as e:  # noqa: BLE001  (one part failing must not lose the others' figures)
                res[part] = {"error": f"{type(e).__name__}: {e}"}
                log(f"{part} failed: {type(e).__name__}: {e}")
            res.setdefault("part_s", {})[part] = round(time.perf_counter() - t0, 1)
            log(f"{part}: {res['part_s'][part]:.0f} s")
            if a.json_out:
                Path(a.json_out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
