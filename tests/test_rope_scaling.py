"""Rotary scaling (model.rope_scaling: linear, ntk, yarn): the frequencies and tables equal Hugging Face's
definitions, the logits equal LlamaForCausalLM's past the original length (both directions and through a saved
folder), the config is checked, ntk is refused by the export, and a model trained at 128 tokens trains on at 512."""

import math

import pytest
import torch
import torch.nn.functional as F

from lmlab.config import ConfigError, ModelConfig, RopeScalingConfig, load_config
from lmlab.models import build_model
from lmlab.models.layers import Rotary, rope_inv_freq, rope_scaled_inv_freq, yarn_attention_factor

WIRING = ("needs the Transformer to pass the config to its rotary: in src/lmlab/models/transformer.py "
          "Rotary(..., cfg.rope_theta, scaling=cfg.rope_scaling)")
TRAINER = "needs the trainer change: model.max_seq_len and model.rope_scaling.* may change on resume"

YARN = dict(kind="yarn", factor=4.0, original_max_seq_len=32)
YARN_BLEND = dict(kind="yarn", factor=4.0, original_max_seq_len=128, beta_fast=8.0, beta_slow=0.5,
                  attention_factor=1.25)


def scaled_model(cfg: ModelConfig, seed: int = 0) -> torch.nn.Module:
    model = build_model(cfg, seed=seed)
    if getattr(model.rotary, "scaling", None) != cfg.rope_scaling:
        pytest.skip(WIRING)
    return model


def hf_rope_config(transformers, head_dim: int, theta: float, max_pos: int, rope: dict):
    return transformers.LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, max_position_embeddings=max_pos,
                                    rope_parameters={**rope, "rope_theta": theta})


# ---------------------------------------------------------------- frequencies and tables against HF's definitions


@pytest.mark.parametrize("head_dim,theta", [(16, 5000.0), (64, 10000.0), (128, 500000.0)])
@pytest.mark.parametrize("kind", ["linear", "ntk", "yarn", "yarn_blend"])
def test_inverse_frequencies_equal_hf_definitions(kind, head_dim, theta):
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import (
        _compute_dynamic_ntk_parameters,
        _compute_linear_scaling_rope_parameters,
        _compute_yarn_parameters,
    )

    plain = rope_inv_freq(head_dim, theta)
    if kind == "linear":
        rs = RopeScalingConfig(kind="linear", factor=4.0)
        ref, ref_attn = _compute_linear_scaling_rope_parameters(
            hf_rope_config(transformers, head_dim, theta, 512, {"rope_type": "linear", "factor": 4.0}))
        torch.testing.assert_close(ref, plain / 4, rtol=0, atol=0)
    elif kind == "ntk":
        # HF's dynamic NTK base is theta * (factor * L / M - (factor - 1)) ** (d / (d - 2)): at L = M * (2f - 1) / f
        # the bracket is exactly f, which is lmlab's static NTK-aware base theta * f ** (d / (d - 2))
        rs = RopeScalingConfig(kind="ntk", factor=2.0)
        ref, ref_attn = _compute_dynamic_ntk_parameters(
            hf_rope_config(transformers, head_dim, theta, 64, {"rope_type": "dynamic", "factor": 2.0}), seq_len=96)
        assert ref[0] == plain[0] and (ref[1:] < plain[1:]).all()  # a larger base: every slower frequency lower
    else:
        rs = RopeScalingConfig(**(YARN if kind == "yarn" else YARN_BLEND))
        hf = {"rope_type": "yarn", "factor": rs.factor, "original_max_position_embeddings": rs.original_max_seq_len,
              "beta_fast": rs.beta_fast, "beta_slow": rs.beta_slow}
        if rs.attention_factor is not None:
            hf["attention_factor"] = rs.attention_factor
        ref, ref_attn = _compute_yarn_parameters(hf_rope_config(transformers, head_dim, theta, 512, hf))
        ratio = ref / plain  # the fastest frequencies kept, the slowest divided by the factor
        assert ratio[0] == 1.0 and ratio[-1] == pytest.approx(0.25)
        assert ref_attn == (rs.attention_factor or 0.1 * math.log(4.0) + 1)
    inv_freq, attn = rope_scaled_inv_freq(head_dim, theta, rs)
    torch.testing.assert_close(inv_freq, ref, rtol=0, atol=0)
    assert attn == ref_attn
    assert not torch.equal(inv_freq, plain)


