"""Smeared keys and queries: an optional attention module, apart from the plain Llama.

Smeared keys (``cfg.smear_keys = N``, after the smeared-key model of Olsson et al. 2022, "In-context learning and
induction heads"): a layer replaces key ``k_j`` by ``sum_d a_d k_{j-d}`` over ``d = 0..N``, with weights
``a = softmax(s)`` learned per key/value head (keys before the first token of a sequence or packed document count
as zero); with ``cfg.smear_channels`` the weights are learned per key channel (a causal depthwise convolution), so
different channels of one key can hold different earlier tokens. A key then also says which tokens precede it, so
one attention layer can find where the current context occurred before and copy what followed: copying tasks (a
name from a question into a SQL query) are learned several times faster. With ``cfg.smear_queries``, each query
also gets ``sum_d w_d k_{j-d}`` over ``d = 1..N`` (learned per query channel, zero at first) from the raw keys of
the tokens before it, so that a query says which tokens precede it too and the match is on a context on both
sides (copying "Svetlana" without jumping from its first "a" to the second).

:class:`KeySmear` is the module an attention layer holds (as ``smear``; ``None`` in the plain Llama) and calls on
its queries and keys after the rotary embedding, before attention. Its parameters are ``smear.keys`` (the key
logits ``s``: (n_kv_heads, N + 1), or (n_kv_heads, head_dim, N + 1) per channel) and ``smear.queries`` (the query
weights ``w``: (n_heads, head_dim, N)); checkpoints saved before the module existed named them
``attention.smear`` and ``attention.query_smear`` (:attr:`KeySmear.OLD_NAMES`: they still load).

Both need, for each new token, the *raw* keys of the N tokens before it in its sequence (:func:`previous_keys` for
a forward without a cache; a cache returns them from ``previous_keys(layer, k, n)``, storing the new raw keys in
the per-token field ``raw_keys`` that the module declares in :attr:`KeySmear.cache_fields`). A smeared key is
computed once, when its token goes through the model, and cached as the token's key: cached decoding equals full
recomputation and costs the same whatever the length of the cached context.

Usage::

    smear = KeySmear(cfg, n_heads, n_kv_heads, head_dim, layer_id)   # in an attention layer's __init__
    q, k = smear(q, k, mask, cache)                                  # in its forward, after the rotary embedding
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.config import ModelConfig

__all__ = ["SMEAR_INIT", "KeySmear", "gather_previous", "previous_keys", "smear_keys", "smear_queries",
           "smear_shifted"]

SMEAR_INIT = -1.0  # initial smear logit of each earlier token (the token's own: 0): weights 0.58/0.21/... for N=2


class KeySmear(nn.Module):
    """Smeared keys (and, with ``cfg.smear_queries``, smeared queries) of attention layer ``layer_id``."""

    # what a KV cache keeps for it beside each token's key and value: its raw (unsmeared) key
    cache_fields = ("raw_keys",)
    # the parameters' names in checkpoints saved before this module existed, relative to the attention layer
    OLD_NAMES = {"keys": "smear", "queries": "query_smear"}

    def __init__(self, cfg: ModelConfig, n_heads: int, n_kv_heads: int, head_dim: int, layer_id: int = 0):
        super().__init__()
        self.layer_id = layer_id  # names this layer's raw keys in a cache
        self.n = cfg.smear_keys  # earlier tokens mixed in
        self.init_logits = list(cfg.smear_init) or [0.0] + [SMEAR_INIT] * self.n  # own key first
        self.n_heads = n_heads
        shape = (n_kv_heads, head_dim) if cfg.smear_channels else (n_kv_heads,)
        self.keys = nn.Parameter(torch.empty(*shape, self.n + 1))  # logits: [..., 0] the token's own key
        self.queries = nn.Parameter(torch.empty(n_heads, head_dim, self.n)) if cfg.smear_queries else None

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.keys.copy_(torch.tensor(self.init_logits, dtype=self.keys.dtype).expand_as(self.keys))
        if self.queries is not None:
            nn.init.zeros_(self.queries)  # queries start as plain queries

    def forward(self, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None,
                cache=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries (B, n_heads, T, D) and keys (B, n_kv_heads, T, D) of the new tokens, smeared; ``mask`` and
        ``cache`` as the attention layer got them (the keys of each new token are smeared once, here)."""
        if cache is None:  # packed documents: a token's position is the count of its document's keys before it
            pos = None if mask is None else mask.sum(-1)[:, 0] - 1
            if self.queries is None:  # training's path: shifted views of the keys, no (B, H, T, N, D) copy
                return q, smear_shifted(k, pos, self.keys)
            if pos is None:
                pos = torch.arange(k.shape[2], device=k.device).view(1, -1)
            prev = previous_keys(k, pos, self.n)
        else:
            prev = cache.previous_keys(self.layer_id, k, self.n)
        if self.queries is not None:
            q = q + smear_queries(prev, self.queries, self.n_heads)
        return q, smear_keys(k, prev, self.keys)


