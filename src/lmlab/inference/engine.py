"""The generation engine: continuous batching over a paged KV pool, packed chunked prefill, a prefix
cache, per-request sampling and stop conditions, and tool calls in token space.

* Requests (:class:`Request`): prompt tokens or a dialog, :class:`~lmlab.inference.sampling.SamplingParams`
  (greedy, temperature, top-k, top-p, seed, stop tokens, max new tokens) and stop strings. Results
  (:class:`Result`): the new tokens, their text, why generation stopped, and the dialog (tool turns included).
* Memory: one :class:`~lmlab.inference.pool.PagePool` of ``pool_tokens`` slots, allocated when the engine is
  built. Sequences take pages as they grow and give them back when they finish; when the pool runs out,
  cached prefixes are evicted (LRU), then the most recently admitted sequence is preempted (its pages
  freed, its tokens re-prefilled later; its sampler state is kept, so its output does not change).
* Scheduling: every step admits waiting requests (up to ``max_batch`` running), then runs at most two
  forwards: one decode forward with one row per sequence that needs one token, and one packed prefill
  forward in which up to ``prefill_chunk`` tokens of several prompts (or of tool answers) sit back to back
  in one row with a block-diagonal causal mask. Long prompts are prefilled in chunks over several steps.
  Decoding sequences keep their contexts in one contiguous :class:`~lmlab.inference.pool.DecodeBatch`
  (allocated once; a sequence's context is copied in from its pages when it starts decoding, one token is
  appended per step, to the batch only, and a sequence that stops decoding writes what it decoded to its pages
  and gives its row to the last one) instead of being gathered from the pages on every layer of every step.
  The per-step host work is one pass over the running sequences: only a sequence whose token may end it or call a
  tool (a stop token, a stop string, its length, a trigger) is looked at further, and :meth:`Engine.generate`
  makes no per-token events. The packed prefill attends one prompt at a time
  (``PagedStep.blocks``), not through one dense block-diagonal mask.
* Prefix cache (:class:`~lmlab.inference.prefix_cache.PrefixCache`): a request whose prompt starts with
  cached full pages reuses them and prefills only the rest.
* Tools (:class:`lmlab.tools.Tool`): when a sequence emits a tool's trigger token, the call is taken from the
  assistant's current message and run in a worker thread; the sequence waits (others keep decoding), then
  the answer and ``<|assistant|>`` are prefilled and decoding resumes. Errors and timeouts become an
  ``error: ...`` answer.
* Recurrent models (``model.mixer`` / ``model.layer_mixers``: Mamba2, Hawk, minGRU, minLSTM, hybrids with attention):
  each running sequence owns a slot of a :class:`~lmlab.inference.pool.StatePool` (allocated once, ``max_batch``
  slots per recurrent layer) holding its state after the tokens it has fed; the cache steps gather the rows' slots
  (``recurrent_state``) and scatter the new states back (``set_recurrent_state``). Attention layers of a hybrid keep
  their keys/values in pages as above; a model without attention keeps no keys/values at all (its pages are ids).
  A mixer returns only the state after each row's last token, so prefill puts one sequence per row (rows of equal
  length run together, never padded) instead of packing. Decoding is one token per row, O(1) per token for a
  recurrent layer. Prefix cache: the state after each full page is snapshotted into that page (prefill pieces end
  at page boundaries; a decode step that fills a page snapshots it), so a match of k pages restarts from the
  snapshot of page k, and an evicted page frees its snapshot (snapshot memory: one state per page of the pool,
  allocated with it when ``prefix_cache`` is on). A preempted sequence frees its slot and is
  recomputed from its tokens (from its cached pages' last snapshot with the prefix cache). Tool answers are
  prefilled onto the sequence's state.
* Every model call goes through :class:`ModelRunner` (one small interface to swap for parallel runners).

Usage::

    from lmlab.inference import Engine, Request, SamplingParams
    engine = Engine(model, tokenizer, pool_tokens=8192, page_size=16, max_batch=32)
    results = engine.generate([Request(prompt=ids, params=SamplingParams(max_new_tokens=50, temperature=0))])
    for ev in engine.stream([Request(dialog=[{"source": "user", "content": "Who is Ada?"}])]):
        print(ev.index, ev.tokens, ev.result)
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lmlab.config import EngineConfig
from lmlab.inference.pool import (
    DecodeBatch,
    PagedStep,
    PagePool,
    Segment,
    StatePool,
    StateStep,
    _ints,
    recurrent_layers,
)
from lmlab.inference.prefix_cache import PrefixCache
from lmlab.inference.sampling import Sampler, SamplingParams, TextStream, row_params, text_params
from lmlab.tokenizers import DialogTokenizer, Tokenizer

__all__ = ["Engine", "ModelRunner", "Request", "Result", "StreamEvent"]


@dataclass
class Request:
    """One generation request: ``prompt`` token ids, or a ``dialog`` (list of ``{"source", "content"}`` turns,
    encoded to end with ``<|assistant|>``; needs the engine's tokenizer). ``stop_strings``: generation ends
    once the generated text contains one (text-level; needs a tokenizer). Dialog requests stop by default on
    ``<|end_of_dialog|>`` and ``<|eos|>`` when ``params.stop_token_ids`` is None."""

    prompt: Sequence[int] | None = None
    dialog: Sequence[Mapping[str, str]] | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    stop_strings: Sequence[str] = ()
    id: Any = None


@dataclass
class Result:
    """``tokens``: everything after the prompt (sampled tokens and inserted tool answers); ``text``: their
    text (without a final stop token, cut before a stop string); ``finish_reason``: ``"stop"`` (stop token),
    ``"stop_string"``, ``"length"`` (max_new_tokens, the model's max_seq_len or the pool's size);
    ``dialog``: the whole dialog for dialog requests; ``cached_tokens``: prompt tokens taken from the prefix
    cache; ``tool_calls``: (call, answer) pairs; ``inserted``: ``(start, length)`` spans of ``tokens`` that the
    engine inserted (tool answers and the header after them), not sampled by the model."""

    id: Any
    prompt: list[int]
    tokens: list[int]
    finish_reason: str
    text: str | None = None
    dialog: list[dict[str, str]] | None = None
    cached_tokens: int = 0
    tool_calls: list[tuple[str | None, str]] = field(default_factory=list)
    inserted: list[tuple[int, int]] = field(default_factory=list)

    def sampled_mask(self) -> list[bool]:
        """One flag per token of ``tokens``: True where the model sampled it (False inside inserted spans): the
        tokens a policy-gradient loss may train on."""
        mask = [True] * len(self.tokens)
        for start, length in self.inserted:
            mask[start:start + length] = [False] * len(mask[start:start + length])
        return mask


@dataclass
class StreamEvent:
    """``tokens`` appended to request ``index`` (in submission order); ``result`` set when it finished."""

    index: int
    tokens: list[int]
    result: Result | None = None


class ModelRunner:
    """The engine's only door to the model: token rows + a paged cache step -> logits at chosen positions.

    A data- or tensor-parallel runner replaces this class; the engine needs nothing else from the model.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.cfg = model.cfg
        w = next(model.parameters())
        self.device, self.dtype = w.device, w.dtype

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, step: PagedStep, rows: list[int], cols: list[int]) -> torch.Tensor:
        """Float32 logits (len(rows), vocab) at ``(rows[i], cols[i])`` of the (B, T) ``tokens``."""
        logits = self.model(tokens.to(self.device), cache=step)
        if not rows:
            return logits.new_zeros((0, logits.shape[-1]), dtype=torch.float32)
        if logits.shape[1] == 1 and rows == list(range(logits.shape[0])):  # a decode forward: every row
            return logits[:, 0].float()
        return logits[torch.tensor(rows, device=logits.device), torch.tensor(cols, device=logits.device)].float()


