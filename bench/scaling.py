"""Scaling on PyTorch's distributed stack (CPU, gloo): one process vs 2 processes under DDP and FSDP2.

For each setting the same model and global batch train through lmlab's Trainer (``torchrun`` starts the
processes; one process runs plainly): training tokens/s of the job and per process (warmup steps excluded),
the parameter + gradient + optimizer-state memory each rank holds (summed over the tensors it owns: FSDP2 keeps
a shard of each, DDP a full copy), and the time to save and to load a checkpoint (DCP) against its size.

On a machine with fewer cores than processes x threads the processes share cores: the job's tokens/s then says
what sharding costs in communication, not what a second device would add. Check ``nproc`` and ``uptime``.
The last stdout line is ONE JSON object.

Usage::

    .venv/bin/python bench/scaling.py                          # dim 256, 4 layers, ~2 minutes
    .venv/bin/python bench/scaling.py --dim 128 --steps 10     # quick
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {  # name: (processes, overrides)
    "single": (1, []),
    "ddp2": (2, ["parallel.dp_replicate=2", "parallel.dp_shard=1"]),
    "fsdp2": (2, ["parallel.dp_shard=2"]),
}


def owned_bytes(tensors) -> int:
    """Bytes of the local part of each tensor (a DTensor's shard; a plain tensor whole)."""
    total = 0
    for t in tensors:
        if t is None:
            continue
        local = t.to_local() if hasattr(t, "to_local") else t
        total += local.numel() * local.element_size()
    return total


def worker(args: argparse.Namespace) -> None:
    from lmlab.config import load_config
    from lmlab.train import Trainer

    overrides = json.loads(args.overrides)
    cfg = load_config(None, overrides)
    trainer = Trainer(cfg)
    with trainer.train_loader:
        for _ in range(args.warmup):
            trainer.train_step()
        t0 = time.perf_counter()
        positions = 0
        for _ in range(args.steps):
            positions += trainer.train_step()["positions"]
        dt = time.perf_counter() - t0
    params = list(trainer.model.parameters())
    opt_state = [v for st in trainer.optimizer.state.values() for v in st.values() if torch.is_tensor(v) and v.ndim]
    mem = {"params": owned_bytes(params), "grads": owned_bytes(p.grad for p in params),
           "optimizer": owned_bytes(opt_state)}
    t0 = time.perf_counter()
    path = trainer.save()
    save_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    trainer.ckpt.load(path, trainer.model, trainer.optimizer)
    load_s = time.perf_counter() - t0
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    if trainer.rank == 0:
        print("RESULT " + json.dumps({
            "world_size": trainer.world_size, "parallel": trainer.par.describe(),
            "tokens_per_s": positions / dt, "tokens_per_s_per_process": positions / dt / trainer.world_size,
            "step_ms": 1000 * dt / args.steps, "mem_bytes_rank0": mem, "mem_total_rank0": sum(mem.values()),
            "ckpt_save_s": save_s, "ckpt_load_s": load_s, "ckpt_bytes": size,
            "num_params": trainer.model.num_params()}), flush=True)


def run(name: str, args: argparse.Namespace, workdir: Path) -> dict:
    nproc, extra = SETTINGS[name]
    corpus = workdir / "corpus.txt"
    overrides = [f"name={name}", f"runs_dir={workdir / 'runs'}", f"data.train_files=[{corpus}]",
                 f"model.dim={args.dim}", f"model.n_layers={args.n_layers}", f"model.n_heads={args.n_heads}",
                 f"model.max_seq_len={args.seq_len}", f"data.seq_len={args.seq_len}",
                 f"data.batch_size={args.batch}", f"train.threads={args.threads}", "logging.progress=false",
                 "train.steps=100000", *extra]
    cmd = [sys.executable, __file__, "--worker", "--overrides", json.dumps(overrides), "--steps", str(args.steps),
           "--warmup", str(args.warmup)]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *cmd[1:]]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT / "src")}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    lines = [line for line in p.stdout.splitlines() if line.startswith("RESULT ")]
    if p.returncode != 0 or not lines:
        raise SystemExit(f"{name} failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    out = json.loads(lines[-1][len("RESULT "):])
    print(f"{name:7s} {out['parallel']}: {out['tokens_per_s']:,.0f} tok/s (job), "
          f"{out['tokens_per_s_per_process']:,.0f} per process; rank-0 params+grads+optimizer "
          f"{out['mem_total_rank0'] / 2**20:.2f} MiB; checkpoint {out['ckpt_bytes'] / 2**20:.2f} MiB saved in "
          f"{out['ckpt_save_s']:.2f} s, loaded in {out['ckpt_load_s']:.2f} s", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--overrides", default="[]", help=argparse.SUPPRESS)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--n-layers", type=int, default=4)
    ap.add_argument("--n-heads", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8, help="global batch (rows per step)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        gen = torch.Generator().manual_seed(0)
        words = ["".join(chr(97 + int(c)) for c in torch.randint(0, 26, (int(n),), generator=gen))
                 for n in torch.randint(2, 9, (5000,), generator=gen)]
        (workdir / "corpus.txt").write_text(" ".join(words) * 4)
        res = {name: run(name, args, workdir) for name in SETTINGS}
    single, ddp, fsdp = res["single"], res["ddp2"], res["fsdp2"]
    summary = {
        "bench": "scaling", "shape": {"dim": args.dim, "n_layers": args.n_layers, "seq_len": args.seq_len,
                                      "global_batch": args.batch, "params": single["num_params"]},
        "cpus": os.cpu_count(), "threads_per_process": args.threads, "load_avg": os.getloadavg()[0],
        "tokens_per_s": {k: round(v["tokens_per_s"]) for k, v in res.items()},
        "tokens_per_s_per_process": {k: round(v["tokens_per_s_per_process"]) for k, v in res.items()},
        "speedup_2proc_vs_1": {"ddp": ddp["tokens_per_s"] / single["tokens_per_s"],
                               "fsdp": fsdp["tokens_per_s"] / single["tokens_per_s"]},
        "state_mib_rank0": {k: round(v["mem_total_rank0"] / 2**20, 3) for k, v in res.items()},
        "fsdp_over_ddp_state_memory": fsdp["mem_total_rank0"] / ddp["mem_total_rank0"],
        "fsdp_state_memory_target_met": fsdp["mem_total_rank0"] / ddp["mem_total_rank0"] <= 0.6,
        "checkpoint": {k: {"mib": round(v["ckpt_bytes"] / 2**20, 3), "save_s": round(v["ckpt_save_s"], 3),
                           "load_s": round(v["ckpt_load_s"], 3)} for k, v in res.items()},
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
