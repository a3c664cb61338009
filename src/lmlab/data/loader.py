"""Stateful, resumable, shardable batch loaders and the one entry point :func:`build_loader`.

A :class:`DataLoader` walks a *source* (see :mod:`lmlab.data.base`) position by position and yields
batches as dicts of int64 torch tensors of shape (batch_size, seq_len):

* ``inputs``: token ids fed to the model;
* ``targets``: next-token ids, -100 where no loss is taken (loss mask 0, padding, document boundaries);
* ``doc_ids`` and ``positions`` (packed dialog rows only): document of each position within its row
  (0, 1, ...; trailing padding gets the next id) and position inside that document (restarts at 0);
* ``distill`` (dialog data with ``data.distill_files``; bool): the targets of dialogs to distill.

Training loaders iterate forever (epoch after epoch); evaluation loaders cover the split once per
``for`` loop. The order depends only on (seed, epoch): ``state_dict()`` is the position of the next batch
*the consumer* will receive (plus a fingerprint of the source), and ``load_state_dict()`` on a fresh
loader continues with exactly the batches an uninterrupted run would have produced, across epochs and
whatever the prefetch mode, because prefetched batches that were never handed out are thrown away.

Usage::

    from lmlab.data import build_loader
    train = build_loader(cfg.data, tokenizer, "train", rank=rank, world_size=world, seed=cfg.seed)
    with train:                                   # close() stops a prefetch thread/process
        for step, batch in zip(range(steps), train):
            loss = F.cross_entropy(model(batch["inputs"]).flatten(0, 1), batch["targets"].flatten())
            if step % 100 == 0:
                ckpt["data"] = train.state_dict()  # later: train.load_state_dict(ckpt["data"])
    for batch in build_loader(cfg.data, tokenizer, "val"):   # every val token a target exactly once
        ...

With ``prefetch: process`` the loader spawns a child process: scripts need the usual
``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from lmlab.data.base import BatchSource, check_rank, expand_files
from lmlab.data.dialog import DialogCorpus, DialogRows, load_dialogs
from lmlab.data.errors import DataError
from lmlab.data.prefetch import make_prefetcher
from lmlab.data.shards import load_shards
from lmlab.data.text import TrainWindows, ValWindows, load_text, split_tokens

__all__ = ["STATE_FORMAT", "DataLoader", "build_loader", "build_source", "reshard_state"]

log = logging.getLogger(__name__)

STATE_FORMAT = "lmlab.data.loader/1"


def _close_pipe(box: list) -> None:
    pipe, box[0] = box[0], None
    if pipe is not None:
        pipe.close()


class DataLoader:
    """Iterate batches of a source with an exact, resumable position and optional background prefetch.

    Args:
        source: a batch source (``TrainWindows``, ``ValWindows``, ``DialogRows`` or anything with
            ``num_batches(epoch)``, ``batch(epoch, index)`` and ``fingerprint()``).
        infinite: True for training (epochs follow one another forever); False for one pass (evaluation),
            after which the loader is back at the start for the next ``for`` loop.
        prefetch: "none", "thread" or "process".
        prefetch_depth: batches built ahead of the consumer.
    """

    def __init__(
        self,
        source: BatchSource,
        infinite: bool = True,
        prefetch: Literal["none", "thread", "process"] = "none",
        prefetch_depth: int = 2,
    ) -> None:
        if prefetch not in ("none", "thread", "process"):
            raise DataError(f"prefetch must be 'none', 'thread' or 'process', got {prefetch!r}")
        if prefetch_depth < 1:
            raise DataError(f"prefetch_depth must be positive, got {prefetch_depth}")
        self.source, self.infinite = source, bool(infinite)
        self.prefetch, self.prefetch_depth = prefetch, int(prefetch_depth)
        self._epoch, self._index = 0, 0  # position of the next batch the consumer gets
        self._box: list = [None]  # the running pipe, in a box the finalizer can see without holding self
        self._finalizer = weakref.finalize(self, _close_pipe, self._box)

    # -- iteration ---------------------------------------------------------------------------------
    def __iter__(self) -> DataLoader:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._box[0] is None:
            self._box[0] = make_prefetcher(
                self.prefetch, self.source, self._epoch, self._index, self.infinite, self.prefetch_depth
            )
        try:
            kind, item = self._box[0].get()
        except BaseException:
            # a failed pipe is spent (a dead generator would read as "end"): drop it so that the next call
            # restarts at the consumer's position instead of ending or rewinding the loader
            _close_pipe(self._box)
            raise
        if kind == "end":  # finite pass done: rewind so that the next loop covers the split again
            _close_pipe(self._box)
            self._epoch, self._index = 0, 0
            raise StopIteration
        epoch, index, batch = item
        self._epoch, self._index = epoch, index + 1
        return {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.bool_ if v.dtype == np.bool_ else np.int64))
                for k, v in batch.items()}

    def __len__(self) -> int:
        """Batches in the current epoch (for this rank)."""
        return self.source.num_batches(self._epoch)

    @property
    def epoch(self) -> int:
        """Epoch of the next batch (an epoch just finished counts until the next batch is taken)."""
        return self._epoch

    @property
    def packing_efficiency(self) -> float:
        """Fraction of input positions holding a real token in the current epoch (1.0 for training text)."""
        fn = getattr(self.source, "packing_efficiency", None)
        return float(fn(self._epoch)) if fn is not None else 1.0

    # -- state -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Position of the next batch the consumer will receive, with the source's fingerprint."""
        return {
            "format": STATE_FORMAT, "epoch": self._epoch, "index": self._index,
            "source": dict(self.source.fingerprint()),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position; the source must match the one the state was saved from."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            got = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise DataError(f"not a data loader state of format {STATE_FORMAT!r} (got {got!r})")
        mine, saved = self.source.fingerprint(), state.get("source", {})
        diff = [f"{k}: saved {saved.get(k)!r}, now {mine.get(k)!r}" for k in sorted(set(mine) | set(saved))
                if saved.get(k) != mine.get(k)]
        if diff:
            raise DataError("cannot resume the data loader: the data or its settings changed (" + "; ".join(diff) + ")")
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or index < 0:
            raise DataError(f"invalid loader position epoch={epoch}, index={index}")
        _close_pipe(self._box)  # batches built ahead for the old position are discarded
        self._epoch, self._index = epoch, index

    # -- lifetime ----------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop any prefetch thread or process (the position is kept; iterating again restarts it)."""
        _close_pipe(self._box)

    def __enter__(self) -> DataLoader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"DataLoader({type(self.source).__name__}, infinite={self.infinite}, prefetch={self.prefetch!r}, "
                f"epoch={self._epoch}, index={self._index})")