class _ToolWorkers:
    """Daemon threads that run tool calls from a queue: a call costs a queue put, not a thread start (starting a
    thread per call cost ~2 ms of the main thread's time each). A new worker starts when none is free (a hung tool
    holds its worker, never the others' calls), up to ``n``; past that, calls wait for a worker (their deadline
    runs meanwhile). Daemon threads, so that a hung tool never blocks the interpreter's exit."""

    def __init__(self, n: int = 32) -> None:
        self.n, self.threads, self.free = n, 0, 0
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.lock = threading.Lock()

    def submit(self, call: _ToolCall) -> None:
        with self.lock:
            if self.free:
                self.free -= 1  # this call is that worker's
            elif self.threads < self.n:
                self.threads += 1
                threading.Thread(target=self._work, daemon=True, name="lmlab-tool").start()
        self.queue.put(call)

    def _work(self) -> None:
        while True:
            self.queue.get().run()
            with self.lock:
                self.free += 1


_TOOL_WORKERS = _ToolWorkers()


def _fresh_tool_workers() -> None:
    """In a forked child: a new, empty set of workers (the parent's threads do not exist there, and their lock
    may have been held at the fork)."""
    global _TOOL_WORKERS
    _TOOL_WORKERS = _ToolWorkers()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_fresh_tool_workers)


class _ToolCall:
    """One tool call in flight: queued to the tool workers; ``poll`` gives the answer, or an error once the
    deadline (from the call's submission) has passed."""

    def __init__(self, tool, call: str | None, timeout: float) -> None:
        self.tool, self.call, self.answer, self.done = tool, call, None, threading.Event()
        self.deadline = time.monotonic() + timeout
        self.timeout = timeout
        _TOOL_WORKERS.submit(self)

    def run(self) -> None:
        try:
            if self.call is None:
                raise ValueError("no tool call found in the assistant's message")
            self.answer = str(self.tool(self.call))
        except Exception as e:  # any tool failure becomes the answer the model reads
            self.answer = f"error: {type(e).__name__}: {e}"
        self.done.set()

    def poll(self) -> str | None:
        if self.done.is_set():
            return self.answer
        if time.monotonic() > self.deadline:
            return f"error: the tool did not answer within {self.timeout:g} s"
        return None


class _Seq:
    _serial = itertools.count()

    def __init__(self, index: int, req: Request, prompt: list[int], params: SamplingParams, stops: set[int]) -> None:
        self.index, self.req, self.params, self.stops = index, req, params, stops
        self.uid = next(_Seq._serial)  # unique for the life of the process (index repeats across calls)
        self.prompt = prompt
        self.tokens = list(prompt)  # prompt + everything after it
        self.n_cached = 0  # tokens whose keys/values are in the pool
        self.pages: list[int] = []
        self.n_sampled = 0
        self.cached_tokens = -1  # prompt tokens from the prefix cache when it was first fed
        self.fresh = False  # admitted, and not fed to the model since: it may still take newly cached pages
        self.generator = None if params.greedy else torch.Generator().manual_seed(params.seed)
        self.suppress: torch.Tensor | None = None  # the params' suppressed ids inside the vocabulary (int64)
        self.sample_params = params  # what the Sampler sees: suppression is applied by the engine
        self.tool: _ToolCall | None = None
        self.tool_calls: list[tuple[str | None, str]] = []
        self.inserted: list[tuple[int, int]] = []  # (start after the prompt, length) of each tool answer
        self.finish_reason: str | None = None
        self.running = False  # in Engine.active
        self.row = -1  # its row in the decode batch (-1: none)
        self.slot = -1  # its slot in the engine's StatePool (models with recurrent layers; -1: none)
        self.state_at = -1  # tokens whose state its slot holds (-1: not loaded yet)


