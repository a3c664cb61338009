"""The engine serving recurrent models (state slots instead of / beside KV pages; prefix cache by state snapshots)
against the slow reference: the full forward of prompt + generated tokens without a cache.

Models: a small gated linear recurrence written here (``ToyMixer``, the recurrent-mixer interface of
:mod:`lmlab.models.recurrent` with an exact sequential loop), registered as mixer ``toy``, and the library's real
mixers that import; each alone and in a hybrid with attention."""


import pytest
import torch
import torch.nn.functional as F
from test_engine import EchoTool, ask, two_turns_equal_the_reference
from torch import nn

from lmlab.config import InitConfig, ModelConfig, RecurrentConfig
from lmlab.inference import Engine, Request, SamplingParams
from lmlab.inference.pool import StatePool
from lmlab.models import build_model
from lmlab.models.recurrent import RECURRENT_MIXERS, causal_conv1d, conv_step
from lmlab.tokenizers import ByteTokenizer, DialogTokenizer
from lmlab.tools import CodeBlockTool

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


class ToyMixer(nn.Module):
    """A gated diagonal linear recurrence after a causal convolution of width 3: ``h = a * h + (1 - a) * u``;
    its state is two tensors (``h`` and the convolution's window). The forward is a plain loop over time."""

    def __init__(self, cfg, layer_id=0):
        super().__init__()
        self.layer_id, self.inner = layer_id, 2 * cfg.dim
        self.w_in = nn.Linear(cfg.dim, 2 * self.inner, bias=False)
        self.conv = nn.Parameter(torch.empty(self.inner, 3))
        self.w_out = nn.Linear(self.inner, cfg.dim, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, in_std=0.02, out_std=0.02, generator=None):
        nn.init.normal_(self.w_in.weight, 0.0, in_std, generator=generator)
        nn.init.normal_(self.conv, 0.0, 0.5, generator=generator)
        nn.init.normal_(self.w_out.weight, 0.0, out_std, generator=generator)

    def init_state(self, batch, device=None, dtype=torch.float32):
        return {"h": torch.zeros(batch, self.inner, device=device, dtype=dtype),
                "conv": torch.zeros(batch, self.inner, 2, device=device, dtype=dtype)}

    def num_state_elements(self):
        return 3 * self.inner

    def flops_per_token(self):
        return 2 * (self.w_in.weight.numel() + self.w_out.weight.numel()) + 10 * self.inner

    def forward(self, x, resets=None, state=None):
        state = state if state is not None else self.init_state(x.shape[0], x.device, x.dtype)
        u, g = self.w_in(x).chunk(2, dim=-1)
        u, conv = causal_conv1d(u, self.conv, None, resets, state["conv"])
        a, h, ys = torch.sigmoid(g), state["h"], []
        for t in range(x.shape[1]):
            if resets is not None:
                h = h * (~resets[:, t, None]).to(h.dtype)
            h = a[:, t] * h + (1 - a[:, t]) * u[:, t]
            ys.append(h)
        return self.w_out(torch.stack(ys, 1) * F.silu(g)), {"h": h, "conv": conv}

    def step(self, x, state):
        u, g = self.w_in(x).chunk(2, dim=-1)
        u, conv = conv_step(u, self.conv, None, state["conv"])
        a = torch.sigmoid(g)
        h = a * state["h"] + (1 - a) * u
        return self.w_out(h * F.silu(g)), {"h": h, "conv": conv}


@pytest.fixture(autouse=True)
def toy_mixer(monkeypatch):
    monkeypatch.setitem(RECURRENT_MIXERS, "toy", f"{__name__}:ToyMixer")


REAL = list(RECURRENT_MIXERS)  # the real mixers (the toy one is registered by the fixture above)
MIXERS = ["toy"] + REAL
STACKS = [[m] for m in MIXERS] + [[m, "attention"] for m in MIXERS]  # recurrent only, and hybrids
STACK_IDS = ["-".join(s) for s in STACKS]


def model_of(layer_mixers, seed=0, **kw):
    base = dict(vocab_size=97, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_seq_len=128,
                layer_mixers=list(layer_mixers), init=InitConfig(scheme="normal", std=0.3))
    base["recurrent"] = RecurrentConfig(head_dim=8, state_dim=8, chunk_size=8)
    base.update(kw)
    return build_model(ModelConfig(**base), seed=seed).eval()


