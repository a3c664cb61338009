"""The training loop: one config in, a run folder out.

``Trainer(cfg).fit()`` builds tokenizer, model, optimizer and loaders from the config, resumes from the
newest checkpoint of ``runs/NAME`` when there is one, trains ``train.steps`` optimizer steps with gradient
accumulation, clipping and the learning-rate schedule, validates (loss and bits per byte), checkpoints
atomically, writes ``metrics.jsonl``, and stops cleanly on SIGINT/SIGTERM (finishing the step and saving).

Resume is exact: training 2N steps straight, or N steps then a rerun for N more, gives bitwise the same
losses on CPU in float32 (model, optimizer, schedule step, data position and every RNG are restored).

The step is written so that parallelism wraps the model and the data sharding without changing it: the
loss is a sum over target tokens divided by the step's total target count, so any split of a step across
micro-batches (or, later, ranks) gives the same gradient.

With ``data.distill_files`` the dialogs of those files learn a frozen teacher's next-token distributions
(``train.distill``: a KL term at their assistant tokens, :meth:`Trainer._loss_sum`) instead of their own tokens.

Usage::

    lmlab train apps/shakespeare/quick.yaml train.steps=2000 model.dim=256
    python -m lmlab.train apps/shakespeare/quick.yaml
    trainer = Trainer(load_config("cfg.yaml")); summary = trainer.fit()
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from lmlab.config import Config, ConfigError, config_diff, config_to_dict, load_config, save_config
from lmlab.data import build_loader, check_vocab
from lmlab.data.loader import reshard_state
from lmlab.launch.local import ATTEMPT_FILE, read_attempt, read_summary
from lmlab.models import build_model, materialize, resolve_vocab
from lmlab.monitor.metrics import MultiSink, build_sinks, read_metrics
from lmlab.monitor.profiler import StepTimer, TraceWindow, device_peak_flops, peak_memory_mb
from lmlab.tokenizers import Tokenizer, build_tokenizer
from lmlab.train.checkpoint import CheckpointManager, read_rank_states, set_rng_state, step_of
from lmlab.train.distributed import Parallel, clip_grad_norm, fsdp_mixed_dtype, init_distributed
from lmlab.train.optim import build_optimizer, lr_at, set_lr

log = logging.getLogger(__name__)

IGNORE = -100


# Signals that stop a run cleanly (finish the step, save, return): Ctrl-C, kill / preemption, and the user signals
# a scheduler sends before a time limit (Slurm --signal; lmlab.launch.slurm requeues the job after it)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the message names the step and the last good checkpoint."""


class Interrupted(Exception):
    """Raised by the signal handler to stop an evaluation (the weights are saved before every evaluation that a
    signal may cut short) or, on a second signal, whatever runs."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def seed_everything(seed: int) -> None:
    """Seed torch, numpy and python's global generators, so that a run draws the same numbers in any process."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError(f"train.device={name!r} but CUDA is not available on this machine")
    return dev


def uses_bf16(device: torch.device, dtype: str) -> bool:
    """Whether ``train.dtype`` means bf16 autocast on ``device`` (auto: on CUDA)."""
    return dtype == "bfloat16" or (dtype == "auto" and device.type == "cuda")


def autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA by default; float32 on CPU unless ``train.dtype=bfloat16``."""
    if uses_bf16(device, dtype):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def token_byte_lengths(tokenizer: Tokenizer, size: int) -> torch.Tensor:
    """UTF-8 bytes each of ``size`` ids stands for (0 for special and unused ids), for bits per byte."""
    out = torch.zeros(size, dtype=torch.long)
    lengths = tokenizer.token_byte_lengths()
    out[: len(lengths)] = torch.tensor(lengths, dtype=torch.long)
    return out


class Trainer:
    """Builds everything a run needs from ``cfg`` and trains it (see the module docstring)."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.device = resolve_device(cfg.train.device)
        self.env = init_distributed(cfg.parallel, self.device)
        if self.device.type == "cuda" and self.env.distributed:
            self.device = torch.device("cuda", self.env.local_rank)
        self.par = Parallel.build(cfg.parallel, self.env, self.device)
        self.rank, self.world_size = self.env.rank, self.env.world_size
        dp_rank, dp_size = self.par.dp_rank, self.par.dp_size
        if cfg.data.batch_size % dp_size:
            raise ConfigError(f"data.batch_size={cfg.data.batch_size} (the global batch) does not divide by the "
                              f"{dp_size} data-parallel ranks ({self.par.describe()})")
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.run_dir = Path(cfg.run_dir)
        # a run restarted by train.restart trains attempt k with every seed shifted (RUN/attempt.json)
        self.attempt = read_attempt(self.run_dir)
        self.seed_offset = int(self.attempt["seed_offset"])
        seed_everything(cfg.seed + self.seed_offset + self.rank)

        self.tokenizer = build_tokenizer(cfg.tokenizer)
        check_vocab(self.tokenizer, cfg.model.vocab_size)
        self.model_cfg = resolve_vocab(cfg.model, self.tokenizer.vocab_size)
        init_seed = (cfg.model.init.seed if cfg.model.init.seed is not None else cfg.seed) + self.seed_offset
        self.model = materialize(build_model(self.model_cfg, device="meta"), self.device, seed=init_seed)
        if cfg.train.init_from and not (cfg.train.resume and CheckpointManager(self.run_dir).complete()):
            # pretrained weights on every rank before sharding; a run with checkpoints resumes from its own instead
            from lmlab.pretrained import load_init_weights

            log.info("train.init_from: weights of %s", load_init_weights(self.model, self.model_cfg,
                                                                         cfg.train.init_from))
        if cfg.train.float32_modules:
            self._keep_float32(self.model)
        self.teacher = self._build_teacher() if cfg.data.distill_files else None
        self._distill_acc = torch.zeros(2, dtype=torch.float64, device=self.device)  # a step's KL sum, targets
        # the same weights on every rank (one seed), then tensor parallel / FSDP2 / DDP as cfg.parallel says
        self.step_model = self.par.parallelize(self.model, compile=cfg.train.compile)
        optim_cfg = cfg.optim
        if self.par.sizes.tp > 1 and not self.par.fsdp and optim_cfg.impl == "auto":
            # tensor parallel alone leaves the norms' gains plain tensors beside DTensors, which the multi-tensor
            # (foreach / fused) kernels cannot take in one call
            optim_cfg = dataclasses.replace(optim_cfg, impl="loop")
        if optim_cfg.name == "muon" and (self.par.fsdp or self.par.sizes.tp > 1):
            raise ConfigError("optim.name: muon orthogonalises whole matrices, which FSDP2 and tensor parallel shard; "
                              "use it on one process or with DDP (parallel.dp_shard: 1, dp_replicate: N)")
        try:
            self.optimizer = build_optimizer(self.model, optim_cfg, self.device)
        except ValueError as e:  # optim.no_decay naming no matrix of this model
            raise ConfigError(str(e)) from None

        self.val_loader = None
        self.build_loaders(dp_rank, dp_size)
        self.token_bytes = token_byte_lengths(self.tokenizer, self.model_cfg.vocab_size).to(self.device)

        self.ckpt = CheckpointManager(self.run_dir, cfg.train.keep_last)
        self.step = 0
        self.tokens_seen = 0
        self.flops_per_token = self.model.flops_per_token(cfg.data.seq_len)
        self.peak_flops, self.peak_source = cfg.train.peak_flops, "train.peak_flops"
        if not self.peak_flops:
            self.peak_flops, self.peak_source = device_peak_flops(self.device, cfg.profile.measure_peak)
        self.timer = StepTimer(self.device, enabled=cfg.profile.timers)
        self.trace = (TraceWindow(cfg.profile, self.run_dir, self.device, self.rank, self.world_size)
                      if cfg.profile.trace_start else None)
        self.probes: Any = None  # lmlab.monitor.probes.Probes once fit() has resumed (when cfg.probes asks)
        self._stop_signal: int | None = None
        self._in_abortable = False
        self._saved_step: int | None = None
        self._last_ckpt: Path | None = None
        self.early = {"best": None, "since": 0}  # early stopping's state (checkpointed with the run)
        self._early_reason: str | None = None
        self._restart_reason: str | None = None
        self._timed_out = False
        self._stopping = False  # a stop signal, as every process agreed after the last step
        self._recall_at: tuple[int, dict[str, Any]] = (-1, {})  # the step and row of the last periodic recall

    def frozen_model(self, spec: str, what: str) -> torch.nn.Module:
        """A frozen model of the model section's shape (LoRA adapters left out) with the weights of ``spec`` (as
        ``train.init_from``), a plain replica on this process, in eval mode: the distillation teacher, GRPO's
        reference."""
        from lmlab.pretrained import load_init_weights

        plain_cfg = dataclasses.replace(self.model_cfg, lora=dataclasses.replace(self.model_cfg.lora, rank=0))
        model = materialize(build_model(plain_cfg, device="meta"), self.device, seed=0)
        log.info("%s %s", what, load_init_weights(model, plain_cfg, spec))
        return model.eval().requires_grad_(False)

    def _keep_float32(self, model: torch.nn.Module) -> None:
        """``train.float32_modules``: those submodules run in float32 under bf16 autocast (lmlab.train.precision)."""
        from lmlab.train.precision import keep_float32

        if self.par.fsdp and fsdp_mixed_dtype(self.cfg.parallel.param_dtype, self.device) is not None:
            raise ConfigError("train.float32_modules needs float32 parameters, but FSDP2 casts them to bfloat16 "
                              "(parallel.param_dtype): set parallel.param_dtype=float32 and train.dtype=bfloat16")
        try:
            names = keep_float32(model, self.cfg.train.float32_modules)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if model is self.model:
            log.info("train.float32_modules: %d modules run in float32 (%s)", len(names), ", ".join(names[:8]))
            if not uses_bf16(self.device, self.cfg.train.dtype):
                log.warning("train.float32_modules has no effect: train.dtype=%s computes in float32 on %s "
                            "(set train.dtype=bfloat16 for bf16 autocast)", self.cfg.train.dtype, self.device.type)

    def _build_teacher(self) -> torch.nn.Module:
        """The frozen teacher of ``data.distill_files``: ``train.distill.teacher``, else ``train.init_from``."""
        return self.frozen_model(self.cfg.train.distill.teacher or self.cfg.train.init_from, "train.distill: teacher")

    def build_loaders(self, dp_rank: int, dp_size: int) -> None:
        """``self.train_loader`` (and ``self.val_loader`` when the config holds validation data) for this rank; a
        trainer of another objective (lmlab.train.grpo) overrides it. The train loader is what checkpoints save as
        the data position (``state_dict`` / ``load_state_dict``)."""
        cfg = self.cfg
        if cfg.train.objective != "lm":
            raise ConfigError(f"train.objective={cfg.train.objective!r} is not trained by Trainer: build the trainer "
                              "with lmlab.train.build_trainer(cfg) (lmlab train does)")
        data_seed = (cfg.data.seed if cfg.data.seed is not None else cfg.seed) + self.seed_offset
        # data.batch_size is the global batch: each data-parallel rank reads its share (tensor-parallel ranks of
        # one data-parallel rank read the same rows)
        rank_data = dataclasses.replace(cfg.data, batch_size=cfg.data.batch_size // dp_size)
        self.train_loader = build_loader(rank_data, self.tokenizer, "train", dp_rank, dp_size, data_seed)
        if cfg.data.val_files or cfg.data.val_fraction > 0:
            val_cfg = dataclasses.replace(rank_data, prefetch="none")
            self.val_loader = build_loader(val_cfg, self.tokenizer, "val", dp_rank, dp_size, data_seed)
            self._val_start = self.val_loader.state_dict()

    # ---------------------------------------------------------------------------------------------
    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        non_blocking = self.device.type == "cuda"
        return {k: v.to(self.device, non_blocking=non_blocking) for k, v in batch.items()}

    def _loss_sum(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Sum of next-token cross-entropy over the batch's target tokens (float32); with a teacher, the targets
        that ``batch["distill"]`` marks count ``weight * KL(p_teacher || p_model)`` instead (:meth:`_distill_sum`)."""
        if self.teacher is not None and "distill" in batch:
            return self._distill_sum(model, batch)
        targets = batch["targets"]
        kw = {"doc_ids": batch.get("doc_ids"), "positions": batch.get("positions")}
        # the full-logits path under sequence parallel (each process holds a slice of the sequence until the output
        # head gathers it); compiled, the selection of the target positions is a graph break between the trunk and
        # the head, each compiled once for a dynamic number of positions
        if not self.cfg.train.sparse_logits or self.cfg.parallel.sequence_parallel:
            with autocast(self.device, self.cfg.train.dtype):
                logits = model(batch["inputs"], **kw)
            return self._cross_entropy_sum(logits.flatten(0, 1), targets.flatten())
        keep = targets != IGNORE  # the output head and the softmax only where a target is (dialogs: the answers)
        with autocast(self.device, self.cfg.train.dtype):
            logits = model(batch["inputs"], logits_at=keep, **kw)
        return self._cross_entropy_sum(logits, targets[keep])

    def _distill_sum(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Cross-entropy summed over the targets outside ``batch["distill"]`` plus ``train.distill.weight`` x the
        summed ``KL(p_teacher || p_model)`` (float32, nats) at the targets inside it. The teacher reads only the rows
        that hold a distilled target, its output head only at those targets (no gradient)."""
        targets, dis = batch["targets"], batch["distill"]
        kw = {"doc_ids": batch.get("doc_ids"), "positions": batch.get("positions")}
        keep = targets != IGNORE
        with autocast(self.device, self.cfg.train.dtype):
            if not self.cfg.train.sparse_logits:
                logits = model(batch["inputs"], **kw).flatten(0, 1)[keep.flatten()]
            else:
                logits = model(batch["inputs"], logits_at=keep, **kw)
        logp = F.log_softmax(logits.float(), dim=-1)
        d = dis[keep]  # (N,) which of the kept targets distil, in the logits' row-major order
        ce = -logp[~d].gather(1, targets[keep][~d].unsqueeze(1)).sum()
        rows = dis.any(1)
        if not bool(rows.any()):
            return ce
        with torch.no_grad(), autocast(self.device, self.cfg.train.dtype):
            sub = {k: v[rows] if v is not None else None for k, v in kw.items()}
            t_logp = F.log_softmax(self.teacher(batch["inputs"][rows], logits_at=dis[rows], **sub).float(), dim=-1)
        kl = (t_logp.exp() * (t_logp - logp[d])).sum()
        self._distill_acc += torch.stack([kl.detach().double(), d.sum().double()])
        return ce + self.cfg.train.distill.weight * kl

    @staticmethod
    def _cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Summed cross-entropy in float32 of (N, vocab) logits. With ``parallel.loss_parallel`` the logits are a
        DTensor split over the vocabulary and the caller runs this and the backward under
        ``self.par.loss_context()`` (the softmax then runs on the shards)."""
        return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE, reduction="sum")

    def train_step(self) -> dict[str, float]:
        """One optimizer step over ``grad_accum`` micro-batches; returns loss, grad norm, lr, token counts.

        The loss is the sum over the global step's target tokens (every micro-batch of every data-parallel rank)
        divided by their count; DDP and FSDP average gradients over the ``dp`` ranks, so each rank's part is
        scaled by ``dp``: the gradient is the one-process run's, however the step is split."""
        cfg, par, timer, probes = self.cfg, self.par, self.timer, self.probes
        step = self.step + 1
        with timer.phase("data"):
            micro = [self._to_device(next(self.train_loader)) for _ in range(cfg.train.grad_accum)]
        if probes is not None:
            probes.begin(step)
        counts = torch.tensor([float(sum(int((b["targets"] != IGNORE).sum()) for b in micro)),
                               float(sum(b["inputs"].numel() for b in micro))], dtype=torch.float64)
        n_targets, positions = (int(v) for v in par.all_reduce_dp(counts.to(self.device)).tolist())
        lr = self._lr()
        set_lr(self.optimizer, lr)
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        self._distill_acc.zero_()
        scale = par.dp_size / max(n_targets, 1)
        for i, b in enumerate(micro):
            with par.no_sync(self.step_model, last=i == len(micro) - 1), par.loss_context():
                with timer.phase("forward"):
                    loss_sum = self._loss_sum(self.step_model, b)
                with timer.phase("backward"):
                    (loss_sum * scale).backward()
            loss_sum = loss_sum.detach()
            total += loss_sum.full_tensor() if hasattr(loss_sum, "full_tensor") else loss_sum
        if probes is not None:
            probes.after_backward(step)
        with timer.phase("optim"):
            grad_norm = self._clip_gradients()
            total = par.all_reduce_dp(total)
            loss, gnorm = torch.stack([total / max(n_targets, 1), grad_norm.float()]).tolist()
        self._check_finite(loss, gnorm)
        with timer.phase("optim"):
            self.optimizer.step()
        if probes is not None:
            probes.end(step)
        self.step += 1
        self.tokens_seen += positions  # every data-parallel rank's
        out = {"loss": loss, "grad_norm": gnorm, "lr": lr, "positions": positions, "targets": n_targets}
        if self.teacher is not None:  # the KL part of the loss, per distilled target (nats), for the metrics row
            kl_sum, n_distill = par.all_reduce_dp(self._distill_acc).tolist()
            out["log"] = {"distill_share": n_distill / max(n_targets, 1)}
            if n_distill:
                out["log"]["distill_kl"] = kl_sum / n_distill
        return out

    def _clip_gradients(self) -> torch.Tensor:
        """Clip the global gradient norm to ``optim.grad_clip`` (when > 0); return the norm before clipping."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.env.distributed:  # DTensor gradients (FSDP2, tensor parallel), possibly beside plain ones
            return clip_grad_norm(params, self.cfg.optim.grad_clip)
        if self.cfg.optim.grad_clip > 0:
            return torch.nn.utils.clip_grad_norm_(params, self.cfg.optim.grad_clip)
        return torch.nn.utils.get_total_norm([p.grad for p in params])

    def _check_finite(self, loss: float, gnorm: float) -> None:
        """TrainingError (before the optimizer step: the weights stay as they were) on a non-finite loss or norm."""
        if not (math.isfinite(loss) and math.isfinite(gnorm)):
            last = self.ckpt.latest()
            raise TrainingError(
                f"non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'} at step {self.step + 1} "
                f"(loss={loss}, grad_norm={gnorm}); the weights were not updated. Last good checkpoint: "
                f"{last or 'none'}. Lower optim.lr or check the data.")

    @torch.no_grad()
    def evaluate(self, max_batches: int = 0) -> dict[str, float]:
        """Validation loss (nats per target token) and bits per byte over the split, or its first batches."""
        if self.val_loader is None:
            return {}
        self.model.eval()
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        n_tokens = n_bytes = 0
        limit = max_batches
        for i, batch in enumerate(self.val_loader):
            b = self._to_device(batch)
            with autocast(self.device, self.cfg.train.dtype):
                logits = self.step_model(b["inputs"], doc_ids=b.get("doc_ids"), positions=b.get("positions"))
            targets = b["targets"]
            with self.par.loss_context():
                ce = self._cross_entropy_sum(logits.flatten(0, 1), targets.flatten())
            total += (ce.full_tensor() if hasattr(ce, "full_tensor") else ce).double()
            valid = targets != IGNORE
            n_tokens += int(valid.sum())
            n_bytes += int(self.token_bytes[targets[valid]].sum())
            if limit and i + 1 >= limit:
                self.val_loader.load_state_dict(self._val_start)  # next evaluation starts at the beginning
                break
        self.model.train()
        if self.par.dp_size > 1:  # each data-parallel rank evaluated its share of the rows
            sums = self.par.all_reduce_dp(torch.stack([total, torch.tensor(float(n_tokens), dtype=torch.float64,
                                                                            device=self.device),
                                                       torch.tensor(float(n_bytes), dtype=torch.float64,
                                                                    device=self.device)]))
            total, n_tokens, n_bytes = sums[0], int(sums[1].item()), int(sums[2].item())
        loss = total.item() / max(n_tokens, 1)
        bpb = total.item() / (math.log(2) * n_bytes) if n_bytes else float("nan")
        return {"val_loss": loss, "val_bpb": bpb, "val_tokens": n_tokens}

    # ---------------------------------------------------------------------------------------------
    def evaluate_recall(self) -> dict[str, float]:
        """Fact recall (lmlab.evals.recall) on each set of ``evals.recall``, with the tool live when a database
        is set; verdicts go to ``RUN/recall/SET_stepN.jsonl``."""
        from lmlab.evals.recall import run_recall_sets

        t0 = time.time()
        out = run_recall_sets(self._eval_model(), self.tokenizer, self.cfg.evals.recall, self.cfg.engine,
                              out_dir=self.run_dir / "recall" if self.rank == 0 else None, step=self.step,
                              split=(self.rank, self.world_size) if self.env.distributed else None)
        shown = {k.removeprefix("recall/"): v for k, v in out.items() if not k.endswith("/n") and "/miss/" not in k}
        log.info("recall at step %d (%.1f s): %s", self.step, time.time() - t0,
                 ", ".join(f"{k}={v:.3f}" for k, v in shown.items()))
        return out

    def _eval_model(self) -> torch.nn.Module:
        """The model the generation engine runs: the training model itself in one process; with several, a plain
        replica on each process holding the full weights (gathered from the shards), so that every process
        answers its share of the questions on its own."""
        if not self.env.distributed:
            return self.model
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=False,
                                                                         broadcast_from_rank0=False))
        full = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in full.items()}
        if getattr(self, "_replica", None) is None:
            self._replica = materialize(build_model(self.model_cfg, device="meta"), self.device, seed=0)
            if self.cfg.train.float32_modules:
                self._keep_float32(self._replica)
        self._replica.load_state_dict(full)
        return self._replica

    def _lr(self) -> float:
        """The learning rate of the coming step: the schedule's, or during an early-stop cooldown a linear decay
        from the schedule's value at the plateau to 0."""
        cfg = self.cfg
        start = self.early.get("cooldown_from")
        if start is None:
            return lr_at(self.step, cfg.optim, cfg.train.steps)
        left = 1.0 - (self.step - start) / cfg.train.early_stop.cooldown
        return lr_at(start, cfg.optim, cfg.train.steps) * max(left, 0.0)

    def _watch(self, row: dict[str, Any]) -> None:
        """Early stopping: update the watched metric's best value from an evaluation row; set the stop reason
        (or start the cooldown). Restarts (train.restart): set the restart reason when this is the deciding
        evaluation and its metric says so."""
        rs = self.cfg.train.restart
        if (rs.metric and self.step == rs.at_step and row.get(rs.metric) is not None
                and self.attempt["attempt"] < rs.max_restarts):
            self._restart_reason = rs.verdict(float(row[rs.metric]))
        es = self.cfg.train.early_stop
        if not es.metric or es.metric not in row or row[es.metric] is None:
            return
        value, best = float(row[es.metric]), self.early["best"]
        sign = 1.0 if es.mode == "max" else -1.0
        if best is None or sign * (value - best) > es.min_delta:
            self.early = {**self.early, "best": value, "since": 0}
        else:
            self.early = {**self.early, "best": best, "since": self.early["since"] + 1}
        if self.early.get("cooldown_from") is not None:
            return  # already cooling down: the run stops when the cooldown ends
        why = None
        if es.target is not None and sign * (value - es.target) >= 0:
            why = f"{es.metric}={value:.4g} reached the target {es.target:g}"
        elif es.patience and self.early["since"] >= es.patience:
            why = f"{es.metric} has not improved on {self.early['best']:.4g} for {es.patience} evaluations"
        if why is None:
            return
        if es.cooldown:
            self.early.update(cooldown_from=self.step, cooldown_why=why)
            log.info("%s at step %d: the learning rate decays to 0 over %d steps, then the run stops", why,
                     self.step, es.cooldown)
        else:
            self._early_reason = why

    def _cooled_down(self) -> bool:
        """True (with the stop reason set) once an early-stop cooldown has run its steps."""
        start = self.early.get("cooldown_from")
        if start is None or self.step - start < self.cfg.train.early_stop.cooldown:
            return False
        # (a checkpoint saved before the trigger was recorded: only a plateau could start a cooldown then)
        why = self.early.get("cooldown_why") or f"{self.cfg.train.early_stop.metric} plateaued"
        self._early_reason = f"{why} at step {start}; the learning rate then decayed to 0 over {self.step - start} " \
                             "steps"
        return True

    def save(self) -> Path:
        meta = {"tokens_seen": self.tokens_seen, "name": self.cfg.name, "early_stop": self.early,
                "parallel": dataclasses.asdict(self.par.sizes)}
        return self.ckpt.save(self.step, self.model, self.optimizer, meta=meta,
                              rank_state={"data": self.train_loader.state_dict()})

    def _data_state_at_new_length(self, saved: dict[str, Any]) -> dict[str, Any]:
        """A data position saved at another data.seq_len (a run resumed at a longer context) cannot continue: the
        rows are cut differently. The data order then restarts at the start of the next epoch, with a warning; any
        other change of the data is refused by the loader as before."""
        mine, old = dict(self.train_loader.source.fingerprint()), dict(saved.get("source", {}))
        new_length = old.get("seq_len", mine.get("seq_len")) != mine.get("seq_len")
        if not new_length or {**old, "seq_len": mine.get("seq_len")} != mine:
            return saved  # the same length, or more changed than the length: the loader decides, as before
        epoch = int(saved["epoch"]) + 1
        log.warning("data.seq_len changed (%s -> %s): the saved data position does not carry over; the data order "
                    "restarts at the start of epoch %d", old["seq_len"], mine["seq_len"], epoch)
        return {**saved, "source": mine, "epoch": epoch, "index": 0}

    def resume(self) -> bool:
        """Load the newest loadable checkpoint of the run folder, if any; True when resumed. Newer damaged ones
        are renamed ``step_N.damaged`` (``train.ckpt_fallback``; else CheckpointError names them)."""
        kernels = [{k: g.get(k) for k in ("foreach", "fused", "lr_scale")} for g in self.optimizer.param_groups]
        loaded = self.ckpt.load_latest(self.model, self.optimizer, fallback=self.cfg.train.ckpt_fallback)
        for group, kernel in zip(self.optimizer.param_groups, kernels):
            group.update(kernel)  # the kernel choice is this run's (a checkpoint of another mesh may carry another),
            # and so is each group's lr_scale (a checkpoint saved before lr_scale existed has none)
        if loaded is None:
            return False
        self.step, self.tokens_seen = int(loaded.meta["step"]), int(loaded.meta.get("tokens_seen", 0))
        self.early = dict(loaded.meta.get("early_stop") or self.early)
        state = loaded.state
        saved_layout = loaded.meta.get("parallel") or {"dp_replicate": 1, "dp_shard": 1, "tp": 1}
        if "ranks" in state or saved_layout != dataclasses.asdict(self.par.sizes):
            # saved by another mesh: model and optimizer were resharded by DCP; the data position carries over
            # when the global order allows it (reshard_state says why not otherwise)
            ranks = state.get("ranks") or read_rank_states(loaded.path, int(loaded.meta.get("world_size", 1)))
            self.train_loader.load_state_dict(reshard_state([r["data"] for r in ranks], self.train_loader))
            state = ranks[min(self.rank, len(ranks) - 1)]
            log.info("resharded the run from %s to %s", saved_layout, dataclasses.asdict(self.par.sizes))
        else:
            self.train_loader.load_state_dict(self._data_state_at_new_length(state["data"]))
        set_rng_state(state["rng"])
        self._saved_step = self.step
        if self.rank == 0:
            for bad in loaded.damaged:
                self.ckpt.set_aside(bad)
        log.info("resumed from %s (step %d)", loaded.path, self.step)
        return True

    def _saved_config(self) -> dict[str, Any] | None:
        saved = self.run_dir / "config.yaml"
        if not saved.is_file():
            return None
        try:
            return config_to_dict(load_config(saved, schema=type(self.cfg)))
        except Exception as e:  # noqa: BLE001 - an old or foreign config: say so, but the new one wins
            log.warning("%s could not be read (%s); it is replaced", saved, e)
            return None

    def _check_config_change(self, old: dict[str, Any] | None) -> None:
        """Refuse (ConfigError, before anything is written) to resume a run of another model or tokenizer; warn
        about other changes (e.g. a new learning rate), which a resumed run may take."""
        if old is None:
            return
        changed = config_diff(old, config_to_dict(self.cfg))
        # the rotary tables are buffers rebuilt from the config, never saved: a longer context (max_seq_len) or a
        # rotary scaling changes no weight, so a run may resume with them changed (e.g. trained at 128, on at 512)
        context = ("model.max_seq_len:", "model.rope_scaling.")
        arch = [c for c in changed
                if c.startswith(("model.", "tokenizer.")) and not c.startswith(("model.init.", *context))]
        if arch and self.cfg.train.resume and self.ckpt.complete():
            raise ConfigError(f"{self.run_dir} holds checkpoints of another model: {'; '.join(arch)}. Use another "
                              "name (or runs_dir), restore these values, or delete the run folder to start over")
        if changed:
            log.warning("the config differs from the run folder's: %s", ", ".join(changed))

    def _finished(self) -> dict[str, Any] | None:
        """The summary of a run that already completed ``train.steps`` with its final checkpoint, else None."""
        summary = read_summary(self.run_dir)
        latest = self.ckpt.latest()
        status, step = str(summary.get("status", "")), summary.get("step")
        steps = self.cfg.train.steps
        done = ((status == "completed" and step == steps)
                or (status.startswith("stopped by early stop") and isinstance(step, int) and step < steps))
        if done and latest is not None and step_of(latest) == step:
            return summary
        return None

    def _rewind_metrics(self) -> None:
        """Set aside (in ``metrics.dropped.jsonl``) the rows logged after the step training starts from, so that
        a resumed run logs every step once."""
        path = self.run_dir / "metrics.jsonl"
        if self.rank != 0 or not path.is_file():
            return
        kept, dropped = [], []
        for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
            try:
                step = json.loads(line).get("step")
            except (ValueError, AttributeError):
                step = None  # a line cut by a crash, or not a row: set aside too
            (kept if isinstance(step, int) and step <= self.step else dropped).append(line)
        if not dropped:
            return
        with open(self.run_dir / "metrics.dropped.jsonl", "a", encoding="utf-8") as f:
            f.writelines(x if x.endswith("\n") else x + "\n" for x in dropped)
        tmp = path.with_name("metrics.jsonl.tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        tmp.replace(path)
        log.info("metrics.jsonl: %d rows logged after step %d set aside in metrics.dropped.jsonl", len(dropped),
                 self.step)

    def _save_once(self) -> Path:
        """Save a checkpoint of the current step unless one was saved (or resumed from) at this step."""
        if self._saved_step != self.step:
            self._last_ckpt = self.save()
            self._saved_step = self.step
        return self._last_ckpt or self.ckpt.latest()

    @contextlib.contextmanager
    def _signals(self) -> Iterator[None]:
        """SIGINT/SIGTERM (and SIGUSR1/2) set a flag: the loop finishes its step, saves and returns. Inside
        :meth:`_abortable` (evaluations, run after the weights they evaluate were saved) and on a second signal,
        the handler raises :class:`Interrupted` instead, in one process; with several, every process finishes the
        step and saves whatever it receives (the launcher kills a job that takes too long)."""
        def handler(signum, frame):
            again = self._stop_signal is not None
            if not again:
                self._stop_signal = signum
            if self.env.distributed:  # leaving a collective on one process would hang or break the others:
                if again:  # a repeated signal (torchrun's shutdown sends SIGTERM twice) changes nothing
                    log.warning("received %s again: still finishing the step and saving",
                                signal.Signals(signum).name)
                return
            if again or self._in_abortable:
                raise Interrupted(signum)
            log.warning("received %s: finishing the step, then saving", signal.Signals(signum).name)

        try:
            old = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
        except ValueError:  # not the main thread: no handlers
            old = {}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    def _agree_to_stop(self, t_start: float) -> None:
        """After each step: a signal or the time limit on any process stops every process at the same step (with
        several processes each step's collectives must be met by all; a signal reaches them at different times)."""
        tc = self.cfg.train
        timed_out = bool(tc.max_time) and time.time() - t_start >= tc.max_time
        if self.env.distributed:
            signalled, timed_out = self.par.any_rank([self._stop_signal is not None, timed_out])
            if signalled and self._stop_signal is None:
                self._stop_signal = signal.SIGTERM  # another process was signalled: stop with it
            # the agreed value, never this process's flag read again: a signal landing between the all-reduce
            # and here would stop this process alone while the others enter the next step's collectives
            self._stopping = signalled
        else:
            self._stopping = self._stop_signal is not None
        self._timed_out = timed_out

    def _stop_requested(self) -> bool:
        """Whether a signal stops the run: in one process, any signal received so far; with several, only what
        every process agreed on at the last :meth:`_agree_to_stop` (a later signal counts at the next one)."""
        return self._stopping if self.env.distributed else self._stop_signal is not None

    @contextlib.contextmanager
    def _abortable(self) -> Iterator[None]:
        """A section (an evaluation) that a signal stops at once by raising :class:`Interrupted`. With several
        processes an evaluation is a collective and runs to its end (the loop then stops at the step)."""
        if self._stop_requested():
            raise Interrupted(self._stop_signal or signal.SIGTERM)
        self._in_abortable = not self.env.distributed
        try:
            yield
        finally:
            self._in_abortable = False

    def fit(self, stop_after: int | None = None) -> dict[str, Any]:
        """Train to ``train.steps`` (resuming if possible); return a summary.

        ``stop_after``: return after this many steps of this call, with a checkpoint but no final evaluation
        (a time-sliced job; a later ``fit`` resumes as if never stopped).

        Nothing in the run folder changes before the resume has succeeded. A run that already completed returns
        its summary untouched; one whose final checkpoint exists but whose final evaluation was cut short only
        evaluates. A signal at any point ends in a saved, resumable state and a summary saying so.
        """
        cfg, tc = self.cfg, self.cfg.train
        self._check_config_change(self._saved_config())
        finished = self._finished()
        if finished is not None:
            how = ("delete the run folder to train it again" if finished["status"] != "completed" else
                   "raise train.steps to train further, or delete the run folder to start over")
            log.info("%s is finished (%s at step %d, %s): nothing to do; %s", self.run_dir, finished["status"],
                     finished["step"], self.ckpt.latest(), how)
            return {**finished, "resumed": False}
        resumed = tc.resume and self.resume()
        if cfg.probes.modules or cfg.probes.params:  # checks the patterns before the run folder changes
            from lmlab.monitor.probes import build_probes

            self.probes = build_probes(cfg.probes, self.model, self.run_dir, self.rank, self.world_size,
                                       start_step=self.step, compiled=cfg.train.compile)
        # the resume succeeded (or there was nothing to resume): from here on the run folder may change
        self._rewind_metrics()
        if self.rank == 0:
            save_config(self.cfg, self.run_dir)
        start_step = self.step
        # one writer per run folder; the sinks continue from the step the run resumed at
        sink = build_sinks(cfg, self.run_dir, start_step=self.step) if self.rank == 0 else MultiSink([])
        log.info("model: %s parameters; %.1f MFLOPs/token; device %s; peak %.3g FLOP/s (%s)",
                 f"{self.model.num_params():,}", self.flops_per_token / 1e6, self.device, self.peak_flops,
                 self.peak_source)
        status = "completed"
        t_start = time.time()
        window_t, window_pos, window_targets, window_steps = time.time(), 0, 0, 0
        bar = tqdm(total=tc.steps, initial=self.step, desc=cfg.name, unit="step", mininterval=1.0,
                   disable=not cfg.logging.progress or self.rank != 0, dynamic_ncols=True)
        last_eval: dict[str, float] = {}
        last_recall: dict[str, float] = {}
        rc = cfg.evals.recall
        path = self.ckpt.latest()
        try:
            with self._signals():
                try:
                    self._decide_restart_on_resume(sink)
                    self._agree_to_stop(t_start)
                    if self._restart_reason is not None:  # decided on resuming: nothing more to train
                        status = f"restart: {self._restart_reason}"
                    with self.train_loader:
                        while self.step < tc.steps and self._restart_reason is None and not self._stopping:
                            if self.trace is not None:
                                self.trace.begin(self.step + 1)
                            m = self.train_step()
                            if self.trace is not None:
                                self.trace.end(self.step)
                            window_pos += m["positions"]
                            window_targets += m["targets"]
                            window_steps += 1
                            bar.update(1)
                            self._agree_to_stop(t_start)
                            if self.step % tc.log_every == 0 or self.step == tc.steps:
                                dt = max(time.time() - window_t, 1e-9)
                                row = {"step": self.step, "loss": m["loss"], "lr": m["lr"],
                                       "grad_norm": m["grad_norm"], "tokens_per_s": window_pos / dt,
                                       "loss_tokens_per_s": window_targets / dt, "tokens": self.tokens_seen,
                                       "time": time.time() - t_start, "peak_mem_mb": peak_memory_mb(self.device),
                                       "time/step_ms": 1000.0 * dt / max(window_steps, 1),
                                       **self.timer.window(window_steps), **m.get("log", {})}
                                if self.peak_flops:  # the job's tokens over every process's device
                                    row["mfu"] = (self.flops_per_token * row["tokens_per_s"]
                                                  / (self.peak_flops * self.world_size))
                                sink.log(row)
                                bar.set_postfix(loss=f"{m['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}",
                                                refresh=False)
                                window_t, window_pos, window_targets, window_steps = time.time(), 0, 0, 0
                            if self.step < tc.steps and not self._stopping and self._periodic(sink):
                                window_t = time.time()  # the rate counts training time only
                                self._agree_to_stop(t_start)  # a signal during an evaluation stops at this step
                            if self._restart_reason is not None:
                                status = f"restart: {self._restart_reason}"
                                break
                            if self._early_reason is not None or self._cooled_down():
                                status = f"stopped by early stop: {self._early_reason}"
                                break
                            if self._stopping:
                                break
                            if stop_after is not None and self.step - start_step >= stop_after:
                                status = f"paused after {stop_after} steps"
                                break
                            if self._timed_out:
                                status = f"stopped by train.max_time={tc.max_time:g}s"
                                break
                    path = self._save_once()  # the final weights are safe before any final evaluation
                except Interrupted:  # a second signal mid-step or mid-save: the last complete checkpoint stands
                    path = self.ckpt.latest()
                bar.close()
                if not self._stop_requested() and (status == "completed" or status.startswith("stopped")):
                    try:
                        with self._abortable():
                            last_eval = self.evaluate()  # the final evaluation always covers the whole split
                            # the recall of this very step was just measured (an early stop on it): not again
                            done = self._recall_at[1] if self._recall_at[0] == self.step else None
                            if rc.sets:
                                last_recall = done if done is not None else self.evaluate_recall()
                        if last_eval or (last_recall and done is None):
                            sink.log({"step": self.step, **last_eval, **(last_recall if done is None else {})})
                    except Interrupted:  # the checkpoint is saved: a rerun only evaluates
                        last_eval, last_recall = {}, {}
                if self._stop_requested():
                    status = f"interrupted by {signal.Signals(self._stop_signal or signal.SIGTERM).name}"
                summary = {"status": status, "step": self.step, "resumed": resumed, "checkpoint": str(path),
                           "num_params": self.model.num_params(), "train_time_s": time.time() - t_start,
                           "flops_per_token": self.flops_per_token, "peak_flops": self.peak_flops,
                           "peak_mem_mb": peak_memory_mb(self.device),
                           "restarts": int(self.attempt["attempt"]), "seed_offset": self.seed_offset,
                           **last_eval, **last_recall}
                if self.rank == 0:  # a grid runner reads it: status "completed" (or "stopped by ...") means done
                    write_json_atomic(self.run_dir / "summary.json", summary)
                log.info("%s at step %d; checkpoint %s", status, self.step, path)
        finally:
            bar.close()
            sink.close()
            if self.trace is not None:
                self.trace.close()
            if self.probes is not None:
                self.probes.close()
        return summary

    def abandon_attempt(self, reason: str) -> Path:
        """After a fit that ended in ``restart: ...``: move this attempt's checkpoints, metrics and evaluation
        outputs to ``RUN/attempts/K/`` and record the next attempt (its seed offset) in ``RUN/attempt.json``; the
        next Trainer of this run folder trains it from scratch. The run's log and config stay in place."""
        k = int(self.attempt["attempt"])
        dest = self.run_dir / "attempts" / str(k)
        if self.rank == 0:
            dest.mkdir(parents=True, exist_ok=True)
            # the run folder's own files stay (config, launcher, log); what this attempt wrote moves
            keep = {"attempts", ATTEMPT_FILE, "config.yaml", "launch.yaml", "slurm_job.json", "train.log"}
            for item in sorted(self.run_dir.iterdir()):
                if item.name not in keep:
                    item.replace(dest / item.name)
            history = [*self.attempt.get("history", []), {"attempt": k, "seed_offset": self.seed_offset,
                                                          "reason": reason, "step": self.step}]
            nxt = {"attempt": k + 1, "seed_offset": (k + 1) * self.cfg.train.restart.seed_stride, "history": history}
            write_json_atomic(self.run_dir / ATTEMPT_FILE, nxt)
            log.warning("%s: %s; attempt %d set aside in %s, attempt %d trains from scratch with seeds + %d",
                        self.run_dir, reason, k, dest, k + 1, nxt["seed_offset"])
        if self.env.distributed:
            torch.distributed.barrier()
        return dest

    def _decide_restart_on_resume(self, sink: Any) -> None:
        """train.restart for an attempt resumed at or past its deciding step: the evaluation there decides even when
        the attempt never acted on it (a signal cut the evaluation short, so the run saved at that step and stopped;
        or the process ended between deciding and setting the attempt aside). From the value this attempt logged
        at that step, else, standing at that very step, by running the evaluation now."""
        rs = self.cfg.train.restart
        if not rs.metric or self.attempt["attempt"] >= rs.max_restarts or self.step < rs.at_step:
            return
        path, value = self.run_dir / "metrics.jsonl", None
        if path.is_file():  # rows up to the resumed step are this attempt's (rewound; attempts/ holds the others)
            rows = [r for r in read_metrics(path) if r.get("step") == rs.at_step and r.get(rs.metric) is not None]
            value = float(rows[-1][rs.metric]) if rows else None
        if value is None and self.step == rs.at_step:
            log.info("%s: the evaluation deciding train.restart at step %d did not finish before the run stopped: "
                     "running it now", self.run_dir, rs.at_step)
            try:
                with self._abortable(), self.timer.phase("eval"):
                    if rs.metric.startswith("recall/"):
                        row = {"step": self.step, **self.evaluate_recall()}
                        self._recall_at = (self.step, {k: v for k, v in row.items() if k != "step"})
                    else:
                        row = {"step": self.step, **self.evaluate(self.cfg.train.eval_batches)}
                sink.log(row)
            except Interrupted:
                self.model.train()
                return  # stopped again: the next resume decides
            self.model.train()
            value = row.get(rs.metric)
        if value is None:
            log.warning("%s: no %s logged at step %d in this attempt (resumed at step %d): train.restart cannot "
                        "decide, the attempt goes on", self.run_dir, rs.metric, rs.at_step, self.step)
        else:
            self._restart_reason = rs.verdict(float(value))

    def _periodic(self, sink: Any) -> bool:
        """The evaluations and checkpoint due after this step; True when any ran. An evaluation cut short by a
        signal is dropped (the loop then saves and stops)."""
        tc, rc = self.cfg.train, self.cfg.evals.recall
        due_eval = bool(tc.eval_every) and self.step % tc.eval_every == 0
        due_recall = bool(rc.sets) and bool(rc.every) and self.step % rc.every == 0
        try:
            with self._abortable():
                rows = []
                if due_eval:
                    with self.timer.phase("eval"):
                        rows.append({"step": self.step, **self.evaluate(tc.eval_batches)})
                    sink.log(rows[-1])
                if due_recall:
                    with self.timer.phase("eval"):
                        rows.append({"step": self.step, **self.evaluate_recall()})
                        self._recall_at = (self.step, {k: v for k, v in rows[-1].items() if k != "step"})
                    sink.log(rows[-1])
            for row in rows:
                self._watch(row)
        except Interrupted:
            self.model.train()
            return True
        due_ckpt = bool(tc.ckpt_every) and self.step % tc.ckpt_every == 0
        if due_ckpt:
            with self.timer.phase("ckpt"):
                self._save_once()
        return due_eval or due_recall or due_ckpt


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as strict JSON (a non-finite float becomes null) through a temporary file and a rename."""
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in data.items()}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(clean, indent=1, sort_keys=True, allow_nan=False) + "\n")
    tmp.replace(path)
