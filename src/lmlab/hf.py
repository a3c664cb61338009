"""Hugging Face Llama interop: state-dict naming, config conversion, rotary layout, safetensors folders.

lmlab's attention uses the same "half-split" rotary layout as ``transformers.LlamaForCausalLM``, so
weights move between the two by renaming alone. Meta's original Llama checkpoints use the
*interleaved* layout (pairs ``(2i, 2i+1)`` rotate together); ``permute_interleaved_to_half`` reorders the
rows of their q/k projections into the half-split layout (and ``permute_half_to_interleaved`` back).

Usage::

    from lmlab.hf import to_hf_state_dict, from_hf_state_dict, model_config_from_hf, save_hf_folder
    hf_sd = to_hf_state_dict(model.state_dict(), model.cfg)     # names as in LlamaForCausalLM
    sd = from_hf_state_dict(hf_model.state_dict(), cfg)         # back to lmlab names
    cfg = model_config_from_hf(hf_model.config)                 # ModelConfig with the same shape
    save_hf_folder(model, "out/")                               # config.json + model.safetensors
    files, ids = hf_tokenizer_files(cfg.tokenizer)              # + tokenizer files of an hf tokenizer run
    model = load_hf_folder("out/")                              # lmlab Transformer with those weights

Rotary scaling (``model.rope_scaling``) maps to HF's rope types: ``linear`` and ``yarn`` both ways (written as
``rope_scaling``, which every transformers version reads, and as transformers 5's ``rope_parameters``); lmlab's
static ``ntk`` has no HF equivalent (HF's ``dynamic`` NTK recomputes its base per length) and is refused.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch

from lmlab.config import InitConfig, ModelConfig, RopeScalingConfig
from lmlab.models.layers import default_hidden_dim

# lmlab name pattern -> HF name pattern ({i} = layer index)
_LAYER_MAP = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wq.bias": "self_attn.q_proj.bias",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wk.bias": "self_attn.k_proj.bias",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wv.bias": "self_attn.v_proj.bias",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP_MAP = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_INV_LAYER_MAP = {v: k for k, v in _LAYER_MAP.items()}
_INV_TOP_MAP = {v: k for k, v in _TOP_MAP.items()}
_LMLAB_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def _hidden(cfg: ModelConfig) -> int:
    return cfg.hidden_dim or default_hidden_dim(cfg.dim, cfg.multiple_of)


def to_hf_state_dict(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Rename an lmlab state dict to ``LlamaForCausalLM`` names.

    With ``qkv_bias`` the HF config sets ``attention_bias=True``, which also gives ``o_proj`` a bias:
    it is added as zeros so the HF model computes the same function.
    """
    out: dict[str, torch.Tensor] = {}
    for name, t in sd.items():
        if name in _TOP_MAP:
            if name == "output.weight" and cfg.tie_embeddings:
                continue
            out[_TOP_MAP[name]] = t
            continue
        m = _LMLAB_LAYER.match(name)
        if not m or m.group(2) not in _LAYER_MAP:
            raise KeyError(f"no Hugging Face name for lmlab parameter {name!r}")
        out[f"model.layers.{m.group(1)}.{_LAYER_MAP[m.group(2)]}"] = t
    if cfg.qkv_bias:
        for i in range(cfg.n_layers):
            wo = sd[f"layers.{i}.attention.wo.weight"]
            out[f"model.layers.{i}.self_attn.o_proj.bias"] = torch.zeros(wo.shape[0], dtype=wo.dtype, device=wo.device)
    return out


