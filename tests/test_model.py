"""The Llama-style decoder: causality, packing, init schemes, meta build, parameter and FLOP counts."""

import math

import pytest
import torch
from conftest import randomize_smear

from lmlab.config import InitConfig, ModelConfig
from lmlab.hf import permute_half_to_interleaved, permute_interleaved_to_half
from lmlab.models import build_model, materialize, resolve_vocab
from lmlab.models.layers import document_causal_mask, positions_from_doc_ids, rope_inv_freq

VARIANTS = {
    "mha": dict(),
    "gqa": dict(n_kv_heads=2),
    "mqa_tied_bias": dict(n_kv_heads=1, tie_embeddings=True, qkv_bias=True),
    "smear_gqa": dict(n_kv_heads=2, smear_keys=2),
    "smear_channels": dict(n_kv_heads=2, smear_keys=3, smear_channels=True),
    "smear_queries": dict(n_kv_heads=2, smear_keys=3, smear_channels=True, smear_queries=True),
}


def small_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=97, dim=64, n_layers=2, n_heads=4, hidden_dim=96, max_seq_len=128,
                init=InitConfig(scheme="normal", std=0.1))
    base.update(kw)
    return ModelConfig(**base)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_changing_a_future_token_never_changes_an_earlier_logit(variant):
    torch.manual_seed(0)
    model = build_model(small_cfg(**VARIANTS[variant]), seed=1).eval()
    randomize_smear(model)
    x = torch.randint(0, 97, (2, 33))
    with torch.no_grad():
        ref = model(x)
        for j in (1, 16, 32):
            y = x.clone()
            y[:, j] = (y[:, j] + 1 + torch.arange(2)) % 97
            out = model(y)
            torch.testing.assert_close(out[:, :j], ref[:, :j], rtol=0, atol=1e-6)
            assert not torch.allclose(out[:, j], ref[:, j])  # the changed position itself does change


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_packed_forward_equals_each_document_alone(variant):
    torch.manual_seed(0)
    model = build_model(small_cfg(**VARIANTS[variant]), seed=2).eval()
    randomize_smear(model)
    lengths = [5, 11, 1, 7]
    docs = [torch.randint(0, 97, (n,)) for n in lengths]
    pad = 4
    row = torch.cat(docs + [torch.zeros(pad, dtype=torch.long)])[None]
    doc_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths + [pad])])[None]
    with torch.no_grad():
        packed = model(row, doc_ids=doc_ids)[0]
        unmasked = model(row)[0]
        start = 0
        for doc in docs:
            alone = model(doc[None])[0]
            torch.testing.assert_close(packed[start : start + len(doc)], alone, rtol=1e-5, atol=1e-5)
            start += len(doc)
    # without the mask the later documents see earlier ones: the test above is not vacuous
    assert not torch.allclose(unmasked[5:16], packed[5:16], atol=1e-4)


def test_document_mask_and_positions():
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 2], [0, 1, 1, 1, 1, 1]])
    assert positions_from_doc_ids(doc_ids).tolist() == [[0, 1, 2, 0, 1, 0], [0, 0, 1, 2, 3, 4]]
    m = document_causal_mask(doc_ids)[0, 0]
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [0, 0, 0, 1, 0, 0],
        [0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],
    ], dtype=torch.bool)
    assert torch.equal(m, expected)


