"""minGRU sequence mixer (Feng et al. 2024, "Were RNNs All We Needed?"), in log space.

With ``inner = expand * dim`` channels and ``x`` the (normalised) block input::

    z_t = sigmoid(W_z x_t)                   update gate
    h~_t = g(W_h x_t)                        candidate, g(v) = v + 0.5 if v >= 0 else sigmoid(v) (> 0)
    h_t = (1 - z_t) * h_{t-1} + z_t * h~_t
    y_t = W_out h_t                          back to dim (the block adds it to the residual stream)

The gates depend on ``x_t`` only, so the recurrence is linear in h and the parallel path runs it as one scan. Every
term is positive (g > 0), so the scan runs in log space (:func:`lmlab.models.scan.log_scan`) with
``log(1 - z) = -softplus(k)``, ``log z = -softplus(-k)`` and ``log g`` exact: gates near 0 or 1 lose nothing.
:meth:`MinGRU.step` is the plain recurrence above in linear space, the reference the scan is tested against. With
``model.recurrent.kernels`` on CUDA the recurrence goes to flash-linear-attention's ``fused_recurrent_hgrn`` (in
linear space) and the convolution to causal_conv1d where installed (:func:`lmlab.models.recurrent.kernels_for`).

Short convolution: the paper's minGRU has none; here a causal depthwise convolution of width
``cfg.recurrent.conv_width`` (with bias) runs over the model-width input ``x`` before the projections whenever
``conv_width > 0`` (the config's default is 4; set ``model.recurrent.conv_width=0`` for the paper's minGRU). It sits
before the projections, at model width, so that both the gate and the candidate see the local window and its state
is only ``dim x (conv_width - 1)``.

State: ``{"h": (B, inner)}`` plus ``{"conv": (B, dim, conv_width - 1)}`` with a convolution. The math of gates and
scan runs in float32 whatever the input dtype; the output has the input's dtype; a returned state keeps the dtype
of the state passed in (the input's when none): ``init_state(..., torch.float32)`` decodes a bf16 model in float32.

Tensor parallel (:meth:`MinRNN.tensor_parallel_plan`, training): the gate projections split by output channels, the
scan on each process's ``inner / tp`` channels (elementwise: no communication), ``w_out`` split by input channels;
the short convolution, at model width before the projections, stays replicated.

Usage::

    from lmlab.models.mingru import MinGRU
    mixer = MinGRU(cfg, layer_id=0)               # cfg: lmlab.config.ModelConfig
    y, state = mixer(x, resets=resets)            # x (B, T, dim); resets (B, T) bool or None
    y1, state = mixer.step(x[:, 0], mixer.init_state(B, x.device, torch.float32))
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.config import ModelConfig
from lmlab.models.recurrent import ShardParameters, ShortConv, State, kernel_scan, kernels_for
from lmlab.models.scan import log_scan


def g(v: torch.Tensor) -> torch.Tensor:
    """Feng et al.'s positive activation: ``v + 0.5`` for v >= 0, ``sigmoid(v)`` below (continuous at 0)."""
    return torch.where(v >= 0, v + 0.5, torch.sigmoid(v))


def log_g(v: torch.Tensor) -> torch.Tensor:
    """``log g(v)``, exact on both sides (relu keeps the unused branch finite)."""
    return torch.where(v >= 0, torch.log(F.relu(v) + 0.5), -F.softplus(-v))