class Engine:
    """Serve generation requests on ``model`` (see the module docstring).

    ``tokenizer``: a :class:`~lmlab.tokenizers.Tokenizer` or :class:`~lmlab.tokenizers.DialogTokenizer`, needed
    for dialogs, text, stop strings and tools. ``pool_tokens``: KV slots in the pool (rounded up to pages).
    ``page_size``: tokens per page (the prefix cache shares whole pages). ``max_batch``: sequences running at
    once. ``prefill_chunk``: prompt tokens prefilled per step (longer prompts take several steps).
    ``prefix_cache``: reuse cached prompt prefixes. ``tools``: tools the model may call.
    ``tool_timeout``: seconds a tool may take before its answer becomes an error. ``cascade_min``: when the
    decoding sequences all start with the same cached pages (a shared system prompt, sibling branches) of at
    least this many tokens, decode attends them once for the batch (cascade attention); 0 turns it off.

    One engine serves one stream at a time (it is not thread-safe); the pool, the prefix cache and the decode
    batch's buffers persist from call to call. ``max_new_tokens`` counts sampled tokens only (tool answers are
    not counted).
    """

    def __init__(self, model: nn.Module, tokenizer: Tokenizer | DialogTokenizer | None = None, *,
                 pool_tokens: int = 8192, page_size: int = 16, max_batch: int = 32, prefill_chunk: int = 512,
                 prefix_cache: bool = True, tools: Sequence[Any] = (), tool_timeout: float = 10.0,
                 cascade_min: int = 64) -> None:
        if max_batch <= 0 or prefill_chunk <= 0:
            raise ValueError(f"Engine: max_batch and prefill_chunk must be positive, got {max_batch}, {prefill_chunk}")
        self.runner = ModelRunner(model)
        self.pool = PagePool.for_model(model, pool_tokens, page_size)
        self.prefix = PrefixCache(self.pool) if prefix_cache else None
        # recurrent layers: one state slot per running sequence, and with the prefix cache one state snapshot per
        # page (the state after the page's last token, freed with the page)
        self.states = (StatePool.for_model(model, max_batch, self.pool.n_pages if prefix_cache else 0)
                       if recurrent_layers(model) else None)
        self._kv = bool(self.pool.kv_layers)  # whether any layer keeps keys/values
        self.max_batch, self.prefill_chunk, self.tool_timeout = max_batch, prefill_chunk, tool_timeout
        if cascade_min < 0:
            raise ValueError(f"Engine: cascade_min must be >= 0, got {cascade_min}")
        self.cascade_min = cascade_min
        if isinstance(tokenizer, DialogTokenizer):
            self.dialog_tokenizer, self.tokenizer = tokenizer, tokenizer.tokenizer
        else:
            self.tokenizer = tokenizer
            self.dialog_tokenizer = None
            if tokenizer is not None:
                try:
                    self.dialog_tokenizer = DialogTokenizer(tokenizer)
                except ValueError:
                    pass
        self.tools: dict[int, Any] = {}
        for tool in tools:
            if self.dialog_tokenizer is None:
                raise ValueError("Engine: tools need a tokenizer with the dialog special tokens")
            self.tools[self.dialog_tokenizer.trigger_id(tool.trigger)] = tool
        self.waiting: deque[_Seq] = deque()
        self.active: list[_Seq] = []
        self._dec: DecodeBatch | None = None  # contiguous contexts of the decoding sequences, kept across steps
        self._dec_rows: list[_Seq] = []  # the sequence of each live row of self._dec
        self._tool_seqs: list[_Seq] = []  # running sequences waiting for a tool's answer
        self._token_events = True  # whether _sample reports each sampled token (generate() needs results only)
        self._suppress_key: tuple[int, ...] | None = None  # the rows (sequence uids) of _suppress_rows
        self._suppress_rows: torch.Tensor | None = None
        self.stats = {"forwards": 0, "prefill_forwards": 0, "decode_forwards": 0, "preemptions": 0,
                      "prefill_tokens": 0, "decode_batch_builds": 0, "decode_batch_joins": 0, "cascade_forwards": 0,
                      "prefill_s": 0.0, "decode_s": 0.0}  # wall time of the forwards, planning included (on CUDA,
        # where kernels run asynchronously, the split between the two is approximate)

    @classmethod
    def from_config(cls, model: nn.Module, tokenizer: Tokenizer | DialogTokenizer | None, cfg: EngineConfig,
                    tools: Sequence[Any] = ()) -> Engine:
        """An engine sized by the ``engine:`` config section (the pool is capped at the model's max_seq_len
        times max_batch, more could never be used)."""
        pool = min(cfg.pool_tokens, model.cfg.max_seq_len * cfg.max_batch)
        return cls(model, tokenizer, pool_tokens=pool, page_size=cfg.page_size, max_batch=cfg.max_batch,
                   prefill_chunk=cfg.prefill_chunk, prefix_cache=cfg.prefix_cache, tools=tools,
                   tool_timeout=cfg.tool_timeout, cascade_min=cfg.cascade_min)

    # ---- requests ------------------------------------------------------------------------------------
    @property
    def context_limit(self) -> int:
        """Tokens one sequence may hold at most, prompt and generated tokens together."""
        return min(self.runner.cfg.max_seq_len, self.pool.n_tokens)

    def _make_seq(self, index: int, req: Request | Sequence[int]) -> _Seq:
        if not isinstance(req, Request):
            req = Request(prompt=req)
        cfg = self.runner.cfg
        if (req.prompt is None) == (req.dialog is None):
            raise ValueError(f"request {index}: give exactly one of prompt and dialog")
        if req.dialog is not None:
            if self.dialog_tokenizer is None:
                raise ValueError(f"request {index}: a dialog needs a tokenizer with the dialog special tokens")
            prompt = self.dialog_tokenizer.encode_prompt(req.dialog)
        else:
            prompt = [int(t) for t in req.prompt]
        if not prompt:
            raise ValueError(f"request {index}: the prompt is empty; generation needs at least one token")
        bad = [t for t in prompt if not 0 <= t < cfg.vocab_size]
        if bad:
            raise ValueError(f"request {index}: token id {bad[0]} is outside the model vocabulary "
                             f"[0, {cfg.vocab_size})")
        if req.stop_strings and self.tokenizer is None:
            raise ValueError(f"request {index}: stop strings need a tokenizer")
        p = req.params
        limit = self.context_limit
        if len(prompt) + min(p.max_new_tokens, 1) > limit:
            raise ValueError(f"request {index}: the prompt has {len(prompt)} tokens, more than the {limit} the context "
                             f"holds with room to generate (min of model.max_seq_len={cfg.max_seq_len} and the "
                             f"pool's {self.pool.n_tokens} tokens)")
        if len(prompt) + p.max_new_tokens > limit:
            raise ValueError(f"request {index}: {len(prompt)} prompt tokens + max_new_tokens={p.max_new_tokens} exceed "
                             f"{limit} (min of model.max_seq_len={cfg.max_seq_len} and the pool's "
                             f"{self.pool.n_tokens} tokens)")
        stops = p.stop_token_ids
        if stops is None and req.dialog is not None:
            stops = self.dialog_tokenizer.stop_ids
        if p.seed is None and not p.greedy:
            p = dataclasses.replace(p, seed=int(torch.randint(0, 2**62, ())))
        seq = _Seq(index, req, prompt, p, set(stops or ()))
        # ids past the tokenizer's vocabulary (a model whose embedding was padded beyond it) cannot be decoded
        undecodable = range(self.tokenizer.vocab_size, cfg.vocab_size) if self.tokenizer is not None else ()
        if p.suppress_token_ids or undecodable:
            ids = sorted({t for t in p.suppress_token_ids if 0 <= t < cfg.vocab_size} | set(undecodable))
            if len(ids) == cfg.vocab_size:
                raise ValueError(f"request {index}: suppress_token_ids covers every token id")
            seq.suppress = torch.tensor(ids, dtype=torch.long)
            seq.sample_params = dataclasses.replace(p, suppress_token_ids=())
        return seq

    def generate(self, requests: Sequence[Request | Sequence[int]]) -> list[Result]:
        """Run every request to completion; results in request order."""
        results: list[Result | None] = [None] * len(requests)
        for ev in self._run(requests, token_events=False):
            if ev.result is not None:
                results[ev.index] = ev.result
        return results  # type: ignore[return-value]

    def stream(self, requests: Sequence[Request | Sequence[int]]) -> Iterator[StreamEvent]:
        """Events as tokens are appended (sampled tokens, and tool answers) and as requests finish."""
        return self._run(requests, token_events=True)

    def _run(self, requests: Sequence[Request | Sequence[int]], token_events: bool) -> Iterator[StreamEvent]:
        """The events of :meth:`stream`; without ``token_events``, no event for each sampled token."""
        seqs = [self._make_seq(i, r) for i, r in enumerate(requests)]
        self._token_events = token_events
        for s in seqs:
            if s.params.max_new_tokens == 0:
                s.finish_reason = "length"
                yield StreamEvent(s.index, [], self._result(s))
            else:
                self.waiting.append(s)
        try:
            while self.waiting or self.active:
                yield from self._step()
        finally:  # a stream left early (or a failed forward) must not leave sequences holding pages
            self.abort()

    def clear_cache(self) -> None:
        """Forget every cached prefix: call it after the model's weights changed (e.g. between the rollouts of two
        reinforcement-learning steps), since cached keys, values and states were computed with the old ones."""
        if self.prefix is not None:
            self.prefix.clear()

    def abort(self) -> None:
        """Drop every waiting and running request, giving their pages back (running tools are abandoned)."""
        for s in self.active:
            self._release(s)
            s.running = False
        self.active, self.waiting = [], deque()
        self._tool_seqs = []
        self._clear_decode_batch()

    def generate_text(self, prompts: Sequence[str], params: SamplingParams | Sequence[SamplingParams] | None = None,
                      *, allow_special: bool = False, on_text: Callable[[int, str], None] | None = None) -> list[str]:
        """Completions of text prompts (the prompt not included, nor the stop token that ended a row).

        ``params``: one for every prompt (row ``i`` seeded ``seed + i``) or one per prompt (see
        :func:`~lmlab.inference.sampling.row_params`). Stop tokens default to the tokenizer's ``<|eos|>`` and
        ``<|end_of_dialog|>`` (when ``params.stop_token_ids`` is None). Other special tokens, and ids beyond the
        tokenizer's vocabulary, are never sampled unless ``allow_special`` (ids beyond the vocabulary never are;
        see :func:`~lmlab.inference.sampling.text_params`). ``on_text(row, piece)`` receives each row's text as it
        grows (streaming)."""
        requests = self.text_requests(prompts, params, allow_special=allow_special)
        rows = [r.params for r in requests]
        stream = TextStream(self.tokenizer, len(prompts), on_text) if on_text is not None else None
        new: list[list[int]] = [[] for _ in prompts]
        texts = [""] * len(prompts)
        for ev in self.stream(requests):
            if ev.result is not None:
                toks = ev.result.tokens
                if ev.result.finish_reason == "stop":
                    toks = toks[:-1]
                if stream is not None:
                    stream.push(ev.index, toks, final=True)
                texts[ev.index] = self.tokenizer.decode(toks)
            elif stream is not None and ev.tokens:
                new[ev.index] += ev.tokens
                if new[ev.index][-1] not in rows[ev.index].stop_token_ids:
                    stream.push(ev.index, new[ev.index])
        return texts

    def text_requests(self, prompts: Sequence[str], params: SamplingParams | Sequence[SamplingParams] | None = None,
                      *, allow_special: bool = False) -> list[Request]:
        """The requests :meth:`generate_text` runs for these prompts, each checked as :meth:`generate` would
        (ValueError naming the first bad prompt: empty, longer than the context with its max_new_tokens, ...),
        before anything is generated."""
        if self.tokenizer is None:
            raise ValueError("Engine.generate_text needs a tokenizer")
        params = SamplingParams() if params is None else params
        rows = row_params(params, len(prompts))
        rows = [text_params(p, self.tokenizer, self.runner.cfg.vocab_size, allow_special) for p in rows]
        requests = []
        for i, (text, p) in enumerate(zip(prompts, rows)):
            ids = self.tokenizer.encode(text)
            if not ids:
                raise ValueError(f"prompt {i} encodes to no tokens: give at least one character of text")
            requests.append(Request(prompt=ids, params=p))
            self._make_seq(i, requests[-1])
        return requests

    # ---- memory --------------------------------------------------------------------------------------
    def _ensure_pages(self, s: _Seq, n_tokens: int) -> bool:
        need = -(-n_tokens // self.pool.page_size) - len(s.pages)
        if need <= 0:
            return True
        if need > self.pool.n_free and self.prefix is not None:
            self.prefix.evict(need - self.pool.n_free)
        if need > self.pool.n_free:
            return False
        s.pages.extend(self.pool.alloc(need))
        return True

    def _release(self, s: _Seq) -> None:
        if s.row >= 0:  # its decoded keys/values reach its pages first, when the prefix cache may keep them
            self._leave_decode(s, flush=self.prefix is not None)
        if self.prefix is not None:
            self.prefix.insert(s.tokens[:s.n_cached], s.pages)
        self.pool.decref(s.pages)
        s.pages, s.n_cached = [], 0
        if s.slot >= 0:  # a preempted sequence is recomputed from its tokens (or from a prefix snapshot)
            self.states.free(s.slot)
            s.slot, s.state_at = -1, -1

    def _load_states(self, seqs: list[_Seq]) -> None:
        """Before a forward: each sequence's slot holds the state after its ``n_cached`` tokens: zeros before its first
        token, else the snapshot of the last cached page that the prefix cache gave it."""
        need = [s for s in seqs if s.state_at != s.n_cached]
        if not need:
            return
        ps = self.pool.page_size
        for s in need:
            if s.n_cached % ps:
                raise RuntimeError(f"Engine: no state for a sequence at {s.n_cached} tokens (not a page boundary)")
        self.states.load([s.slot for s in need], [s.pages[s.n_cached // ps - 1] if s.n_cached else -1 for s in need])
        for s in need:
            s.state_at = s.n_cached

    def _rematch(self, s: _Seq) -> None:
        """Before its first forward, a sequence takes a longer cached prefix if one appeared since it was admitted
        (pages that earlier prefill steps of this burst of requests inserted, e.g. a shared system prompt)."""
        pages, n = self.prefix.match(s.tokens, len(s.tokens) - 1)
        if n <= s.n_cached:
            self.pool.decref(pages)
            return
        self.pool.decref(s.pages)
        s.pages, s.n_cached = pages, n

    def _shares_prefill(self, s: _Seq, prefill: list[tuple[_Seq, int]]) -> bool:
        """Whether a sequence prefilled in this step computes at least one full page more of ``s``'s prompt than
        ``s`` holds: then ``s`` waits a step and takes those pages from the prefix cache instead."""
        ps = self.pool.page_size
        want = s.n_cached // ps * ps + ps  # s gains only with a full page past what it has
        limit = len(s.tokens) - 1
        if want > limit:
            return False
        for o, k in prefill:
            if o.n_cached + k >= want and o.tokens[:want] == s.tokens[:want]:
                return True
        return False

    def _preempt(self, s: _Seq) -> None:
        self._release(s)  # its full pages stay in the prefix cache, so it may not prefill them again
        self.active.remove(s)
        s.running = False
        self.waiting.appendleft(s)
        self.stats["preemptions"] += 1

    def _admit(self) -> None:
        while self.waiting and len(self.active) < self.max_batch:
            s = self.waiting[0]
            if self.prefix is not None:  # at least one token must be fed, to get the next token's logits
                s.pages, s.n_cached = self.prefix.match(s.tokens, len(s.tokens) - 1)
            first = min(len(s.tokens) - s.n_cached, self.prefill_chunk)
            if not self._ensure_pages(s, s.n_cached + first) and self.active:
                self.pool.decref(s.pages)
                s.pages, s.n_cached = [], 0
                return
            self.waiting.popleft()
            self.active.append(s)
            s.running = s.fresh = True
            if self.states is not None:
                s.slot, s.state_at = self.states.alloc(), -1

    # ---- one step ------------------------------------------------------------------------------------
    def _step(self) -> list[StreamEvent]:
        events: list[StreamEvent] = []
        self._poll_tools(events)
        self._admit()
        decode: list[_Seq] = []
        prefill: list[tuple[_Seq, int]] = []
        budget = self.prefill_chunk
        ps = self.pool.page_size
        stopped: list[_Seq] = []
        for s in list(self.active):
            if not s.running or s.tool is not None:
                continue
            pending = len(s.tokens) - s.n_cached
            if pending == 1 and not s.fresh and s.n_cached < len(s.pages) * ps:
                decode.append(s)  # a decoding sequence with room in its pages: what the general path below does
                continue
            if s.fresh and self.prefix is not None:
                if budget <= 0 and (len(s.tokens) - 1) % ps:
                    continue  # no prefill budget left, and no cached prefix could leave it one token to feed
                self._rematch(s)
                if self._shares_prefill(s, prefill):
                    continue  # next step, it takes the pages that this step's prefill computes
            pending = len(s.tokens) - s.n_cached
            k = 1 if pending == 1 else min(pending, budget)
            if k <= 0:
                continue
            while not self._ensure_pages(s, s.n_cached + k):
                later = [v for v in self.active[self.active.index(s) + 1:] if v.tool is None]
                if later:
                    self._preempt(later[-1])
                elif len(self.active) > 1:
                    self._preempt(s)
                    break
                else:  # alone and still too long for the pool (tool answers grew it): stop here
                    s.finish_reason = "length"
                    stopped.append(s)
                    break
            if not s.running or s.finish_reason is not None:
                continue
            if pending == 1:
                decode.append(s)
            else:
                prefill.append((s, k))
                budget -= k
        for s in stopped:
            events.append(self._finish(s))
        seqs: list[_Seq] = []
        logits: list[torch.Tensor] = []
        if decode:
            done, lg = self._decode_forward(decode)
            seqs += done
            logits.append(lg)
        if prefill:
            done, lg = self._forward(prefill)
            seqs += done
            logits.append(lg)
        if seqs:
            self._sample(seqs, logits[0] if len(logits) == 1 else torch.cat(logits), events)
        elif not decode and not prefill and self._tool_seqs:
            time.sleep(0.001)  # everyone waits for a tool
        return events

    def _forward(self, group: list[tuple[_Seq, int]]) -> tuple[list[_Seq], torch.Tensor]:
        """Run one packed prefill forward; the sequences whose pending tokens are all fed now, and their logits
        (rows)."""
        if self.states is not None:
            return self._forward_rows(group)
        t0 = time.perf_counter()
        for s, _ in group:
            if s.row >= 0:  # never the case (a sequence leaves the decode batch before it prefills): kept safe
                self._leave_decode(s)
        segs = [Segment(s.pages, s.n_cached, k) for s, k in group]
        rows, cols, col = [0] * len(group), [], 0
        for _, k in group:
            col += k
            cols.append(col - 1)
        tokens = _ints([t for s, k in group for t in s.tokens[s.n_cached:s.n_cached + k]]).view(1, -1)
        step = PagedStep(self.pool, [segs])
        self.stats["prefill_forwards"] += 1
        self.stats["prefill_tokens"] += col
        self.stats["forwards"] += 1
        logits = self.runner.forward(tokens, step, rows, cols)
        self.stats["prefill_s"] += time.perf_counter() - t0
        done, idx = [], []
        for i, (s, k) in enumerate(group):
            if s.cached_tokens < 0:
                s.cached_tokens = s.n_cached
            s.n_cached += k
            s.fresh = False
            if self.prefix is not None:
                self.prefix.insert(s.tokens[:s.n_cached], s.pages)
            if s.n_cached == len(s.tokens):
                done.append(s)
                idx.append(i)
        if len(idx) < len(group):
            logits = logits[torch.tensor(idx, dtype=torch.long, device=logits.device)]
        return done, logits

    def _forward_rows(self, group: list[tuple[_Seq, int]]) -> tuple[list[_Seq], torch.Tensor]:
        """Prefill for a model with recurrent layers: a mixer returns only the state after each row's last token, so
        every row holds one sequence (rows of equal length run together: no padding, which would run through the
        recurrence). With the prefix cache, a sequence's tokens are fed in pieces that end at page boundaries, and
        the state after each full page is snapshotted into that page (what a later prompt sharing the page
        restarts from). The sequences whose pending tokens are all fed now, and their logits, back."""
        t0 = time.perf_counter()
        for s, _ in group:
            if s.row >= 0:  # never the case (a sequence leaves the decode batch before it prefills): kept safe
                self._leave_decode(s)
        self._load_states([s for s, _ in group])
        ps, snap, states = self.pool.page_size, bool(self.states.snapshots), self.states
        pos = [s.n_cached for s, _ in group]
        ends = [s.n_cached + k for s, k in group]
        out: dict[int, torch.Tensor] = {}
        while True:
            waves: dict[int, list[int]] = {}  # piece length -> the sequences (indices in group) that feed one now
            for i in range(len(group)):
                if pos[i] < ends[i]:
                    stop = min(ends[i], (pos[i] // ps + 1) * ps) if snap else ends[i]
                    waves.setdefault(stop - pos[i], []).append(i)
            if not waves:
                break
            for n, idx in waves.items():
                seqs = [group[i][0] for i in idx]
                tokens = _ints([t for i, s in zip(idx, seqs) for t in s.tokens[pos[i]:pos[i] + n]]).view(len(idx), n)
                view = states.view([s.slot for s in seqs])
                if self._kv:
                    step = PagedStep(self.pool, [[Segment(s.pages, pos[i], n)] for i, s in zip(idx, seqs)])
                    step.states = view
                else:
                    step = StateStep([pos[i] for i in idx], n, view)
                want = [r for r, (i, s) in enumerate(zip(idx, seqs)) if pos[i] + n == ends[i] == len(s.tokens)]
                lg = self.runner.forward(tokens, step, want, [n - 1] * len(want))
                self.stats["prefill_forwards"] += 1
                self.stats["forwards"] += 1
                self.stats["prefill_tokens"] += n * len(idx)
                for j, r in enumerate(want):
                    out[idx[r]] = lg[j]
                if snap:
                    full = [(s.slot, s.pages[(pos[i] + n) // ps - 1]) for i, s in zip(idx, seqs)
                            if (pos[i] + n) % ps == 0]
                    states.save([a for a, _ in full], [b for _, b in full])
                for i in idx:
                    pos[i] += n
        self.stats["prefill_s"] += time.perf_counter() - t0
        done, rows = [], []
        for i, (s, k) in enumerate(group):
            if s.cached_tokens < 0:
                s.cached_tokens = s.n_cached
            s.n_cached += k
            s.state_at = s.n_cached
            s.fresh = False
            if self.prefix is not None:
                self.prefix.insert(s.tokens[:s.n_cached], s.pages)
            if s.n_cached == len(s.tokens):
                done.append(s)
                rows.append(out[i])
        if not rows:
            return done, torch.zeros((0, self.runner.cfg.vocab_size))
        return done, torch.stack(rows)

    def _decode_forward(self, seqs: list[_Seq]) -> tuple[list[_Seq], torch.Tensor]:
        """One decode forward: one row per sequence (each has exactly one pending token), in the order of the
        decode batch's rows; those sequences and their logits back."""
        t0 = time.perf_counter()
        if self.states is not None:
            self._load_states(seqs)
        if self._kv:
            rows = self._decode_batch(seqs)
            step = self._dec.step()
            if self.states is not None:
                step.states = self.states.view([s.slot for s in rows])
        else:  # no attention layer: no keys to keep, the states are the whole context
            rows = seqs
            step = StateStep([s.n_cached for s in rows], 1, self.states.view([s.slot for s in rows]))
        tokens = _ints([s.tokens[-1] for s in rows]).view(-1, 1)  # pending == 1: the last token is the one to feed
        self.stats["decode_forwards"] += 1
        self.stats["cascade_forwards"] += getattr(step, "shared_keys", 0) > 0
        self.stats["forwards"] += 1
        logits = self.runner.forward(tokens, step, list(range(len(rows))), [0] * len(rows))
        self.stats["decode_s"] += time.perf_counter() - t0
        for s in rows:
            if s.cached_tokens < 0:
                s.cached_tokens = s.n_cached
            s.n_cached += 1
            s.fresh = False
        if self.states is not None:
            ps = self.pool.page_size
            for s in rows:
                s.state_at = s.n_cached
            if self.states.snapshots:  # a row that just filled a page: its state is that page's snapshot
                full = [s for s in rows if s.n_cached % ps == 0]
                if full:
                    self.states.save([s.slot for s in full], [s.pages[s.n_cached // ps - 1] for s in full])
        return list(rows), logits

    def _clear_decode_batch(self) -> None:
        """Empty the decode batch; its buffers stay allocated (memory already touched) for the next call."""
        if self._dec is not None:
            self._dec.clear()
        for s in self._dec_rows:
            s.row = -1
        self._dec_rows = []

    def _leave_decode(self, s: _Seq, flush: bool = True) -> None:
        """Drop ``s``'s row from the decode batch (its decoded keys/values written to its pages, unless not
        ``flush``); the last row moves into its place."""
        rows, r = self._dec_rows, s.row
        self._dec.remove(r, flush=flush)
        last = rows.pop()
        if last is not s:
            rows[r] = last
            last.row = r
        s.row = -1

    def _decode_batch(self, seqs: list[_Seq]) -> list[_Seq]:
        """Make the decode batch's live rows exactly ``seqs`` (rows of sequences that stopped decoding are dropped;
        newcomers are copied in from their pages) and return them in row order."""
        dec, rows = self._dec, self._dec_rows
        joining = [s for s in seqs if s.row < 0]
        if len(rows) + len(joining) != len(seqs):  # a row whose sequence is not decoding now: drop it
            want = {id(s) for s in seqs}
            for s in [s for s in rows if id(s) not in want]:
                self._leave_decode(s)
        if dec is not None and dec.lengths != [s.n_cached for s in rows]:
            raise RuntimeError("Engine: the decode batch is out of step with its sequences")
        need = max(s.n_cached for s in seqs) + 1
        if not joining and need <= dec.capacity:
            return rows
        capacity = need
        if dec is None or not rows or need > dec.capacity:
            # room for every running and waiting sequence to reach its max_new_tokens, so that the batch is not
            # regrown as they join (tool answers may still outgrow it)
            limit = min(self.runner.cfg.max_seq_len, self.pool.n_tokens)
            most = max(len(s.tokens) + s.params.max_new_tokens - s.n_sampled for s in (*self.active, *self.waiting))
            capacity = max(need, min(limit, -(-most // 16) * 16))
        if dec is None:
            self.stats["decode_batch_builds"] += 1
            dec = self._dec = DecodeBatch(self.pool, self.max_batch, capacity, self.cascade_min)
        if capacity > dec.capacity:
            self.stats["decode_batch_builds"] += 1
            dec.reserve(dec.rows, capacity if not rows else max(capacity, dec.capacity + 64))
        for s in joining:
            s.row = dec.add(Segment(s.pages, s.n_cached, 1))
            rows.append(s)
            self.stats["decode_batch_joins"] += 1
        return rows

    def _sample(self, items: list[_Seq], logits: torch.Tensor, events: list[StreamEvent]) -> None:
        """Sample the next token of each sequence from its row of ``logits``."""
        if any(s.suppress is not None for s in items):
            logits = logits.masked_fill(self._suppress_mask(items, logits), float("-inf"))
        if all(s.params.greedy for s in items):
            toks = logits.argmax(dim=-1).tolist()  # what the Sampler returns for such rows, without its setup
        else:
            sampler = Sampler([s.sample_params for s in items])
            sampler.generators = [s.generator for s in items]  # each request keeps its own stream of draws
            toks = sampler(logits).tolist()
        tools, limit, token_events = self.tools, self.runner.cfg.max_seq_len, self._token_events
        for s, tok in zip(items, toks):
            s.tokens.append(tok)
            s.n_sampled += 1
            if token_events:
                events.append(StreamEvent(s.index, [tok]))
            # most tokens end nothing and call nothing: the checks below only for those that may
            if (tok in s.stops or s.req.stop_strings or s.params.max_new_tokens <= s.n_sampled
                    or len(s.tokens) >= limit or tok in tools):
                self._after_token(s, tok, events)

    def _after_token(self, s: _Seq, tok: int, events: list[StreamEvent]) -> None:
        """Stop conditions and tool calls after ``s`` sampled ``tok``. A tool's trigger that is also a stop token
        (the chatml format: ``<|im_end|>`` ends every assistant turn) is a call only when the turn holds one."""
        call = None
        if tok in self.tools:
            found = self.tools[tok].extract(self._message(s))
            # a trigger that also ends an answer (chatml's <|im_end|>) calls only when the turn holds a call; a
            # dedicated trigger (lmlab's <|database|>) always calls (no call found: the answer says so)
            if found is not None or tok not in self.dialog_tokenizer.stop_ids:
                call = (found,)
        if tok in s.stops and call is None:
            s.finish_reason = "stop"
        elif self._hit_stop_string(s):
            s.finish_reason = "stop_string"
        elif s.n_sampled >= s.params.max_new_tokens or len(s.tokens) >= self.runner.cfg.max_seq_len:
            s.finish_reason = "length"
        elif call is not None:
            s.tool = _ToolCall(self.tools[tok], call[0], self.tool_timeout)
            self._tool_seqs.append(s)
            if s.row >= 0:  # it prefills the answer next, from its pages
                self._leave_decode(s)
        if s.finish_reason is not None:
            events.append(self._finish(s))

    def _suppress_mask(self, items: list[_Seq], logits: torch.Tensor) -> torch.Tensor:
        """(B, V) bool: the suppressed ids of each row; kept while the rows stay the same sequences (decoding)."""
        key = tuple(s.uid for s in items)
        if self._suppress_key != key:
            rows = [torch.full((len(s.suppress),), i, dtype=torch.long) for i, s in enumerate(items)
                    if s.suppress is not None]
            mask = torch.zeros(logits.shape, dtype=torch.bool)
            mask[torch.cat(rows), torch.cat([s.suppress for s in items if s.suppress is not None])] = True
            self._suppress_key, self._suppress_rows = key, mask.to(logits.device)
        return self._suppress_rows

    # ---- stop strings, tools, results ------------------------------------------------------------------
    def _hit_stop_string(self, s: _Seq) -> bool:
        if not s.req.stop_strings:
            return False
        width = 2 * max(len(x) for x in s.req.stop_strings) + 8
        new = s.tokens[len(s.prompt):]
        tail = self.tokenizer.decode(new[-width:])
        return any(x in tail for x in s.req.stop_strings)

    def _message(self, s: _Seq) -> str:
        """Text of the assistant's current message: after its last header, before the trigger."""
        return self.dialog_tokenizer.current_message(s.tokens)

    def _poll_tools(self, events: list[StreamEvent]) -> None:
        if not self._tool_seqs:
            return
        for s in [s for s in self.active if s.tool is not None]:
            answer = s.tool.poll()
            if answer is None:
                continue
            s.tool_calls.append((s.tool.call, answer))
            s.tool = None
            added = self.dialog_tokenizer.tool_answer_ids(answer)
            room = min(self.runner.cfg.max_seq_len, self.pool.n_tokens) - len(s.tokens)
            if added[:max(room, 0)]:
                s.inserted.append((len(s.tokens) - len(s.prompt), len(added[:max(room, 0)])))
            s.tokens.extend(added[:max(room, 0)])
            events.append(StreamEvent(s.index, added[:max(room, 0)]))
            if len(added) >= room:  # no room left to continue after the answer
                s.finish_reason = "length"
                events.append(self._finish(s))
        self._tool_seqs = [s for s in self._tool_seqs if s.tool is not None]

    def _finish(self, s: _Seq) -> StreamEvent:
        self._release(s)
        if s.running:
            self.active.remove(s)
            s.running = False
        if not self.active:
            self._clear_decode_batch()
        return StreamEvent(s.index, [], self._result(s))

    def _result(self, s: _Seq) -> Result:
        new = s.tokens[len(s.prompt):]
        text = dialog = None
        if self.tokenizer is not None:
            body = new[:-1] if s.finish_reason == "stop" else new
            text = self.tokenizer.decode(body)
            if s.finish_reason == "stop_string":
                cut = min((text.find(x) for x in s.req.stop_strings if x in text), default=len(text))
                text = text[:cut]
            if s.req.dialog is not None:
                # tokens generated past the dialog's end (stop tokens switched off) are not part of it
                dialog = self.dialog_tokenizer.decode_dialog(s.tokens, strict=False)
        return Result(s.req.id, s.prompt, new, s.finish_reason or "length", text, dialog,
                      max(s.cached_tokens, 0), s.tool_calls, list(s.inserted))