def test_rotary_tables_match_the_formula():
    model = build_model(small_cfg(rope_theta=500.0), seed=0)
    hd = 16
    inv = torch.tensor([1.0 / 500.0 ** (2 * i / hd) for i in range(hd // 2)], dtype=torch.float64)
    angles = torch.arange(128, dtype=torch.float64)[:, None] * inv[None]
    torch.testing.assert_close(model.rotary.cos[:, : hd // 2].double(), angles.cos(), rtol=0, atol=2e-5)
    torch.testing.assert_close(model.rotary.sin[:, hd // 2 :].double(), angles.sin(), rtol=0, atol=2e-5)
    assert rope_inv_freq(hd, 500.0).dtype == torch.float32
    with pytest.raises(ValueError, match="max_seq_len=128"):
        model(torch.zeros(1, 129, dtype=torch.long))


def test_interleaved_rotary_weights_permute_to_the_half_layout():
    """Meta's interleaved rope with weights W equals our half-split rope with permuted weights."""
    torch.manual_seed(0)
    n_heads, hd, dim, t = 2, 8, 16, 6
    w_meta = torch.randn(n_heads * hd, dim)
    x = torch.randn(t, dim)
    inv = rope_inv_freq(hd, 10000.0)
    ang = torch.arange(t, dtype=torch.float32)[:, None] * inv[None]  # (t, hd/2)
    # reference: interleaved pairs as complex numbers
    q = (x @ w_meta.T).view(t, n_heads, hd // 2, 2)
    qc = torch.view_as_complex(q.contiguous()) * torch.polar(torch.ones_like(ang), ang)[:, None]
    ref = torch.view_as_real(qc).reshape(t, n_heads, hd)
    # ours: half-split rotation of permuted weights, then back to interleaved order to compare
    from lmlab.models.layers import apply_rotary
    w_half = permute_interleaved_to_half(w_meta, n_heads)
    qh = (x @ w_half.T).view(t, n_heads, hd).transpose(0, 1)  # (H, t, hd)
    cos = torch.cat([ang.cos(), ang.cos()], -1)
    sin = torch.cat([ang.sin(), ang.sin()], -1)
    rot = apply_rotary(qh, cos, sin).transpose(0, 1).reshape(t, n_heads * hd)
    ours = permute_half_to_interleaved(rot.T, n_heads).T.reshape(t, n_heads, hd)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(permute_half_to_interleaved(w_half, n_heads), w_meta)
    assert not torch.equal(w_half, w_meta)


@pytest.mark.parametrize("scheme", ["normal", "gpt2", "small", "depth", "width"])
def test_init_schemes_give_the_configured_statistics(scheme):
    cfg = ModelConfig(vocab_size=512, dim=256, n_layers=4, n_heads=4, qkv_bias=True,
                      init=InitConfig(scheme=scheme, std=0.05))
    model = build_model(cfg, seed=0)
    small = {"small": math.sqrt(2 / (5 * 256)), "width": 1 / 16}.get(scheme)  # schemes that ignore std
    for i, layer in enumerate(model.layers):
        expect_in = small or 0.05
        expect_out = small or {"normal": 0.05, "gpt2": 0.05 / math.sqrt(8),
                               "depth": 0.05 / math.sqrt(2 * (i + 1))}[scheme]
        for w in (layer.attention.wq.weight, layer.attention.wk.weight, layer.feed_forward.w1.weight,
                  layer.feed_forward.w3.weight):
            assert abs(w.std().item() / expect_in - 1) < 0.03, (scheme, i, w.std().item(), expect_in)
            assert abs(w.mean().item()) < 3 * expect_in / math.sqrt(w.numel())
        for w in (layer.attention.wo.weight, layer.feed_forward.w2.weight):
            assert abs(w.std().item() / expect_out - 1) < 0.03, (scheme, i, w.std().item(), expect_out)
        assert torch.equal(layer.attention_norm.weight, torch.ones(256))
        assert torch.count_nonzero(layer.attention.wq.bias) == 0
    emb = small or 0.05
    assert abs(model.tok_embeddings.weight.std().item() / emb - 1) < 0.03
    assert abs(model.output.weight.std().item() / emb - 1) < 0.03


def test_meta_build_then_materialize_equals_direct_seeded_build():
    cfg = small_cfg(n_kv_heads=2)
    meta = build_model(cfg, device="meta")
    assert all(p.is_meta for p in meta.parameters())
    materialize(meta, "cpu", seed=7)
    direct = build_model(cfg, seed=7)
    other = build_model(cfg, seed=8)
    sd_a, sd_b = meta.state_dict(), direct.state_dict()
    assert sd_a.keys() == sd_b.keys()
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    assert not torch.equal(direct.layers[0].attention.wq.weight, other.layers[0].attention.wq.weight)
    x = torch.randint(0, 97, (1, 10))
    torch.testing.assert_close(meta(x), direct(x), rtol=0, atol=0)  # rotary buffers rebuilt too


def test_tied_embeddings_share_one_tensor():
    model = build_model(small_cfg(tie_embeddings=True), seed=0)
    assert model.output.weight is model.tok_embeddings.weight
    meta = materialize(build_model(small_cfg(tie_embeddings=True), device="meta"), "cpu", seed=0)
    assert meta.output.weight is meta.tok_embeddings.weight


def test_num_params_and_flops_by_hand():
    cfg = ModelConfig(vocab_size=100, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128)
    model = build_model(cfg, seed=0)
    kv = 64 // 4 * 2  # 2 kv heads of 16
    per_layer = 64 * 64 + 2 * 64 * kv + 64 * 64 + 3 * 64 * 128 + 2 * 64
    body = 2 * per_layer + 64  # + final norm
    assert model.num_params() == body + 2 * 100 * 64
    assert model.num_params(exclude_embeddings=True) == body + 100 * 64
    assert model.flops_per_token(256) == 6 * (body + 100 * 64) + 12 * 2 * 64 * 256

    tied = build_model(ModelConfig(vocab_size=100, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128,
                                   tie_embeddings=True, qkv_bias=True), seed=0)
    bias = 64 + 2 * kv
    assert tied.num_params() == body + 2 * bias + 100 * 64
    assert tied.num_params(exclude_embeddings=True) == body + 2 * bias
    # the head's matmul still costs compute when tied
    assert tied.flops_per_token(10) == 6 * (body + 2 * bias + 100 * 64) + 12 * 2 * 64 * 10


def test_default_hidden_dim_follows_llama_rule():
    model = build_model(ModelConfig(vocab_size=10, dim=256, n_layers=1, n_heads=4, multiple_of=64), seed=0)
    assert model.layers[0].feed_forward.w1.weight.shape == (704, 256)  # int(2/3 * 1024) = 682 -> 704
    model = build_model(ModelConfig(vocab_size=10, dim=96, n_layers=1, n_heads=4, multiple_of=32), seed=0)
    assert model.layers[0].feed_forward.w1.weight.shape == (256, 96)


def test_tokenizer_larger_than_model_vocab_is_refused():
    with pytest.raises(ValueError, match="264 ids but model.vocab_size=256"):
        resolve_vocab(ModelConfig(vocab_size=256), 264)
    assert resolve_vocab(ModelConfig(vocab_size=None), 264).vocab_size == 264
    assert resolve_vocab(ModelConfig(vocab_size=300), 264).vocab_size == 300


def test_backward_reaches_every_parameter():
    model = build_model(small_cfg(n_kv_heads=2, qkv_bias=True), seed=0)
    x = torch.randint(0, 97, (2, 17))
    doc_ids = torch.tensor([[0] * 9 + [1] * 8, [0] * 17])
    loss = torch.nn.functional.cross_entropy(model(x, doc_ids=doc_ids).flatten(0, 1), x.flatten())
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("per_channel", [False, True])
def test_smear_arithmetic_equals_a_loop_over_tokens(per_channel):
    """lmlab.models.smear against the definition written as loops: key j -> sum_d a_d k_{j-d} (d = 0..N, zero
    before a sequence's start), query j += sum_d w_d k_{j-d} (d = 1..N), with GQA head sharing; and the cache-side
    gather of predecessors equals the whole-sequence one."""
    from lmlab.models.smear import gather_previous, previous_keys, smear_keys, smear_queries, smear_shifted

    g = torch.Generator().manual_seed(3)
    b, h, t, d, n, n_heads = 2, 2, 7, 4, 3, 4
    k = torch.randn(b, h, t, d, generator=g)
    weight = torch.randn(*((h, d) if per_channel else (h,)), n + 1, generator=g)
    qweight = torch.randn(n_heads, d, n, generator=g)
    pos = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [0, 1, 2, 0, 1, 2, 3]])  # row 1: two sequences packed
    a = torch.softmax(weight, -1)
    want_k, want_q = torch.zeros_like(k), torch.zeros(b, n_heads, t, d)
    for r in range(b):
        for j in range(t):
            for back in range(n + 1):
                if pos[r, j] >= back:
                    w = a[..., back] if per_channel else a[:, back, None]
                    want_k[r, :, j] += w * k[r, :, j - back]
                    if back:
                        want_q[r, :, j] += qweight[..., back - 1] * k[r, :, j - back].repeat_interleave(2, 0)
    prev = previous_keys(k, pos, n)
    torch.testing.assert_close(smear_keys(k, prev, weight), want_k)
    # training's shifted-view path: the same keys and gradients, packed rows and whole sequences alike
    torch.testing.assert_close(smear_shifted(k, pos, weight), want_k)
    torch.testing.assert_close(smear_shifted(k[:1], None, weight), want_k[:1])
    grads = []
    for fast in (False, True):
        kk, ww = k.clone().requires_grad_(), weight.clone().requires_grad_()
        out = smear_shifted(kk, pos, ww) if fast else smear_keys(kk, previous_keys(kk, pos, n), ww)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads.append((kk.grad, ww.grad))
    torch.testing.assert_close(grads[0], grads[1])
    torch.testing.assert_close(smear_queries(prev, qweight, n_heads), want_q)
    # a cache returning each token's predecessors from the keys of its context gives the same
    torch.testing.assert_close(gather_previous(k, torch.arange(t).expand(b, t), pos, n), prev)


def test_smear_is_an_optional_module_whose_old_parameter_names_still_load():
    """The plain Llama's attention holds no smear module and no smear parameter. A smeared one holds a KeySmear
    (``attention.smear``: ``keys`` logits, ``queries`` weights), counted, initialised and weight-decayed as before,
    its parameters first in the layer as before. A state dict saved before the module existed (names
    ``attention.smear`` and ``attention.query_smear``) loads strictly, to the same weights."""
    from lmlab.models.smear import SMEAR_INIT, KeySmear
    from lmlab.train.optim import param_groups

    plain = build_model(small_cfg(n_kv_heads=2), seed=0)
    assert plain.layers[0].attention.smear is None and not any("smear" in n for n, _ in plain.named_parameters())
    cfg = small_cfg(**VARIANTS["smear_queries"])  # 4 heads of 16, 2 key/value heads, N = 3, per channel
    model = build_model(cfg, seed=0)
    smear = model.layers[0].attention.smear
    assert isinstance(smear, KeySmear)
    assert model.num_params() == plain.num_params() + 2 * (2 * 16 * 4 + 4 * 16 * 3)
    assert torch.equal(smear.keys[..., 0], torch.zeros(2, 16)) and (smear.keys[..., 1:] == SMEAR_INIT).all()
    assert not smear.queries.any()
    decayed = {id(p) for p in param_groups(model, 0.1)[0]["params"]}
    assert id(smear.keys) in decayed and id(smear.queries) in decayed
    names = [n for n, _ in model.named_parameters() if n.startswith("layers.0.attention.")]
    assert names[:3] == ["layers.0.attention.smear.keys", "layers.0.attention.smear.queries",
                         "layers.0.attention.wq.weight"]

    randomize_smear(model)
    old = {k.replace("attention.smear.keys", "attention.smear").replace("attention.smear.queries",
                                                                       "attention.query_smear"): v
           for k, v in model.state_dict().items()}
    assert "layers.1.attention.query_smear" in old and not any("smear." in k for k in old)
    fresh = build_model(cfg, seed=5)
    fresh.load_state_dict(old)  # strict
    for (name, p), q in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(p, q), name


def test_smear_init_sets_the_initial_mixing_logits():
    """``model.smear_init`` gives the initial smear logits (own key first), per head and per channel alike, and
    survives a re-initialisation; the default stays 0 for the own key and -1 for each earlier one; a list of the
    wrong length is refused with the count it needs."""
    from lmlab.config import ConfigError, config_from_dict
    from lmlab.models.smear import SMEAR_INIT

    for channels in (False, True):
        model = build_model(small_cfg(smear_keys=3, smear_channels=channels, smear_init=[0.0, 1.0, -1.0, -2.0]),
                            seed=0)
        for layer in model.layers:
            logits = layer.attention.smear.keys.reshape(-1, 4)
            assert torch.equal(logits, torch.tensor([[0.0, 1.0, -1.0, -2.0]]).expand_as(logits))
            assert logits.softmax(-1)[0].argmax() == 1  # the previous token's key weighs most
    default = build_model(small_cfg(smear_keys=2), seed=0).layers[0].attention.smear.keys
    assert default.tolist() == [[0.0, SMEAR_INIT, SMEAR_INIT]] * 4
    with pytest.raises(ConfigError, match=r"model.smear_init: has 2 logits; smear_keys=3 needs 4"):
        config_from_dict({"model": {"smear_keys": 3, "smear_init": [0.0, 1.0]}})


def test_smear_layers_choose_the_layers_with_smeared_keys():
    """``model.smear_layers`` (negative from the last) gives smeared keys to those layers alone; the others are plain
    attention layers, the same computation as a model without smearing; a layer outside the stack, or smear_layers
    without smear_keys, is refused."""
    from lmlab.config import ConfigError, config_from_dict

    model = build_model(small_cfg(n_layers=3, smear_keys=2, smear_layers=[-1, 0]), seed=0)
    assert [layer.attention.smear is not None for layer in model.layers] == [True, False, True]
    assert [n for n, _ in model.named_parameters() if "smear" in n] == ["layers.0.attention.smear.keys",
                                                                      "layers.2.attention.smear.keys"]
    plain = build_model(small_cfg(n_layers=3), seed=0)
    x = torch.randint(0, plain.cfg.vocab_size, (2, 12))
    with torch.no_grad():  # layer 1 has no smear: the same output as a plain model's layer 1 on the same input
        h = torch.randn(2, 12, plain.cfg.dim)
        plain.layers[1].load_state_dict(model.layers[1].state_dict())
        cos, sin = model.rotary(torch.arange(12).expand(2, 12), 12)
        assert torch.equal(model.layers[1](h, cos, sin, None), plain.layers[1](h, cos, sin, None))
        assert model(x).shape == plain(x).shape
    with pytest.raises(ConfigError, match=r"model.smear_layers: \[2\] outside the 2 layers"):
        config_from_dict({"model": {"n_layers": 2, "smear_keys": 3, "smear_layers": [2]}})
    with pytest.raises(ConfigError, match="model.smear_layers: names the layers with smeared keys: set smear_keys"):
        config_from_dict({"model": {"smear_layers": [0]}})


@pytest.mark.parametrize("masked", [False, True])
def test_attention_under_cpu_bf16_autocast_runs_in_float32(masked):
    """Under bf16 autocast on the CPU, ``sdpa`` takes bf16 queries/keys/values but attends in float32 (the CPU's bf16
    flash kernel is slower and less exact): its output is the float32 attention of the same bf16 inputs, rounded
    once to bf16, and so are the input gradients; plain bf16 attention misses that bound."""
    from lmlab.models.transformer import sdpa

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 40, 16).bfloat16().requires_grad_() for _ in range(3))
    g = torch.randn(2, 4, 40, 16).bfloat16()
    kw = {"attn_mask": torch.rand(2, 1, 40, 40) < 0.7} if masked else {"is_causal": True}
    if masked:
        kw["attn_mask"] |= torch.eye(40, dtype=torch.bool)

    def reference(q, k, v):  # float32 math attention of the rounded inputs
        s = (q @ k.transpose(-1, -2)) * 16 ** -0.5
        allowed = kw["attn_mask"] if masked else torch.ones(40, 40, dtype=torch.bool).tril()
        return s.masked_fill(~allowed, float("-inf")).softmax(-1) @ v

    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = reference(q32, k32, v32)
    ref.backward(g.float())

    def within_one_rounding(x, r):  # |x - r| <= one bf16 rounding of r (2^-8 relative), plus float32 noise
        return bool(((x.float() - r).abs() <= r.abs() * 2 ** -8 + 1e-5).all())

    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = sdpa(q, k, v, **kw)
    assert y.dtype == torch.bfloat16
    assert within_one_rounding(y, ref.detach())
    y.backward(g)
    for t, t32 in ((q, q32), (k, k32), (v, v32)):
        assert t.grad.dtype == torch.bfloat16 and within_one_rounding(t.grad, t32.grad)
    plain = torch.nn.functional.scaled_dot_product_attention(q.detach(), k.detach(), v.detach(), **kw)
    assert plain.dtype == torch.bfloat16 and not within_one_rounding(plain, ref.detach())
    # float32 inputs under the same autocast (a module kept in float32 around it) stay float32, not cast down
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y32 = sdpa(q32.detach(), k32.detach(), v32.detach(), **kw)
    assert y32.dtype == torch.float32
    torch.testing.assert_close(y32, ref.detach(), rtol=1e-5, atol=1e-5)
    # outside autocast (a bf16 model at inference) the kernel keeps the inputs' dtype, as before
    torch.testing.assert_close(sdpa(q.detach(), k.detach(), v.detach(), **kw), plain, rtol=0, atol=0)
