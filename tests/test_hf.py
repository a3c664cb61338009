"""lmlab's Llama equals Hugging Face LlamaForCausalLM on the same weights, both directions."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lmlab.config import InitConfig, ModelConfig  # noqa: E402
from lmlab.hf import (  # noqa: E402
    from_hf_state_dict,
    load_hf_folder,
    model_config_from_hf,
    model_config_to_hf,
    save_hf_folder,
    to_hf_state_dict,
)
from lmlab.models import build_model  # noqa: E402

CASES = {
    "mha": dict(num_key_value_heads=4),
    "gqa_tied": dict(num_key_value_heads=2, tie_word_embeddings=True),
    "mqa_bias": dict(num_key_value_heads=1, attention_bias=True),
}


def random_hf_llama(**kw):
    cfg = transformers.LlamaConfig(
        vocab_size=101, hidden_size=64, intermediate_size=112, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=96, rope_theta=5000.0, rms_norm_eps=1e-5, initializer_range=0.25,
        attn_implementation="sdpa", **kw,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # make norms and biases non-trivial so that a wrong mapping shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")):
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if "norm" in name else 0.0))
    return model


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_hf_llama(case):
    torch.manual_seed(0)
    hf = random_hf_llama(**CASES[case])
    cfg = model_config_from_hf(hf.config)
    ours = build_model(cfg, seed=0)
    ours.load_state_dict(from_hf_state_dict(hf.state_dict(), cfg))
    x = torch.randint(0, 101, (3, 96))
    with torch.no_grad():
        ref = hf(x).logits
        out = ours(x)
    assert ref.abs().max() > 1.0  # logits are far from zero: a wrong mapping cannot hide
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_lmlab_weights_run_in_hf(case):
    kw = CASES[case]
    cfg = ModelConfig(vocab_size=77, dim=64, n_layers=2, n_heads=4, n_kv_heads=kw["num_key_value_heads"],
                      hidden_dim=80, max_seq_len=64, rope_theta=20000.0,
                      tie_embeddings=kw.get("tie_word_embeddings", False), qkv_bias=kw.get("attention_bias", False),
                      init=InitConfig(scheme="normal", std=0.2))
    ours = build_model(cfg, seed=3).eval()
    hf_cfg = transformers.LlamaConfig(**model_config_to_hf(cfg), attn_implementation="sdpa")
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(ours.state_dict(), cfg), strict=False)
    assert not unexpected
    assert set(missing) <= ({"lm_head.weight"} if cfg.tie_embeddings else set())
    x = torch.randint(0, 77, (2, 64))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ours(x), rtol=1e-5, atol=1e-5)
    assert model_config_from_hf(hf.config) == ModelConfig(**{**cfg.__dict__, "init": InitConfig()})


def test_state_dict_round_trip_and_bad_names():
    cfg = ModelConfig(vocab_size=50, dim=32, n_layers=2, n_heads=2, qkv_bias=True)
    sd = build_model(cfg, seed=0).state_dict()
    back = from_hf_state_dict(to_hf_state_dict(sd, cfg), cfg)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    with pytest.raises(KeyError, match="layers.0.attention.wz.weight"):
        to_hf_state_dict({"layers.0.attention.wz.weight": torch.zeros(1)}, cfg)
    hf_sd = to_hf_state_dict(sd, cfg)
    hf_sd["model.layers.0.self_attn.o_proj.bias"] = torch.ones(32)
    with pytest.raises(ValueError, match="o_proj.bias"):
        from_hf_state_dict(hf_sd, cfg)


def test_unsupported_hf_features_are_refused():
    base = model_config_to_hf(ModelConfig(vocab_size=10, dim=32, n_layers=1, n_heads=2))
    with pytest.raises(ValueError, match="rope_scaling"):
        model_config_from_hf({**base, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})
    with pytest.raises(ValueError, match="mlp_bias"):
        model_config_from_hf({**base, "mlp_bias": True})


def test_saved_folder_loads_in_transformers_and_back(tmp_path):
    cfg = ModelConfig(vocab_size=90, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=48,
                      tie_embeddings=True, init=InitConfig(scheme="normal", std=0.2))
    ours = build_model(cfg, seed=5).eval()
    save_hf_folder(ours, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="sdpa").eval()
    back = load_hf_folder(tmp_path / "hf").eval()
    x = torch.randint(0, 90, (2, 48))
    with torch.no_grad():
        ref = ours(x)
        torch.testing.assert_close(hf(x).logits, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(back(x), ref, rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf_folder(tmp_path)


def test_smeared_keys_are_refused_by_the_export():
    from lmlab.hf import model_config_to_hf

    with pytest.raises(ValueError, match="smear_keys"):
        model_config_to_hf(ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, smear_keys=2))
