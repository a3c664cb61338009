"""Fact recall through the generation engine, with live tool calls.

A recall set is a JSONL file, one question per line::

    {"dialog": [{"source": "user", "content": "What does Ada Smith do for a living?"}],
     "value": "teacher", "answer_regex": ["Ada Smith works as a (?P<value>.+?)\\\\.", ...],
     "attribute": "occupation", "person": "Ada Smith"}

Every question is answered greedily by :class:`~lmlab.inference.Engine` (all of them batched), with the tool
(e.g. :class:`lmlab.tools.sql.SqlTool`) live: when the model emits ``<|database|>``, the query in its message
runs and the answer is injected before the model goes on. A question is **correct** when the final assistant
turn full-matches one of its ``answer_regex`` patterns and the pattern's ``value`` group equals ``value``
exactly (the value is parsed out of the sentence; a suffix or substring match does not count). Reported
separately, as fractions of all questions:

* ``tool_call_rate``: the model emitted a tool call whose message held a well-formed call (a ```sql block);
* ``valid_sql_rate``: that first call ran without error (parsed, allowed and executed by the tool);
* ``correct``: the parsed answer equals the expected value.

Each wrong answer is also classified by what went wrong first (``miss`` in its verdict; ``miss/<kind>`` in the
metrics, as fractions of all questions): ``no_tool_call`` (a tool was live and nothing was asked of it),
``invalid_sql`` (the call was refused or failed), ``query_missed`` (the call ran but its answer does not hold the
value: e.g. the name miscopied into the query), ``value_miscopied`` (the answer held the value, the final
sentence has another one), ``no_template`` (the final sentence matches no answer pattern), ``wrong_value``
(no tool: a parsed value, but not the right one) and ``cut_off`` (the final sentence stopped at
``max_new_tokens`` right after writing the value, once: a budget too small for the question rather than the
model's miss; raise ``evals.recall.max_new_tokens``, which counts sampled tokens only, not the tool's answers).

Usage::

    from lmlab.evals.recall import evaluate_recall, load_questions
    questions = load_questions("data/eval_ood.jsonl", max_questions=256, seed=0)
    metrics, records = evaluate_recall(model, tokenizer, questions, tool=SqlTool("data/people.sqlite"))
    print(metrics)   # {"correct": 0.97, "tool_call_rate": 1.0, "valid_sql_rate": 0.99, "n": 256}
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import re
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmlab.comm import fork_map, split_gather
from lmlab.config import ConfigError, EngineConfig, RecallEvalConfig
from lmlab.data.errors import DataError
from lmlab.inference import Engine, Request, Result, SamplingParams
from lmlab.jsonl import iter_jsonl
from lmlab.models import eval_mode
from lmlab.tokenizers import DialogError, DialogTokenizer, Tokenizer

log = logging.getLogger(__name__)

__all__ = ["RecallQuestion", "evaluate_recall", "judge", "load_questions", "parse_answer", "recall_metrics",
           "run_recall_sets", "set_name"]


@dataclass
class RecallQuestion:
    """One question: the prompt ``dialog``, the expected ``value`` and the patterns that parse an answer."""

    dialog: list[dict[str, str]]
    value: str
    answer_regex: list[str]
    attribute: str = ""
    person: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def set_name(path: str | os.PathLike) -> str:
    """``data/eval_ood.jsonl`` -> ``ood``: the name a set's metrics are logged under."""
    stem = Path(path).stem
    return stem[len("eval_"):] if stem.startswith("eval_") and len(stem) > 5 else stem


def load_questions(path: str | os.PathLike, max_questions: int = 0, seed: int = 0) -> list[RecallQuestion]:
    """Read a recall set; with ``max_questions`` > 0 keep a seeded subset of that many (in file order).

    Bad lines raise :class:`~lmlab.data.DataError` naming the file and line.
    """
    if not Path(path).is_file():
        raise DataError(f"recall set not found: {path}")
    questions = []
    for lineno, obj in iter_jsonl(path, error=DataError):
        where = f"{path}:{lineno}"
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object with 'dialog', 'value', 'answer_regex'")
        missing = [k for k in ("dialog", "value", "answer_regex") if k not in obj]
        if missing:
            raise DataError(f"{where}: missing {missing} (keys: {sorted(obj)})")
        patterns = obj["answer_regex"]
        patterns = [patterns] if isinstance(patterns, str) else patterns
        if not isinstance(patterns, list) or not patterns or not all(isinstance(p, str) for p in patterns):
            raise DataError(f"{where}: answer_regex must be a string or a non-empty list of strings")
        for p in patterns:
            try:
                if "value" not in re.compile(p).groupindex:
                    raise DataError(f"{where}: answer_regex {p!r} has no (?P<value>...) group")
            except re.error as e:
                raise DataError(f"{where}: answer_regex {p!r} is not a valid regex ({e})") from None
        if not isinstance(obj["dialog"], list) or not isinstance(obj["value"], str):
            raise DataError(f"{where}: 'dialog' must be a list of turns and 'value' a string")
        extra = {k: v for k, v in obj.items() if k not in ("dialog", "value", "answer_regex", "attribute", "person")}
        questions.append(RecallQuestion(obj["dialog"], obj["value"], patterns, str(obj.get("attribute", "")),
                                        str(obj.get("person", "")), extra))
    if not questions:
        raise DataError(f"{path}: no questions")
    if 0 < max_questions < len(questions):
        keep = sorted(random.Random(seed).sample(range(len(questions)), max_questions))
        questions = [questions[i] for i in keep]
    return questions


