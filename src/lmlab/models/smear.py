"""Smeared keys and queries: the arithmetic of an optional attention trick, apart from the plain Llama.

Smeared keys (``cfg.smear_keys = N``, after the smeared-key model of Olsson et al. 2022, "In-context learning and
induction heads"): a layer replaces key ``k_j`` by ``sum_d a_d k_{j-d}`` over ``d = 0..N``, with ``a = softmax(s)``
learned per key/value head, or per key channel with ``cfg.smear_channels`` (keys before the first token of a
sequence count as zero). A key then also says which tokens precede it, so one attention layer can find where
the current context occurred before and copy what followed. With ``cfg.smear_queries``, each query also gets
``sum_d w_d k_{j-d}`` over ``d = 1..N`` (learned per query channel, zero at first) from the raw keys of the
tokens before it.

Both need, for each new token, the *raw* keys of the N tokens before it in its sequence (:func:`previous_keys`
for a forward without a cache; a cache returns them from ``previous_keys(layer, k, n)``, storing the new raw
keys). A smeared key is computed once, when its token goes through the model, and cached as the token's key:
decoding costs the same whatever the length of the cached context.

Usage (inside an attention layer)::

    prev = previous_keys(k, positions, n) if cache is None else cache.previous_keys(layer_id, k, n)
    q = q + smear_queries(prev, query_weight, n_heads)     # optional
    k = smear_keys(k, prev, key_weight)
"""

from __future__ import annotations

import torch

__all__ = ["gather_previous", "previous_keys", "smear_keys", "smear_queries"]


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


def smear_queries(prev: torch.Tensor, weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """What smeared queries add to the (B, n_heads, T, D) queries: ``sum_d w_d * k_{j-d}`` from ``prev``
    (B, n_kv_heads, T, N, D) and ``weight`` (n_heads, D, N); key heads are shared across their query group."""
    rep = n_heads // prev.shape[1]
    if rep > 1:
        prev = prev.repeat_interleave(rep, dim=1)
    return (prev * weight.to(prev.dtype).transpose(1, 2)[None, :, None]).sum(3)
