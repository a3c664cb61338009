"""Multi-query associative recall (MQAR, Zoology: Arora et al. 2023, arXiv 2312.04927) as a data kind, and its accuracy.

A sequence of ``seq_len`` ids holds ``n`` key-value pairs, then queries: keys seen before, each of which must be
answered with its value. Keys come from ``[1, V/2)`` and values from ``[V/2, V)`` (``V = data.mqar.vocab_size``),
all distinct within a sequence, as in Zoology's ``multiquery_ar``::

    position  0   1   2   3  ...  2n-2 2n-1 | 2n      2n+1  2n+2    ...
    inputs    k1  v1  k2  v2 ...  kn   vn   | fill    fill  k2      fill ...
    targets   -   -   -   -  ...  -    -    | -       -     v2      -    ...

After the pairs come ``(seq_len - 2n) // 2`` two-token slots; each query key sits at the start of a slot and its
target (the loss is taken there only, everywhere else -100) is its value: the model answers at the query's
position, from the key alone. Slots are drawn without replacement, with Zoology's power law (slot ``i >= 1`` with
weight ``i^(alpha-1)``, alpha 0.01: short gaps after the pairs likelier) or uniformly; the positions that hold no
query get random ids (Zoology's ``random_non_queries``) or 0.

Example ``i`` of a split is a pure function of ``(seed, split, i)`` and the settings, so a training epoch is a seeded
permutation of a pool of ``train_size`` sequences and the loader state is the usual position (exact resume). The
validation set is ``val_size`` sequences drawn from ``val_seed``: the same for every run of any run seed. With
several ``num_kv_pairs`` a training sequence draws one, and validation row ``i`` takes the ``i mod k``-th.

The model sees the ids directly: the tokenizer only sizes the embedding (the byte tokenizer's 264 ids cover
``vocab_size <= 264``; a larger vocabulary needs a larger tokenizer, e.g. tiktoken).

Usage (config: ``data.kind: mqar`` and the ``data.mqar`` section, see :class:`lmlab.config.MQARConfig`)::

    from lmlab.data.mqar import MQARRows, evaluate_mqar, mqar_accuracy
    val = MQARRows(cfg.data.mqar, seq_len=64, batch_size=32, split="val")
    ex = val.example(0)        # {"inputs", "targets", "distance" (T,), "num_kv_pairs"}
    metrics = evaluate_mqar(model, cfg.data)   # {"mqar/acc": ..., "mqar/acc/kv8": ..., "mqar/acc/dist2-3": ...}
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from lmlab.data.base import IGNORE, check_rank, epoch_rng, train_rank_rows, val_rank_rows
from lmlab.data.errors import DataError

__all__ = ["MQARAccuracy", "MQARRows", "distance_bin", "evaluate_mqar", "example_rng", "make_example",
           "mqar_accuracy", "mqar_source"]

_SPLIT_STREAM = {"train": 0, "val": 1}  # example seeds: (seed, stream, i), so train and val never share draws
_ORDER_STREAM = 7


def example_rng(seed: int, stream: int, i: int) -> np.random.Generator:
    """The generator of example ``i``: counter-based (Philox keyed by the seed, counter (0, 0, i, stream)), so
    examples are independent and cheap to start (no seed hashing); an example draws far fewer than 2^64 blocks."""
    return np.random.Generator(np.random.Philox(key=int(seed) % 2**64, counter=[0, 0, int(i), int(stream)]))


def _slot_weights(space: int, placement: str, alpha: float) -> np.ndarray | None:
    if placement == "uniform":
        return None
    p = np.arange(1, space + 1, dtype=np.float64) ** (alpha - 1.0)
    return p / p.sum()


def make_example(rng: np.random.Generator, vocab_size: int, seq_len: int, num_kv_pairs: int, num_queries: int = 0,
                 placement: str = "power", alpha: float = 0.01, random_fill: bool = True) -> dict[str, Any]:
    """One MQAR sequence (see the module doc) from ``rng``.

    Returns ``inputs`` and ``targets`` (int64, (seq_len,)), ``distance`` (int64, (seq_len,): at each query, its
    position minus its key's; -1 elsewhere) and ``num_kv_pairs``.
    """
    n = int(num_kv_pairs)
    q = int(num_queries) or n
    half = vocab_size // 2
    space = (seq_len - 2 * n) // 2
    if n > half - 1 or n > vocab_size - half:
        raise DataError(f"mqar: {n} pairs need {n} distinct keys and values; vocab_size={vocab_size} has "
                        f"{half - 1} keys")
    if q > n or q > space:
        raise DataError(f"mqar: {q} queries need as many pairs ({n}) and free slots ((seq_len - 2n) // 2 = {space})")
    keys = rng.permutation(half - 1)[:n] + 1
    values = rng.permutation(vocab_size - half)[:n] + half
    asked = rng.permutation(n)[:q]  # which pairs are queried, in the order of their slots' draw
    weights = _slot_weights(space, placement, alpha)
    if weights is None:
        slots = rng.permutation(space)[:q]
    else:  # q slots without replacement, successively in proportion to the weights (Efraimidis-Spirakis: the
        # q smallest Exp(1)/w), as numpy's choice(replace=False, p=w) draws them but ~20x faster
        slots = np.argsort(rng.standard_exponential(space) / weights, kind="stable")[:q]
    if random_fill:
        inputs = rng.integers(0, vocab_size, size=seq_len, dtype=np.int64)
    else:
        inputs = np.zeros(seq_len, dtype=np.int64)
    inputs[0:2 * n:2], inputs[1:2 * n:2] = keys, values
    targets = np.full(seq_len, IGNORE, dtype=np.int64)
    distance = np.full(seq_len, -1, dtype=np.int64)
    pos = 2 * n + 2 * slots
    inputs[pos], targets[pos], distance[pos] = keys[asked], values[asked], pos - 2 * asked
    return {"inputs": inputs, "targets": targets, "distance": distance, "num_kv_pairs": n}


class MQARRows:
    """The batch source of one MQAR split (the loader contract of :mod:`lmlab.data.base`).

    ``cfg`` is a :class:`lmlab.config.MQARConfig`. Training (``split="train"``): each epoch a seeded permutation of
    the ``train_size`` examples of ``seed`` (dealt over ranks, partial batch dropped). Validation: the ``val_size``
    examples of ``cfg.val_seed`` in order, padded with empty rows (targets all -100) to full batches on every rank.
    """

    def __init__(self, cfg: Any, seq_len: int, batch_size: int, split: str = "train", seed: int = 0,
                 shuffle: bool = True, rank: int = 0, world_size: int = 1) -> None:
        if split not in _SPLIT_STREAM:
            raise DataError(f"split must be 'train' or 'val', got {split!r}")
        check_rank(rank, world_size)
        self.cfg, self.split = cfg, split
        self.seq_len, self.batch_size = int(seq_len), int(batch_size)
        self.seed = int(cfg.val_seed if split == "val" else seed)
        self.shuffle, self.rank, self.world_size = bool(shuffle), rank, world_size
        self.size = int(cfg.val_size if split == "val" else cfg.train_size)
        self.kv = [int(n) for n in cfg.num_kv_pairs]
        if not self.kv:
            raise DataError("data.mqar.num_kv_pairs is empty")
        for n in self.kv:  # fail at construction, not at some later batch
            q = cfg.num_queries or n
            if 2 * n + 2 * q > self.seq_len:
                raise DataError(f"data.mqar: {n} pairs and {q} queries need seq_len >= {2 * n + 2 * q}, got "
                                f"{self.seq_len}")
        if split == "train" and self.size // world_size < batch_size:
            raise DataError(f"data.mqar.train_size={self.size} gives fewer than batch_size*world_size="
                            f"{batch_size * world_size} rows for one batch per rank")
        self._plan: tuple[int, np.ndarray] | None = None

    # -- examples ------------------------------------------------------------------------------------
    def example(self, i: int) -> dict[str, Any]:
        """Example ``i`` of this split (a pure function of the seed, the split, ``i`` and the settings)."""
        if not 0 <= i < self.size:
            raise IndexError(f"mqar {self.split} example {i} out of range [0, {self.size})")
        rng = example_rng(self.seed, _SPLIT_STREAM[self.split], i)
        if self.split == "val":
            n = self.kv[i % len(self.kv)]
        else:
            n = self.kv[int(rng.integers(len(self.kv)))] if len(self.kv) > 1 else self.kv[0]
        c = self.cfg
        return make_example(rng, c.vocab_size, self.seq_len, n, c.num_queries, c.placement, c.power_alpha,
                            c.random_fill)

    def examples(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Stacked examples of ``rows`` (-1: an empty row, inputs 0 and no target), with their metadata:
        ``inputs``, ``targets``, ``distance`` (B, T) and ``num_kv_pairs`` (B,) (0 for an empty row)."""
        out = {k: np.zeros((len(rows), self.seq_len), dtype=np.int64) for k in ("inputs", "targets", "distance")}
        out["targets"][:], out["distance"][:] = IGNORE, -1
        out["num_kv_pairs"] = np.zeros(len(rows), dtype=np.int64)
        for j, i in enumerate(rows):
            if i < 0:
                continue
            ex = self.example(int(i))
            for k in ("inputs", "targets", "distance", "num_kv_pairs"):
                out[k][j] = ex[k]
        return out

    # -- the source contract -------------------------------------------------------------------------
    def rows(self, epoch: int, index: int) -> np.ndarray:
        """Example ids of batch ``index`` of ``epoch`` on this rank (-1: an empty validation row)."""
        if self.split == "val":
            return val_rank_rows(self.size, self.rank, self.world_size, self.batch_size)[index]
        plan = self._plan  # one read: a prefetch thread and the consumer may both get here
        if plan is None or plan[0] != epoch:
            if self.shuffle:
                order = epoch_rng(self.seed, epoch, _ORDER_STREAM).permutation(self.size)
            else:
                order = np.arange(self.size)
            plan = self._plan = (epoch, train_rank_rows(order, self.rank, self.world_size, self.batch_size))
        return plan[1][index]

    def num_batches(self, epoch: int = 0) -> int:
        if self.split == "val":
            chunk = self.world_size * self.batch_size
            return -(-self.size // chunk)
        return (self.size // self.world_size) // self.batch_size

    def batch(self, epoch: int, index: int) -> dict[str, np.ndarray]:
        ex = self.examples(self.rows(epoch, index))
        return {"inputs": ex["inputs"], "targets": ex["targets"]}

    def fingerprint(self) -> dict[str, Any]:
        c = self.cfg
        return {
            "kind": f"mqar-{self.split}", "vocab_size": c.vocab_size, "num_kv_pairs": list(self.kv),
            "num_queries": c.num_queries, "placement": c.placement, "power_alpha": c.power_alpha,
            "random_fill": c.random_fill, "size": self.size, "seq_len": self.seq_len, "batch_size": self.batch_size,
            "seed": self.seed, "shuffle": self.shuffle, "rank": self.rank, "world_size": self.world_size,
        }

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_plan": None}


def mqar_source(cfg: Any, tokenizer: Any, split: str = "train", seq_len: int | None = None,
                batch_size: int | None = None, rank: int = 0, world_size: int = 1, seed: int = 0) -> MQARRows:
    """The MQAR source of a :class:`lmlab.config.DataConfig` (``kind: mqar``); what ``build_loader`` uses."""
    m = cfg.mqar
    if tokenizer is not None and m.vocab_size > int(tokenizer.vocab_size):
        raise DataError(f"data.mqar.vocab_size={m.vocab_size} is larger than the tokenizer's {tokenizer.vocab_size} "
                        "ids, which size the model's embedding: lower it (the byte tokenizer takes up to 264) or "
                        "use a larger tokenizer")
    return MQARRows(m, seq_len=seq_len or cfg.seq_len, batch_size=batch_size or cfg.batch_size, split=split,
                    seed=seed, shuffle=cfg.shuffle, rank=rank, world_size=world_size)


# --------------------------------------------------------------------------------------------------
# Accuracy (torch is imported inside: the data modules import numpy only, for a fast prefetch process).
# --------------------------------------------------------------------------------------------------


def distance_bin(d: int) -> str:
    """The power-of-two bin of a query-to-key distance: 2-3, 4-7, 8-15, ..."""
    lo = 1 << (int(d).bit_length() - 1)
    return f"dist{lo}-{2 * lo - 1}"


class MQARAccuracy:
    """Accumulates argmax accuracy at the query positions over batches; :meth:`metrics` gives ``mqar/acc``,
    ``mqar/n`` (queries), and per slice ``mqar/acc/kvN`` (sequences of N pairs) and ``mqar/acc/distA-B``
    (query-to-key distance in a power-of-two bin)."""

    def __init__(self) -> None:
        self.correct: dict[str, int] = {}
        self.total: dict[str, int] = {}

    def _add(self, key: str, correct: int, total: int) -> None:
        self.correct[key] = self.correct.get(key, 0) + int(correct)
        self.total[key] = self.total.get(key, 0) + int(total)

    def update(self, logits: Any, targets: Any, distance: Any = None, num_kv_pairs: Any = None) -> None:
        """``logits`` (B, T, V) and ``targets`` (B, T) (-100: no query), or already-selected ``logits`` (N, V) with
        ``targets`` (B, T) whose N non-ignored positions they belong to (row-major, as ``logits_at`` gives them).
        ``distance`` (B, T) and ``num_kv_pairs`` (B,) add the slices."""
        import torch

        targets = torch.as_tensor(targets)
        keep = targets != IGNORE
        logits = torch.as_tensor(logits)
        pred = logits[keep] if logits.dim() == 3 else logits
        if pred.shape[0] != int(keep.sum()):
            raise ValueError(f"{pred.shape[0]} rows of logits for {int(keep.sum())} query positions")
        hit = (pred.argmax(-1) == targets[keep]).cpu().numpy()
        self._add("", hit.sum(), hit.size)
        if num_kv_pairs is not None:
            rows = torch.nonzero(keep)[:, 0].cpu().numpy()
            kv = np.asarray(torch.as_tensor(num_kv_pairs).cpu())[rows]
            for n in np.unique(kv):
                sel = kv == n
                self._add(f"kv{int(n)}", hit[sel].sum(), sel.sum())
        if distance is not None:
            d = np.asarray(torch.as_tensor(distance)[keep].cpu())
            bins = np.array([distance_bin(x) for x in d]) if d.size else np.array([], dtype=str)
            for b in np.unique(bins):
                sel = bins == b
                self._add(str(b), hit[sel].sum(), sel.sum())

    def metrics(self, prefix: str = "mqar") -> dict[str, float]:
        out: dict[str, float] = {}
        total = self.total.get("", 0)
        out[f"{prefix}/acc"] = self.correct.get("", 0) / total if total else float("nan")
        out[f"{prefix}/n"] = total

        def order(k: str) -> tuple:  # kv4 before kv16, dist2-3 before dist16-31
            name, number = re.match(r"([a-z]+)(\d+)", k).groups()
            return (name != "kv", int(number))

        for key in sorted((k for k in self.total if k), key=order):
            out[f"{prefix}/acc/{key}"] = self.correct[key] / self.total[key]
        return out


def mqar_accuracy(logits: Any, targets: Any, distance: Any = None, num_kv_pairs: Any = None) -> dict[str, float]:
    """Accuracy of one batch (see :class:`MQARAccuracy`)."""
    acc = MQARAccuracy()
    acc.update(logits, targets, distance, num_kv_pairs)
    return acc.metrics()


def evaluate_mqar(model: Any, data_cfg: Any, batch_size: int | None = None, max_batches: int = 0,
                  device: Any = None) -> dict[str, float]:
    """Accuracy of ``model`` (a :class:`lmlab.models.transformer.Transformer`) on the MQAR validation set of
    ``data_cfg`` (a DataConfig with ``kind: mqar``): argmax of the logits at each query position vs its value."""
    import torch

    if data_cfg.kind != "mqar":
        raise DataError(f"evaluate_mqar needs data.kind mqar, got {data_cfg.kind!r}")
    src = MQARRows(data_cfg.mqar, seq_len=data_cfg.seq_len, batch_size=batch_size or data_cfg.batch_size,
                   split="val")
    if device is None:
        device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    acc = MQARAccuracy()
    try:
        with torch.no_grad():
            for index in range(src.num_batches(0)):
                if max_batches and index >= max_batches:
                    break
                ex = src.examples(src.rows(0, index))
                inputs = torch.from_numpy(ex["inputs"]).to(device)
                targets = torch.from_numpy(ex["targets"]).to(device)
                logits = model(inputs, logits_at=targets != IGNORE)
                acc.update(logits.float(), targets, torch.from_numpy(ex["distance"]),
                           torch.from_numpy(ex["num_kv_pairs"]))
    finally:
        model.train(was_training)
    return acc.metrics()