class MinRNN(nn.Module):
    """What minGRU and minLSTM share: the optional short convolution, input projections of width expand x dim named
    in ``GATES`` (``w_<name>``), the log-space scan, the output projection, the state ``{"h"}`` (+ ``"conv"``). A
    subclass gives the scan's coefficients from the projections: :meth:`log_coefficients` (parallel path) and
    :meth:`coefficients` (the step)."""

    GATES: tuple[str, ...] = ()
    ELEMENTWISE = 0  # ops per inner channel of one step, for flops_per_token

    def __init__(self, cfg: ModelConfig, layer_id: int = 0):
        super().__init__()
        self.layer_id = layer_id
        self.dim = cfg.dim
        self.inner = cfg.recurrent.expand * cfg.dim
        self.conv = ShortConv(cfg.dim, cfg.recurrent.conv_width) if cfg.recurrent.conv_width > 0 else None
        self.use_kernels = cfg.recurrent.kernels  # optional CUDA kernels (lmlab.models.recurrent: kernels_for)
        for name in self.GATES:
            setattr(self, f"w_{name}", nn.Linear(cfg.dim, self.inner, bias=False))
        self.w_out = nn.Linear(self.inner, cfg.dim, bias=False)
        self.reset_parameters()

    def _projections(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [upcast(getattr(self, f"w_{name}")(x)) for name in self.GATES]

    def log_coefficients(self, *proj: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(log a, log b)`` of h_t = a_t h_{t-1} + b_t from the projections (float32)."""
        raise NotImplementedError

    def coefficients(self, *proj: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(a, b)`` of one step, computed in linear space (the reference of the scan)."""
        raise NotImplementedError

    def reset_parameters(self, in_std: float = 0.02, out_std: float = 0.02, generator=None) -> None:
        for name in self.GATES:
            nn.init.normal_(getattr(self, f"w_{name}").weight, 0.0, in_std, generator=generator)
        nn.init.normal_(self.w_out.weight, 0.0, out_std, generator=generator)
        if self.conv is not None:
            self.conv.reset_parameters(generator)

    def init_state(self, batch: int, device=None, dtype: torch.dtype = torch.float32) -> State:
        state = {"h": torch.zeros(batch, self.inner, device=device, dtype=dtype)}
        if self.conv is not None:
            state["conv"] = torch.zeros(batch, self.dim, self.conv.width - 1, device=device, dtype=dtype)
        return state

    def forward(self, x: torch.Tensor, resets: torch.Tensor | None = None,
                state: State | None = None) -> tuple[torch.Tensor, State]:
        new_state = {}
        kernels = kernels_for(x, self.use_kernels)
        if self.conv is not None:
            x, new_state["conv"] = self.conv(x, resets, None if state is None else state["conv"], kernels.conv)
        log_a, log_b = self.log_coefficients(*self._projections(x))
        h0 = None if state is None else state["h"]
        if kernels.scan is not None:  # the kernel runs the recurrence in linear space (b_t > 0 is representable)
            h = kernel_scan(kernels.scan, log_a, log_b.exp(), h0, resets)
        else:
            h = log_scan(log_a, log_b, h0, resets).exp()
        new_state["h"] = h[:, -1]
        return self.w_out(h.to(x.dtype)), _cast_state(new_state, state, x.dtype)

    def step(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        new_state = {}
        if self.conv is not None:
            x, new_state["conv"] = self.conv.step(x, state["conv"])
        a, b = self.coefficients(*self._projections(x))
        h = a * upcast(state["h"]) + b
        new_state["h"] = h
        return self.w_out(h.to(x.dtype)), _cast_state(new_state, state, x.dtype)

    def num_state_elements(self) -> int:
        return self.inner + (self.dim * (self.conv.width - 1) if self.conv is not None else 0)

    def tensor_parallel_plan(self, tp: int, sequence_parallel: bool = False) -> dict[str, object]:
        """Megatron-style (keys relative to this mixer): the gate projections column-wise (each process computes
        ``inner / tp`` channels), the scan elementwise on those, ``w_out`` row-wise. The short convolution acts on
        the replicated model-width input before the projections: it stays replicated (whole on every process)."""
        from torch.distributed.tensor import Replicate, Shard
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

        if self.inner % tp:
            raise ValueError(f"model.recurrent.expand: the {type(self).__name__} width expand x dim = {self.inner} "
                             f"must divide by parallel.tp={tp} (tensor parallel splits its channels)")
        plan: dict[str, object] = {f"w_{name}": ColwiseParallel() for name in self.GATES}
        plan["w_out"] = RowwiseParallel(output_layouts=Shard(1) if sequence_parallel else Replicate())
        if sequence_parallel:
            plan[""] = ShardParameters(gather_input=True)
        return plan

    def flops_per_token(self) -> int:
        """2 x matmul weights (the gate projections and W_out), plus 2 x width per convolved channel, plus
        ``ELEMENTWISE`` ops per inner channel as the step computes them (a nonlinearity counts one). The parallel
        scan does O(log T) times the recurrence's work; that is not counted (as for attention, the count is the
        model's, not the kernel's)."""
        matmul = 2 * ((len(self.GATES) + 1) * self.dim * self.inner)
        conv = 2 * self.conv.width * self.dim if self.conv is not None else 0
        return matmul + conv + self.ELEMENTWISE * self.inner


class MinGRU(MinRNN):
    """minGRU mixer: (B, T, dim) -> (B, T, dim) through a gated linear recurrence of width expand x dim:
    h_t = (1 - z_t) h_{t-1} + z_t g(h~_t), z = sigmoid(W_z x), h~ = W_h x."""

    GATES = ("z", "h")
    ELEMENTWISE = 6  # sigmoid, g, 1 - z, two products, a sum

    def log_coefficients(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return -F.softplus(k), -F.softplus(-k) + log_g(v)  # log(1 - z), log(z * g(h~))

    def coefficients(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.sigmoid(-k), torch.sigmoid(k) * g(v)  # 1 - sigmoid(k) = sigmoid(-k)


def upcast(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32 at least (bf16 / fp16 -> float32; float64 stays): the precision of gates and scans."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _cast_state(new: State, old: State | None, dtype: torch.dtype) -> State:
    """Each tensor of ``new`` in the dtype of the same key in ``old`` (or ``dtype`` when there is no old state), as
    its own copy: a state kept by the caller must not hold on to the (B, T, ...) activations it was sliced from."""
    return {k: v.to(old[k].dtype if old is not None else dtype, copy=True) for k, v in new.items()}
