"""Dialogs from JSONL files, tokenized with a loss mask, served as packed or padded rows.

Each non-blank line of a ``.jsonl`` file is a JSON object ``{"dialog": [turn, ...], ...}`` or a bare list
of turns, a turn being ``{"source": "system"|"user"|"assistant"|"database", "content": str}``. A
``DialogTokenizer`` turns a dialog into ``tokens`` and a ``loss_mask``; bad lines raise :class:`DataError`
naming the file and line.

Rows hold ``seq_len + 1`` token slots. For a dialog with tokens ``t`` and mask ``m`` placed in a row,
``inputs = t[:-1]`` and ``targets[i] = t[i+1] if m[i+1] else -100``; a target never crosses into the next
dialog (the last token of a dialog has target -100).

* packed (``packing=True``): dialogs are laid end to end, greedily in the (per-epoch shuffled) order: a
  dialog goes into the current row if it fits, else it starts a new row. Rows carry ``doc_ids`` (0, 1, ...
  per dialog; trailing padding gets the next id) and ``positions`` (restarting at 0 in each dialog) so the
  model uses a block-diagonal causal mask.
* padded (``packing=False``): one dialog per row, padded with ``pad_id`` (targets -100); a batch is cut to its
  longest dialog (rounded up to 8 columns), so a batch of short dialogs costs what it holds. With the plain
  causal attention this needs (no document mask), padded rows of short dialogs train faster than packed ones:
  e.g. 1.9x the real tokens/s for dialogs of ~170 tokens on one CPU core (apps/memory).

A line may carry a ``"kind"`` string (e.g. ``"fact"``, ``"practice"``): kinds name groups of dialogs, and a
*lead* (``DialogRows(lead_kinds=..., lead_steps=N)``, ``data.lead_kinds`` / ``data.lead_steps``) makes the first N
batches of epoch 0 hold only dialogs of the named kinds (drawn at random among them); the rest of epoch 0 and every
later epoch are the usual shuffle, so each dialog is still seen once per epoch. It is a curriculum in the order
alone: e.g. copying tasks first, before facts that can also be memorised.

A dialog longer than ``seq_len + 1`` tokens is an error unless ``truncate=True`` cuts it. Dialogs of the files
named in ``load_dialogs(..., distill=...)`` are flagged, and their batches carry ``distill``: True at the targets
of flagged dialogs (the trainer's distillation, ``data.distill_files``).
:func:`packing_efficiency` measures the fraction of input positions that hold a real token.

Usage::

    from lmlab.data.dialog import DialogRows, load_dialogs
    corpus = load_dialogs(["chats/*.jsonl"], DialogTokenizer(ByteTokenizer()), seq_len=512)
    rows = DialogRows(corpus, seq_len=512, batch_size=8, seed=0, pad_id=tok.pad_id, packing=True)
    batch = rows.batch(epoch=0, index=0)     # inputs, targets, doc_ids, positions: (8, 512) int64
    print(rows.packing_efficiency(epoch=0))  # e.g. 0.93
"""

from __future__ import annotations

import itertools
import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lmlab.data.base import (
    IGNORE,
    check_rank,
    epoch_rng,
    expand_files,
    sample_checksum,
    train_rank_rows,
    val_rank_rows,
)
from lmlab.data.errors import DataError
from lmlab.data.text import read_text
from lmlab.jsonl import iter_jsonl

__all__ = [
    "DialogCorpus",
    "DialogRows",
    "group_by_length",
    "load_dialogs",
    "pack_greedy",
    "packing_efficiency",
    "read_dialog_file",
    "read_dialog_records",
]

_STREAM_ORDER = 3
_STREAM_GROUP = 4
_STREAM_LEAD = 5


def read_dialog_records(path: str | os.PathLike) -> list[tuple[int, list, str]]:
    """``(line number, list of turns, kind)`` for each non-blank line of a JSONL file (kind: the line's optional
    ``"kind"`` string, else ""); bad lines raise DataError."""
    p = Path(path)
    out = []
    for lineno, record in iter_jsonl(p, read_text(p), DataError):
        dialog = record.get("dialog") if isinstance(record, dict) else record
        if not isinstance(dialog, list):
            raise DataError(
                f"{p}:{lineno}: expected an object with a 'dialog' list of turns or a bare list of turns, "
                f"got {type(record).__name__}" + (f" with keys {sorted(record)}" if isinstance(record, dict) else "")
            )
        kind = record.get("kind", "") if isinstance(record, dict) else ""
        if not isinstance(kind, str):
            raise DataError(f"{p}:{lineno}: 'kind' must be a string naming the dialog's group, got {kind!r}")
        out.append((lineno, dialog, kind))
    if not out:
        raise DataError(f"{p}: no dialog in the file (only blank lines)")
    return out


