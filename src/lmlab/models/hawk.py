"""Hawk sequence mixer: the recurrent block of Griffin (De et al. 2024) with its RG-LRU.

With ``inner = expand * dim`` channels and ``x`` the (normalised) block input::

    gate = gelu(W_gate x)                                  (tanh-approximate GeLU, as Griffin's code)
    u = conv(W_in x)                                       causal depthwise, width conv_width (0: none), with bias
    r_t = sigmoid(W_a u_t + b_a),  i_t = sigmoid(W_x u_t + b_x)     recurrence and input gates
    log a_t = -c * softplus(-Lambda) * r_t                 a_t = a^(c r_t), a = sigmoid(Lambda) per channel, c = 8
    h_t = a_t * h_{t-1} + sqrt(1 - a_t^2) * (i_t * u_t)    the RG-LRU
    y = W_out(gate * h)

``W_a`` and ``W_x`` are block-diagonal as in the paper: one ``head_dim x head_dim`` block per group of
``cfg.recurrent.head_dim`` channels (``inner`` must be a multiple of it). ``Lambda`` is initialised so that ``a^c``
is uniform in [0.9, 0.999] (the paper's text; Griffin's released code draws ``a`` itself, area-uniform in that
ring). ``sqrt(1 - a_t^2)`` is computed as ``sqrt(-expm1(2 log a_t))`` and its derivative is capped at 1000 (as
Griffin's code does): its slope is infinite where ``a_t -> 1``. Griffin's code also lets a document's first token in
unscaled (multiplier 1); here every token is scaled, so the step needs no position.

The parallel path runs :func:`lmlab.models.scan.linear_scan` (a doubling scan, any-sign input); :meth:`Hawk.step` is
the recurrence above, the reference the scan is tested against. State: ``{"h": (B, inner), "conv": (B, inner,
conv_width - 1)}`` (no "conv" when conv_width = 0). Gates and scan run in float32 whatever the input dtype; the
output has the input's dtype; a returned state keeps the dtype of the state passed in (the input's when none).
With ``model.recurrent.kernels`` on CUDA, the scan and the convolution go to flash-linear-attention's and
causal_conv1d's kernels where installed (:func:`lmlab.models.recurrent.kernels_for`; this path is the reference).

Tensor parallel (:meth:`Hawk.tensor_parallel_plan`, training): ``W_gate`` and ``W_in`` split by output channels, so
each process computes ``heads / tp`` whole heads (``head_dim`` channels each); the convolution, the blocks of
``W_a`` and ``W_x``, ``b_a``, ``b_x`` and ``Lambda`` are per channel or per head and split the same way on dim 0
(:class:`lmlab.models.recurrent.ShardParameters`); the RG-LRU runs on the local channels with no communication;
``W_out`` is split by input channels (its partial sums all-reduced).

Usage::

    from lmlab.models.hawk import Hawk
    mixer = Hawk(cfg, layer_id=0)                 # cfg: lmlab.config.ModelConfig
    y, state = mixer(x, resets=resets)            # x (B, T, dim); resets (B, T) bool or None
    y1, state = mixer.step(x[:, 0], mixer.init_state(B, x.device, torch.float32))
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.config import ModelConfig
from lmlab.models.mingru import _cast_state, upcast
from lmlab.models.recurrent import ShardParameters, ShortConv, State, kernel_scan, kernels_for, local
from lmlab.models.scan import linear_scan

C = 8.0  # the RG-LRU's fixed exponent c
MAX_SQRT_GRAD = 1000.0


class _SqrtBoundedGrad(torch.autograd.Function):
    """``sqrt(x)`` whose derivative is capped at MAX_SQRT_GRAD near 0."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.sqrt(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad / (2 * torch.sqrt(x.clamp_min(0.25 / MAX_SQRT_GRAD**2)))


