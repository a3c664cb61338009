"""The engine against slow references: continuous batching, packed prefill, prefix cache, eviction,
seeded sampling, streaming, stop strings, and tool calls (including failing and hanging tools)."""

import threading
import time
from types import SimpleNamespace

import pytest
import torch
from conftest import randomize_smear
from reference import generate_reference, reference_text
from torch import nn

from lmlab.config import EngineConfig, InitConfig, ModelConfig
from lmlab.inference import (
    DecodeBatch,
    Engine,
    PagedStep,
    PagePool,
    PrefixCache,
    Request,
    Sampler,
    SamplingParams,
    Segment,
    filtered_probs,
)
from lmlab.models import build_model
from lmlab.models.transformer import cascade_attention
from lmlab.tokenizers import DEFAULT_SPECIALS, ByteTokenizer, DialogTokenizer
from lmlab.tools import CodeBlockTool

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def small_model(seed=0, **kw):
    # a large init std gives peaked, input-dependent logits: greedy paths differ from row to row
    base = dict(vocab_size=97, dim=64, n_layers=2, n_heads=4, hidden_dim=96, max_seq_len=128,
                init=InitConfig(scheme="normal", std=0.3))
    base.update(kw)
    model = build_model(ModelConfig(**base), seed=seed).eval()
    randomize_smear(model, seed)
    return model


