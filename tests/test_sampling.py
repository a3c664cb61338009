"""KV-cache decoding equals full recomputation; sampling filters, seeds, stops; the text-level helper."""

import dataclasses
import json

import pytest
import torch
from conftest import randomize_smear

import lmlab.inference.sampling as sampling_mod
from lmlab.config import InitConfig, ModelConfig, SampleConfig
from lmlab.data import DataError
from lmlab.inference import (
    KVCache,
    Sampler,
    SamplingParams,
    filtered_probs,
    generate,
    generate_reference,
    generate_text,
    read_prompts,
)
from lmlab.models import build_model
from lmlab.tokenizers import ByteTokenizer

VARIANTS = {
    "mha": dict(),
    "gqa": dict(n_kv_heads=2),
    "mqa_tied_bias": dict(n_kv_heads=1, tie_embeddings=True, qkv_bias=True),
    "smear_gqa": dict(n_kv_heads=2, smear_keys=2),
    "smear_channels": dict(smear_keys=3, smear_channels=True),
    "smear_queries": dict(n_kv_heads=2, smear_keys=3, smear_queries=True),
}
LENGTHS = [1, 40, 7, 23, 2, 31, 12, 40, 5, 17]  # ragged, 1..40


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def small_model(seed=0, **kw):
    # a large init std gives peaked, input-dependent logits: greedy paths differ from row to row
    base = dict(vocab_size=97, dim=64, n_layers=2, n_heads=4, hidden_dim=96, max_seq_len=128,
                init=InitConfig(scheme="normal", std=0.3))
    base.update(kw)
    model = build_model(ModelConfig(**base), seed=seed).eval()
    if base.get("qkv_bias"):
        with torch.no_grad():  # non-zero biases, so that a bias lost on the cached path shows
            for layer in model.layers:
                for lin in (layer.attention.wq, layer.attention.wk, layer.attention.wv):
                    lin.bias.normal_(0.0, 0.5)
    randomize_smear(model, seed)
    return model