# --------------------------------------------------------------------------------------------------
# Building sources from a DataConfig.
# --------------------------------------------------------------------------------------------------

_cache: dict[tuple, tuple[Any, Any]] = {}  # key -> (tokenizer, value); a few entries, oldest dropped first
_CACHE_SIZE = 4


LAYOUT_KEYS = ("rank", "world_size", "batch_size")  # what a position's meaning does not depend on


def reshard_state(states: Sequence[dict[str, Any]], loader: DataLoader) -> dict[str, Any]:
    """The state for ``loader`` (one rank of a new data-parallel layout) from the states every rank of another
    layout saved at the same step.

    Rows are dealt round-robin from one global order, so batch ``i`` of an epoch holds the same rows (the
    global batch ``i``) whatever the number of ranks, as long as the global batch (per-rank batch x ranks) is the
    same: the position (epoch, batch index) then carries over. DataError when it does not: the saved ranks are
    at different positions, the data or its settings changed, or the global batch differs.
    """
    if not states:
        raise DataError("no saved data-loader state to reshard")
    for st in states:
        if not isinstance(st, dict) or st.get("format") != STATE_FORMAT:
            raise DataError(f"not a data loader state of format {STATE_FORMAT!r}")
    positions = {(int(st["epoch"]), int(st["index"])) for st in states}
    if len(positions) != 1:
        raise DataError(f"cannot reshard the data position: the saved ranks are at different positions "
                        f"{sorted(positions)} (epoch, batch)")
    mine = dict(loader.source.fingerprint())
    saved = dict(states[0].get("source", {}))
    diff = [f"{k}: saved {saved.get(k)!r}, now {mine.get(k)!r}" for k in sorted(set(mine) | set(saved))
            if k not in LAYOUT_KEYS and saved.get(k) != mine.get(k)]
    if diff:
        raise DataError("cannot resume the data loader: the data or its settings changed (" + "; ".join(diff) + ")")
    old_global = int(saved.get("batch_size", 0)) * int(saved.get("world_size", 1))
    new_global = int(mine.get("batch_size", 0)) * int(mine.get("world_size", 1))
    if old_global != new_global:
        raise DataError(f"cannot reshard the data position: the global batch was {saved.get('batch_size')} x "
                        f"{saved.get('world_size')} ranks = {old_global} rows and is now {mine.get('batch_size')} x "
                        f"{mine.get('world_size')} = {new_global}; keep data.batch_size (the global batch)")
    (epoch, index), = positions
    return {"format": STATE_FORMAT, "epoch": epoch, "index": index, "source": mine}


