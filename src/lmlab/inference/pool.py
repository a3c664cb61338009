"""A preallocated, paged key/value pool shared by every sequence the engine serves, and the per-forward
view of it that the model's attention layers talk to.

The pool holds ``n_pages`` pages of ``page_size`` token slots for every layer, allocated once; memory
never grows with the number of requests served. A sequence owns a *page table* (a list of page ids):
its token at position ``p`` lives in slot ``table[p // page_size] * page_size + p % page_size``. Pages
carry reference counts so that the prefix cache and several sequences can share a page of a common
prompt prefix (only full pages are shared, and a shared page is never written again).

:class:`PagedStep` implements :class:`lmlab.models.transformer.AttentionCache` for one forward over
*rows* of *segments*: each segment is ``n`` new tokens of one sequence, starting at position ``start``.
Decoding a batch is B rows of one segment of one token; packed prefill is one row holding several
prompts (or chunks of prompts) back to back, attended with a block-diagonal causal mask.

Beside keys and values, the pool keeps the extra per-token *fields* that the model's modules declare in a
``cache_fields`` attribute (:meth:`PagePool.for_model` collects them), each shaped like the keys: ``raw_keys``
for smeared keys (:class:`lmlab.models.smear.KeySmear`), which the steps' ``previous_keys`` read and write.
A plain Llama declares none and the pool holds keys and values only.

Recurrent layers keep no keys/values: the pool holds them for attention layers only (``kv_layers``; none for a
model without attention), and a :class:`StatePool` holds each running sequence's recurrent state in a slot (plus,
for the prefix cache, one state snapshot per page). The steps' ``states`` (a :class:`StateView`) give the model's
recurrent layers their rows' states (``recurrent_state`` / ``set_recurrent_state``); :class:`StateStep` is the
step of a model without attention (positions and states only).

Usage::

    pool = PagePool.for_model(model, n_tokens=4096, page_size=16)
    pages = pool.alloc(2)                                   # room for 32 tokens
    step = PagedStep(pool, [[Segment(pages, start=0, n=20)]])
    logits = model(tokens[None, :20], cache=step)           # prefill 20 tokens
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lmlab.models.smear import gather_previous

__all__ = ["DecodeBatch", "DecodeStep", "PagePool", "PagedStep", "PoolFullError", "Segment", "StatePool", "StateStep",
           "StateView", "attention_layers", "recurrent_layers"]


def attention_layers(model: nn.Module) -> list[int]:
    """Ids of ``model``'s layers that keep keys/values (all of them for a model without ``layers`` kinds)."""
    layers = getattr(model, "layers", None)
    if layers is None:
        return list(range(model.cfg.n_layers))
    return [i for i, layer in enumerate(layers) if getattr(layer, "kind", "attention") == "attention"]


def recurrent_layers(model: nn.Module) -> list[int]:
    """Ids of ``model``'s layers with a recurrent mixer (their state lives in a :class:`StatePool`)."""
    return [i for i, layer in enumerate(getattr(model, "layers", ())) if getattr(layer, "kind", "attention")
            != "attention"]


class PoolFullError(RuntimeError):
    """The pool has fewer free pages than asked for."""


