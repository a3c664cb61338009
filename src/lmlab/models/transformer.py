"""A Llama-style decoder in plain PyTorch: RMSNorm, rotary embeddings, grouped-query attention through
``scaled_dot_product_attention``, SwiGLU MLP, optional tied embeddings and qkv bias.

Packed rows: pass ``doc_ids`` (B, T) and tokens attend only to earlier tokens of the same document
(block-diagonal causal mask); positions restart at 0 in each document unless ``positions`` are given.
A packed forward equals the forward of each document on its own.

Usage::

    from lmlab.config import ModelConfig
    from lmlab.models import build_model
    model = build_model(ModelConfig(vocab_size=264, dim=128, n_layers=4, n_heads=4))
    logits = model(tokens)                        # (B, T, vocab) float32
    logits = model(tokens, doc_ids=doc_ids)       # packed documents
    logits = model(tokens, cache=step)            # incremental decoding (a PagedStep of lmlab.inference.pool)
    meta = build_model(cfg, device="meta")        # no memory; later: materialize(meta, "cpu", seed=0)

Incremental decoding: ``cache`` is any object with the :class:`AttentionCache` interface. It tells the model
the rotary position of each new token and which keys each query may see, and every attention layer
hands it the new keys/values, getting back the keys/values to attend over. The model makes no
assumption about how the cache stores them (one contiguous batch, pages, a shared prefix).

Smeared keys and queries (``cfg.smear_keys``): an optional module, ``attention.smear``, see :mod:`lmlab.models.smear`.

Parameter names (``tok_embeddings``, ``layers.N.attention.wq`` ...) follow Meta's Llama code;
``lmlab.hf`` maps them to and from Hugging Face names. A state dict with the old names of renamed parameters
(``OLD_NAMES`` of a module, see :func:`lmlab.models.layers.old_parameter_names`) loads too.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.config import ModelConfig
from lmlab.models.init import init_stds
from lmlab.models.layers import (
    RMSNorm,
    Rotary,
    SwiGLU,
    apply_rotary,
    default_hidden_dim,
    document_causal_mask,
    load_old_parameter_names,
    positions_from_doc_ids,
)
from lmlab.models.smear import KeySmear


class AttentionCache(Protocol):
    """What a forward with a KV cache needs from it: one object per forward, built by the cache.

    ``positions`` (B, T): rotary position of each new token.
    ``mask``: boolean (B, 1, T, S), True where new token ``t`` may attend key ``s`` of the (S) keys that
    ``update`` returns; ``None`` means those keys are exactly the T new tokens, attended causally.
    ``update(layer, k, v)``: store the new keys/values (B, n_kv_heads, T, head_dim) of layer ``layer`` and
    return the keys/values (B, n_kv_heads, S, head_dim) the new queries attend over.
    ``previous_keys(layer, k, n)``, needed by models with smeared keys only (``lmlab.models.smear``, which keeps
    the per-token field ``raw_keys``): store the new tokens' raw keys (B, n_kv_heads, T, head_dim) and return, for
    each, the raw keys of the ``n`` tokens before it in its sequence (B, n_kv_heads, T, n, head_dim; zeros before
    the sequence's first token). ``update`` then receives the smeared keys, which the cache stores as the tokens'
    keys.
    Optional ``blocks`` (a cache may leave it out, or set it to None): with one row (B = 1), a list of
    ``(q0, q1, k0, k1, mask)``: queries ``q0:q1`` attend keys ``k0:k1`` only, under ``mask`` (boolean
    (q1 - q0, k1 - k0)), or causally when ``mask`` is None. It must say the same as ``mask`` (every query in
    exactly one block, every key it may see in that block); it lets a packed row of several sequences run one
    small attention per sequence instead of one dense block-diagonal one.
    Optional ``shared_keys`` (an int, 0 or absent when unused): the first ``shared_keys`` keys of every row are
    the same (a prompt prefix that every row's sequence shares, e.g. a system prompt) and every query may see
    them; attention then reads them once for the whole batch (cascade attention) instead of once per row.
    """

    positions: torch.Tensor
    mask: torch.Tensor | None

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


class Attention(nn.Module):
    """Grouped-query self-attention: ``n_heads`` query heads share ``n_kv_heads`` key/value heads."""

    def __init__(self, cfg: ModelConfig, layer_id: int = 0):
        super().__init__()
        self.layer_id = layer_id  # names this layer's keys/values in a KV cache
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads or cfg.n_heads
        self.head_dim = cfg.dim // cfg.n_heads
        # optional smeared keys/queries (lmlab.models.smear); registered first to keep the parameters' old order
        self.smear = (KeySmear(cfg, self.n_heads, self.n_kv_heads, self.head_dim, layer_id)
                      if cfg.smears(layer_id) else None)
        self.wq = nn.Linear(cfg.dim, self.n_heads * self.head_dim, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.dim, self.n_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.dim, self.n_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.wo = nn.Linear(self.n_heads * self.head_dim, cfg.dim, bias=False)

    def reset_parameters(self, in_std: float = 0.02, out_std: float = 0.02, generator=None) -> None:
        for lin in (self.wq, self.wk, self.wv):
            nn.init.normal_(lin.weight, 0.0, in_std, generator=generator)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        nn.init.normal_(self.wo.weight, 0.0, out_std, generator=generator)
        if self.smear is not None:
            self.smear.reset_parameters()

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: AttentionCache | None = None,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        # (-1 heads: under tensor parallel a process holds n_heads / tp query and n_kv_heads / tp key/value heads)
        q = self.wq(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if self.smear is not None:
            q, k = self.smear(q, k, mask, cache)
        blocks = None
        if cache is not None:
            k, v = cache.update(self.layer_id, k, v)
            blocks = getattr(cache, "blocks", None)
        shared = getattr(cache, "shared_keys", 0) if cache is not None else 0
        if blocks is not None:
            y = self._blocks(q, k, v, blocks)
        elif shared:
            k, v = self._expand_kv(k, v)
            y = cascade_attention(q, k, v, mask, shared)
        elif mask is None:  # SDPA shares each key/value head across its query group without copying
            y = sdpa(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])
        else:
            k, v = self._expand_kv(k, v)
            y = sdpa(q, k, v, attn_mask=mask)
        return self.wo(y.transpose(1, 2).reshape(b, t, -1))

    def _expand_kv(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values repeated across each query group: the masked CPU SDPA kernels need materialised heads."""
        if self.n_kv_heads == self.n_heads:
            return k, v
        rep = self.n_heads // self.n_kv_heads
        return k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)

    def _blocks(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, blocks) -> torch.Tensor:
        """Attention of a one-row packed forward, one block (sequence) at a time (see AttentionCache.blocks)."""
        k, v = self._expand_kv(k, v)
        y = torch.zeros_like(q) if len(blocks) == 0 else torch.empty_like(q)
        for q0, q1, k0, k1, m in blocks:
            y[:, :, q0:q1] = F.scaled_dot_product_attention(q[:, :, q0:q1], k[:, :, k0:k1], v[:, :, k0:k1],
                                                            attn_mask=m, is_causal=m is None)
        return y


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw) -> torch.Tensor:
    """``F.scaled_dot_product_attention``, except under bf16 (or fp16) autocast on the CPU, where it runs in float32
    and returns the queries' dtype (autocast alone would cast float32 inputs down): there the linears' matmuls gain
    from bf16 (~4x a float32 ``mm`` on a CPU with AVX512-BF16) but the CPU's bf16 flash-attention kernel, backward
    above all, is ~2.6x slower than its float32 one (measured at batch 32, 4 heads of 16, 192 tokens: 53 vs 20 ms
    forward + backward). Attention in float32 of the same inputs is also the more exact of the two."""
    if q.device.type == "cpu" and torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") in (
            torch.bfloat16, torch.float16):
        with torch.autocast("cpu", enabled=False):
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **kw).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, **kw)


