"""Probes: statistics of chosen modules' activations and gradients, per-head attention entropy, and parameters'
weight / gradient / update norms, every few steps, into ``RUN/probes.jsonl``; full tensors at chosen steps.

Probes cost nothing when off and change nothing when on. Off (``probes.modules`` and ``probes.params`` empty)
:func:`build_probes` returns None: no hook, no file. On, the hooks are attached only for the steps that are
recorded (``step % every == 0`` or ``step in save_steps``) and removed after them: the other steps run with no
hook at all. The hooks only read (``torch.no_grad``, out-of-place ops on detached tensors, tensor hooks that
return None), so losses, gradients and weights are bitwise those of a run without probes (tested).

Rows of ``probes.jsonl``: one flat JSON object of numbers per recorded step (``pandas.DataFrame(read_probes(run))``
is a table with one column per key; a non-finite value is written as null)::

    step                               the optimizer step (1-based, as in metrics.jsonl)
    act/MODULE/STAT                    statistics of the module's output (the first tensor of a tuple output)
    grad/MODULE/STAT                   the same of the gradient of the loss with respect to that output
    attn_entropy/MODULE/hJ             attention module: entropy (nats) of head J's attention distribution,
                                       averaged over every query position of the step
    param/NAME/norm                    ||w||, before this step's update
    param/NAME/grad_norm               ||dL/dw||, the accumulated gradient before clipping
    param/NAME/update_ratio            ||w_after - w_before|| / ||w_before|| of this step's optimizer update

``STAT``: ``norm`` (mean L2 norm of the vectors along the last dimension: per token for (B, T, dim) outputs),
``mean``, ``std`` (population), ``absmax`` and ``zero_frac`` (fraction of elements exactly 0). The RMS follows
from them: ``sqrt(mean**2 + std**2)``.

Micro-batches (``train.grad_accum``): a statistic of a step covers every call of the module in the step (each
micro-batch's forward; several calls per forward count too) as if the outputs were one tensor: means and
standard deviations of all elements pooled exactly (Chan's parallel formula), the norm averaged over all
vectors, absmax over all, zero_frac over all; the entropy averaged over all queries of all micro-batches.
Gradients of outputs are those of the step's loss (the mean over the step's target tokens), piece by piece.

The attention entropy is that of the distribution the model uses: on recorded steps only, a forward hook
recomputes ``softmax(q k^T / sqrt(head_dim) + mask)`` from the attention module's inputs with its own
projections, rotary embedding, smeared keys/queries, grouped key heads and causal or packed-document mask
(queries and keys as the model computes them, the scores and softmax in float32), in chunks of at most
``ENTROPY_CHUNK`` scores. :func:`attention_probs` returns the full distribution (tests check it reproduces the
module's output).

``save_steps``: ``RUN/probes/step_N.safetensors`` holds ``act/MODULE`` and ``grad/MODULE``: the outputs (and
their gradients) of every call of the step concatenated along dim 0 (micro-batches in order), in the dtype the
model computed them; when the calls' trailing shapes differ, one tensor per call: ``act/MODULE/I``.

Names are ``model.named_modules()`` / ``named_parameters(remove_duplicate=False)`` names without the
``_checkpoint_wrapped_module`` part that activation checkpointing inserts (``layers.0.attention``). With
activation checkpointing, the forward recomputed during backward is not recorded again.

Support: one process, and DDP (data parallel with plain parameters; every rank runs the step, rank 0 records
and writes: activations are rank 0's share of the batch, parameters' gradients are the averaged ones). FSDP2 and
tensor parallel (DTensor parameters) and ``train.compile`` are refused with a ConfigError.

Cost: on a recorded step, five cheap passes over each matched module's output and its gradient, the attention
recomputation (q/k projections again and B * H * T^2 float32 scores in chunks), one copy of the matched parameters
(for the update ratio) and one device-to-host transfer at the end; on save steps, host copies of the tensors.
Measured on one CPU thread (dim 128, 4 layers, 16 x 256 tokens, CPU time of a recorded vs a plain step): +1% for
the attention, MLP and final norm outputs, +1% for every parameter, +31% with the 4 layers' entropies, +49% for
every module, every parameter and the entropies. Unrecorded steps: no hook, no cost.

Usage::

    probes = build_probes(cfg.probes, model, run_dir, rank, world_size, start_step=step)   # None when off
    probes.begin(step)            # before the step's first forward (step = the step about to run, 1-based)
    ...forward/backward of each micro-batch...
    probes.after_backward(step)   # before clipping and optimizer.step()
    optimizer.step()
    probes.end(step)              # writes the row; removes the hooks
    probes.close()
    rows = read_probes(run_dir)   # list of dicts, re-done steps of a resumed run dropped
"""