def prompts_of(lengths, vocab=97, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


# ---- the cache against full recomputation ---------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cached_greedy_equals_reference_token_for_token(variant):
    model = small_model(**VARIANTS[variant])
    prompts = prompts_of(LENGTHS)
    params = SamplingParams(max_new_tokens=12, temperature=0)
    out = generate(model, prompts, params)
    ref = generate_reference(model, prompts, params)
    assert out == ref
    assert all(len(o) == 12 for o in out)
    assert len({tuple(o) for o in out}) == len(out)  # rows really differ: a mixed-up row would show


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cached_logits_equal_full_recompute_at_every_step(variant):
    """Ragged prefill, decode steps where some rows pause, then a ragged multi-token extension."""
    torch.manual_seed(0)
    # a moderate init keeps logits O(1), where float32 rounding stays well below the tolerance
    model = small_model(**VARIANTS[variant], init=InitConfig(scheme="normal", std=0.1))
    lengths = [1, 9, 40, 4, 17]
    seqs = prompts_of(lengths)
    b = len(seqs)
    cache = KVCache.for_model(model, b, 64)
    schedule = [lengths] + [[1] * b] * 3 + [[1, 0, 1, 0, 1], [0, 1, 1, 1, 0], [3, 0, 5, 1, 2], [1] * b]
    with torch.no_grad():
        for step_no, n_new in enumerate(schedule):
            width = max(n_new)
            tokens = torch.zeros(b, width, dtype=torch.long)
            for i, n in enumerate(n_new):
                if step_no:  # after the prompts: fresh random tokens
                    seqs[i] = seqs[i] + torch.randint(0, 97, (n,)).tolist()
                tokens[i, :n] = torch.tensor(seqs[i][len(seqs[i]) - n:], dtype=torch.long)
            logits = model(tokens, cache=cache.step(n_new))
            assert cache.lengths.tolist() == [len(s) for s in seqs]
            for i, n in enumerate(n_new):
                if n == 0:
                    continue
                full = model(torch.tensor([seqs[i]]))[0, len(seqs[i]) - n:]
                torch.testing.assert_close(logits[i, :n], full, rtol=0, atol=1e-5,
                                           msg=lambda m, s=step_no, r=i: f"step {s} row {r}: {m}")


def test_uniform_prefill_takes_the_causal_path_and_matches_exactly():
    model = small_model(n_kv_heads=2)
    x = torch.randint(0, 97, (3, 20))
    cache = KVCache.for_model(model, 3, 32)
    step = cache.step(20)
    assert step.mask is None and step.n_keys == 20
    with torch.no_grad():
        torch.testing.assert_close(model(x, cache=step), model(x), rtol=0, atol=0)
    step = cache.step([1, 0, 1])  # decode: an explicit mask that lets each row see its own prefix only
    assert step.mask is not None and step.mask.shape == (3, 1, 1, 21)
    assert step.mask[:, 0, 0].sum(-1).tolist() == [21, 20, 21]
    assert step.positions[:, 0].tolist() == [20, 0, 20]  # the paused row's padding token sits at 0
    assert step.slots[:, 0].tolist() == [20, 32, 20]  # ... and writes to the scratch slot


def test_cache_is_allocated_once_and_each_step_is_one_forward(monkeypatch):
    model = small_model(n_kv_heads=2)
    made = []

    class Recording(KVCache):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            made.append(self)
            self.ptrs = (self.k.data_ptr(), self.v.data_ptr())

    monkeypatch.setattr(sampling_mod, "KVCache", Recording)
    batches = []
    model.register_forward_hook(lambda mod, args, kwargs, out: batches.append(tuple(args[0].shape)), with_kwargs=True)
    prompts = prompts_of([3, 11, 1, 8])
    out = generate(model, prompts, SamplingParams(max_new_tokens=6, temperature=0))
    assert len(made) == 1
    cache = made[0]
    assert (cache.k.data_ptr(), cache.v.data_ptr()) == cache.ptrs
    assert cache.k.shape == (2, 4, 2, 11 + 6 + 1, 16)  # layers, rows, kv heads, longest prompt + new + scratch
    # one prefill, then one forward per step for the whole batch (the last token needs no forward)
    assert batches == [(4, 11)] + [(4, 1)] * 5
    assert cache.lengths.tolist() == [len(p) + len(o) - 1 for p, o in zip(prompts, out)]


def test_rows_that_finish_early_add_nothing_to_the_cache(monkeypatch):
    """A long prompt with few new tokens beside a short prompt with many: the cache is sized for the longest
    prompt + max_new_tokens of any row (42 here), which holds only if a finished row stops growing. Each row's
    length ends at its prompt + its new tokens - 1 (the last token needs no forward)."""
    model = small_model()
    made = []

    class Recording(KVCache):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            made.append(self)

    monkeypatch.setattr(sampling_mod, "KVCache", Recording)
    prompts = prompts_of([40, 1, 9], seed=3)
    params = [SamplingParams(max_new_tokens=n, temperature=0) for n in (2, 30, 5)]
    out = generate(model, prompts, params)
    assert out == generate_reference(model, prompts, params)
    assert [len(o) for o in out] == [2, 30, 5]
    assert made[0].max_len == 42
    assert made[0].lengths.tolist() == [40 + 2 - 1, 1 + 30 - 1, 9 + 5 - 1]


def test_cache_overflow_and_bad_lengths_are_clear_errors():
    model = small_model()
    cache = KVCache.for_model(model, 2, 8)
    cache.step([5, 8])
    with pytest.raises(ValueError, match=r"overflow: row 0 holds 5 tokens and 4 more would exceed max_len=8"):
        cache.step([4, 0])
    assert cache.lengths.tolist() == [5, 8]  # a refused step reserves nothing
    cache.step([3, 0])
    with pytest.raises(ValueError, match="one per row"):
        cache.step([1, 1, 1])
    with pytest.raises(ValueError, match="exceeds the model's max_seq_len=128"):
        KVCache.for_model(model, 1, 129)
    cache.reset([1])
    assert cache.lengths.tolist() == [8, 0]
    with pytest.raises(ValueError, match="max_len=20"):
        generate(model, [[1] * 15], SamplingParams(max_new_tokens=6, temperature=0), max_len=20)
    with pytest.raises(ValueError, match="model.max_seq_len=128"):
        generate(model, [[1] * 100, [2]], SamplingParams(max_new_tokens=29, temperature=0))
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(model, [[1], []], SamplingParams(max_new_tokens=2, temperature=0))
    with pytest.raises(ValueError, match="token id 97 outside"):
        generate(model, [[1, 97]], SamplingParams(max_new_tokens=2, temperature=0))
    with pytest.raises(ValueError, match="drop positions/doc_ids"):
        model(torch.zeros(2, 1, dtype=torch.long), positions=torch.zeros(2, 1, dtype=torch.long),
              cache=KVCache.for_model(model, 2, 8).step(1))


def test_a_paused_full_row_is_left_untouched():
    """Padding tokens of rows that add nothing write to the scratch slot, even when the row is full."""
    model = small_model(n_kv_heads=2)
    cache = KVCache.for_model(model, 2, 8)
    with torch.no_grad():
        model(torch.randint(0, 97, (2, 8)), cache=cache.step([8, 5]))
        before = cache.k[:, 0, :, :8].clone(), cache.v[:, 0, :, :8].clone()
        model(torch.randint(0, 97, (2, 3)), cache=cache.step([0, 3]))
    assert torch.equal(cache.k[:, 0, :, :8], before[0]) and torch.equal(cache.v[:, 0, :, :8], before[1])
    assert cache.lengths.tolist() == [8, 8]


def test_cache_follows_the_model_dtype():
    model = small_model().to(torch.bfloat16)
    cache = KVCache.for_model(model, 2, 16)
    assert cache.dtype == torch.bfloat16 and cache.nbytes == 2 * 2 * 2 * 4 * 17 * 16 * 2
    # bf16 logits through the cache (a prefill chunk, then a decode token) equal bf16 full recompute, and stay
    # within bf16 rounding of float32 on the same (rounded) weights; the decode token without its context is off by
    # more than the logits' scale
    x = torch.tensor(prompts_of([9, 9]))
    fp32 = small_model()
    fp32.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    with torch.no_grad():
        got = torch.cat([model(x[:, :8], cache=cache.step([8, 8])), model(x[:, 8:], cache=cache.step([1, 1]))], 1)
        full, want = model(x), fp32(x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, full, atol=1e-2, rtol=0)
    assert (got.float() - want).abs().max() < 0.05 * want.abs().max()


# ---- sampling -------------------------------------------------------------------------------------


def test_seeded_sampling_is_reproducible_and_equals_the_reference():
    model = small_model(n_kv_heads=2)
    prompts = prompts_of(LENGTHS)
    params = SamplingParams(max_new_tokens=10, temperature=1.0, top_k=40, top_p=0.9, seed=3)
    out = generate(model, prompts, params)
    assert out == generate(model, prompts, params)
    assert out == generate_reference(model, prompts, params)
    other = generate(model, prompts, SamplingParams(max_new_tokens=10, temperature=1.0, top_k=40, top_p=0.9, seed=4))
    assert other != out
    greedy = generate(model, prompts, SamplingParams(max_new_tokens=10, temperature=0))
    assert greedy != out


def test_a_request_samples_the_same_in_any_batch():
    model = small_model()
    prompts = prompts_of([6, 2, 30, 9])
    mine = SamplingParams(max_new_tokens=8, temperature=1.2, top_p=0.8, seed=11)
    alone = generate(model, [prompts[2]], [mine])[0]
    mixed = [SamplingParams(max_new_tokens=3, temperature=0), SamplingParams(max_new_tokens=8, seed=5), mine,
             SamplingParams(max_new_tokens=5, temperature=0.7, top_k=3, seed=1)]
    batch = generate(model, prompts, mixed)
    assert batch[2] == alone
    assert [len(o) for o in batch] == [3, 8, 8, 5]
    assert batch == generate_reference(model, prompts, mixed)
    # one params for many rows: row i is seeded seed + i, so equal prompts give different samples
    twice = generate(model, [prompts[2]] * 2, mine)
    assert twice[0] == alone and twice[1] == generate(model, [prompts[2]], [dataclasses.replace(mine, seed=12)])[0]
    assert twice[0] != twice[1]


def test_top_k_one_is_greedy():
    model = small_model(n_kv_heads=1, tie_embeddings=True)
    prompts = prompts_of(LENGTHS)
    greedy = generate(model, prompts, SamplingParams(max_new_tokens=10, temperature=0))
    assert generate(model, prompts, SamplingParams(max_new_tokens=10, temperature=2.0, top_k=1, seed=0)) == greedy
    # and temperature does sample: without top_k the same seed leaves the greedy path
    assert generate(model, prompts, SamplingParams(max_new_tokens=10, temperature=2.0, seed=0)) != greedy


def test_top_p_keeps_exactly_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.05, 0.4, 0.1, 0.3, 0.15]])
    logits = probs.log()

    def kept(**kw):
        p = filtered_probs(logits, **kw)[0]
        return {i for i in range(5) if p[i] > 0}, p

    assert kept(top_p=0.3)[0] == {1}  # 0.4 alone reaches 0.3
    assert kept(top_p=0.41)[0] == {1, 3}  # 0.4 < 0.41 <= 0.7
    assert kept(top_p=0.69)[0] == {1, 3}
    ids, p = kept(top_p=0.71)  # 0.7 < 0.71 <= 0.85
    assert ids == {1, 3, 4}
    torch.testing.assert_close(p, torch.tensor([0.0, 0.4, 0.0, 0.3, 0.15]) / 0.85)
    assert kept(top_p=0.86)[0] == {1, 2, 3, 4}
    assert kept(top_p=1.0)[0] == {0, 1, 2, 3, 4}
    torch.testing.assert_close(kept(top_p=1.0)[1], probs[0])
    # top-k first, then top-p on what is left: k=2 leaves 0.4/0.7 = 0.571 and 0.3/0.7 = 0.429
    assert kept(top_k=2, top_p=0.6)[0] == {1, 3}
    assert kept(top_k=2, top_p=0.55)[0] == {1}
    assert kept(top_k=3)[0] == {1, 3, 4}
    # temperature flattens before the nucleus is chosen
    ids, p = kept(temperature=100.0, top_p=0.5)
    assert len(ids) == 3 and 1 in ids
    # exact arithmetic (4 equal ids of 1/4): a set that reaches p exactly is enough; ties keep the lower ids
    flat = torch.zeros(1, 4)
    assert {i for i, x in enumerate(filtered_probs(flat, top_p=0.5)[0]) if x > 0} == {0, 1}
    assert {i for i, x in enumerate(filtered_probs(flat, top_p=0.25)[0]) if x > 0} == {0}
    assert {i for i, x in enumerate(filtered_probs(flat, top_k=2)[0]) if x > 0} == {0, 1}
    assert filtered_probs(logits, temperature=0.0)[0].tolist() == [0.0, 1.0, 0.0, 0.0, 0.0]