def from_hf_state_dict(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Rename a ``LlamaForCausalLM`` state dict to lmlab names (refusing what lmlab cannot represent)."""
    out: dict[str, torch.Tensor] = {}
    for name, t in sd.items():
        if "rotary_emb" in name:
            continue  # HF may store inv_freq buffers; lmlab recomputes them
        if name in _INV_TOP_MAP:
            out[_INV_TOP_MAP[name]] = t
            continue
        m = _HF_LAYER.match(name)
        if m and m.group(2) == "self_attn.o_proj.bias":
            if torch.count_nonzero(t):
                raise ValueError(f"{name}: lmlab has no attention output bias and this one is not zero")
            continue
        if not m or m.group(2) not in _INV_LAYER_MAP:
            raise KeyError(f"no lmlab name for Hugging Face parameter {name!r}")
        out[f"layers.{m.group(1)}.{_INV_LAYER_MAP[m.group(2)]}"] = t
    if cfg.tie_embeddings:
        out.setdefault("output.weight", out["tok_embeddings.weight"])
    return out


def permute_interleaved_to_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder q/k projection rows from Meta's interleaved rotary layout to the half-split layout.

    Within each head, output rows ``(0, 1), (2, 3), ...`` (pairs rotated together) become rows
    ``(0, d/2), (1, d/2 + 1), ...``. Works for weights (out, in) and biases (out,).
    """
    out = w.shape[0]
    head_dim = out // n_heads
    rest = w.shape[1:]
    return w.reshape(n_heads, head_dim // 2, 2, *rest).transpose(1, 2).reshape(out, *rest)


def permute_half_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of :func:`permute_interleaved_to_half`."""
    out = w.shape[0]
    head_dim = out // n_heads
    rest = w.shape[1:]
    return w.reshape(n_heads, 2, head_dim // 2, *rest).transpose(1, 2).reshape(out, *rest)


class ExportError(ValueError):
    """A model or an output path that cannot be written as a Hugging Face folder; nothing was written."""


def model_config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """A ``LlamaConfig`` as a plain dict (what config.json holds); :class:`ExportError` for a model with a
    feature Hugging Face Llama has no equivalent for."""
    if set(cfg.mixers()) != {"attention"}:
        raise ExportError(f"model.mixer: a model with recurrent mixers ({', '.join(cfg.mixers())}) has no Hugging Face "
                          "Llama equivalent; keep it as an lmlab checkpoint")
    if cfg.smear_keys:
        raise ExportError(f"model.smear_keys={cfg.smear_keys} (smeared keys) has no Hugging Face Llama "
                          "equivalent: this model cannot be exported")
    head_dim = cfg.dim // cfg.n_heads
    rope = rope_scaling_to_hf(cfg)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": _hidden(cfg),
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads or cfg.n_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": cfg.qkv_bias,
        "mlp_bias": False,
        "torch_dtype": "float32",
        **({"rope_scaling": rope, "rope_parameters": {**rope, "rope_theta": cfg.rope_theta}} if rope else {}),
    }


def rope_scaling_to_hf(cfg: ModelConfig) -> dict[str, Any] | None:
    """HF's ``rope_scaling`` dict for ``cfg.rope_scaling`` (None for plain rotary); :class:`ExportError` for ntk."""
    rs = cfg.rope_scaling
    if rs.kind == "none":
        return None
    if rs.kind == "linear":
        return {"rope_type": "linear", "factor": float(rs.factor)}
    if rs.kind == "yarn":
        out = {"rope_type": "yarn", "factor": float(rs.factor), "original_max_position_embeddings":
               rs.original_max_seq_len, "beta_fast": float(rs.beta_fast), "beta_slow": float(rs.beta_slow)}
        if rs.attention_factor is not None:
            out["attention_factor"] = float(rs.attention_factor)
        return out
    raise ExportError(f"model.rope_scaling.kind={rs.kind!r} (static NTK-aware scaling) has no Hugging Face Llama "
                      "equivalent (HF's 'dynamic' NTK recomputes its base for each sequence length): this model cannot "
                      "be exported; use kind linear or yarn to export")


def rope_scaling_from_hf(params: dict[str, Any], key: str, max_position_embeddings: int,
                         original_max: int | None = None) -> RopeScalingConfig:
    """``model.rope_scaling`` from HF's ``rope_scaling`` / ``rope_parameters`` dict (``key`` names it in errors),
    read as HF's ``_compute_linear_scaling_rope_parameters`` / ``_compute_yarn_parameters`` do; ValueError for a
    rope type or option lmlab lacks. ``original_max``: a top-level ``original_max_position_embeddings``, which HF
    prefers to the one inside the dict."""
    kind = params.get("rope_type", params.get("type", "default"))
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"{key} {params}: partial_rotary_factor is not supported by lmlab (it rotates whole heads)")
    if kind == "default":
        return RopeScalingConfig()
    if kind == "linear":
        return RopeScalingConfig(kind="linear", factor=float(params["factor"]))
    if kind != "yarn":
        raise ValueError(f"{key} {params}: rope type {kind!r} is not supported by lmlab (it reads default, linear and "
                         "yarn; its static ntk is not HF's dynamic one)")
    original = original_max or params.get("original_max_position_embeddings") or max_position_embeddings
    factor = params.get("factor") or max_position_embeddings / original
    if params.get("truncate", True) is not True:
        raise ValueError(f"{key} {params}: yarn with truncate=False is not supported by lmlab")
    attn = params.get("attention_factor")
    mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
    if attn is None and mscale and mscale_all_dim:  # DeepSeek's form; the same number as HF computes it
        def get_mscale(scale: float, m: float) -> float:
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        attn = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
    return RopeScalingConfig(kind="yarn", factor=float(factor), original_max_seq_len=int(original),
                             beta_fast=float(params.get("beta_fast") or 32),
                             beta_slow=float(params.get("beta_slow") or 1),
                             attention_factor=None if attn is None else float(attn))


def model_config_from_hf(hf: Any) -> ModelConfig:
    """A ModelConfig from a ``LlamaConfig`` (object or dict); refuses features lmlab lacks."""
    get = (lambda k, d=None: hf.get(k, d)) if isinstance(hf, dict) else (lambda k, d=None: getattr(hf, k, d))
    dim, n_heads = get("hidden_size"), get("num_attention_heads")
    head_dim = get("head_dim") or dim // n_heads
    if head_dim != dim // n_heads:
        raise ValueError(f"head_dim={head_dim} differs from hidden_size/num_attention_heads; lmlab needs them equal")
    # transformers < 5 writes rope_scaling, 5 writes rope_parameters (and reads rope_scaling first, as here)
    rope_params = get("rope_parameters") or {}
    key, scaling = ("rope_scaling", get("rope_scaling")) if get("rope_scaling") else ("rope_parameters", rope_params)
    max_pos = get("max_position_embeddings", 2048)
    rope_scaling = rope_scaling_from_hf(dict(scaling), key, max_pos, get("original_max_position_embeddings"))
    if get("mlp_bias", False):
        raise ValueError("mlp_bias=True is not supported by lmlab")
    if get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={get('hidden_act')!r} is not supported (lmlab uses SwiGLU with silu)")
    theta = rope_params.get("rope_theta") or get("rope_theta") or 10000.0
    return ModelConfig(
        vocab_size=get("vocab_size"),
        dim=dim,
        n_layers=get("num_hidden_layers"),
        n_heads=n_heads,
        n_kv_heads=get("num_key_value_heads") or n_heads,
        hidden_dim=get("intermediate_size"),
        norm_eps=float(get("rms_norm_eps", 1e-6)),
        rope_theta=float(theta),
        max_seq_len=max_pos,
        rope_scaling=rope_scaling,
        tie_embeddings=bool(get("tie_word_embeddings", False)),
        qkv_bias=bool(get("attention_bias", False)),
        init=InitConfig(),
    )


def save_hf_folder(model: torch.nn.Module, out_dir: str | Path, extra_files: dict[str, str] | None = None,
                   extra_config: dict[str, Any] | None = None) -> Path:
    """Write ``config.json`` and ``model.safetensors`` that ``AutoModelForCausalLM.from_pretrained`` loads, and
    ``extra_files`` (name -> text, e.g. :func:`hf_tokenizer_files`); ``extra_config`` adds keys to config.json
    (e.g. ``eos_token_id``).

    Everything is checked before anything is written (:class:`ExportError`), and each file is written under a
    temporary name and renamed into place, so a failed export leaves no folder or half-written file behind.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a folder: give a new or existing folder to write into")
    cfg: ModelConfig = model.cfg  # type: ignore[assignment]
    hf_config = {**model_config_to_hf(cfg), **(extra_config or {})}
    sd = {k: v.detach().to("cpu").contiguous().clone() for k, v in to_hf_state_dict(model.state_dict(), cfg).items()}
    out.mkdir(parents=True, exist_ok=True)
    files = {"model.safetensors": lambda p: save_file(sd, str(p), metadata={"format": "pt"}),
             "config.json": lambda p: p.write_text(json.dumps(hf_config, indent=2) + "\n")}
    for name, text in (extra_files or {}).items():
        files[name] = lambda p, text=text: p.write_text(text, encoding="utf-8")
    for name, write in files.items():
        tmp = out / f".{name}.tmp"
        write(tmp)
        tmp.replace(out / name)
    return out


def load_hf_folder(path: str | Path, device: str = "cpu") -> torch.nn.Module:
    """Load a Llama folder (config.json + *.safetensors) into an lmlab Transformer."""
    from safetensors.torch import load_file

    from lmlab.models import build_model, materialize

    p = Path(path)
    cfg_file = p / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file}: no config.json in the Hugging Face folder")
    hf_cfg = json.loads(cfg_file.read_text())
    if hf_cfg.get("model_type", "llama") != "llama":
        raise ValueError(f"{cfg_file}: model_type={hf_cfg.get('model_type')!r}, expected 'llama'")
    cfg = model_config_from_hf(hf_cfg)
    files = sorted(p.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{p}: no *.safetensors weight files")
    hf_sd: dict[str, torch.Tensor] = {}
    for f in files:
        hf_sd.update(load_file(str(f), device=device))
    model = materialize(build_model(cfg, device="meta"), device)
    missing, unexpected = model.load_state_dict(from_hf_state_dict(hf_sd, cfg), strict=False)
    missing = [k for k in missing if not (cfg.tie_embeddings and k == "output.weight")]
    if missing or unexpected:
        raise ValueError(f"{p}: weights do not match the config: missing {missing}, unexpected {unexpected}")
    return model


# ------------------------------------------------------------------------------------------------
# Tokenizer files (an ``hf`` tokenizer of a run exported beside the weights)
# ------------------------------------------------------------------------------------------------

def folder_chat_template(folder: Path, tokenizer_config: dict[str, Any]) -> str | None:
    """The default chat template of a Hugging Face folder: chat_template.jinja (transformers 5), else
    tokenizer_config.json's ``chat_template`` (a string, or a list of named templates: the one named 'default')."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    tpl = tokenizer_config.get("chat_template")
    if isinstance(tpl, list):
        tpl = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}.get("default")
    return tpl if isinstance(tpl, str) else None


