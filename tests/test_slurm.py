"""lmlab on a real one-node Slurm cluster (tests/slurm_cluster.py): a grid submitted through submitit as one
array job, a 2-task job training with torch.distributed across its tasks, and preemption (``scontrol requeue``,
or the time-limit signal) ending in a resumed run with the losses of an uninterrupted one."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from slurm_cluster import slurm_cluster_fixture  # noqa: F401  (the fixture "slurm_cluster")

from lmlab.config import load_config, load_grid
from lmlab.launch.slurm import read_jobs, submit_grid
from lmlab.monitor.metrics import read_metrics
from lmlab.train import Trainer

TEXT = ("To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"
        "The slings and arrows of outrageous fortune,\nOr to take arms against a sea of troubles\n") * 40


def write_grid(tmp_path: Path, name: str, steps: int, grid: str = "", slurm: str = "") -> Path:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"""
name: {name}
runs_dir: {tmp_path / 'runs'}
model: {{dim: 32, n_layers: 2, n_heads: 4, n_kv_heads: 2, max_seq_len: 64}}
data: {{train_files: ["{corpus}"], seq_len: 32, batch_size: 8, val_fraction: 0.1}}
optim: {{lr: 0.01, warmup_steps: 2}}
train: {{steps: {steps}, log_every: 1, threads: 1}}
logging: {{progress: false}}
launch:
  slurm: {{cpus_per_task: 1, time_min: 10{slurm}}}
{grid}
""")
    return path


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


def summary(run_dir: Path) -> dict:
    path = run_dir / "summary.json"
    return json.loads(path.read_text()) if path.exists() else {}


def wait_for(predicate, timeout: float, what: str, cluster) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} after {timeout} s; jobs: {cluster.jobs()}\n{cluster.log_tails(15)}")
        time.sleep(0.5)


def local_losses(config: Path, tmp_path: Path, **over: str) -> list[float]:
    """The same run trained here, in this process, for reference."""
    cfg = load_config(config, [f"runs_dir={tmp_path / 'local'}", *(f"{k}={v}" for k, v in over.items())])
    Trainer(cfg).fit()
    return losses(cfg.run_dir)


def close(a: list[float], b: list[float], tol: float = 2e-5) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= tol * max(1.0, abs(y)) for x, y in zip(a, b))


def test_a_grid_runs_as_one_array_job_from_a_code_snapshot(slurm_cluster, tmp_path):
    config = write_grid(tmp_path, "grid", 8, grid="grid:\n  seed: [0, 1]")
    configs = load_grid(config)
    with slurm_cluster.environ():
        jobs = submit_grid(configs, log_fn=lambda *_: None)
    assert sorted(jobs) == ["grid/seed=0", "grid/seed=1"]
    array = {j.split("_")[0] for j in jobs.values()}
    assert len(array) == 1 and sorted(j.split("_")[1] for j in jobs.values()) == ["0", "1"]  # one array job
    assert read_jobs(configs) == jobs
    wait_for(lambda: all(summary(c.run_dir).get("status") == "completed" for c in configs), 180,
             "completed runs", slurm_cluster)
    for cfg in configs:
        assert len(losses(cfg.run_dir)) == 8
    # the jobs imported lmlab from the snapshot taken at submission, not from the working tree
    snapshot = next((tmp_path / "runs" / "grid" / "slurm" / "code").iterdir())
    outs = " ".join(p.read_text() for p in (tmp_path / "runs" / "grid" / "slurm").glob("*/*_log.out"))
    assert f"lmlab from {snapshot / 'src' / 'lmlab'}" in outs, outs[-2000:]
    # `lmlab grid` lists both as done, with their Slurm jobs
    p = subprocess.run([sys.executable, "-m", "lmlab.cli", "grid", str(config)], capture_output=True, text=True,
                       env=slurm_cluster.env, timeout=60)
    assert p.returncode == 0 and p.stdout.count(" done  slurm job ") == 2, p.stdout
    for cfg in configs:  # the listing names each run's job log, which holds the run's output
        log = next(line for line in p.stdout.splitlines() if line.startswith(cfg.name)).split(" log ")[-1]
        assert "lmlab from " in Path(log).read_text()
    # a second submission finds nothing left to do
    with slurm_cluster.environ():
        assert submit_grid(configs, log_fn=lambda *_: None) == {}


def test_submitting_without_slurm_says_so(tmp_path):
    config = write_grid(tmp_path, "none", 2)
    p = subprocess.run([sys.executable, "-m", "lmlab.cli", "grid", str(config), "--slurm"], capture_output=True,
                       text=True, env={"PATH": str(Path(sys.executable).parent), "HOME": str(tmp_path)}, timeout=120)
    assert p.returncode == 2 and "sbatch is not on PATH" in p.stderr, p.stderr[-2000:]


def test_a_two_task_job_trains_with_torch_distributed_like_one_process(slurm_cluster, tmp_path):
    config = write_grid(tmp_path, "dist", 6, slurm=", tasks_per_node: 2")
    (cfg,) = load_grid(config)
    with slurm_cluster.environ():
        submit_grid([cfg], log_fn=lambda *_: None)
    wait_for(lambda: summary(cfg.run_dir).get("status") == "completed", 180, "completed run", slurm_cluster)
    meta = json.loads(next((cfg.run_dir / "checkpoints").iterdir()).joinpath("meta.json").read_text())
    assert meta["world_size"] == 2 and meta["parallel"] == {"dp_replicate": 1, "dp_shard": 2, "tp": 1}
    ref = local_losses(config, tmp_path)
    assert close(losses(cfg.run_dir), ref), (losses(cfg.run_dir), ref)


@pytest.mark.parametrize("how", ["requeue", "time-limit signal"])
def test_a_preempted_job_resumes_to_the_uninterrupted_losses(slurm_cluster, tmp_path, how):
    steps = 400
    config = write_grid(tmp_path, "pre", steps)
    (cfg,) = load_grid(config)
    with slurm_cluster.environ():
        (job,) = submit_grid([cfg], log_fn=lambda *_: None).values()
    metrics = cfg.run_dir / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 10, 120, "training", slurm_cluster)
    if how == "requeue":  # preemption: Slurm sends SIGTERM, the job goes back to the queue
        slurm_cluster.run("scontrol", "requeue", job)
    else:  # what Slurm sends before the time limit (--signal): the task saves and requeues itself
        slurm_cluster.run("scancel", "--signal=USR2", job)
    wait_for(lambda: summary(cfg.run_dir).get("status", "").startswith("interrupted"), 60, "saved stop",
             slurm_cluster)
    stopped = summary(cfg.run_dir)
    assert stopped["step"] < steps, stopped
    wait_for(lambda: summary(cfg.run_dir).get("status") == "completed", 240, "completed run", slurm_cluster)
    done = summary(cfg.run_dir)
    assert done["resumed"] is True and done["step"] == steps
    assert int(slurm_cluster.job_info(job).get("Restarts", "0")) >= 1
    ref = local_losses(config, tmp_path)
    assert close(losses(cfg.run_dir), ref), "the resumed run's losses differ from an uninterrupted run's"


def test_time_limit_signal_after_max_requeues_saves_and_ends_the_job(slurm_cluster, tmp_path):
    config = write_grid(tmp_path, "capped", 400, slurm=", max_requeues: 0")
    (cfg,) = load_grid(config)
    with slurm_cluster.environ():
        (job,) = submit_grid([cfg], log_fn=lambda *_: None).values()
    metrics = cfg.run_dir / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 10, 120, "training", slurm_cluster)
    slurm_cluster.run("scancel", "--signal=USR2", job)
    assert slurm_cluster.wait_done(job, timeout=60) == "COMPLETED"
    stopped = summary(cfg.run_dir)
    assert stopped["status"] == "interrupted by SIGUSR2" and stopped["step"] < 400, stopped
    assert int(slurm_cluster.job_info(job).get("Restarts", "0")) == 0