def test_yarn_blend_ramps_between_the_two():
    """With these betas some dimensions are strictly between extrapolation (1) and interpolation (1/factor)."""
    inv_freq, attn = rope_scaled_inv_freq(16, 10000.0, RopeScalingConfig(**YARN_BLEND))
    ratio = (inv_freq / rope_inv_freq(16, 10000.0)).tolist()
    assert ratio == sorted(ratio, reverse=True)
    assert any(0.26 < r < 0.99 for r in ratio)
    assert attn == 1.25
    assert yarn_attention_factor(4.0) == pytest.approx(0.1 * math.log(4.0) + 1) and yarn_attention_factor(1.0) == 1.0


@pytest.mark.parametrize("kind", ["linear", "yarn"])
def test_rotary_tables_equal_hf_rotary_embedding(kind):
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rs = RopeScalingConfig(kind="linear", factor=4.0) if kind == "linear" else RopeScalingConfig(**YARN)
    hf = ({"rope_type": "linear", "factor": 4.0} if kind == "linear" else
          {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32})
    emb = LlamaRotaryEmbedding(hf_rope_config(transformers, 16, 5000.0, 512, hf))
    cos, sin = emb(torch.zeros(1), torch.arange(512)[None])
    rope = Rotary(16, 512, 5000.0, scaling=rs)
    torch.testing.assert_close(rope.cos, cos[0], rtol=0, atol=0)
    torch.testing.assert_close(rope.sin, sin[0], rtol=0, atol=0)
    if kind == "yarn":  # the attention factor is in the tables
        assert rope.cos[0, 0] == pytest.approx(0.1 * math.log(4.0) + 1)


def test_plain_rotary_is_unchanged():
    a, b = Rotary(16, 64, 5000.0), Rotary(16, 64, 5000.0, scaling=RopeScalingConfig())
    assert torch.equal(a.cos, b.cos) and torch.equal(a.sin, b.sin)
    t = torch.arange(64).float()[:, None] * rope_inv_freq(16, 5000.0)[None]
    torch.testing.assert_close(a.cos, torch.cat((t, t), -1).cos(), rtol=0, atol=0)


def test_linear_scaling_is_position_interpolation():
    """Linear scaling at position 4p equals plain rotary at position p (to float32 rounding)."""
    plain, scaled = Rotary(16, 128, 10000.0), Rotary(16, 512, 10000.0, scaling=RopeScalingConfig("linear", 4.0))
    torch.testing.assert_close(scaled.cos[::4], plain.cos, rtol=0, atol=1e-5)
    torch.testing.assert_close(scaled.sin[::4], plain.sin, rtol=0, atol=1e-5)


# ---------------------------------------------------------------- config


@pytest.mark.parametrize("overrides,key,msg", [
    (["model.rope_scaling.factor=4"], "model.rope_scaling.factor", "no effect with kind none"),
    (["model.rope_scaling.kind=linear", "model.rope_scaling.factor=0.5"], "model.rope_scaling.factor", ">= 1"),
    (["model.rope_scaling.kind=yarn", "model.rope_scaling.factor=4"], "model.rope_scaling.original_max_seq_len",
     "trained at"),
    (["model.rope_scaling.kind=yarn", "model.rope_scaling.factor=4", "model.rope_scaling.original_max_seq_len=0"],
     "model.rope_scaling.original_max_seq_len", "positive"),
    (["model.rope_scaling.kind=yarn", "model.rope_scaling.factor=4", "model.rope_scaling.original_max_seq_len=64",
      "model.rope_scaling.beta_slow=40"], "model.rope_scaling.beta_fast", "beta_fast > beta_slow"),
    (["model.rope_scaling.kind=yarn", "model.rope_scaling.factor=4", "model.rope_scaling.original_max_seq_len=64",
      "model.rope_scaling.attention_factor=0"], "model.rope_scaling.attention_factor", "positive"),
    (["model.rope_scaling.kind=ntk", "model.rope_scaling.factor=2", "model.dim=8", "model.n_heads=4"],
     "model.rope_scaling.kind", "head dim above 2"),
    (["model.rope_scaling.kind=ntk2"], "model.rope_scaling.kind", "'ntk'"),
    (["model.rope_scaling.fctor=2"], "model.rope_scaling.fctor", "factor"),
])
def test_bad_rope_scaling_is_refused_naming_the_key(overrides, key, msg):
    with pytest.raises(ConfigError, match=key) as e:
        load_config(None, overrides)
    assert msg in str(e.value)