def test_sampler_draws_follow_the_filtered_distribution():
    probs = torch.tensor([0.05, 0.4, 0.1, 0.3, 0.15])
    n = 4000
    sampler = Sampler([SamplingParams(top_p=0.71, seed=i) for i in range(n)])
    toks = sampler(probs.log().expand(n, 5))
    counts = torch.bincount(toks, minlength=5).float() / n
    assert counts[0] == 0 and counts[2] == 0
    torch.testing.assert_close(counts, torch.tensor([0.0, 0.4, 0.0, 0.3, 0.15]) / 0.85, rtol=0, atol=0.03)
    suppressed = Sampler([SamplingParams(temperature=0, suppress_token_ids=[1, 3])])(probs.log()[None])
    assert suppressed.tolist() == [4]


def test_stop_tokens_end_a_row_while_others_continue():
    model = small_model(n_kv_heads=2)
    prompts = prompts_of(LENGTHS)
    free = generate(model, prompts, SamplingParams(max_new_tokens=12, temperature=0))
    # a stop token that row 3 emits as its 3rd token
    row = next(i for i, o in enumerate(free) if o[2] not in o[:2])
    stop = free[row][2]
    params = SamplingParams(max_new_tokens=12, temperature=0, stop_token_ids=[stop])
    out = generate(model, prompts, params)
    assert out[row] == free[row][:3]  # the stop token ends the row and is its last output token
    for o, f in zip(out, free):
        expect = f[: f.index(stop) + 1] if stop in f else f
        assert o == expect
    assert any(len(o) == 12 for o in out)  # other rows went on to max_new_tokens
    assert out == generate_reference(model, prompts, params)


