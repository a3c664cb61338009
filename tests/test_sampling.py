"""The engine's cached decoding against the slow reference (``tests/reference.py``) for every model variant;
sampling filters, seeds and stop tokens; SamplingParams; the text level (stops, special tokens, streaming);
read_prompts."""

import dataclasses
import json

import pytest
import torch
from conftest import randomize_smear
from reference import generate_reference, reference_text

from lmlab.config import InitConfig, ModelConfig, SampleConfig
from lmlab.data import DataError
from lmlab.inference import (
    Engine,
    PagedStep,
    PagePool,
    Request,
    Sampler,
    SamplingParams,
    Segment,
    filtered_probs,
    read_prompts,
    row_params,
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


# continuous batching (fewer rows than requests), pages, and prompts prefilled in chunks over several steps
ENGINE = dict(pool_tokens=1024, page_size=8, max_batch=4, prefill_chunk=32)


def generate(model, prompts, params, engine=None):
    """The engine's new tokens for each prompt; ``params``: one for all (row ``i`` seeded ``seed + i``, as
    :func:`row_params` says) or one per prompt."""
    engine = engine if engine is not None else Engine(model, **ENGINE)
    rows = row_params(params, len(prompts))
    return [r.tokens for r in engine.generate([Request(prompt=p, params=q) for p, q in zip(prompts, rows)])]


def record_logits(engine):
    """Every (context, logits) row the engine samples a token from: the sequence so far, and the float32 logits
    its cached forward gave for the next token (hooked where the engine samples)."""
    seen = []
    sample = engine._sample

    def recording(items, logits, events):
        seen.extend((list(s.tokens), row.clone()) for s, row in zip(items, logits))
        return sample(items, logits, events)

    engine._sample = recording
    return seen


def pool_is_whole(engine):
    cached = engine.prefix.n_pages if engine.prefix is not None else 0
    return engine.pool.n_free + cached == engine.pool.n_pages and not engine.active and not engine.waiting


# ---- the engine's cache against full recomputation --------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cached_greedy_equals_reference_token_for_token(variant):
    model = small_model(**VARIANTS[variant])
    prompts = prompts_of(LENGTHS)
    params = SamplingParams(max_new_tokens=12, temperature=0)
    engine = Engine(model, **ENGINE)
    out = generate(model, prompts, params, engine)
    ref = generate_reference(model, prompts, params)
    assert out == ref
    assert all(len(o) == 12 for o in out)
    assert len({tuple(o) for o in out}) == len(out)  # rows really differ: a mixed-up row would show
    assert engine.stats["prefill_forwards"] > 1 and engine.stats["decode_batch_joins"] == len(prompts)
    assert pool_is_whole(engine)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cached_logits_equal_full_recompute_at_every_step(variant):
    """Every logit row the engine samples from equals the full forward of the sequence so far: rows from packed,
    chunked prefills (a prompt split over steps, several prompts in one forward), from the decode batch as
    sequences join and leave it, after a preemption's re-prefill, and over prompt pages taken from the prefix
    cache."""
    torch.manual_seed(0)
    # a moderate init keeps logits O(1), where float32 rounding stays well below the tolerance
    model = small_model(**VARIANTS[variant], init=InitConfig(scheme="normal", std=0.1))
    system = prompts_of([19], seed=5)[0]
    prompts = prompts_of([1, 9, 40, 4, 17]) + [system + p for p in prompts_of([3, 11, 6], seed=6)]
    params = [SamplingParams(max_new_tokens=8 + 5 * (i % 4), temperature=1.0, seed=i) for i in range(len(prompts))]
    engine = Engine(model, pool_tokens=96, page_size=8, max_batch=4, prefill_chunk=24)
    seen = record_logits(engine)
    res = engine.generate([Request(prompt=p, params=q) for p, q in zip(prompts, params)])
    assert len(seen) == sum(len(r.tokens) for r in res) == sum(q.max_new_tokens for q in params)
    with torch.no_grad():
        for n, (ctx, logits) in enumerate(seen):
            full = model(torch.tensor([ctx]))[0, -1]
            where = f"sample {n} (context of {len(ctx)} tokens)"
            torch.testing.assert_close(logits, full, rtol=0, atol=1e-5, msg=lambda m, w=where: f"{w}: {m}")
    assert engine.stats["preemptions"] > 0
    assert any(r.cached_tokens >= 16 for r in res[5:])  # the shared prompt prefix came from the prefix cache
    assert pool_is_whole(engine)


def test_rows_that_finish_early_give_their_room_back():
    """A long prompt with few new tokens beside a short prompt with many: at their peaks the three sequences need
    12 pages, the pool has 9. It runs without a preemption only if a finished row's pages come back at once."""
    model = small_model()
    prompts = prompts_of([40, 1, 9], seed=3)
    params = [SamplingParams(max_new_tokens=n, temperature=0) for n in (2, 30, 5)]
    engine = Engine(model, pool_tokens=72, page_size=8, max_batch=3, prefix_cache=False)
    assert sum(-(-(len(p) + q.max_new_tokens - 1) // 8) for p, q in zip(prompts, params)) > engine.pool.n_pages
    out = generate(model, prompts, params, engine)
    assert out == generate_reference(model, prompts, params)
    assert [len(o) for o in out] == [2, 30, 5]
    assert engine.stats["preemptions"] == 0
    assert pool_is_whole(engine)


def test_bad_prompts_are_clear_errors():
    model = small_model()
    engine = Engine(model)  # the default pool (8192 tokens) is larger than the context: the model's 128 limit
    greedy = SamplingParams(max_new_tokens=2, temperature=0)
    with pytest.raises(ValueError, match=r"request 1: 100 prompt tokens \+ max_new_tokens=29 exceed 128 .*"
                                         r"model.max_seq_len=128"):
        engine.generate([Request(prompt=[2], params=greedy),
                         Request(prompt=[1] * 100, params=SamplingParams(max_new_tokens=29, temperature=0))])
    with pytest.raises(ValueError, match="request 1: the prompt is empty"):
        engine.generate([Request(prompt=[1], params=greedy), Request(prompt=[], params=greedy)])
    with pytest.raises(ValueError, match=r"request 0: token id 97 is outside the model vocabulary \[0, 97\)"):
        engine.generate([Request(prompt=[1, 97], params=greedy)])
    assert pool_is_whole(engine)  # nothing was admitted
    # the reference refuses the same prompts
    with pytest.raises(ValueError, match="model.max_seq_len=128"):
        generate_reference(model, [[1] * 100, [2]], SamplingParams(max_new_tokens=29, temperature=0))
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate_reference(model, [[1], []], greedy)
    with pytest.raises(ValueError, match="token id 97 outside"):
        generate_reference(model, [[1, 97]], greedy)
    # with a cache, the positions and the mask come from the cache
    with pytest.raises(ValueError, match="drop positions/doc_ids"):
        pool = PagePool.for_model(model, 16, page_size=8)
        step = PagedStep(pool, [[Segment(pool.alloc(1), 0, 1)], [Segment(pool.alloc(1), 0, 1)]])
        model(torch.zeros(2, 1, dtype=torch.long), positions=torch.zeros(2, 1, dtype=torch.long), cache=step)


def test_the_engine_follows_the_model_dtype():
    """A bfloat16 model gets a bfloat16 pool and decode batch; its cached logits (a prefill chunk, then decode
    tokens) equal bfloat16 full recompute, and stay within bfloat16 rounding of float32 on the same (rounded)
    weights."""
    model = small_model().to(torch.bfloat16)
    engine = Engine(model, pool_tokens=64, page_size=8, max_batch=2, prefill_chunk=8, prefix_cache=False)
    assert engine.pool.k.dtype == engine.pool.v.dtype == torch.bfloat16
    assert engine.pool.k.nbytes == 2 * 64 * 4 * 16 * 2  # layers, slots, kv heads, head dim, 2 bytes
    fp32 = small_model()
    fp32.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    seen = record_logits(engine)
    engine.generate([Request(prompt=p, params=SamplingParams(max_new_tokens=4, temperature=0))
                     for p in prompts_of([9, 12])])
    assert engine._dec.k.dtype == torch.bfloat16
    assert len(seen) == 8
    with torch.no_grad():
        for ctx, got in seen:
            full, want = model(torch.tensor([ctx]))[0, -1], fp32(torch.tensor([ctx]))[0, -1]
            assert full.dtype == torch.bfloat16
            torch.testing.assert_close(got, full.float(), atol=1e-2, rtol=0)
            assert (got - want).abs().max() < 0.05 * want.abs().max()


# ---- sampling -------------------------------------------------------------------------------------


def test_seeded_sampling_is_reproducible_and_equals_the_reference():
    model = small_model(n_kv_heads=2)
    prompts = prompts_of(LENGTHS)
    params = SamplingParams(max_new_tokens=10, temperature=1.0, top_k=40, top_p=0.9, seed=3)
    engine = Engine(model, **ENGINE)
    out = generate(model, prompts, params, engine)
    assert out == generate(model, prompts, params, engine)  # the same engine again (pages from the prefix cache)
    assert out == generate(model, prompts, params)  # a fresh engine
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
    # a stop token that some row emits as its 3rd token
    row = next(i for i, o in enumerate(free) if o[2] not in o[:2])
    stop = free[row][2]
    params = SamplingParams(max_new_tokens=12, temperature=0, stop_token_ids=[stop])
    res = Engine(model, **ENGINE).generate([Request(prompt=p, params=params) for p in prompts])
    out = [r.tokens for r in res]
    assert out[row] == free[row][:3]  # the stop token ends the row and is its last output token
    for r, f in zip(res, free):
        expect = f[: f.index(stop) + 1] if stop in f else f
        assert r.tokens == expect
        assert r.finish_reason == ("stop" if stop in f else "length")
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
    res = Engine(small_model()).generate([Request(prompt=[1, 2], params=SamplingParams(max_new_tokens=0))])
    assert (res[0].tokens, res[0].finish_reason) == ([], "length")
    # one params per prompt, or one for all; a null seed comes from torch's global generator
    with pytest.raises(ValueError, match="2 SamplingParams for 3 prompts"):
        row_params([SamplingParams()] * 2, 3)
    with pytest.raises(ValueError, match="2 SamplingParams for 3 prompts"):
        Engine(byte_model(), ByteTokenizer()).generate_text(["a"] * 3, [SamplingParams()] * 2)
    torch.manual_seed(0)
    first = row_params(SamplingParams(), 2)
    torch.manual_seed(0)
    assert row_params(SamplingParams(), 2) == first and first[1].seed == first[0].seed + 1


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
    assert Engine(byte_model(boost={tok.eos_id: 100.0}), tok).generate_text(["hi", "there"], params) == ["", ""]
    end = tok.special_id("<|end_of_dialog|>")
    engine = Engine(byte_model(boost={end: 100.0}), tok)
    assert engine.generate_text(["hi"], params) == [""]
    res = engine.generate([Request(prompt=tok.encode("hi"), params=params)])[0]
    assert (res.tokens, res.finish_reason) == ([end] * 5, "length")  # a token prompt has no default stops
    # explicit stop ids replace the defaults
    assert engine.generate_text(["hi"], SamplingParams(max_new_tokens=3, temperature=0, stop_token_ids=[]),
                                allow_special=True) == ["<|end_of_dialog|>" * 3]


def test_generate_text_never_samples_other_specials_unless_asked():
    tok = ByteTokenizer()
    pad, user = tok.pad_id, tok.special_id("<|user|>")
    engine = Engine(byte_model(vocab=300, boost={pad: 100.0, user: 90.0, 290: 200.0}), tok)
    for params in (SamplingParams(max_new_tokens=6, temperature=0), SamplingParams(max_new_tokens=6, seed=0)):
        texts = engine.generate_text(["ab", "c"], params)
        assert all("<|" not in t and t for t in texts)
    # allowed: the boosted pad wins; id 290 (beyond the tokenizer) is still never produced
    texts = engine.generate_text(["ab"], SamplingParams(max_new_tokens=3, temperature=0), allow_special=True)
    assert texts == ["<|pad|>" * 3]


def test_generate_text_streams_the_same_text():
    tok = ByteTokenizer()
    model = byte_model()
    prompts = ["héllo", "x", "x"]
    pieces: dict[int, list[str]] = {0: [], 1: [], 2: []}
    params = SamplingParams(max_new_tokens=40, temperature=1.0, seed=1)
    engine = Engine(model, tok, pool_tokens=256, page_size=8, max_batch=2)
    texts = engine.generate_text(prompts, params, on_text=lambda row, s: pieces[row].append(s))
    # the slow reference, with the same stops, suppressed ids and seeds (row i: seed + i)
    assert texts == reference_text(model, tok, prompts, params)
    assert texts[1] != texts[2]  # equal prompts, different seeds
    assert ["".join(pieces[i]) for i in range(3)] == texts
    assert all(len(pieces[i]) > 1 for i in range(3))  # streamed in pieces, not at the end


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