class Hawk(nn.Module):
    """Griffin's recurrent block: (B, T, dim) -> (B, T, dim), a GeLU-gated RG-LRU of width expand x dim."""

    def __init__(self, cfg: ModelConfig, layer_id: int = 0):
        super().__init__()
        self.layer_id = layer_id
        self.dim = cfg.dim
        self.inner = cfg.recurrent.expand * cfg.dim
        self.head_dim = cfg.recurrent.head_dim
        if self.inner % self.head_dim:
            raise ValueError(f"model.recurrent.head_dim={self.head_dim} must divide the Hawk width "
                             f"expand x dim = {self.inner} (the RG-LRU gates are block-diagonal per head)")
        heads = self.inner // self.head_dim
        self.w_gate = nn.Linear(cfg.dim, self.inner, bias=False)
        self.w_in = nn.Linear(cfg.dim, self.inner, bias=False)
        self.conv = ShortConv(self.inner, cfg.recurrent.conv_width) if cfg.recurrent.conv_width > 0 else None
        self.use_kernels = cfg.recurrent.kernels  # optional CUDA kernels (lmlab.models.recurrent: kernels_for)
        self.w_a = nn.Parameter(torch.empty(heads, self.head_dim, self.head_dim))  # block-diagonal, (in, out)
        self.b_a = nn.Parameter(torch.empty(self.inner))
        self.w_x = nn.Parameter(torch.empty(heads, self.head_dim, self.head_dim))
        self.b_x = nn.Parameter(torch.empty(self.inner))
        self.a_param = nn.Parameter(torch.empty(self.inner))  # Lambda: a = sigmoid(Lambda)
        self.w_out = nn.Linear(self.inner, cfg.dim, bias=False)
        self.reset_parameters()

    def reset_parameters(self, in_std: float = 0.02, out_std: float = 0.02, generator=None) -> None:
        for w in (self.w_gate.weight, self.w_in.weight, self.w_a, self.w_x):
            nn.init.normal_(w, 0.0, in_std, generator=generator)
        nn.init.normal_(self.w_out.weight, 0.0, out_std, generator=generator)
        nn.init.zeros_(self.b_a)
        nn.init.zeros_(self.b_x)
        with torch.no_grad():  # a^c ~ U[0.9, 0.999]: log a = log(u) / c, Lambda = logit(a)
            log_a = nn.init.uniform_(self.a_param, 0.9, 0.999, generator=generator).log_().div_(C)
            self.a_param.copy_(log_a - torch.log(-torch.expm1(log_a)))
        if self.conv is not None:
            self.conv.reset_parameters(generator)

    def init_state(self, batch: int, device=None, dtype: torch.dtype = torch.float32) -> State:
        state = {"h": torch.zeros(batch, self.inner, device=device, dtype=dtype)}
        if self.conv is not None:
            state["conv"] = torch.zeros(batch, self.inner, self.conv.width - 1, device=device, dtype=dtype)
        return state

    def _gates(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 u (..., inner) -> the RG-LRU's log a_t and its input sqrt(1 - a_t^2) i_t u_t."""
        heads = u.unflatten(-1, (-1, self.head_dim))  # (..., heads, head_dim): this process's heads under TP
        w_a, b_a, w_x, b_x, a_param = (upcast(local(p)) for p in (self.w_a, self.b_a, self.w_x, self.b_x,
                                                                   self.a_param))
        r = torch.sigmoid(torch.einsum("...hi,hij->...hj", heads, w_a).flatten(-2) + b_a)
        i = torch.sigmoid(torch.einsum("...hi,hij->...hj", heads, w_x).flatten(-2) + b_x)
        log_a = -C * F.softplus(-a_param) * r
        mult = _SqrtBoundedGrad.apply(-torch.expm1(2 * log_a))
        return log_a, mult * (i * u)

    def forward(self, x: torch.Tensor, resets: torch.Tensor | None = None,
                state: State | None = None) -> tuple[torch.Tensor, State]:
        new_state = {}
        gate = F.gelu(self.w_gate(x), approximate="tanh")
        u = self.w_in(x)
        kernels = kernels_for(x, self.use_kernels)
        if self.conv is not None:
            u, new_state["conv"] = self.conv(u, resets, None if state is None else state["conv"], kernels.conv)
        log_a, b = self._gates(upcast(u))
        h0 = None if state is None else state["h"]
        if kernels.scan is not None:
            h = kernel_scan(kernels.scan, log_a, b, h0, resets)
        else:
            h = linear_scan(torch.exp(log_a), b, h0, resets)
        new_state["h"] = h[:, -1]
        return self.w_out(gate * h.to(x.dtype)), _cast_state(new_state, state, x.dtype)

    def step(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        new_state = {}
        gate = F.gelu(self.w_gate(x), approximate="tanh")
        u = self.w_in(x)
        if self.conv is not None:
            u, new_state["conv"] = self.conv.step(u, state["conv"])
        log_a, b = self._gates(upcast(u))
        h = torch.exp(log_a) * upcast(state["h"]) + b
        new_state["h"] = h
        return self.w_out(gate * h.to(x.dtype)), _cast_state(new_state, state, x.dtype)

    def num_state_elements(self) -> int:
        return self.inner + (self.inner * (self.conv.width - 1) if self.conv is not None else 0)

    def tensor_parallel_plan(self, tp: int, sequence_parallel: bool = False) -> dict[str, object]:
        """Megatron-style, by heads (keys relative to this mixer; see the module docstring)."""
        from torch.distributed.tensor import Replicate, Shard
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

        heads = self.inner // self.head_dim
        if heads % tp:
            raise ValueError(f"model.recurrent.head_dim: Hawk's heads, expand x dim / head_dim = {self.inner} / "
                             f"{self.head_dim} = {heads}, must divide by parallel.tp={tp} (tensor parallel splits "
                             "the heads of the block-diagonal gates)")
        plan: dict[str, object] = {
            "": ShardParameters(("w_a", "b_a", "w_x", "b_x", "a_param"), gather_input=sequence_parallel),
            "w_gate": ColwiseParallel(),
            "w_in": ColwiseParallel(),
            "w_out": RowwiseParallel(output_layouts=Shard(1) if sequence_parallel else Replicate()),
        }
        if self.conv is not None:
            plan["conv"] = ShardParameters(("weight", "bias"))
        return plan

    def flops_per_token(self) -> int:
        """2 x matmul weights (W_gate, W_in, the block-diagonal W_a and W_x, W_out), plus 2 x width per convolved
        channel, plus 16 elementwise ops per inner channel as the step computes them (GeLU; two gate biases and
        sigmoids; c softplus(-Lambda) r and its exp; 1 - a^2 and its sqrt; i u and its scaling; a h + b; the
        output gate; a nonlinearity counts one). The parallel scan's extra O(log T) work is not counted."""
        matmul = 2 * (3 * self.dim * self.inner + 2 * self.inner * self.head_dim)
        conv = 2 * self.conv.width * self.inner if self.conv is not None else 0
        return matmul + conv + 16 * self.inner

