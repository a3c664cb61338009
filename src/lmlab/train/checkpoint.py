"""Atomic, resumable checkpoints in the ``torch.distributed.checkpoint`` (DCP) format.

Layout of a run folder's checkpoints::

    runs/NAME/checkpoints/step_00001000/
        .metadata, __0_0.distcp ...    model + optimizer, DCP format
        rank_0.pt ...                  per-rank state: data-loader position, RNG states (python, numpy, torch, cuda)
        meta.json                      step, world size, format; written last

A checkpoint is written into ``step_XXXXXXXX.tmp`` and renamed into place only once every file is
complete, so a crash mid-save leaves the previous checkpoints untouched and loadable; leftover ``.tmp``
folders are ignored when loading and removed by the next save. The last ``keep_last`` are kept.
DCP is used on one process too, the format PyTorch reshards across world sizes; lmlab runs one process today,
and loading with another world size is untested until the distributed trainer lands.

Usage::

    ckpt = CheckpointManager(run_dir, keep_last=2)
    ckpt.save(step, model, optimizer, meta={"tokens": n}, rank_state={"data": loader.state_dict()})
    path = ckpt.latest()                                   # newest complete checkpoint or None
    meta, rank_state = ckpt.load(path, model, optimizer)   # restores model and optimizer in place
    loaded = ckpt.load_latest(model, optimizer)            # newest loadable one; damaged newer ones skipped

meta.json records the size of every file of the checkpoint, so a damaged one (a truncated or missing file) is
named as such before anything is read from it; :meth:`CheckpointManager.load_latest` then falls back to the
newest checkpoint that loads, and says which ones it skipped.

A checkpoint saved before a module renamed its parameters (``OLD_NAMES``, see
:func:`lmlab.models.layers.old_parameter_names`: e.g. ``layers.N.attention.smear`` and ``query_smear``, now
``layers.N.attention.smear.keys`` and ``.queries``) loads too, model and optimizer state alike: DCP reads each
tensor by name, so the names the checkpoint lacks are read under their old ones. A checkpoint saved before a module
changed the layout of some parameters (``OLD_LAYOUT``, see :func:`lmlab.models.layers.old_layouts`: Mamba2's
projection and convolution before they were laid out by heads) loads too: the old tensors, weights and optimizer
moments, are read whole and converted by the module (``from_old_layout``), then sharded like the model's own.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

try:
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # a torch built without torch.distributed
    DTensor = distribute_tensor = None

from lmlab.models.layers import old_layouts, old_parameter_names

log = logging.getLogger(__name__)

FORMAT = "lmlab.checkpoint/1"
PREFIX = "step_"

warnings.filterwarnings("ignore", message=r"torch\.distributed is disabled, unavailable or uninitialized")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or written; the message names the folder."""


