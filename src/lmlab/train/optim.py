"""AdamW (or Muon for the blocks' matrices) with sensible parameter groups, and learning-rate schedules as pure
functions of the step.

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


def embedding_ids(model: nn.Module) -> set[int]:
    """ids of the model's embedding weights (an output head tied to one shares its id): never decayed, never Muon."""
    return {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}


def param_groups(model: nn.Module, weight_decay: float, no_decay: list[str] | tuple[str, ...] = (),
                 lr_scale: dict[str, float] | None = None) -> list[dict]:
    """Two groups: decayed matrices, and everything else (norms, biases, embeddings, and the matrices whose names
    match a glob pattern of ``no_decay``, e.g. ``layers.*.attention.w[qk].weight``). ``lr_scale`` maps glob
    patterns to learning-rate multipliers: the parameters a pattern names (the first that matches) go into groups
    of their own, whose ``lr_scale`` :func:`set_lr` applies. A pattern that names no parameter (for ``no_decay``:
    no decayed matrix) is refused (:class:`ValueError`): a typo would otherwise change nothing without a word."""
    embed_ids = embedding_ids(model)
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


NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # the quintic Newton-Schulz iteration of Muon (torch.optim.Muon's)


def orthogonalize(g: torch.Tensor, steps: int, dtype: torch.dtype = torch.bfloat16, eps: float = 1e-7
                  ) -> torch.Tensor:
    """Muon's approximate orthogonalisation of a 2-D update: ``steps`` quintic Newton-Schulz iterations on ``g``
    scaled to unit Frobenius norm, which take its singular values to ~0.7-1.2 (not exactly 1) while keeping its
    singular vectors. In bfloat16 it is ``torch.optim.Muon``'s arithmetic; on CPU :class:`MuonAdamW` runs it in
    float32, since small bfloat16 matmuls are slow there (the 14 matrices of a width-64 model, 2 layers: 53 ms per
    step in bfloat16, 4.7 ms in float32, one thread)."""
    a, b, c = NS_COEFFICIENTS
    x = g.to(dtype)
    tall = g.size(0) > g.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


class MuonAdamW(torch.optim.Optimizer):
    """Muon (momentum, then an orthogonalised update) for the parameter groups marked ``muon``, AdamW for the others,
    in one optimizer: one ``param_groups`` list and one ``state`` (checkpoints, DCP and :func:`set_lr` see a plain
    optimizer). Each group's arithmetic is that of ``torch.optim.Muon`` (Nesterov, decoupled weight decay, the update
    scaled by sqrt(max(1, rows / cols))) or ``torch.optim.AdamW`` (``tests/test_train.py`` checks both against them).
    Muon groups hold 2-D weights only. ``ns_dtype``: the Newton-Schulz iteration's dtype, by default bfloat16 on CUDA
    (as torch.optim.Muon) and float32 elsewhere (see :func:`orthogonalize`)."""

    def __init__(self, groups: list[dict], lr: float, betas: tuple[float, float], eps: float, momentum: float,
                 ns_steps: int, ns_dtype: torch.dtype | None = None):
        self.ns_dtype = ns_dtype
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": 0.0, "momentum": momentum,
                    "ns_steps": ns_steps, "muon": False, "lr_scale": 1.0}
        super().__init__(groups, defaults)
        for group in self.param_groups:
            if group["muon"] and any(p.ndim != 2 for p in group["params"]):
                raise ValueError("MuonAdamW: a Muon group holds a parameter that is not a 2-D matrix")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g, state = p.grad, self.state[p]
                if group["muon"]:
                    mu = group["momentum"]
                    if not state:
                        state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    buf = state["momentum_buffer"]
                    buf.lerp_(g, 1 - mu)
                    dtype = self.ns_dtype or (torch.bfloat16 if p.is_cuda else torch.float32)
                    update = orthogonalize(g.lerp(buf, mu), group["ns_steps"], dtype)
                    p.mul_(1 - lr * wd)
                    p.add_(update, alpha=-lr * math.sqrt(max(1.0, p.size(0) / p.size(1))))
                    continue
                beta1, beta2 = group["betas"]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                step = state["step"].item()
                m, v = state["exp_avg"], state["exp_avg_sq"]
                p.mul_(1 - lr * wd)
                m.lerp_(g, 1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                denom = (v.sqrt() / math.sqrt(1 - beta2 ** step)).add_(group["eps"])
                p.addcdiv_(m, denom, value=-lr / (1 - beta1 ** step))
        return loss


def muon_groups(model: nn.Module, groups: list[dict], patterns: list[str], lr: float, muon_lr: float) -> list[dict]:
    """Split :func:`param_groups`' groups: the 2-D weights named by a glob pattern of ``patterns`` (never an
    embedding, nor a weight tied to one) go into Muon groups whose ``lr_scale`` also carries ``muon_lr / lr``, so
    that :func:`set_lr` scales both rates by the schedule. A pattern that names no such weight is refused."""
    embed_ids = embedding_ids(model)
    names = {id(p): n for n, p in model.named_parameters()}
    hits = dict.fromkeys(patterns, 0)
    out = []
    for group in groups:
        muon, rest = [], []
        for p in group["params"]:
            matched = [pat for pat in patterns if fnmatch.fnmatchcase(names[id(p)], pat)]
            use = bool(matched) and p.ndim == 2 and id(p) not in embed_ids
            for pat in matched if use else ():
                hits[pat] += 1
            (muon if use else rest).append(p)
        if rest:
            out.append({**group, "params": rest, "muon": False})
        if muon:
            out.append({**group, "params": muon, "muon": True, "lr_scale": group["lr_scale"] * muon_lr / lr})
    unused = [pat for pat, n in hits.items() if not n]
    if unused:
        example = next((n for n, p in model.named_parameters() if p.ndim == 2 and id(p) not in embed_ids), "")
        raise ValueError(f"optim.muon_params: {', '.join(map(repr, unused))} names no 2-D weight of the model "
                         f"(embeddings excluded; names look like {example!r})")
    return out


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device | str = "cpu") -> torch.optim.Optimizer:
    """AdamW with the configured kernel (fused on CUDA and foreach elsewhere unless ``cfg.impl`` says otherwise), or
    with ``optim.name: muon`` :class:`MuonAdamW` (Muon for the matrices ``cfg.muon_params`` names)."""
    if cfg.name == "muon":
        groups = muon_groups(model, param_groups(model, cfg.weight_decay, cfg.no_decay, cfg.lr_scale),
                             cfg.muon_params, cfg.lr, cfg.muon_lr)
        return MuonAdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, momentum=cfg.muon_momentum,
                         ns_steps=cfg.muon_ns_steps,
                         ns_dtype=None if cfg.muon_ns_dtype == "auto" else getattr(torch, cfg.muon_ns_dtype))
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