def prompts_of(lengths, vocab=97, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def greedy_params(n, base=4):
    return [SamplingParams(max_new_tokens=base + (i * 5) % 11, temperature=0) for i in range(n)]


class Recorder:
    """Wraps ``engine._sample`` to keep the logits each sequence sampled from (in order)."""

    def __init__(self, engine):
        self.logits, sample = {}, engine._sample

        def wrapped(items, logits, events):
            for s, row in zip(items, logits):
                self.logits.setdefault(s.index, []).append(row.clone())
            sample(items, logits, events)

        engine._sample = wrapped


@torch.no_grad()
def check_against_recompute(model, prompts, results, recorder=None):
    """Each result's greedy tokens are the argmax of the full forward (no cache) of prompt + tokens at each step;
    the engine's logits (when recorded) equal that forward's."""
    for i, (p, r) in enumerate(zip(prompts, results)):
        full = model(torch.tensor([p + r.tokens]))[0, len(p) - 1:-1]
        assert full.argmax(-1).tolist() == r.tokens, (i, len(p))
        if recorder is not None:
            torch.testing.assert_close(torch.stack(recorder.logits[i]), full, atol=2e-4, rtol=2e-4)


def check_whole(engine):
    cached = engine.prefix.n_pages if engine.prefix is not None else 0
    assert engine.pool.n_free + cached == engine.pool.n_pages
    assert not engine.active and not engine.waiting
    if engine.states is not None:
        assert engine.states.n_free == engine.states.n_slots


LENGTHS = [1, 40, 7, 23, 2, 31, 12, 40, 5, 17, 3, 9, 28, 14]


# ---- engine == full recompute --------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix_cache", [False, True], ids=["no_prefix", "prefix"])
@pytest.mark.parametrize("stack", STACKS, ids=STACK_IDS)
def test_engine_equals_full_recompute(stack, prefix_cache):
    """Ragged prompts batched together (more than max_batch: sequences join as others finish), prompts longer
    than prefill_chunk (chunked prefill continuing from the slot's state), greedy tokens and logits at every step."""
    model = model_of(stack)
    prompts = prompts_of(LENGTHS)
    params = greedy_params(len(prompts))
    engine = Engine(model, pool_tokens=2048, page_size=8, max_batch=5, prefill_chunk=16, prefix_cache=prefix_cache)
    rec = Recorder(engine)
    res = engine.generate([Request(prompt=p, params=q) for p, q in zip(prompts, params)])
    assert [len(r.tokens) for r in res] == [q.max_new_tokens for q in params]
    check_against_recompute(model, prompts, res, rec)
    assert engine.stats["decode_forwards"] < sum(q.max_new_tokens for q in params)  # decode steps were batched
    check_whole(engine)


def test_a_model_without_attention_gets_no_key_value_memory():
    rec = model_of(["toy"])
    engine = Engine(rec, pool_tokens=4096, page_size=16, max_batch=4)
    assert engine.pool.k.numel() == 0 and engine.pool.v.numel() == 0
    assert engine.states.n_slots == 4 and engine.states.n_snapshots == engine.pool.n_pages  # one snapshot per page
    assert set(engine.states.slots) == {0, 1}
    hybrid = Engine(model_of(["toy", "attention"], n_layers=4), pool_tokens=256, page_size=16, max_batch=4,
                    prefix_cache=False)
    assert hybrid.pool.k.shape[0] == 2 and hybrid.pool.kv_layers == [1, 3]  # keys/values of attention layers only
    assert set(hybrid.states.slots) == {0, 2} and hybrid.states.n_snapshots == 0
    res = hybrid.generate([Request(prompt=p, params=q) for p, q in zip(prompts_of([9, 20, 3]), greedy_params(3))])
    check_against_recompute(hybrid.runner.model, prompts_of([9, 20, 3]), res)
    assert rec.recurrent and not Engine(model_of(["attention"]), pool_tokens=64).states  # plain Llama: no slots


def test_state_pool_snapshots_and_loads_rows():
    pool = StatePool({0: {"h": ((3,), torch.float32)}, 2: {"h": ((2, 2), torch.float64)}}, n_slots=3, n_snapshots=4)
    slots = [pool.alloc() for _ in range(3)]
    assert slots == [2, 1, 0] or sorted(slots) == [0, 1, 2]
    with pytest.raises(RuntimeError, match="slots are taken"):
        pool.alloc()
    view = pool.view([2, 0])
    view.set(0, {"h": torch.tensor([[1.0, 2, 3], [4, 5, 6]])})
    view.set(2, {"h": torch.ones(2, 2, 2, dtype=torch.float64)})
    pool.save([2, 0], [3, 1])  # slot 2 -> page 3, slot 0 -> page 1
    pool.load([1, 0], [3, -1])  # slot 1 <- page 3; slot 0 <- zeros
    assert pool.slots[0]["h"].tolist() == [[0, 0, 0], [1, 2, 3], [1, 2, 3]]
    assert pool.view([1]).get(2)["h"].dtype == torch.float64
    with pytest.raises(ValueError, match="init_state"):
        view.set(0, {"x": torch.zeros(2, 3)})
    pool.free(1)
    with pytest.raises(RuntimeError, match="not taken"):
        pool.free(1)


# ---- prefix cache by state snapshots ------------------------------------------------------------------------


def dialog_tree(seed=0):
    """A shared system prompt; branches of it; continuations of branches (a dialog tree); page size 4."""
    g = torch.Generator().manual_seed(seed)

    def r(n):
        return torch.randint(0, 97, (n,), generator=g).tolist()

    system = r(21)
    branches = [system + r(n) for n in (3, 8, 1, 11)]
    return [system + r(5)] + branches + [b + r(n) for b, n in zip(branches, (6, 2, 9, 4))] + [system]


@pytest.mark.parametrize("stack", STACKS, ids=STACK_IDS)
def test_prefix_cache_on_equals_off_on_a_dialog_tree(stack):
    model = model_of(stack, seed=1)
    prompts = dialog_tree()
    params = greedy_params(len(prompts), base=3)
    reqs = [Request(prompt=p, params=q) for p, q in zip(prompts, params)]
    off = Engine(model, pool_tokens=1024, page_size=4, max_batch=3, prefill_chunk=12, prefix_cache=False)
    off_res = off.generate(reqs)
    engine = Engine(model, pool_tokens=1024, page_size=4, max_batch=3, prefill_chunk=12, prefix_cache=True)
    rec = Recorder(engine)
    on = engine.generate(reqs)
    check_against_recompute(model, prompts, on, rec)
    assert [r.tokens for r in on] == [r.tokens for r in off_res]
    assert sum(r.cached_tokens for r in on) >= 20 * 8  # branches restarted from the system prompt's snapshot
    again = engine.generate(reqs)  # every prompt's full pages are cached now, with their snapshots
    assert [r.tokens for r in again] == [r.tokens for r in on]
    assert [r.cached_tokens for r in again] == [(len(p) - 1) // 4 * 4 for p in prompts]
    # the next turn of each dialog: history (prompt + the model's answer) + a new user message
    turn2 = [p + r.tokens + u for p, r, u in zip(prompts, on, prompts_of([2, 5, 1, 3, 4, 2, 6, 1, 3, 2], seed=8))]
    params2 = greedy_params(len(turn2), base=2)
    res2 = engine.generate([Request(prompt=p, params=q) for p, q in zip(turn2, params2)])
    check_against_recompute(model, turn2, res2)
    assert [r.cached_tokens for r in res2] == [(len(p) + len(r.tokens) - 1) // 4 * 4 for p, r in zip(prompts, on)]
    check_whole(engine)


@pytest.mark.parametrize("prefix_cache", [False, True], ids=["no_prefix", "prefix"])
@pytest.mark.parametrize("stack", [["toy"], ["toy", "attention"]] + [[REAL[0]]] * bool(REAL),
                         ids=["toy", "toy-attention"] + REAL[:1])
def test_preemption_and_eviction_under_a_tiny_pool(stack, prefix_cache):
    """A pool of 96 tokens for four sequences of 70: sequences are preempted (slot freed, recomputed from their
    tokens or from a snapshot) and cached pages evicted (their snapshots with them); outputs stay exact."""
    model = model_of(stack, seed=2)
    prompts = prompts_of([30, 30, 26, 30], seed=3) + dialog_tree(seed=4)[:4]
    params = [SamplingParams(max_new_tokens=40, temperature=0)] * 4 + greedy_params(4)
    engine = Engine(model, pool_tokens=96, page_size=4, max_batch=4, prefill_chunk=20, prefix_cache=prefix_cache)
    rec = Recorder(engine)
    res = engine.generate([Request(prompt=p, params=q) for p, q in zip(prompts, params)])
    assert engine.stats["preemptions"] > 0
    if prefix_cache:
        assert engine.prefix.evicted > 0
    check_against_recompute(model, prompts, res, rec)
    check_whole(engine)


# ---- tool calls ----------------------------------------------------------------------------------------------


class ContextState(nn.Module):
    """A 'recurrent mixer' whose state is the whole context so far (token ids, and a count): the scripted model's
    only memory, so every token it writes depends on the states the engine keeps (slots, snapshots)."""

    kind = "scripted"

    def __init__(self, n):
        super().__init__()
        self.n = n

    def init_state(self, batch, device=None, dtype=torch.float32):
        return {"ids": torch.zeros(batch, self.n, dtype=torch.long, device=device),
                "len": torch.zeros(batch, dtype=torch.long, device=device)}


class ScriptedRecurrentModel(nn.Module):
    """test_engine's ScriptedModel with a recurrent state instead of a KV cache: it writes the scripted assistant
    messages of the user's question, reading the context back from its state."""

    def __init__(self, dtok, scripts):
        super().__init__()
        from test_engine import ScriptedModel

        self.script = ScriptedModel(dtok, scripts)
        self.cfg = self.script.cfg
        self.cfg.n_heads = 1
        block = nn.Module()
        block.kind, block.mixer = "scripted", ContextState(1024)
        self.layers = nn.ModuleList([block])
        self.recurrent = True

    def forward(self, tokens, cache):
        state = cache.recurrent_state(0)
        ids, n = state["ids"].clone(), state["len"].clone()
        logits = torch.zeros(*tokens.shape, self.cfg.vocab_size)
        s = self.script
        for b in range(tokens.shape[0]):
            for t in range(tokens.shape[1]):
                ids[b, n[b]] = tokens[b, t]
                n[b] += 1
                ctx = ids[b, :n[b]].tolist()
                if s.assistant in ctx and s.user in ctx:
                    logits[b, t, s.next_token(ctx)] = 1.0
        cache.set_recurrent_state(0, {"ids": ids, "len": n})
        return logits


@pytest.mark.parametrize("prefix_cache", [False, True], ids=["no_prefix", "prefix"])
def test_a_tool_call_on_a_recurrent_state(prefix_cache):
    """The tool's answer is prefilled onto the sequence's state; the continuation reads it from there."""
    from test_engine import CALL, SCRIPTS

    calls = []

    def db(sql):
        calls.append(sql)
        return "36"

    dtok = DialogTokenizer(ByteTokenizer())
    engine = Engine(ScriptedRecurrentModel(dtok, SCRIPTS), dtok, pool_tokens=512, page_size=8, max_batch=4,
                    tools=[CodeBlockTool(db)], prefix_cache=prefix_cache)
    assert engine.pool.k.numel() == 0
    for _ in range(2):  # the second time through the prefix cache's snapshots (when on)
        res = engine.generate([ask("How old is Ada?"), ask("Hi"), ask("How old is Ada?")])
        for r in (res[0], res[2]):
            assert r.dialog[1:] == [{"source": "assistant", "content": CALL}, {"source": "database", "content": "36"},
                                    {"source": "assistant", "content": "Ada is 36."}]
            assert r.finish_reason == "stop"
        assert res[1].dialog[-1] == {"source": "assistant", "content": "Hello there, nice to meet you."}
        check_whole(engine)
    assert calls == ["SELECT age FROM people WHERE name = 'Ada'"] * 4
    assert not prefix_cache or res[0].cached_tokens > 0


@pytest.mark.parametrize("stack", [["toy"], ["toy", "attention"]] + [[m] for m in REAL[:1]],
                         ids=["toy", "toy-attention"] + REAL[:1])
def test_real_model_with_tools_stop_strings_and_prefix_cache_equals_full_recompute(stack):
    """test_engine's dialogs with a tool on a tiny recurrent model (the tool's trigger swapped in for a frequent
    byte), two turns through the prefix cache, against the slow reference."""
    dtok = DialogTokenizer(ByteTokenizer())
    tok = dtok.tokenizer
    model = model_of(stack, seed=6, vocab_size=tok.vocab_size, max_seq_len=256)
    questions = ["How old is Ada?", "Where does Bob live?", "Hi", "What does Carol do?", "Who is Dan?"]
    plain = Engine(model, dtok, pool_tokens=1024, page_size=8, max_batch=5).generate(
        [Request(dialog=[{"source": "user", "content": q}], params=SamplingParams(max_new_tokens=12, temperature=0))
         for q in questions])
    seen = [t for r in plain for t in set(r.tokens) if t < 256]  # the byte written in the most first messages
    often = max(set(seen), key=lambda t: (seen.count(t), -t))
    with torch.no_grad():  # the model now emits the tool's trigger where it would have written that byte
        w = model.output.weight
        trig = tok.special_id(EchoTool.trigger)
        w[[often, trig]] = w[[trig, often]]
    tool = EchoTool()
    engine = Engine(model, dtok, pool_tokens=480, page_size=8, max_batch=4, prefill_chunk=32, tools=[tool])

    res1, res2 = two_turns_equal_the_reference(model, dtok, engine, tool, questions)
    assert sum(len(r.tool_calls) for r in res1 + res2) >= 2
    assert sum(r2.cached_tokens >= len(r1.prompt) for r1, r2 in zip(res1, res2)) >= 3
    check_whole(engine)
