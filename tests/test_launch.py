"""Grid runner: real training subprocesses in parallel, skipping finished runs, resuming partial ones,
reporting failures without stopping the others, and forwarding SIGTERM to the children."""

import copy
import json
import os
import signal
from pathlib import Path

import pytest
import yaml

from lmlab.cli import main
from lmlab.config import load_grid
from lmlab.launch import GridInterrupted, RunOutcome, run_grid, run_state
from lmlab.monitor.metrics import read_metrics

TEXT = ("To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"
        "The slings and arrows of outrageous fortune,\nOr to take arms against a sea of troubles\n") * 20


def write_grid(tmp_path, data_file):
    """A 2-point grid (seed 0 / 1) of a tiny byte-level text model trained for 6 steps."""
    cfg = {
        "name": "g", "runs_dir": str(tmp_path / "runs"),
        "model": {"dim": 32, "n_layers": 1, "n_heads": 2, "max_seq_len": 64},
        "tokenizer": {"kind": "byte"},
        "data": {"kind": "text", "train_files": [str(data_file)], "seq_len": 32, "batch_size": 4},
        "optim": {"warmup_steps": 2},
        "train": {"steps": 6, "log_every": 1, "device": "cpu"},
        "logging": {"progress": False},
        "grid": {"seed": [0, 1]},
    }
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_grid_runs_resumes_skips_and_survives_a_failure(tmp_path, capsys):
    from lmlab.train import Trainer

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    grid = write_grid(tmp_path, corpus)
    partial, new = load_grid(grid)
    assert [run_state(c.run_dir) for c in (partial, new)] == ["new", "new"]
    first = Trainer(partial).fit(stop_after=3)  # a run stopped half way: checkpoint, no finished summary
    assert first["step"] == 3
    assert run_state(partial.run_dir) == "partial"
    (broken,) = load_grid(None, [f"runs_dir={tmp_path / 'runs'}", "name=broken", "model.dim=32", "model.n_layers=1",
                                 "model.n_heads=2", "data.seq_len=32", "train.steps=6", "logging.progress=false",
                                 f"data.train_files=[{tmp_path / 'missing.txt'}]"])

    assert main(["grid", str(grid)]) == 0  # listing only: trains nothing
    listing = capsys.readouterr().out
    assert "g/seed=0  partial" in listing and "g/seed=1  new" in listing
    record = Path(new.run_dir) / "attempt.json"  # train.restart set the first attempt aside: the listing says so
    record.parent.mkdir(parents=True)
    record.write_text(json.dumps({"attempt": 1, "seed_offset": 1000, "history": []}))
    assert main(["grid", str(grid)]) == 0
    assert "g/seed=1  new (attempt 1: restarted 1x)" in capsys.readouterr().out
    record.unlink()

    lines: list[str] = []
    outcomes = run_grid([partial, broken, new], jobs=2, threads=1, log=lines.append)
    assert [(o.name, o.status) for o in outcomes] == [("g/seed=0", "ran"), ("broken", "failed"), ("g/seed=1", "ran")]
    assert outcomes[1].returncode not in (0, None) and "missing.txt" in outcomes[1].log_tail
    assert any(line.startswith("[FAILED] broken") for line in lines)
    for cfg in (partial, new):
        summary = json.loads((cfg.run_dir / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["step"] == 6
        assert [r["step"] for r in read_metrics(cfg.run_dir / "metrics.jsonl") if "loss" in r] == list(range(1, 7))
        assert (cfg.run_dir / "launch.yaml").is_file() and run_state(cfg.run_dir) == "done"
    assert json.loads((partial.run_dir / "summary.json").read_text())["resumed"] is True
    assert json.loads((new.run_dir / "summary.json").read_text())["resumed"] is False

    sizes = {c.name: (c.run_dir / "train.log").stat().st_size for c in (partial, new, broken)}
    again = run_grid([partial, broken, new], jobs=2, threads=1, log=lambda s: None)
    assert [o.status for o in again] == ["done", "failed", "done"]
    assert (partial.run_dir / "train.log").stat().st_size == sizes[partial.name]  # no new process
    assert (new.run_dir / "train.log").stat().st_size == sizes[new.name]
    assert (broken.run_dir / "train.log").stat().st_size > sizes[broken.name]  # the failed one was retried

    capsys.readouterr()
    assert main(["grid", str(grid), "--run"]) == 0  # everything done: nothing to train, exit 0
    out = capsys.readouterr().out
    assert "g/seed=0: already finished" in out and "differs" not in out
    # a finished run whose preset was edited since is still skipped, but the log says what changed
    edited = copy.deepcopy(new)
    edited.optim.lr = edited.optim.lr * 2
    lines = []
    assert [o.status for o in run_grid([edited], jobs=1, threads=1, log=lines.append)] == ["done"]
    assert "already finished; its config.yaml differs" in lines[0] and "optim.lr:" in lines[0], lines
    assert str(edited.run_dir) in lines[0] and "train.threads" not in lines[0]


class FakeHandle:
    def __init__(self, kill_on_poll: bool):
        self.kill_on_poll, self.terminated, self.polls = kill_on_poll, False, 0

    def poll(self):
        self.polls += 1
        if self.kill_on_poll and self.polls == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # as if the grid runner itself got SIGTERM
        return 143 if self.terminated else None

    def terminate(self):
        self.terminated = True

    def wait(self, timeout=None):
        assert self.terminated
        return 143


class FakeExecutor:
    def __init__(self):
        self.handles: list[FakeHandle] = []
        self.cmds: list[list[str]] = []
        self.envs: list[dict] = []

    def start(self, cmd, log_path, env):
        self.cmds.append(list(cmd))
        self.envs.append(env)
        self.handles.append(FakeHandle(kill_on_poll=not self.handles))
        return self.handles[-1]


def test_sigterm_is_forwarded_to_running_children_then_reraised(tmp_path):
    configs = load_grid(None, [f"runs_dir={tmp_path}", "name=a"]) + load_grid(None, [f"runs_dir={tmp_path}", "name=b"])
    previous = signal.getsignal(signal.SIGTERM)
    executor = FakeExecutor()
    with pytest.raises(GridInterrupted) as exc:
        run_grid(configs, jobs=2, threads=3, log=lambda s: None, executor=executor, poll_interval=0.01)
    assert exc.value.signum == signal.SIGTERM
    assert len(executor.handles) == 2 and all(h.terminated for h in executor.handles)
    assert signal.getsignal(signal.SIGTERM) is previous  # handlers restored
    assert executor.cmds[0][-1] == "train.threads=3" and executor.envs[0]["OMP_NUM_THREADS"] == "3"
    assert (tmp_path / "a" / "launch.yaml").is_file()


def test_jobs_limit_and_outcome_order(tmp_path):
    configs = [c for n in "abc" for c in load_grid(None, [f"runs_dir={tmp_path}", f"name={n}"])]

    class Done:
        def __init__(self, rc):
            self.rc = rc

        def poll(self):
            return self.rc

        def terminate(self):
            pass

        def wait(self, timeout=None):
            return self.rc

    started: list[str] = []

    class Exec:
        def start(self, cmd, log_path, env):
            started.append(log_path.parent.name)
            return Done(1 if log_path.parent.name == "b" else 0)

    out = run_grid(configs, jobs=1, log=lambda s: None, executor=Exec(), poll_interval=0.0)
    assert started == ["a", "b", "c"]
    assert [(o.name, o.status, o.returncode) for o in out] == [("a", "ran", 0), ("b", "failed", 1), ("c", "ran", 0)]
    assert all(isinstance(o, RunOutcome) for o in out)


def test_run_state_from_summary_and_checkpoints(tmp_path):
    run = tmp_path / "r"
    assert run_state(run) == "new"
    (run / "checkpoints" / "step_3").mkdir(parents=True)
    assert run_state(run) == "new"  # a checkpoint counts once its meta.json exists
    (run / "checkpoints" / "step_3" / "meta.json").write_text("{}")
    assert run_state(run) == "partial"
    for status, expected in [("paused after 3 steps", "partial"), ("interrupted by SIGTERM", "partial"),
                             ("stopped by train.max_time=5s", "done"), ("completed", "done")]:
        (run / "summary.json").write_text(json.dumps({"status": status, "step": 3}))
        assert run_state(run) == expected, status
    assert run_state(run, steps=3) == "done" and run_state(run, steps=6) == "partial"  # train.steps raised since
    (run / "summary.json").write_text("{not json")
    assert run_state(run) == "partial"


def test_threads_per_run_follow_the_cpus_this_process_may_use():
    """A run's default thread count shares the CPUs of this process's affinity mask (a Slurm allocation, a
    container's cpuset), not the host's count; the memory app runs one and a half runs per usable core."""
    import subprocess
    import sys

    if not hasattr(os, "sched_setaffinity"):
        pytest.skip("no CPU affinity on this platform")
    code = ("import os, sys; sys.path.insert(0, 'apps'); os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
            "from lmlab.launch.local import default_threads, usable_cpus; from memory.run import default_jobs; "
            "print(usable_cpus(), default_threads(1), default_threads(3), default_jobs())")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["1", "1", "1", "1"]
    from lmlab.launch.local import default_threads, usable_cpus

    n = len(os.sched_getaffinity(0))
    assert usable_cpus() == n and default_threads(1) == n and default_threads(n + 1) == 1
