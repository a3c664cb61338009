"""Smoke tests of the one-node Slurm test cluster (tests/slurm_cluster.py): sbatch, srun, requeue, submitit."""

import os
import subprocess
import time

import pytest
from slurm_cluster import slurm_cluster_fixture  # noqa: F401  (the fixture "slurm_cluster")


def _wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} after {timeout} s")
        time.sleep(0.2)


def _read(path):
    return path.read_text() if path.exists() else ""


def test_sbatch_runs_a_batch_job(slurm_cluster, tmp_path):
    out = tmp_path / "hi.out"
    job_id = slurm_cluster.sbatch("--wrap", "echo hi; hostname", f"--output={out}")
    assert job_id.isdigit()
    assert slurm_cluster.wait_done(job_id, timeout=30) == "COMPLETED"
    assert out.read_text().split() == ["hi", os.uname().nodename]
    # clients in subprocesses find the cluster through env (SLURM_CONF)
    info = subprocess.run(["sinfo", "-h", "-o", "%P %T %c"], env=slurm_cluster.env, capture_output=True, text=True)
    assert info.stdout.split() == [f"{slurm_cluster.partition}*", "idle", str(slurm_cluster.cpus)]


def test_srun_two_tasks(slurm_cluster, tmp_path):
    out = tmp_path / "ranks.out"
    job_id = slurm_cluster.sbatch(
        "--ntasks=2", f"--output={out}", "--wrap", """srun python3 -c 'import os; print(os.environ["SLURM_PROCID"])'"""
    )
    assert slurm_cluster.wait_done(job_id, timeout=30) == "COMPLETED"
    assert sorted(out.read_text().split()) == ["0", "1"]


def test_two_one_cpu_jobs_run_at_once(slurm_cluster, tmp_path):
    ids = [slurm_cluster.sbatch("--cpus-per-task=1", f"--output={tmp_path}/%j.out", "--wrap", "sleep 20") for _ in "ab"]
    try:
        for job_id in ids:
            slurm_cluster.wait_state(job_id, "RUNNING", timeout=20)
        assert all(slurm_cluster.job_state(job_id) == "RUNNING" for job_id in ids)
    finally:
        slurm_cluster.run("scancel", *ids)
    for job_id in ids:
        assert slurm_cluster.wait_done(job_id, timeout=20) == "CANCELLED"


def test_requeue_restarts_the_job(slurm_cluster, tmp_path):
    out = tmp_path / "requeue.out"
    job_id = slurm_cluster.sbatch(
        "--requeue", "--open-mode=append", f"--output={out}", "--wrap", "echo start ${SLURM_RESTART_COUNT:-0}; sleep 30"
    )
    try:
        slurm_cluster.wait_state(job_id, "RUNNING", timeout=20)
        _wait_for(lambda: "start 0" in _read(out), 10, "first start in the output")
        t0 = time.monotonic()
        slurm_cluster.run("scontrol", "requeue", job_id)
        _wait_for(lambda: "start 1" in _read(out), 40, "restart in the output")
        print(f"requeued job restarted after {time.monotonic() - t0:.1f} s")
        info = slurm_cluster.job_info(job_id)
        assert info["JobState"] == "RUNNING" and info["Restarts"] == "1"
        # (between them slurmstepd's "*** JOB n ON localhost CANCELLED AT ... DUE TO JOB REQUEUE ***")
        assert [line for line in _read(out).splitlines() if line.startswith("start")] == ["start 0", "start 1"]
    finally:
        slurm_cluster.run("scancel", job_id)
    assert slurm_cluster.wait_done(job_id, timeout=20) == "CANCELLED"


def test_submitit_result_and_state(slurm_cluster, tmp_path):
    submitit = pytest.importorskip("submitit")
    with slurm_cluster.environ():  # submitit runs sbatch / sacct / scancel with os.environ
        executor = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="slurm")
        # 5 minutes: submitit asks Slurm for USR2 90 s before the time limit (its default signal delay), which a
        # 1-minute job gets at once; on a loaded machine the job was still starting Python then and was killed
        executor.update_parameters(timeout_min=5, slurm_partition=slurm_cluster.partition, cpus_per_task=1)
        job = executor.submit(lambda: 2 + 3)
        _wait_for(job.done, 60, f"submitit job {job.job_id} done")  # job.result() alone would hang on a lost job
        assert job.result() == 5
        # the result is written before the job ends: its state (forced update, via the sacct stand-in) follows
        _wait_for(lambda: job.get_info(mode="force").get("State") == "COMPLETED", 20, f"job {job.job_id} COMPLETED")
        assert job.state == "COMPLETED"

        job = executor.submit(time.sleep, 60)  # a job that dies without a result is done too, and says how
        slurm_cluster.wait_state(job.job_id, "RUNNING", timeout=20)
        job.cancel()
        _wait_for(lambda: job.done(force_check=True), 30, f"cancelled job {job.job_id} done")
        assert job.state == "CANCELLED"


def test_real_sacct_is_disabled(slurm_cluster):
    """No slurmdbd: Slurm's own sacct refuses (hence the stand-in on `env`'s PATH for submitit)."""
    proc = slurm_cluster.run("/usr/bin/sacct", "-j", "1", check=False)
    assert proc.returncode != 0 and "accounting storage is disabled" in proc.stderr
