"""What a finetune costs a model's general abilities: KL to its base model, bits per byte, multiple choice.

The in-tool learning paper (arXiv 2508.20755, Section 6) finetunes pretrained models on facts, in-weight or
in-tool, and measures the damage to everything else. Three measures, each of a model against its base (the
weights the finetune started from), on data that the finetune never saw:

* **KL to the base** on a fixed set of general prompts: the base model answers each prompt once (greedy, through
  the engine); both models then read prompt + answer, and the mean over the answer's tokens of
  ``KL(p_base || p_model)`` of their next-token distributions (nats per token) says how far the finetuned model's
  predictions drifted where it should behave as before. 0 for the base itself.
* **Bits per byte** of held-out text (disjoint windows of ``seq_len`` tokens; the loss summed over the tokens
  divided by ln 2 x the text's UTF-8 bytes, so that tokenizers compare).
* **Multiple choice, HellaSwag's format** (``{"context", "endings", "label"}``): each ending scored by its
  log-likelihood after the context; ``acc`` takes the best sum, ``acc_norm`` the best sum per byte of the ending
  (lm-evaluation-harness's acc_norm).

And for a model finetuned to use a tool, :func:`tool_use`: the share of the general prompts it answers by calling
the tool (live) instead of answering; the KL's split into the answers' first token (``kl_first``) and the rest
(``kl_rest``) says whether a finetune changed how answers start or what they say.

:func:`build_cloze_items` makes such items from any plain text (a passage's last sentence completes its first
ones; the other endings are last sentences of other passages), for machines where no benchmark data is at hand.
:func:`retention` runs the three measures for a model and its base and reports each with the ratio to the base.

Usage::

    from lmlab.evals.retention import retention, build_cloze_items, base_answers
    answers = base_answers(base, dtok, prompts)                        # once per base model
    report = retention(model, base, tokenizer, answers, text=held_out, items=build_cloze_items(text2, 200))
    report["kl"], report["bpb"], report["bpb_base"], report["mc/acc_norm"], report["mc/acc_norm_rel"]
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.tokenizers import DialogTokenizer, Tokenizer

__all__ = ["base_answers", "bits_per_byte", "build_cloze_items", "greedy_answers", "kl_to_base", "multiple_choice",
           "retention", "tool_use"]


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _padded(seqs: Sequence[Sequence[int]], device: torch.device) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    out = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = torch.as_tensor(list(s), dtype=torch.long)
    return out.to(device)


def _log_probs(model: nn.Module, seqs: Sequence[Sequence[int]]) -> torch.Tensor:
    """(B, T, V) float32 log-probabilities of the next token after each position, sequences right-padded (a
    causal model's predictions at real positions do not depend on the padding after them)."""
    tokens = _padded(seqs, _device(model))
    return F.log_softmax(model(tokens).float(), dim=-1)


def _batches(n: int, size: int) -> list[range]:
    return [range(i, min(i + size, n)) for i in range(0, n, size)]


@torch.no_grad()
def greedy_answers(model: nn.Module, dtok: DialogTokenizer, prompts: Sequence[Any], max_new_tokens: int = 64,
                   tools: Sequence[Any] = (), max_batch: int = 32) -> list[Any]:
    """The model's greedy answer to each prompt (a dialog, or a plain string taken as one user turn) through the
    engine, with ``tools`` live: the engine's results (``tool_calls`` lists the calls the model made). Up to
    ``max_batch`` answers are decoded together (a decode step reads every weight once, whatever the batch)."""
    from lmlab.inference import Engine, Request, SamplingParams

    dialogs = [[{"source": "user", "content": p}] if isinstance(p, str) else list(p) for p in prompts]
    engine = Engine(model, dtok, pool_tokens=max(min(model.cfg.max_seq_len, 4096) * 8, max_batch * 512),
                    max_batch=max_batch, tools=tools)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    was = model.training
    model.eval()
    try:
        return engine.generate([Request(dialog=d, params=params) for d in dialogs])
    finally:
        model.train(was)


def base_answers(base: nn.Module, dtok: DialogTokenizer, prompts: Sequence[Any], max_new_tokens: int = 64,
                 ) -> list[tuple[list[int], int]]:
    """The base model's greedy answer to each prompt: ``(prompt + answer tokens, prompt length)`` pairs, what
    :func:`kl_to_base` scores."""
    return [(list(r.prompt) + list(r.tokens), len(r.prompt))
            for r in greedy_answers(base, dtok, prompts, max_new_tokens)]


def tool_use(model: nn.Module, dtok: DialogTokenizer, prompts: Sequence[Any], tool: Any,
             max_new_tokens: int = 48) -> tuple[dict[str, float], list[str]]:
    """How often the model calls ``tool`` when answering prompts that need none (general questions): a finetune on
    tool dialogs that learned *how* to call the tool but not *when* calls it for everything. Returns
    ``{"general_tool_call_rate": share of prompts answered with a call}`` and the answers' texts."""
    results = greedy_answers(model, dtok, prompts, max_new_tokens, tools=[tool])
    rate = sum(bool(r.tool_calls) for r in results) / max(len(results), 1)
    return {"general_tool_call_rate": rate}, [r.text or "" for r in results]


@torch.no_grad()
def kl_to_base(model: nn.Module, base: nn.Module, sequences: Sequence[tuple[Sequence[int], int]],
               batch_size: int = 8) -> dict[str, float]:
    """Mean ``KL(p_base || p_model)`` (nats) over the scored tokens: for each ``(tokens, start)`` the predictions of
    tokens ``start .. len - 1`` (the answer). Also the largest per-sequence mean, the count, and the mean split into
    the answers' first token (``kl_first``: how the model starts an answer, e.g. a finetune that now opens with a
    tool call) and the tokens after it (``kl_rest``: what it says once started)."""
    total, count, worst = 0.0, 0, 0.0
    first, n_first = 0.0, 0
    for idx in _batches(len(sequences), batch_size):
        seqs = [list(sequences[i][0]) for i in idx]
        lp_model, lp_base = _log_probs(model, seqs), _log_probs(base, seqs)
        kl = (lp_base.exp() * (lp_base - lp_model)).sum(-1)  # (B, T): KL of the prediction made at each position
        for row, i in enumerate(idx):
            toks, start = sequences[i]
            if len(toks) <= start:
                continue
            per = kl[row, start - 1:len(toks) - 1]  # the predictions of tokens start .. len-1
            total += per.sum().item()
            count += per.numel()
            worst = max(worst, per.mean().item())
            first += per[0].item()
            n_first += 1
    nan = float("nan")
    return {"kl": total / count if count else nan, "kl_max_seq": worst, "kl_tokens": count,
            "kl_first": first / n_first if n_first else nan,
            "kl_rest": (total - first) / (count - n_first) if count > n_first else nan}


@torch.no_grad()
def bits_per_byte(model: nn.Module, tokenizer: Tokenizer, text: str, seq_len: int = 256, batch_size: int = 8,
                  ) -> dict[str, float]:
    """Bits per UTF-8 byte of ``text``: the loss of every token but the first of each disjoint window of
    ``seq_len`` tokens, over the bytes those tokens stand for."""
    ids = tokenizer.encode(text)
    windows = [ids[i:i + seq_len] for i in range(0, len(ids), seq_len)]
    windows = [w for w in windows if len(w) > 1]
    lengths = tokenizer.token_byte_lengths()
    nll, n_bytes, n_tok = 0.0, 0, 0
    for idx in _batches(len(windows), batch_size):
        seqs = [windows[i] for i in idx]
        lp = _log_probs(model, seqs)
        for row, w in enumerate(seqs):
            target = torch.as_tensor(w[1:], device=lp.device)
            nll -= lp[row, :len(w) - 1].gather(-1, target[:, None]).sum().item()
            n_bytes += sum(lengths[t] for t in w[1:])
            n_tok += len(w) - 1
    return {"bpb": nll / (math.log(2) * n_bytes) if n_bytes else float("nan"), "bpb_tokens": n_tok,
            "bpb_bytes": n_bytes}


@torch.no_grad()
def multiple_choice(model: nn.Module, tokenizer: Tokenizer, items: Sequence[Mapping[str, Any]],
                    batch_size: int = 16) -> dict[str, float]:
    """HellaSwag-format accuracy: ``acc`` (highest log-likelihood of the ending after the context) and
    ``acc_norm`` (highest log-likelihood per byte of the ending). The ending's tokens are those of
    ``context + ending`` after the context's own tokens (lm-evaluation-harness's split)."""
    pairs: list[tuple[list[int], int, int]] = []  # (tokens, ending start, ending bytes)
    for i, item in enumerate(items):
        ctx = tokenizer.encode(item["context"])
        if not 0 <= int(item["label"]) < len(item["endings"]):
            raise ValueError(f"multiple-choice item {i}: label {item['label']} is not an index of its "
                             f"{len(item['endings'])} endings")
        for ending in item["endings"]:
            whole = tokenizer.encode(item["context"] + ending)
            start = len(ctx) if whole[:len(ctx)] == ctx else len(tokenizer.encode(item["context"].rstrip()))
            pairs.append((whole, max(start, 1), len(ending.encode("utf-8"))))
    scores = []
    for idx in _batches(len(pairs), batch_size):
        seqs = [pairs[i][0] for i in idx]
        lp = _log_probs(model, seqs)
        for row, i in enumerate(idx):
            toks, start, _ = pairs[i]
            target = torch.as_tensor(toks[start:], device=lp.device)
            scores.append(lp[row, start - 1:len(toks) - 1].gather(-1, target[:, None]).sum().item())
    acc = acc_norm = 0
    k = 0
    for item in items:
        n = len(item["endings"])
        s, b = scores[k:k + n], [p[2] for p in pairs[k:k + n]]
        k += n
        acc += max(range(n), key=lambda j: s[j]) == int(item["label"])
        acc_norm += max(range(n), key=lambda j: s[j] / max(b[j], 1)) == int(item["label"])
    n_items = max(len(items), 1)
    return {"mc/acc": acc / n_items, "mc/acc_norm": acc_norm / n_items, "mc/n": len(items)}


_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def build_cloze_items(text: str, n: int, endings: int = 4, seed: int = 0, min_words: int = 5,
                      max_words: int = 30) -> list[dict[str, Any]]:
    """HellaSwag-format items from plain text: passages of 3 consecutive sentences (each ``min_words`` to
    ``max_words`` words, whitespace collapsed); the context is the first two, the right ending the third (with its
    leading space), the wrong endings third sentences of other passages of similar length. Deterministic in
    ``seed``. Fewer than ``n`` items when the text has fewer passages."""
    sentences = [" ".join(s.split()) for para in re.split(r"\n\s*\n", text) for s in _SENTENCE.split(para)]
    ok = [min_words <= len(s.split()) <= max_words and not re.search(r"[*=`|<>{}\[\]]", s) for s in sentences]
    passages = [(sentences[i] + " " + sentences[i + 1], " " + sentences[i + 2])
                for i in range(0, len(sentences) - 2, 3) if ok[i] and ok[i + 1] and ok[i + 2]]
    seen: set[str] = set()
    passages = [p for p in passages if not (p[1] in seen or seen.add(p[1]))]  # one passage per ending
    rng = random.Random(seed)
    rng.shuffle(passages)
    passages = passages[:n]
    if len(passages) < endings:
        return []
    by_len = sorted(range(len(passages)), key=lambda i: len(passages[i][1]))
    rank = {p: r for r, p in enumerate(by_len)}
    items = []
    for i, (context, right) in enumerate(passages):
        r = rank[i]
        near = [by_len[j] for j in range(max(0, r - 3 * endings), min(len(by_len), r + 3 * endings + 1)) if j != r]
        wrong = [passages[j][1] for j in rng.sample(near, endings - 1)]
        label = rng.randrange(endings)
        options = wrong[:label] + [right] + wrong[label:]
        items.append({"context": context, "endings": options, "label": label})
    return items


def retention(model: nn.Module, base: nn.Module, tokenizer: Tokenizer,
              answers: Sequence[tuple[Sequence[int], int]] = (), text: str = "",
              items: Sequence[Mapping[str, Any]] = (), seq_len: int = 256, batch_size: int = 8,
              base_scores: Mapping[str, float] | None = None) -> dict[str, float]:
    """The three measures for ``model`` against ``base``: ``kl`` (and ``kl_max_seq``), ``bpb`` with ``bpb_base`` and
    ``bpb_rel`` (= bpb_base / bpb: 1 when nothing was lost, below 1 when the text got harder to predict),
    ``mc/acc``, ``mc/acc_norm`` with ``*_base`` and ``*_rel`` (model / base). Parts without data are skipped.
    ``base_scores``: the base's own bpb / mc results from an earlier call (they do not change between runs)."""
    was = (model.training, base.training)
    model.eval()
    base.eval()
    out: dict[str, float] = {}
    own = dict(base_scores or {})
    try:
        if answers:
            out.update(kl_to_base(model, base, answers, batch_size))
        if text:
            out.update(bits_per_byte(model, tokenizer, text, seq_len, batch_size))
            if "bpb" not in own:
                own.update(bits_per_byte(base, tokenizer, text, seq_len, batch_size))
            out["bpb_base"] = own["bpb"]
            out["bpb_rel"] = own["bpb"] / out["bpb"]
        if items:
            out.update(multiple_choice(model, tokenizer, items, 2 * batch_size))
            if "mc/acc" not in own:
                own.update(multiple_choice(base, tokenizer, items, 2 * batch_size))
            for key in ("mc/acc", "mc/acc_norm"):
                out[f"{key}_base"] = own[key]
                out[f"{key}_rel"] = out[key] / own[key] if own[key] else float("nan")
    finally:
        model.train(was[0])
        base.train(was[1])
    return out
