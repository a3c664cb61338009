"""LoRA (Hu et al. 2021, arXiv 2106.09685): trainable low-rank updates on chosen linear layers, the rest frozen.

A targeted ``nn.Linear`` keeps its own ``weight`` (frozen) and gains two parameters, ``lora_a`` (rank x in) and
``lora_b`` (out x rank), and a forward hook that adds ``scale * B (A dropout(x))`` to its output, with
``scale = alpha / rank``. ``lora_b`` starts at zero, so a model with fresh adapters computes exactly what the base
computes. The layer's parameter names do not change (``layers.3.attention.wq.weight`` stays, ``...wq.lora_a``
joins it), so checkpoints of the base load into it by name, a LoRA run checkpoints and resumes like any run
(the frozen weights are saved too: a run folder stays self-contained), and :func:`merge_lora` folds the
updates into the weights for export (``W + scale * B A``), leaving a plain model.

Targets are module-name suffixes (``wq``: every ``*.wq``; ``attention.wo``, ...) or fnmatch patterns on full
names. Everything not a LoRA parameter is frozen (``requires_grad=False``; the optimizer only sees trainable
parameters), except names matching ``train_also`` (e.g. ``*norm*``).

Usage::

    from lmlab.models.lora import add_lora, merge_lora, lora_parameters
    names = add_lora(model, LoraConfig(rank=8, alpha=16, targets=["wq", "wv"]))   # the wrapped layers
    ...train...
    merge_lora(model)                      # plain weights again (e.g. before lmlab.hf.save_hf_folder)

From a config: ``model.lora.rank > 0`` (the trainer adds adapters after the initial / ``train.init_from``
weights are in place).
"""

from __future__ import annotations

import fnmatch
import math

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.config import LoraConfig

__all__ = ["add_lora", "has_lora", "lora_parameters", "merge_lora"]


def _matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) or name == p or name.endswith("." + p) for p in patterns)


def _hook(module: nn.Linear, args: tuple, out: torch.Tensor) -> torch.Tensor:
    x = args[0]
    if module.lora_dropout and module.training:
        x = F.dropout(x, module.lora_dropout)
    return out + module.lora_scale * F.linear(F.linear(x, module.lora_a), module.lora_b)


def add_lora(model: nn.Module, cfg: LoraConfig, generator: torch.Generator | None = None) -> list[str]:
    """Give every ``nn.Linear`` named by ``cfg.targets`` a LoRA update of rank ``cfg.rank``; freeze every other
    parameter (but ``cfg.train_also``). Returns the names of the adapted layers; ValueError when none matches."""
    if cfg.rank <= 0:
        raise ValueError(f"model.lora.rank must be positive to add adapters, got {cfg.rank}")
    if has_lora(model):
        raise ValueError("the model already has LoRA adapters")
    names = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and _matches(name, list(cfg.targets)):
            out_f, in_f = module.weight.shape
            dev, dtype = module.weight.device, module.weight.dtype
            module.lora_a = nn.Parameter(torch.empty(cfg.rank, in_f, device=dev, dtype=dtype))
            module.lora_b = nn.Parameter(torch.zeros(out_f, cfg.rank, device=dev, dtype=dtype))
            # A as nn.Linear initialises a weight of this shape (the LoRA paper's code): uniform, bound 1/sqrt(in)
            bound = 1.0 / math.sqrt(in_f)
            with torch.no_grad():
                module.lora_a.uniform_(-bound, bound, generator=generator)
            module.lora_scale = cfg.alpha / cfg.rank
            module.lora_dropout = cfg.dropout
            module._lora_handle = module.register_forward_hook(_hook)
            names.append(name)
    if not names:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        raise ValueError(f"model.lora.targets {list(cfg.targets)} match no linear layer; the model's linear layers "
                         f"are named like {linears[:6]}")
    for name, p in model.named_parameters():
        p.requires_grad_(name.rsplit(".", 1)[-1] in ("lora_a", "lora_b") or _matches(name, list(cfg.train_also)))
    return names


def has_lora(model: nn.Module) -> bool:
    return any(hasattr(m, "_lora_handle") for m in model.modules())


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The LoRA parameters by name."""
    return {n: p for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] in ("lora_a", "lora_b")}


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold each update into its layer's weight (``W += scale * B A``) and remove the adapters: a plain model
    computing what the adapted one computed (without dropout). Every parameter is trainable again."""
    for module in model.modules():
        handle = getattr(module, "_lora_handle", None)
        if handle is None:
            continue
        delta = module.lora_scale * (module.lora_b.float() @ module.lora_a.float())
        module.weight.add_(delta.to(module.weight.dtype))
        handle.remove()
        del module.lora_a, module.lora_b, module._lora_handle, module.lora_scale, module.lora_dropout
    for p in model.parameters():
        p.requires_grad_(True)
    return model
