"""A preallocated key/value cache for a batch of sequences of different lengths.

Memory for ``batch_size`` sequences of up to ``max_len`` tokens is allocated once, when the cache is
built, and never grows. Each row has its own length. A forward through the model adds new tokens to
some or all rows: :meth:`KVCache.step` reserves their slots and returns a :class:`KVCacheStep`, the
object the model's attention layers talk to (it implements
:class:`lmlab.models.transformer.AttentionCache`): it knows each new token's position, where its
key/value goes, and which cached keys each new query may see.

Rows are right-padded: ``step(n_new)`` adds ``n_new[b]`` tokens to row ``b`` (0 leaves the row as it is),
read from the first ``n_new[b]`` columns of a (B, T) token tensor; the other columns are padding whose
keys/values are written to a scratch slot that no query ever sees, and whose outputs are meaningless.

Usage::

    cache = KVCache.for_model(model, batch_size=2, max_len=64)
    tokens = torch.tensor([[5, 6, 7], [8, 9, 0]])            # prompts of 3 and 2 tokens (0 is padding)
    logits = model(tokens, cache=cache.step([3, 2]))          # prefill both rows in one forward
    last = logits[torch.arange(2), torch.tensor([2, 1])]      # each row's last real token
    nxt = last.argmax(-1, keepdim=True)                       # (2, 1)
    logits = model(nxt, cache=cache.step([1, 1]))             # one decode step for the whole batch
    cache.lengths                                             # tensor([4, 3])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lmlab.models.smear import gather_previous

__all__ = ["KVCache", "KVCacheStep"]


class KVCache:
    """Keys and values of every layer for ``batch_size`` sequences of up to ``max_len`` tokens.

    ``k`` and ``v`` are (n_layers, batch_size, n_kv_heads, max_len + 1, head_dim); slot ``t`` of a row holds
    its token at position ``t`` and the extra last slot is scratch for padding tokens. ``lengths`` (B,)
    int64, on the CPU, counts the tokens each row holds: bookkeeping stays on the host so that planning
    a step never waits for the device.
    """

    def __init__(
        self,
        n_layers: int,
        batch_size: int,
        max_len: int,
        n_kv_heads: int,
        head_dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        raw_keys: bool = False,
    ) -> None:
        for name, val in (("n_layers", n_layers), ("batch_size", batch_size), ("max_len", max_len),
                          ("n_kv_heads", n_kv_heads), ("head_dim", head_dim)):
            if int(val) <= 0:
                raise ValueError(f"KVCache: {name} must be positive, got {val}")
        self.n_layers, self.batch_size, self.max_len = n_layers, batch_size, max_len
        shape = (n_layers, batch_size, n_kv_heads, max_len + 1, head_dim)
        # zeros, not empty: a padding query may read the (finite) slot 0 of an empty row
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.kr = torch.zeros(shape, dtype=dtype, device=device) if raw_keys else None  # smeared-key models' raw keys
        self.lengths = torch.zeros(batch_size, dtype=torch.int64)

    @classmethod
    def for_model(
        cls,
        model: nn.Module,
        batch_size: int,
        max_len: int,
        *,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
    ) -> KVCache:
        """A cache shaped for ``model`` (a :class:`~lmlab.models.transformer.Transformer`).

        ``dtype`` and ``device`` default to those of the model's weights. ``max_len`` may not exceed the
        model's ``max_seq_len`` (its rotary tables end there).
        """
        cfg = model.cfg
        if max_len > cfg.max_seq_len:
            raise ValueError(f"KVCache: max_len={max_len} exceeds the model's max_seq_len={cfg.max_seq_len}")
        w = model.tok_embeddings.weight
        return cls(cfg.n_layers, batch_size, max_len, cfg.n_kv_heads or cfg.n_heads, cfg.dim // cfg.n_heads,
                   dtype=dtype or w.dtype, device=device or w.device, raw_keys=bool(cfg.smear_keys))

    @property
    def device(self) -> torch.device:
        return self.k.device

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def reset(self, rows: Sequence[int] | None = None) -> None:
        """Empty ``rows`` (all by default) so they can hold new sequences; no memory is touched."""
        if rows is None:
            self.lengths.zero_()
        else:
            self.lengths[list(rows)] = 0

    def step(self, n_new: int | Sequence[int] | torch.Tensor, width: int | None = None) -> KVCacheStep:
        """Reserve slots for ``n_new[b]`` new tokens in each row ``b`` and plan the forward that fills them.

        ``n_new``: one count per row, or one int for every row. ``width``: columns of the token tensor the
        forward gets (default ``max(n_new)``, at least 1). The lengths advance now: the forward that uses the
        returned step must run (a step whose forward failed leaves unfilled slots; ``reset`` the rows).
        Adding more tokens than a row has room for is a ValueError naming the row.
        """
        b = self.batch_size
        if isinstance(n_new, int):
            n = torch.full((b,), n_new, dtype=torch.int64)
        else:
            n = torch.as_tensor(n_new, dtype=torch.int64).cpu()
            if n.shape != (b,):
                raise ValueError(f"KVCache.step: expected {b} new-token counts (one per row), got shape "
                                 f"{tuple(n.shape)}")
        if (n < 0).any():
            raise ValueError(f"KVCache.step: new-token counts must be >= 0, got {n.tolist()}")
        start = self.lengths
        end = start + n
        if (end > self.max_len).any():
            row = int((end > self.max_len).nonzero()[0, 0])
            raise ValueError(
                f"KV cache overflow: row {row} holds {int(start[row])} tokens and {int(n[row])} more would exceed "
                f"max_len={self.max_len}; build the cache with a larger max_len"
            )
        t = int(n.max()) if width is None else width
        t = max(t, 1)
        if t < int(n.max()):
            raise ValueError(f"KVCache.step: width={width} is narrower than the {int(n.max())} new tokens of a row")
        step = KVCacheStep._plan(self, start, n, t)
        self.lengths = end
        return step


@dataclass
class KVCacheStep:
    """One forward's view of a :class:`KVCache` (the model's ``AttentionCache`` interface).

    ``positions`` (B, T): position of each new token (0 for padding). ``slots`` (B, T): cache slot its
    key/value is written to (the scratch slot for padding). ``mask`` (B, 1, T, S): new token ``t`` of row
    ``b`` sees slot ``s`` iff ``s <= positions[b, t]`` (padding tokens see their row's tokens, so that no
    softmax row is empty); ``None`` when every row starts empty and gets T tokens, where plain causal
    attention over the new tokens is exact. ``n_keys`` = S: keys returned by ``update``, the longest row.
    """

    cache: KVCache
    positions: torch.Tensor
    slots: torch.Tensor
    mask: torch.Tensor | None
    n_keys: int

    @staticmethod
    def _plan(cache: KVCache, start: torch.Tensor, n: torch.Tensor, t: int) -> KVCacheStep:
        dev = cache.device
        end = start + n
        s_keys = max(int(end.max()), 1)
        if bool((start == 0).all()) and bool((n == t).all()):
            pos = torch.arange(t, device=dev).expand(cache.batch_size, t)
            return KVCacheStep(cache, pos, pos, None, t)
        start_d, n_d, end_d = (x.to(dev, non_blocking=True) for x in (start, n, end))
        col = torch.arange(t, device=dev)
        qpos = start_d[:, None] + col  # (B, T)
        valid = col < n_d[:, None]
        positions = torch.where(valid, qpos, 0)
        slots = torch.where(valid, qpos, cache.max_len)
        keys = torch.arange(s_keys, device=dev)
        # for a real token, s <= qpos already implies s < end; the second term only limits padding queries
        mask = (keys <= qpos[:, :, None]) & (keys < end_d.clamp(min=1)[:, None, None])
        return KVCacheStep(cache, positions, slots, mask[:, None], s_keys)

    def previous_keys(self, layer: int, k: torch.Tensor, n: int) -> torch.Tensor:
        """Write the new raw keys (B, H, T, D) of ``layer``; the raw keys of the ``n`` tokens before each back."""
        if self.cache.kr is None:
            raise ValueError("this KV cache keeps no raw keys, which a model with smeared keys needs: build it with "
                             "KVCache.for_model(model, ...) or raw_keys=True")
        kr = self.cache.kr[layer]
        rows = torch.arange(kr.shape[0], device=kr.device)[:, None]
        kr[rows, :, self.slots] = k.transpose(1, 2).to(kr.dtype)
        # a row holds one sequence from slot 0: a token's own key lies at its position
        return gather_previous(kr[:, :, : self.n_keys].to(k.dtype), self.positions, self.positions, n)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new (B, H, T, D) keys/values of ``layer`` and return its first ``n_keys`` slots."""
        ck, cv = self.cache.k[layer], self.cache.v[layer]
        rows = torch.arange(ck.shape[0], device=ck.device)[:, None]
        # advanced indices around a slice put the indexed dims first: the target is (B, T, H, D)
        ck[rows, :, self.slots] = k.transpose(1, 2).to(ck.dtype)
        cv[rows, :, self.slots] = v.transpose(1, 2).to(cv.dtype)
        keys, values = ck[:, :, : self.n_keys], cv[:, :, : self.n_keys]
        if keys.dtype != k.dtype:
            keys, values = keys.to(k.dtype), values.to(v.dtype)
        return keys, values
