"""Runs and grids on Slurm through submitit: one array job per grid, resources from ``launch.slurm``,
preemption- and time-limit-safe.

``submit_grid(configs)`` submits every unfinished run of a grid (one array job per distinct set of resources),
each task training one run folder with :class:`TrainTask`. A run of several processes (``nodes`` x
``tasks_per_node``) starts one task per process through ``srun`` (submitit does it), each exporting the
torch.distributed variables from Slurm's (``submitit.helpers.TorchDistributedEnvironment``), so the trainer
joins the process group as under torchrun. The code is copied at submission (``launch.slurm.snapshot``) into
``GRID/slurm/code/<time>/`` and the job script puts that copy first on ``PYTHONPATH``, so the jobs import lmlab
and the apps from it: editing the working tree never changes a queued job.

Preemption and time limits: Slurm sends ``SIGUSR2`` ``signal_delay_s`` before the time limit (``--signal``) and
``SIGTERM`` on preemption or ``scontrol requeue``. The trainer treats both as a stop: it finishes the step, saves,
and returns; after a ``SIGUSR`` the task requeues its own job (``scontrol requeue``) and exits; the requeued job
resumes from the checkpoint exactly (the trainer's resume). The job ids of a grid are kept in
``GRID/slurm/jobs.json``; :func:`slurm_states` reads Slurm's view of them (``squeue``), for ``lmlab grid CONFIG``.

Usage::

    configs = load_grid("apps/memory/paper.yaml")
    print(describe_submission(configs))             # what would be submitted (lmlab grid CONFIG --slurm --dry-run)
    jobs = submit_grid(configs)                     # {run name: job id}
    print(slurm_states(list(jobs.values())))        # {job id: "RUNNING", ...}
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lmlab.config import SlurmConfig, save_config
from lmlab.launch.local import is_finished

log = logging.getLogger(__name__)

__all__ = ["SlurmError", "TrainTask", "describe_submission", "grid_dir", "job_log", "read_jobs", "slurm_states",
           "snapshot_code", "submit_grid"]

ROOT = Path(__file__).resolve().parents[3]  # the checkout: src/lmlab/launch/slurm.py -> ./


class SlurmError(RuntimeError):
    """Slurm cannot be used from here (no sbatch on PATH, a rejected submission); the message says what to do."""


def job_log(run_dir: str | os.PathLike) -> Path | None:
    """The stdout log of a run's latest Slurm job (``GRID/slurm/<job id>/<job id>_0_log.out``), from the run
    folder's ``slurm_job.json``; None when the run was never submitted."""
    info = Path(run_dir) / "slurm_job.json"
    try:
        data = json.loads(info.read_text())
    except (OSError, ValueError):
        return None
    return Path(data["logs"]) / f"{data['job_id']}_0_log.out" if "logs" in data and "job_id" in data else None


class TrainTask:
    """One run on Slurm: train ``launch.yaml`` of a run folder, in every process of the job.

    Picklable (submitit pickles it into the job). ``checkpoint`` is submitit's hook for a preemption signal
    it handles itself: resubmit the same task (the run resumes from its folder)."""

    def __init__(self, launch_yaml: str | os.PathLike, code_dir: str | os.PathLike | None = None):
        self.launch_yaml = str(launch_yaml)
        self.code_dir = str(code_dir) if code_dir else None

    def __call__(self) -> dict[str, Any]:
        import submitit

        import lmlab

        code = Path(lmlab.__file__).resolve().parent
        print(f"lmlab from {code}", flush=True)  # (the job's log: which code it runs)
        if self.code_dir and not code.is_relative_to(Path(self.code_dir).resolve()):
            log.warning("the job imports lmlab from %s, not from the code snapshot %s", code, self.code_dir)

        env = submitit.JobEnvironment()
        if env.num_tasks > 1:
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        from lmlab.config import load_config
        from lmlab.train import train_run

        cfg = load_config(self.launch_yaml)
        try:
            summary = train_run(cfg)
        finally:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.barrier()
                dist.destroy_process_group()
        status = str(summary.get("status", ""))
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
        if status.startswith("interrupted by SIGUSR") and restarts >= cfg.launch.slurm.max_requeues:
            log.warning("job %s reached the time limit after %d requeues (launch.slurm.max_requeues): the run is "
                        "saved at step %s; submit it again to go on", env.job_id, restarts, summary.get("step"))
            return {**summary, "code": str(code)}
        if status.startswith("interrupted by SIGUSR"):  # the time limit is near: requeue this job, then leave
            if env.global_rank == 0:
                subprocess.run(["scontrol", "requeue", env.job_id], check=True, timeout=60)
                log.info("requeued job %s after saving at step %s", env.job_id, summary.get("step"))
            sys.exit(-1)  # no result file: the job is not over
        if status.startswith("interrupted by"):  # preempted / requeued from outside: Slurm reruns or ends it
            sys.exit(-1)
        return {**summary, "code": str(code)}

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        import submitit

        return submitit.helpers.DelayedSubmission(TrainTask(self.launch_yaml, self.code_dir))