def previous_keys(k: torch.Tensor, pos: torch.Tensor, n: int) -> torch.Tensor:
    """For (B, H, T, D) keys of whole sequences (or packed documents, laid out in order), the raw keys of the
    ``n`` tokens before each one: (B, H, T, n, D), slot ``d - 1`` holding the key ``d`` places back, zero where
    the token's position ``pos`` (B or 1, T) is below ``d`` (before its sequence's first token)."""
    b, h, t, d = k.shape
    out = k.new_zeros(b, h, t, n, d)
    for back in range(1, min(n, t - 1) + 1):
        out[:, :, back:, back - 1] = k[:, :, :-back]
    return out * (pos[:, None, :, None] >= torch.arange(1, n + 1, device=k.device)).unsqueeze(-1).to(k.dtype)


def gather_previous(ctx: torch.Tensor, index: torch.Tensor, pos: torch.Tensor, n: int) -> torch.Tensor:
    """The same from a cache: ``ctx`` (B, H, S, D) raw keys of each row's context, ``index`` (B or 1, T) where each
    new token's own key lies among them, ``pos`` (B or 1, T) its position in its sequence. Returns (B, H, T, n, D)."""
    b, h, _, d = ctx.shape
    t = index.shape[-1]
    back = torch.arange(1, n + 1, device=ctx.device)
    j = (index[:, :, None] - back).clamp(min=0).expand(b, t, n)  # (B, T, n)
    prev = ctx.gather(2, j.reshape(b, 1, t * n, 1).expand(b, h, t * n, d)).view(b, h, t, n, d)
    return prev * (pos[:, None, :, None] >= back).unsqueeze(-1).to(ctx.dtype)


def smear_keys(k: torch.Tensor, prev: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Smeared (B, H, T, D) keys from the raw keys ``k``, their predecessors ``prev`` (B, H, T, N, D) and the smear
    logits ``weight``: (H, N + 1) per head, or (H, D, N + 1) per channel."""
    a = torch.softmax(weight.float(), dim=-1).to(k.dtype)
    if a.dim() == 2:  # per head
        own, before = a[:, 0][None, :, None, None], a[:, 1:][None, :, None, :, None]  # (1,H,1,1), (1,H,1,N,1)
    else:  # per channel
        own, before = a[..., 0][None, :, None, :], a[..., 1:].transpose(1, 2)[None, :, None]  # (1,H,1,D), (1,H,1,N,D)
    return k * own + (prev * before).sum(3)


def smear_shifted(k: torch.Tensor, pos: torch.Tensor | None, weight: torch.Tensor) -> torch.Tensor:
    """:func:`smear_keys` of whole sequences (``pos`` None: each row one sequence from position 0) or packed
    documents (``pos`` (B, T): each token's position in its document), from shifted views of the keys: the
    N-fold copy of the keys that :func:`previous_keys` builds, and its backward, cost ~3x this (the training step
    of a smeared model, where the cache's gather has nothing to save). Equal to that path up to float rounding."""
    a = torch.softmax(weight.float(), dim=-1).to(k.dtype)
    n, t = a.shape[-1] - 1, k.shape[2]
    # per head: (1, H, 1, 1) weights; per channel: (1, H, 1, D)
    w = [a[:, i][None, :, None, None] if a.dim() == 2 else a[..., i][None, :, None, :] for i in range(n + 1)]
    padded = F.pad(k, (0, 0, n, 0))  # n zero keys before each row's first token
    out = k * w[0]
    for back in range(1, n + 1):
        shifted = padded[:, :, n - back:n - back + t]  # the key `back` places back
        if pos is not None:  # not across the start of a packed document
            shifted = shifted * (pos >= back)[:, None, :, None].to(k.dtype)
        out = out + shifted * w[back]
    return out


def smear_queries(prev: torch.Tensor, weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """What smeared queries add to the (B, n_heads, T, D) queries: ``sum_d w_d * k_{j-d}`` from ``prev``
    (B, n_kv_heads, T, N, D) and ``weight`` (n_heads, D, N); key heads are shared across their query group."""
    rep = n_heads // prev.shape[1]
    if rep > 1:
        prev = prev.repeat_interleave(rep, dim=1)
    return (prev * weight.to(prev.dtype).transpose(1, 2)[None, :, None]).sum(3)