def test_rope_scaling_config_round_trips(tmp_path):
    from lmlab.config import save_config

    cfg = load_config(None, ["model.rope_scaling.kind=yarn", "model.rope_scaling.factor=4",
                             "model.rope_scaling.original_max_seq_len=128", "model.max_seq_len=512",
                             "data.seq_len=512", f"runs_dir={tmp_path}", "name=x"])
    assert cfg.model.rope_scaling == RopeScalingConfig(**{**YARN, "original_max_seq_len": 128})
    save_config(cfg, tmp_path / "x")
    assert load_config(tmp_path / "x" / "config.yaml") == cfg


# ---------------------------------------------------------------- Hugging Face: logits, mapping, refusals


def small_cfg(rope: RopeScalingConfig, **kw) -> ModelConfig:
    from lmlab.config import InitConfig

    base = dict(vocab_size=101, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=112, max_seq_len=128,
                rope_theta=5000.0, rope_scaling=rope, init=InitConfig(scheme="normal", std=0.25))
    return ModelConfig(**{**base, **kw})


@pytest.mark.parametrize("rope", [RopeScalingConfig(kind="linear", factor=4.0), RopeScalingConfig(**YARN),
                                  RopeScalingConfig(**{**YARN_BLEND, "original_max_seq_len": 32})],
                         ids=["linear", "yarn", "yarn_blend"])