def _cached(kind: str, patterns: Sequence[str], tokenizer: Any, extra: tuple, what: str, load: Any) -> Any:
    """Load once per (files on disk, tokenizer, settings): the train and val loaders of a run share the work."""
    paths = expand_files(patterns, what, allow_dirs=kind == "shards")
    stats = tuple((str(Path(p).resolve()), os.stat(p).st_mtime_ns, os.stat(p).st_size) for p in paths)
    key = (kind, stats, extra, id(tokenizer))
    hit = _cache.get(key)
    if hit is not None and hit[0] is tokenizer:
        return hit[1]
    value = load([str(p) for p in paths])
    _cache[key] = (tokenizer, value)
    while len(_cache) > _CACHE_SIZE:
        _cache.pop(next(iter(_cache)))
    return value


def _pad_id(tokenizer: Any) -> int:
    """The tokenizer's pad id (a DialogTokenizer's from the tokenizer it wraps), else 0."""
    for obj in (tokenizer, getattr(tokenizer, "tokenizer", None)):
        try:
            pad = obj.pad_id
        except (AttributeError, KeyError):  # no <|pad|> (e.g. tokenizer.special_tokens: [])
            continue
        if isinstance(pad, int):
            return pad
    return 0


def _dialog_tokenizer(tokenizer: Any) -> Any:
    if hasattr(tokenizer, "encode_dialog"):
        return tokenizer
    from lmlab.tokenizers import DialogTokenizer

    return DialogTokenizer(tokenizer)


def _split_dialogs(corpus: DialogCorpus, val_fraction: float) -> tuple[DialogCorpus, DialogCorpus]:
    n_val = int(len(corpus) * val_fraction)
    return corpus.subset(0, len(corpus) - n_val), corpus.subset(len(corpus) - n_val, len(corpus))


