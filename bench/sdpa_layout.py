"""Decode attention over a key/value buffer with spare slots: which read layout the engine's decode step should use.

The engine keeps each decoding sequence's keys/values in a (rows, H, capacity, D) buffer (``DecodeBatch``). A decode
step attends one new query per row over the first S slots of each row (S: the longest row's keys), a boolean mask
hiding each row's slots past its own length. Variants, one ``F.scaled_dot_product_attention`` call each:

* ``view_far``: the first S slots of a buffer sized up front for whole answers (``--far`` slots): a strided view;
* ``view_near``: the first S slots of a buffer only ``--slack`` slots longer than S (capacity grown with the
  longest row): a strided view with small gaps;
* ``whole_near``: that whole buffer, contiguous, its spare slots masked too;
* ``tight``: a contiguous buffer of exactly S slots (the floor).

Timed interleaved, the median of ``--rounds`` rounds; every variant's output is checked against ``tight``'s. Last
line: one JSON object.

What it showed (2026-12-02, bench/README.md): a strided view over an up-front buffer costs 1.2-2.4x a contiguous
read of the same keys; an engine whose buffer capacity follows the longest row (grown by copying, 32 slots at a time)
and reads it whole saved ~25% of its decode attention, but end to end on 1,024 recall questions the regrowth copies
cost as much as that saved, and the engine keeps its up-front capacity and strided reads.

    .venv/bin/python bench/sdpa_layout.py                     # ~1 min
    .venv/bin/python bench/sdpa_layout.py --batch 1024 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F


def timed(fn, reps: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def one_length(a: argparse.Namespace, s: int) -> dict:
    """The variants' median times (ms) at S = ``s`` keys for the longest row."""
    b, h, d = a.batch, a.heads, a.head_dim
    near, far = s + a.slack, max(a.far, s)
    lens = torch.randint(s // 3, s, (b,))
    lens[0] = s - 1
    q = torch.randn(b, h, 1, d)
    kv = {c: torch.randn(2, b, h, c, d) for c in {far, near, s}}
    for c in (far, near):  # the same keys in every layout (slots past a row's length are masked, whatever they hold)
        kv[c][:, :, :, :s] = kv[s]
    m_s, m_near = ((torch.arange(n) <= lens[:, None])[:, None, None, :] for n in (s, near))

    def attend(k: torch.Tensor, v: torch.Tensor, m: torch.Tensor):
        return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=m)

    variants = {"view_far": attend(kv[far][0, :, :, :s], kv[far][1, :, :, :s], m_s),
                "view_near": attend(kv[near][0, :, :, :s], kv[near][1, :, :, :s], m_s),
                "whole_near": attend(kv[near][0], kv[near][1], m_near),
                "tight": attend(kv[s][0], kv[s][1], m_s)}
    ref = variants["tight"]()
    for name, fn in variants.items():
        err = (fn() - ref).abs().max().item()
        if err > 1e-5:
            raise SystemExit(f"sdpa_layout: {name} differs from tight by {err} at S={s}")
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(a.rounds):
        for name, fn in variants.items():
            times[name].append(timed(fn, a.reps))
    row = {k: round(statistics.median(v) * 1e3, 3) for k, v in times.items()}
    print(f"S={s}: " + ", ".join(f"{k} {row[k]:.2f} ms" for k in variants) + f" (capacities {far} / {near})",
          file=sys.stderr, flush=True)
    return {**row, "capacity_far": far, "capacity_near": near}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=16)
    p.add_argument("--lengths", default="64,128,192", help="S values (keys the longest row needs)")
    p.add_argument("--slack", type=int, default=16,
                   help="spare slots past S in the engine's buffer (its capacity grows in steps of 32: 16 on average)")
    p.add_argument("--far", type=int, default=288, help="capacity of a buffer sized up front for whole answers")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    out: dict = {"bench": "sdpa_layout", "batch": a.batch, "heads": a.heads, "head_dim": a.head_dim,
                 "threads": a.threads, "load_avg_start": os.getloadavg()[0], "lengths": {}}
    for s in (int(x) for x in a.lengths.split(",")):
        out["lengths"][str(s)] = one_length(a, s)
    out["load_avg_end"] = os.getloadavg()[0]
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