def prompts_of(lengths, vocab=97, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


LENGTHS = [1, 40, 7, 23, 2, 31, 12, 40, 5, 17, 3, 9, 28, 1, 14, 33, 6, 19, 11, 25, 4, 37]  # 22 ragged prompts
GREEDY = SamplingParams(max_new_tokens=12, temperature=0)


def greedy_params(n):
    return [SamplingParams(max_new_tokens=4 + (i * 5) % 13, temperature=0) for i in range(n)]


def check_pool_is_whole(engine):
    cached = engine.prefix.n_pages if engine.prefix is not None else 0
    assert engine.pool.n_free + cached == engine.pool.n_pages
    assert not engine.active and not engine.waiting


# ---- continuous batching against full recompute ------------------------------------------------------


@pytest.mark.parametrize("variant", [dict(), dict(n_kv_heads=2), dict(smear_keys=3, smear_channels=True),
                                     dict(n_kv_heads=2, smear_keys=3, smear_channels=True, smear_queries=True),
                                     dict(smear_keys=3, smear_queries=True, smear_layers=[-1])],
                         ids=["mha", "gqa", "smear", "smear_queries", "smear_last_layer"])
def test_greedy_engine_equals_full_recompute_with_continuous_batching(variant):
    model = small_model(**variant)
    prompts = prompts_of(LENGTHS)
    params = greedy_params(len(prompts))
    want = generate_reference(model, prompts, params)
    # 160 slots hold ~4 of these sequences at once: requests must wait for others to finish (and some
    # get preempted); chunks of 24 tokens split the long prompts over several prefill steps
    engine = Engine(model, pool_tokens=160, page_size=8, max_batch=6, prefill_chunk=24, prefix_cache=False)
    res = engine.generate([Request(prompt=p, params=q) for p, q in zip(prompts, params)])
    assert [r.tokens for r in res] == want
    assert all(r.finish_reason == "length" for r in res)
    assert sum(len(p) + q.max_new_tokens for p, q in zip(prompts, params)) > engine.pool.n_tokens
    assert engine.stats["decode_forwards"] < sum(q.max_new_tokens for q in params)  # decode steps were batched
    check_pool_is_whole(engine)


def test_decode_batch_is_kept_across_steps_and_outputs_stay_exact():
    model = small_model(seed=3)
    prompts = prompts_of([9, 30, 4, 17, 22], seed=4)
    params = [SamplingParams(max_new_tokens=70, temperature=0)] + [SamplingParams(max_new_tokens=n, temperature=0)
                                                                    for n in (5, 40, 12, 66)]
    # the batch is allocated once (sized for every request's max_new_tokens); sequences join by copying
    # their own context in, and leave by moving the last row into their place: never a rebuild
    engine = Engine(model, pool_tokens=1024, page_size=8, max_batch=8, prefix_cache=False)
    res = engine.generate([Request(prompt=p, params=q) for p, q in zip(prompts, params)])
    assert [r.tokens for r in res] == generate_reference(model, prompts, params)
    assert engine.stats["decode_batch_builds"] == 1 < engine.stats["decode_forwards"]
    assert engine.stats["decode_batch_joins"] == len(prompts)
    check_pool_is_whole(engine)


@pytest.mark.parametrize("variant", [dict(), dict(n_kv_heads=2)], ids=["mha", "gqa"])
def test_decode_batch_joins_leaves_and_growth_equal_the_page_gather(variant):
    """The DecodeBatch fast path (rows joining, a middle row leaving, the batch growing) against the slow
    reference: the same decode step through PagedStep, which gathers every row's context from the pages."""
    model = small_model(**variant)
    pool = PagePool.for_model(model, n_tokens=512, page_size=8)
    prompts = prompts_of([13, 1, 30, 8, 21], seed=7)
    tables = [pool.alloc(6) for _ in prompts]
    for t, p in zip(tables, prompts):  # prefill every prompt into its pages
        model(torch.tensor([p]), cache=PagedStep(pool, [[Segment(t, 0, len(p))]]))
    lengths = [len(p) for p in prompts]
    dec = DecodeBatch(pool, rows=5, capacity=32)
    live = []
    for i in (0, 1, 2, 3):
        dec.add(Segment(tables[i], lengths[i], 1))
        live.append(i)
    dec.remove(1)  # the last row (sequence 3) moves into row 1
    live[1] = live.pop()
    dec.reserve(5, 48)  # grow by copying
    dec.add(Segment(tables[4], lengths[4], 1))
    live.append(4)
    assert dec.lengths == [lengths[i] for i in live]
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        tokens = torch.randint(0, 97, (len(live), 1), generator=g)
        segs = [Segment(tables[i], lengths[i], 1) for i in live]
        with torch.no_grad():
            slow = model(tokens, cache=PagedStep(pool, [[seg] for seg in segs]))
            fast = model(tokens, cache=dec.step(segs))  # writes the same keys/values to the pool again
        torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
        for i in live:
            lengths[i] += 1
    assert dec.lengths == [lengths[i] for i in live]
    with pytest.raises(ValueError, match="must be the batch's rows"):
        dec.step([Segment(tables[i], lengths[i] + 1, 1) for i in live])


@pytest.mark.parametrize("variant", [dict(), dict(n_kv_heads=2, smear_keys=2)], ids=["mha", "gqa_smear"])
def test_decode_batch_writes_decoded_keys_to_the_pool_when_a_row_leaves(variant):
    """Decode steps write the new keys/values to the batch only; a row that leaves (or is flushed) writes what it
    decoded to its pages: the pool then holds what a decode through the pages (PagedStep) writes there."""
    model = small_model(**variant)
    fast, slow = (PagePool.for_model(model, n_tokens=256, page_size=8) for _ in range(2))
    prompts = prompts_of([13, 7, 16], seed=9)
    tables = [fast.alloc(4) for _ in prompts]
    assert [slow.alloc(4) for _ in prompts] == tables
    lengths = [len(p) for p in prompts]
    with torch.no_grad():
        for pool in (fast, slow):
            for t, p in zip(tables, prompts):
                model(torch.tensor([p]), cache=PagedStep(pool, [[Segment(t, 0, len(p))]]))
        dec = DecodeBatch(fast, rows=3, capacity=32)
        for t, n in zip(tables, lengths):
            dec.add(Segment(t, n, 1))
        g = torch.Generator().manual_seed(1)
        for _ in range(5):
            tokens = torch.randint(0, 97, (3, 1), generator=g)
            segs = [Segment(t, n, 1) for t, n in zip(tables, lengths)]
            model(tokens, cache=dec.step(segs))
            model(tokens, cache=PagedStep(slow, [[seg] for seg in segs]))
            lengths = [n + 1 for n in lengths]
    assert list(fast.fields) == (["raw_keys"] if variant else [])  # what the model's modules declare, only
    stores = [(fast.k, slow.k), (fast.v, slow.v)] + [(fast.fields[f], slow.fields[f]) for f in fast.fields]
    slots = [t[p // 8] * 8 + p % 8 for t, n in zip(tables, lengths) for p in range(n - 5, n)]
    assert all(not a[:, slots].any() for a, _ in stores)  # nothing decoded reached the pool yet
    dec.remove(0)  # the row leaves: its keys reach its pages; the last row moves into row 0
    dec.flush(0)
    dec.flush(1)
    dec.flush(1)  # a second flush writes nothing new
    assert dec.lengths == [lengths[2], lengths[1]] and dec.flushed == dec.lengths
    for a, b in stores:
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_generate_and_stream_give_the_same_results():
    """generate() runs without per-token events; its results equal the stream's."""
    model = small_model(seed=2)
    prompts = prompts_of([5, 12, 3, 9], seed=3)
    reqs = [Request(prompt=p, params=SamplingParams(max_new_tokens=9, temperature=0.8, seed=i))
            for i, p in enumerate(prompts)]
    engine = Engine(model, pool_tokens=256, page_size=8, max_batch=2)
    got = engine.generate(reqs)
    events = list(engine.stream(reqs))
    streamed = sorted((e.result for e in events if e.result is not None), key=lambda r: prompts.index(r.prompt))
    assert [r.tokens for r in got] == [r.tokens for r in streamed]
    for i, r in enumerate(streamed):
        assert [t for e in events if e.index == i for t in e.tokens] == r.tokens


def test_greedy_fast_path_equals_the_sampler():
    g = torch.Generator().manual_seed(0)
    logits = torch.randint(0, 4, (16, 50), generator=g).float()  # many ties: the lowest id must win
    greedy = Sampler([SamplingParams(temperature=0)] * 16)
    assert torch.equal(greedy(logits), logits.argmax(dim=-1))


def test_pool_is_allocated_once():
    model = small_model()
    engine = Engine.from_config(model, None, EngineConfig(pool_tokens=128, page_size=8, max_batch=4))
    assert engine.pool.n_tokens == 128 and engine.max_batch == 4
    k = engine.pool.k
    res = engine.generate([Request(prompt=p, params=GREEDY) for p in prompts_of([5, 9, 30, 2, 8, 8])])
    assert engine.pool.k is k and len(res) == 6
    check_pool_is_whole(engine)


def test_pool_tokens_are_rounded_up_to_whole_pages():
    """100 slots of pages of 8 round up to 13 pages (104 slots): a request filling all 104 runs and is exact."""
    model = small_model()
    pool = PagePool.for_model(model, n_tokens=100, page_size=8)
    assert (pool.n_pages, pool.n_tokens, pool.k.shape[1]) == (13, 104, 104)
    engine = Engine(model, pool_tokens=100, page_size=8, max_batch=1, prefix_cache=False)
    assert engine.context_limit == 104
    prompt = prompts_of([90], seed=2)[0]
    params = SamplingParams(max_new_tokens=14, temperature=0)
    res = engine.generate([Request(prompt=prompt, params=params)])
    assert res[0].tokens == generate_reference(model, [prompt], params)[0]
    assert res[0].finish_reason == "length"
    check_pool_is_whole(engine)


def test_preemption_keeps_outputs_exact():
    model = small_model(seed=1)
    prompts = prompts_of([30, 30, 30, 30], seed=3)
    params = [SamplingParams(max_new_tokens=40, temperature=0)] * 4
    engine = Engine(model, pool_tokens=96, page_size=4, max_batch=4, prefill_chunk=64, prefix_cache=False)
    res = engine.generate([Request(prompt=p, params=q) for p, q in zip(prompts, params)])
    assert engine.stats["preemptions"] > 0
    assert [r.tokens for r in res] == generate_reference(model, prompts, params)
    check_pool_is_whole(engine)


# ---- packed prefill ----------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", [dict(), dict(n_kv_heads=1, qkv_bias=True), dict(smear_keys=2),
                                     dict(smear_keys=2, smear_queries=True)],
                         ids=["mha", "mqa_bias", "smear", "smear_queries"])
def test_packed_prefill_logits_equal_per_prompt_logits(variant):
    """Packed prompts must see nothing of each other nor of what the pool held before: the pool is filled with
    garbage, every prompt but one ends exactly on a page boundary, and each prompt's pages are scattered (so a
    smeared key reading 'the slot before' across a page or prompt edge would read a neighbour's or stale keys)."""
    model = small_model(**variant)
    prompts = prompts_of([13, 8, 16, 1, 24])
    pool = PagePool.for_model(model, n_tokens=160, page_size=8)
    g = torch.Generator().manual_seed(7)
    pool.k.copy_(torch.randn(pool.k.shape, generator=g) * 50)
    pool.v.copy_(torch.randn(pool.v.shape, generator=g) * 50)
    pages = pool.alloc(pool.n_pages)[::-1]  # high ids first, then dealt round-robin: no table is contiguous
    need = [-(-len(p) // 8) for p in prompts]
    tables = [[] for _ in prompts]
    while any(len(t) < n for t, n in zip(tables, need)):
        for t, n in zip(tables, need):
            if len(t) < n:
                t.append(pages.pop(0))
    assert all(b - a != 1 for t in tables for a, b in zip(t, t[1:]))
    # the first prompt goes in two chunks: 5 tokens alone, then 8 more packed with the others
    model(torch.tensor([prompts[0][:5]]), cache=PagedStep(pool, [[Segment(tables[0], 0, 5)]]))
    segs = [Segment(tables[0], 5, 8)] + [Segment(t, 0, len(p)) for t, p in zip(tables[1:], prompts[1:])]
    packed = torch.tensor([prompts[0][5:] + [t for p in prompts[1:] for t in p]])
    with torch.no_grad():
        logits = model(packed, cache=PagedStep(pool, [segs]))[0]
        alone = [model(torch.tensor([p]))[0] for p in prompts]
    torch.testing.assert_close(logits[:8], alone[0][5:], atol=1e-5, rtol=1e-5)
    col = 8
    for p, ref in zip(prompts[1:], alone[1:]):
        torch.testing.assert_close(logits[col:col + len(p)], ref, atol=1e-5, rtol=1e-5)
        col += len(p)


@pytest.mark.parametrize("variant", [dict(), dict(n_kv_heads=2), dict(smear_keys=3, smear_channels=True),
                                     dict(smear_keys=3, smear_queries=True)],
                         ids=["mha", "gqa", "smear", "smear_queries"])
def test_blockwise_packed_attention_equals_the_dense_block_diagonal_mask(variant):
    """PagedStep.blocks (one attention per segment) against the dense block-diagonal mask it stands for."""
    model = small_model(**variant)
    prompts = prompts_of([13, 1, 30, 8])
    tokens = torch.tensor([prompts[0][5:] + [t for p in prompts[1:] for t in p]])
    out = {}
    for blocks in (True, False):
        pool = PagePool.for_model(model, n_tokens=128, page_size=8)
        tables = [pool.alloc(-(-len(p) // 8)) for p in prompts]
        model(torch.tensor([prompts[0][:5]]), cache=PagedStep(pool, [[Segment(tables[0], 0, 5)]]))
        segs = [Segment(tables[0], 5, 8)] + [Segment(t, 0, len(p)) for t, p in zip(tables[1:], prompts[1:])]
        step = PagedStep(pool, [segs])
        assert step.blocks is not None and len(step.blocks) == 4 and step.blocks[0][4] is not None
        if not blocks:
            step.blocks = None
        with torch.no_grad():
            out[blocks] = model(tokens, cache=step)
    torch.testing.assert_close(out[True], out[False], atol=1e-5, rtol=1e-5)


def test_prefill_is_packed_into_one_forward():
    model = small_model()
    engine = Engine(model, pool_tokens=512, page_size=8, max_batch=8, prefill_chunk=512)
    engine.generate([Request(prompt=p, params=SamplingParams(max_new_tokens=1, temperature=0))
                     for p in prompts_of([5, 17, 3, 30])])
    assert engine.stats["prefill_forwards"] == 1 and engine.stats["prefill_tokens"] == 55


def test_a_packed_prefill_forward_holds_at_most_prefill_chunk_tokens():
    """Long prompts admitted together share one step's prefill budget: no forward feeds more than prefill_chunk
    tokens (94 prompt tokens in chunks of 16 take at least 6 forwards), every token is fed once (prompts and
    sampled tokens but the last of each request), and the outputs equal full recompute."""
    model = small_model(seed=6)
    prompts = prompts_of([30, 21, 17, 26], seed=8)
    params = greedy_params(len(prompts))
    want = generate_reference(model, prompts, params)
    shapes = []
    hook = model.register_forward_hook(lambda mod, args, out: shapes.append(tuple(args[0].shape)))
    try:
        engine = Engine(model, pool_tokens=512, page_size=8, max_batch=4, prefill_chunk=16, prefix_cache=False)
        res = engine.generate([Request(prompt=p, params=q) for p, q in zip(prompts, params)])
    finally:
        hook.remove()
    assert [r.tokens for r in res] == want
    assert engine.stats["preemptions"] == 0
    assert sum(b * t for b, t in shapes) == 94 + sum(q.max_new_tokens - 1 for q in params)
    packed = [t for b, t in shapes if b == 1 and t > 1]
    assert packed and max(packed) <= 16, shapes
    assert engine.stats["prefill_forwards"] >= 6
    check_pool_is_whole(engine)


# ---- prefix cache --------------------------------------------------------------------------------------


def shared_prefix_prompts(n, prefix_len=21, seed=0):
    g = torch.Generator().manual_seed(seed)
    systems = [torch.randint(0, 97, (prefix_len,), generator=g).tolist() for _ in range(2)]
    return [systems[i % 2] + torch.randint(0, 97, (1 + i % 7,), generator=g).tolist() for i in range(n)]


@pytest.mark.parametrize("variant", [dict(), dict(smear_keys=2), dict(smear_keys=2, smear_queries=True)],
                         ids=["mha", "smear", "smear_queries"])
def test_prefix_cache_on_and_off_give_identical_outputs(variant):
    model = small_model(**variant)
    prompts = shared_prefix_prompts(12)
    reqs = [Request(prompt=p, params=GREEDY) for p in prompts]
    off = Engine(model, pool_tokens=1024, page_size=4, max_batch=4, prefix_cache=False).generate(reqs)
    engine = Engine(model, pool_tokens=1024, page_size=4, max_batch=4, prefix_cache=True)
    on = engine.generate(reqs)
    again = engine.generate(reqs)  # every prompt's full pages are now cached
    want = generate_reference(model, prompts, GREEDY)
    assert [r.tokens for r in off] == [r.tokens for r in on] == [r.tokens for r in again] == want
    assert sum(r.cached_tokens for r in on) > 0
    assert [r.cached_tokens for r in again] == [(len(p) - 1) // 4 * 4 for p in prompts]
    assert engine.stats["prefill_tokens"] < 2 * sum(len(p) for p in prompts)
    check_pool_is_whole(engine)


def test_cascade_attention_equals_masked_attention():
    g = torch.Generator().manual_seed(0)
    b, h, s_keys, d, shared = 5, 3, 19, 8, 8
    q = torch.randn(b, h, 1, d, generator=g)
    k, v = torch.randn(b, h, s_keys, d, generator=g), torch.randn(b, h, s_keys, d, generator=g)
    k[:, :, :shared], v[:, :, :shared] = k[:1, :, :shared], v[:1, :, :shared]  # the shared prefix
    lengths = torch.tensor([9, 19, 12, 15, 10])
    mask = (torch.arange(s_keys) < lengths[:, None])[:, None, None, :]
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(cascade_attention(q, k, v, mask, shared), want)


@pytest.mark.parametrize("variant", [dict(), dict(n_kv_heads=2), dict(smear_keys=3, smear_channels=True),
                                     dict(n_kv_heads=2, smear_keys=3, smear_queries=True)],
                         ids=["mha", "gqa", "smear", "smear_queries"])
def test_decode_with_a_shared_system_prompt_uses_cascade_attention_and_stays_exact(variant):
    """Every decoding sequence starts with the same cached pages (one system prompt): decode attends them once
    for the batch. Outputs equal the full-recompute reference, on the first call (pages shared as they are
    cached) and on a second one (all cached), while rows join and leave (max_batch 4 of 10 requests)."""
    model = small_model(**variant)
    g = torch.Generator().manual_seed(3)
    system = torch.randint(0, 97, (37,), generator=g).tolist()
    prompts = [system + torch.randint(0, 97, (1 + i % 7,), generator=g).tolist() for i in range(10)]
    params = greedy_params(len(prompts))
    want = generate_reference(model, prompts, params)
    engine = Engine(model, pool_tokens=1024, page_size=4, max_batch=4, cascade_min=8)
    for _ in range(2):
        res = engine.generate([Request(prompt=p, params=q) for p, q in zip(prompts, params)])
        assert [r.tokens for r in res] == want
    assert engine.stats["cascade_forwards"] > 0.5 * engine.stats["decode_forwards"]
    check_pool_is_whole(engine)
    off = Engine(model, pool_tokens=1024, page_size=4, max_batch=4, cascade_min=0)
    assert [r.tokens for r in off.generate([Request(prompt=p, params=q) for p, q in zip(prompts, params)])] == want
    assert off.stats["cascade_forwards"] == 0


@pytest.mark.parametrize("prefill_chunk", [512, 16])  # 16: the shared prompt itself takes several steps
def test_a_burst_sharing_a_system_prompt_prefills_it_once(prefill_chunk):
    """Requests admitted together that share a prompt prefix: one prefills it, the others wait a step and take
    its pages from the prefix cache (instead of all computing it in the same forward)."""
    model = small_model()
    g = torch.Generator().manual_seed(4)
    system = torch.randint(0, 97, (40,), generator=g).tolist()
    prompts = [system + torch.randint(0, 97, (2 + i % 6,), generator=g).tolist() for i in range(9)]
    params = greedy_params(len(prompts))
    engine = Engine(model, pool_tokens=1024, page_size=4, max_batch=6, prefill_chunk=prefill_chunk)
    res = engine.generate([Request(prompt=p, params=q) for p, q in zip(prompts, params)])
    assert [r.tokens for r in res] == generate_reference(model, prompts, params)
    assert [r.cached_tokens for r in res] == [0] + [40] * 8
    assert engine.stats["prefill_tokens"] == sum(len(p) for p in prompts) - 40 * 8
    check_pool_is_whole(engine)


def test_eviction_under_a_tiny_pool_keeps_outputs_identical():
    model = small_model(seed=2)
    prompts = shared_prefix_prompts(16, prefix_len=13, seed=5) + prompts_of([20, 9, 25], seed=9)
    engine = Engine(model, pool_tokens=64, page_size=4, max_batch=3, prefill_chunk=16)
    res = engine.generate([Request(prompt=p, params=GREEDY) for p in prompts])
    assert [r.tokens for r in res] == generate_reference(model, prompts, GREEDY)
    assert engine.prefix.evicted > 0 and sum(r.cached_tokens for r in res) > 0
    check_pool_is_whole(engine)


def test_prefix_cache_lru_evicts_only_unused_leaves():
    pool = PagePool(1, 6, 2, 1, 1)
    cache = PrefixCache(pool)
    a, b = pool.alloc(3), pool.alloc(2)
    cache.insert([1, 2, 3, 4, 5, 6], a)
    cache.insert([1, 2, 9, 9], [a[0], b[1]])  # the first page is shared, b[1] new
    pool.decref(a), pool.decref(b)
    assert pool.n_free == 2 and cache.n_pages == 4
    pages, n = cache.match([1, 2, 3, 4, 7])
    assert pages == a[:2] and n == 4
    assert cache.evict(10) == 2  # a[2] and b[1]: leaves unused by anyone; a[:2] are held
    pool.decref(pages)
    assert cache.evict(10) == 2 and pool.n_free == 6 and cache.n_pages == 0


def test_prefix_cache_evicts_the_least_recently_used_leaf_first():
    """A hit refreshes a prefix: with A cached, then B, then A matched again, B is the least recently used and is
    evicted first; A goes next."""
    pool = PagePool(1, 4, 2, 1, 1)
    cache = PrefixCache(pool)
    a, b = pool.alloc(1), pool.alloc(1)
    cache.insert([1, 2], a)
    cache.insert([3, 4], b)
    pool.decref(a), pool.decref(b)  # only the cache holds them now
    pages, n = cache.match([1, 2, 5])  # A is used after B was cached
    pool.decref(pages)
    assert (pages, n) == (a, 2)
    assert cache.evict(1) == 1 and cache.n_pages == 1
    assert cache.match([3, 4, 5]) == ([], 0)  # B went
    pages, n = cache.match([1, 2, 5])
    pool.decref(pages)
    assert (pages, n) == (a, 2)  # A stayed
    assert cache.evict(1) == 1 and cache.match([1, 2, 5]) == ([], 0) and pool.n_free == 4


# ---- sampling -----------------------------------------------------------------------------------------


def test_seeded_sampling_is_reproducible_and_independent_of_batch_mates():
    model = small_model()
    prompts = prompts_of([3, 11, 25, 7, 16, 2])
    params = [SamplingParams(max_new_tokens=15, temperature=0.9, top_k=30 if i % 2 else 0,
                             top_p=0.9 if i % 3 else 1.0, min_p=0.05 * (i % 4), seed=100 + i)
              for i in range(len(prompts))]
    want = generate_reference(model, prompts, params)
    engine = Engine(model, pool_tokens=128, page_size=8, max_batch=3)
    res = engine.generate([Request(prompt=p, params=q) for p, q in zip(prompts, params)])
    assert [r.tokens for r in res] == want
    alone = Engine(model, pool_tokens=128, page_size=8).generate([Request(prompt=prompts[4], params=params[4])])
    assert alone[0].tokens == want[4]
    assert len(set(map(tuple, want))) == len(want)


@pytest.mark.parametrize("max_batch", [3, 8])  # 8 (no prefix cache): the second call's rows are the first call's
def test_suppressed_ids_per_request_equal_the_reference_across_calls(max_batch):
    """The engine masks suppressed ids itself (a mask kept while the decode rows stay the same sequences): each
    request's own set, greedy or sampled, through continuous batching and a second call on the same engine
    whose requests reuse the first call's indices with other sets."""
    model = small_model()
    prompts = prompts_of([3, 11, 25, 7, 16, 2, 9])
    engine = Engine(model, pool_tokens=256, page_size=8, max_batch=max_batch, prefix_cache=max_batch < 8)
    for call in range(2):
        params = [SamplingParams(max_new_tokens=10, temperature=0.0 if (i + call) % 2 else 0.8, seed=7 + i,
                                 suppress_token_ids=list(range((i * 13 + call * 40) % 97, 97, 2 + i % 3))
                                 if (i + call) % 3 else ())
                  for i in range(len(prompts))]
        want = generate_reference(model, prompts, params)
        res = engine.generate([Request(prompt=p, params=q) for p, q in zip(prompts, params)])
        assert [r.tokens for r in res] == want
        for r, q in zip(res, params):
            assert not set(r.tokens) & set(q.suppress_token_ids)
    with pytest.raises(ValueError, match="request 0: suppress_token_ids covers every token id"):
        every = SamplingParams(max_new_tokens=4, suppress_token_ids=list(range(97)))
        engine.generate([Request(prompt=[1], params=every)])


def test_min_p_keeps_ids_at_least_min_p_times_the_top_probability():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.12, 0.08]]))
    probs = filtered_probs(logits, 1.0, 0, 1.0, min_p=0.2)  # keeps p >= 0.1
    torch.testing.assert_close(probs, torch.tensor([[0.5, 0.3, 0.12, 0.0]]) / 0.92)
    assert filtered_probs(logits, 1.0, 0, 1.0, min_p=1.0)[0].tolist() == [1.0, 0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="min_p"):
        SamplingParams(min_p=1.5)


def test_stream_events_add_up_to_the_results():
    model = small_model()
    engine = Engine(model, pool_tokens=128, page_size=8, max_batch=2)
    reqs = [Request(prompt=p, params=GREEDY, id=f"r{i}") for i, p in enumerate(prompts_of([4, 10, 6]))]
    got, results = {0: [], 1: [], 2: []}, {}
    for ev in engine.stream(reqs):
        got[ev.index] += ev.tokens
        if ev.result is not None:
            results[ev.index] = ev.result
    assert {i: r.tokens for i, r in results.items()} == got
    assert [results[i].tokens for i in range(3)] == generate_reference(model, [r.prompt for r in reqs], GREEDY)
    assert [results[i].id for i in range(3)] == ["r0", "r1", "r2"]
    for ev in engine.stream(reqs):  # leaving a stream early gives every page back
        if ev.result is not None:
            break
    check_pool_is_whole(engine)
    assert [r.tokens for r in engine.generate(reqs)] == [results[i].tokens for i in range(3)]


def test_stop_tokens_and_bad_requests():
    model = small_model()
    prompts = prompts_of([5, 8])
    free = generate_reference(model, prompts, GREEDY)
    stop = free[0][3]
    params = SamplingParams(max_new_tokens=12, temperature=0, stop_token_ids=[stop])
    res = Engine(model, pool_tokens=128).generate([Request(prompt=p, params=params) for p in prompts])
    assert res[0].tokens == free[0][:free[0].index(stop) + 1] and res[0].finish_reason == "stop"
    engine = Engine(model, pool_tokens=64, page_size=8)
    with pytest.raises(ValueError, match="exceed"):
        engine.generate([Request(prompt=[1] * 60, params=GREEDY)])
    with pytest.raises(ValueError, match="outside the model vocabulary"):
        engine.generate([[1, 200]])
    with pytest.raises(ValueError, match="empty"):
        engine.generate([[]])


# ---- tools ------------------------------------------------------------------------------------------


class ScriptedModel(nn.Module):
    """A stand-in model that writes scripted assistant messages, chosen by the user's message.

    It stores each token id as its own key in the cache, so every query reads its whole context back
    through the engine's paged cache; the next token is the script's next token for that context.
    """

    def __init__(self, dtok, scripts):
        super().__init__()
        tok = dtok.tokenizer
        self.cfg = SimpleNamespace(vocab_size=tok.vocab_size, n_layers=1, n_heads=1, n_kv_heads=1, dim=1,
                                   max_seq_len=1024)
        self.dummy = nn.Parameter(torch.zeros(1))
        # turn headers: one begin token (lmlab format) or <|im_start|>role\n (chatml); user / assistant: their first
        # token, whose presence in a context tells that a dialog has begun
        self.u_head, self.a_head = dtok.header("user"), dtok.header("assistant")
        self.tok, self.user, self.assistant = tok, self.u_head[0], self.a_head[0]
        self.scripts = {q: [tok.encode(text) + [tok.token_id(end)] for text, end in turns]
                        for q, turns in scripts.items()}

    def next_token(self, ctx):
        a = [i + len(self.a_head) for i in _starts(ctx, self.a_head)]  # where each assistant message starts
        u = _starts(ctx, self.u_head)
        if not a or not u:
            return 0
        question = self.tok.decode(ctx[u[0] + len(self.u_head):a[0] - len(self.a_head)]).removesuffix("<|im_end|>\n")
        turn = self.scripts[question][len(a) - 1]
        i = len(ctx) - a[-1]
        return turn[i] if i < len(turn) else 0  # past the message: a prefilled tool answer, logits unused

    def forward(self, tokens, cache):
        k = tokens.float()[:, None, :, None]
        keys, _ = cache.update(0, k, k)
        logits = torch.zeros(*tokens.shape, self.cfg.vocab_size)
        for b in range(tokens.shape[0]):
            for t in range(tokens.shape[1]):
                ctx = keys[b, 0, cache.mask[b, 0, t], 0].long().tolist()
                if self.assistant in ctx and self.user in ctx:
                    logits[b, t, self.next_token(ctx)] = 1.0
        return logits


def _starts(ctx, head):
    """Positions where the token list ``head`` occurs in ``ctx``."""
    n = len(head)
    return [i for i in range(len(ctx) - n + 1) if ctx[i] == head[0] and ctx[i:i + n] == head]


CALL = "Let me look.\n```sql\nSELECT age FROM people WHERE name = 'Ada'\n```"
SCRIPTS = {
    "How old is Ada?": [(CALL, "<|database|>"), ("Ada is 36.", "<|end_of_dialog|>")],
    "Hi": [("Hello there, nice to meet you.", "<|end_of_dialog|>")],
}
# the same dialogs in the chatml format: every assistant turn ends with <|im_end|>; the call is read from the turn
CHATML_SCRIPTS = {q: [(text, "<|im_end|>") for text, _ in turns] for q, turns in SCRIPTS.items()}


def chatml_dialog_tokenizer(system_prompt=""):
    """The chatml format over bytes: the dialog specials plus <|im_start|> / <|im_end|>."""
    return DialogTokenizer(ByteTokenizer([*DEFAULT_SPECIALS, "<|im_start|>", "<|im_end|>"]), "chatml", system_prompt)


def tool_engine(fn, timeout=5.0, chat_format="lmlab"):
    dtok = DialogTokenizer(ByteTokenizer()) if chat_format == "lmlab" else chatml_dialog_tokenizer()
    model = ScriptedModel(dtok, SCRIPTS if chat_format == "lmlab" else CHATML_SCRIPTS)
    return Engine(model, dtok, pool_tokens=512, page_size=8, max_batch=4, tools=[CodeBlockTool(fn)],
                  tool_timeout=timeout)


def ask(question):
    return Request(dialog=[{"source": "user", "content": question}], params=SamplingParams(max_new_tokens=200,
                                                                                             temperature=0))


@pytest.mark.parametrize("chat_format", ["lmlab", "chatml"])
def test_a_tool_call_yields_call_answer_and_continuation(chat_format):
    """A turn that holds a call gets the tool's answer and a new assistant turn; one that holds none ends the
    dialog (chatml: both end with <|im_end|>, the call is read from the turn)."""
    calls = []

    def db(sql):
        calls.append(sql)
        return "36"

    engine = tool_engine(db, chat_format=chat_format)
    res = engine.generate([ask("How old is Ada?"), ask("Hi")])
    assert calls == ["SELECT age FROM people WHERE name = 'Ada'"]
    assert res[0].dialog == [
        {"source": "user", "content": "How old is Ada?"},
        {"source": "assistant", "content": CALL},
        {"source": "database", "content": "36"},
        {"source": "assistant", "content": "Ada is 36."},
    ]
    assert res[0].finish_reason == "stop" and res[0].tool_calls == [(calls[0], "36")]
    assert res[1].dialog[-1] == {"source": "assistant", "content": "Hello there, nice to meet you."}
    check_pool_is_whole(engine)


@pytest.mark.parametrize("chat_format", ["lmlab", "chatml"])
def test_a_dialog_generated_past_its_end_keeps_the_dialog_up_to_the_end(chat_format):
    """With stop tokens off, a dialog request runs on past the end of the assistant's turn: the result's dialog is
    the dialog up to that end (the tokens after it are in ``tokens`` only)."""
    engine = tool_engine(lambda sql: "36", chat_format=chat_format)
    req = Request(dialog=[{"source": "user", "content": "Hi"}],
                  params=SamplingParams(max_new_tokens=60, temperature=0, stop_token_ids=()))
    (res,) = engine.generate([req])
    assert res.finish_reason == "length" and len(res.tokens) == 60
    assert res.dialog == [{"source": "user", "content": "Hi"},
                          {"source": "assistant", "content": "Hello there, nice to meet you."}]


def test_a_raising_tool_and_a_hanging_tool_give_error_answers_and_the_batch_completes():
    def boom(sql):
        raise RuntimeError("no such table: people")

    res = tool_engine(boom).generate([ask("How old is Ada?"), ask("Hi")])
    assert res[0].dialog[2] == {"source": "database", "content": "error: RuntimeError: no such table: people"}
    assert res[0].dialog[3]["content"] == "Ada is 36." and res[1].finish_reason == "stop"

    release = threading.Event()
    engine = tool_engine(lambda sql: release.wait(30) and "36", timeout=0.3)
    order, t0 = [], time.monotonic()
    for ev in engine.stream([ask("How old is Ada?"), ask("Hi"), ask("Hi")]):
        if ev.result is not None:
            order.append(ev.index)
            if ev.index == 0:
                hung = ev.result
    release.set()
    assert time.monotonic() - t0 < 10
    assert order[-1] == 0  # the others kept decoding while the tool hung
    assert hung.dialog[2]["content"].startswith("error: the tool did not answer within 0.3 s")
    assert hung.dialog[3]["content"] == "Ada is 36."
    check_pool_is_whole(engine)


def test_stop_strings_cut_the_text():
    engine = tool_engine(lambda sql: "36")
    req = ask("Hi")
    req.stop_strings = ("nice",)
    res = engine.generate([req])[0]
    assert res.finish_reason == "stop_string" and res.text == "Hello there, "


def test_engine_text_equals_the_reference_text_and_streams_it():
    tok = ByteTokenizer()
    model = small_model(vocab_size=tok.vocab_size, seed=4)
    prompts = ["To be", "Or not to", "A"]
    engine = Engine(model, tok, pool_tokens=256, page_size=8, max_batch=2)
    for params in (SamplingParams(max_new_tokens=20, temperature=0), SamplingParams(max_new_tokens=20, seed=3)):
        pieces = {0: "", 1: "", 2: ""}

        def on_text(row, piece, pieces=pieces):
            pieces[row] += piece

        want = reference_text(model, tok, prompts, params)
        assert engine.generate_text(prompts, params, on_text=on_text) == want
        assert [pieces[i] for i in range(3)] == want


# ---- the real model through every path at once ------------------------------------------------------


def test_a_dialogs_next_turn_through_the_prefix_cache_equals_full_recompute():
    """Turn 2 = turn 1's prompt + the model's own answer + a new user message: the cached pages of turn 1 must
    hold only tokens whose keys were computed (the last sampled token of an answer never went through a forward).
    Several prompt + answer lengths end exactly on a page boundary."""
    model = small_model(seed=2)
    engine = Engine(model, pool_tokens=1024, page_size=4, max_batch=3, prefix_cache=True)
    firsts = prompts_of([5, 9, 14, 3, 8, 11, 6, 2], seed=5)
    params = [SamplingParams(max_new_tokens=n, temperature=0) for n in (3, 7, 2, 5, 8, 1, 6, 4)]
    assert sum((len(p) + q.max_new_tokens) % 4 == 0 for p, q in zip(firsts, params)) >= 4
    turn1 = engine.generate([Request(prompt=p, params=q) for p, q in zip(firsts, params)])
    assert [r.tokens for r in turn1] == generate_reference(model, firsts, params)
    seconds = [p + r.tokens + u for p, r, u in zip(firsts, turn1, prompts_of([3, 1, 6, 2, 5, 4, 2, 7], seed=6))]
    turn2 = engine.generate([Request(prompt=p, params=GREEDY) for p in seconds])
    assert [r.tokens for r in turn2] == generate_reference(model, seconds, GREEDY)
    # the history's full pages came from the cache (what was computed of it: all but the last answer token)
    assert [r.cached_tokens for r in turn2] == [(len(p) + len(r.tokens) - 1) // 4 * 4 for p, r in zip(firsts, turn1)]
    check_pool_is_whole(engine)


class EchoTool:
    """A deterministic tool for a real model's arbitrary messages: the call is the message's last 3 characters."""

    trigger = "<|database|>"

    def extract(self, message):
        return message[-3:]

    def __call__(self, call):
        return f"[{call[::-1]}]"


def reference_dialog(model, dtok, prompt, req, tool, limit):
    """What the engine does for a request with a greedy model, stop tokens, stop strings and a tool, computed
    slowly: the whole sequence through the model at every step, no cache, no batching."""
    tok = dtok.tokenizer
    trigger, begin = tok.special_id(tool.trigger), dtok.begin_id("assistant")
    seq, sampled, calls = list(prompt), 0, []
    while True:
        with torch.no_grad():
            t = int(model(torch.tensor([seq], device=model.output.weight.device))[0, -1].argmax())
        seq.append(t)
        sampled += 1
        if t in STOPS:
            return seq[len(prompt):], "stop", calls
        if any(s in tok.decode(seq[len(prompt):]) for s in req.stop_strings):
            return seq[len(prompt):], "stop_string", calls
        if sampled >= req.params.max_new_tokens or len(seq) >= model.cfg.max_seq_len:
            return seq[len(prompt):], "length", calls
        if t == trigger:
            start = max(i for i, x in enumerate(seq[:-1]) if x == begin) + 1
            call = tool.extract(tok.decode(seq[start:-1]))
            answer = tool(call)
            calls.append((call, answer))
            added = tok.encode(answer) + [begin]
            room = limit - len(seq)
            seq += added[:max(room, 0)]
            if len(added) >= room:
                return seq[len(prompt):], "length", calls


STOPS = (ByteTokenizer().special_id("<|end_of_dialog|>"), ByteTokenizer().special_id("<|eos|>"))


def two_turns_equal_the_reference(model, dtok, engine, tool, questions):
    """Each question as a dialog, then a second user turn on every result (prefix-cached): every result equals the
    full-recompute reference (tokens, finish reason, tool calls). Odd requests stop at the string "|"."""
    tok = dtok.tokenizer

    def request(i, budget, dialog=None, prompt=None):
        n = len(dtok.encode_prompt(dialog) if dialog else prompt)
        params = SamplingParams(max_new_tokens=min(budget, 192 - n), temperature=0, stop_token_ids=STOPS)
        return Request(dialog=dialog, prompt=prompt, params=params, stop_strings=("|",) if i % 2 else ())

    turn1 = [request(i, 40, dialog=[{"source": "user", "content": q}]) for i, q in enumerate(questions)]
    res1 = engine.generate(turn1)
    user = [dtok.begin_id("user")] + tok.encode("And then?") + [dtok.begin_id("assistant")]
    turn2 = [request(i, 30, prompt=r.prompt + r.tokens + user) for i, r in enumerate(res1)]
    res2 = engine.generate(turn2)
    for req, res in zip(turn1 + turn2, res1 + res2):
        prompt = dtok.encode_prompt(req.dialog) if req.dialog else req.prompt
        tokens, reason, calls = reference_dialog(model, dtok, prompt, req, tool, engine.context_limit)
        assert (res.tokens, res.finish_reason, res.tool_calls) == (tokens, reason, calls)
    return res1, res2


def test_real_model_with_tools_stop_strings_preemption_and_prefix_cache_equals_full_recompute():
    """Two turns of six dialogs (the second fed as tokens: history + the model's own answer + a new user turn,
    since random bytes do not survive a text round trip) with a tool, stop strings, stop tokens, a pool small
    enough to preempt and the prefix cache, against the slow reference."""
    dtok = DialogTokenizer(ByteTokenizer())
    tok = dtok.tokenizer
    model = small_model(vocab_size=tok.vocab_size, seed=5, max_seq_len=256)
    with torch.no_grad():  # the model now emits the tool's trigger where it would have written 'u' (a frequent id)
        w = model.output.weight
        trig = tok.special_id(EchoTool.trigger)
        w[[ord("u"), trig]] = w[[trig, ord("u")]]
    tool = EchoTool()
    engine = Engine(model, dtok, pool_tokens=320, page_size=8, max_batch=6, tools=[tool])
    questions = ["How old is Ada?", "Where does Bob live?", "Hi", "What does Carol do?", "Who is Dan?", "Eve?"]
    res1, res2 = two_turns_equal_the_reference(model, dtok, engine, tool, questions)
    reasons = [r.finish_reason for r in res1 + res2]
    assert {"stop_string", "length", "stop"} <= set(reasons), reasons  # every way to end was taken
    assert sum(len(r.tool_calls) for r in res1 + res2) >= 3
    assert engine.stats["preemptions"] > 0
    from_cache = [r2.cached_tokens >= len(r1.prompt) for r1, r2 in zip(res1, res2)]
    assert sum(from_cache) >= 3, [r.cached_tokens for r in res2]  # their history came from the cache
    check_pool_is_whole(engine)


def test_a_hung_tool_call_does_not_hold_back_the_next_ones():
    """Tool calls run on shared worker threads: while one call hangs, the others still run at once (served in
    seconds with their real answers, not after the hung call or as timeouts)."""
    release, first, lock = threading.Event(), [], threading.Lock()

    def db(sql):
        with lock:
            hang = not first
            first.append(1)
        if hang:
            release.wait(20)
        return "36"

    engine = tool_engine(db, timeout=15.0)
    early, t0 = [], time.monotonic()
    for ev in engine.stream([ask("How old is Ada?")] * 3):
        if ev.result is not None and not release.is_set():
            early.append(ev.result)
            if len(early) == 2:
                release.set()  # the two other questions are answered: let the hung call go
    assert time.monotonic() - t0 < 10
    assert [r.tool_calls[0][1] for r in early] == ["36", "36"]
    assert all(r.dialog[3]["content"] == "Ada is 36." for r in early)
    check_pool_is_whole(engine)


def test_ids_past_the_tokenizers_vocabulary_are_never_sampled():
    """A model whose embedding is padded past its tokenizer (vocab 300 over the byte tokenizer's 264): the rows the
    tokenizer cannot decode are suppressed for every request that will be decoded, even where the model prefers
    them."""
    model = build_model(ModelConfig(dim=32, n_layers=1, n_heads=2, max_seq_len=64, vocab_size=300), seed=0).eval()
    with torch.no_grad():
        model.output.weight[264:] = model.output.weight[:264].abs().max() * 50  # the padding rows would win
    engine = Engine(model, ByteTokenizer(), pool_tokens=256, page_size=8, max_batch=2)
    res = engine.generate([Request(dialog=[{"source": "user", "content": "hi"}], params=GREEDY),
                           Request(prompt=[104, 105], params=GREEDY)])
    for r in res:
        assert r.tokens and max(r.tokens) < 264 and r.text is not None