def build_source(
    cfg: Any, tokenizer: Any, split: str = "train", rank: int = 0, world_size: int = 1, seed: int = 0
) -> BatchSource:
    """The batch source :func:`build_loader` iterates (see there for the arguments)."""
    if split not in ("train", "val"):
        raise DataError(f"split must be 'train' or 'val', got {split!r}")
    check_rank(rank, world_size)
    seed = cfg.seed if cfg.seed is not None else seed
    train = split == "train"
    if cfg.kind == "mqar":  # generated sequences; the validation set is data.mqar.val_size of them
        from lmlab.data.mqar import mqar_source

        return mqar_source(cfg, tokenizer, split, seq_len=cfg.seq_len, batch_size=cfg.batch_size, rank=rank,
                           world_size=world_size, seed=seed)
    if not train and not cfg.val_files and cfg.val_fraction == 0:
        raise DataError("no validation data: data.val_files is empty and data.val_fraction is 0")
    truncate = bool(getattr(cfg, "truncate", False))
    common = dict(seq_len=cfg.seq_len, batch_size=cfg.batch_size, rank=rank, world_size=world_size)

    if cfg.kind == "dialog":
        dtok = _dialog_tokenizer(tokenizer)

        def load(files: Sequence[str], what: str) -> DialogCorpus:
            distill = tuple(getattr(cfg, "distill_files", ()) or ()) if what == "data.train_files" else ()
            return _cached("dialog", files, tokenizer, (cfg.seq_len, truncate, distill), what,
                           lambda paths: load_dialogs(paths, dtok, cfg.seq_len, truncate, what, distill))

        if cfg.val_files:
            corpus = load(cfg.train_files, "data.train_files") if train else load(cfg.val_files, "data.val_files")
        else:
            corpus = _split_dialogs(load(cfg.train_files, "data.train_files"), cfg.val_fraction)[0 if train else 1]
        name = f"the dialog {split} split"
        return DialogRows(corpus, seed=seed, shuffle=cfg.shuffle, pad_id=_pad_id(tokenizer), packing=cfg.packing,
                          train=train, name=name, length_grouping=getattr(cfg, "length_grouping", 0),
                          lead_kinds=getattr(cfg, "lead_kinds", ()) if train else (),
                          lead_steps=getattr(cfg, "lead_steps", 0) if train else 0, **common)

    if cfg.kind == "text":
        def load(files: Sequence[str], what: str) -> Any:
            return _cached("text", files, tokenizer, (cfg.separator,), what,
                           lambda paths: load_text(paths, tokenizer, cfg.separator, what))
    elif cfg.kind == "shards":
        def load(files: Sequence[str], what: str) -> Any:
            return _cached("shards", files, tokenizer, (), what, lambda paths: load_shards(paths, tokenizer, what))
    else:
        raise DataError(f"data.kind must be 'text', 'dialog', 'shards' or 'mqar', got {cfg.kind!r}")

    context = None
    if cfg.val_files:
        tokens = load(cfg.train_files, "data.train_files") if train else load(cfg.val_files, "data.val_files")
    else:
        train_tokens, val_tokens = split_tokens(load(cfg.train_files, "data.train_files"), cfg.val_fraction)
        tokens = train_tokens if train else val_tokens
        if not train and len(train_tokens):  # the last training token gives the first val token a context
            context = int(train_tokens.take(np.array([len(train_tokens) - 1]))[0])
    if train:
        return TrainWindows(tokens, seed=seed, shuffle=cfg.shuffle, name="the training split", **common)
    return ValWindows(tokens, pad_id=_pad_id(tokenizer), context=context, name="the validation split", **common)


def build_loader(
    cfg: Any,
    tokenizer: Any,
    split: Literal["train", "val"] = "train",
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
) -> DataLoader:
    """The loader for one split of ``cfg`` (a :class:`lmlab.config.DataConfig`) on one rank.

    ``split="train"`` iterates forever, reshuffled each epoch from ``(seed, epoch)``; ``split="val"`` covers
    the validation data once per loop, in order. ``seed`` is used when ``cfg.seed`` is null (pass the run
    seed). ``tokenizer`` is a Tokenizer (wrapped in a DialogTokenizer for dialog data) or a DialogTokenizer.
    Each rank gets disjoint rows and every rank the same number of batches.
    """
    source = build_source(cfg, tokenizer, split, rank, world_size, seed)
    return DataLoader(source, infinite=split == "train", prefetch=cfg.prefetch, prefetch_depth=cfg.prefetch_depth)
