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
    tensor_parallel_plan(tp, sequence_parallel=False) -> dict[str, ParallelStyle]   its tensor-parallel plan (below)

A state is a ``dict[str, Tensor]`` whose tensors all have the batch as dim 0 (a generation engine keeps one slot
per sequence and gathers / scatters rows; a prefix cache snapshots rows).

Tensor parallel (training; decoding runs one process): each mixer writes its plan beside itself,
``tensor_parallel_plan(tp, sequence_parallel=False) -> dict[str, ParallelStyle]`` with keys relative to the mixer
("" for the mixer itself), which :meth:`lmlab.models.transformer.Transformer.tensor_parallel_plan` merges under
``layers.<i>.mixer``. Megatron-style: the input projections are split by output channels (``ColwiseParallel``), so
each of the ``tp`` processes computes ``inner / tp`` channels (whole heads where the mixer has heads); everything
per channel or per head (convolution over inner channels, gate biases, decays, ...) is split the same way on dim 0
(:class:`ShardParameters`, read in the forward through :func:`local`); the recurrence runs on the local channels with
no communication; the output projection is split by input channels (``RowwiseParallel``), its partial sums
all-reduced. What the heads share stays replicated (Mamba2's B and C: their gradient is summed over the processes
by :func:`all_reduce_grad`); a norm over all inner channels sums its squares over the processes
(:func:`all_reduce_sum`). Sizes that do not divide by ``tp`` are refused with a ValueError naming the config key.
With ``sequence_parallel`` the mixer's input arrives split along the sequence and is gathered first, and its output
leaves split along the sequence (reduce-scatter), as for attention.

Usage::

    from lmlab.models.recurrent import build_mixer, doc_resets
    mixer = build_mixer("mingru", cfg, layer_id=0)
    y, state = mixer(x, resets=doc_resets(doc_ids))
    plan = mixer.tensor_parallel_plan(tp=2)           # for torch.distributed.tensor.parallel.parallelize_module

Optional CUDA kernels (``model.recurrent.kernels: true``; the plain PyTorch path is the reference and what runs on
CPU): :func:`kernels_for` returns the kernels that import for a tensor on CUDA, else none. The elementwise linear
recurrence of Hawk, minGRU and minLSTM goes to flash-linear-attention's ``fused_recurrent_hgrn``
(``h_t = exp(g_t) h_{t-1} + x_t``; :func:`kernel_scan` maps a scan onto it, a document reset being ``g = -inf``), and
the short convolution of every mixer to ``causal_conv1d``'s ``causal_conv1d_fn`` (:func:`kernel_conv`, resets as
its ``seq_idx``). Mamba2's chunked SSD scan goes to ``mamba_ssm`` (:mod:`lmlab.models.mamba2`). The mapping onto
each kernel's calling convention is tested on CPU with sequential implementations of those conventions
(``tests/test_recurrent_kernels.py``), and against the real kernels where CUDA and the packages are present.
"""

from __future__ import annotations

import functools
import importlib
import math
from collections.abc import Callable
from typing import Any, NamedTuple

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


class Kernels(NamedTuple):
    """Optional fast kernels for one forward (None: not available, use the plain path).

    scan: ``fla.ops.hgrn.fused_recurrent_hgrn(x, g, initial_state=, output_final_state=) -> (o, final)``, the
        recurrence ``o_t = exp(g_t) o_{t-1} + x_t`` over (B, T, D).
    conv: ``causal_conv1d.causal_conv1d_fn(x, weight, bias, seq_idx=, activation=) -> y``, x (B, C, T) channel-last
        in memory, weight (C, W), seq_idx (B, T) int32 document numbers.
    ssd: ``mamba_ssm``'s ``mamba_chunk_scan_combined`` (Mamba2 only).
    """

    scan: Callable | None = None
    conv: Callable | None = None
    ssd: Callable | None = None


NO_KERNELS = Kernels()


@functools.cache
def _import_kernels() -> Kernels:
    """The kernels whose packages import (each None when missing or broken); imported on first use only."""
    def load(module: str, name: str) -> Callable | None:
        try:
            return getattr(importlib.import_module(module), name)
        except Exception:  # not installed, or installed without a working CUDA / Triton
            return None
    return Kernels(scan=load("fla.ops.hgrn", "fused_recurrent_hgrn"),
                   conv=load("causal_conv1d", "causal_conv1d_fn"),
                   ssd=load("mamba_ssm.ops.triton.ssd_combined", "mamba_chunk_scan_combined"))


def kernels_for(x: torch.Tensor, enabled: bool) -> Kernels:
    """The kernels a forward over ``x`` may use: none unless ``enabled`` and ``x`` is on CUDA."""
    if not enabled or not x.is_cuda:
        return NO_KERNELS
    return _import_kernels()


def kernel_scan(scan: Callable, log_a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None,
                resets: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`lmlab.models.scan.linear_scan` (``h_t = a_t h_{t-1} + b_t``, with ``log a`` given) through a kernel of
    the ``fused_recurrent_hgrn`` convention (:class:`Kernels`): log_a, b (B, T, ...), h0 (B, ...) or None, resets
    (B, T) or None (``log a = -inf`` there: the previous state is multiplied by 0). Returns h (B, T, ...) in float32
    (float64 stays)."""
    shape = b.shape
    dtype = torch.promote_types(torch.float32, b.dtype)  # float32 (float64 stays: the kernel computes in float32)
    g = log_a.to(dtype)
    if resets is not None:
        g = g.masked_fill(resets.bool().reshape(*resets.shape, *([1] * (g.dim() - 2))), float("-inf"))
    g = g.reshape(shape[0], shape[1], -1).contiguous()
    x = b.to(dtype).reshape(shape[0], shape[1], -1).contiguous()
    init = None if h0 is None else h0.to(dtype).reshape(shape[0], -1).contiguous()
    h, _ = scan(x, g, initial_state=init, output_final_state=False)
    return h.reshape(shape)


