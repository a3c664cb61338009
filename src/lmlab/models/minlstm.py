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
plus ``{"conv": (B, dim, conv_width - 1)}``. Tensor parallel as minGRU's (the shared
:meth:`lmlab.models.mingru.MinRNN.tensor_parallel_plan`: ``w_f``, ``w_i``, ``w_h`` column-wise, ``w_out`` row-wise).

Usage::

    from lmlab.models.minlstm import MinLSTM
    mixer = MinLSTM(cfg, layer_id=0)
    y, state = mixer(x, resets=resets)
    y1, state = mixer.step(x[:, 0], mixer.init_state(B, x.device, torch.float32))
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmlab.models.mingru import MinRNN, g, log_g


class MinLSTM(MinRNN):
    """minLSTM mixer: (B, T, dim) -> (B, T, dim) through a normalised-gate linear recurrence of width expand x dim:
    h_t = f'_t h_{t-1} + i'_t g(h~_t) with f' = f / (f + i), i' = i / (f + i)."""

    GATES = ("f", "i", "h")
    ELEMENTWISE = 9  # two sigmoids, f + i, two divisions, g, two products, a sum

    def log_coefficients(self, kf: torch.Tensor, ki: torch.Tensor,
                         v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d = F.softplus(-kf) - F.softplus(-ki)  # log i - log f
        return -F.softplus(d), -F.softplus(-d) + log_g(v)  # log f', log(i' g(h~))

    def coefficients(self, kf: torch.Tensor, ki: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        diff = F.logsigmoid(kf) - F.logsigmoid(ki)  # log f - log i
        return torch.sigmoid(diff), torch.sigmoid(-diff) * g(v)  # f / (f + i), i / (f + i): never 0 / 0