def test_logits_equal_hf_llama_past_the_original_length(rope, tmp_path):
    """Both directions, at 128 tokens, 4x the original 32: lmlab weights in LlamaForCausalLM, an HF model's weights
    and config.json in lmlab, and a saved folder through AutoModelForCausalLM."""
    transformers = pytest.importorskip("transformers")
    from lmlab.hf import (
        from_hf_state_dict,
        load_hf_folder,
        model_config_from_hf,
        model_config_to_hf,
        save_hf_folder,
        to_hf_state_dict,
    )

    cfg = small_cfg(rope)
    ours = scaled_model(cfg, seed=1).eval()
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**model_config_to_hf(cfg), attn_implementation="sdpa"))
    hf = hf.eval()
    assert hf.model.rotary_emb.rope_type == rope.kind
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(ours.state_dict(), cfg), strict=False)
    assert not missing and not unexpected
    x = torch.randint(0, 101, (2, 128), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(x).logits
        out = ours(x)
        plain = build_model(small_cfg(RopeScalingConfig()), seed=1).eval()(x)
    assert ref.abs().max() > 1.0
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert (plain[:, 32:] - ref[:, 32:]).abs().max() > 1e-2  # the scaling matters: plain rotary is not HF's
    # HF -> lmlab: the config read back is the same, and its weights give the same logits
    back_cfg = model_config_from_hf(hf.config)
    assert back_cfg == ModelConfig(**{**cfg.__dict__, "init": back_cfg.init})
    back = build_model(back_cfg, seed=0).eval()
    back.load_state_dict(from_hf_state_dict(hf.state_dict(), back_cfg))
    with torch.no_grad():
        torch.testing.assert_close(back(x), ref, rtol=1e-5, atol=1e-5)
    # a saved folder (config.json as transformers writes it) loads in transformers and back in lmlab
    save_hf_folder(ours, tmp_path / "hf")
    hf2 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="sdpa").eval()
    hf2.save_pretrained(tmp_path / "hf2")  # transformers 5 rewrites it as rope_parameters only
    with torch.no_grad():
        torch.testing.assert_close(hf2(x).logits, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(load_hf_folder(tmp_path / "hf").eval()(x), out, rtol=0, atol=0)
        torch.testing.assert_close(load_hf_folder(tmp_path / "hf2").eval()(x), out, rtol=0, atol=0)


def test_hf_mapping_of_each_kind():
    from lmlab.hf import model_config_to_hf

    hf = model_config_to_hf(small_cfg(RopeScalingConfig(kind="linear", factor=4.0)))
    assert hf["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}
    assert hf["rope_parameters"] == {"rope_type": "linear", "factor": 4.0, "rope_theta": 5000.0}
    hf = model_config_to_hf(small_cfg(RopeScalingConfig(**YARN)))
    assert hf["rope_scaling"] == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
                                  "beta_fast": 32.0, "beta_slow": 1.0}
    assert hf["max_position_embeddings"] == 128
    assert model_config_to_hf(small_cfg(RopeScalingConfig(**YARN_BLEND)))["rope_scaling"]["attention_factor"] == 1.25
    plain = model_config_to_hf(small_cfg(RopeScalingConfig()))
    assert "rope_scaling" not in plain and "rope_parameters" not in plain  # plain exports are as before


def test_ntk_export_is_refused_naming_the_key(tmp_path):
    from lmlab.hf import ExportError, model_config_to_hf, save_hf_folder

    cfg = small_cfg(RopeScalingConfig(kind="ntk", factor=2.0))
    with pytest.raises(ExportError, match=r"model\.rope_scaling.*no Hugging Face Llama equivalent"):
        model_config_to_hf(cfg)
    with pytest.raises(ExportError, match=r"model\.rope_scaling"):
        save_hf_folder(build_model(cfg, seed=0), tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written


def test_hf_rope_configs_read_as_hf_reads_them():
    from lmlab.hf import model_config_from_hf, model_config_to_hf

    base = model_config_to_hf(small_cfg(RopeScalingConfig()))
    read = lambda rs, **kw: model_config_from_hf({**base, "rope_scaling": rs, **kw}).rope_scaling  # noqa: E731
    assert read({"type": "linear", "factor": 2}) == RopeScalingConfig(kind="linear", factor=2.0)  # transformers 4
    assert read(None) == RopeScalingConfig()
    # yarn's defaults as HF's: original = max_position_embeddings, factor = max / original, betas 32 / 1
    assert read({"rope_type": "yarn", "factor": 4.0}) == RopeScalingConfig(kind="yarn", factor=4.0,
                                                                           original_max_seq_len=128)
    assert read({"rope_type": "yarn", "original_max_position_embeddings": 32}) == RopeScalingConfig(**YARN)
    assert read({"rope_type": "yarn", "factor": 4.0}, original_max_position_embeddings=32) == RopeScalingConfig(**YARN)
    deepseek = read({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "mscale": 1.0,
                     "mscale_all_dim": 0.5})
    assert deepseek.attention_factor == pytest.approx((0.1 * math.log(4) + 1) / (0.05 * math.log(4) + 1))
    params = {k: v for k, v in base.items() if k != "rope_theta"}
    got = model_config_from_hf({**params, "rope_parameters": {"rope_type": "linear", "factor": 3.0, "rope_theta": 7.0}})
    assert got.rope_scaling == RopeScalingConfig(kind="linear", factor=3.0) and got.rope_theta == 7.0
    for rs, what in [({"rope_type": "dynamic", "factor": 2.0}, "'dynamic'"), ({"rope_type": "llama3", "factor": 8.0},
                     "'llama3'"), ({"rope_type": "yarn", "factor": 4.0, "truncate": False}, "truncate"),
                     ({"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 0.5}, "partial_rotary_factor")]:
        with pytest.raises(ValueError, match="rope_scaling") as e:
            read(rs)
        assert what in str(e.value)


# ---------------------------------------------------------------- training at a longer context

TEXT = ("To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"
        "The slings and arrows of outrageous fortune,\nOr to take arms against a sea of troubles\n") * 60


def test_rotary_tables_are_not_in_the_state_dict():
    """So a checkpoint of a 128-token model loads, strictly, into a 512-token scaled one."""
    short = build_model(ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, max_seq_len=128), seed=0)
    assert not [k for k in short.state_dict() if "rotary" in k]
    long_cfg = ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, max_seq_len=512,
                           rope_scaling=RopeScalingConfig(kind="linear", factor=4.0))
    long = scaled_model(long_cfg, seed=1)
    long.load_state_dict(short.state_dict(), strict=True)
    assert long.rotary.cos.shape[0] == 512 and not torch.equal(long.rotary.cos[:128], short.rotary.cos)


@pytest.mark.parametrize("rope", [RopeScalingConfig(kind="linear", factor=4.0),
                                  RopeScalingConfig(kind="ntk", factor=4.0),
                                  RopeScalingConfig(**{**YARN, "original_max_seq_len": 128})],
                         ids=["linear", "ntk", "yarn"])
def test_scaled_model_trains_on_long_sequences(rope, one_thread):
    """The loss on 512-token sequences (4x the 128 the scaling assumes) is finite and falls with a few steps."""
    cfg = ModelConfig(vocab_size=256, dim=32, n_layers=2, n_heads=2, max_seq_len=512, rope_scaling=rope)
    torch.manual_seed(0)
    model = scaled_model(cfg, seed=0)
    data = torch.tensor(list(TEXT.encode()), dtype=torch.long)
    starts = torch.randint(0, len(data) - 513, (4,), generator=torch.Generator().manual_seed(0))
    rows = torch.stack([data[s:s + 513] for s in starts.tolist()])
    x, y = rows[:, :-1], rows[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(12):
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.7 * losses[0]


def test_resume_a_128_token_run_at_512_tokens_with_linear_scaling(tmp_path, one_thread):
    """`lmlab train` at data.seq_len=128, then the same run folder resumed at 512 tokens with model.max_seq_len=512
    and linear scaling by 4: it resumes the trained weights (its first 512-token loss is far below a fresh model's)
    and the loss keeps falling, finite."""
    from lmlab.monitor.metrics import read_metrics
    from lmlab.train import Trainer

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    base = ["name=ctx", f"runs_dir={tmp_path / 'runs'}", f"data.train_files=[{corpus}]", "model.dim=32",
            "model.n_layers=2", "model.n_heads=2", "data.batch_size=2", "optim.warmup_steps=2", "optim.lr=0.01",
            "optim.schedule=constant", "train.log_every=1", "logging.progress=false", "train.eval_batches=1"]
    short = load_config(None, base + ["model.max_seq_len=128", "data.seq_len=128", "train.steps=30"])
    first = Trainer(short).fit()
    assert first["step"] == 30
    long = load_config(None, base + ["model.max_seq_len=512", "data.seq_len=512", "train.steps=40",
                                     "model.rope_scaling.kind=linear", "model.rope_scaling.factor=4"])
    try:
        trainer = Trainer(long)
        if getattr(trainer.model.rotary, "scaling", None) != long.model.rope_scaling:
            pytest.skip(WIRING)
        second = trainer.fit()
    except ConfigError as e:
        if "another model" in str(e):
            pytest.skip(TRAINER)
        raise
    assert second["resumed"] and second["step"] == 40
    rows = [r for r in read_metrics(short.run_dir / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 41))
    fresh, at_128 = rows[0]["loss"], rows[29]["loss"]
    at_512 = [r["loss"] for r in rows[30:]]
    assert all(math.isfinite(v) for v in at_512)
    assert at_512[0] < fresh - 1.0  # the trained weights were resumed (a fresh model starts near ln 256)
    assert sum(at_512[-3:]) / 3 < sum(at_512[:3]) / 3  # and training at 512 tokens improves the loss
    assert at_128 < fresh
