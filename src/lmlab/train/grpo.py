"""GRPO: reinforcement learning with verifiable rewards, rollouts through the generation engine with live tools.

``train.objective: grpo`` makes ``lmlab train`` run :class:`GRPOTrainer`, the ordinary :class:`Trainer` (config
tree, run folder, metrics, checkpoints with exact resume, periodic recall, signals, torchrun / FSDP) with a step
of its own. One step:

1. ``rl.prompts_per_step`` questions (recall-set JSONL, :mod:`lmlab.evals.recall`) in a seeded order;
2. ``rl.group_size`` answers to each, sampled by :class:`~lmlab.inference.Engine` at ``rl.temperature`` with the
   SQL tool live (the prefix cache shares each question's prompt within the step and is cleared after the weights
   change); each answer's sampling seed derives from (seed, step, question, sample), so a resumed run draws the
   same rollouts;
3. rewards: the recall evaluation's judge (:func:`lmlab.evals.recall.judge`) scores each answer; the reward is
   the weighted sum of ``rl.rewards`` terms (exact-match value, well-formed tool call, valid SQL, answer template,
   length);
4. advantages: each reward minus its group's mean, divided by the group's standard deviation
   (``rl.scale_rewards``);
5. ``rl.epochs`` passes of ``rl.minibatches`` optimizer steps on the clipped objective (:func:`grpo_token_loss`)
   over the model's own tokens only: prompts, tool answers and the headers the engine inserted carry no loss.

How it departs from the GRPO paper (DeepSeekMath, arXiv 2402.03300), as the lab's defaults:
token-level loss normalisation (every trained token of the step weighs the same, DAPO) unless
``rl.loss_norm: sequence``; the KL penalty is off unless ``rl.kl_coef`` > 0 (then the k3 estimator against
``rl.ref`` or ``train.init_from``); asymmetric clipping is available (``rl.clip_high``); with ``rl.epochs = 1``
and ``rl.minibatches = 1`` the step is on-policy (the ratio is 1 and the clip never binds). The log-probabilities
are those of the temperature-scaled softmax the rollouts were sampled from. The rollout policy is the trained
model's own weights at the start of the step (with several processes each one answers its share of the
questions with a full replica, as the periodic recall does).

Usage::

    lmlab train apps/rl/configs/r1.yaml                      # or: python -m apps.rl.train config=...
    from lmlab.train.grpo import grpo_token_loss, group_advantages
"""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Sequence
from typing import Any

import torch

from lmlab.config import Config, ConfigError, RewardsConfig
from lmlab.data.errors import DataError
from lmlab.evals.recall import RecallQuestion, build_tool, judge, load_questions
from lmlab.inference import Engine, Request, Result, SamplingParams
from lmlab.models import eval_mode
from lmlab.tokenizers import DialogError, DialogTokenizer
from lmlab.train.optim import set_lr
from lmlab.train.trainer import Trainer, autocast

__all__ = ["GRPOTrainer", "PromptLoader", "group_advantages", "grpo_token_loss", "rollout_reward", "rollout_seed",
           "token_logprobs", "train_run"]



