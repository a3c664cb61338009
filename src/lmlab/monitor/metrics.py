"""Metrics sinks: ``metrics.jsonl`` in the run folder (always), optionally wandb and TensorBoard.

Every row is one JSON object with a ``step`` and plain numbers; training rows and validation rows share
the file (validation rows carry ``val_*`` keys). Analysis code reads only this file, so a resumed run
appends to it and rows of steps that are re-done after a resume are dropped when it is read back.

Usage::

    sink = build_sinks(cfg, run_dir)          # on rank 0 only
    sink.log({"step": 10, "loss": 2.3, "lr": 1e-3})
    sink.close()
    rows = read_metrics(run_dir / "metrics.jsonl")
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from lmlab.jsonl import iter_jsonl

log = logging.getLogger(__name__)


class JsonlSink:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = self.path.open("a", buffering=1)

    def log(self, row: dict[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        self._f.write(json.dumps(clean) + "\n")

    def close(self) -> None:
        self._f.close()


class WandbSink:
    def __init__(self, project: str, name: str, mode: str, run_dir: Path, config: dict):
        import wandb  # optional dependency: pip install wandb

        self._run = wandb.init(project=project, name=name, mode=mode, dir=str(run_dir), config=config,
                               resume="allow", id=name.replace("/", "-"))

    def log(self, row: dict[str, Any]) -> None:
        self._run.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])

    def close(self) -> None:
        self._run.finish()


class TensorboardSink:
    def __init__(self, log_dir: Path):
        from torch.utils.tensorboard import SummaryWriter  # needs: pip install tensorboard

        self._w = SummaryWriter(str(log_dir))

    def log(self, row: dict[str, Any]) -> None:
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                self._w.add_scalar(k, v, row["step"])

    def close(self) -> None:
        self._w.close()


class MultiSink:
    def __init__(self, sinks: list):
        self.sinks = sinks

    def log(self, row: dict[str, Any]) -> None:
        for s in self.sinks:
            s.log(row)

    def close(self) -> None:
        for s in self.sinks:
            s.close()


def build_sinks(cfg: Any, run_dir: Path, start_step: int = 0) -> MultiSink:
    """The jsonl sink plus the optional ones the config turns on. ``start_step``: the step a resumed run continues
    from (rows of later steps logged before the resume are re-done)."""
    from lmlab.config import config_to_dict

    sinks: list = [JsonlSink(run_dir / "metrics.jsonl")]
    if cfg.logging.wandb:
        sinks.append(WandbSink(cfg.logging.wandb_project, cfg.name, cfg.logging.wandb_mode, run_dir,
                               config_to_dict(cfg)))
    if cfg.logging.tensorboard:
        sinks.append(TensorboardSink(run_dir / "tb"))
    return MultiSink(sinks)


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a metrics.jsonl; when a resumed run re-did steps, only the latest row of each step/kind stays."""
    kept: dict[str, list[dict[str, Any]]] = {"train": [], "val": []}
    for _, row in iter_jsonl(path):
        rows = kept["val" if any(k.startswith("val_") for k in row) else "train"]
        while rows and rows[-1]["step"] >= row["step"]:  # a resume re-did these steps
            rows.pop()
        rows.append(row)
    return sorted(kept["train"] + kept["val"], key=lambda r: (r["step"], any(k.startswith("val_") for k in r)))