def test_sampling_params_validation_and_config():
    for bad in (dict(temperature=-1), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5), dict(max_new_tokens=-1)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SamplingParams(**bad)
    p = SamplingParams.from_config(SampleConfig(max_new_tokens=7, top_k=5), run_seed=9)
    assert (p.max_new_tokens, p.temperature, p.top_k, p.top_p, p.seed) == (7, 0.8, 5, 1.0, 9)
    assert SamplingParams.from_config(SampleConfig(seed=2), run_seed=9, temperature=0).seed == 2
    assert SamplingParams(stop_token_ids=[3, 4]).stop_token_ids == (3, 4)
    assert generate(small_model(), [[1, 2]], SamplingParams(max_new_tokens=0)) == [[]]
    with pytest.raises(ValueError, match="2 SamplingParams for 3 prompts"):
        generate(small_model(), [[1]] * 3, [SamplingParams()] * 2)


# ---- text level -----------------------------------------------------------------------------------


def byte_model(vocab=264, boost=None):
    """A random model over the byte tokenizer's ids; ``boost`` {id: amount} is added to its logits."""
    model = small_model(vocab_size=vocab, init=InitConfig(scheme="normal", std=0.1))
    if boost:
        def add(mod, args, out):
            out = out.clone()
            for i, amount in boost.items():
                out[..., i] += amount
            return out
        model.output.register_forward_hook(add)
    return model