def parse_answer(text: str, patterns: Sequence[str]) -> str | None:
    """The ``value`` group of the first pattern that full-matches ``text`` (stripped), or None."""
    text = text.strip()
    for p in patterns:
        m = re.fullmatch(p, text, flags=re.DOTALL)
        if m is not None:
            return m.group("value")
    return None


MISSES = ("no_tool_call", "invalid_sql", "query_missed", "value_miscopied", "no_template", "wrong_value", "cut_off")


def miss_kind(value: str, predicted: str | None, calls: Sequence[Sequence[Any]], tool_live: bool,
              final: str = "", finish_reason: str | None = None) -> str | None:
    """What went wrong first in a wrong answer (None when it is right); see the module docstring. ``final``: the
    final assistant turn; ``finish_reason``: the engine's (``"length"``: it hit max_new_tokens)."""
    if predicted == value:
        return None
    if finish_reason == "length" and predicted is None and value and final.endswith(value) and final.count(value) == 1:
        return "cut_off"  # the value written once, last: only the sentence's end is missing
    if calls:
        call, answer = calls[-1]
        if call is None or answer.startswith("error:"):
            return "invalid_sql"
        if value not in re.split(r"\n| \| ", answer):  # one value per line, columns joined by " | "
            return "query_missed"
        return "no_template" if predicted is None else "value_miscopied"
    if tool_live:
        return "no_tool_call"
    return "no_template" if predicted is None else "wrong_value"


def judge(question: RecallQuestion, result: Result, tool_live: bool = False) -> dict[str, Any]:
    """The verdict on one answered question (see the module docstring for the rates and the kinds of miss)."""
    calls = result.tool_calls
    tool_call = bool(calls) and calls[0][0] is not None
    valid_sql = tool_call and not calls[0][1].startswith("error:")
    turns = result.dialog or []
    answered = [t["content"] for t in turns[len(question.dialog):] if t["source"] == "assistant"]
    final = answered[-1] if answered else ""
    predicted = parse_answer(final, question.answer_regex)
    return {"person": question.person, "attribute": question.attribute, "value": question.value,
            "tool_call": tool_call, "valid_sql": valid_sql, "correct": predicted == question.value,
            "predicted": predicted, "answer": final, "finish_reason": result.finish_reason,
            "calls": [list(c) for c in calls],
            "miss": miss_kind(question.value, predicted, calls, tool_live, final, result.finish_reason)}


@torch.no_grad()
def evaluate_recall(model: nn.Module, tokenizer: Tokenizer | DialogTokenizer, questions: Sequence[RecallQuestion],
                    *, tool: Any = None, engine_cfg: EngineConfig | None = None, max_new_tokens: int = 160,
                    max_batch: int = 0) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Answer every question greedily (batched through the engine, ``tool`` live); return the metrics and one
    verdict per question. ``max_batch`` > 0 decodes that many questions together (at most the number of
    questions) instead of ``engine_cfg.max_batch``, with a KV pool grown to hold them all at their longest (prompt
    + ``max_new_tokens``)."""
    dtok = tokenizer if isinstance(tokenizer, DialogTokenizer) else DialogTokenizer(tokenizer)
    ecfg = engine_cfg or EngineConfig()
    prompts = encode_questions(dtok, questions, max_new_tokens)
    if max_batch and questions:
        rows = min(max_batch, len(questions))
        longest = max(len(p) for p in prompts) + max_new_tokens
        ecfg = dataclasses.replace(ecfg, max_batch=rows, pool_tokens=max(ecfg.pool_tokens, rows * longest))
    engine = Engine.from_config(model, dtok, ecfg, tools=[tool] if tool is not None else [])
    encode_questions(dtok, questions, max_new_tokens, engine.context_limit, prompts=prompts)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    requests = [Request(dialog=q.dialog, params=params, id=i) for i, q in enumerate(questions)]
    with eval_mode(model):
        results = engine.generate(requests)
    records = [judge(q, r, tool_live=tool is not None) for q, r in zip(questions, results)]
    return recall_metrics(records), records


def encode_questions(dtok: DialogTokenizer, questions: Sequence[RecallQuestion], max_new_tokens: int,
                     limit: int | None = None, where: str = "", prompts: list[list[int]] | None = None
                     ) -> list[list[int]]:
    """Each question's prompt tokens (``prompts``: already encoded); a question that does not encode is a DataError,
    one whose prompt and ``max_new_tokens`` pass ``limit`` tokens a ConfigError, each naming the question
    (``where``: its set)."""
    out = []
    for i, q in enumerate(questions):
        who = f"{where}question {i}" + (f" ({q.person!r}, {q.attribute!r})" if q.person or q.attribute else "")
        if prompts is None:
            try:
                prompt = dtok.encode_prompt(q.dialog)
            except DialogError as e:
                raise DataError(f"{who}: {e}") from None
        else:
            prompt = prompts[i]
        if limit is not None and len(prompt) + max_new_tokens > limit:
            raise ConfigError(f"evals.recall.max_new_tokens={max_new_tokens}: {who} has {len(prompt)} prompt tokens, "
                              f"and with {max_new_tokens} new ones exceeds the {limit}-token context "
                              "(model.max_seq_len, engine pool): lower it")
        out.append(prompt)
    return out


def recall_metrics(records: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Recall, tool-call and valid-SQL rates, the count, and the share of each kind of miss, from verdicts."""
    n = len(records)
    metrics = {key: sum(r[flag] for r in records) / max(n, 1)
               for key, flag in (("correct", "correct"), ("tool_call_rate", "tool_call"),
                                 ("valid_sql_rate", "valid_sql"))}
    metrics["n"] = n
    for kind in MISSES:
        metrics[f"miss/{kind}"] = sum(r["miss"] == kind for r in records) / max(n, 1)
    return metrics


