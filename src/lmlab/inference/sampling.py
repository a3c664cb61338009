"""Sampling and batched generation with a KV cache, and the slow reference it must agree with.

* :class:`SamplingParams`: temperature (0 = greedy), top-k, top-p, seed, max new tokens, stop and
  suppressed token ids, for one request.
* :class:`Sampler`: a batch of logits -> next tokens, each row with its own params and its own seeded
  random generator, so a request's samples do not depend on what else is in the batch.
* :func:`generate`: ragged prompts in one batch: one forward prefills every prompt, then one forward per
  step decodes one token for every unfinished row, through a :class:`~lmlab.inference.kv_cache.KVCache`.
* :func:`generate_reference`: the same samples, recomputing each row's whole sequence at every step
  without a cache (slow; the test oracle).
* :func:`generate_text` / :func:`read_prompts`: the text level for ``lmlab generate``.

Filters apply in this order: suppressed ids removed, logits divided by the temperature, the ``top_k``
most likely ids kept, then the smallest set of most likely ids whose probability reaches ``top_p``, then
(min-p) only the ids at least ``min_p`` times as likely as the most likely one.
A row draws one uniform number per sampled token from its generator and picks the token where it falls
in the cumulative distribution (ids sorted by probability, ties by id), so cached and reference decoding
draw the same tokens from the same logits. Generators live on the CPU: a seed means the same draws on
every device.

Usage::

    from lmlab.inference import SamplingParams, generate, generate_text
    params = SamplingParams(max_new_tokens=50, temperature=0.8, top_p=0.95, seed=0, stop_token_ids=[tok.eos_id])
    new_ids = generate(model, [tok.encode("ROMEO:"), tok.encode("JULIET:")], params)
    texts = generate_text(model, tok, ["ROMEO:", "JULIET:"], params, on_text=lambda row, s: print(row, s))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lmlab.config import SampleConfig, sampling_errors
from lmlab.inference.kv_cache import KVCache
from lmlab.jsonl import iter_jsonl
from lmlab.tokenizers import END_OF_DIALOG, EOS, Tokenizer

__all__ = [
    "Sampler",
    "SamplingParams",
    "filtered_probs",
    "generate",
    "generate_reference",
    "generate_text",
    "read_prompts",
]


@dataclass(frozen=True)
class SamplingParams:
    """How one request is sampled.

    ``stop_token_ids``: generation of a row ends right after it emits one of these (the stop token is part
    of :func:`generate`'s output; :func:`generate_text` leaves it out of the text). ``None`` means "the
    default": no stop tokens for :func:`generate`, the tokenizer's ``<|eos|>`` and ``<|end_of_dialog|>``
    for :func:`generate_text`. ``suppress_token_ids`` are never sampled (not even greedily).
    """

    max_new_tokens: int = 200
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] | None = None
    suppress_token_ids: tuple[int, ...] = ()
    min_p: float = 0.0

    def __post_init__(self) -> None:
        errs = sampling_errors(self.max_new_tokens, self.temperature, self.top_k, self.top_p, self.min_p)
        if errs:
            raise ValueError("SamplingParams: " + "; ".join(f"{k} {msg}" for k, msg in errs))
        if self.stop_token_ids is not None:
            object.__setattr__(self, "stop_token_ids", tuple(int(i) for i in self.stop_token_ids))
        object.__setattr__(self, "suppress_token_ids", tuple(int(i) for i in self.suppress_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @classmethod
    def from_config(cls, cfg: SampleConfig, run_seed: int = 0, **overrides) -> SamplingParams:
        """Params from the ``sample:`` config section; a null ``sample.seed`` falls back to ``run_seed``."""
        kw = dict(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                  top_p=cfg.top_p, seed=run_seed if cfg.seed is None else cfg.seed)
        kw.update(overrides)
        return cls(**kw)


def _row_params(params: SamplingParams | Sequence[SamplingParams], n: int) -> list[SamplingParams]:
    """One params per row with a concrete seed.

    A single params stands for every row, row ``i`` seeded ``seed + i`` (so equal prompts give different
    samples). In a list each row keeps its own seed, so a request samples the same in any batch. A null
    seed is drawn from torch's global generator (reproducible under ``torch.manual_seed``).
    """
    if isinstance(params, SamplingParams):
        base = params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()))
        rows = [dataclasses.replace(params, seed=base + i) for i in range(n)]
    else:
        rows = list(params)
        if len(rows) != n:
            raise ValueError(f"got {len(rows)} SamplingParams for {n} prompts: pass one, or one per prompt")
        rows = [p if p.seed is not None else dataclasses.replace(p, seed=int(torch.randint(0, 2**62, ())))
                for p in rows]
    return rows


def _sorted_filtered_probs(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
    min_p: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities after temperature, top-k, top-p and min-p, in decreasing order, and the ids in that order."""
    logits = logits.float() / temperature[:, None]
    # stable: equal logits stay in id order, so the kept set and the draw are deterministic
    sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)
    rank = torch.arange(logits.shape[-1], device=logits.device)
    beyond_k = (top_k[:, None] > 0) & (rank >= top_k[:, None])
    probs = sorted_logits.masked_fill(beyond_k, float("-inf")).softmax(dim=-1)
    # keep an id when the ids before it hold less than top_p: the smallest prefix that reaches top_p
    before = probs.cumsum(dim=-1) - probs
    probs = probs.masked_fill((before >= top_p[:, None]) & (top_p[:, None] < 1.0), 0.0)
    if min_p is not None:  # the most likely id (column 0) always stays
        probs = probs.masked_fill(probs < min_p[:, None] * probs[:, :1], 0.0)
    return probs / probs.sum(dim=-1, keepdim=True), order


