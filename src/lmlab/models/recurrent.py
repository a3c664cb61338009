"""Recurrent sequence mixers: the interface every one implements, the registry, and shared pieces.

A block of :class:`lmlab.models.transformer.Transformer` mixes its tokens with attention or with a recurrent
mixer chosen by ``model.mixer`` (or per layer, ``model.layer_mixers``): Mamba2 (:mod:`lmlab.models.mamba2`),
Hawk's RG-LRU (:mod:`lmlab.models.hawk`), minGRU and minLSTM (:mod:`lmlab.models.mingru`,
:mod:`lmlab.models.minlstm`). All are plain PyTorch (parallel scans), so they train on CPU.

The interface (a mixer module, built as ``cls(cfg: ModelConfig, layer_id: int)``)::

    forward(x, resets=None, state=None) -> (y, state)
        x (B, T, dim) -> y (B, T, dim), through the parallel (training / prefill) path.
        resets (B, T) bool or None: True where a new document starts in a packed row: the recurrent state and the
            convolution window are zero before that token, so a packed row gives each document's own outputs.
        state: None (zeros) or the state a previous call returned: the tokens continue those sequences.
        Returns the state after the last token (of the last document of each row when resets are given).
    step(x, state) -> (y, state)
        One token per sequence, x (B, dim): the sequential recurrence, the reference the scan is tested against
        and what decoding runs (O(1) per token).
    init_state(batch, device, dtype) -> state       zeros
    reset_parameters(in_std, out_std, generator=None)   the one place weights get values (init scheme stds)
    num_state_elements() -> int                     elements of one sequence's state (for state-size plots)
    flops_per_token() -> int                        forward FLOPs per token of this mixer (matmuls + scan)

A state is a ``dict[str, Tensor]`` whose tensors all have the batch as dim 0 (a generation engine keeps one slot
per sequence and gathers / scatters rows; a prefix cache snapshots rows).

Usage::

    from lmlab.models.recurrent import build_mixer, doc_resets
    mixer = build_mixer("mingru", cfg, layer_id=0)
    y, state = mixer(x, resets=doc_resets(doc_ids))
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
from torch import nn

from lmlab.config import ModelConfig

State = dict[str, torch.Tensor]

# mixer name -> "module:Class" (imported when first built)
RECURRENT_MIXERS = {
    "mamba2": "lmlab.models.mamba2:Mamba2",
    "hawk": "lmlab.models.hawk:Hawk",
    "mingru": "lmlab.models.mingru:MinGRU",
    "minlstm": "lmlab.models.minlstm:MinLSTM",
}


def mixer_class(name: str) -> type[nn.Module]:
    if name not in RECURRENT_MIXERS:
        raise ValueError(f"model.mixer: {name!r} is not a recurrent mixer; known: {', '.join(RECURRENT_MIXERS)}")
    module, cls = RECURRENT_MIXERS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def build_mixer(name: str, cfg: ModelConfig, layer_id: int) -> nn.Module:
    return mixer_class(name)(cfg, layer_id)


def doc_resets(doc_ids: torch.Tensor | None) -> torch.Tensor | None:
    """(B, T) bool: True at the first token of each document of a packed row (and at t = 0)."""
    if doc_ids is None:
        return None
    out = torch.ones_like(doc_ids, dtype=torch.bool)
    out[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return out


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  resets: torch.Tensor | None = None,
                  conv_state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal convolution over time: ``y[t] = sum_j weight[:, j] * x[t - (W-1) + j] (+ bias)``.

    x (B, T, C); weight (C, W); conv_state (B, C, W-1): the W-1 inputs before x (zeros when None). With
    ``resets`` (B, T), inputs before a document's first token do not reach it (they count as zeros). Returns y
    (B, T, C) and the new conv_state (the last W-1 inputs, zeros before the last document's start).
    """
    b, t, c = x.shape
    w = weight.shape[1]
    if conv_state is None:
        conv_state = x.new_zeros(b, c, w - 1)
    xt = torch.cat([conv_state.to(x.dtype), x.transpose(1, 2)], dim=2)  # (B, C, W-1+T)
    if resets is None:  # W shifted multiply-adds: on CPU several times faster to differentiate than a grouped conv1d
        wt = weight.to(x.dtype)
        y = sum(xt[:, :, j:j + t] * wt[:, j:j + 1] for j in range(w)).transpose(1, 2)
    else:
        # tap j of output t reads input t - (W-1) + j: it counts only if no document starts after that input
        # and at or before t. seg[t] = index of t's document; an input s may reach t iff seg[s] == seg[t].
        seg = torch.cumsum(resets.long(), dim=1)  # (B, T), documents numbered from 1
        seg = torch.cat([seg.new_zeros(b, w - 1) + seg[:, :1] - (resets[:, :1].long()), seg], dim=1)
        windows = xt.unfold(2, w, 1)  # (B, C, T, W)
        same = seg.unfold(1, w, 1) == seg[:, w - 1:].unsqueeze(-1)  # (B, T, W)
        y = (windows * same.unsqueeze(1).to(x.dtype) * weight.to(x.dtype)[None, :, None, :]).sum(-1)
        y = y.transpose(1, 2)
    if bias is not None:
        y = y + bias.to(y.dtype)
    new_state = xt[:, :, -(w - 1):] if w > 1 else xt[:, :, :0]
    if resets is not None and w > 1:  # inputs before the last document's start are not its history
        last_start = torch.where(resets, torch.arange(t, device=x.device), -1).amax(dim=1)  # (B,)
        pos = torch.arange(t - (w - 1), t, device=x.device)  # positions of the kept inputs
        new_state = new_state * (pos[None, :] >= last_start[:, None]).unsqueeze(1).to(x.dtype)
    return y, new_state


def conv_step(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
              conv_state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of :func:`causal_conv1d`: x (B, C), conv_state (B, C, W-1) -> y (B, C), new conv_state."""
    window = torch.cat([conv_state.to(x.dtype), x.unsqueeze(-1)], dim=2)  # (B, C, W)
    y = (window * weight.to(x.dtype)).sum(-1)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y, window[:, :, 1:]


def state_bytes(mixer: Any, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of one sequence's recurrent state."""
    return int(mixer.num_state_elements()) * torch.tensor([], dtype=dtype).element_size()
