"""minLSTM sequence mixer (Feng et al. 2024, "Were RNNs All We Needed?"), in log space.

With ``inner = expand * dim`` channels and ``x`` the (normalised) block input::

    f_t = sigmoid(W_f x_t),  i_t = sigmoid(W_i x_t)          forget and input gates
    f'_t = f_t / (f_t + i_t),  i'_t = i_t / (f_t + i_t)      normalised: f' + i' = 1 (time-independent scale)
    h_t = f'_t * h_{t-1} + i'_t * g(W_h x_t)                 g as in minGRU (> 0)
    y_t = W_out h_t

The parallel path scans in log space (:func:`lmlab.models.scan.log_scan`): with
``d = softplus(-k_f) - softplus(-k_i) = log i - log f``, ``log f' = -softplus(d)`` and ``log i' = -softplus(-d)``,
exact even where both gates underflow. :meth:`MinLSTM.step` computes ``f / (f + i)`` and ``i / (f + i)`` in linear
space (as ``sigmoid(log f - log i)`` and ``sigmoid(log i - log f)``: the same numbers, but never 0 / 0), the
reference the scan is tested against.

Short convolution, state and dtypes as in :mod:`lmlab.models.mingru`: a causal depthwise convolution over the
model-width input whenever ``cfg.recurrent.conv_width > 0`` (0: the paper's minLSTM); state ``{"h": (B, inner)}``
plus ``{"conv": (B, dim, conv_width - 1)}``.

Usage::

    from lmlab.models.minlstm import MinLSTM
    mixer = MinLSTM(cfg, layer_id=0)
    y, state = mixer(x, resets=resets)
    y1, state = mixer.step(x[:, 0], mixer.init_state(B, x.device, torch.float32))
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.config import ModelConfig
from lmlab.models.mingru import ShortConv, _cast_state, g, log_g, upcast
from lmlab.models.recurrent import State
from lmlab.models.scan import log_scan


class MinLSTM(nn.Module):
    """minLSTM mixer: (B, T, dim) -> (B, T, dim) through a normalised-gate linear recurrence of width expand x dim."""

    def __init__(self, cfg: ModelConfig, layer_id: int = 0):
        super().__init__()
        self.layer_id = layer_id
        self.dim = cfg.dim
        self.inner = cfg.recurrent.expand * cfg.dim
        self.conv = ShortConv(cfg.dim, cfg.recurrent.conv_width) if cfg.recurrent.conv_width > 0 else None
        self.w_f = nn.Linear(cfg.dim, self.inner, bias=False)
        self.w_i = nn.Linear(cfg.dim, self.inner, bias=False)
        self.w_h = nn.Linear(cfg.dim, self.inner, bias=False)
        self.w_out = nn.Linear(self.inner, cfg.dim, bias=False)
        self.reset_parameters()

    def reset_parameters(self, in_std: float = 0.02, out_std: float = 0.02, generator=None) -> None:
        for lin in (self.w_f, self.w_i, self.w_h):
            nn.init.normal_(lin.weight, 0.0, in_std, generator=generator)
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
        if self.conv is not None:
            x, new_state["conv"] = self.conv(x, resets, None if state is None else state["conv"])
        kf, ki, v = upcast(self.w_f(x)), upcast(self.w_i(x)), upcast(self.w_h(x))
        d = F.softplus(-kf) - F.softplus(-ki)  # log i - log f
        log_a, log_b = -F.softplus(d), -F.softplus(-d) + log_g(v)  # log f', log(i' g(h~))
        h = log_scan(log_a, log_b, None if state is None else state["h"], resets).exp()
        new_state["h"] = h[:, -1]
        return self.w_out(h.to(x.dtype)), _cast_state(new_state, state, x.dtype)

    def step(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        new_state = {}
        if self.conv is not None:
            x, new_state["conv"] = self.conv.step(x, state["conv"])
        kf, ki, v = upcast(self.w_f(x)), upcast(self.w_i(x)), upcast(self.w_h(x))
        diff = F.logsigmoid(kf) - F.logsigmoid(ki)  # log f - log i
        h = torch.sigmoid(diff) * upcast(state["h"]) + torch.sigmoid(-diff) * g(v)  # f / (f + i), i / (f + i)
        new_state["h"] = h
        return self.w_out(h.to(x.dtype)), _cast_state(new_state, state, x.dtype)

    def num_state_elements(self) -> int:
        return self.inner + (self.dim * (self.conv.width - 1) if self.conv is not None else 0)

    def flops_per_token(self) -> int:
        """2 x matmul weights (W_f, W_i, W_h, W_out), plus 2 x width per convolved channel, plus 9 elementwise ops
        per inner channel as the recurrence reads (two sigmoids, f + i, two divisions, g, two products, a sum).
        The parallel scan's extra O(log T) work is not counted."""
        matmul = 2 * (3 * self.dim * self.inner + self.inner * self.dim)
        conv = 2 * self.conv.width * self.dim if self.conv is not None else 0
        return matmul + conv + 9 * self.inner
