"""Building blocks of the Llama-style decoder: RMSNorm, rotary embeddings, SwiGLU MLP, attention masks, and
the old names of renamed parameters (so that older checkpoints load).

Rotary embeddings use the "half-split" layout of Hugging Face ``LlamaForCausalLM``: the head dimension
is cut into two halves that rotate together (``rotate_half``), with frequencies
``theta ** (-2i / head_dim)`` computed in float32 exactly as HF does. Meta's original checkpoints use
the interleaved layout instead; ``lmlab.hf.permute_interleaved_to_half`` converts their q/k weights.

Rotary scaling (``model.rope_scaling``) stretches a model to a longer context than it was trained at, with HF's
definitions (``transformers.modeling_rope_utils``): ``linear`` divides every frequency by ``factor`` (positions /
factor); ``ntk`` raises the base to ``theta * factor ** (d / (d - 2))`` (static NTK-aware scaling: HF's dynamic
NTK at the length where its base is the same; HF has no static one); ``yarn`` keeps the fast dimensions' frequencies,
divides the slow ones' by ``factor``, ramps between them (``beta_fast`` .. ``beta_slow`` turns over the original
length) and scales cos/sin by the attention factor ``0.1 * ln(factor) + 1``. Only the tables change, never a weight.

Usage::

    rope = Rotary(head_dim=64, max_seq_len=2048, theta=10000.0)     # scaling=cfg.rope_scaling for a scaled one
    cos, sin = rope(positions)                 # positions: (B, T) int64 -> (B, 1, T, head_dim) each
    q = apply_rotary(q, cos, sin)              # q: (B, H, T, head_dim)
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from lmlab.config import RopeScalingConfig


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


def yarn_attention_factor(factor: float) -> float:
    """YaRN's scale of cos/sin, ``0.1 * ln(factor) + 1`` (1 for factor <= 1), as HF's ``_compute_yarn_parameters``."""
    return 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0


def yarn_inv_freq(head_dim: int, theta: float, factor: float, original_max_seq_len: int, beta_fast: float = 32.0,
                  beta_slow: float = 1.0) -> torch.Tensor:
    """YaRN's inverse frequencies, float32, computed step by step as HF's ``_compute_yarn_parameters`` (with its
    default ``truncate=True``): dimension ``i`` keeps its frequency (extrapolation) when it turns more than
    ``beta_fast`` times over ``original_max_seq_len`` positions, is divided by ``factor`` (interpolation) when it
    turns fewer than ``beta_slow`` times, and blends the two linearly in between."""
    dim = head_dim

    def correction_dim(rotations: float) -> float:  # the dimension that turns `rotations` times over the length
        return (dim * math.log(original_max_seq_len / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # as HF: no division by zero
    pos_freqs = theta ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    keep = 1 - ramp  # 1: extrapolate (keep the frequency), 0: interpolate
    return interpolation * (1 - keep) + extrapolation * keep


def rope_scaled_inv_freq(head_dim: int, theta: float, scaling: RopeScalingConfig | None) -> tuple[torch.Tensor, float]:
    """``(inverse frequencies, scale of cos/sin)`` of a rotary embedding with ``scaling`` (``model.rope_scaling``;
    None or kind ``none``: plain rotary), float32, matching HF's rope types ``default``, ``linear`` and ``yarn``;
    ``ntk`` is static NTK-aware scaling (HF's ``dynamic`` type at the length where its base is the same)."""
    kind = "none" if scaling is None else scaling.kind
    if kind == "none":
        return rope_inv_freq(head_dim, theta), 1.0
    factor = float(scaling.factor)
    if kind == "linear":
        return rope_inv_freq(head_dim, theta) / factor, 1.0
    if kind == "ntk":
        return rope_inv_freq(head_dim, theta * factor ** (head_dim / (head_dim - 2))), 1.0
    if kind == "yarn":
        if scaling.original_max_seq_len is None:
            raise ValueError("model.rope_scaling.original_max_seq_len: yarn needs the context length the model was "
                             "trained at")
        inv_freq = yarn_inv_freq(head_dim, theta, factor, scaling.original_max_seq_len, scaling.beta_fast,
                                 scaling.beta_slow)
        attn = scaling.attention_factor if scaling.attention_factor is not None else yarn_attention_factor(factor)
        return inv_freq, float(attn)
    raise ValueError(f"model.rope_scaling.kind: unknown kind {kind!r}; choose none, linear, ntk or yarn")


class Rotary(nn.Module):
    """Cos/sin tables for positions ``0 .. max_seq_len-1``; indexed by explicit positions at run time.

    Tables are non-persistent buffers rebuilt by ``reset_parameters`` (so a model built on the meta
    device gets correct tables when materialised); they are never saved, so a checkpoint resumes under another
    ``max_seq_len`` or ``scaling`` (``model.rope_scaling``, see :func:`rope_scaled_inv_freq`).
    """

    def __init__(self, head_dim: int, max_seq_len: int, theta: float, scaling: RopeScalingConfig | None = None):
        super().__init__()
        self.head_dim, self.max_seq_len, self.theta, self.scaling = head_dim, max_seq_len, theta, scaling
        self.register_buffer("cos", torch.empty(max_seq_len, head_dim), persistent=False)
        self.register_buffer("sin", torch.empty(max_seq_len, head_dim), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.cos.is_meta:
            return
        inv_freq, scale = rope_scaled_inv_freq(self.head_dim, self.theta, self.scaling)
        inv_freq = inv_freq.to(self.cos.device)
        t = torch.arange(self.max_seq_len, device=self.cos.device, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos.copy_(emb.cos() * scale)  # YaRN's attention factor, as HF applies it; 1 otherwise
        self.sin.copy_(emb.sin() * scale)

    def extra_repr(self) -> str:
        kind = "none" if self.scaling is None else self.scaling.kind
        return f"head_dim={self.head_dim}, max_seq_len={self.max_seq_len}, theta={self.theta}, scaling={kind}"

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
    name only (see :func:`old_parameter_names`), and converts parameters held in a module's old layout only (see
    :func:`old_layouts`), so that state dicts saved before a renaming or a re-layout still load."""
    for new, old in old_parameter_names(module).items():
        if prefix + old in state_dict and prefix + new not in state_dict:
            state_dict[prefix + new] = state_dict.pop(prefix + old)
    for name, sub in old_layouts(module).items():  # a module's re-laid-out parameters, from its old layout
        pre = prefix + name
        olds = {o: pre + o for o in sub.OLD_LAYOUT}
        news = [pre + n for group in sub.OLD_LAYOUT.values() for n in group]
        if all(k in state_dict for k in olds.values()) and not any(k in state_dict for k in news):
            converted = sub.from_old_layout({o: state_dict.pop(k) for o, k in olds.items()})
            state_dict.update({pre + k: v for k, v in converted.items()})


def old_layouts(model: nn.Module) -> dict[str, nn.Module]:
    """``{name prefix ("layers.0.mixer."): module}`` of the modules that changed the layout of some parameters: a
    class attribute ``OLD_LAYOUT`` (``{old parameter: the new parameters its rows went to}``, names relative to the
    module) and a method ``from_old_layout({old name: tensor}) -> {new name: tensor}`` (e.g.
    :class:`lmlab.models.mamba2.Mamba2`)."""
    return {(f"{name}." if name else ""): m for name, m in model.named_modules() if getattr(m, "OLD_LAYOUT", None)}
