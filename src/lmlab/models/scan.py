"""Parallel scans of the linear recurrence ``h_t = a_t * h_{t-1} + b_t`` over dim 1 (time), for the recurrent mixers.

Two entry points, both with an optional initial state ``h0`` (``h_{-1}``; zeros when None) and optional document
``resets`` (B, T) bool: where ``resets[:, t]`` the previous state is dropped (``h_{t-1}`` counts as 0), so each
document of a packed row starts afresh (``a_t`` is set to 0, ``log a_t`` to -inf, there).

- :func:`linear_scan` (Hawk's RG-LRU): any-sign ``b``, ``a`` in [0, 1].
- :func:`log_scan` (minGRU, minLSTM): positive ``b``, given in log space (``log_a <= 0``, ``log_b``), returns
  ``log h``. Log space keeps gates near 0 or 1 and tiny values exact (Feng et al. 2024, "Were RNNs All We Needed?").

Algorithm: both use a Hillis-Steele doubling scan. Each element holds a pair ``(A, B)``: the product of the
coefficients and the partial result over a window of length ``k`` ending at ``t``; ``log2(T)`` steps combine the
window ending at ``t`` with the one ending at ``t - k`` (``A_t A_{t-k}``, ``A_t B_{t-k} + B_t``; in log space a sum
and a ``logaddexp``). It only multiplies coefficients in [0, 1] together, never divides: a product that underflows
to 0 is a contribution that really is negligible. Heinsen's log-space scan (``a*_t + logcumsumexp(log b_t - a*_t)``
with ``a*`` the cumulative sum of ``log a``) is shorter and O(T), but it cancels two terms of size ``|a*_t|``, which
grows linearly in T: in float32 it loses ``|a*_t| * 6e-8`` of relative precision (2e-3 measured at T = 4096 with strong
decay). The doubling scan's error stays at a few roundings whatever T. Its cost is O(T log T) elementwise work in
log2(T) passes, each a handful of whole-tensor operations.

Gradients come from a custom ``autograd.Function``: the backward of a linear recurrence is the same recurrence run
backwards (``G_t = dL/dh_t`` as given, ``D_t = G_t + a_{t+1} D_{t+1}``; then ``dL/db_t = D_t``,
``dL/da_t = D_t h_{t-1}``, ``dL/dh0 = a_0 D_0``), so a backward costs one more scan and keeps three (B, T, ...)
tensors (O(T) memory, not the O(T log T) of autograd through the passes). In log space the same holds with
``G_t = dL/dlog h_t`` and coefficients ``alpha_t = a_t h_{t-1} / h_t``, which lie in [0, 1] because every term is
positive: ``dL/dlog b_t = D_t b_t / h_t``, ``dL/dlog a_t = D_t alpha_t`` (no division by a tiny h: every ratio is the
exponential of a log difference <= 0). Second derivatives are not supported (``once_differentiable``).

The math runs in float32 (float64 stays float64): bf16 inputs are promoted and the result is float32; callers cast.

Usage::

    from lmlab.models.scan import linear_scan, log_scan
    h = linear_scan(a, b, h0=state, resets=resets)             # a, b (B, T, C); h0 (B, C); resets (B, T)
    log_h = log_scan(log_a, log_b, h0=state, resets=resets)    # h0 in linear space (>= 0)
    h = log_h.exp()
"""

from __future__ import annotations

import torch