def cascade_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                      shared: int) -> torch.Tensor:
    """Softmax attention of queries (B, H, T, D) over keys/values (B, H, S, D) under a boolean ``mask``
    (B, 1, T, S), where keys ``:shared`` are the same in every row and visible to every query: they are read
    once, from row 0, in one matmul for all B * T queries; each row's own keys ``shared:`` are read per row.
    Both parts share one softmax (the scores are concatenated), so it equals plain attention up to rounding."""
    b, h, t, d = q.shape
    scale = d ** -0.5
    qs = q.transpose(0, 1).reshape(h, b * t, d)  # every query of head j against the shared keys of head j
    s_shared = torch.matmul(qs, k[0, :, :shared].transpose(-1, -2)).view(h, b, t, shared).transpose(0, 1)
    s_own = torch.matmul(q, k[:, :, shared:].transpose(-1, -2))
    scores = torch.cat([s_shared, s_own.masked_fill(~mask[..., shared:], float("-inf"))], dim=-1) * scale
    p = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    p_shared = p[..., :shared].transpose(0, 1).reshape(h, b * t, shared)
    y = torch.matmul(p_shared, v[0, :, :shared]).view(h, b, t, d).transpose(0, 1)
    return y + torch.matmul(p[..., shared:], v[:, :, shared:])


