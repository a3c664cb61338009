"""Plain text: read files, tokenize them into one stream, split it, and cut it into fixed-length windows.

Files (paths or globs) are read as UTF-8 and joined with ``separator``; each file and each separator is
encoded separately, so the token stream of a corpus is the same whether it is built here or by the
shard writer (``python -m lmlab.data.shards``). The validation split is the tail ``val_fraction`` of the
stream (or separate files). A row is ``seq_len + 1`` consecutive tokens: inputs are its first ``seq_len``,
targets its last ``seq_len``.

* :class:`TrainWindows`: each epoch draws a random offset in the slack left after the last whole window
  and a permutation of the non-overlapping windows starting there (both from ``(seed, epoch)``), so every
  epoch sees each token once at a different alignment.
* :class:`ValWindows`: consecutive non-overlapping windows over the whole split, in order; the last one is
  padded (targets -100), so every token of the split is a target exactly once (with a one-token
  ``context`` before the split, e.g. the last training token, the first split token is a target too).

Usage::

    from lmlab.data.text import TrainWindows, ValWindows, load_text, split_tokens
    tokens = load_text(["corpus/*.txt"], tokenizer)          # numpy uint16/uint32 stream
    train, val = split_tokens(tokens, 0.1)
    source = TrainWindows(train, seq_len=256, batch_size=16, seed=0)
    batch = source.batch(epoch=0, index=0)                    # {"inputs": (16, 256), "targets": (16, 256)}
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lmlab.data.base import (
    IGNORE,
    check_rank,
    epoch_rng,
    expand_files,
    sample_checksum,
    token_dtype,
    train_rank_rows,
    val_rank_rows,
)
from lmlab.data.errors import DataError

__all__ = ["TrainWindows", "ValWindows", "encode_files", "load_text", "read_text", "split_tokens"]

log = logging.getLogger(__name__)

_STREAM_OFFSET = 1  # epoch_rng stream ids: distinct per use so two draws never share random numbers
_STREAM_ORDER = 2

def read_text(path: str | os.PathLike) -> str:
    """Read one UTF-8 text file; an unreadable, undecodable or empty file raises :class:`DataError`."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {p}: {e.strerror or e}") from None
    if not data:
        raise DataError(f"{p}: the file is empty")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"{p}: not valid UTF-8 at byte {e.start} (line {line})") from None


def encode_files(
    paths: Sequence[str | os.PathLike], tokenizer: Any, separator: str = "\n", progress: bool = False
) -> np.ndarray:
    """Token stream of files joined with ``separator`` (each file and separator encoded on its own)."""
    dtype = token_dtype(tokenizer.vocab_size)
    sep = np.asarray(tokenizer.encode(separator) if separator else [], dtype=dtype)
    parts: list[np.ndarray] = []
    it: Any = paths
    if progress:
        from tqdm import tqdm

        it = tqdm(paths, desc="tokenizing", unit="file")
    for i, p in enumerate(it):
        if i and len(sep):
            parts.append(sep)
        parts.append(np.asarray(tokenizer.encode(read_text(p)), dtype=dtype))
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)
    if len(tokens) == 0:
        raise DataError(f"the corpus {[str(p) for p in paths]} encodes to no tokens")
    return tokens


def load_text(
    patterns: Sequence[str | os.PathLike], tokenizer: Any, separator: str = "\n", what: str = "data.train_files"
) -> np.ndarray:
    """Expand ``patterns`` (paths or globs), read the files and tokenize them into one read-only stream."""
    paths = expand_files(patterns, what)
    big = sum(p.stat().st_size for p in paths) > 50_000_000
    tokens = encode_files(paths, tokenizer, separator, progress=big)
    tokens.setflags(write=False)
    log.info("tokenized %d files into %d tokens", len(paths), len(tokens))
    return tokens


def split_tokens(tokens: Any, val_fraction: float) -> tuple[Any, Any]:
    """Split a stream into (train, val): val is the last ``floor(len * val_fraction)`` tokens; views, no copy."""
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = int(len(tokens) * val_fraction)
    cut = len(tokens) - n_val
    return tokens[:cut], tokens[cut:]


def _gather(tokens: Any, idx: np.ndarray) -> np.ndarray:
    # np.ndarray, np.memmap and ShardTokens all provide take(); memmaps read only the rows asked for.
    return np.asarray(tokens.take(idx), dtype=np.int64)


