"""An lm-evaluation-harness model for lmlab run folders, and ``lmlab lm-eval``.

:class:`LmlabLM` (registered in ``lm_eval`` as ``"lmlab"`` when this module is imported) loads a run's checkpoint
with lmlab's own code (:func:`lmlab.train.checkpoint.load_run`: the run's config, model and tokenizer) and
answers the harness's three kinds of request the way its Hugging Face model (``HFLM``) does, so that a task gives
the same scores through both on the same weights (``tests/test_harness.py`` checks it):

* ``loglikelihood``: context and continuation encoded as ``TemplateLM`` does (trailing spaces of the context move
  to the continuation; the pair is encoded whole and split after the context's tokens), the window left-truncated
  to ``max_length + 1`` tokens, float32 log-softmax, and ``is_greedy`` (every continuation token is the argmax).
  Requests are sorted by length (longest first, like HFLM); requests whose model inputs are identical (the choices
  of a multiple-choice question whose continuations are one token) share one forward; each forward takes
  ``batch_size`` inputs, packed into as few rows as possible of the longest one's width (a block-diagonal document
  mask keeps them apart), and the output head runs only at the scored positions.
* ``loglikelihood_rolling``: the disjoint rolling windows of ``lm_eval.utils.get_rolling_token_windows`` /
  ``make_disjoint_window`` (first window after the prefix token, then ``max_length`` windows with one token of
  context), each scored as above, summed per document.
* ``generate_until``: through :class:`lmlab.inference.Engine` (continuous batching, ``batch_size`` sequences at once,
  prefix cache): greedy unless the request samples (``do_sample`` with a temperature > 0; ``top_p`` / ``top_k`` /
  ``min_p`` passed on), at most ``max_gen_toks`` new tokens, the context left-truncated to ``max_length -
  max_gen_toks`` tokens; it stops at the end-of-text token or once the text holds one of the ``until`` strings, and
  the answer is the text (special tokens left out, as HFLM's ``skip_special_tokens``) cut before the first of them.

Token rules (lmlab's tokenizers, mirrored from HFLM's):

* ``Tokenizer.encode`` never adds a BOS token and encodes text that spells a control token (``"<|endoftext|>"``) as
  plain text; a Hugging Face tokenizer would turn such text into the control token (no task text does this).
* **End of text** (``eot_token_id``; HFLM: the tokenizer's ``eos_token``): the vocabulary's own ``<|endoftext|>``
  (a tokenizer.json's or tiktoken encoding's) when it has one, else lmlab's ``<|eos|>`` special.
* **Prefix token** (``prefix_token_id``; HFLM: ``bos_token`` when the tokenizer has one, else ``eos_token``), the
  context of a continuation scored with an empty context and the first token of a rolling window: lmlab's
  ``<|bos|>`` special when the tokenizer has it, else the end-of-text token.
* ``prefix_token=`` / ``eot_token=`` (token literals) override both, e.g. to match HFLM on a pretrained model whose
  tokenizer_config.json names other tokens (SmolLM2-Instruct: ``<|im_start|>`` / ``<|im_end|>``).

Usage::

    lmlab lm-eval runs/NAME --tasks my_mc,my_ppl --include-path tasks/ --batch-size 8      # table + RUN/lm_eval/*.json
    lmlab lm-eval runs/NAME --tasks my_gen --limit 50 --num-fewshot 3 --output out/gen.json

    import lm_eval
    from lm_eval.tasks import TaskManager
    from lmlab.evals.harness import LmlabLM                 # registers "lmlab" in lm_eval
    lm = LmlabLM(pretrained="runs/NAME", batch_size=8)     # or step=, max_length=, device=, dtype=
    results = lm_eval.simple_evaluate(model=lm, tasks=["my_mc"], task_manager=TaskManager(include_path="tasks/"))
    lm_eval.simple_evaluate(model="lmlab", model_args="pretrained=runs/NAME,batch_size=8", tasks=[...])

With ``--apply-chat-template`` (lm_eval's ``apply_chat_template=True``) each document becomes a conversation written
in the run's dialog format (:meth:`LmlabLM.apply_chat_template`; ChatML runs as transformers' template writes them).

Exit status of ``lmlab lm-eval``: 0 done; 1 a bad run folder or checkpoint; 2 bad usage (an unknown task, a bad
option value). Without ``--include-path``, or when a task is not found there, lm_eval's own task index is read
(several seconds); tasks that fetch their data from the Hugging Face hub need network access.
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import os
import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from lmlab.tokenizers import BOS, EOS, DialogTokenizer, Tokenizer
from lmlab.train.checkpoint import CheckpointError, load_run, step_of

__all__ = ["LmlabLM", "control_tokens", "main"]

log = logging.getLogger(__name__)

ENDOFTEXT = "<|endoftext|>"
_DTYPES = {"float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
           "half": torch.float16}


def _token_of(tokenizer: Tokenizer, literal: str) -> int | None:
    try:
        return tokenizer.token_id(literal)
    except KeyError:
        return None


def control_tokens(tokenizer: Tokenizer, prefix_token: str | None = None,
                   eot_token: str | None = None) -> tuple[int, int]:
    """``(prefix id, end-of-text id)`` of ``tokenizer``: end of text is the vocabulary's own ``<|endoftext|>``, else
    lmlab's ``<|eos|>``; the prefix is lmlab's ``<|bos|>``, else the end of text (HFLM: ``bos_token`` when the
    tokenizer has one, else ``eos_token``). ``prefix_token`` / ``eot_token`` (literals) override the rules."""
    def named(literal: str, what: str) -> int:
        tid = _token_of(tokenizer, literal)
        if tid is None:
            raise ValueError(f"{what}={literal!r} is not a token of {tokenizer.name}")
        return tid

    if eot_token:
        eot = named(eot_token, "eot_token")
    else:
        eot = next((t for t in (_token_of(tokenizer, lit) for lit in (ENDOFTEXT, EOS)) if t is not None), None)
        if eot is None:
            raise ValueError(f"{tokenizer.name} has neither {ENDOFTEXT} nor {EOS}: give eot_token=<a token of its "
                             "vocabulary> (the token that ends a text)")
    if prefix_token:
        return named(prefix_token, "prefix_token"), eot
    return (tokenizer.special_id(BOS) if BOS in tokenizer.special_tokens else eot), eot


@register_model("lmlab")
class LmlabLM(TemplateLM):
    """An lmlab run folder as an ``lm_eval`` model (see the module docstring for the rules it follows).

    ``pretrained``: the run folder; ``step``: its checkpoint (default: the newest that loads); ``batch_size``: inputs
    per forward, sequences decoded at once; ``max_length``: tokens of context (default and cap: the model's
    ``max_seq_len``); ``max_gen_toks``: default generation length (256, as HFLM); ``device`` (default: cuda when
    available), ``dtype`` (float32, bfloat16, float16; log-probabilities are float32 whatever the weights);
    ``prefix_token`` / ``eot_token``: token literals overriding the prefix and end-of-text rules.
    """

    def __init__(self, pretrained: str | os.PathLike, step: int | None = None, batch_size: int | str = 1,
                 max_length: int | None = None, max_gen_toks: int = 256, device: str | None = None,
                 dtype: str | torch.dtype = "float32", prefix_token: str | None = None, eot_token: str | None = None,
                 max_batch_size: int | None = None, **kwargs: Any) -> None:
        super().__init__()
        if kwargs:
            log.warning("lmlab lm_eval model: ignoring arguments %s", sorted(kwargs))
        run = Path(pretrained)
        if not run.exists():
            raise CheckpointError(f"{run}: no such run folder")
        if not run.is_dir():
            raise CheckpointError(f"{run}: not a run folder (a file, not a folder)")
        self._batch_size = _positive_int(batch_size, "batch_size")
        self._max_gen_toks = _positive_int(max_gen_toks, "max_gen_toks")
        if isinstance(dtype, str):
            if dtype == "auto":
                dtype = "float32"
            if dtype not in _DTYPES:
                raise ValueError(f"dtype: expected one of {sorted(_DTYPES)} or auto, got {dtype!r}")
            dtype = _DTYPES[dtype]
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.run_config, model, self.tokenizer, path = load_run(
            run, step=None if step is None else int(step), device=device, with_path=True)
        self.model = model.to(dtype)
        self.run_dir, self.step = run, step_of(path)
        self._device = torch.device(device)
        limit = self.model.cfg.max_seq_len
        self._max_length = limit if max_length is None else _positive_int(max_length, "max_length")
        if self._max_length > limit:
            raise ValueError(f"max_length={self._max_length} is more than the model's max_seq_len={limit}")
        self._prefix, self._eot = control_tokens(self.tokenizer, prefix_token, eot_token)
        # ids a generation never reports as text: lmlab's specials and the two control tokens (HFLM decodes with
        # skip_special_tokens)
        self._skip = set(self.tokenizer.special_tokens.values()) | {self._eot, self._prefix}
        self._engine = None
        self._chat: re.Pattern[str] | None = None  # set once a chat template was applied: control tokens in text

    # ---- what lm_eval reads ------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self._eot

    @property
    def prefix_token_id(self) -> int:
        return self._prefix

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name

    def get_model_info(self) -> dict[str, Any]:
        return {"run": str(self.run_dir), "step": self.step, "model_num_parameters": self.model.num_params(),
                "model_dtype": str(next(self.model.parameters()).dtype), "max_length": self.max_length}

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs: Any) -> list[int]:
        """lmlab's encoding (never a BOS token, whatever ``add_special_tokens`` says), optionally left-truncated.
        Once a chat template is applied (``--apply_chat_template``), the vocabulary's control tokens spelled in the
        text are read as those tokens, as transformers' tokenizers (and so HFLM) read them."""
        if self._chat is None:
            ids = self.tokenizer.encode(string)
        else:
            ids = []
            for i, piece in enumerate(self._chat.split(string)):
                if i % 2:
                    ids.append(self._controls[piece])
                elif piece:
                    ids.extend(self.tokenizer.encode(piece))
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The conversation as the run's dialog format writes it (:class:`~lmlab.tokenizers.DialogTokenizer`:
        lmlab's turns or ChatML, with the run's default system message), as text that :meth:`tok_encode` reads back
        to the same ids. ``add_generation_prompt`` false continues the last (assistant) message: no end after it."""
        dialogs = DialogTokenizer(self.tokenizer)
        turns = [{"source": m["role"], "content": m["content"]} for m in chat_history]
        if add_generation_prompt or not turns or turns[-1]["source"] != "assistant":
            ids = dialogs.encode_prompt(turns)
        else:
            ids = dialogs.encode_prompt(turns[:-1]) + self.tokenizer.encode(turns[-1]["content"])
        if self._chat is None:
            own = self.tokenizer._own_tokens()  # the vocabulary's added tokens (e.g. <|im_start|>), by text
            self._controls = {**self.tokenizer.special_tokens, **own}
            literals = sorted(self._controls, key=len, reverse=True)
            self._chat = re.compile("(" + "|".join(re.escape(x) for x in literals) + ")")
        return self.tokenizer.decode(ids)

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        """The run's dialog format, for lm_eval's records (the rendering is :meth:`apply_chat_template`)."""
        return f"lmlab dialog format: {DialogTokenizer(self.tokenizer).format}" if chat_template else None

    def tok_decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([i for i in ids if i not in self._skip])

    # ---- scoring -------------------------------------------------------------------------------------------
    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows: list[tuple[None, list[int], list[int]]] = []
        owner: list[int] = []
        for i, req in enumerate(requests):
            (text,) = req.args
            pairs = get_rolling_token_windows(token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                                              max_seq_len=self.max_length, context_len=1)
            for ctx, cont in map(make_disjoint_window, pairs):
                windows.append((None, ctx, cont))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[i] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    @torch.inference_mode()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        """``(log p(continuation | context), is_greedy)`` for ``(key, context ids, continuation ids)`` requests."""
        inputs: dict[tuple[int, ...], int] = {}  # model input -> index in seqs
        seqs: list[tuple[int, ...]] = []
        scored: list[int] = []  # positions scored at the end of each input (its longest continuation)
        users: dict[int, list[int]] = defaultdict(list)  # input -> requests that read it
        for r, (_, ctx, cont) in enumerate(requests):
            if not ctx or not cont:
                raise ValueError(f"loglikelihood request {r}: empty context or continuation tokens")
            if len(cont) > self.max_length:
                raise ValueError(f"loglikelihood request {r}: a continuation of {len(cont)} tokens does not fit in "
                                 f"max_length={self.max_length}")
            inp = tuple((ctx + cont)[-(self.max_length + 1):][:-1])
            u = inputs.setdefault(inp, len(seqs))
            if u == len(seqs):
                seqs.append(inp)
                scored.append(0)
            scored[u] = max(scored[u], len(cont))
            users[u].append(r)
        order = sorted(range(len(seqs)), key=lambda u: (-len(seqs[u]), seqs[u]))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="lmlab loglikelihood")
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            for u, logprobs in zip(chunk, self._score(chunk, seqs, scored)):
                for r in users[u]:
                    cont = requests[r][2]
                    rows = logprobs[-len(cont):]
                    target = torch.tensor(cont, device=rows.device)
                    answer = (float(rows.gather(1, target[:, None]).sum()), bool((rows.argmax(-1) == target).all()))
                    results[r] = answer
                    if requests[r][0] is not None:
                        self.cache_hook.add_partial("loglikelihood", requests[r][0], answer)
                bar.update(len(users[u]))
        bar.close()
        return results  # type: ignore[return-value]

    def _score(self, chunk: list[int], seqs: list[tuple[int, ...]], scored: list[int]) -> list[torch.Tensor]:
        """Float32 log-probabilities (scored[u], vocab) at the last positions of each input of ``chunk``, from one
        forward: inputs packed first-fit into rows as wide as the longest one (inputs come longest first)."""
        width = len(seqs[chunk[0]])
        rows: list[list[int]] = []
        used: list[int] = []
        for u in chunk:
            n = len(seqs[u])
            row = next((i for i, w in enumerate(used) if w + n <= width), None)
            if row is None:
                rows.append([])
                used.append(0)
                row = len(rows) - 1
            rows[row].append(u)
            used[row] += n
        tokens = torch.zeros(len(rows), width, dtype=torch.long)
        docs = torch.zeros(len(rows), width, dtype=torch.long)
        at = torch.zeros(len(rows), width, dtype=torch.bool)
        placed: list[tuple[int, int]] = []  # (input, its scored positions), in the row-major order of ``at``
        for i, row in enumerate(rows):
            pos = 0
            for j, u in enumerate(row):
                n = len(seqs[u])
                tokens[i, pos:pos + n] = torch.tensor(seqs[u])
                docs[i, pos:pos + n] = j
                at[i, pos + n - scored[u]:pos + n] = True
                placed.append((u, scored[u]))
                pos += n
            docs[i, pos:] = len(row)  # padding: a document of its own
        packed = any(len(row) > 1 for row in rows)
        dev = self._device
        logits = self.model(tokens.to(dev), doc_ids=docs.to(dev) if packed else None, logits_at=at.to(dev))
        logprobs = F.log_softmax(logits.float(), dim=-1)
        out: dict[int, torch.Tensor] = {}
        offset = 0
        for u, k in placed:
            out[u] = logprobs[offset:offset + k]
            offset += k
        return [out[u] for u in chunk]

    # ---- generation ----------------------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from lmlab.inference import Engine, Request, SamplingParams

        eot_text = self.tokenizer.decode([self.eot_token_id])
        undecodable = tuple(range(self.tokenizer.vocab_size, self.model.cfg.vocab_size))
        reqs, stops, ignored = [], [], set()
        for i, inst in enumerate(requests):
            context, gen_kwargs = inst.args
            kw = dict(normalize_gen_kwargs(gen_kwargs, self.max_gen_toks))
            until = handle_stop_sequences(kw.pop("until", None), eos=eot_text)
            max_gen = int(kw.pop("max_gen_toks"))
            room = self.max_length - max_gen
            if room <= 0:
                raise ValueError(f"generate_until request {i}: max_gen_toks={max_gen} leaves no room for a context "
                                 f"in max_length={self.max_length}")
            sample = bool(kw.pop("do_sample", False))
            temperature = float(kw.pop("temperature", 0.0) or 0.0)
            params = {k: kw.pop(k) for k in ("top_p", "top_k", "min_p", "seed") if k in kw}
            params = params if sample else {}  # meaningless for greedy decoding
            ignored.update(kw)
            prompt = self.tok_encode(context, left_truncate_len=room) or [self.prefix_token_id]
            sp = SamplingParams(max_new_tokens=max_gen, temperature=temperature if sample else 0.0,
                                stop_token_ids=(self.eot_token_id,),
                                suppress_token_ids=undecodable, **params)
            reqs.append(Request(prompt=prompt, params=sp, stop_strings=[s for s in until if s], id=i))
            stops.append(until)
        if ignored:
            log.warning("generate_until: ignoring generation arguments %s", sorted(ignored))
        if self._engine is None:  # a pool for batch_size full contexts, or the run's engine.pool_tokens if smaller
            ecfg = self.run_config.engine
            pool = max(self.max_length, min(self.batch_size * self.max_length, ecfg.pool_tokens))
            self._engine = Engine(self.model, self.tokenizer, pool_tokens=pool,
                                  page_size=ecfg.page_size, max_batch=self.batch_size, prefill_chunk=ecfg.prefill_chunk,
                                  cascade_min=ecfg.cascade_min)
        out = [""] * len(reqs)
        bar = tqdm(total=len(reqs), disable=disable_tqdm, desc="lmlab generate_until")
        for ev in self._engine.stream(reqs):
            res = ev.result
            if res is None:
                continue
            toks = res.tokens[:-1] if res.finish_reason == "stop" else res.tokens
            text = postprocess_generated_text(self.tok_decode(toks), stops[ev.index], None)
            out[ev.index] = text
            self.cache_hook.add_partial("generate_until", requests[ev.index].args, text)
            bar.update(1)
        bar.close()
        return out


def _positive_int(value: Any, name: str) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a positive integer, got {value!r}") from None
    if n <= 0 or n != float(value):
        raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    return n


# ---- command line ---------------------------------------------------------------------------------------------
class UsageError(Exception):
    pass


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="lmlab lm-eval", description="Score a run's checkpoint on lm-evaluation-harness "
                                "tasks; print the results table and write them as JSON.")
    p.add_argument("run", help="run folder (runs/NAME)")
    p.add_argument("--tasks", required=True, help="comma-separated task (or group) names")
    p.add_argument("--include-path", action="append", default=[], help="a folder of task YAML files (repeatable)")
    p.add_argument("--limit", type=float, default=None, help="documents per task (N), or a fraction if < 1")
    p.add_argument("--batch-size", type=int, default=8, help="inputs per forward, sequences generated at once (8)")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: each task's own)")
    p.add_argument("--output", default=None, help="JSON file for the results (default RUN/lm_eval/TASKS.json)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    p.add_argument("--max-length", type=int, default=None, help="context length (default: model.max_seq_len)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1... (default: cuda when available)")
    p.add_argument("--dtype", default="float32", choices=sorted(_DTYPES), help="weights' dtype (float32)")
    p.add_argument("--log-samples", action="store_true", help="also write each document's requests and answers")
    p.add_argument("--seed", type=int, default=0, help="seed of lm_eval's sampling and few-shot draws (0)")
    p.add_argument("--apply-chat-template", action="store_true",
                   help="render each document as a conversation in the run's dialog format (lmlab or ChatML)")
    return p.parse_args(argv)


def _task_manager(names: list[str], include: list[str]):
    from lm_eval.tasks import TaskManager

    for d in include:
        if not Path(d).is_dir():
            raise UsageError(f"--include-path {d}: no such folder")
    if include:  # lm_eval's own index takes seconds to read: only when a task is not in the given folders
        tm = TaskManager(include_path=include, include_defaults=False)
        if all(n in tm.all_tasks for n in names):
            return tm
    tm = TaskManager(include_path=include or None)
    missing = [n for n in names if n not in tm.all_tasks]
    if missing:
        close = {n: difflib.get_close_matches(n, tm.all_tasks, n=3) for n in missing}
        hint = "; ".join(f"{n} (close: {', '.join(c)})" if c else n for n, c in close.items())
        raise UsageError(f"unknown task(s): {hint}")
    return tm


def main(argv: list[str] | None = None) -> int:
    """``lmlab lm-eval ...``: 0 on success, 2 on bad usage, 1 when the run's checkpoint cannot be loaded."""
    from lmlab.commands import run_command

    return run_command(_run, argv, UsageError, CheckpointError, prog="lmlab lm-eval")