class Block(nn.Module):
    """Pre-norm residual block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``.

    With a recurrent mixer (``model.mixer`` / ``model.layer_mixers``) the first half is ``x + mixer(norm(x))``
    (modules ``mixer_norm``, ``mixer``; see :mod:`lmlab.models.recurrent`) and the MLP is kept unless
    ``model.recurrent.mlp`` is false."""

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.kind = cfg.mixers()[layer_id]
        if self.kind == "attention":
            self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
            self.attention = Attention(cfg, layer_id)
        else:
            from lmlab.models.recurrent import build_mixer

            self.mixer_norm = RMSNorm(cfg.dim, cfg.norm_eps)
            self.mixer = build_mixer(self.kind, cfg, layer_id)
        self.ffn_norm = self.feed_forward = None
        if self.kind == "attention" or cfg.recurrent.mlp:
            self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
            hidden = cfg.hidden_dim or default_hidden_dim(cfg.dim, cfg.multiple_of)
            self.feed_forward = SwiGLU(cfg.dim, hidden)

    def reset_parameters(self, in_std: float, out_std: float, generator=None) -> None:
        if self.kind == "attention":
            self.attention_norm.reset_parameters()
            self.attention.reset_parameters(in_std, out_std, generator)
        else:
            self.mixer_norm.reset_parameters()
            self.mixer.reset_parameters(in_std, out_std, generator)
        if self.feed_forward is not None:
            self.ffn_norm.reset_parameters()
            self.feed_forward.reset_parameters(in_std, out_std, generator)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: AttentionCache | None = None,
        resets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.kind == "attention":
            x = x + self.attention(self.attention_norm(x), cos, sin, mask, cache)
        elif cache is None:
            x = x + self.mixer(self.mixer_norm(x), resets=resets)[0]
        else:  # the cache holds this layer's recurrent state (one row per sequence)
            state = cache.recurrent_state(self.layer_id)
            h = self.mixer_norm(x)
            if h.shape[1] == 1 and state is not None and resets is None:  # decoding: the O(1) recurrence
                y, state = self.mixer.step(h[:, 0], state)
                y = y.unsqueeze(1)
            else:
                y, state = self.mixer(h, resets=resets, state=state)
            cache.set_recurrent_state(self.layer_id, state)
            x = x + y
        if self.feed_forward is None:
            return x
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    """The decoder. ``cfg.vocab_size`` must be set (``build_model`` fills it from a tokenizer)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("model.vocab_size is null: resolve it from the tokenizer first (see build_model)")
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.recurrent = any(layer.kind != "attention" for layer in self.layers)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.rotary = Rotary(cfg.dim // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta, scaling=cfg.rope_scaling)
        self.register_load_state_dict_pre_hook(load_old_parameter_names)  # older checkpoints' names
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """(Re)initialise every weight with the configured scheme; the one place weights get values."""
        if self.cfg.tie_embeddings:  # to_empty() (meta -> device) allocates the two separately: re-tie
            self.output.weight = self.tok_embeddings.weight
        if self.tok_embeddings.weight.is_meta:
            return
        top = init_stds(self.cfg)
        nn.init.normal_(self.tok_embeddings.weight, 0.0, top.embed, generator=generator)
        for layer in self.layers:
            s = init_stds(self.cfg, layer.layer_id)
            layer.reset_parameters(s.inp, s.out, generator)
        self.norm.reset_parameters()
        if not self.cfg.tie_embeddings:
            nn.init.normal_(self.output.weight, 0.0, top.head, generator=generator)
        self.rotary.reset_parameters()

    def forward(
        self,
        tokens: torch.Tensor,
        *,
        positions: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        cache: AttentionCache | None = None,
        logits_at: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, vocab) for tokens (B, T).

        ``doc_ids`` (B, T): document of each token in a packed row (block-diagonal causal mask).
        ``positions`` (B, T): rotary positions; default 0..T-1, or per-document when ``doc_ids`` is given.
        ``cache``: the new tokens extend cached sequences; positions and mask then come from the cache
        (see :class:`AttentionCache`), so ``positions`` and ``doc_ids`` must be left out.
        ``logits_at`` (B, T) bool: only the logits of these positions, as (N, vocab) in row-major order (what a
        loss over a few target positions needs: the output head and the softmax skip the others).
        """
        h = self.tok_embeddings(tokens)
        mask = None
        if cache is not None:
            if positions is not None or doc_ids is not None:
                raise ValueError("with a cache, positions and the mask come from the cache: drop positions/doc_ids")
            positions, mask = cache.positions, cache.mask
            if positions.shape != tokens.shape:
                raise ValueError(
                    f"the cache step covers {tuple(positions.shape)} tokens but tokens are {tuple(tokens.shape)}"
                )
        elif doc_ids is not None:
            mask = document_causal_mask(doc_ids)
            if positions is None:
                positions = positions_from_doc_ids(doc_ids)
        cos, sin = self.rotary(positions, tokens.shape[1])
        cos, sin = cos.to(h.dtype), sin.to(h.dtype)
        resets = None
        if self.recurrent:  # recurrent mixers restart their state at each document of a packed row
            from lmlab.models.recurrent import doc_resets

            resets = getattr(cache, "resets", None) if cache is not None else doc_resets(doc_ids)
        for layer in self.layers:
            h = layer(h, cos, sin, mask, cache, resets)
        if logits_at is not None:
            if logits_at.shape != tokens.shape or logits_at.dtype != torch.bool:
                raise ValueError(f"logits_at must be a bool mask of the tokens' shape {tuple(tokens.shape)}, got "
                                 f"{logits_at.dtype} {tuple(logits_at.shape)}")
            h = h[logits_at]
        return self.output(self.norm(h))

    def tensor_parallel_plan(self, tp: int, sequence_parallel: bool = False,
                             loss_parallel: bool = False) -> dict[str, object]:
        """The DTensor plan of this model for ``parallelize_module`` over a ``tp``-process mesh (Megatron-style):
        q/k/v and the MLP's w1/w3 column-wise (each process computes ``n_heads / tp`` heads and a slice of the
        hidden units), wo and w2 row-wise (their partial sums reduced), the embedding row-wise (split over the
        vocabulary) and the output head column-wise (logits gathered). A recurrent mixer's plan is its own
        (``mixer.tensor_parallel_plan``, see :mod:`lmlab.models.recurrent`), merged under ``layers.<i>.mixer``; the
        keys are per layer, so hybrid stacks and blocks without an MLP get exactly their own. With
        ``sequence_parallel`` the norms and the residual stream between blocks are split along the sequence,
        gathered before attention, mixer and MLP. With ``loss_parallel`` the logits stay split over the vocabulary
        (a DTensor) for a loss computed on the shards (``torch.distributed.tensor.parallel.loss_parallel``)."""
        from torch.distributed.tensor import Replicate, Shard
        from torch.distributed.tensor.parallel import (
            ColwiseParallel,
            PrepareModuleInput,
            RowwiseParallel,
            SequenceParallel,
        )

        cfg = self.cfg
        n_kv = cfg.n_kv_heads or cfg.n_heads
        if any(layer.kind == "attention" for layer in self.layers) and (cfg.n_heads % tp or n_kv % tp):
            raise ValueError(f"tensor parallel over {tp} processes splits the heads: model.n_heads={cfg.n_heads} and "
                             f"model.n_kv_heads={n_kv} must both divide by parallel.tp={tp}")
        if cfg.tie_embeddings:
            raise ValueError("model.tie_embeddings: the embedding (split by vocabulary rows) and the output head "
                             "(split by vocabulary columns) cannot share one tensor under tensor parallel; untie them")
        if cfg.smear_keys:
            raise ValueError("model.smear_keys: smeared keys have no tensor-parallel plan (their mixing weights are "
                             "per key head); train them with data parallelism")
        seq = Shard(1) if sequence_parallel else Replicate()
        plan: dict[str, object] = {
            "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=seq),
            "output": (ColwiseParallel(input_layouts=seq, output_layouts=Shard(-1), use_local_output=False)
                       if loss_parallel else
                       ColwiseParallel(input_layouts=seq, output_layouts=Replicate(), use_local_output=True)),
        }
        if sequence_parallel:
            plan["norm"] = SequenceParallel()
        for i, layer in enumerate(self.layers):
            pre = f"layers.{i}."
            if layer.kind == "attention":
                for name in ("wq", "wk", "wv"):
                    plan[f"{pre}attention.{name}"] = ColwiseParallel()
                plan[f"{pre}attention.wo"] = RowwiseParallel(output_layouts=seq)
                if sequence_parallel:
                    plan[f"{pre}attention_norm"] = SequenceParallel()
                    plan[f"{pre}attention"] = PrepareModuleInput(
                        input_layouts=(Shard(1), None, None, None, None),
                        desired_input_layouts=(Replicate(), None, None, None, None))
            else:
                mixer_plan = getattr(layer.mixer, "tensor_parallel_plan", None)
                if mixer_plan is None:
                    raise ValueError(f"model.mixer: {layer.kind} has no tensor-parallel plan; train it with data "
                                     "parallelism (FSDP2 / DDP)")
                for key, style in mixer_plan(tp, sequence_parallel=sequence_parallel).items():
                    plan[f"{pre}mixer" + (f".{key}" if key else "")] = style
                if sequence_parallel:
                    plan[f"{pre}mixer_norm"] = SequenceParallel()
            if layer.feed_forward is not None:
                plan[f"{pre}feed_forward.w1"] = ColwiseParallel()
                plan[f"{pre}feed_forward.w3"] = ColwiseParallel()
                plan[f"{pre}feed_forward.w2"] = RowwiseParallel(output_layouts=seq)
                if sequence_parallel:
                    plan[f"{pre}ffn_norm"] = SequenceParallel()
                    plan[f"{pre}feed_forward"] = PrepareModuleInput(input_layouts=(Shard(1),),
                                                                    desired_input_layouts=(Replicate(),))
        return plan

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Number of unique parameters; ``exclude_embeddings`` drops the token-embedding table.

        With tied embeddings the shared table is counted once, and excluded with the embeddings.
        """
        n = sum(p.numel() for p in self.parameters())  # parameters() yields a tied tensor once
        if exclude_embeddings:
            n -= self.tok_embeddings.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token (forward + backward), PaLM-style: ``6 * N + 12 * L * dim * seq_len``.

        N counts every non-embedding parameter plus the output head (its matmul runs even when its
        weights are tied to the embedding). The second term is attention's score and value matmuls,
        counted for the full T x T square (not halved for causality), as PaLM and nanoGPT do.
        """
        n = self.num_params(exclude_embeddings=True)
        if self.cfg.tie_embeddings:
            n += self.output.weight.numel()
        n_attention = sum(layer.kind == "attention" for layer in self.layers)
        scans = 0  # recurrent mixers: their forward work beyond the matmuls of their weights, x3 for the backward
        for layer in self.layers:
            if layer.kind != "attention":
                scans += layer.mixer.flops_per_token() - 2 * sum(p.numel() for p in layer.mixer.parameters())
        return 6 * n + 12 * n_attention * self.cfg.dim * seq_len + 3 * max(scans, 0)
