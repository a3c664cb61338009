"""Data pipeline: text windows, packed or padded dialog rows, token shards, resumable prefetching loaders.

Batches are dicts of int64 tensors of shape (batch_size, seq_len): ``inputs``, ``targets`` (-100 where
no loss is taken) and, for packed dialog rows, ``doc_ids`` and ``positions``. See :mod:`lmlab.data.loader`
for the loader contract (seeded order, exact resume, rank sharding, prefetch) and the other modules for
each data kind (text, dialog, shards; :mod:`lmlab.data.mqar`: generated associative-recall sequences).

Usage::

    from lmlab.data import build_loader, check_vocab
    check_vocab(tokenizer, cfg.model.vocab_size)
    train = build_loader(cfg.data, tokenizer, "train", rank=rank, world_size=world_size, seed=cfg.seed)
    batch = next(train)                      # {"inputs": (B, T), "targets": (B, T)}
    state = train.state_dict()               # resume later with train.load_state_dict(state)

Names are imported lazily so that a spawned prefetch process does not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DataError": "errors",
    "check_vocab": "errors",
    "IGNORE": "base",
    "expand_files": "base",
    "token_dtype": "base",
    "TrainWindows": "text",
    "ValWindows": "text",
    "encode_files": "text",
    "load_text": "text",
    "split_tokens": "text",
    "DialogCorpus": "dialog",
    "DialogRows": "dialog",
    "load_dialogs": "dialog",
    "pack_greedy": "dialog",
    "packing_efficiency": "dialog",
    "ShardTokens": "shards",
    "load_shards": "shards",
    "open_shard": "shards",
    "write_shard": "shards",
    "MQARRows": "mqar",
    "evaluate_mqar": "mqar",
    "mqar_accuracy": "mqar",
    "DataLoader": "loader",
    "build_loader": "loader",
    "build_source": "loader",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lmlab.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"lmlab.data.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