def chat_template_for(chat_format: str, system_prompt: str = "") -> str:
    """A Jinja chat template rendering dialogs as :class:`lmlab.tokenizers.DialogTokenizer` does in ``chat_format``
    (chatml: ``<|im_start|>role\\n...<|im_end|>\\n`` turns; lmlab: one begin token per turn), with
    ``system_prompt`` put before a dialog that has no system turn."""
    sys_text = json.dumps(system_prompt)  # a JSON string is a valid Jinja string literal
    if chat_format == "chatml":
        system = ("{%- if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\n' + " + sys_text
                  + " + '<|im_end|>\\n' }}{%- endif %}") if system_prompt else ""
        return ("{%- for message in messages %}" + system + "{{ '<|im_start|>' + message['role'] + '\\n' + "
                "message['content'] + '<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}"
                "{{ '<|im_start|>assistant\\n' }}{%- endif %}")
    system = ("{%- if loop.first and messages[0]['role'] != 'system' %}{{ '<|system|>' + " + sys_text
              + " }}{%- endif %}") if system_prompt else ""
    return ("{%- for message in messages %}" + system + "{{ '<|' + ('database' if message['role'] == 'tool' else "
            "message['role']) + '|>' + message['content'] }}{%- endfor %}{%- if add_generation_prompt %}"
            "{{ '<|assistant|>' }}{%- else %}{{ '<|end_of_dialog|>' }}{%- endif %}")


