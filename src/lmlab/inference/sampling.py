"""Sampling primitives, and the text helpers of the generation engine (:class:`~lmlab.inference.engine.Engine`,
the one generator: ``Engine.generate`` for token prompts, ``Engine.generate_text`` for text).

* :class:`SamplingParams`: temperature (0 = greedy), top-k, top-p, min-p, seed, max new tokens, stop and
  suppressed token ids, for one request.
* :class:`Sampler`: a batch of logits -> next tokens, each row with its own params and its own seeded
  random generator, so a request's samples do not depend on what else is in the batch.
* :func:`filtered_probs`: the distribution a row is sampled from, after every filter.
* :func:`row_params`: one params per prompt with a concrete seed (a single params for many prompts seeds
  row ``i`` with ``seed + i``).
* :func:`text_params`: a row's params for text generation with a tokenizer: default stop tokens, special and
  undecodable ids suppressed.
* :class:`TextStream`: each row's new tokens as growing text, for streaming.
* :func:`read_prompts`: prompts from a file, for ``lmlab generate``.

Filters apply in this order: suppressed ids removed, logits divided by the temperature, the ``top_k``
most likely ids kept, then the smallest set of most likely ids whose probability reaches ``top_p``, then
(min-p) only the ids at least ``min_p`` times as likely as the most likely one.
A row draws one uniform number per sampled token from its generator and picks the token where it falls
in the cumulative distribution (ids sorted by probability, ties by id), so any decoding that computes the
same logits (the engine's cached decoding, or a full recomputation of each sequence) draws the same tokens.
Generators live on the CPU: a seed means the same draws on every device.

Usage::

    from lmlab.inference import Engine, Request, SamplingParams
    params = SamplingParams(max_new_tokens=50, temperature=0.8, top_p=0.95, seed=0, stop_token_ids=[tok.eos_id])
    engine = Engine(model, tok, pool_tokens=8192)
    new_ids = [r.tokens for r in engine.generate([Request(prompt=tok.encode("ROMEO:"), params=params)])]
    texts = engine.generate_text(["ROMEO:", "JULIET:"], params, on_text=lambda row, s: print(row, s))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from lmlab.config import SampleConfig, sampling_errors
from lmlab.jsonl import iter_jsonl
from lmlab.tokenizers import END_OF_DIALOG, EOS, Tokenizer

__all__ = [
    "Sampler",
    "SamplingParams",
    "TextStream",
    "filtered_probs",
    "read_prompts",
    "row_params",
    "text_params",
]


@dataclass(frozen=True)
class SamplingParams:
    """How one request is sampled.

    ``stop_token_ids``: generation of a row ends right after it emits one of these (the stop token is the
    last of the result's tokens; text leaves it out). ``None`` means "the default": no stop tokens for a
    token prompt, the tokenizer's ``<|eos|>`` and ``<|end_of_dialog|>`` for text (:func:`text_params`) and for
    the engine's dialog requests. ``suppress_token_ids`` are never sampled (not even greedily).
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


def row_params(params: SamplingParams | Sequence[SamplingParams], n: int) -> list[SamplingParams]:
    """One params per row (prompt) of ``n``, each with a concrete seed.

    A single params stands for every row, row ``i`` seeded ``seed + i`` (so equal prompts give different
    samples). In a list each row keeps its own seed, so a request samples the same in any batch. A null
    seed is drawn from torch's global generator (reproducible under ``torch.manual_seed``). ValueError when a
    list does not hold one params per row.
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

    Each non-greedy params needs a seed (see :func:`row_params`). Every call draws one uniform number from
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


def text_params(p: SamplingParams, tokenizer: Tokenizer, model_vocab: int, allow_special: bool) -> SamplingParams:
    """``p`` for generating text with ``tokenizer`` from a model of ``model_vocab`` ids.

    Stop tokens: ``p.stop_token_ids``, or when None the tokenizer's ``<|eos|>`` and ``<|end_of_dialog|>`` (those
    it has). Suppressed: ``p.suppress_token_ids``, every id the tokenizer cannot decode (``tokenizer.vocab_size``
    and up), and unless ``allow_special`` every special token that is not a stop token.
    """
    specials = tokenizer.special_tokens
    stops = p.stop_token_ids
    if stops is None:
        stops = tuple(specials[s] for s in (EOS, END_OF_DIALOG) if s in specials)
    suppress = set(p.suppress_token_ids) | set(range(tokenizer.vocab_size, model_vocab))  # ids it cannot decode
    if not allow_special:
        suppress |= set(specials.values()) - set(stops)
    return dataclasses.replace(p, stop_token_ids=stops, suppress_token_ids=tuple(sorted(suppress)))


class TextStream:
    """Turns each of ``n`` rows' new tokens into text pieces for ``on_text(row, piece)`` (streaming).

    :meth:`push` takes a row's whole list of new tokens so far; the text decoded from them is sent in pieces,
    each the part not sent before. A trailing partial UTF-8 character (decoded as U+FFFD) is held back until
    the next token completes it, or until the final push; a text that does not extend what was sent (the
    tokenizer decoded earlier tokens differently) sends nothing.
    """

    def __init__(self, tokenizer: Tokenizer, n: int, on_text: Callable[[int, str], None]) -> None:
        self.tokenizer, self.on_text = tokenizer, on_text
        self.tokens: list[list[int]] = [[] for _ in range(n)]
        self.sent = [""] * n

    def push(self, row: int, tokens: list[int], final: bool = False) -> None:
        """Row ``row``'s new tokens are now ``tokens``: send the text they add (``final``: the row's last push)."""
        self.tokens[row] = tokens
        text = self.tokenizer.decode(tokens)
        if text.endswith("\ufffd") and not final:
            return
        if text.startswith(self.sent[row]) and len(text) > len(self.sent[row]):
            self.on_text(row, text[len(self.sent[row]):])
            self.sent[row] = text


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