def kernel_conv(conv: Callable | None, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                resets: torch.Tensor | None = None, conv_state: torch.Tensor | None = None,
                activation: str | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """:func:`causal_conv1d` (then ``activation``: None or "silu") through a kernel of the ``causal_conv1d_fn``
    convention, or None where that kernel does not apply (none given, a carried conv state, a width outside 2-4, or
    channels not a multiple of 8): the caller then runs the plain path."""
    w = weight.shape[1]
    if conv is None or conv_state is not None or not 2 <= w <= 4 or x.shape[-1] % 8:
        return None
    # channel-last memory (what seq_idx needs); documents numbered from the resets
    seq_idx = None if resets is None else torch.cumsum(resets, dim=1, dtype=torch.int32)
    y = conv(x.contiguous().transpose(1, 2), weight, bias, seq_idx=seq_idx, activation=activation).transpose(1, 2)
    # the new conv state is the last w-1 inputs, zero before the last document's start: causal_conv1d of the tail
    # alone (with its resets) gives exactly that
    tail = None if resets is None else resets[:, -(w - 1):]
    return y, causal_conv1d(x[:, -(w - 1):], weight, None, tail)[1]


def state_bytes(mixer: Any, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of one sequence's recurrent state."""
    return int(mixer.num_state_elements()) * torch.tensor([], dtype=dtype).element_size()


class ShortConv(nn.Module):
    """Causal depthwise convolution over time with bias (:func:`causal_conv1d`). Under tensor parallel its
    parameters may be split by channels (:class:`ShardParameters`): it convolves the local channels."""

    def __init__(self, channels: int, width: int):
        super().__init__()
        self.width = width
        self.weight = nn.Parameter(torch.empty(channels, width))
        self.bias = nn.Parameter(torch.empty(channels))

    def reset_parameters(self, generator=None) -> None:
        # PyTorch's Conv1d default range (fan-in = width), zero bias
        bound = 1.0 / math.sqrt(self.width)
        nn.init.uniform_(self.weight, -bound, bound, generator=generator)
        nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor, resets: torch.Tensor | None = None, conv_state: torch.Tensor | None = None,
                kernel: Callable | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(y, new conv state); ``kernel``: a ``causal_conv1d_fn`` to use where it applies (:func:`kernel_conv`)."""
        weight, bias = local(self.weight), local(self.bias)
        out = kernel_conv(kernel, x, weight, bias, resets, conv_state)
        return out if out is not None else causal_conv1d(x, weight, bias, resets, conv_state)

    def step(self, x: torch.Tensor, conv_state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return conv_step(x, local(self.weight), local(self.bias), conv_state)


# ---- tensor parallel (see the module docstring) ------------------------------------------------------------------

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch built without torch.distributed: no parameter is ever a DTensor
    DTensor = ()


def local(p: torch.Tensor) -> torch.Tensor:
    """This process's part of a parameter: the local shard of a DTensor (tensor parallel), else ``p`` itself.
    Differentiable: the gradient of the shard reaches the DTensor parameter."""
    return p.to_local() if isinstance(p, DTensor) else p


def tp_mesh(p: torch.Tensor) -> Any:
    """The tensor-parallel mesh a parameter is split over (a DTensor's), or None on one process."""
    return p.device_mesh if isinstance(p, DTensor) else None


class _AllReduceSum(torch.autograd.Function):
    """Sum over the group; the gradient of each process's input is the sum of the processes' gradients (each
    process's loss reaches the sum only through its own channels)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.clone()
        torch.distributed.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad, None


class _AllReduceGrad(torch.autograd.Function):
    """Identity; the gradient is summed over the group."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad, None


def all_reduce_sum(x: torch.Tensor, mesh: Any) -> torch.Tensor:
    """The sum of ``x`` over the processes of ``mesh`` (each holds a partial sum, e.g. over its channels), with the
    matching gradient; ``x`` itself when ``mesh`` is None (one process)."""
    return x if mesh is None else _AllReduceSum.apply(x, mesh.get_group())


def all_reduce_grad(x: torch.Tensor, mesh: Any) -> torch.Tensor:
    """``x`` unchanged, but its gradient summed over the processes of ``mesh``: for an activation computed by every
    process alike (replicated weights) and consumed by each process's own heads only, so that each process's
    gradient covers its heads only. After the sum every process holds the whole gradient, and the replicated
    weights upstream get the one-process gradient. ``x`` itself when ``mesh`` is None."""
    return x if mesh is None else _AllReduceGrad.apply(x, mesh.get_group())


def _parallel_style_base() -> type:
    try:
        from torch.distributed.tensor.parallel import ParallelStyle
    except ImportError:
        return object
    return ParallelStyle


class ShardParameters(_parallel_style_base()):
    """A tensor-parallel style for a module's own per-channel / per-head parameters (those that are not an
    ``nn.Linear``'s): each one named becomes a DTensor split on dim 0 over the tensor-parallel mesh (``Shard(0)``),
    so each process holds the rows of its channels or heads; the module reads them through :func:`local`. The
    module's other parameters stay as they are (replicated). With ``gather_input`` (sequence parallel) the module's
    first positional input arrives split along the sequence (``Shard(1)``) and is all-gathered (to a plain tensor)
    before the forward."""

    def __init__(self, names: tuple[str, ...] | list[str] = (), gather_input: bool = False):
        super().__init__()
        self.names, self.gather_input = tuple(names), gather_input

    def _apply(self, module: nn.Module, device_mesh: Any) -> nn.Module:
        from torch.distributed.tensor import Replicate, Shard, distribute_tensor
        from torch.distributed.tensor.parallel import PrepareModuleInput, parallelize_module

        for name in self.names:
            p = module.get_parameter(name)
            if p.shape[0] % device_mesh.size():
                raise ValueError(f"{type(module).__name__}.{name}: dim 0 of {tuple(p.shape)} does not split over "
                                 f"{device_mesh.size()} tensor-parallel processes")
            d = distribute_tensor(p, device_mesh, [Shard(0)], src_data_rank=self.src_data_rank)
            module.register_parameter(name, nn.Parameter(d, requires_grad=p.requires_grad))
        if self.gather_input:
            parallelize_module(module, device_mesh, PrepareModuleInput(
                input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_output=True))
        return module

    def __repr__(self) -> str:
        return f"ShardParameters(names={self.names}, gather_input={self.gather_input})"
