"""Parallel training on PyTorch's own stack: a DeviceMesh with named dimensions, FSDP2, DDP, HSDP, DTensor tensor
parallel, activation checkpointing and per-block compile.

The mesh has three named dimensions, ``dp_replicate`` x ``dp_shard`` x ``tp`` (sizes from ``cfg.parallel``; they
must multiply to the world size). Data-parallel ranks (``dp_replicate`` x ``dp_shard``) read different rows;
tensor-parallel ranks of one data-parallel rank read the same rows. What wraps the model:

- ``tp > 1``: ``parallelize_module`` with the plan the model class writes beside itself
  (:meth:`lmlab.models.transformer.Transformer.tensor_parallel_plan`; a recurrent mixer's part is the mixer's own
  ``tensor_parallel_plan``, heads / channels split over the processes, see :mod:`lmlab.models.recurrent`);
- activation checkpointing per block (``full``, or ``selective``: matmul and attention outputs kept);
- ``train.compile``: ``torch.compile`` per block;
- ``dp_shard > 1``: FSDP2 ``fully_shard`` per block and at the root, over ``dp_shard`` (or the 2-D
  ``dp_replicate`` x ``dp_shard`` mesh: HSDP), mixed precision on CUDA;
- ``dp_replicate > 1``, ``dp_shard == 1``: DDP (with ``tp > 1``: HSDP with shards of one, as DDP does not take
  DTensor parameters).

The trainer's loss is a sum over the global step's target tokens divided by their global count, scaled by the
data-parallel size because DDP and FSDP average gradients over ranks: any split of a global batch across ranks
and micro-batches gives the gradient of the one-process run.

Usage (what :class:`lmlab.train.trainer.Trainer` does)::

    dist_env = init_distributed(cfg.parallel, device)        # torchrun / srun environment, or one process
    par = Parallel.build(cfg.parallel, dist_env, device)       # mesh + sizes + ranks
    step_model = par.parallelize(model, compile=cfg.train.compile)
    with par.no_sync(step_model, last=False): loss.backward()  # accumulation without gradient syncs
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lmlab.config import ConfigError, ParallelConfig

log = logging.getLogger(__name__)

__all__ = ["DistEnv", "Parallel", "ParallelSizes", "init_distributed", "parallel_sizes"]


@dataclass(frozen=True)
class DistEnv:
    """This process's place: global rank, world size, local rank (its device on the node)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def check_cpu_compiler() -> None:
    """``torch.compile`` on CPU builds C++ kernels: fail before training, with the fix, where no compiler is found
    (inductor would otherwise fail at the first step with a long trace)."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception as e:  # noqa: BLE001 (inductor raises its own error types for a missing compiler)
        raise ConfigError(f"train.compile: torch.compile on CPU needs a C++ compiler, and none was found "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else e!r}); install one "
                          "(e.g. `apt-get install g++`, or set CXX) or set train.compile=false") from None


@dataclass(frozen=True)
class ParallelSizes:
    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def world_size(self) -> int:
        return self.dp * self.tp


def parallel_sizes(cfg: ParallelConfig, world_size: int) -> ParallelSizes:
    """The mesh's sizes for ``world_size`` processes; ConfigError (naming every size) when they do not multiply to
    it. ``dp_shard: -1`` takes what the others leave."""
    shard = cfg.dp_shard
    if shard == -1:
        rest = cfg.dp_replicate * cfg.tp
        if world_size % rest:
            raise ConfigError(f"parallel: dp_replicate={cfg.dp_replicate} x tp={cfg.tp} = {rest} does not divide the "
                              f"world size {world_size}, so parallel.dp_shard=-1 has no size: set the sizes so that "
                              "dp_replicate x dp_shard x tp = world size")
        shard = world_size // rest
    sizes = ParallelSizes(cfg.dp_replicate, shard, cfg.tp)
    if sizes.world_size != world_size:
        raise ConfigError(f"parallel: dp_replicate={sizes.dp_replicate} x dp_shard={sizes.dp_shard} x tp={sizes.tp} "
                          f"= {sizes.world_size}, but the world size is {world_size} (processes started by torchrun "
                          "or Slurm): the sizes must multiply to it")
    return sizes


def init_distributed(cfg: ParallelConfig, device: torch.device) -> DistEnv:
    """Join the process group torchrun (or ``srun`` with the same variables) describes: RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR, MASTER_PORT. One process (no WORLD_SIZE, or 1): nothing to join."""
    if dist.is_available() and dist.is_initialized():
        return DistEnv(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = cfg.backend
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs: dict[str, Any] = {}
    if device.type == "cuda":
        torch.cuda.set_device(local)
        kwargs["device_id"] = torch.device("cuda", local)
    dist.init_process_group(backend=backend, **kwargs)
    log.info("process group: rank %d of %d (%s)", rank, world, backend)
    return DistEnv(rank, world, local)


def fsdp_mixed_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """The dtype FSDP2 casts parameters (or reduces gradients) to for ``parallel.param_dtype`` /
    ``reduce_dtype`` ``name``: bfloat16, or None (no cast: float32)."""
    if name == "bfloat16" or (name == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


@dataclass
class Parallel:
    """The mesh of one run and what it means for this process (ranks in each dimension)."""

    cfg: ParallelConfig
    env: DistEnv
    sizes: ParallelSizes
    device: torch.device
    mesh: Any = None  # DeviceMesh, or None for one process

    @classmethod
    def build(cls, cfg: ParallelConfig, env: DistEnv, device: torch.device) -> Parallel:
        sizes = parallel_sizes(cfg, env.world_size)
        mesh = None
        if env.distributed:
            from torch.distributed.device_mesh import init_device_mesh

            mesh = init_device_mesh(device.type, (sizes.dp_replicate, sizes.dp_shard, sizes.tp),
                                    mesh_dim_names=("dp_replicate", "dp_shard", "tp"))
            mesh["dp_replicate", "dp_shard"]._flatten("dp")
        return cls(cfg, env, sizes, device, mesh)

    # ---------------------------------------------------------------------------------------------
    @property
    def dp_rank(self) -> int:
        return self.mesh["dp"].get_local_rank() if self.mesh is not None else 0

    @property
    def dp_size(self) -> int:
        return self.sizes.dp

    @property
    def dp_group(self) -> Any:
        return self.mesh["dp"].get_group() if self.mesh is not None else None

    @property
    def fsdp(self) -> bool:
        return self.sizes.dp_shard > 1 or (self.sizes.dp_replicate > 1 and self.sizes.tp > 1)

    @property
    def ddp(self) -> bool:
        return self.sizes.dp_replicate > 1 and self.sizes.dp_shard == 1 and self.sizes.tp == 1

    def describe(self) -> str:
        s = self.sizes
        kind = ("FSDP2" if s.dp_shard > 1 and s.dp_replicate == 1 else "HSDP" if self.fsdp else
                "DDP" if self.ddp else "no data parallelism")
        return (f"world {s.world_size}: dp_replicate={s.dp_replicate} x dp_shard={s.dp_shard} x tp={s.tp} ({kind}"
                + (", tensor parallel" if s.tp > 1 else "") + ")")

    # ---------------------------------------------------------------------------------------------
    def parallelize(self, model: nn.Module, compile: bool = False) -> nn.Module:
        """Apply tensor parallel, activation checkpointing, per-block compile and FSDP2 / DDP to ``model`` (in
        place where the APIs are in place); return the module the training step calls (DDP wraps it)."""
        cfg = self.cfg
        if compile and self.device.type == "cpu":
            check_cpu_compiler()
        if self.sizes.tp > 1:
            self._apply_tp(model)
        if cfg.activation_checkpoint != "none":
            apply_activation_checkpointing(model, cfg.activation_checkpoint)
        if compile and self.env.distributed:
            for i, block in enumerate(model.layers):
                model.layers[i] = torch.compile(block)
        if self.fsdp:
            self._apply_fsdp(model)
            return model
        if self.ddp:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            return DDP(model, device_ids=ids, process_group=self.dp_group)
        if compile and not self.env.distributed:
            return torch.compile(model)
        return model

    def _apply_tp(self, model: nn.Module) -> None:
        from torch.distributed.tensor.parallel import parallelize_module

        from lmlab.models.lora import has_lora

        if has_lora(model):
            raise ConfigError(f"parallel.tp={self.sizes.tp}: model.lora: LoRA adapters have no tensor-parallel plan "
                              "(their low-rank factors would need splitting with the layers they adapt); finetune "
                              "with data parallelism (FSDP2 / DDP)")
        plan_of = getattr(model, "tensor_parallel_plan", None)
        if plan_of is None:
            raise ConfigError(f"parallel.tp={self.sizes.tp}: {type(model).__name__} has no tensor-parallel plan")
        try:
            plan = plan_of(self.sizes.tp, sequence_parallel=self.cfg.sequence_parallel,
                       loss_parallel=self.cfg.loss_parallel)
        except ValueError as e:
            raise ConfigError(f"parallel.tp={self.sizes.tp}: {e}") from None
        parallelize_module(model, self.mesh["tp"], plan)

    def _apply_fsdp(self, model: nn.Module) -> None:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = self.mesh["dp_replicate", "dp_shard"] if self.sizes.dp_replicate > 1 else self.mesh["dp_shard"]
        mp = MixedPrecisionPolicy(param_dtype=fsdp_mixed_dtype(self.cfg.param_dtype, self.device),
                                  reduce_dtype=torch.float32)
        for block in model.layers:
            fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=self.cfg.reshard_after_forward)
        fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=self.cfg.reshard_after_forward)

    @contextlib.contextmanager
    def no_sync(self, model: nn.Module, last: bool) -> Iterator[None]:
        """Around a micro-step's backward: gradients are reduced across data-parallel ranks only when ``last``."""
        if last or self.sizes.dp == 1:
            yield
        elif hasattr(model, "no_sync"):  # DDP
            with model.no_sync():
                yield
        elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
            model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)
        else:
            yield

    def loss_context(self) -> contextlib.AbstractContextManager:
        """Around the loss and its backward: ``loss_parallel`` when the logits stay split over the vocabulary."""
        if self.cfg.loss_parallel and self.sizes.tp > 1:
            from torch.distributed.tensor.parallel import loss_parallel

            return loss_parallel()
        return contextlib.nullcontext()

    # ---------------------------------------------------------------------------------------------
    def all_reduce_dp(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over data-parallel ranks (in place; returned)."""
        if self.mesh is not None and self.sizes.dp > 1:
            dist.all_reduce(t, group=self.dp_group)
        return t

    def any_rank(self, flags: list[bool]) -> list[bool]:
        """Each flag true when it is true on any process (one small all-reduce; every process must call it at the
        same point)."""
        if not self.env.distributed:
            return list(flags)
        t = torch.tensor([1.0 if f else 0.0 for f in flags], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [bool(v) for v in t.tolist()]


def apply_activation_checkpointing(model: nn.Module, mode: str) -> None:
    """Wrap each block of ``model.layers`` so that backward recomputes its activations: ``full`` keeps only the
    block's input; ``selective`` keeps the outputs of matmuls and attention and recomputes the cheap ops
    (norms, activations, rotary, elementwise)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    kwargs: dict[str, Any] = {"preserve_rng_state": False}
    if mode == "selective":
        from functools import partial

        from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

        keep = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
                torch.ops.aten._scaled_dot_product_flash_attention.default,
                torch.ops.aten._scaled_dot_product_efficient_attention.default,
                torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default}

        def policy(ctx, op, *args, **kw):
            return CheckpointPolicy.MUST_SAVE if op in keep else CheckpointPolicy.PREFER_RECOMPUTE

        kwargs["context_fn"] = partial(create_selective_checkpoint_contexts, policy)
    elif mode != "full":
        raise ConfigError(f"parallel.activation_checkpoint={mode!r}: use none, full or selective")
    for i, block in enumerate(model.layers):
        model.layers[i] = checkpoint_wrapper(block, **kwargs)


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """The global gradient norm of ``params`` (plain tensors, DTensors of FSDP2 / tensor parallel, or a mix:
    under tensor parallel alone the norms' gains stay plain, replicated tensors), and the gradients scaled to
    ``max_norm`` when it is > 0 and exceeded; as ``torch.nn.utils.clip_grad_norm_`` for one process."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    sharded = [g for g in grads if isinstance(g, DTensor)]
    plain = [g for g in grads if not isinstance(g, DTensor)]
    squares = torch.zeros((), dtype=torch.float32, device=grads[0].device if grads else "cpu")
    by_mesh: dict[Any, list[torch.Tensor]] = {}
    for g in sharded:  # one norm per mesh (FSDP2 + TP: the norms' gains live on the data-parallel mesh only)
        by_mesh.setdefault(g.device_mesh, []).append(g)
    for group in by_mesh.values():
        squares = squares + torch.nn.utils.get_total_norm(group).full_tensor().float() ** 2
    if plain:
        squares = squares + torch.nn.utils.get_total_norm(plain).float() ** 2
    total = squares.sqrt()
    if max_norm > 0:
        coef = min(1.0, max_norm / (total.item() + 1e-6))
        if coef < 1.0:
            for group in [*by_mesh.values(), plain]:
                if group:
                    torch._foreach_mul_(group, coef)
    return total

