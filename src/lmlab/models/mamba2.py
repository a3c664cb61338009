"""Mamba2: the SSD sequence mixer of Dao & Gu (2024), "Transformers are SSMs", in plain PyTorch.

One layer (single group, ``ngroups = 1``), mapping normalised x (B, T, dim) to the block's update (B, T, dim)::

    z, xs, dt = head_proj(x); B, C = bc_proj(x)    # inner, inner, H; N, N   (inner = expand * dim, H = inner / P)
    xs, B, C = silu(causal_conv([xs, B, C]))       # depthwise (x_conv, bc_conv), conv_width taps, reset at doc starts
    dt = softplus(dt + dt_bias);  A = -exp(A_log)  # per head
    h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T     # per head: h (P, N), x_t (P,), B_t, C_t (N,) shared by the heads
    y_t = h_t C_t + D x_t
    out = out_proj(RMSNorm(y * silu(z)))           # Mamba2's gated RMSNorm (norm after the gate, a plain gain)

:meth:`Mamba2.step` runs that recurrence one token at a time (decoding, and the reference of the tests).
:meth:`Mamba2.forward` runs the chunked SSD algorithm (:func:`ssd_chunked`, chunk length Q = ``chunk_size``):
inside a chunk, the quadratic "attention-like" form ``y_i = sum_{j<=i} C_i.B_j exp(a_{j+1} + ... + a_i) dt_j x_j``
(``a = dt A``, the log-decay) with the decay matrix from :func:`segsum`; across chunks, the state recurrence
``S_c = exp(a summed over chunk c) S_{c-1} + (chunk c's own contribution)``, one step per chunk. Work per token is
O(Q (N + P)) per head instead of the loop's O(P N) sequential steps, and all of it is batched matmuls.

Documents in packed rows (``resets`` True at a document's first token): the log-decay at a reset token is -inf, so
no state crosses it (inside a chunk, across chunks, and from an initial state), and the convolution restarts there.
The segment sums add the decays directly (a masked cumulative sum, never a difference of two cumulative sums), so
-inf needs no special case and there is no cancellation; every exponent is <= 0 (never the exp of a large
positive).

State ``{"ssm": (B, H, P, N), "conv": (B, inner + 2N, conv_width - 1)}`` (the convolution's window over [x, B, C]);
the SSM runs in float32 (float64 for float64 inputs) whatever the activations' dtype.

Parameters are laid out by heads, for tensor parallel: ``head_proj`` (a Linear) holds, for each head in turn, the
rows of its z (P), its x (P) and its dt (1); ``bc_proj`` the rows of B and C, which all heads share (one group).
``x_conv`` convolves the x channels, ``bc_conv`` the B and C channels. Tensor parallel
(:meth:`Mamba2.tensor_parallel_plan`, training) splits the heads over the ``tp`` processes: ``head_proj``
column-wise (a contiguous split of its rows gives each process whole heads: their z, x and dt), and on dim 0
``x_conv``, ``dt_bias``, ``A_log``, ``D`` and the norm's gain; each process scans its own heads with no
communication. ``bc_proj`` and ``bc_conv`` stay replicated: every process computes B and C, and since each one's
loss reaches them through its own heads only, their gradient is summed over the processes
(:func:`lmlab.models.recurrent.all_reduce_grad`). The gated RMSNorm is over all inner channels: each process sums
the squares of its channels and the sums are all-reduced (:func:`lmlab.models.recurrent.all_reduce_sum`).
``out_proj`` is split row-wise (its partial sums all-reduced). Forward and gradients equal the one-process ones.

Optional CUDA kernels: with ``use_kernels`` (``cfg.recurrent.kernels`` if the config has it, else False; or set
the attribute), ``mamba_ssm``'s ``mamba_chunk_scan_combined`` and ``causal_conv1d``'s ``causal_conv1d_fn`` replace
the scan and the convolution when they import and x is on CUDA (:func:`lmlab.models.recurrent.kernels_for`). The
plain path is the reference and what runs everywhere else; the convolution's mapping onto its kernel is tested on CPU
(``tests/test_recurrent_kernels.py``), the SSD kernel only where CUDA and mamba_ssm are present.

Usage::

    from lmlab.config import ModelConfig
    from lmlab.models.mamba2 import Mamba2
    from lmlab.models.recurrent import doc_resets
    mixer = Mamba2(ModelConfig(dim=64), layer_id=0)
    y, state = mixer(x, resets=doc_resets(doc_ids))   # x (B, T, 64) -> y (B, T, 64)
    y1, state = mixer.step(x_next, state)              # x_next (B, 64): one more token per row
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.config import ModelConfig
from lmlab.models.layers import RMSNorm
from lmlab.models.recurrent import (
    ShardParameters,
    ShortConv,
    State,
    all_reduce_grad,
    all_reduce_sum,
    causal_conv1d,
    conv_step,
    kernel_conv,
    kernels_for,
    local,
    tp_mesh,
)

DT_MIN, DT_MAX, DT_FLOOR = 1e-3, 1e-1, 1e-4  # dt starts log-uniform in [DT_MIN, DT_MAX] (Mamba2's defaults)
A_MIN, A_MAX = 1.0, 16.0  # -A starts uniform in [A_MIN, A_MAX]


def segsum(a: torch.Tensor) -> torch.Tensor:
    """a (..., Q) -> (..., Q, Q): ``out[..., i, j] = a[j+1] + ... + a[i]`` for j <= i (0 on the diagonal), -inf above.

    ``exp(out)`` is the decay from step j to step i (0 above the diagonal: no look-ahead). The sum is a masked
    cumulative sum down each column, i.e. ``cumsum[i] - cumsum[j]`` without the subtraction: exact for very negative
    sums, and an -inf (a document reset) gives -inf, not NaN.
    """
    q = a.shape[-1]
    ones = torch.ones(q, q, dtype=torch.bool, device=a.device)
    terms = a.unsqueeze(-1).expand(*a.shape, q).masked_fill(~ones.tril(-1), 0.0)  # terms[k, j] = a[k] if k > j
    return terms.cumsum(dim=-2).masked_fill(~ones.tril(), float("-inf"))


def ssd_chunked(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                chunk_size: int, initial_state: torch.Tensor | None = None,
                resets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The SSM ``h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T, y_t = h_t C_t`` (no D term) by chunks of ``chunk_size``.

    x (b, T, H, P); dt (b, T, H) (after the softplus); A (H,) negative; B, C (b, T, N); initial_state (b, H, P, N)
    or None (zeros); resets (b, T) bool or None: no state crosses into a token marked True. Returns y (b, T, H, P)
    and the state after the last token (b, H, P, N). T need not be a multiple of ``chunk_size``.
    """
    b, t, h, p = x.shape
    n = B.shape[-1]
    q = chunk_size
    loga = dt * A  # (b, T, H), <= 0
    if resets is not None:
        loga = loga.masked_fill(resets.unsqueeze(-1), float("-inf"))
    pad = -t % q
    if pad:  # padded steps have dt = 0 and log-decay 0: they add nothing and keep the final state as it was
        x, dt, loga, B, C = (torch.cat([v, v.new_zeros(b, pad, *v.shape[2:])], dim=1) for v in (x, dt, loga, B, C))
    c = (t + pad) // q
    xdt = (x * dt.unsqueeze(-1)).view(b, c, q, h, p)  # dt_j x_j: the input of step j
    B, C = B.view(b, c, q, n), C.view(b, c, q, n)
    loga = loga.view(b, c, q, h).permute(0, 3, 1, 2)  # (b, H, c, Q)

    # inside each chunk: y_i = sum_{j <= i} (C_i . B_j) exp(a_{j+1} + ... + a_i) dt_j x_j
    seg = segsum(loga)  # (b, H, c, Q, Q)
    scores = torch.einsum("bcin,bcjn->bcij", C, B).unsqueeze(1) * torch.exp(seg)
    y = torch.einsum("bhcij,bcjhp->bcihp", scores, xdt)

    # each chunk's own contribution to the state at its last step (the last row of seg: decay from j to the end)
    to_end = torch.exp(seg[..., -1, :]).permute(0, 2, 3, 1).unsqueeze(-1)  # (b, c, Q, H, 1)
    chunk_states = torch.einsum("bcjhp,bcjn->bchpn", xdt * to_end, B)

    # across chunks: the state entering chunk c, one recurrence step per chunk
    within = torch.cumsum(loga, dim=-1)  # (b, H, c, Q): a_start + ... + a_i, the decay from the chunk's entry
    chunk_decay = torch.exp(within[..., -1])  # (b, H, c)
    s = xdt.new_zeros(b, h, p, n) if initial_state is None else initial_state.to(xdt.dtype)
    entering = []
    for k in range(c):
        entering.append(s)
        s = chunk_decay[:, :, k, None, None] * s + chunk_states[:, k]
    entering = torch.stack(entering, dim=1)  # (b, c, H, P, N)
    y = y + torch.einsum("bcin,bchpn->bcihp", C, entering) * torch.exp(within).permute(0, 2, 3, 1).unsqueeze(-1)
    return y.reshape(b, c * q, h, p)[:, :t], s


