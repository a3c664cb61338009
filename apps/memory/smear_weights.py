"""Where trained models put their smeared keys: each layer's learned mix, the diagnostic of stalled copying.

For each run folder (its newest checkpoint), prints one line per run: the largest weight any head of each layer puts
on the previous token's key (offset 1 of the softmax over the own key and the ``smear_keys`` before it), the
recall figures its metrics logged last, and, with ``--heads``, every head's full mix.

Why: in the quickstart's 2-layer in-tool models, copying names works when a head of the *last* layer takes the
previous key (weight ~0.9): an induction head whose queries already carry the current token's context from layer 0.
In every run whose copying stalled, layer 0 took it instead (weight >= 0.78) and no last-layer head did (<= 0.41),
a basin the run does not leave (apps/memory/results/README.md). ``model.smear_layers: [-1]`` removes that basin.

Usage::

    .venv/bin/python apps/memory/smear_weights.py runs/memory/quick/*/          # one line per run
    .venv/bin/python apps/memory/smear_weights.py --heads runs/memory/quick/mode=tool_people=1024
    .venv/bin/python apps/memory/smear_weights.py --csv out.csv runs/memory/qs_*/*/
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # apps/ on the path when run as a script

from lmlab.train.checkpoint import CheckpointError, load_run  # noqa: E402


def smear_mix(model) -> list[torch.Tensor | None]:
    """Per layer: the (heads, 1 + smear_keys) softmax mix of its smeared keys, or None (no smear there). Per-channel
    smears are averaged over their channels."""
    out = []
    for layer in model.layers:
        smear = getattr(getattr(layer, "attention", None), "smear", None)
        if smear is None:
            out.append(None)
            continue
        w = torch.softmax(smear.keys.detach().float(), -1)
        out.append(w.mean(1) if w.ndim == 3 else w)
    return out


def last_recall(run: Path) -> dict[str, float]:
    rec: dict[str, float] = {}
    metrics = run / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            row = json.loads(line)
            rec.update({k.split("/")[1]: v for k, v in row.items()
                        if k.startswith("recall/") and k.endswith("/correct")})
    return rec


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="run folders (with config.yaml and a checkpoint)")
    p.add_argument("--heads", action="store_true", help="print every head's mix too")
    p.add_argument("--csv", type=Path, default=None, help="also write the rows to this CSV file")
    a = p.parse_args(argv)
    logging.disable(logging.WARNING)
    rows = []
    for run in a.runs:
        try:
            _, model, _ = load_run(run)
        except (CheckpointError, FileNotFoundError, OSError) as e:
            print(f"{run}: skipped ({str(e).splitlines()[0]})", file=sys.stderr)
            continue
        mix = smear_mix(model)
        row = {"run": str(run).rstrip("/")}
        for i, w in enumerate(mix):
            row[f"prev_key_max_layer{i}"] = None if w is None else round(float(w[:, 1].max()), 3)
        row.update({f"recall_{k}": round(v, 4) for k, v in last_recall(run).items()})
        rows.append(row)
        print("  ".join(f"{k} {v}" for k, v in row.items()))
        if a.heads:
            for i, w in enumerate(mix):
                if w is not None:
                    for h, hw in enumerate(w.tolist()):
                        print(f"    layer {i} head {h}: " + " ".join(f"{x:.2f}" for x in hw))
    if a.csv and rows:
        keys = list(dict.fromkeys(k for r in rows for k in r))
        with open(a.csv, "w", newline="") as f:
            w = csv.DictWriter(f, keys)
            w.writeheader()
            w.writerows(rows)
    return rows


if __name__ == "__main__":
    main()
