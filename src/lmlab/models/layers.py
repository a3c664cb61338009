"""Building blocks of the Llama-style decoder: RMSNorm, rotary embeddings, SwiGLU MLP, attention masks, and
the old names of renamed parameters (so that older checkpoints load).

Rotary embeddings use the "half-split" layout of Hugging Face ``LlamaForCausalLM``: the head dimension
is cut into two halves that rotate together (``rotate_half``), with frequencies
``theta ** (-2i / head_dim)`` computed in float32 exactly as HF does. Meta's original checkpoints use
the interleaved layout instead; ``lmlab.hf.permute_interleaved_to_half`` converts their q/k weights.

Usage::

    rope = Rotary(head_dim=64, max_seq_len=2048, theta=10000.0)
    cos, sin = rope(positions)                 # positions: (B, T) int64 -> (B, 1, T, head_dim) each
    q = apply_rotary(q, cos, sin)              # q: (B, H, T, head_dim)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned gain, computed in float32 (as Llama does)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    """Inverse frequencies ``1 / theta ** (2i / head_dim)``, float32, as in HF Llama's default rope."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


class Rotary(nn.Module):
    """Cos/sin tables for positions ``0 .. max_seq_len-1``; indexed by explicit positions at run time.

    Tables are non-persistent buffers rebuilt by ``reset_parameters`` (so a model built on the meta
    device gets correct tables when materialised).
    """

    def __init__(self, head_dim: int, max_seq_len: int, theta: float):
        super().__init__()
        self.head_dim, self.max_seq_len, self.theta = head_dim, max_seq_len, theta
        self.register_buffer("cos", torch.empty(max_seq_len, head_dim), persistent=False)
        self.register_buffer("sin", torch.empty(max_seq_len, head_dim), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.cos.is_meta:
            return
        inv_freq = rope_inv_freq(self.head_dim, self.theta).to(self.cos.device)
        t = torch.arange(self.max_seq_len, device=self.cos.device, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos.copy_(emb.cos())
        self.sin.copy_(emb.sin())

    def forward(self, positions: torch.Tensor | None, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (cos, sin) broadcastable to (B, H, T, head_dim)."""
        if positions is None:
            if seq_len > self.max_seq_len:
                raise ValueError(f"sequence of {seq_len} tokens exceeds model.max_seq_len={self.max_seq_len}")
            return self.cos[None, None, :seq_len], self.sin[None, None, :seq_len]
        if positions.numel() and int(positions.max()) >= self.max_seq_len:
            raise ValueError(f"position {int(positions.max())} exceeds model.max_seq_len={self.max_seq_len}")
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (B, H, T, D) by the angles whose cos/sin are given (half-split layout)."""
    return (x * cos + rotate_half(x) * sin).to(x.dtype)


class SwiGLU(nn.Module):
    """``w2(silu(w1 x) * w3 x)``: the Llama MLP (w1 = gate, w3 = up, w2 = down)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)

    def reset_parameters(self, in_std: float = 0.02, out_std: float = 0.02, generator=None) -> None:
        for lin in (self.w1, self.w3):
            nn.init.normal_(lin.weight, 0.0, in_std, generator=generator)
        nn.init.normal_(self.w2.weight, 0.0, out_std, generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def default_hidden_dim(dim: int, multiple_of: int) -> int:
    """Llama's rule: 2/3 of 4*dim, rounded up to a multiple of ``multiple_of``."""
    hidden = int(2 * (4 * dim) / 3)
    return multiple_of * math.ceil(hidden / multiple_of)


def positions_from_doc_ids(doc_ids: torch.Tensor) -> torch.Tensor:
    """Position of each token inside its document: restarts at 0 wherever ``doc_ids`` changes along a row."""
    b, t = doc_ids.shape
    idx = torch.arange(t, device=doc_ids.device).expand(b, t)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    start_idx = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - start_idx


def document_causal_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """Boolean (B, 1, T, T) mask, True where query i may attend key j: j <= i and same document."""
    t = doc_ids.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=doc_ids.device).tril()
    same = doc_ids[:, :, None] == doc_ids[:, None, :]
    return (same & causal).unsqueeze(1)


def old_parameter_names(model: nn.Module) -> dict[str, str]:
    """``{name: name in older checkpoints}`` of the parameters that some module of ``model`` renamed. A module lists
    its renamed parameters in a class attribute ``OLD_NAMES``: ``{its parameter: the old name, relative to the
    module that holds it}`` (e.g. :class:`lmlab.models.smear.KeySmear`, ``keys`` once ``smear`` of its attention)."""
    out = {}
    for name, module in model.named_modules():
        parent = name.rpartition(".")[0]
        for new, old in getattr(module, "OLD_NAMES", {}).items():
            out[f"{name}.{new}"] = f"{parent}.{old}" if parent else old
    return out


def load_old_parameter_names(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """A ``load_state_dict`` pre-hook for a model: renames, in place, the parameters a state dict holds under an old
    name only (see :func:`old_parameter_names`), so that state dicts saved before a renaming still load."""
    for new, old in old_parameter_names(module).items():
        if prefix + old in state_dict and prefix + new not in state_dict:
            state_dict[prefix + new] = state_dict.pop(prefix + old)