def test_generate_text_stops_on_end_tokens_and_leaves_them_out():
    tok = ByteTokenizer()
    params = SamplingParams(max_new_tokens=5, temperature=0)
    assert generate_text(byte_model(boost={tok.eos_id: 100.0}), tok, ["hi", "there"], params) == ["", ""]
    end = tok.special_id("<|end_of_dialog|>")
    model = byte_model(boost={end: 100.0})
    assert generate_text(model, tok, ["hi"], params) == [""]
    assert generate(model, [tok.encode("hi")], params) == [[end] * 5]  # generate() has no default stops
    # explicit stop ids replace the defaults
    assert generate_text(model, tok, ["hi"], SamplingParams(max_new_tokens=3, temperature=0, stop_token_ids=[]),
                         allow_special=True) == ["<|end_of_dialog|>" * 3]


def test_generate_text_never_samples_other_specials_unless_asked():
    tok = ByteTokenizer()
    pad, user = tok.pad_id, tok.special_id("<|user|>")
    model = byte_model(vocab=300, boost={pad: 100.0, user: 90.0, 290: 200.0})
    for params in (SamplingParams(max_new_tokens=6, temperature=0), SamplingParams(max_new_tokens=6, seed=0)):
        texts = generate_text(model, tok, ["ab", "c"], params)
        assert all("<|" not in t and t for t in texts)
    # allowed: the boosted pad wins; id 290 (beyond the tokenizer) is still never produced
    texts = generate_text(model, tok, ["ab"], SamplingParams(max_new_tokens=3, temperature=0), allow_special=True)
    assert texts == ["<|pad|>" * 3]


def test_generate_text_streams_the_same_text():
    tok = ByteTokenizer()
    model = byte_model()
    pieces: dict[int, list[str]] = {0: [], 1: []}
    params = SamplingParams(max_new_tokens=40, temperature=1.0, seed=1)
    texts = generate_text(model, tok, ["héllo", "x"], params, on_text=lambda row, s: pieces[row].append(s))
    # the slow reference, with the same stops and suppressed ids that generate_text derives from the tokenizer
    rows = [sampling_mod._text_params(p, tok, model.cfg.vocab_size, False) for p in sampling_mod._row_params(params, 2)]
    ref = generate_reference(model, [tok.encode("héllo"), tok.encode("x")], rows)
    assert texts == [tok.decode(t[:-1] if t and t[-1] in r.stop_token_ids else t) for t, r in zip(ref, rows)]
    assert ["".join(pieces[i]) for i in range(2)] == texts
    assert all(len(pieces[i]) > 1 for i in range(2))  # streamed in pieces, not at the end


def test_read_prompts(tmp_path):
    (tmp_path / "p.txt").write_text("ROMEO:\n\nJULIET: hi\n", encoding="utf-8")
    assert read_prompts(tmp_path / "p.txt") == ["ROMEO:", "JULIET: hi"]
    lines = [json.dumps("two\nlines"), json.dumps({"prompt": "obj"}), ""]
    (tmp_path / "p.jsonl").write_text("\n".join(lines), encoding="utf-8")
    assert read_prompts(tmp_path / "p.jsonl") == ["two\nlines", "obj"]
    (tmp_path / "bad.jsonl").write_text('"ok"\n{"text": 1}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        read_prompts(tmp_path / "bad.jsonl")
    with pytest.raises(DataError, match="missing.txt"):
        read_prompts(tmp_path / "missing.txt")
    (tmp_path / "bin.txt").write_bytes(b"ok\n\xff\xfe\x00")
    with pytest.raises(DataError, match=r"bin\.txt: not valid UTF-8"):
        read_prompts(tmp_path / "bin.txt")
    (tmp_path / "blank.txt").write_text("\n  \n")
    with pytest.raises(DataError, match="holds no prompt"):
        read_prompts(tmp_path / "blank.txt")