def _scan_dtype(*ts: torch.Tensor | None) -> torch.dtype:
    dtype = torch.float32
    for t in ts:
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _time_mask(resets: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """resets (B, T) broadcast to ``like`` (B, T, ...)."""
    if resets.shape != like.shape[:2]:
        raise ValueError(f"resets must have shape (B, T) = {tuple(like.shape[:2])}, got {tuple(resets.shape)}")
    return resets.bool().reshape(*resets.shape, *([1] * (like.dim() - 2)))


def _doubling(a: torch.Tensor, b: torch.Tensor, reverse: bool = False) -> torch.Tensor:
    """Hillis-Steele scan of ``h_t = a_t h_{t-1} + b_t`` (``reverse``: ``h_t = a_t h_{t+1} + b_t``) from zero;
    works on copies (no autograd)."""
    a, b = a.clone(), b.clone()
    t, k = a.shape[1], 1
    while k < t:
        if reverse:
            b[:, :-k] += a[:, :-k] * b[:, k:]
            if 2 * k < t:
                a[:, :-k] = a[:, :-k] * a[:, k:]
        else:
            b[:, k:] += a[:, k:] * b[:, :-k]
            if 2 * k < t:
                a[:, k:] = a[:, k:] * a[:, :-k]
        k *= 2
    return b


def _log_doubling(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """:func:`_doubling` in log space: ``log h`` of ``h_t = a_t h_{t-1} + b_t`` from zero (no autograd)."""
    la, lb = log_a.clone(), log_b.clone()
    t, k = la.shape[1], 1
    while k < t:
        lb[:, k:] = torch.logaddexp(lb[:, k:], la[:, k:] + lb[:, :-k])
        if 2 * k < t:
            la[:, k:] = la[:, k:] + la[:, :-k]
        k *= 2
    return lb


def _shift_left(x: torch.Tensor) -> torch.Tensor:
    """``x[:, t + 1]`` at t, zero at the last step (the coefficient of the backward recurrence)."""
    return torch.cat([x[:, 1:], x.new_zeros(x[:, :1].shape)], dim=1)


class _LinearScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, h0):
        if h0 is not None:
            b = b.clone()
            b[:, 0] += a[:, 0] * h0
        h = _doubling(a, b)
        ctx.save_for_backward(a, h, h0)
        return h

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_h):
        a, h, h0 = ctx.saved_tensors
        d = _doubling(_shift_left(a), grad_h.contiguous(), reverse=True)  # dL/dh_t, through all later steps
        h_prev = torch.cat([(h0 if h0 is not None else h.new_zeros(h[:, 0].shape)).unsqueeze(1), h[:, :-1]], dim=1)
        grad_h0 = a[:, 0] * d[:, 0] if h0 is not None and ctx.needs_input_grad[2] else None
        return d * h_prev, d, grad_h0


class _LogScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, log_a, log_b, h0):
        log_h0 = None
        if h0 is not None:
            log_h0 = torch.log(h0)  # -inf for a zero state: its term drops out
            log_b = log_b.clone()
            log_b[:, 0] = torch.logaddexp(log_b[:, 0], log_a[:, 0] + log_h0)
        log_h = _log_doubling(log_a, log_b)
        ctx.save_for_backward(log_a, log_b, log_h, log_h0)
        return log_h

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_log_h):
        log_a, log_b, log_h, log_h0 = ctx.saved_tensors
        # log_b here already holds h0's term at t = 0; dL/dlog b_0 only needs b_0 / h_0, recomputed below
        first = log_h0 if log_h0 is not None else torch.full_like(log_h[:, 0], float("-inf"))
        log_prev = torch.cat([first.unsqueeze(1), log_h[:, :-1]], dim=1)
        alpha = torch.exp(log_a + log_prev - log_h)  # a_t h_{t-1} / h_t in [0, 1]
        d = _doubling(_shift_left(alpha), grad_log_h.contiguous(), reverse=True)
        grad_log_a = d * alpha
        grad_log_b = d * torch.exp(log_b - log_h)
        grad_h0 = None
        if log_h0 is not None:
            # log_b[:, 0] was b_0 + a_0 h0: the share of b_0 alone is (h_0 - a_0 h0) / h_0 = 1 - alpha_0
            grad_log_b[:, 0] = d[:, 0] * (1 - alpha[:, 0])
            if ctx.needs_input_grad[2]:
                grad_h0 = d[:, 0] * torch.exp(log_a[:, 0] - log_h[:, 0])
        return grad_log_a, grad_log_b, grad_h0


def linear_scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None,
                resets: torch.Tensor | None = None) -> torch.Tensor:
    """All states of ``h_t = a_t h_{t-1} + b_t``: a, b (B, T, ...) with a in [0, 1]; h0 (B, ...) or None (zeros);
    resets (B, T) bool or None (``h_{t-1} = 0`` where True). Returns h (B, T, ...) in float32 (or float64)."""
    dtype = _scan_dtype(a, b, h0)
    a, b = a.to(dtype), b.to(dtype)
    if resets is not None:
        a = a.masked_fill(_time_mask(resets, a), 0.0)
    return _LinearScan.apply(a, b, None if h0 is None else h0.to(dtype))


def log_scan(log_a: torch.Tensor, log_b: torch.Tensor, h0: torch.Tensor | None = None,
             resets: torch.Tensor | None = None) -> torch.Tensor:
    """``log h`` of ``h_t = a_t h_{t-1} + b_t`` for positive terms given in log space: log_a (B, T, ...) <= 0,
    log_b (B, T, ...) finite; h0 (B, ...) >= 0 in linear space, or None (zeros); resets (B, T) bool or None.
    Returns log h (B, T, ...) in float32 (or float64)."""
    dtype = _scan_dtype(log_a, log_b, h0)
    log_a, log_b = log_a.to(dtype), log_b.to(dtype)
    if resets is not None:
        log_a = log_a.masked_fill(_time_mask(resets, log_a), float("-inf"))
    return _LogScan.apply(log_a, log_b, None if h0 is None else h0.to(dtype))