def _run(argv: list[str] | None) -> int:
    import lm_eval
    from lm_eval.utils import handle_non_serializable, make_table

    args = _parse(argv)
    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not names:
        raise UsageError("--tasks: give at least one task name")
    if args.batch_size <= 0:
        raise UsageError("--batch-size must be >= 1")
    limit = args.limit
    if limit is not None:
        if limit <= 0 or (limit >= 1 and limit != int(limit)):
            raise UsageError(f"--limit: a number of documents (>= 1) or a fraction in (0, 1), got {limit}")
        limit = int(limit) if limit >= 1 else limit
    tm = _task_manager(names, args.include_path)
    try:
        lm = LmlabLM(args.run, step=args.step, batch_size=args.batch_size, max_length=args.max_length,
                     device=args.device, dtype=args.dtype)
    except ValueError as e:
        raise UsageError(str(e)) from None
    results = lm_eval.simple_evaluate(model=lm, tasks=names, num_fewshot=args.num_fewshot, limit=limit,
                                      task_manager=tm, log_samples=args.log_samples, random_seed=args.seed,
                                      numpy_random_seed=args.seed, torch_random_seed=args.seed,
                                      fewshot_random_seed=args.seed, apply_chat_template=args.apply_chat_template)
    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    out = Path(args.output) if args.output else Path(args.run) / "lm_eval" / f"{'+'.join(names)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False) + "\n")
    tmp.replace(out)
    print(f"results: {out} (run {args.run}, step {lm.step})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