def filtered_probs(
    logits: torch.Tensor,
    temperature: float | torch.Tensor = 1.0,
    top_k: int | torch.Tensor = 0,
    top_p: float | torch.Tensor = 1.0,
    min_p: float | torch.Tensor = 0.0,
) -> torch.Tensor:
    """The distribution (B, V) a row is sampled from: logits (B, V) after temperature, top-k, top-p, min-p.

    Temperature 0 (greedy) gives all the probability to the most likely id (the lowest of tied ids).
    """
    b = logits.shape[0]
    dev = logits.device
    t, k, p, m = (torch.as_tensor(x, device=dev).expand(b) for x in (temperature, top_k, top_p, min_p))
    greedy = t == 0
    t, k = torch.where(greedy, 1.0, t.float()), torch.where(greedy, 1, k.long())
    probs, order = _sorted_filtered_probs(logits, t, k, p.float(), m.float())
    return torch.zeros_like(probs).scatter_(-1, order, probs)


class Sampler:
    """Next tokens for a batch of rows, row ``i`` sampled with ``params[i]`` and its own generator.

    Each non-greedy params needs a seed (see :func:`_row_params`). Every call draws one uniform number from
    the generator of each active, non-greedy row; inactive rows draw nothing and get an arbitrary token.
    """

    def __init__(self, params: Sequence[SamplingParams]) -> None:
        self.params = list(params)
        self.greedy = [p.greedy for p in self.params]
        if any(p.seed is None and not p.greedy for p in self.params):
            raise ValueError("Sampler: every sampled (temperature > 0) row needs a seed")
        self.generators = [None if p.greedy else torch.Generator().manual_seed(p.seed) for p in self.params]
        self._key: tuple[int, torch.device] | None = None  # (vocab, device) the tensors below were built for

    def _setup(self, vocab: int, device: torch.device) -> None:
        ps = self.params
        self._key = (vocab, device)
        self._temperature = torch.tensor([p.temperature if p.temperature > 0 else 1.0 for p in ps], device=device)
        self._top_k = torch.tensor([p.top_k for p in ps], dtype=torch.int64, device=device)
        self._top_p = torch.tensor([p.top_p for p in ps], device=device)
        self._min_p = torch.tensor([p.min_p for p in ps], device=device) if any(p.min_p > 0 for p in ps) else None
        self._greedy = torch.tensor(self.greedy, device=device)
        self._suppress = None
        if any(p.suppress_token_ids for p in ps):
            mask = torch.zeros(len(ps), vocab, dtype=torch.bool)
            for i, p in enumerate(ps):
                ids = [t for t in p.suppress_token_ids if 0 <= t < vocab]
                mask[i, ids] = True
            if mask.all(dim=-1).any():
                raise ValueError("Sampler: a row suppresses every token id")
            self._suppress = mask.to(device)

    def __call__(self, logits: torch.Tensor, active: Sequence[bool] | None = None) -> torch.Tensor:
        """Next token (B,) int64 on the logits' device for logits (B, V)."""
        b, vocab = logits.shape
        if b != len(self.params):
            raise ValueError(f"Sampler: logits have {b} rows but the sampler has {len(self.params)}")
        if self._key != (vocab, logits.device):
            self._setup(vocab, logits.device)
        if self._suppress is not None:
            logits = logits.masked_fill(self._suppress, float("-inf"))
        argmax = logits.argmax(dim=-1)
        if all(self.greedy):
            return argmax
        active = [True] * b if active is None else active
        u = torch.tensor([float(torch.rand((), generator=g)) if a and not greedy else 0.0
                          for g, a, greedy in zip(self.generators, active, self.greedy)], dtype=torch.float32)
        probs, order = _sorted_filtered_probs(logits, self._temperature, self._top_k, self._top_p, self._min_p)
        cdf = probs.cumsum(dim=-1)
        u = u.to(logits.device)[:, None] * cdf[:, -1:]
        # the first index whose cdf exceeds u has nonzero probability; the clamp guards rounding at the end
        pick = torch.searchsorted(cdf, u, right=True).clamp_(max=vocab - 1)
        sampled = order.gather(-1, pick)[:, 0]
        return torch.where(self._greedy, argmax, sampled)