# ---- the objective, as plain functions (tests compare them with a hand computation) ----------------------------
def group_advantages(rewards: torch.Tensor, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """(groups, group_size) rewards -> advantages: each reward minus its group's mean, divided by the group's
    standard deviation (unbiased, as TRL's GRPO) plus ``eps`` when ``scale``. A group whose answers all scored the
    same gets 0 everywhere (it teaches nothing)."""
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if not scale:
        return centred
    return centred / (rewards.std(dim=1, keepdim=True) + eps)


def grpo_token_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, clip_low: float,
                    clip_high: float, ref_logp: torch.Tensor | None = None, kl_coef: float = 0.0,
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The per-token GRPO loss over N trained tokens (all inputs of shape (N,)): ``-min(r A, clip(r, 1 - clip_low,
    1 + clip_high) A) + kl_coef * k3``, with ``r = exp(logp - old_logp)`` and the k3 estimator of KL(policy || ref)
    ``exp(ref - logp) - (ref - logp) - 1``. Returns the losses and per-token statistics: ``clipped`` (the clipped
    term was the smaller one: no gradient from that token), ``ratio`` and ``kl`` (zeros without a reference)."""
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * adv
    loss = -torch.minimum(unclipped, clipped)
    kl = torch.zeros_like(logp)
    if ref_logp is not None:
        d = ref_logp - logp
        kl = torch.exp(d) - d - 1.0
        if kl_coef:
            loss = loss + kl_coef * kl
    stats = {"clipped": (clipped < unclipped).detach(), "ratio": ratio.detach(), "kl": kl.detach()}
    return loss, stats


def token_logprobs(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                   temperature: float = 1.0) -> torch.Tensor:
    """Log-probabilities of ``targets[mask]`` (row-major order) under ``softmax(logits / temperature)`` of
    ``model(inputs)``; the output head runs only at the masked positions."""
    logits = model(inputs, logits_at=mask).float()
    if temperature != 1.0:
        logits = logits / temperature
    return torch.log_softmax(logits, dim=-1).gather(1, targets[mask].unsqueeze(1)).squeeze(1)


def rollout_seed(seed: int, step: int, question: int, sample: int) -> int:
    """The sampling seed of one answer: a hash of (run seed, step, question index, sample), independent of the
    batch it is generated in and of the process, so a resumed run draws the same rollouts."""
    digest = hashlib.blake2b(f"{seed}/{step}/{question}/{sample}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


REWARD_TERMS = ("correct", "tool_call", "valid_sql", "format", "length")


def rollout_reward(question: RecallQuestion, result: Result, weights: RewardsConfig, max_new_tokens: int,
                   tool_live: bool) -> tuple[float, dict[str, float]]:
    """The reward of one answer and its terms (unweighted): the judge's verdict (exact value, tool call, valid SQL),
    whether the final answer follows a template, and the fraction of ``max_new_tokens`` sampled."""
    verdict = judge(question, result, tool_live=tool_live)
    n_sampled = sum(result.sampled_mask())
    terms = {"correct": float(verdict["correct"]), "tool_call": float(verdict["tool_call"]),
             "valid_sql": float(verdict["valid_sql"]), "format": float(verdict["predicted"] is not None),
             "length": n_sampled / max_new_tokens}
    return sum(getattr(weights, k) * v for k, v in terms.items()), terms


# ---- the question order ---------------------------------------------------------------------------------------
class PromptLoader:
    """The questions of ``rl.prompts`` in a seeded order, a new permutation each epoch; each step takes the next
    ``per_step`` of them (all processes together) and this process answers every ``world``-th, from ``rank``.
    Its state (epoch, position) is the run's data position in checkpoints."""

    def __init__(self, questions: Sequence[RecallQuestion], per_step: int, rank: int, world: int, seed: int,
                 files: Sequence[str]) -> None:
        if per_step > len(questions):
            raise ConfigError(f"rl.prompts_per_step={per_step} is more than the {len(questions)} questions of "
                              f"{list(files)}")
        self.questions, self.per_step, self.rank, self.world, self.seed = questions, per_step, rank, world, seed
        self.epoch, self.index = 0, 0
        self.source = self  # what Trainer.resume reads the fingerprint from
        self._files = [str(f) for f in files]

    def fingerprint(self) -> dict[str, Any]:
        return {"kind": "rl_prompts", "files": self._files, "questions": len(self.questions)}

    def _order(self) -> list[int]:
        order = list(range(len(self.questions)))
        random.Random(f"{self.seed}/{self.epoch}").shuffle(order)
        return order

    def next_batch(self) -> list[tuple[int, RecallQuestion]]:
        """This process's share of the next step's questions, as (index in the files, question)."""
        order, picked = self._order(), []
        while len(picked) < self.per_step:  # a step never straddles two epochs' permutations halfway: it wraps
            if self.index >= len(order):
                self.epoch, self.index = self.epoch + 1, 0
                order = self._order()
            picked.append(order[self.index])
            self.index += 1
        return [(i, self.questions[i]) for i in picked[self.rank::self.world]]

    def state_dict(self) -> dict[str, Any]:
        return {"source": self.fingerprint(), "epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("source") != self.fingerprint():
            raise DataError(f"the checkpoint's questions {state.get('source')} are not this run's "
                            f"{self.fingerprint()}: restore rl.prompts or start a new run")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])

    def __enter__(self) -> PromptLoader:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