class PagePool:
    """Keys and values of every layer in ``n_pages`` pages of ``page_size`` slots.

    ``k`` and ``v`` are (n_layers, n_pages * page_size, n_kv_heads, head_dim): a flat slot axis, so a
    sequence's keys are gathered with one index. ``fields[name]`` is the same for each extra per-token field named
    in ``fields`` (e.g. ``raw_keys``). ``refcount[p]`` counts the holders of page ``p`` (sequences and the prefix
    cache); a page returns to the free list when its count drops to 0.
    """

    def __init__(self, n_layers: int, n_pages: int, page_size: int, n_kv_heads: int, head_dim: int, *,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 fields: Sequence[str] = (), kv_layers: Sequence[int] | None = None) -> None:
        for name, val in (("n_layers", n_layers), ("n_pages", n_pages), ("page_size", page_size),
                          ("n_kv_heads", n_kv_heads), ("head_dim", head_dim)):
            if int(val) <= 0:
                raise ValueError(f"PagePool: {name} must be positive, got {val}")
        self.n_layers, self.n_pages, self.page_size = n_layers, n_pages, page_size
        # the layers that keep keys/values (attention; None: all). A recurrent layer keeps none: its state lives in
        # a StatePool. kv_index[layer] is the layer's row of k/v (out of range for a layer without keys/values).
        self.kv_layers = list(range(n_layers)) if kv_layers is None else sorted(int(i) for i in kv_layers)
        self.kv_index = [len(self.kv_layers)] * n_layers
        for i, layer in enumerate(self.kv_layers):
            self.kv_index[layer] = i
        shape = (len(self.kv_layers), n_pages * page_size, n_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.fields = {name: torch.zeros(shape, dtype=dtype, device=device) for name in fields}
        self.refcount = [0] * n_pages
        self._free = list(range(n_pages - 1, -1, -1))  # a stack: pop() hands out low ids first
        # called with a page whose count drops to 1 (its last holder may be the prefix cache, which then may
        # evict it): lets the cache track its evictable pages without scanning (see PrefixCache)
        self.on_last_holder: Callable[[int], None] | None = None

    @classmethod
    def for_model(cls, model: nn.Module, n_tokens: int, page_size: int = 16, *,
                  dtype: torch.dtype | None = None, device: str | torch.device | None = None) -> PagePool:
        """A pool of ``n_tokens`` slots (rounded up to whole pages) shaped for ``model``'s attention, with the
        per-token fields its modules declare (``cache_fields``). Under tensor parallel the pool holds this
        process's key/value heads only (``n_kv_heads / tp``): the KV cache is sharded by heads. Only attention
        layers get keys/values: a model without attention layers gets a pool of page ids and no key/value memory
        (its pages still carry the prefix cache's state snapshots, see :class:`StatePool`)."""
        cfg = model.cfg
        kv_layers = attention_layers(model)
        w = next(model.parameters())
        n_pages = -(-int(n_tokens) // int(page_size))
        fields = sorted({name for m in model.modules() for name in getattr(m, "cache_fields", ())})
        head_dim = cfg.dim // cfg.n_heads
        kv_heads = cfg.n_kv_heads or cfg.n_heads
        first = next((model.layers[i] for i in kv_layers[:1]), None) if hasattr(model, "layers") else None
        wk = getattr(getattr(first, "attention", None), "wk", None)
        if wk is not None and hasattr(wk.weight, "to_local"):  # tensor parallel: this process's key/value heads
            kv_heads = wk.weight.to_local().shape[0] // head_dim
        return cls(cfg.n_layers, n_pages, page_size, kv_heads, head_dim,
                   dtype=dtype or w.dtype, device=device or w.device, fields=fields, kv_layers=kv_layers)

    @property
    def n_free(self) -> int:
        return len(self._free)

    @property
    def n_tokens(self) -> int:
        return self.n_pages * self.page_size

    @property
    def device(self) -> torch.device:
        return self.k.device

    def alloc(self, n: int) -> list[int]:
        """``n`` fresh pages, each with reference count 1; PoolFullError when fewer are free."""
        if n > len(self._free):
            raise PoolFullError(f"PagePool: {n} pages asked, {len(self._free)} of {self.n_pages} free")
        pages = [self._free.pop() for _ in range(n)]
        for p in pages:
            self.refcount[p] = 1
        return pages

    def incref(self, pages: Sequence[int]) -> None:
        for p in pages:
            if self.refcount[p] <= 0:
                raise RuntimeError(f"PagePool: incref of free page {p}")
            self.refcount[p] += 1

    def decref(self, pages: Sequence[int]) -> None:
        refcount, hook = self.refcount, self.on_last_holder
        for p in pages:
            n = refcount[p]
            if n <= 0:
                raise RuntimeError(f"PagePool: decref of free page {p}")
            refcount[p] = n - 1
            if n == 1:
                self._free.append(p)
            elif n == 2 and hook is not None:
                hook(p)


@dataclass
class Segment:
    """``n`` new tokens of one sequence at positions ``start .. start + n - 1``; ``pages`` is its page table
    (it must already cover position ``start + n - 1``)."""

    pages: Sequence[int]
    start: int
    n: int


def _field(fields: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    if name not in fields:
        raise ValueError(f"this page pool keeps no {name!r} field, which the model needs (a module of it declares it "
                         f"in cache_fields): build it with PagePool.for_model(model, ...) or fields=[{name!r}]")
    return fields[name]


def _ints(xs: list[int]) -> torch.Tensor:
    """An int64 tensor from a list of ints, several times faster than torch.tensor for long lists."""
    return torch.frombuffer(array("q", xs), dtype=torch.int64) if xs else torch.zeros(0, dtype=torch.int64)


class StatePool:
    """The recurrent states of a model's recurrent layers, allocated once: ``n_slots`` running *slots* (a running
    sequence owns one; it holds the state after the tokens the sequence has fed) and, for the prefix cache, one
    *snapshot* per page of the :class:`PagePool` (the state after that page's last token, indexed by page id: a
    snapshot lives and dies with its page, so evicting a prefix-cache node frees its snapshot too).

    ``slots[layer][name]`` is (n_slots, *shape) for each tensor of the layer's state (the shapes and dtypes of
    ``mixer.init_state``); ``snapshots[layer][name]`` is (n_snapshots, *shape) (no snapshots when 0). States are
    O(1) in the sequence's length: a recurrent layer needs no keys/values and no pages of its own.
    """

    def __init__(self, shapes: dict[int, dict[str, tuple[tuple[int, ...], torch.dtype]]], n_slots: int,
                 n_snapshots: int = 0, device: str | torch.device = "cpu") -> None:
        if n_slots <= 0 or n_snapshots < 0:
            raise ValueError(f"StatePool: n_slots must be positive and n_snapshots >= 0, got {n_slots}, {n_snapshots}")
        self.n_slots, self.n_snapshots, self.device = n_slots, n_snapshots, torch.device(device)
        self.slots = {layer: {k: torch.zeros((n_slots, *shape), dtype=dt, device=device)
                              for k, (shape, dt) in st.items()} for layer, st in shapes.items()}
        self.snapshots = {} if not n_snapshots else {
            layer: {k: torch.zeros((n_snapshots, *shape), dtype=dt, device=device) for k, (shape, dt) in st.items()}
            for layer, st in shapes.items()}
        self._free = list(range(n_slots - 1, -1, -1))

    @classmethod
    def for_model(cls, model: nn.Module, n_slots: int, n_snapshots: int = 0, *, dtype: torch.dtype | None = None,
                  device: str | torch.device | None = None) -> StatePool:
        """Slots (and snapshots) shaped like the states of ``model``'s recurrent layers (``mixer.init_state``)."""
        w = next(model.parameters())
        device = device or w.device
        shapes = {}
        for i in recurrent_layers(model):
            state = model.layers[i].mixer.init_state(1, device, dtype or w.dtype)
            shapes[i] = {k: (tuple(v.shape[1:]), v.dtype) for k, v in state.items()}
        return cls(shapes, n_slots, n_snapshots, device)

    @property
    def n_free(self) -> int:
        return len(self._free)

    def bytes_per_state(self) -> int:
        """Bytes of one sequence's state, all recurrent layers together."""
        return sum(t[0].numel() * t.element_size() for st in self.slots.values() for t in st.values())

    def alloc(self) -> int:
        if not self._free:
            raise PoolFullError(f"StatePool: all {self.n_slots} slots are taken")
        return self._free.pop()

    def free(self, slot: int) -> None:
        if not 0 <= slot < self.n_slots or slot in self._free:
            raise RuntimeError(f"StatePool: free of slot {slot}, which is not taken")
        self._free.append(slot)

    def _index(self, xs: Sequence[int]) -> torch.Tensor:
        return _ints(list(xs)).to(self.device)

    def load(self, slots: Sequence[int], pages: Sequence[int]) -> None:
        """Set each slot to the snapshot of its page, or to zeros (the state before a sequence's first token) where
        the page is -1."""
        zero = [s for s, p in zip(slots, pages) if p < 0]
        copy = [(s, p) for s, p in zip(slots, pages) if p >= 0]
        if copy and not self.snapshots:
            raise RuntimeError("StatePool: a snapshot was asked of a pool without snapshots")
        zi = self._index(zero) if zero else None
        si = self._index([s for s, _ in copy]) if copy else None
        pi = self._index([p for _, p in copy]) if copy else None
        for layer, st in self.slots.items():
            for k, buf in st.items():
                if zi is not None:
                    buf.index_fill_(0, zi, 0)
                if si is not None:
                    buf.index_copy_(0, si, self.snapshots[layer][k].index_select(0, pi))

    def save(self, slots: Sequence[int], pages: Sequence[int]) -> None:
        """Snapshot each slot's state into its page (the state after that page's last token)."""
        if not slots or not self.snapshots:
            return
        si, pi = self._index(slots), self._index(pages)
        for layer, st in self.slots.items():
            for k, buf in st.items():
                self.snapshots[layer][k].index_copy_(0, pi, buf.index_select(0, si))

    def view(self, slots: Sequence[int]) -> StateView:
        """What one forward's cache step hands the recurrent layers: row ``b`` continues from slot ``slots[b]``."""
        return StateView(self, slots)


class StateView:
    """The recurrent states of one forward's rows: gathered from their slots (``get``) and scattered back after the
    forward (``set``: the state after each row's last token)."""

    def __init__(self, pool: StatePool, slots: Sequence[int]) -> None:
        self.pool = pool
        self.index = pool._index(slots)

    def get(self, layer: int) -> dict[str, torch.Tensor]:
        return {k: buf.index_select(0, self.index) for k, buf in self.pool.slots[layer].items()}

    def set(self, layer: int, state: dict[str, torch.Tensor]) -> None:
        bufs = self.pool.slots[layer]
        if state.keys() != bufs.keys():
            raise ValueError(f"layer {layer}: the mixer returned a state with {sorted(state)}, its init_state has "
                             f"{sorted(bufs)}")
        for k, buf in bufs.items():
            buf.index_copy_(0, self.index, state[k].to(buf.dtype))


class _RecurrentSteps:
    """The recurrent half of a cache step (what :class:`lmlab.models.transformer.Block` calls for a recurrent
    mixer): ``states`` (a :class:`StateView`, set by the engine) holds each row's state. Every row holds one
    sequence, so no state is ever reset inside a row (``resets`` is None)."""

    states: StateView | None = None
    resets: torch.Tensor | None = None

    def recurrent_state(self, layer: int) -> dict[str, torch.Tensor]:
        if self.states is None:
            raise ValueError("this cache step holds no recurrent states: set step.states = StatePool.view(slots) "
                             "for a model with recurrent layers")
        return self.states.get(layer)

    def set_recurrent_state(self, layer: int, state: dict[str, torch.Tensor]) -> None:
        if self.states is None:
            raise ValueError("this cache step holds no recurrent states: set step.states = StatePool.view(slots) "
                             "for a model with recurrent layers")
        self.states.set(layer, state)


class StateStep(_RecurrentSteps):
    """The cache step of a model without attention layers: rows of new tokens (one sequence per row, no padding),
    row ``b`` at positions ``starts[b] ..``, continuing from the states ``states``. No keys, no mask."""

    mask = None

    def __init__(self, starts: Sequence[int], n: int, states: StateView) -> None:
        self.positions = (_ints(list(starts))[:, None] + torch.arange(n)).to(states.pool.device)
        self.states = states


class PagedStep(_RecurrentSteps):
    """One forward's view of a :class:`PagePool` (the model's ``AttentionCache`` interface).

    ``rows[b]`` lists the segments laid out back to back in row ``b`` of the (B, T) token tensor, T the
    widest row (narrower rows are padded at the end). Row ``b``'s keys are the whole context (cached and
    new tokens) of each of its segments, concatenated; a new token sees only the keys of its own sequence
    at positions up to its own. Padding tokens write nothing and see one key, so that no softmax row is
    empty. All planning happens on the host, from Python lists, per page and per new token. With one row
    (packed prefill), ``blocks`` lets the model attend one segment at a time.
    """

    def __init__(self, pool: PagePool, rows: Sequence[Sequence[Segment]]) -> None:
        ps = pool.page_size
        t = max(1, max(sum(s.n for s in row) for row in rows))
        # Keys are gathered a whole page at a time: row b's keys are the pages of its segments back to back
        # (the tail of a segment's last page, past its context, is masked out). Host-side planning is per
        # page and per new token, never per cached token: per page its id, segment and first position; per
        # query its segment and position (segment -1 marks padding pages, -2 padding queries).
        n_pages = max(1, max(sum(-(-(s.start + s.n) // ps) for s in row) for row in rows))
        k_page, k_seg, k_base, q_seg, q_pos, q_key, src, dst = [], [], [], [], [], [], [], []
        for r, row in enumerate(rows):
            col = used = 0
            for j, seg in enumerate(row):
                ctx = seg.start + seg.n
                m = -(-ctx // ps)
                if len(seg.pages) < m:
                    raise ValueError(f"PagedStep: {len(seg.pages)} pages cannot hold {ctx} tokens")
                k_page += seg.pages[:m]
                k_seg += [j] * m
                k_base += range(0, m * ps, ps)
                q_seg += [j] * seg.n
                q_pos += range(seg.start, ctx)
                q_key += range(used * ps + seg.start, used * ps + ctx)  # where each new token's own key lands
                src += range(r * t + col, r * t + col + seg.n)
                dst += [seg.pages[p // ps] * ps + p % ps for p in range(seg.start, ctx)]
                col += seg.n
                used += m
            k_page += [0] * (n_pages - used)
            k_seg += [-1] * (n_pages - used)
            k_base += [0] * (n_pages - used)
            q_seg += [-2] * (t - col)
            q_pos += [0] * (t - col)
            q_key += [0] * (t - col)
        dev = pool.device
        b, n_keys = len(rows), n_pages * ps
        offsets = torch.arange(ps)
        ks = _ints(k_seg).view(b, n_pages, 1).expand(b, n_pages, ps).reshape(b, 1, n_keys)
        kp = (_ints(k_base).view(b, n_pages, 1) + offsets).view(b, 1, n_keys)
        qs, qp_t = _ints(q_seg).view(b, t), _ints(q_pos).view(b, t)
        mask = (ks == qs[:, :, None]) & (kp <= qp_t[:, :, None])
        mask[:, :, 0] |= qs == -2  # padding queries see key 0, so that no softmax row is empty
        self.pool = pool
        self.positions = qp_t.to(dev)
        self.query_key_index = _ints(q_key).view(b, t).to(dev)  # (B, T): each new token's own key among them
        self.mask = mask[:, None].to(dev)
        self._pages = _ints(k_page).to(dev)
        self._shape = (b, n_keys)
        self._src, self._dst = _ints(src).to(dev), _ints(dst).to(dev)
        # one row (packed prefill): attention one sequence at a time, over its own keys only, instead of the
        # dense (T, n_keys) block-diagonal mask (see AttentionCache.blocks); new sequences are plainly causal
        self.blocks = None
        if b == 1 and rows[0] and sum(seg.n for seg in rows[0]) == t:
            self.blocks, col, kcol = [], 0, 0
            for seg in rows[0]:
                ctx = seg.start + seg.n
                m = None
                if seg.start:
                    m = (torch.arange(ctx, device=dev) <= torch.arange(seg.start, ctx, device=dev)[:, None])
                self.blocks.append((col, col + seg.n, kcol, kcol + ctx, m))
                col += seg.n
                kcol += -(-ctx // ps) * ps

    def previous_keys(self, layer: int, k: torch.Tensor, n: int) -> torch.Tensor:
        """Write the new tokens' raw keys and return the raw keys of the ``n`` tokens before each (B, H, T, n, D)."""
        kr = _field(self.pool.fields, "raw_keys")[self.pool.kv_index[layer]]
        b, h, t, d = k.shape
        kr.index_copy_(0, self._dst, k.transpose(1, 2).reshape(b * t, h, d).index_select(0, self._src).to(kr.dtype))
        ctx = kr.view(-1, self.pool.page_size, h, d).index_select(0, self._pages).view(*self._shape, h, d)
        return gather_previous(ctx.transpose(1, 2).to(k.dtype), self.query_key_index, self.positions, n)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new (B, H, T, D) keys/values of real tokens and gather each row's keys (B, H, S, D)."""
        li = self.pool.kv_index[layer]
        ck, cv = self.pool.k[li], self.pool.v[li]
        b, h, t, d = k.shape
        ck.index_copy_(0, self._dst, k.transpose(1, 2).reshape(b * t, h, d).index_select(0, self._src).to(ck.dtype))
        cv.index_copy_(0, self._dst, v.transpose(1, 2).reshape(b * t, h, d).index_select(0, self._src).to(cv.dtype))
        ps = self.pool.page_size
        keys = ck.view(-1, ps, h, d).index_select(0, self._pages).view(*self._shape, h, d).transpose(1, 2)
        values = cv.view(-1, ps, h, d).index_select(0, self._pages).view(*self._shape, h, d).transpose(1, 2)
        return keys.to(k.dtype), values.to(v.dtype)


class DecodeBatch:
    """Contiguous keys/values of the decoding sequences, kept from step to step: a decode step's attention
    reads each sequence's whole context on every layer, and gathering it from the pages every step costs more
    than the attention itself.

    ``k``/``v`` are (n_layers, rows, H, capacity, D), allocated once (and grown, rarely, by copying). Live rows
    are always the first ``n``: a sequence joins by copying its context out of the pool into row ``n``
    (:meth:`add`, a copy of that sequence only), and leaves by moving the last row into its place
    (:meth:`remove`, a copy of one row), so the batch is never rebuilt when the set of decoding sequences
    changes. Each step appends one token per row (:class:`DecodeStep`), to the batch only: the keys/values a
    row gains while decoding reach its pool pages when it leaves (:meth:`remove`, or :meth:`flush`), the one
    time anything reads them there (a prefill of the same sequence, the prefix cache, a re-join). Slots past a
    row's length hold finite leftovers that the mask hides.

    Cascade attention: when every live row's sequence starts with the same pool pages (a prompt prefix shared
    through the prefix cache, e.g. a system prompt), those ``shared_keys`` keys are attended once for the whole
    batch (see :func:`lmlab.models.transformer.cascade_attention`) when there are at least ``cascade_min`` of
    them (0: never).
    """

    def __init__(self, pool: PagePool, rows: int, capacity: int, cascade_min: int = 0) -> None:
        self.pool = pool
        self.cascade_min = cascade_min
        self.tables: list[tuple[int, ...]] = []  # each live row's full pages when it joined
        self.pages: list[Sequence[int]] = []  # each live row's page table (the sequence's list: it grows with it)
        self.flushed: list[int] = []  # tokens of each live row whose keys/values are in its pool pages
        self._shared: int | None = 0  # keys shared by every live row (None: to recompute)
        n_layers, _, h, d = pool.k.shape
        # zeros, not empty: slots past a row's length are read (and masked out), so they must be finite
        self.k = torch.zeros((n_layers, rows, h, capacity, d), dtype=pool.k.dtype, device=pool.device)
        self.v = torch.zeros_like(self.k)
        self.fields = {name: torch.zeros_like(self.k) for name in pool.fields}  # the pool's extra fields, alike
        self.lengths: list[int] = []  # tokens held by each live row

    @property
    def n(self) -> int:
        return len(self.lengths)

    @property
    def rows(self) -> int:
        return self.k.shape[1]

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    def clear(self) -> None:
        """Drop every row without writing its decoded keys/values to the pool (the buffers stay allocated)."""
        self.lengths, self.tables, self.pages, self.flushed, self._shared = [], [], [], [], 0

    def _buffers(self) -> list[torch.Tensor]:
        return [self.k, self.v, *self.fields.values()]

    def _grow(self, rows: int, capacity: int) -> None:
        n_layers, _, h, _, d = self.k.shape
        n, c = self.n, min(self.capacity, capacity)
        grown = []
        for old in self._buffers():
            new = torch.zeros((n_layers, rows, h, capacity, d), dtype=old.dtype, device=old.device)
            new[:, :n, :, :c] = old[:, :n, :, :c]
            grown.append(new)
        self.k, self.v = grown[0], grown[1]
        self.fields = dict(zip(self.fields, grown[2:]))

    def reserve(self, rows: int, capacity: int) -> None:
        """Room for at least ``rows`` rows of ``capacity`` tokens (grows by copying when short)."""
        if rows > self.rows or capacity > self.capacity:
            self._grow(max(rows, self.rows), max(capacity, self.capacity))

    def add(self, seg: Segment) -> int:
        """Copy the first ``seg.start`` tokens of a sequence (page table ``seg.pages``) out of the pool into a new
        last row; its index back. Call :meth:`reserve` first. The row keeps ``seg.pages`` (not a copy) to write
        its decoded tokens back to: pages the sequence appends to that list later are used too."""
        ps, row = self.pool.page_size, self.n
        if row >= self.rows or seg.start >= self.capacity:
            raise ValueError(f"DecodeBatch: no room for a row of {seg.start} tokens ({self.n}/{self.rows} rows "
                             f"of {self.capacity})")
        if len(seg.pages) * ps < seg.start:
            raise ValueError(f"DecodeBatch: {len(seg.pages)} pages cannot hold {seg.start} tokens")
        n_pages = -(-seg.start // ps)
        if n_pages and self.pool.k.shape[0]:  # (a pool of a model without attention holds no keys to copy)
            pages = _ints(list(seg.pages[:n_pages])).to(self.pool.device)
            n_layers, _, h, d = self.pool.k.shape
            for src, dst in self._pairs():
                ctx = src.view(n_layers, -1, ps, h, d).index_select(1, pages).view(n_layers, n_pages * ps, h, d)
                dst[:, row, :, :seg.start] = ctx[:, :seg.start].transpose(1, 2)
        self.lengths.append(seg.start)
        self.tables.append(tuple(seg.pages[:seg.start // ps]))
        self.pages.append(seg.pages)
        self.flushed.append(seg.start)
        self._shared = None
        return row

    def _pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(pool store, batch buffer) of keys, values and the extra fields."""
        pool = self.pool
        return [(pool.k, self.k), (pool.v, self.v)] + [(pool.fields[name], buf) for name, buf in self.fields.items()]

    def flush(self, row: int) -> None:
        """Write the keys/values that ``row`` gained while decoding to its pool pages (a copy of those tokens only)."""
        a, b = self.flushed[row], self.lengths[row]
        if b <= a:
            return
        ps, pages = self.pool.page_size, self.pages[row]
        if len(pages) * ps < b:
            raise ValueError(f"DecodeBatch: {len(pages)} pages cannot hold the {b} tokens of row {row}")
        if not self.pool.k.shape[0]:
            self.flushed[row] = b
            return
        slots = _ints([pages[p // ps] * ps + p % ps for p in range(a, b)]).to(self.pool.device)
        for store, buf in self._pairs():
            store.index_copy_(1, slots, buf[:, row, :, a:b].transpose(1, 2).to(store.dtype))
        self.flushed[row] = b

    @property
    def shared_keys(self) -> int:
        """Keys at the start of every live row that come from the same pool pages (0 with fewer than 2 rows)."""
        if self._shared is None:
            n = 0
            if len(self.tables) >= 2:
                first = self.tables[0]
                n = min(len(t) for t in self.tables)
                for t in self.tables[1:]:
                    n = next((i for i in range(n) if t[i] != first[i]), n)
            self._shared = n * self.pool.page_size
        return self._shared

    def remove(self, row: int, flush: bool = True) -> None:
        """Drop ``row`` (writing what it decoded to its pool pages first, unless ``flush`` is False: its pages are
        about to be freed); the last row moves into its place (the caller renumbers that one)."""
        if flush:
            self.flush(row)
        last = self.n - 1
        if row != last:
            m = self.lengths[last]
            for buf in self._buffers():
                buf[:, row, :, :m] = buf[:, last, :, :m]
            self.lengths[row] = m
            self.tables[row] = self.tables[last]
            self.pages[row] = self.pages[last]
            self.flushed[row] = self.flushed[last]
        for xs in (self.lengths, self.tables, self.pages, self.flushed):
            xs.pop()
        self._shared = None

    def step(self, segs: Sequence[Segment] | None = None) -> DecodeStep:
        """The cache view for one decode forward of every live row, in order (one new token per row, at the
        row's length). ``segs``, when given, are checked to be exactly that (each starting at its row's
        length)."""
        if segs is not None and (len(segs) != self.n or any(s.start != n for s, n in zip(segs, self.lengths))):
            raise ValueError("DecodeStep: the segments must be the batch's rows, each starting at its length")
        return DecodeStep(self)


class DecodeStep(_RecurrentSteps):
    """One decode forward over a :class:`DecodeBatch` (the model's ``AttentionCache`` interface): row ``b`` has
    one new token at position ``lengths[b]``; it sees the row's keys ``0 .. lengths[b]``. Keys are views of
    the batch's first S = max(lengths) + 1 slots. New keys/values are written to the batch only (the batch
    writes them to the pool when the row leaves). The lengths advance when the step is built."""

    def __init__(self, batch: DecodeBatch, segs: Sequence[Segment] | None = None) -> None:
        dev = batch.pool.device
        lengths = batch.lengths
        if segs is not None and (len(segs) != batch.n or any(s.start != n for s, n in zip(segs, lengths))):
            raise ValueError("DecodeStep: the segments must be the batch's rows, each starting at its length")
        if not lengths:
            raise ValueError("DecodeStep: the batch has no rows")
        longest = max(lengths)
        if longest >= batch.capacity:
            raise ValueError(f"DecodeStep: a row of {longest} tokens is full (capacity {batch.capacity})")
        b, h, cap = len(lengths), batch.k.shape[2], batch.capacity
        self.batch = batch
        cols = _ints(lengths)
        # the new token of (row r, head j) goes to slot (r * H + j) * capacity + length[r] of a layer's rows
        self._slot = ((torch.arange(b)[:, None] * h + torch.arange(h)) * cap + cols[:, None]).view(-1).to(dev)
        cols = cols.to(dev)
        self.positions = cols[:, None]  # (B, 1): also where each row's new key lands among its keys
        self._n = longest + 1  # keys past the longest row are never read
        self.mask = (torch.arange(self._n, device=dev) <= cols[:, None])[:, None, None, :]
        shared = batch.shared_keys
        self.shared_keys = shared if batch.cascade_min and shared >= batch.cascade_min else 0
        batch.lengths = [n + 1 for n in lengths]

    def previous_keys(self, layer: int, k: torch.Tensor, n: int) -> torch.Tensor:
        """Write the new raw keys (B, H, 1, D) to the batch; the raw keys of the ``n`` tokens before each back
        (B, H, 1, n, D): a gather of n slots per row, whatever the rows' lengths."""
        bkr = _field(self.batch.fields, "raw_keys")[self.batch.pool.kv_index[layer]]
        b, h, _, d = k.shape
        bkr.view(-1, d).index_copy_(0, self._slot, k.reshape(b * h, d).to(bkr.dtype))
        return gather_previous(bkr[:b].to(k.dtype), self.positions, self.positions, n)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new (B, H, 1, D) keys/values to the batch; the batch's (B, H, S, D) back, S the longest row's
        context."""
        batch = self.batch
        li = batch.pool.kv_index[layer]
        bk, bv = batch.k[li], batch.v[li]
        b, h, _, d = k.shape
        bk.view(-1, d).index_copy_(0, self._slot, k.reshape(b * h, d).to(bk.dtype))
        bv.view(-1, d).index_copy_(0, self._slot, v.reshape(b * h, d).to(bv.dtype))
        return bk[:b, :, :self._n].to(k.dtype), bv[:b, :, :self._n].to(v.dtype)
