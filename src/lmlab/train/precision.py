"""Mixed precision by module: some submodules run in float32 while the rest of the model runs under bf16 autocast.

``train.dtype=bfloat16`` autocasts every matmul to bf16. ``train.float32_modules`` names submodules (``fnmatch``
patterns over ``model.named_modules()`` names, e.g. ``layers.*.attention`` or ``output``) that run in float32
inside it: autocast is off within them and their floating-point tensor inputs are cast up to float32. Their
parameters, names and state dict are unchanged; only the class of each matched module becomes a subclass of its
own with that forward (the way FSDP2's ``fully_shard`` marks the modules it shards), so ``torch.compile``,
checkpoints and sharding see the same module tree.

Usage::

    keep_float32(model, ["layers.*.attention"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(tokens)      # the MLPs and the head in bf16, attention in float32
"""

from __future__ import annotations

import fnmatch

import torch
from torch import nn
from torch.utils._pytree import tree_map

_CLASSES: dict[type, type] = {}


class Float32Module:
    """Mixed into a module's class by :func:`keep_float32`: its forward runs with autocast off, in float32."""

    def forward(self, *args, **kwargs):
        dev = next((t.device.type for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)), "cpu")
        if not torch.is_autocast_enabled(dev):
            return super().forward(*args, **kwargs)

        def up(t):
            return t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t

        with torch.autocast(dev, enabled=False):
            return super().forward(*tree_map(up, args), **tree_map(up, kwargs))


def float32_class(cls: type) -> type:
    """``cls`` with :class:`Float32Module`'s forward (one class per ``cls``, so instances of it compare equal)."""
    if issubclass(cls, Float32Module):
        return cls
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"Float32{cls.__name__}", (Float32Module, cls), {"__module__": cls.__module__})
    return _CLASSES[cls]


def keep_float32(model: nn.Module, patterns: list[str] | tuple[str, ...], where: str = "train.float32_modules"
                 ) -> list[str]:
    """Make the submodules of ``model`` whose names match one of ``patterns`` run in float32 under autocast.
    Returns the matched names; a pattern that matches no module is an error that lists the model's names."""
    names = [n for n, _ in model.named_modules() if n]
    matched: list[str] = []
    for pat in patterns:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pat)]
        if not hits:
            shown = ", ".join(n for n in names if n.count(".") <= 2)[:400]
            raise ValueError(f"{where}: {pat!r} matches no module of the model (its modules: {shown} ...)")
        matched += [n for n in hits if n not in matched]
    for name in matched:
        mod = model.get_submodule(name)
        mod.__class__ = float32_class(type(mod))
    return matched