from __future__ import annotations

import fnmatch
import inspect
import json
import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmlab.config import ConfigError, ProbesConfig
from lmlab.jsonl import iter_jsonl
from lmlab.models.layers import apply_rotary
from lmlab.models.transformer import Attention

log = logging.getLogger(__name__)

__all__ = ["ENTROPY_CHUNK", "STATS", "Probes", "attention_probs", "build_probes", "read_probes"]

STATS = ("norm", "mean", "std", "absmax", "zero_frac")
ENTROPY_CHUNK = 1 << 24  # attention scores (float32) materialised at once by the entropy recomputation
_WRAPPER_PARTS = ("_checkpoint_wrapped_module",)  # what activation checkpointing inserts in module names
_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict)  # never called: no output


def _canonical(name: str) -> str:
    return ".".join(p for p in name.split(".") if p not in _WRAPPER_PARTS)


def _in_backward() -> bool:
    """True while autograd runs a backward: activation checkpointing's recomputed forward, not a new one."""
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is not None and task() != -1


def _match(patterns: list[str], names: list[str], key: str, kind: str) -> list[str]:
    """The names matched by any pattern (in model order); ConfigError naming ``key`` for a pattern matching none."""
    for pat in patterns:
        if not any(fnmatch.fnmatchcase(n, pat) for n in names):
            close = [n for n in names if fnmatch.fnmatchcase(n, "*" + pat.split(".")[-1].strip("*") + "*")][:6]
            sample = close or names[:4] + names[-4:]
            raise ConfigError(f"{key}: {pat!r} matches no {kind} of the model (fnmatch over its names; a '*' also "
                              f"matches dots); names look like: {', '.join(sample)}")
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


def build_probes(cfg: ProbesConfig, model: nn.Module, run_dir: str | os.PathLike, rank: int = 0,
                 world_size: int = 1, *, start_step: int = 0, compiled: bool = False) -> Probes | None:
    """Probes of ``model`` (the raw module, not a DDP or compiled wrapper) as ``cfg`` asks, or None when off.

    ``start_step``: the step a resumed run continues from; rows of later steps in ``probes.jsonl`` are set aside
    (in ``probes.dropped.jsonl``) and their tensor files deleted, since the run does those steps again.
    Every rank validates (a ConfigError stops all of them alike); ranks other than 0 get None (rank 0 records).
    """
    if not cfg.modules and not cfg.params:
        return None
    compiled = compiled or any(type(m).__name__ == "OptimizedModule" for m in model.modules())  # per-block compile
    if compiled:
        raise ConfigError("train.compile: probes (probes.modules / probes.params) hook the eager modules and "
                          "cannot follow a torch.compile'd model; turn off train.compile or the probes")
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without torch.distributed
        DTensor = ()  # noqa: N806
    if any(isinstance(p, DTensor) for p in model.parameters()):
        raise ConfigError("probes.modules / probes.params: probes support one process and DDP (plain parameters); "
                          "this model's parameters are DTensors (FSDP2 or tensor parallel: parallel.dp_shard > 1 or "
                          "parallel.tp > 1): turn the probes off or train with parallel.dp_replicate only")
    if cfg.save_steps:
        try:
            import safetensors.torch  # noqa: F401
        except ImportError:
            raise ConfigError("probes.save_steps: writing tensors needs the safetensors package "
                              "(pip install safetensors)") from None
    named: dict[str, nn.Module] = {}
    for name, m in model.named_modules():
        if name and not isinstance(m, _CONTAINERS):
            named[_canonical(name)] = m  # a checkpoint wrapper and its block share a name: the block (later) wins
    mod_names = _match(cfg.modules, list(named), "probes.modules", "module")
    params: dict[str, nn.Parameter] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        params.setdefault(_canonical(name), p)
    par_names = _match(cfg.params, list(params), "probes.params", "parameter")
    if rank != 0:
        return None
    return Probes(cfg, {n: named[n] for n in mod_names}, {n: params[n] for n in par_names}, Path(run_dir),
                  start_step=start_step)