# ---- the trainer ----------------------------------------------------------------------------------------------
class GRPOTrainer(Trainer):
    """:class:`Trainer` whose step is a GRPO step over rollouts (see the module docstring)."""

    def __init__(self, cfg: Config):
        if cfg.train.objective != "grpo":
            raise ConfigError(f"train.objective: GRPOTrainer runs 'grpo', got {cfg.train.objective!r}")
        rl = cfg.rl
        super().__init__(cfg)
        if rl.prompts_per_step % self.par.dp_size:
            raise ConfigError(f"rl.prompts_per_step={rl.prompts_per_step} does not divide by the {self.par.dp_size} "
                              "data-parallel processes")
        self.dialog_tokenizer = (self.tokenizer if isinstance(self.tokenizer, DialogTokenizer)
                                 else DialogTokenizer(self.tokenizer))
        self.tool = build_tool(rl.db) if rl.db else None
        self._engine: Engine | None = None
        self.ref_model = None
        if rl.kl_coef > 0:
            self.ref_model = self.frozen_model(rl.ref or cfg.train.init_from, "rl.ref: reference")

    def build_loaders(self, dp_rank: int, dp_size: int) -> None:
        rl = self.cfg.rl
        questions: list[RecallQuestion] = []
        for path in rl.prompts:
            questions.extend(load_questions(path))
        seed = (rl.seed if rl.seed is not None else self.cfg.seed) + self.seed_offset
        self.train_loader = PromptLoader(questions, rl.prompts_per_step, dp_rank, dp_size, seed, rl.prompts)

    def _rollout_engine(self) -> Engine:
        model = self._eval_model()
        if self._engine is None or self._engine.runner.model is not model:
            self._engine = Engine.from_config(model, self.dialog_tokenizer, self.cfg.engine,
                                              tools=[self.tool] if self.tool is not None else [])
        return self._engine

    @torch.no_grad()
    def rollout(self, batch: Sequence[tuple[int, RecallQuestion]], step: int) -> list[list[Result]]:
        """``rl.group_size`` sampled answers to each question, through the engine (tool live)."""
        rl = self.cfg.rl
        seed = (rl.seed if rl.seed is not None else self.cfg.seed) + self.seed_offset
        requests = []
        for gi, (index, q) in enumerate(batch):
            try:
                self.dialog_tokenizer.encode_prompt(q.dialog)
            except DialogError as e:
                raise DataError(f"rl.prompts: question {index} ({q.person!r}, {q.attribute!r}): {e}") from None
            for g in range(rl.group_size):
                params = SamplingParams(max_new_tokens=rl.max_new_tokens, temperature=rl.temperature,
                                        seed=rollout_seed(seed, step, index, g))
                requests.append(Request(dialog=q.dialog, params=params, id=(gi, g)))
        engine = self._rollout_engine()
        engine.clear_cache()  # the weights changed since the last step's rollouts
        with eval_mode(engine.runner.model):
            results = engine.generate(requests)
        g = rl.group_size
        return [results[i * g:(i + 1) * g] for i in range(len(batch))]

    def _rows(self, results: Sequence[Result]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Right-padded (inputs, targets, mask) of prompt + answer rows; the mask marks the sampled targets."""
        seqs = [list(r.prompt) + list(r.tokens) for r in results]
        width = max(len(s) for s in seqs) - 1
        inputs = torch.zeros(len(seqs), width, dtype=torch.long)
        targets = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros(len(seqs), width, dtype=torch.bool)
        for i, (s, r) in enumerate(zip(seqs, results)):
            n = len(s) - 1
            inputs[i, :n] = torch.tensor(s[:-1])
            targets[i, :n] = torch.tensor(s[1:])
            start = len(r.prompt) - 1  # target j is token j + 1: the first answer token is target len(prompt) - 1
            mask[i, start:start + len(r.tokens)] = torch.tensor(r.sampled_mask(), dtype=torch.bool)
        return inputs.to(self.device), targets.to(self.device), mask.to(self.device)

    def _logprobs(self, model: torch.nn.Module, rows: tuple[torch.Tensor, ...]) -> torch.Tensor:
        with autocast(self.device, self.cfg.train.dtype):
            return token_logprobs(model, *rows, temperature=self.cfg.rl.temperature)

    def train_step(self) -> dict[str, Any]:
        rl, par, timer = self.cfg.rl, self.par, self.timer
        step = self.step + 1
        with timer.phase("data"):
            batch = self.train_loader.next_batch()
        t0 = time.perf_counter()
        with timer.phase("rollout"):
            groups = self.rollout(batch, step)
        rollout_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        rewards, terms = [], {k: 0.0 for k in REWARD_TERMS}
        for (_, q), group in zip(batch, groups):
            row = []
            for r in group:
                value, parts = rollout_reward(q, r, rl.rewards, rl.max_new_tokens, self.tool is not None)
                row.append(value)
                for k, v in parts.items():
                    terms[k] += v
            rewards.append(row)
        reward = torch.tensor(rewards, dtype=torch.float64)
        adv = group_advantages(reward, scale=rl.scale_rewards).float()
        results = [r for group in groups for r in group]
        adv_flat = adv.flatten().to(self.device)
        rows = self._rows(results)
        n_answers = len(results)
        tokens_per_answer = rows[2].sum(dim=1)

        lr = self._lr()
        set_lr(self.optimizer, lr)
        needs_old = rl.epochs * rl.minibatches > 1
        with timer.phase("forward"), torch.no_grad():
            old = self._logprobs(self.step_model, rows) if needs_old else None
            ref = self._logprobs(self.ref_model, rows) if self.ref_model is not None else None
        token_row = rows[2].nonzero()[:, 0]  # the answer each trained token belongs to
        parts = [range(i, n_answers, rl.minibatches) for i in range(rl.minibatches)]
        sums = {"loss": 0.0, "clipped": 0.0, "ratio": 0.0, "kl": 0.0, "nll": 0.0, "tokens": 0.0, "gnorm": 0.0}
        for _ in range(rl.epochs):
            for part in parts:
                idx = torch.tensor(list(part), device=self.device)
                sub = tuple(t[idx] for t in rows)
                keep = torch.isin(token_row, idx)  # this part's tokens, in the same row-major order as sub's mask
                counts = torch.tensor([float(sub[2].sum()), float(len(idx))], dtype=torch.float64)
                n_tokens, n_seqs = par.all_reduce_dp(counts.to(self.device)).tolist()
                self.optimizer.zero_grad(set_to_none=True)
                with par.no_sync(self.step_model, last=True), par.loss_context():
                    with timer.phase("forward"):
                        logp = self._logprobs(self.step_model, sub)
                        old_p = old[keep] if old is not None else logp.detach()
                        ref_p = ref[keep] if ref is not None else None
                        tok_adv = adv_flat[idx].repeat_interleave(sub[2].sum(dim=1))
                        loss_tok, stats = grpo_token_loss(logp, old_p, tok_adv, rl.clip_low, rl.clip_high, ref_p,
                                                          rl.kl_coef)
                        if rl.loss_norm == "token":
                            weight = torch.full_like(loss_tok, 1.0 / max(n_tokens, 1.0))
                        else:  # each answer's mean over its tokens, averaged over the answers
                            per = tokens_per_answer[idx].clamp(min=1).repeat_interleave(sub[2].sum(dim=1))
                            weight = 1.0 / (per.float() * max(n_seqs, 1.0))
                        loss = (loss_tok * weight).sum()
                    with timer.phase("backward"):
                        (loss * par.dp_size).backward()  # the processes' gradients are averaged: scale back to sums
                with timer.phase("optim"):
                    gnorm = float(self._clip_gradients())
                    self._check_finite(float(loss.detach()), gnorm)
                    self.optimizer.step()
                sums["loss"] += float(loss.detach())
                sums["gnorm"] += gnorm
                sums["clipped"] += float(stats["clipped"].sum())
                sums["ratio"] += float(stats["ratio"].sum())
                sums["kl"] += float(stats["kl"].sum())
                sums["nll"] += float(-logp.detach().sum())
                sums["tokens"] += float(len(logp))
        train_s = time.perf_counter() - t1
        updates = rl.epochs * rl.minibatches
        n_sampled = sum(sum(r.sampled_mask()) for r in results)
        local = torch.tensor([reward.sum().item(), (reward ** 2).sum().item(), float(reward.numel()),
                              *(terms[k] for k in REWARD_TERMS), float(n_sampled),
                              float((reward.std(dim=1) == 0).sum()), float(len(groups)), sums["clipped"],
                              sums["ratio"], sums["kl"], sums["nll"], sums["tokens"],
                              float(sum(len(r.tool_calls) for r in results)),
                              float(sum(r.finish_reason == "length" for r in results)), sums["loss"]],
                             dtype=torch.float64)
        tot = par.all_reduce_dp(local.to(self.device)).tolist()
        s, s2, n = tot[0], tot[1], max(tot[2], 1.0)
        term = dict(zip(REWARD_TERMS, tot[3:3 + len(REWARD_TERMS)]))
        (sampled, flat_groups, n_groups, clipped, ratio, kl, nll, toks, calls, truncated,
         loss_sum) = tot[3 + len(REWARD_TERMS):]
        toks = max(toks, 1.0)
        logged = {"rl/reward": s / n, "rl/reward_std": max(s2 / n - (s / n) ** 2, 0.0) ** 0.5,
                  **{f"rl/{k}": v / n for k, v in term.items()},
                  "rl/response_tokens": sampled / n, "rl/tool_calls": calls / n, "rl/truncated": truncated / n,
                  "rl/zero_std_groups": flat_groups / max(n_groups, 1.0), "rl/clip_frac": clipped / toks,
                  "rl/ratio": ratio / toks, "rl/kl": kl / toks, "rl/nll": nll / toks,
                  "rl/rollout_s": rollout_s, "rl/train_s": train_s,
                  "rl/rollout_share": rollout_s / max(rollout_s + train_s, 1e-9),
                  "rl/rollout_tokens_per_s": sampled / max(rollout_s, 1e-9) / max(par.dp_size, 1)}
        positions = int(par.all_reduce_dp(torch.tensor(float(rows[0].numel() * updates),
                                                       device=self.device)).item())
        self.step += 1
        self.tokens_seen += positions
        return {"loss": loss_sum / updates, "grad_norm": sums["gnorm"] / updates, "lr": lr,
                "positions": positions, "targets": int(toks), "log": logged}


def build_trainer(cfg: Config) -> Trainer:
    """The trainer of ``train.objective``: :class:`Trainer` (lm) or :class:`GRPOTrainer` (grpo)."""
    return GRPOTrainer(cfg) if cfg.train.objective == "grpo" else Trainer(cfg)


def train_run(cfg: Config) -> dict[str, Any]:
    """Train the run ``cfg`` names to its end (resuming if it can) and return the summary; a run that
    ``train.restart``'s deciding evaluation sends back starts over with the next attempt's seeds, in this process,
    until one trains to the end (or the attempts run out: the last one always does)."""
    while True:
        trainer = build_trainer(cfg)
        summary = trainer.fit()
        status = str(summary.get("status", ""))
        if not status.startswith("restart: "):
            return summary
        trainer.abandon_attempt(status.removeprefix("restart: "))
        del trainer