def _dist() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def rng_state() -> dict[str, Any]:
    """RNG states of python, numpy, torch (and CUDA when present) for bitwise-exact resume."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_rank_state(state: dict[str, Any], path: Path) -> None:
    torch.save(state, path)


def step_of(path: Path) -> int:
    return int(path.name[len(PREFIX) :])


class CheckpointManager:
    """Save, list, prune and load the checkpoints of one run folder."""

    def __init__(self, run_dir: str | os.PathLike, keep_last: int = 2):
        self.dir = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last
        self.rank, self.world_size = _dist()

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first (a folder counts once its meta.json exists)."""
        if not self.dir.is_dir():
            return []
        found = [
            p for p in self.dir.iterdir()
            if p.name.startswith(PREFIX) and p.name[len(PREFIX) :].isdigit() and (p / "meta.json").is_file()
        ]
        return sorted(found, key=step_of)

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None

    def save(
        self,
        step: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        meta: dict[str, Any] | None = None,
        rank_state: dict[str, Any] | None = None,
    ) -> Path:
        """Write checkpoint ``step`` atomically; return its folder. Every rank must call it."""
        final = self.dir / f"{PREFIX}{step:08d}"
        tmp = final.with_name(final.name + ".tmp")
        if self.rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            for stale in self.dir.glob(f"{PREFIX}*.tmp"):
                shutil.rmtree(stale, ignore_errors=True)
        _barrier()
        t0 = time.time()
        if optimizer is not None:
            model_sd, optim_sd = get_state_dict(model, optimizer)
            state = {"model": model_sd, "optim": optim_sd}
        else:
            state = {"model": get_model_state_dict(model)}
        dcp.save(state, checkpoint_id=str(tmp))
        _write_rank_state({"rng": rng_state(), **(rank_state or {})}, tmp / f"rank_{self.rank}.pt")
        _barrier()
        if self.rank == 0:
            files = {f.name: f.stat().st_size for f in sorted(tmp.iterdir()) if f.is_file()}
            info = {"format": FORMAT, "step": step, "world_size": self.world_size, "time": time.time(),
                    "has_optimizer": optimizer is not None, "files": files, **(meta or {})}
            (tmp / "meta.json").write_text(json.dumps(info, indent=1) + "\n")
            if final.exists():  # saving the same step again: replace the old folder
                old = final.with_name(final.name + ".old.tmp")
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
            self._prune()
        _barrier()
        log.info("saved checkpoint %s in %.1fs", final, time.time() - t0)
        return final

    def _prune(self) -> None:
        done = self.complete()
        for old in done[: max(0, len(done) - self.keep_last)]:
            shutil.rmtree(old, ignore_errors=True)

    def load(
        self, path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Restore model (and optimizer) in place from ``path``; return (meta, this rank's state)."""
        return load_checkpoint(path, model, optimizer, self.rank)

    def load_latest(
        self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, fallback: bool = True
    ) -> Loaded | None:
        """Restore the newest checkpoint that loads; None when there is no checkpoint at all.

        A newer checkpoint that fails to load while an older one loads was damaged (a model or optimizer that
        does not fit would fail on every checkpoint): with ``fallback`` it is skipped with a warning naming it
        (``Loaded.damaged``); without, CheckpointError names it and the older one that would be used. When none
        loads, the newest one's error is raised.
        """
        done = self.complete()
        failed: list[tuple[Path, CheckpointError]] = []
        for path in reversed(done):
            try:
                meta, state = self.load(path, model, optimizer)
            except CheckpointError as e:
                failed.append((path, e))
                continue
            if failed and not fallback:
                raise CheckpointError(
                    f"the newest checkpoint is damaged ({failed[0][1]}); {path} loads: set train.ckpt_fallback=true "
                    f"to resume from it, or move the damaged one away") from None
            for bad, err in failed:
                log.warning("checkpoint %s is damaged and was skipped (%s); using %s", bad, err, path)
            return Loaded(path, meta, state, [bad for bad, _ in failed])
        if failed:
            raise failed[0][1]
        return None

    def set_aside(self, path: Path) -> Path:
        """Rename a damaged checkpoint folder to ``step_N.damaged`` (kept for inspection, never loaded or pruned)."""
        target = path.with_name(path.name + ".damaged")
        n = 1
        while target.exists():
            n += 1
            target = path.with_name(f"{path.name}.damaged{n}")
        os.replace(path, target)
        log.warning("moved the damaged checkpoint %s to %s", path, target)
        return target


@dataclass
class Loaded:
    """What :meth:`CheckpointManager.load_latest` restored: the folder, its meta, this rank's state, and the newer
    checkpoints it skipped as damaged."""

    path: Path
    meta: dict[str, Any]
    state: dict[str, Any]
    damaged: list[Path]


def verify_files(path: Path, meta: dict[str, Any]) -> None:
    """CheckpointError when a file that meta.json lists is missing or has another size than was written."""
    for name, size in (meta.get("files") or {}).items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{path}: damaged: {name} is missing")
        if f.stat().st_size != size:
            raise CheckpointError(f"{path}: damaged: {name} has {f.stat().st_size} bytes, {size} were written")


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path) / "meta.json"
    try:
        meta = json.loads(p.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not a complete checkpoint (no meta.json)") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{p}: unreadable ({e})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{p}: unknown checkpoint format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def _saved_under_old_names(path: Path, model: nn.Module) -> dict[str, str]:
    """``{name: old name}`` of the model's parameters that the checkpoint holds under their old name only."""
    renamed = old_parameter_names(model)
    if not renamed:
        return {}
    saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    return {new: old for new, old in renamed.items() if f"model.{new}" not in saved and f"model.{old}" in saved}


def _saved_in_old_layout(path: Path, model: nn.Module) -> dict[str, nn.Module]:
    """``{prefix: module}`` of the modules whose parameters the checkpoint holds in the module's old layout only."""
    modules = old_layouts(model)
    if not modules:
        return {}
    saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    out = {}
    for pre, m in modules.items():
        olds = [f"model.{pre}{o}" for o in m.OLD_LAYOUT]
        news = [f"model.{pre}{n}" for group in m.OLD_LAYOUT.values() for n in group]
        if all(k in saved for k in olds) and not any(k in saved for k in news):
            out[pre] = m
    return out


def _new_names(layouts: dict[str, nn.Module]) -> list[str]:
    return [pre + n for pre, m in layouts.items() for group in m.OLD_LAYOUT.values() for n in group]


def _like(full: torch.Tensor, template: Any) -> Any:
    """``full`` written into ``template`` in place (what get_state_dict gave under that name: under FSDP2 a view of the
    module's own sharded storage, so a new object would not reach it), this process's shard of it for a DTensor; a
    tensor of its own when there is no template."""
    if DTensor is not None and isinstance(template, DTensor):
        # every process read the whole tensor: each takes its own shard of it, no communication
        shard = distribute_tensor(full.to(template.dtype).contiguous(), template.device_mesh, template.placements,
                                  src_data_rank=None)
        template.to_local().copy_(shard.to_local())
        return template
    if isinstance(template, torch.Tensor):
        return template.copy_(full)
    return full.clone(memory_format=torch.contiguous_format)


def _load_old_layout(path: Path, state: dict[str, Any], layouts: dict[str, nn.Module],
                     templates: dict[str, Any]) -> None:
    """Read the old-layout tensors of ``layouts`` from the checkpoint whole, convert them and put them into
    ``state`` under the new names, shaped like ``templates`` (what get_state_dict gave under those names)."""
    saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    keys = {k for k in saved for pre, m in layouts.items() for o in m.OLD_LAYOUT
            if k == f"model.{pre}{o}" or ("optim" in state and k.startswith(f"optim.state.{pre}{o}."))}
    with warnings.catch_warnings():  # one process without a process group: reading alone is what is meant
        warnings.filterwarnings("ignore", message="torch.distributed is unavailable or uninitialized")
        old = _load_state_dict_from_keys(keys=keys, checkpoint_id=str(path))
    for pre, m in layouts.items():
        weights = {o: old["model"][pre + o] for o in m.OLD_LAYOUT}
        try:
            converted = m.from_old_layout(weights)
        except ValueError as e:
            raise ValueError(f"{pre.rstrip('.')}: {e}") from None
        for name, t in converted.items():
            state["model"][pre + name] = _like(t, templates["model"][pre + name])
        if "optim" not in state:
            continue
        moments = {o: old.get("optim", {}).get("state", {}).get(pre + o, {}) for o in m.OLD_LAYOUT}
        for key in set.intersection(*(set(v) for v in moments.values())):
            vals = {o: moments[o][key] for o in m.OLD_LAYOUT}
            if all(torch.is_tensor(v) and v.shape == weights[o].shape for o, v in vals.items()):
                new = m.from_old_layout(vals)  # a per-element moment: laid out like the weights
            elif all(not torch.is_tensor(v) or v.dim() == 0 for v in vals.values()):
                first = next(iter(vals.values()))  # a per-parameter scalar (the step count): the same for all
                new = {n: first for group in m.OLD_LAYOUT.values() for n in group}
            else:
                raise ValueError(f"{pre.rstrip('.')}: optimizer state {key!r} is neither per element nor a scalar: "
                                 "it cannot follow the parameters' new layout")
            for name, t in new.items():
                slot = state["optim"]["state"].setdefault(pre + name, {})
                tmpl = templates["optim"].get(pre + name, {}).get(key)
                slot[key] = _like(t, tmpl) if torch.is_tensor(t) else t


def _rename(state: dict[str, Any], names: dict[str, str]) -> None:
    """Rename, in place, the parameters of ``state`` (``{"model": ..., "optim": ...}`` as get_state_dict makes
    them, keyed by parameter name) that ``names`` maps."""
    state["model"] = {names.get(k, k): v for k, v in state["model"].items()}
    if "optim" in state:
        optim = state["optim"]
        optim["state"] = {names.get(k, k): v for k, v in optim["state"].items()}
        for group in optim["param_groups"]:
            group["params"] = [names.get(k, k) for k in group["params"]]


def load_checkpoint(
    path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, rank: int | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore model (and optimizer) weights from a checkpoint folder; return (meta, rank state)."""
    path = Path(path)
    meta = read_meta(path)
    verify_files(path, meta)
    rank = _dist()[0] if rank is None else rank
    try:
        if optimizer is not None:
            if not meta.get("has_optimizer", True):
                hint = (f" (model weights only, imported from {meta['imported_from']}: finetune them in a new run "
                        f"with train.init_from={path.parent.parent})") if meta.get("imported_from") else ""
                raise CheckpointError(f"{path}: holds no optimizer state{hint}")
            model_sd, optim_sd = get_state_dict(model, optimizer)
            state = {"model": model_sd, "optim": optim_sd}
        else:
            state = {"model": get_model_state_dict(model)}
        old = _saved_under_old_names(path, model)
        layouts = _saved_in_old_layout(path, model)
        groups = [list(g["params"]) for g in state["optim"]["param_groups"]] if "optim" in state else []
        templates = {"model": {n: state["model"].pop(n) for n in _new_names(layouts)},  # read below, converted
                     "optim": {n: state["optim"]["state"].pop(n, {}) for n in _new_names(layouts)}
                     if "optim" in state else {}}
        _rename(state, old)  # read what the checkpoint holds under old names by those names...
        dcp.load(state, checkpoint_id=str(path))
        _rename(state, {o: n for n, o in old.items()})  # ...and give it to the model under the current ones
        if layouts:
            _load_old_layout(path, state, layouts, templates)
            for g, params in zip(state["optim"]["param_groups"] if "optim" in state else [], groups):
                g["params"] = params  # the saved groups list the old parameters: the model's own lists
        if optimizer is not None:
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        else:
            set_model_state_dict(model, state["model"], options=StateDictOptions(strict=True))
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as e:  # CheckpointException derives from BaseException
        raise CheckpointError(f"{path}: cannot load model/optimizer state: {type(e).__name__}: {e}") from e
    if optimizer is None:
        return meta, {}
    saved_world = int(meta.get("world_size", 1))
    if saved_world != _dist()[1]:  # another world size: every saved rank's state, for the caller to reshard
        return meta, {"ranks": read_rank_states(path, saved_world)}
    return meta, _read_rank_file(path / f"rank_{rank}.pt", meta, rank)


def read_rank_states(path: str | os.PathLike, world_size: int) -> list[dict[str, Any]]:
    """The per-rank states (data position, RNG) of every rank that saved checkpoint ``path``."""
    meta = read_meta(path)
    return [_read_rank_file(Path(path) / f"rank_{r}.pt", meta, r) for r in range(world_size)]


def _read_rank_file(rank_file: Path, meta: dict[str, Any], rank: int) -> dict[str, Any]:
    if not rank_file.is_file():
        raise CheckpointError(
            f"{rank_file}: missing; the checkpoint was saved by {meta.get('world_size')} processes "
            f"and this is rank {rank}")
    try:
        return torch.load(rank_file, weights_only=False)
    except Exception as e:
        raise CheckpointError(f"{rank_file}: unreadable ({type(e).__name__}: {e})") from e


def load_run(run_dir: str | os.PathLike, step: int | None = None, device: str | torch.device = "cpu",
             with_path: bool = False):
    """Rebuild a run's tokenizer and model from ``run_dir/config.yaml`` and a checkpoint (by default the newest
    that loads: a damaged newer one is skipped with a warning).

    Returns ``(cfg, model, tokenizer)`` with the model in eval mode, and the checkpoint folder with ``with_path``.
    """
    from lmlab.config import Config, load_config
    from lmlab.models import build_model, materialize
    from lmlab.tokenizers import build_tokenizer

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise CheckpointError(f"{run_dir}: not a run folder (no config.yaml)")
    cfg = load_config(run_dir / "config.yaml", schema=Config)
    manager = CheckpointManager(run_dir)
    tokenizer = build_tokenizer(cfg.tokenizer)
    model = materialize(build_model(cfg.model, vocab_size=tokenizer.vocab_size, device="meta"), device)
    if step is None:
        loaded = manager.load_latest(model, fallback=cfg.train.ckpt_fallback)
        if loaded is None:
            raise CheckpointError(f"{run_dir}: no complete checkpoint under {manager.dir}")
        path = loaded.path
    else:
        path = manager.dir / f"{PREFIX}{step:08d}"
        if not path.is_dir():
            have = ", ".join(str(step_of(p)) for p in manager.complete()) or "none"
            raise CheckpointError(f"{run_dir}: no checkpoint for step {step} (have: {have})")
        load_checkpoint(path, model)
    return (cfg, model.eval(), tokenizer, path) if with_path else (cfg, model.eval(), tokenizer)