class Probes:
    """Hooks and statistics of one run (see the module docstring); built by :func:`build_probes`."""

    def __init__(self, cfg: ProbesConfig, modules: dict[str, nn.Module], params: dict[str, nn.Parameter],
                 run_dir: Path, start_step: int = 0):
        self.cfg = cfg
        self.modules = modules
        self.params = params
        self.run_dir = run_dir
        self.path = run_dir / "probes.jsonl"
        self.tensor_dir = run_dir / "probes"
        self._save_steps = set(cfg.save_steps)
        self._handles: list[Any] = []
        self._step: int | None = None  # the step being recorded (hooks armed), else None
        self._reset()
        run_dir.mkdir(parents=True, exist_ok=True)
        self._rewind(start_step)
        self._f = self.path.open("a", encoding="utf-8", buffering=1)

    def recorded(self, step: int) -> bool:
        """Whether ``step`` is recorded: a multiple of ``every`` or one of ``save_steps``."""
        return step % self.cfg.every == 0 or step in self._save_steps

    # ---------------------------------------------------------------------------------------------
    def begin(self, step: int) -> None:
        """Before the forward of step ``step`` (1-based): attach the hooks when the step is recorded."""
        if self._step is not None:  # a recorded step that ended in an exception: drop its hooks and data
            self._disarm()
            self._reset()
        if not self.recorded(step):
            return
        self._step = step
        self._saving = step in self._save_steps
        for name, m in self.modules.items():
            entropy = self.cfg.attention_entropy and isinstance(m, Attention)
            self._handles.append(m.register_forward_hook(self._forward_hook(name, m, entropy), with_kwargs=True))

    def after_backward(self, step: int) -> None:
        """After the step's last backward, before clipping and the optimizer: parameters' weight and gradient norms,
        and a copy of their weights for the update ratio."""
        if self._step != step or not self.params:
            return
        with torch.no_grad():
            seen: dict[int, torch.Tensor] = {}
            for name, p in self.params.items():
                w = p.detach()
                self._param_norms[name] = torch.linalg.vector_norm(w.float())
                if p.grad is not None:
                    self._grad_norms[name] = torch.linalg.vector_norm(p.grad.detach().float())
                if id(p) not in seen:  # tied weights: one copy
                    seen[id(p)] = w.clone()
                self._before[name] = seen[id(p)]

    def end(self, step: int) -> None:
        """After ``optimizer.step()``: update ratios; write the step's row (and tensors); remove the hooks."""
        if self._step != step:
            return
        self._disarm()
        with torch.no_grad():
            updates = {name: torch.linalg.vector_norm((p.detach() - self._before[name]).float())
                       for name, p in self.params.items() if name in self._before}
        row = self._row(step, updates)
        self._f.write(json.dumps(row) + "\n")
        if self._saving:
            self._save_tensors(step)
        self._reset()

    def close(self) -> None:
        """Remove every hook and close the file."""
        self._disarm()
        self._reset()
        if not self._f.closed:
            self._f.close()

    # ---------------------------------------------------------------------------------------------
    def _reset(self) -> None:
        self._saving = False
        self._calls: dict[str, int] = {}  # forward calls of each module in the step
        self._act: dict[str, list[tuple[int, int, torch.Tensor]]] = {}  # (elements, vectors, stats) per call
        self._grad: dict[str, list[tuple[int, int, torch.Tensor]]] = {}
        self._ent: dict[str, list[tuple[int, torch.Tensor]]] = {}  # (queries, per-head entropy sums) per call
        self._saved_act: dict[str, dict[int, torch.Tensor]] = {}
        self._saved_grad: dict[str, dict[int, torch.Tensor]] = {}
        self._param_norms: dict[str, torch.Tensor] = {}
        self._grad_norms: dict[str, torch.Tensor] = {}
        self._before: dict[str, torch.Tensor] = {}

    def _disarm(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._step = None

    def _forward_hook(self, name: str, module: nn.Module, entropy: bool):
        sig = inspect.signature(module.forward) if entropy else None

        def hook(mod: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if self._step is None or _in_backward():  # activation checkpointing recomputes the forward
                return
            out = output[0] if isinstance(output, (tuple, list)) and output else output
            if not isinstance(out, torch.Tensor) or not out.is_floating_point() or out.numel() == 0:
                return
            idx = self._calls.get(name, 0)
            self._calls[name] = idx + 1
            with torch.no_grad():
                self._act.setdefault(name, []).append(_stats(out.detach()))
                if self._saving:
                    self._saved_act.setdefault(name, {})[idx] = out.detach().to("cpu", copy=True)
                if entropy:
                    bound = sig.bind(*args, **kwargs)
                    bound.apply_defaults()
                    a = bound.arguments
                    if a.get("cache") is None:  # a KV-cache forward (inference) is not a training step
                        ent = _attention_entropy(mod, a["x"], a["cos"], a["sin"], a["mask"])
                        self._ent.setdefault(name, []).append(ent)
            if out.requires_grad:
                out.register_hook(self._grad_hook(name, idx))

        return hook

    def _grad_hook(self, name: str, idx: int):
        def hook(grad: torch.Tensor) -> None:
            if self._step is None:
                return
            with torch.no_grad():
                self._grad.setdefault(name, []).append(_stats(grad.detach()))
                if self._saving:
                    self._saved_grad.setdefault(name, {})[idx] = grad.detach().to("cpu", copy=True)

        return hook

    def _row(self, step: int, updates: dict[str, torch.Tensor]) -> dict[str, Any]:
        """The row of the step: every statistic gathered in one device-to-host transfer."""
        parts: list[torch.Tensor] = []
        for calls in (*self._act.values(), *self._grad.values()):
            parts += [s for _, _, s in calls]
        for calls in self._ent.values():
            parts += [e for _, e in calls]
        scalars = [*self._param_norms.values(), *self._grad_norms.values(), *updates.values()]
        parts += [torch.stack([s.double() for s in scalars])] if scalars else []
        flat = torch.cat([p.double().flatten().cpu() for p in parts]).tolist() if parts else []
        pos = 0

        def take(n: int) -> list[float]:
            nonlocal pos
            pos += n
            return flat[pos - n:pos]

        row: dict[str, Any] = {"step": step}
        for kind, table in (("act", self._act), ("grad", self._grad)):
            for name, calls in table.items():
                pooled = _pool([(n, v, take(5)) for n, v, _ in calls])
                row.update({f"{kind}/{name}/{k}": x for k, x in pooled.items()})
        for name, calls in self._ent.items():
            queries = sum(q for q, _ in calls)
            heads = [take(len(e)) for _, e in calls]
            for j in range(len(heads[0])):
                row[f"attn_entropy/{name}/h{j}"] = sum(h[j] for h in heads) / max(queries, 1)
        norms = dict(zip(self._param_norms, take(len(self._param_norms))))
        grads = dict(zip(self._grad_norms, take(len(self._grad_norms))))
        ups = dict(zip(updates, take(len(updates))))
        for name in self.params:
            if name in norms:
                row[f"param/{name}/norm"] = norms[name]
            if name in grads:
                row[f"param/{name}/grad_norm"] = grads[name]
            if name in ups:
                row[f"param/{name}/update_ratio"] = ups[name] / norms[name] if norms[name] > 0 else None
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}

    def _save_tensors(self, step: int) -> None:
        from safetensors.torch import save_file

        tensors: dict[str, torch.Tensor] = {}
        for kind, table in (("act", self._saved_act), ("grad", self._saved_grad)):
            for name, calls in table.items():
                ts = [calls[i] for i in sorted(calls)]
                if all(t.dim() > 0 and t.shape[1:] == ts[0].shape[1:] for t in ts):
                    tensors[f"{kind}/{name}"] = torch.cat(ts).contiguous() if len(ts) > 1 else ts[0].contiguous()
                else:
                    tensors.update({f"{kind}/{name}/{i}": t.contiguous() for i, t in zip(sorted(calls), ts)})
        self.tensor_dir.mkdir(parents=True, exist_ok=True)
        path = self.tensor_dir / f"step_{step}.safetensors"
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata={"step": str(step)})
        tmp.replace(path)

    def _rewind(self, start_step: int) -> None:
        """Set aside rows of steps after ``start_step`` (a resumed run does them again) and delete their tensors."""
        if self.tensor_dir.is_dir():
            for f in self.tensor_dir.glob("step_*.safetensors"):
                try:
                    if int(f.name[len("step_"):-len(".safetensors")]) > start_step:
                        f.unlink()
                except ValueError:
                    continue
        if not self.path.is_file():
            return
        kept, dropped = [], []
        for line in self.path.read_text(encoding="utf-8").splitlines(keepends=True):
            try:
                step = json.loads(line).get("step")
            except (ValueError, AttributeError):
                step = None  # a line cut by a crash: set aside too
            (kept if isinstance(step, int) and step <= start_step else dropped).append(line)
        if not dropped:
            return
        with open(self.run_dir / "probes.dropped.jsonl", "a", encoding="utf-8") as f:
            f.writelines(x if x.endswith("\n") else x + "\n" for x in dropped)
        tmp = self.path.with_name("probes.jsonl.tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        tmp.replace(self.path)
        log.info("probes.jsonl: %d rows of steps after %d set aside in probes.dropped.jsonl", len(dropped),
                 start_step)


def _stats(x: torch.Tensor) -> tuple[int, int, torch.Tensor]:
    """(elements, vectors, [mean, var, sum of vector norms, absmax, zeros]) of one tensor, on its device."""
    # two passes (the mean, then the centred squares summed per vector and the vectors' sums in float64): exact to
    # ~1e-7 and ~10x faster on CPU than torch.var_mean (Welford)
    xf = x.float()
    vectors = xf.reshape(-1, xf.shape[-1]) if xf.dim() else xf.reshape(1, 1)
    mean = vectors.mean()
    m2 = torch.linalg.vector_norm(vectors - mean, dim=-1).double().square().sum()
    norm_sum = torch.linalg.vector_norm(vectors, dim=-1).sum(dtype=torch.float64)
    lo, hi = torch.aminmax(vectors)
    zeros = x.numel() - torch.count_nonzero(x)
    stats = torch.stack([mean.double(), m2 / x.numel(), norm_sum, torch.maximum(-lo, hi).double(), zeros.double()])
    return x.numel(), vectors.shape[0], stats


def _pool(calls: list[tuple[int, int, list[float]]]) -> dict[str, float]:
    """The statistics of several calls' tensors pooled as one (means and variances: Chan's formula)."""
    n = sum(count for count, _, _ in calls)
    mean = sum(count * s[0] for count, _, s in calls) / n
    m2 = sum(count * (s[1] + (s[0] - mean) ** 2) for count, _, s in calls)
    return {"norm": sum(s[2] for _, _, s in calls) / sum(v for _, v, _ in calls), "mean": mean,
            "std": math.sqrt(max(m2 / n, 0.0)), "absmax": max(s[3] for _, _, s in calls),
            "zero_frac": sum(s[4] for _, _, s in calls) / n}


# --------------------------------------------------------------------------------------------------
# Attention distributions, recomputed from an attention module's inputs


def _queries_keys(attn: Attention, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries (B, H, T, D) and keys expanded to the query heads (B, H, S, D) as ``Attention.forward`` computes
    them (submodules' ``forward`` called directly, so that their own probe hooks do not fire), in float32."""
    b, t, _ = x.shape
    q = attn.wq.forward(x).view(b, t, -1, attn.head_dim).transpose(1, 2)
    k = attn.wk.forward(x).view(b, t, -1, attn.head_dim).transpose(1, 2)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    if attn.smear is not None:
        q, k = attn.smear.forward(q, k, mask, None)
    if k.shape[1] != q.shape[1]:  # grouped keys: query head j reads key head j // group (as SDPA's enable_gqa)
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    return q.float(), k.float()


def _probs(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, rows: slice, queries: slice) -> torch.Tensor:
    """softmax(q k^T / sqrt(D) + mask) of rows ``rows`` and queries ``queries``: (b, H, t, S), float32."""
    qc = q[rows, :, queries]
    scores = torch.matmul(qc, k[rows].transpose(-1, -2)) * q.shape[-1] ** -0.5
    if mask is None:  # causal, as SDPA's is_causal (queries and keys are the same T tokens)
        qi = torch.arange(q.shape[2], device=q.device)[queries]
        visible = torch.arange(k.shape[2], device=q.device)[None, :] <= qi[:, None]
        scores = scores.masked_fill(~visible, float("-inf"))
    else:
        m = mask[rows if mask.shape[0] > 1 else slice(None), :, queries]
        scores = scores.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else scores + m.float()
    return torch.softmax(scores, dim=-1)


def _chunks(b: int, h: int, t: int, s: int) -> Iterator[tuple[slice, slice]]:
    """(rows, queries) blocks of at most ENTROPY_CHUNK scores (at least one query of one row)."""
    per_row = h * t * s
    if per_row <= ENTROPY_CHUNK:
        step = max(1, ENTROPY_CHUNK // per_row)
        for r in range(0, b, step):
            yield slice(r, min(r + step, b)), slice(None)
        return
    qstep = max(1, ENTROPY_CHUNK // (h * s))
    for r in range(b):
        for q0 in range(0, t, qstep):
            yield slice(r, r + 1), slice(q0, min(q0 + qstep, t))


@torch.no_grad()
def attention_probs(attn: Attention, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
    """The attention distributions (B, H, T, S) float32 of ``attn`` on its inputs (``x``, ``cos``, ``sin``,
    ``mask`` as :class:`lmlab.models.transformer.Attention` receives them; no KV cache)."""
    q, k = _queries_keys(attn, x, cos, sin, mask)
    with torch.autocast(q.device.type, enabled=False):
        return _probs(q, k, mask, slice(None), slice(None))


@torch.no_grad()
def _attention_entropy(attn: Attention, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       mask: torch.Tensor | None) -> tuple[int, torch.Tensor]:
    """(queries, per-head sum over queries of the entropy in nats) of one call, computed in chunks."""
    q, k = _queries_keys(attn, x, cos, sin, mask)
    b, h, t, _ = q.shape
    total = torch.zeros(h, dtype=torch.float64, device=q.device)
    with torch.autocast(q.device.type, enabled=False):  # scores and softmax in float32 under bf16 autocast too
        for rows, queries in _chunks(b, h, t, k.shape[2]):
            p = _probs(q, k, mask, rows, queries)
            total += torch.special.entr(p).sum(-1).sum((0, 2), dtype=torch.float64)
    return b * t, total


def read_probes(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a ``probes.jsonl`` (or of a run folder's), in step order; when steps were written twice (a run
    resumed without its build dropping them), the later row of a step wins."""
    p = Path(path)
    if p.is_dir():
        p = p / "probes.jsonl"
    rows: dict[int, dict[str, Any]] = {}
    for _, row in iter_jsonl(p):
        rows[row["step"]] = row
    return [rows[s] for s in sorted(rows)]
