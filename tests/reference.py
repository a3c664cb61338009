"""The slow reference decoder that the generation engine is tested against (the oracle of the engine tests).

:func:`generate_reference` decodes one row at a time, recomputing the whole sequence at every step, with no
cache of any kind: it shares only the model's plain forward and the library's :class:`Sampler` /
:func:`row_params` with :class:`lmlab.inference.Engine`, so a bug in the engine's cache, batching or scheduling
shows as a difference. :func:`reference_text` is the text level over it (what ``Engine.generate_text`` must
return).

Usage (the tests directory is on ``sys.path`` under pytest)::

    from reference import generate_reference
    want = generate_reference(model, prompts, SamplingParams(max_new_tokens=12, temperature=0))
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lmlab.inference.sampling import Sampler, SamplingParams, row_params, text_params
from lmlab.tokenizers import Tokenizer


def check_prompts(model: nn.Module, prompts: Sequence[Sequence[int]], rows: Sequence[SamplingParams]) -> None:
    """ValueError naming the first bad prompt: empty, with an id outside the model's vocabulary, or too long
    for ``model.cfg.max_seq_len`` with its ``max_new_tokens``."""
    cfg = model.cfg
    for i, (prompt, p) in enumerate(zip(prompts, rows)):
        if len(prompt) == 0:
            raise ValueError(f"prompt {i} is empty: generation needs at least one token to condition on")
        bad = [t for t in prompt if not 0 <= t < cfg.vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token id {bad[0]} outside the model vocabulary [0, {cfg.vocab_size})")
        total = len(prompt) + p.max_new_tokens
        if total > cfg.max_seq_len:
            raise ValueError(f"prompt {i} has {len(prompt)} tokens and max_new_tokens={p.max_new_tokens}: "
                             f"{total} tokens exceed model.max_seq_len={cfg.max_seq_len}")


@torch.no_grad()
def generate_reference(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams | Sequence[SamplingParams],
) -> list[list[int]]:
    """New tokens for each prompt (not the prompt), as ``Engine.generate`` returns them in ``Result.tokens``.

    ``params``: one for every prompt (row ``i`` seeded ``seed + i``) or one per prompt (:func:`row_params`). A row
    ends after ``max_new_tokens`` tokens or right after one of its stop tokens (then its last token). Slow: one
    row at a time, the whole sequence through the model for every new token.
    """
    rows = row_params(params, len(prompts))
    prompts = [[int(t) for t in p] for p in prompts]
    check_prompts(model, prompts, rows)
    device = next(model.parameters()).device
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


def reference_text(
    model: nn.Module,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    params: SamplingParams | Sequence[SamplingParams],
    *,
    allow_special: bool = False,
) -> list[str]:
    """What ``Engine.generate_text`` returns: the same stops and suppressed ids (:func:`text_params`), the same
    seeds, each completion decoded without the stop token that ended it."""
    rows = [text_params(p, tokenizer, model.cfg.vocab_size, allow_special) for p in row_params(params, len(prompts))]
    new = generate_reference(model, [tokenizer.encode(p) for p in prompts], rows)
    return [tokenizer.decode(t[:-1] if t and t[-1] in r.stop_token_ids else t) for t, r in zip(new, rows)]