def ssd_step(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
             C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of the SSM: state (b, H, P, N), x (b, H, P), dt (b, H), A (H,), B, C (b, N) -> y (b, H, P), state."""
    decay = torch.exp(dt * A)[:, :, None, None]
    state = decay * state + (dt[:, :, None] * x).unsqueeze(-1) * B[:, None, None, :]
    return torch.matmul(state, C[:, None, :, None]).squeeze(-1), state  # state C: (b, H, P)



class Mamba2(nn.Module):
    """Mamba2 (SSD) mixer with the :mod:`lmlab.models.recurrent` interface (see the module docstring)."""

    # The layout before the projection was laid out by heads (one ``in_proj`` over [z, x, B, C, dt], one convolution
    # over [x, B, C]): old parameter -> the parameters its rows went to. Checkpoints and state dicts saved in it still
    # load (:meth:`from_old_layout`; lmlab.train.checkpoint, lmlab.models.layers.load_old_parameter_names).
    OLD_LAYOUT = {"in_proj.weight": ("head_proj.weight", "bc_proj.weight"),
                  "conv_weight": ("x_conv.weight", "bc_conv.weight"),
                  "conv_bias": ("x_conv.bias", "bc_conv.bias")}

    def __init__(self, cfg: ModelConfig, layer_id: int = 0):
        super().__init__()
        r = cfg.recurrent
        self.layer_id = layer_id
        self.dim, self.inner = cfg.dim, r.expand * cfg.dim
        if self.inner % r.head_dim:
            raise ValueError(f"model.recurrent.head_dim={r.head_dim} must divide the Mamba2 inner width "
                             f"expand x dim = {r.expand} x {cfg.dim} = {self.inner}")
        if r.conv_width < 1:
            raise ValueError(f"model.recurrent.conv_width={r.conv_width}: Mamba2 needs a convolution of width >= 1")
        self.head_dim, self.state_dim, self.n_heads = r.head_dim, r.state_dim, self.inner // r.head_dim
        self.conv_width, self.chunk_size = r.conv_width, r.chunk_size
        self.conv_channels = self.inner + 2 * self.state_dim  # the conv runs over [x, B, C]
        self.use_kernels = bool(getattr(r, "kernels", False))  # CUDA kernels when importable (module docstring)

        p, n = self.head_dim, self.state_dim
        self.head_proj = nn.Linear(cfg.dim, self.n_heads * (2 * p + 1), bias=False)  # per head: z (P), x (P), dt
        self.bc_proj = nn.Linear(cfg.dim, 2 * n, bias=False)  # B, C: shared by the heads
        self.x_conv = ShortConv(self.inner, self.conv_width)
        self.bc_conv = ShortConv(2 * n, self.conv_width)
        self.dt_bias = nn.Parameter(torch.empty(self.n_heads))
        self.A_log = nn.Parameter(torch.empty(self.n_heads))
        self.D = nn.Parameter(torch.empty(self.n_heads))
        self.norm = RMSNorm(self.inner, cfg.norm_eps)
        self.out_proj = nn.Linear(self.inner, cfg.dim, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, in_std: float = 0.02, out_std: float = 0.02, generator=None) -> None:
        nn.init.normal_(self.head_proj.weight, 0.0, in_std, generator=generator)
        nn.init.normal_(self.bc_proj.weight, 0.0, in_std, generator=generator)
        nn.init.normal_(self.out_proj.weight, 0.0, out_std, generator=generator)
        self.x_conv.reset_parameters(generator)  # nn.Conv1d's default range for a depthwise filter, zero bias
        self.bc_conv.reset_parameters(generator)
        # dt = softplus(dt_bias) log-uniform in [DT_MIN, DT_MAX]: dt_bias = dt + log(1 - exp(-dt)), softplus's inverse
        dt = torch.empty_like(self.dt_bias).uniform_(math.log(DT_MIN), math.log(DT_MAX), generator=generator)
        dt = dt.exp().clamp(min=DT_FLOOR)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.A_log.uniform_(A_MIN, A_MAX, generator=generator).log_()
        nn.init.ones_(self.D)
        self.norm.reset_parameters()

    def init_state(self, batch: int, device=None, dtype: torch.dtype = torch.float32) -> State:
        return {"ssm": torch.zeros(batch, self.n_heads, self.head_dim, self.state_dim, device=device, dtype=dtype),
                "conv": torch.zeros(batch, self.conv_channels, self.conv_width - 1, device=device, dtype=dtype)}

    def num_state_elements(self) -> int:
        return self.n_heads * self.head_dim * self.state_dim + self.conv_channels * (self.conv_width - 1)

    def flops_per_token(self) -> int:
        """Forward FLOPs per token: 2 x the projections' weights, the convolution, and the chunked scan's matmuls
        at Q = chunk_size (per token: C.B against the Q steps of its chunk 2QN, the scores times x 2 inner Q,
        the chunk-state outer products and the state read-out 2 inner N each, the chunk recurrence 2 inner N / Q).
        Elementwise work (softplus, exp, gate, norm) is left out, as the transformer leaves out its softmax."""
        q, n, inner = self.chunk_size, self.state_dim, self.inner
        proj = self.head_proj.weight.numel() + self.bc_proj.weight.numel() + self.out_proj.weight.numel()
        scan = 2 * q * n + 2 * inner * q + 4 * inner * n + (2 * inner * n) // q
        return 2 * proj + 2 * self.conv_channels * self.conv_width + scan

    def tensor_parallel_plan(self, tp: int, sequence_parallel: bool = False) -> dict[str, object]:
        """The heads split over ``tp`` processes, B and C replicated (keys relative to this mixer; see the module
        docstring)."""
        from torch.distributed.tensor import Replicate, Shard
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

        if self.n_heads % tp:
            raise ValueError(f"model.recurrent.head_dim: Mamba2's heads, expand x dim / head_dim = {self.inner} / "
                             f"{self.head_dim} = {self.n_heads}, must divide by parallel.tp={tp} (tensor parallel "
                             "splits the heads)")
        return {
            "": ShardParameters(("dt_bias", "A_log", "D"), gather_input=sequence_parallel),
            "head_proj": ColwiseParallel(),
            "x_conv": ShardParameters(("weight", "bias")),
            "norm": ShardParameters(("weight",)),
            "out_proj": RowwiseParallel(output_layouts=Shard(1) if sequence_parallel else Replicate()),
        }

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (..., dim) -> z, xs (..., h, P), dt (..., h), [B, C] (..., 2N): h = this process's heads (all of them
        on one process, n_heads / tp under tensor parallel)."""
        p = self.head_dim
        z, xs, dt = self.head_proj(x).unflatten(-1, (-1, 2 * p + 1)).split([p, p, 1], dim=-1)
        return z, xs, dt.squeeze(-1), self.bc_proj(x)

    def _compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        return torch.promote_types(x.dtype, torch.float32)

    def _out(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """out_proj(RMSNorm(y * silu(z))) for y, z (..., h, P): under tensor parallel the mean square is over all
        inner channels, from every process's sum of squares over its own."""
        g = (y.to(z.dtype) * F.silu(z)).flatten(-2)
        mesh = tp_mesh(self.norm.weight)
        if mesh is None:
            return self.out_proj(self.norm(g))
        gf = g.float()
        squares = all_reduce_sum(gf.pow(2).sum(-1, keepdim=True), mesh)
        normed = (gf * torch.rsqrt(squares / self.inner + self.norm.eps)).to(g.dtype)
        return self.out_proj(local(self.norm.weight) * normed)

    def from_old_layout(self, old: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This mixer's parameters (names relative to it) from tensors of the :attr:`OLD_LAYOUT` parameters' shapes
        (their weights, or an optimizer's moments of them; full tensors): ``in_proj`` rows [z, x, B, C, dt] ->
        ``head_proj`` rows per head [z_h (P), x_h (P), dt_h] and ``bc_proj`` rows [B, C]; convolution rows [x, B, C]
        -> ``x_conv`` [x] and ``bc_conv`` [B, C]. A ValueError names a tensor whose rows do not fit this mixer."""
        h, p, n, inner = self.n_heads, self.head_dim, self.state_dim, self.inner
        rows = {"in_proj.weight": 2 * inner + 2 * n + h, "conv_weight": inner + 2 * n, "conv_bias": inner + 2 * n}
        for name, want in rows.items():
            if name not in old:
                raise ValueError(f"old-layout Mamba2 parameters: {name} is missing")
            if old[name].shape[0] != want:
                raise ValueError(f"old-layout Mamba2 parameter {name} has shape {tuple(old[name].shape)}: this mixer "
                                 f"(inner {inner}, {h} heads, state {n}) needs {want} rows")
        z, x, bc, dt = old["in_proj.weight"].split([inner, inner, 2 * n, h])
        head = torch.cat([z.unflatten(0, (h, p)), x.unflatten(0, (h, p)), dt.unflatten(0, (h, 1))], dim=1)
        cw, cb = old["conv_weight"], old["conv_bias"]
        return {"head_proj.weight": head.flatten(0, 1), "bc_proj.weight": bc,
                "x_conv.weight": cw[:inner], "bc_conv.weight": cw[inner:],
                "x_conv.bias": cb[:inner], "bc_conv.bias": cb[inner:]}

    def _conv_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Weight (C, W) and bias (C,) of the convolution over [x, B, C]: this process's x channels, then B and C."""
        return (torch.cat([local(self.x_conv.weight), self.bc_conv.weight]),
                torch.cat([local(self.x_conv.bias), self.bc_conv.bias]))

    def forward(self, x: torch.Tensor, resets: torch.Tensor | None = None,
                state: State | None = None) -> tuple[torch.Tensor, State]:
        p, n = self.head_dim, self.state_dim
        z, xs, dt, bc = self._project(x)
        h = xs.shape[-2]
        kernels = kernels_for(x, self.use_kernels)
        scan = kernels.ssd
        xbc, conv_state = self._conv(torch.cat([xs.flatten(-2), bc], dim=-1), resets,
                                     None if state is None else state["conv"], kernels.conv)
        xs, bc = xbc.split([h * p, 2 * n], dim=-1)
        B, C = all_reduce_grad(bc, tp_mesh(self.A_log)).chunk(2, dim=-1)  # (tensor parallel: B, C are shared)
        xs = xs.unflatten(-1, (h, p))
        dt_bias, A_log, D = local(self.dt_bias), local(self.A_log), local(self.D)
        ssm0 = None if state is None else state["ssm"]
        if scan is not None and x.dtype != torch.float64 and (ssm0 is None or resets is None):
            # the kernels' seq_idx numbers documents; an initial state belongs to number 0 (before any reset).
            # Both an initial state and resets at once stay on the plain path (a corner left untried with them).
            seq_idx = None if resets is None else torch.cumsum(resets, dim=1, dtype=torch.int32)
            y, ssm = scan(xs, dt.contiguous(), -torch.exp(A_log.float()), B.unsqueeze(2), C.unsqueeze(2),
                          self.chunk_size, D=D, dt_bias=dt_bias, initial_states=None if ssm0 is None else ssm0.float(),
                          seq_idx=seq_idx, dt_softplus=True, return_final_states=True)
        else:
            ct = self._compute_dtype(x)
            dt = F.softplus(dt.to(ct) + dt_bias.to(ct))
            y, ssm = ssd_chunked(xs.to(ct), dt, -torch.exp(A_log.to(ct)), B.to(ct), C.to(ct), self.chunk_size,
                                 ssm0, resets)
            y = y + D.to(ct)[:, None] * xs.to(ct)
        return self._out(y, z), {"ssm": ssm, "conv": conv_state}

    def _conv(self, xbc: torch.Tensor, resets: torch.Tensor | None, conv_state: torch.Tensor | None,
              kernel) -> tuple[torch.Tensor, torch.Tensor]:
        """silu(causal conv) over [x, B, C] (B, T, C) and the new conv state."""
        weight, bias = self._conv_params()
        out = kernel_conv(kernel, xbc, weight, bias, resets, conv_state, activation="silu")
        if out is not None:
            return out
        y, conv_state = causal_conv1d(xbc, weight, bias, resets, conv_state)
        return F.silu(y), conv_state

    def step(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """One token per sequence: x (B, dim) -> y (B, dim), the sequential recurrence (what decoding runs)."""
        p, n = self.head_dim, self.state_dim
        z, xs, dt, bc = self._project(x)
        h = xs.shape[-2]
        xbc, conv_state = conv_step(torch.cat([xs.flatten(-2), bc], dim=-1), *self._conv_params(), state["conv"])
        xs, B, C = F.silu(xbc).split([h * p, n, n], dim=-1)
        ct = self._compute_dtype(x)
        xs = xs.unflatten(-1, (h, p)).to(ct)
        dt = F.softplus(dt.to(ct) + local(self.dt_bias).to(ct))
        y, ssm = ssd_step(state["ssm"].to(ct), xs, dt, -torch.exp(local(self.A_log).to(ct)), B.to(ct), C.to(ct))
        y = y + local(self.D).to(ct)[:, None] * xs
        return self._out(y, z), {"ssm": ssm, "conv": conv_state}