def grid_dir(configs: Sequence[Any]) -> Path:
    """The folder holding a grid's run folders (their common parent)."""
    parents = {Path(c.run_dir).parent for c in configs}
    return Path(os.path.commonpath([str(p) for p in parents])) if len(parents) > 1 else parents.pop()


def snapshot_code(dest: str | os.PathLike, root: Path = ROOT) -> Path:
    """Copy the package and the apps (``src/``, ``apps/``; no caches) to ``dest`` and return it."""
    dest = Path(dest)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for sub in ("src", "apps"):
        if (root / sub).is_dir():
            shutil.copytree(root / sub, dest / sub, ignore=ignore, dirs_exist_ok=True)
    return dest


def _resources(s: SlurmConfig) -> dict[str, Any]:
    """submitit parameters of a job (the keys of ``AutoExecutor.update_parameters``)."""
    params: dict[str, Any] = {
        "nodes": s.nodes, "tasks_per_node": s.tasks_per_node, "cpus_per_task": s.cpus_per_task,
        "timeout_min": s.time_min, "slurm_signal_delay_s": s.signal_delay_s,
        "slurm_additional_parameters": {"requeue": True, **s.extra},
    }
    if s.gpus_per_node:
        params["gpus_per_node"] = s.gpus_per_node
    if s.mem_gb:
        params["mem_gb"] = s.mem_gb
    for key in ("partition", "account", "qos"):
        if getattr(s, key):
            params[f"slurm_{key}"] = getattr(s, key)
    return params


def _groups(configs: Sequence[Any]) -> list[tuple[dict[str, Any], list[Any]]]:
    """Unfinished runs grouped by their resources (one array job per group), in grid order."""
    groups: dict[str, tuple[dict[str, Any], list[Any]]] = {}
    for cfg in configs:
        if is_finished(cfg.run_dir, cfg.train.steps):
            continue
        params = _resources(cfg.launch.slurm)
        groups.setdefault(json.dumps(params, sort_keys=True), (params, []))[1].append(cfg)
    return list(groups.values())


def describe_submission(configs: Sequence[Any]) -> str:
    """What :func:`submit_grid` would submit: the array jobs, their resources and runs (nothing is submitted)."""
    groups = _groups(configs)
    done = len(configs) - sum(len(g) for _, g in groups)
    lines = [f"{len(configs)} runs, {done} already finished; {len(groups)} array job(s):"]
    for params, cfgs in groups:
        s = cfgs[0].launch.slurm
        world = s.nodes * s.tasks_per_node
        lines.append(f"  array of {len(cfgs)} task(s): {s.nodes} node(s) x {s.tasks_per_node} task(s) "
                     f"(world size {world}), {s.cpus_per_task} cpu(s)/task, {s.gpus_per_node} gpu(s)/node, "
                     f"{s.time_min} min" + "".join(f", {k}={getattr(s, k)}" for k in ("partition", "account", "qos")
                                                    if getattr(s, k)))
        lines.append(f"    submitit parameters: {json.dumps(params, sort_keys=True)}")
        for cfg in cfgs[:8]:
            lines.append(f"    {cfg.name}")
        if len(cfgs) > 8:
            lines.append(f"    ... and {len(cfgs) - 8} more")
    return "\n".join(lines)