def _check_prompts(model: nn.Module, prompts: Sequence[Sequence[int]], rows: list[SamplingParams],
                   max_len: int | None) -> int:
    """Validate prompt ids and lengths; return the cache length needed."""
    cfg = model.cfg
    if max_len is not None and max_len > cfg.max_seq_len:
        raise ValueError(f"max_len={max_len} exceeds model.max_seq_len={cfg.max_seq_len}")
    limit, what = (cfg.max_seq_len, "model.max_seq_len") if max_len is None else (max_len, "max_len")
    need = 0
    for i, (prompt, p) in enumerate(zip(prompts, rows)):
        if len(prompt) == 0:
            raise ValueError(f"prompt {i} is empty: generation needs at least one token to condition on")
        bad = [t for t in prompt if not 0 <= t < cfg.vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token id {bad[0]} outside the model vocabulary [0, {cfg.vocab_size})")
        total = len(prompt) + p.max_new_tokens
        if total > limit:
            raise ValueError(f"prompt {i} has {len(prompt)} tokens and max_new_tokens={p.max_new_tokens}: "
                             f"{total} tokens exceed {what}={limit}")
        need = max(need, total)
    return need if max_len is None else max_len


def _model_device(model: nn.Module) -> torch.device:
    return model.tok_embeddings.weight.device


@torch.no_grad()
def generate(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams | Sequence[SamplingParams],
    *,
    max_len: int | None = None,
    on_token: Callable[[int, int], None] | None = None,
) -> list[list[int]]:
    """New tokens for each prompt (not the prompt), decoded together with a KV cache.

    A row ends after ``max_new_tokens`` tokens or right after emitting one of its stop tokens, which is
    then the last token of its output. ``params``: one for all prompts (row ``i`` seeded ``seed + i``) or
    one per prompt. ``max_len``: the cache length (default: the longest prompt + max_new_tokens).
    ``on_token(row, token)`` is called for every new token as soon as it is chosen (streaming).
    Every step runs one forward for the whole batch; finished rows add nothing to the cache.
    """
    n = len(prompts)
    rows = _row_params(params, n)
    prompts = [[int(t) for t in p] for p in prompts]
    cache_len = _check_prompts(model, prompts, rows, max_len)
    out: list[list[int]] = [[] for _ in range(n)]
    active = [p.max_new_tokens > 0 for p in rows]
    if not any(active):
        return out
    device = _model_device(model)
    lens = [len(p) for p in prompts]
    tokens = torch.zeros(n, max(lens), dtype=torch.int64)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.tensor(p)
    cache = KVCache.for_model(model, n, cache_len)
    logits = model(tokens.to(device), cache=cache.step(lens))
    last = logits[torch.arange(n, device=device), torch.tensor(lens, device=device) - 1]
    sampler = Sampler(rows)
    stops = [set(p.stop_token_ids or ()) for p in rows]
    while True:
        nxt = sampler(last, active)
        for i, tok in enumerate(nxt.tolist()):
            if not active[i]:
                continue
            out[i].append(tok)
            if on_token is not None:
                on_token(i, tok)
            if tok in stops[i] or len(out[i]) >= rows[i].max_new_tokens:
                active[i] = False
        if not any(active):
            return out
        last = model(nxt[:, None], cache=cache.step([int(a) for a in active]))[:, 0]


@torch.no_grad()
def generate_reference(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams | Sequence[SamplingParams],
) -> list[list[int]]:
    """What :func:`generate` returns, computed slowly: one row at a time, the whole sequence every step."""
    rows = _row_params(params, len(prompts))
    prompts = [[int(t) for t in p] for p in prompts]
    _check_prompts(model, prompts, rows, None)
    device = _model_device(model)
    out = []
    for prompt, p in zip(prompts, rows):
        sampler, seq, new = Sampler([p]), list(prompt), []
        stops = set(p.stop_token_ids or ())
        while len(new) < p.max_new_tokens:
            logits = model(torch.tensor([seq], device=device))[:, -1]
            tok = int(sampler(logits)[0])
            seq.append(tok)
            new.append(tok)
            if tok in stops:
                break
        out.append(new)
    return out


def _text_params(p: SamplingParams, tokenizer: Tokenizer, model_vocab: int, allow_special: bool) -> SamplingParams:
    specials = tokenizer.special_tokens
    stops = p.stop_token_ids
    if stops is None:
        stops = tuple(specials[s] for s in (EOS, END_OF_DIALOG) if s in specials)
    suppress = set(p.suppress_token_ids) | set(range(tokenizer.vocab_size, model_vocab))  # ids it cannot decode
    if not allow_special:
        suppress |= set(specials.values()) - set(stops)
    return dataclasses.replace(p, stop_token_ids=stops, suppress_token_ids=tuple(sorted(suppress)))


class _TextStream:
    """Turns each row's new tokens into text pieces, holding back a trailing partial UTF-8 character."""

    def __init__(self, tokenizer: Tokenizer, n: int, on_text: Callable[[int, str], None]) -> None:
        self.tokenizer, self.on_text = tokenizer, on_text
        self.tokens: list[list[int]] = [[] for _ in range(n)]
        self.sent = [""] * n

    def push(self, row: int, tokens: list[int], final: bool = False) -> None:
        self.tokens[row] = tokens
        text = self.tokenizer.decode(tokens)
        if text.endswith("\ufffd") and not final:
            return
        if text.startswith(self.sent[row]) and len(text) > len(self.sent[row]):
            self.on_text(row, text[len(self.sent[row]):])
            self.sent[row] = text


def generate_text(
    model: nn.Module,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    params: SamplingParams | Sequence[SamplingParams] | None = None,
    *,
    allow_special: bool = False,
    on_text: Callable[[int, str], None] | None = None,
    max_len: int | None = None,
) -> list[str]:
    """Completions of text prompts (the prompt not included, nor the stop token that ended a row).

    Stop tokens default to the tokenizer's ``<|eos|>`` and ``<|end_of_dialog|>`` (when
    ``params.stop_token_ids`` is None). Other special tokens, and ids beyond the tokenizer's vocabulary,
    are never sampled unless ``allow_special`` (out-of-vocabulary ids never are).
    ``on_text(row, piece)`` receives each row's text as it grows (streaming).
    """
    params = SamplingParams() if params is None else params
    rows = _row_params(params, len(prompts))  # resolve seeds before rewriting stops
    rows = [_text_params(p, tokenizer, model.cfg.vocab_size, allow_special) for p in rows]
    ids = [tokenizer.encode(p) for p in prompts]
    for i, x in enumerate(ids):
        if not x:
            raise ValueError(f"prompt {i} encodes to no tokens: give at least one character of text")
    stream = _TextStream(tokenizer, len(prompts), on_text) if on_text is not None else None
    stops = [set(p.stop_token_ids or ()) for p in rows]
    new: list[list[int]] = [[] for _ in prompts]

    def on_token(row: int, tok: int) -> None:
        new[row].append(tok)
        if stream is not None and tok not in stops[row]:
            stream.push(row, new[row])

    out = generate(model, ids, rows, max_len=max_len, on_token=on_token)
    texts = []
    for i, toks in enumerate(out):
        if toks and toks[-1] in stops[i]:
            toks = toks[:-1]
        if stream is not None:
            stream.push(i, toks, final=True)
        texts.append(tokenizer.decode(toks))
    return texts


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a file: ``.jsonl``: one JSON string or ``{"prompt": ...}`` per line (for prompts with
    newlines); any other file: one prompt per non-empty line."""
    from lmlab.data.errors import DataError
    from lmlab.data.text import read_text

    path = Path(path)
    if not path.is_file():
        raise DataError(f"prompts file {path} does not exist")
    text = read_text(path)  # DataError naming the file for an unreadable, binary or empty file
    if path.suffix != ".jsonl":
        prompts = [line for line in text.splitlines() if line.strip()]
    else:
        prompts = []
        for no, item in iter_jsonl(path, text, DataError):
            if isinstance(item, dict):
                item = item.get("prompt")
            if not isinstance(item, str):
                raise DataError(f'{path}:{no}: expected a JSON string or an object with a "prompt" string')
            prompts.append(item)
    if not prompts:
        raise DataError(f"prompts file {path} holds no prompt")
    return prompts