def read_dialog_file(path: str | os.PathLike) -> list[tuple[int, list]]:
    """``(line number, list of turns)`` for each non-blank line of a JSONL file; bad lines raise DataError."""
    return [(lineno, dialog) for lineno, dialog, _ in read_dialog_records(path)]


@dataclass
class DialogCorpus:
    """Tokenized dialogs stored end to end: dialog ``i`` is ``tokens[offsets[i]:offsets[i+1]]`` (same for mask)."""

    tokens: np.ndarray
    mask: np.ndarray
    offsets: np.ndarray
    where: list[str]
    distill: np.ndarray | None = None  # (dialogs,) bool: flagged for distillation; None: none is
    kinds: np.ndarray | None = None  # (dialogs,) str: each line's "kind" ("" where it has none); None: no line has one

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def dialog(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.tokens[a:b], self.mask[a:b]

    def subset(self, start: int, stop: int) -> DialogCorpus:
        """Dialogs ``start .. stop-1`` (a split), sharing nothing mutable with this corpus."""
        a, b = self.offsets[start], self.offsets[stop]
        return DialogCorpus(
            self.tokens[a:b].copy(), self.mask[a:b].copy(), self.offsets[start : stop + 1] - a,
            self.where[start:stop], None if self.distill is None else self.distill[start:stop].copy(),
            None if self.kinds is None else self.kinds[start:stop].copy(),
        )


def load_dialogs(
    patterns: Sequence[str | os.PathLike],
    tokenizer: Any,
    seq_len: int,
    truncate: bool = False,
    what: str = "data.train_files",
    distill: Sequence[str | os.PathLike] = (),
) -> DialogCorpus:
    """Read and tokenize every dialog of the files; a dialog over ``seq_len + 1`` tokens is an error or cut.
    ``distill``: files (paths or patterns, each among ``patterns``' files) whose dialogs are flagged."""
    if not hasattr(tokenizer, "encode_dialog"):
        raise DataError(f"dialog data needs a tokenizer with encode_dialog (a DialogTokenizer), got {tokenizer!r}")
    toks: list[list[int]] = []
    masks: list[list[int]] = []
    where: list[str] = []
    flags: list[bool] = []
    kinds: list[str] = []
    cap = seq_len + 1
    paths = expand_files(patterns, what)
    flagged = {p.resolve() for p in expand_files(distill, "data.distill_files")} if distill else set()
    stray = flagged - {p.resolve() for p in paths}
    if stray:
        raise DataError(f"data.distill_files: {', '.join(sorted(map(str, stray)))} not among the files of {what} "
                        f"({', '.join(map(str, paths))}): only training dialogs can be distilled")
    for path in paths:
        flag = path.resolve() in flagged
        for lineno, dialog, kind in read_dialog_records(path):
            loc = f"{path}:{lineno}"
            try:
                t, m = tokenizer.encode_dialog(dialog)
            except (ValueError, KeyError, TypeError) as e:
                kind = "" if isinstance(e, ValueError) else f"{type(e).__name__}: "
                raise DataError(f"{loc}: {kind}{e}") from None
            if len(t) != len(m):
                raise DataError(f"{loc}: the tokenizer returned {len(t)} tokens but {len(m)} mask values")
            if len(t) == 0:
                raise DataError(f"{loc}: the dialog encodes to no tokens")
            if len(t) > cap:
                if not truncate:
                    raise DataError(
                        f"{loc}: the dialog has {len(t)} tokens, more than seq_len+1={cap} that fit in one row; "
                        "set data.truncate=true to cut long dialogs, or raise data.seq_len"
                    )
                t, m = t[:cap], m[:cap]
            toks.append(t)
            masks.append(m)
            where.append(loc)
            flags.append(flag)
            kinds.append(kind)
    lengths = np.array([len(t) for t in toks], dtype=np.int64)
    offsets = np.zeros(len(toks) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    dtype = np.int64 if int(tokenizer.vocab_size) > 2**31 - 1 else np.int32
    n = int(offsets[-1])
    return DialogCorpus(
        np.fromiter(itertools.chain.from_iterable(toks), dtype=dtype, count=n),
        np.fromiter(itertools.chain.from_iterable(masks), dtype=np.bool_, count=n),
        offsets,
        where,
        np.array(flags, dtype=np.bool_) if distill else None,
        np.array(kinds) if any(kinds) else None,
    )


def pack_greedy(lengths: np.ndarray, capacity: int) -> np.ndarray:
    """Row boundaries for laying items of ``lengths`` end to end, in order, into rows of ``capacity`` slots.

    An item goes into the current row when it fits, else it opens a new row (next-fit). Row ``r`` holds
    items ``bounds[r] .. bounds[r+1]-1``. Every length must be at most ``capacity``.
    """
    bounds = [0]
    used = 0
    for i, n in enumerate(lengths.tolist()):
        if n > capacity:
            raise DataError(f"item {i} has length {n} > row capacity {capacity}")
        if used + n > capacity:
            bounds.append(i)
            used = 0
        used += n
    if len(lengths):
        bounds.append(len(lengths))
    return np.asarray(bounds, dtype=np.int64)


def packing_efficiency(row_tokens: Sequence[int] | np.ndarray, seq_len: int) -> float:
    """Fraction of the ``len(row_tokens) * seq_len`` input positions that hold a real (non-padding) token.

    ``row_tokens[r]`` is the number of real tokens laid in row ``r`` (out of ``seq_len + 1`` slots; the last
    slot is only ever a target, so a full row counts ``seq_len``).
    """
    used = np.minimum(np.asarray(row_tokens, dtype=np.int64), seq_len)
    return float(used.sum() / (len(used) * seq_len)) if len(used) else 0.0


def group_by_length(order: np.ndarray, lengths: np.ndarray, batch: int, window: int,
                    rng: np.random.Generator) -> np.ndarray:
    """``order`` rearranged so that each run of ``batch`` consecutive dialogs has similar lengths.

    Each window of ``window * batch`` dialogs of ``order`` is sorted by length (stably), then the full batches
    are shuffled with ``rng`` (so that the length of a step's batch does not follow the step); a tail shorter
    than a batch stays last. Every dialog keeps exactly one place: a permutation of ``order``.
    """
    span = window * batch
    out = order.copy()
    for start in range(0, len(order), span):
        chunk = out[start : start + span]
        out[start : start + span] = chunk[np.argsort(lengths[chunk], kind="stable")]
    n_full = len(out) // batch
    blocks = out[: n_full * batch].reshape(n_full, batch)[rng.permutation(n_full)]
    return np.concatenate([blocks.reshape(-1), out[n_full * batch :]])


class DialogRows:
    """Packed or padded dialog rows for training (shuffled per epoch) or evaluation (file order, once).

    Training: the dialog order of an epoch is a permutation drawn from ``(seed, epoch)``; rows are packed
    in that order and dealt round-robin over ranks (equal counts, partial batches dropped), so the number
    of batches may differ a little between epochs but never between ranks. Evaluation (``train=False``):
    file order, every row on exactly one rank, filled with empty rows to equal full batches.
    ``lead_kinds`` / ``lead_steps``: the first ``lead_steps`` batches of epoch 0 (on every rank) hold only dialogs
    whose kind is one of ``lead_kinds``, drawn at random among them from ``seed``; the rest of epoch 0 is the
    usual order without them (see the module docstring).
    """

    def __init__(
        self,
        corpus: DialogCorpus,
        seq_len: int,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        pad_id: int = 0,
        packing: bool = True,
        train: bool = True,
        name: str = "the dialog data",
        length_grouping: int = 0,
        lead_kinds: Sequence[str] = (),
        lead_steps: int = 0,
    ) -> None:
        check_rank(rank, world_size)
        self.corpus, self.seq_len, self.batch_size = corpus, int(seq_len), int(batch_size)
        self.seed, self.shuffle, self.rank, self.world_size = int(seed), bool(shuffle), rank, world_size
        self.pad_id, self.packing, self.train = int(pad_id), bool(packing), bool(train)
        self.kind = f"dialog-{'packed' if packing else 'padded'}-{'train' if train else 'val'}"
        if length_grouping < 0 or (length_grouping and packing):
            raise ValueError(f"length_grouping={length_grouping}: must be >= 0, and 0 with packing")
        self.length_grouping = int(length_grouping)
        if len(corpus) == 0:
            raise DataError(f"{name} has no dialog")
        too_long = np.nonzero(corpus.lengths > self.seq_len + 1)[0]
        if len(too_long):
            raise DataError(f"{corpus.where[too_long[0]]}: the dialog is longer than seq_len+1={self.seq_len + 1}")
        targets = corpus.mask.copy()
        targets[corpus.offsets[:-1]] = False  # a dialog's first token is never a target
        if not targets.any():
            files = sorted({w.rsplit(":", 1)[0] for w in corpus.where})
            raise DataError(f"{name} has no token to train on: none of its {len(corpus)} dialogs ({', '.join(files)}) "
                            "has an assistant turn, and the loss covers only what the assistant says")
        self.lead_kinds, self.lead_steps = tuple(str(k) for k in lead_kinds), int(lead_steps)
        self._lead_ids = self._lead_candidates(name) if self.lead_steps else None
        self._plan: tuple[int, np.ndarray, np.ndarray, np.ndarray] | None = None
        self._checksum = zlib.crc32(corpus.offsets.tobytes()) ^ sample_checksum(corpus.tokens)
        if corpus.distill is not None:  # which dialogs distil is part of the data a resumed run must find again
            self._checksum ^= zlib.crc32(np.packbits(corpus.distill).tobytes(), 1)
        if self.lead_steps and corpus.kinds is not None:  # which dialog has which kind decides a lead's order
            self._checksum ^= zlib.crc32("\n".join(corpus.kinds.tolist()).encode(), 2)
        if train and self.num_batches(0) == 0:
            n_rows = len(self.plan(0)[1]) - 1
            raise DataError(
                f"{name} is too small: {len(corpus)} dialogs fill {n_rows} rows of seq_len={seq_len}, fewer than "
                f"batch_size*world_size={batch_size * world_size} for one batch per rank"
            )

    def _lead_candidates(self, name: str) -> np.ndarray:
        """Ids of the dialogs a lead draws from; DataError when the kinds are missing from the data."""
        if self.lead_steps < 0:
            raise ValueError(f"lead_steps={self.lead_steps}: must be >= 0")
        if not self.train or not self.lead_kinds:
            raise ValueError("a lead (lead_steps > 0) needs training rows and at least one kind in lead_kinds")
        kinds = self.corpus.kinds
        if kinds is None:
            raise DataError(f"data.lead_kinds: no dialog of {name} has a 'kind', so none can lead the first "
                            f"{self.lead_steps} steps (a JSONL line names its group with \"kind\": \"...\")")
        present = dict(zip(*np.unique(kinds, return_counts=True)))
        missing = [k for k in self.lead_kinds if k not in present]
        if missing:
            have = ", ".join(f"{k or '(none)'}: {int(c)}" for k, c in present.items())
            raise DataError(f"data.lead_kinds: no dialog of {name} has kind {', '.join(map(repr, missing))} "
                            f"(dialogs per kind: {have})")
        return np.nonzero(np.isin(kinds, self.lead_kinds))[0]

    def _lead_split(self, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(the lead: dialogs that fill lead_steps batches on every rank, the rest of ``order`` without them)."""
        rows = self.lead_steps * self.batch_size * self.world_size
        pool = epoch_rng(self.seed, 0, _STREAM_LEAD).permutation(self._lead_ids)
        bounds = pack_greedy(self.corpus.lengths[pool], self.seq_len + 1) if self.packing else np.arange(len(pool) + 1)
        filled = len(bounds) - 1
        if filled < rows:
            raise DataError(
                f"data.lead_steps={self.lead_steps}: the {len(pool)} dialogs of kind {', '.join(self.lead_kinds)} fill "
                f"{filled} rows, fewer than {rows} ({self.lead_steps} steps x batch_size {self.batch_size} x "
                f"{self.world_size} rank(s))")
        lead = pool[: bounds[rows]]
        return lead, order[~np.isin(order, lead)]

    def plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(dialog order, row boundaries into the order, this rank's row ids as (num_batches, batch_size))."""
        plan = self._plan  # one read: the prefetch thread and the consumer may both call plan()
        if plan is None or plan[0] != epoch:
            n = len(self.corpus)
            if self.train:
                order = epoch_rng(self.seed, epoch, _STREAM_ORDER).permutation(n) if self.shuffle else np.arange(n)
                lead = None
                if epoch == 0 and self.lead_steps:
                    lead, order = self._lead_split(order)
                if self.shuffle and self.length_grouping:
                    group_rng = epoch_rng(self.seed, epoch, _STREAM_GROUP)
                    window, width = self.length_grouping, self.batch_size * self.world_size
                    order = group_by_length(order, self.corpus.lengths, width, window, group_rng)
                    if lead is not None:
                        lead = group_by_length(lead, self.corpus.lengths, width, window, group_rng)
                if lead is not None:
                    order = np.concatenate([lead, order])
            else:
                order = np.arange(n)
            if self.packing:
                bounds = pack_greedy(self.corpus.lengths[order], self.seq_len + 1)
            else:
                bounds = np.arange(n + 1)
            n_rows = len(bounds) - 1
            if self.train:
                rows = train_rank_rows(np.arange(n_rows), self.rank, self.world_size, self.batch_size)
            else:
                rows = val_rank_rows(n_rows, self.rank, self.world_size, self.batch_size)
            plan = self._plan = (epoch, order, bounds, rows)
        return plan[1], plan[2], plan[3]

    def num_batches(self, epoch: int = 0) -> int:
        if not self.train and epoch > 0:
            return 0
        return len(self.plan(epoch)[2])

    def row_dialogs(self, epoch: int, row: int) -> np.ndarray:
        """Dialog ids laid in row ``row`` of ``epoch``, in slot order."""
        order, bounds, _ = self.plan(epoch)
        return order[bounds[row] : bounds[row + 1]]

    def packing_efficiency(self, epoch: int = 0) -> float:
        """Fraction of input positions holding a real token, over all rows of ``epoch`` (all ranks; padded
        rows: over this rank's batches, each as wide as :meth:`batch` cuts it)."""
        order, bounds, rows = self.plan(epoch)
        csum = np.concatenate([[0], np.cumsum(self.corpus.lengths[order])])
        row_tokens = csum[bounds[1:]] - csum[bounds[:-1]]
        if self.packing:
            return packing_efficiency(row_tokens, self.seq_len)
        lengths = np.where(rows >= 0, row_tokens[np.maximum(rows, 0)], 0)  # (num_batches, batch_size)
        widths = np.array([self._width(int(n)) for n in lengths.max(1, initial=1)], dtype=np.int64)
        real = np.minimum(lengths, widths[:, None]).sum()
        return float(real / (widths.sum() * rows.shape[1])) if rows.size else 0.0

    def _width(self, longest: int) -> int:
        """Input width of a padded batch whose longest dialog has ``longest`` tokens: ``longest - 1`` rounded up
        to a multiple of 8, at most ``seq_len`` (the columns past it would be padding only)."""
        return min(self.seq_len, max(8, -(-(longest - 1) // 8) * 8))

    def batch(self, epoch: int, index: int) -> dict[str, np.ndarray]:
        _, _, rows = self.plan(epoch)
        ids = rows[index]
        slots = self.seq_len + 1
        tok = np.full((len(ids), slots), self.pad_id, dtype=np.int64)
        msk = np.zeros((len(ids), slots), dtype=np.bool_)
        doc = np.zeros((len(ids), slots), dtype=np.int64)
        pos = np.zeros((len(ids), slots), dtype=np.int64)
        flags = self.corpus.distill
        dis = np.zeros((len(ids), slots), dtype=np.bool_) if flags is not None else None
        longest = 1
        for b, r in enumerate(ids.tolist()):
            c = 0
            dialogs = self.row_dialogs(epoch, r) if r >= 0 else ()
            for j, d in enumerate(dialogs):
                t, m = self.corpus.dialog(int(d))
                n = len(t)
                tok[b, c : c + n] = t
                msk[b, c : c + n] = m
                doc[b, c : c + n] = j
                pos[b, c : c + n] = np.arange(n)
                if dis is not None:
                    dis[b, c : c + n] = flags[d]
                c += n
            longest = max(longest, c)
            doc[b, c:] = len(dialogs)  # trailing padding is a document of its own
            pos[b, c:] = np.arange(slots - c)
        same_doc = doc[:, 1:] == doc[:, :-1]
        out = {"inputs": tok[:, :-1], "targets": np.where(same_doc & msk[:, 1:], tok[:, 1:], IGNORE)}
        if dis is not None:
            out["distill"] = dis[:, 1:] & (out["targets"] != IGNORE)
        if self.packing:
            out["doc_ids"] = doc[:, :-1]
            out["positions"] = pos[:, :-1]
        else:  # one dialog per row, padding at its end: columns past the batch's longest dialog are all padding
            width = self._width(longest)
            out = {k: v[:, :width] for k, v in out.items()}
        return out

    def fingerprint(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "num_dialogs": len(self.corpus), "num_tokens": int(self.corpus.offsets[-1]),
            "checksum": self._checksum,
            "seq_len": self.seq_len, "batch_size": self.batch_size, "seed": self.seed, "shuffle": self.shuffle,
            "rank": self.rank, "world_size": self.world_size,
            **({"length_grouping": self.length_grouping} if self.length_grouping else {}),
            **({"lead_kinds": list(self.lead_kinds), "lead_steps": self.lead_steps} if self.lead_steps else {}),
        }

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_plan": None}