def read_jobs(configs: Sequence[Any]) -> dict[str, str]:
    """``{run name: job id}`` of a grid's Slurm submissions (the latest per run), from ``GRID/slurm/jobs.json``."""
    path = grid_dir(configs) / "slurm" / "jobs.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except ValueError:
        return {}
    return {k: str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def submit_grid(configs: Sequence[Any], log_fn: Callable[[str], Any] = print,
                executor_factory: Callable[[Path], Any] | None = None) -> dict[str, str]:
    """Submit every unfinished run of ``configs``: one array job per distinct set of resources. Returns
    ``{run name: job id}`` (also merged into ``GRID/slurm/jobs.json``)."""
    import submitit

    if executor_factory is None and shutil.which("sbatch") is None:
        raise SlurmError("Slurm's sbatch is not on PATH: run on a Slurm login node (or install the Slurm client), "
                         "or train here with `lmlab grid CONFIG --run`")
    groups = _groups(configs)
    if not groups:
        log_fn("nothing to submit: every run is finished")
        return {}
    root = grid_dir(configs) / "slurm"
    root.mkdir(parents=True, exist_ok=True)
    code = None
    if any(cfgs[0].launch.slurm.snapshot for _, cfgs in groups):
        code = snapshot_code(root / "code" / time.strftime("%Y%m%d-%H%M%S"))
        log_fn(f"code snapshot: {code}")
    submitted: dict[str, str] = {}
    for params, cfgs in groups:
        executor = (executor_factory or (lambda folder: submitit.AutoExecutor(folder=folder, cluster="slurm")))(
            root / "%j")
        setup = []
        if code is not None and cfgs[0].launch.slurm.snapshot:  # the job's python imports the snapshot's lmlab
            setup.append(f"export PYTHONPATH={code / 'src'}:{code / 'apps'}${{PYTHONPATH:+:$PYTHONPATH}}")
        executor.update_parameters(name=grid_dir(configs).name, slurm_array_parallelism=len(cfgs),
                                   slurm_setup=setup, **params)
        tasks = []
        for cfg in cfgs:
            launch = save_config(cfg, Path(cfg.run_dir) / "launch.yaml")
            snap = code if cfg.launch.slurm.snapshot else None
            tasks.append(TrainTask(launch, snap))
        with executor.batch():
            jobs = [executor.submit(task) for task in tasks]
        for cfg, job in zip(cfgs, jobs):
            submitted[cfg.name] = str(job.job_id)
            (Path(cfg.run_dir) / "slurm_job.json").write_text(json.dumps(
                {"job_id": str(job.job_id), "logs": str(root / str(job.job_id)),
                 "submitted": time.time(), "resources": params}, indent=1) + "\n")
        log_fn(f"submitted an array of {len(cfgs)} run(s): job {jobs[0].job_id.split('_')[0]}; logs in {root}")
    path = root / "jobs.json"
    merged = {**read_jobs(configs), **submitted}
    path.write_text(json.dumps(merged, indent=1, sort_keys=True) + "\n")
    return submitted


def slurm_states(job_ids: Sequence[str], env: dict[str, str] | None = None) -> dict[str, str]:
    """Slurm's state of each job still known to ``squeue`` (``PENDING``, ``RUNNING``, ``PENDING (reason)``...);
    jobs that left the queue are absent (their run folders say how they ended)."""
    if not job_ids or shutil.which("squeue") is None:
        return {}
    try:
        out = subprocess.run(["squeue", "-h", "-r", "-o", "%i|%T|%r", "-j", ",".join(sorted(set(job_ids)))],
                             capture_output=True, text=True, timeout=30, env=env)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    states = {}
    for line in out.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 3:
            job, state, reason = parts
            states[job] = state + (f" ({reason})" if reason and reason != "None" and state == "PENDING" else "")
    return states