def build_tool(db: str) -> Any:
    """The SQL tool over ``db`` (read-only; every table of the file allowed)."""
    from lmlab.tools.sql import SqlTool

    if not Path(db).is_file():
        raise DataError(f"recall: database not found: {db}")
    try:
        return SqlTool(db)
    except sqlite3.Error as e:
        raise DataError(f"recall: {db} cannot be read as a SQLite database ({e})") from None


def run_recall_sets(model: nn.Module, tokenizer: Tokenizer, cfg: RecallEvalConfig,
                    engine_cfg: EngineConfig | None = None, out_dir: str | os.PathLike | None = None,
                    step: int | None = None, split: tuple[int, int] | None = None) -> dict[str, float]:
    """Evaluate every set of ``cfg.sets``; return ``{"recall/<set>/<metric>": value}``. With ``out_dir`` and
    ``cfg.save_outputs``, write each question's verdict to ``out_dir/<set>_step<step>.jsonl``.

    ``split=(rank, world_size)`` (every process of a torch.distributed job calls it, each with its own model
    replica): process ``rank`` answers questions ``rank, rank + world_size, ...``; the verdicts are gathered
    in question order, so every process returns the metrics (and writes the file) of the whole set, equal to
    one process answering all. ``cfg.procs > 1`` splits a process's questions the same way across processes
    forked from it (:func:`lmlab.comm.fork_map`, one thread each)."""
    if cfg.procs > 1:
        device = next(model.parameters()).device
        if device.type != "cpu":
            raise ConfigError(f"evals.recall.procs={cfg.procs}: forked evaluation is for CPU models; this one is "
                              f"on {device} (use 1, or one process per device under torchrun)")
    tool = build_tool(cfg.db) if cfg.db else None

    def answer(mine: list[RecallQuestion]) -> list[dict[str, Any]]:
        return evaluate_recall(model, tokenizer, mine, tool=tool, engine_cfg=engine_cfg,
                               max_new_tokens=cfg.max_new_tokens, max_batch=cfg.max_batch)[1]

    def answer_here(mine: list[RecallQuestion]) -> list[dict[str, Any]]:  # this process's share, maybe forked
        return fork_map(mine, answer, cfg.procs) if cfg.procs > 1 else answer(mine)

    # every set's questions in one pass (one engine per process, its batches never run short between sets)
    # (checked here, before any process forks: a bad question is one line naming its set)
    dtok = tokenizer if isinstance(tokenizer, DialogTokenizer) else DialogTokenizer(tokenizer)
    questions: list[RecallQuestion] = []
    spans = []
    for path in cfg.sets:
        qs = load_questions(path, cfg.max_questions, cfg.seed)
        encode_questions(dtok, qs, cfg.max_new_tokens, model.cfg.max_seq_len, where=f"{path}: ")
        spans.append((set_name(path), len(questions), len(questions) + len(qs)))
        questions += qs
    # each process answers its share; the verdicts come back in question order
    records = answer_here(questions) if split is None else split_gather(questions, answer_here, split=split)
    out: dict[str, float] = {}
    for name, a, b in spans:
        mine = records[a:b]
        out.update({f"recall/{name}/{k}": v for k, v in recall_metrics(mine).items()})
        cut = sum(r["miss"] == "cut_off" for r in mine)
        if cut:
            log.warning("recall %s: %d of %d answers stopped at evals.recall.max_new_tokens=%d right after the "
                        "value (counted as misses, kind cut_off): raise it", name, cut, b - a, cfg.max_new_tokens)
        if out_dir is not None and cfg.save_outputs:
            folder = Path(out_dir)
            folder.mkdir(parents=True, exist_ok=True)
            suffix = f"_step{step}" if step is not None else ""
            with open(folder / f"{name}{suffix}.jsonl", "w") as f:
                for r in mine:
                    f.write(json.dumps(r, sort_keys=True) + "\n")
    return out
