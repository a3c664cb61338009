"""AdamW with sensible parameter groups, and learning-rate schedules as pure functions of the step.

Weight decay applies to matrices only: never to norm gains, biases or the token embedding (which may be
tied to the output head), nor to the matrices ``optim.no_decay`` names (glob patterns over parameter names, e.g.
``layers.*.attention.wq.weight``). ``optim.lr_scale`` gives the parameters it names (glob patterns) a multiple
of the scheduled learning rate, e.g. ``{"layers.*.attention.smear.keys": 10}`` for a few gate-like scalars that
must move far. The schedule is a pure function of the step, so a checkpoint only needs the step to restore it.

Usage::

    opt = build_optimizer(model, cfg.optim, device)
    for step in range(cfg.train.steps):
        set_lr(opt, lr_at(step, cfg.optim, cfg.train.steps))
        ...
"""

from __future__ import annotations

import fnmatch
import math

import torch
from torch import nn

from lmlab.config import OptimConfig


def param_groups(model: nn.Module, weight_decay: float, no_decay: list[str] | tuple[str, ...] = (),
                 lr_scale: dict[str, float] | None = None) -> list[dict]:
    """Two groups: decayed matrices, and everything else (norms, biases, embeddings, and the matrices whose names
    match a glob pattern of ``no_decay``, e.g. ``layers.*.attention.w[qk].weight``). ``lr_scale`` maps glob
    patterns to learning-rate multipliers: the parameters a pattern names (the first that matches) go into groups
    of their own, whose ``lr_scale`` :func:`set_lr` applies. A pattern that names no parameter (for ``no_decay``:
    no decayed matrix) is refused (:class:`ValueError`): a typo would otherwise change nothing without a word."""
    embed_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    scales = dict(lr_scale or {})
    groups: dict[tuple[bool, float], list] = {(True, 1.0): [], (False, 1.0): []}
    hits = dict.fromkeys(no_decay, 0)
    scale_hits = dict.fromkeys(scales, 0)
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        scale = 1.0
        for pat, value in scales.items():
            if fnmatch.fnmatchcase(name, pat):
                scale_hits[pat] += 1
                scale = float(value)
                break
        decayed = p.ndim >= 2 and id(p) not in embed_ids
        if decayed:
            matched = [pat for pat in no_decay if fnmatch.fnmatchcase(name, pat)]
            for pat in matched:
                hits[pat] += 1
            decayed = not matched
        groups.setdefault((decayed, scale), []).append(p)
    unused = [pat for pat, n in hits.items() if not n]
    if unused:
        example = next((n for n, p in model.named_parameters() if p.ndim >= 2 and id(p) not in embed_ids), "")
        raise ValueError(f"optim.no_decay: {', '.join(map(repr, unused))} names no weight-decayed matrix of the "
                         f"model (names look like {example!r}; norms, biases and embeddings are never decayed)")
    unused = [pat for pat, n in scale_hits.items() if not n]
    if unused:
        example = next(n for n, _ in model.named_parameters())
        raise ValueError(f"optim.lr_scale: {', '.join(map(repr, unused))} names no trainable parameter of the model "
                         f"that an earlier pattern does not already name (names look like {example!r})")
    return [{"params": ps, "weight_decay": weight_decay if decayed else 0.0, "lr_scale": scale}
            for (decayed, scale), ps in groups.items()]


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device | str = "cpu") -> torch.optim.AdamW:
    """AdamW with the configured kernel: fused on CUDA and foreach elsewhere unless ``cfg.impl`` says otherwise."""
    impl = cfg.impl
    if impl == "auto":
        impl = "fused" if torch.device(device).type == "cuda" else "foreach"
    kwargs = {"fused": True} if impl == "fused" else {"foreach": impl == "foreach"}
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay, cfg.no_decay, cfg.lr_scale), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps, **kwargs)


def lr_factor(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Multiplier of ``cfg.lr`` for optimizer step ``step`` (0-based) out of ``total_steps``."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    floor = cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "cosine":
        span = max(1, total_steps - cfg.warmup_steps - 1)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if cfg.schedule == "wsd":
        decay_steps = max(1, round(cfg.decay_fraction * total_steps))
        decay_start = total_steps - decay_steps
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start + 1) / decay_steps)
        return 1.0 - (1.0 - floor) * progress
    raise ValueError(f"optim.schedule: unknown schedule {cfg.schedule!r}")


def lr_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    return cfg.lr * lr_factor(step, cfg, total_steps)


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    """Every group's learning rate: ``lr`` times the group's ``lr_scale`` (1 where it has none)."""
    for group in opt.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