class TrainWindows:
    """Training rows of ``seq_len + 1`` consecutive tokens, reshuffled every epoch (see the module doc).

    Windows of an epoch start at ``offset + i * seq_len`` (consecutive windows share one boundary token, so
    every token after the offset is a target exactly once per epoch). ``offset`` is drawn in ``[0, slack]``
    where slack is what is left after the largest whole number of windows, so the window count is the same
    every epoch. Rows are dealt round-robin over ranks (disjoint, equal counts); a partial batch is dropped.
    """

    kind = "text-train"

    def __init__(
        self,
        tokens: Any,
        seq_len: int,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        name: str = "the training split",
    ) -> None:
        check_rank(rank, world_size)
        self.tokens, self.seq_len, self.batch_size = tokens, int(seq_len), int(batch_size)
        self.seed, self.shuffle, self.rank, self.world_size = int(seed), bool(shuffle), rank, world_size
        n_tok = len(tokens)
        if n_tok < seq_len + 1:
            raise DataError(
                f"{name} is too small: {n_tok} tokens, but one window needs seq_len+1={seq_len + 1} tokens"
            )
        self.num_windows = (n_tok - 1) // seq_len
        self.slack = n_tok - 1 - self.num_windows * seq_len
        if self.num_windows // world_size < batch_size:
            raise DataError(
                f"{name} is too small: {n_tok} tokens give {self.num_windows} windows of seq_len={seq_len}, "
                f"fewer than batch_size*world_size={batch_size * world_size} for one batch per rank"
            )
        self._plan: tuple[int, int, np.ndarray] | None = None
        self._checksum = sample_checksum(tokens)

    def plan(self, epoch: int) -> tuple[int, np.ndarray]:
        """(offset, this rank's window ids as (num_batches, batch_size)) for ``epoch``."""
        plan = self._plan  # one read: the prefetch thread and the consumer may both call plan()
        if plan is None or plan[0] != epoch:
            if self.shuffle:
                offset = int(epoch_rng(self.seed, epoch, _STREAM_OFFSET).integers(0, self.slack + 1))
                order = epoch_rng(self.seed, epoch, _STREAM_ORDER).permutation(self.num_windows)
            else:
                offset, order = 0, np.arange(self.num_windows)
            plan = self._plan = (epoch, offset, train_rank_rows(order, self.rank, self.world_size, self.batch_size))
        return plan[1], plan[2]

    def num_batches(self, epoch: int = 0) -> int:
        return (self.num_windows // self.world_size) // self.batch_size

    def window_starts(self, epoch: int, index: int) -> np.ndarray:
        """Start offsets (into the token stream) of the rows of batch ``index`` of ``epoch``."""
        offset, rows = self.plan(epoch)
        return offset + rows[index] * self.seq_len

    def batch(self, epoch: int, index: int) -> dict[str, np.ndarray]:
        starts = self.window_starts(epoch, index)
        rows = _gather(self.tokens, starts[:, None] + np.arange(self.seq_len + 1))
        return {"inputs": rows[:, :-1], "targets": rows[:, 1:]}

    def fingerprint(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "num_tokens": len(self.tokens), "checksum": self._checksum, "seq_len": self.seq_len,
            "batch_size": self.batch_size, "seed": self.seed, "shuffle": self.shuffle,
            "rank": self.rank, "world_size": self.world_size,
        }

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_plan": None}


class ValWindows:
    """Evaluation rows: consecutive non-overlapping windows covering the split exactly once, in order.

    Row ``j`` holds stream tokens ``[j*seq_len, j*seq_len + seq_len]``; the last row is padded (inputs
    ``pad_id``, targets -100). When ``context`` (a token id) is given it is placed before the split, so the
    first split token is a target too; otherwise it only serves as input. Rows are dealt round-robin over
    ranks and filled up with empty rows so that every rank gets the same number of full batches.
    """

    kind = "text-val"

    def __init__(
        self,
        tokens: Any,
        seq_len: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        pad_id: int = 0,
        context: int | None = None,
        name: str = "the validation split",
    ) -> None:
        check_rank(rank, world_size)
        self.tokens, self.seq_len, self.batch_size = tokens, int(seq_len), int(batch_size)
        self.rank, self.world_size, self.pad_id = rank, world_size, int(pad_id)
        self.context = None if context is None else int(context)
        self.length = len(tokens) + (self.context is not None)  # length of the stream with its context
        if len(tokens) == 0 or self.length < 2:
            raise DataError(
                f"{name} is empty or has a single token: nothing to evaluate "
                "(raise data.val_fraction or give data.val_files)"
            )
        self.num_rows = -(-(self.length - 1) // self.seq_len)
        self.rows = val_rank_rows(self.num_rows, rank, world_size, batch_size)
        self._checksum = sample_checksum(tokens)

    @property
    def num_targets(self) -> int:
        """Tokens that are a target somewhere in the iteration (over all ranks)."""
        return self.length - 1

    def num_batches(self, epoch: int = 0) -> int:
        return len(self.rows) if epoch == 0 else 0

    def batch(self, epoch: int, index: int) -> dict[str, np.ndarray]:
        rows = self.rows[index]
        pos = rows[:, None] * self.seq_len + np.arange(self.seq_len + 1)  # positions in the context+split stream
        valid = (rows[:, None] >= 0) & (pos < self.length)
        shift = 1 if self.context is not None else 0
        real = np.clip(pos - shift, 0, len(self.tokens) - 1)
        toks = _gather(self.tokens, real)
        if shift:
            toks[pos == 0] = self.context
        inputs = np.where(valid[:, :-1], toks[:, :-1], self.pad_id)
        targets = np.where(valid[:, 1:], toks[:, 1:], IGNORE)
        return {"inputs": inputs, "targets": targets}

    def fingerprint(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "num_tokens": len(self.tokens), "checksum": self._checksum, "seq_len": self.seq_len,
            "batch_size": self.batch_size, "rank": self.rank, "world_size": self.world_size,
        }