def hf_tokenizer_files(tok_cfg: Any) -> tuple[dict[str, str], dict[str, int]]:
    """The tokenizer files of a Hugging Face folder for a run's ``hf`` tokenizer (``tokenizer:`` config section), and
    the ``bos/eos/pad_token_id`` keys for config.json.

    ``tokenizer.json``: the run's, with lmlab's appended ``special_tokens`` added as special added tokens at their
    ids; ``tokenizer_config.json``: the one beside the run's tokenizer.json (an imported model's) or a new one, with
    the chat template (the one beside, else one written for ``chat_format`` / ``system_prompt``) and bos / eos / pad
    tokens; ``special_tokens_map.json``. ExportError for a file that cannot be read.
    """
    from lmlab.tokenizers import HFTokenizer

    path = Path(tok_cfg.path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        tok = HFTokenizer(path, list(tok_cfg.special_tokens))
    except (OSError, ValueError) as e:
        raise ExportError(f"tokenizer.path {path}: cannot be read for the export ({e})") from e
    added = data.setdefault("added_tokens", [])
    have = {t.get("content"): t.get("id") for t in added if isinstance(t, dict)}
    for literal, i in tok.special_tokens.items():
        if literal in have:
            if have[literal] != i:
                raise ExportError(f"tokenizer.special_tokens: {literal!r} is also an added token of {path} (id "
                                  f"{have[literal]}, lmlab gives it {i}); drop it from tokenizer.special_tokens")
            continue
        added.append({"id": i, "content": literal, "single_word": False, "lstrip": False, "rstrip": False,
                      "normalized": False, "special": True})
    beside = path.parent / "tokenizer_config.json"
    tc: dict[str, Any] = {}
    if beside.is_file():
        try:
            tc = json.loads(beside.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ExportError(f"{beside}: not JSON ({e})") from e
    template = folder_chat_template(path.parent, tc) if beside.is_file() else None
    if template is None and (tok_cfg.chat_format != "lmlab" or all(
            t in tok.special_tokens for t in ("<|system|>", "<|user|>", "<|assistant|>", "<|end_of_dialog|>"))):
        template = chat_template_for(tok_cfg.chat_format, tok_cfg.system_prompt)
    if template is not None:
        tc["chat_template"] = template
    tc.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    for key in ("is_local", "local_files_only", "name_or_path"):
        tc.pop(key, None)
    defaults = ({"eos_token": "<|im_end|>", "pad_token": "<|im_end|>"} if tok_cfg.chat_format == "chatml" else
                {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>"})
    ids: dict[str, int] = {}
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        literal = tc.get(key, defaults.get(key))
        if isinstance(literal, dict):
            literal = literal.get("content")
        try:
            i = tok.token_id(literal) if isinstance(literal, str) else None
        except KeyError:
            i = None
        if i is None:
            tc.pop(key, None)
            continue
        tc[key] = literal
        if key != "unk_token":
            ids[f"{key}_id"] = i
    special_map = {k: tc[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token") if k in tc}
    files = {"tokenizer.json": json.dumps(data, ensure_ascii=False),
             "tokenizer_config.json": json.dumps(tc, indent=2, ensure_ascii=False) + "\n",
             "special_tokens_map.json": json.dumps(special_map, indent=2, ensure_ascii=False) + "\n"}
    return files, ids
