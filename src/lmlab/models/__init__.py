"""Model registry: build a model from ``ModelConfig`` (optionally on the meta device) and materialise it.

Usage::

    from lmlab.models import build_model, materialize
    model = build_model(cfg.model, vocab_size=tokenizer.vocab_size, seed=0)   # ready on CPU
    meta = build_model(cfg.model, vocab_size=264, device="meta")              # shapes only
    materialize(meta, "cpu", seed=0)                                           # same weights as above
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import torch
from torch import nn

from lmlab.config import ModelConfig
from lmlab.models.transformer import Transformer

MODELS: dict[str, type[nn.Module]] = {"llama": Transformer}


def resolve_vocab(cfg: ModelConfig, vocab_size: int | None) -> ModelConfig:
    """Fill a null ``model.vocab_size`` from the tokenizer; refuse a tokenizer larger than the model."""
    if cfg.vocab_size is None:
        if vocab_size is None:
            raise ValueError("model.vocab_size is null and no tokenizer vocabulary size was given")
        return dataclasses.replace(cfg, vocab_size=vocab_size)
    if vocab_size is not None and vocab_size > cfg.vocab_size:
        raise ValueError(
            f"the tokenizer has {vocab_size} ids but model.vocab_size={cfg.vocab_size}: "
            f"raise model.vocab_size to at least {vocab_size} (or set it to null)"
        )
    return cfg


def materialize(model: nn.Module, device: str | torch.device = "cpu", seed: int | None = None) -> nn.Module:
    """Allocate a meta-device model on ``device`` and initialise it (seeded when ``seed`` is given); with
    ``model.lora.rank > 0`` the LoRA adapters are added last (lmlab.models.lora: the base weights frozen, the
    updates zero), so that a run's checkpoints, base weights loaded by name and fresh runs all see one structure."""
    model.to_empty(device=device)
    gen = None
    if seed is not None:
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)
    model.reset_parameters(generator=gen)
    lora = getattr(getattr(model, "cfg", None), "lora", None)
    if lora is not None and lora.rank > 0:
        from lmlab.models.lora import add_lora

        add_lora(model, lora, generator=gen)
    return model


def build_model(
    cfg: ModelConfig,
    *,
    vocab_size: int | None = None,
    device: str | torch.device = "cpu",
    seed: int | None = None,
) -> nn.Module:
    """Build the model named by ``cfg.arch``. On ``device="meta"`` nothing is allocated or initialised."""
    cfg = resolve_vocab(cfg, vocab_size)
    if cfg.arch not in MODELS:
        raise ValueError(f"model.arch: unknown architecture {cfg.arch!r}; known: {', '.join(MODELS)}")
    with torch.device("meta"):
        model = MODELS[cfg.arch](cfg)
    if str(device) == "meta":
        return model
    if seed is None:
        seed = cfg.init.seed
    return materialize(model, device, seed)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model.eval()`` for the block (generation, evaluation), then back to the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


__all__ = ["MODELS", "Transformer", "build_model", "eval_mode", "materialize", "resolve_vocab"]
