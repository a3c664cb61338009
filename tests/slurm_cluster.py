"""A real one-node Slurm cluster on this machine, for tests (no mocks).

`SlurmCluster` starts its own ``munged``, ``slurmctld`` and ``slurmd`` (as root) inside a temporary folder it
owns, with free TCP ports, so it clashes neither with a system Slurm nor with a second test cluster; `stop()`
(or leaving the ``with`` block) stops them by the PIDs it started and leaves nothing running. The
``slurm_cluster`` pytest fixture installs Slurm with apt when missing (skipping the tests where that is
impossible) and shares one cluster between all tests of a session.

Using it from a test module (tests/ is on sys.path under pytest, as for ``from test_engine import ...``)::

    from slurm_cluster import slurm_cluster_fixture  # noqa: F401  (provides the fixture "slurm_cluster")

    def test_hi(slurm_cluster, tmp_path):
        job_id = slurm_cluster.sbatch("--wrap", "echo hi", f"--output={tmp_path}/out.txt")  # --parsable: the id
        assert slurm_cluster.wait_done(job_id) == "COMPLETED"  # polls squeue, then the state from scontrol
        subprocess.run(["squeue"], env=slurm_cluster.env)  # Slurm clients in subprocesses: pass `env`
        with slurm_cluster.environ():  # in-process clients (submitit runs sbatch/sacct/scancel with os.environ)
            ...

(``from slurm_cluster import slurm_cluster`` works as well, but ruff then flags each test's argument F811.)
Helpers: ``run(*argv)`` (a client with `env`, raises on failure), ``sbatch(*args)``, ``job_info(id)`` /
``job_state(id)`` (scontrol), ``in_queue(id)`` (squeue), ``wait_state(id, "RUNNING")``, ``wait_done(id)``,
``jobs()``, ``cancel_all()``, ``log_tails()``; attributes ``root``, ``conf`` (the slurm.conf), ``partition``,
``node``, ``cpus``, ``memory_mb``, ``start_seconds``. The fixture's cluster has the sacct stand-in (below).
Tests should cancel the long jobs they start (the cluster is shared); ``stop()`` cancels whatever is left.

Cluster: one node ``localhost`` (127.0.0.1) with ``cluster.cpus`` CPUs (the machine's CPU count, at least 2)
and ``cluster.memory_mb`` MB, in partition ``cluster.partition`` ("debug", the default partition, no time limit).
CPUs are the consumable resource (select/cons_tres, CR_CPU) and memory is not, so two ``--cpus-per-task=1``
jobs run at once on 2 CPUs and a job may ask for any ``--mem`` up to ``memory_mb``. Jobs run as root. Requeue
is on (JobRequeue=1); a requeued job is held for ``cred_expire`` + 1 s (Slurm's job credential lifetime,
10 s here, at least 5, Slurm's default 120), then starts within 2 s (SchedulerParameters sched_interval=2,
bf_interval=1): ``scontrol requeue`` of a running job has it running again about 11 s later. KillWait=5: a
cancelled or timed-out job gets SIGTERM, then SIGKILL 5 s later. No preemption (preempt/none; GraceTime only
matters with preemption): simulate it with ``scontrol requeue`` or ``scancel --signal``.
Finished jobs stay visible to ``scontrol show job`` for an hour (MinJobAge=3600).

No accounting (no slurmdbd): ``sacct`` fails with "Slurm accounting storage is disabled". What that means for
submitit (1.5), whose `SlurmInfoWatcher` reads job states only with ``sacct``:

* ``job.result()``, ``job.results()``, ``job.done()``, ``job.exception()``, ``job.wait()`` work: ``done()`` is
  true as soon as the job's result pickle exists (written for a return value and for an exception alike), and
  the failing ``sacct`` is only logged as a warning ("Bypassing sacct error ...").
* ``job.state`` stays "UNKNOWN" and ``job.get_info()`` is ``{}``; a job that dies without writing its result
  (scancel, SIGKILL, node failure) is never ``done()``, so ``result()`` waits forever: poll ``done()`` with a
  deadline instead of calling ``result()`` on a job that may die.
* ``SlurmCluster(sacct_shim=True)`` (as in the fixture) puts a small ``sacct`` on the clients' PATH (``env``,
  ``environ()``) that answers submitit's ``sacct -o JobID,State,NodeList --parsable2 -j ID ...`` from
  ``scontrol show job``; then ``job.state`` is the real Slurm state (PENDING, RUNNING, COMPLETED, CANCELLED,
  FAILED, ...) and a killed job is ``done()``. It translates real slurmctld state (no mock), but it is not
  Slurm's sacct: it knows only jobs still in slurmctld's memory, and only JobID, State, NodeList and a few
  more fields. Submitit writes the result file before the job ends (RUNNING / COMPLETING for a moment after
  ``done()``), and re-reads states at most every max(2 s, half the time since the last submission), so
  ``job.state`` and ``job.done()`` lag: ``job.get_info(mode="force")``, ``job.done(force_check=True)``.
  The real alternative is slurmdbd + MariaDB (AccountingStorageType=accounting_storage/slurmdbd): not set up.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
from debian import SEARCH_PATH, apt_install, which

SLURM_BINARIES = ("slurmctld", "slurmd", "sbatch", "munged")
APT_PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
# Environment variables of an enclosing Slurm job (tests run inside sbatch/srun on a real cluster) or of the
# user's Slurm defaults would leak into our clients and jobs: `env` drops them.
_CLIENT_ENV_PREFIXES = ("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "SQUEUE_", "SINFO_", "SACCT_", "SCONTROL_")
_MARKER = "LMLAB_TEST_SLURM_CLUSTER"  # set in the daemons' and clients' environment: finds our strays at stop

_SEARCH_PATH = SEARCH_PATH
_which = which


def missing_slurm_binaries() -> list[str]:
    return [name for name in SLURM_BINARIES if _which(name) is None]


def ensure_slurm_installed(verbose: bool = True) -> str | None:
    """Install Slurm 22.05 + munge with apt if any of slurmctld, slurmd, sbatch, munged is missing.

    Returns None when Slurm is there (already, or now), else the reason it cannot be (not root, no apt-get,
    apt failed): the fixture skips with it.
    """
    missing = missing_slurm_binaries()
    if not missing:
        return None
    why = apt_install(APT_PACKAGES, "slurm_cluster" if verbose else "")
    if why:
        return f"Slurm is not installed ({', '.join(missing)} missing): {why}"
    missing = missing_slurm_binaries()
    if missing:
        return f"apt-get installed {' '.join(APT_PACKAGES)} but {', '.join(missing)} still missing"
    return None


def _free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (held open together so they differ; freed before returning)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _mem_total_mb() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    return 1024


def _die_with_parent() -> None:
    """In a daemon just forked: have Linux SIGTERM it when the test process dies (killed: no teardown)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError as e:
        return f"({e})"
    return "\n".join(text[-lines:])


def parse_scontrol(text: str) -> dict[str, str]:
    """`scontrol show job -o ID` (one line of Key=Value pairs) as a dict."""
    info: dict[str, str] = {}
    for token in text.split():
        key, eq, value = token.partition("=")
        if eq:
            info[key] = value
    return info


# Answers submitit's `sacct -o JobID,State,NodeList --parsable2 -j ID [-j ID ...]` from `scontrol show job`.
_SACCT_SHIM = textwrap.dedent(
    '''\
    #!{python}
    """sacct stand-in for a Slurm test cluster without slurmdbd: reads slurmctld's job records
    (written by tests/slurm_cluster.py). Knows -o/--format, -j/--jobs, -n/--noheader; output is --parsable2."""
    import subprocess, sys

    FIELDS = {{"JobID": "JobId", "JobName": "JobName", "State": "JobState", "NodeList": "NodeList",
              "ExitCode": "ExitCode", "Partition": "Partition", "Start": "StartTime", "End": "EndTime",
              "Elapsed": "RunTime", "Reason": "Reason", "Restarts": "Restarts"}}
    fields, ids, header = ["JobID", "JobName", "State", "ExitCode"], [], True
    args = iter(sys.argv[1:])
    for arg in args:
        name, eq, value = arg.partition("=")
        if name in ("-o", "--format"):
            fields = (value if eq else next(args)).split(",")
        elif name in ("-j", "--jobs"):
            ids += (value if eq else next(args)).split(",")
        elif name in ("-n", "--noheader"):
            header = False
    if not ids:
        sys.exit("sacct (test stand-in): accounting storage is disabled; only -j JOBID queries are answered")
    rows = []
    for jid in ids:
        out = subprocess.run(["scontrol", "show", "job", "-o", jid], capture_output=True, text=True).stdout
        for line in out.splitlines():
            info = dict(t.split("=", 1) for t in line.split() if "=" in t)
            if not info.get("JobId"):
                continue
            task = info.get("ArrayTaskId", "").split("%")[0]
            if task:  # an array task ("12_3") or the pending rest of an array ("12_[4-9]")
                info["JobId"] = info["ArrayJobId"] + "_" + (task if task.isdigit() else "[" + task + "]")
            if info.get("NodeList") == "(null)":
                info["NodeList"] = "None assigned"
            rows.append("|".join(info.get(FIELDS.get(f, f), "") for f in fields))
    print("\\n".join(([("|".join(fields))] if header else []) + rows))
    '''
)


class SlurmCluster:
    """One-node Slurm cluster (munged + slurmctld + slurmd) in a temporary folder; a context manager.

    Attributes: ``root`` (the folder), ``conf`` (its slurm.conf), ``partition``, ``node`` ("localhost"),
    ``cpus``, ``memory_mb``, ``env`` (os.environ + SLURM_CONF, for subprocesses), ``start_seconds``.
    """

    def __init__(
        self,
        *,
        cpus: int | None = None,
        memory_mb: int | None = None,
        partition: str = "debug",
        cluster_name: str = "lmlabtest",
        sacct_shim: bool = False,
        cred_expire: int = 10,
        extra_conf: str = "",
        start_timeout: float = 60.0,
        keep: bool = False,
        parent_dir: str | None = None,
    ):
        self.cpus = cpus or max(2, os.cpu_count() or 1)
        self.memory_mb = memory_mb or max(256, int(_mem_total_mb() * 0.9))
        self.partition = partition
        self.cluster_name = cluster_name
        self.node = "localhost"
        self.sacct_shim = sacct_shim
        self.cred_expire = cred_expire  # job credential lifetime; also how long a requeued job waits
        self.extra_conf = extra_conf
        self.start_timeout = start_timeout
        self.keep = keep  # keep the folder (logs) after stop
        self.parent_dir = parent_dir
        self.root: Path | None = None
        self.conf: Path | None = None
        self.start_seconds: float | None = None
        self._procs: dict[str, subprocess.Popen] = {}
        self._logs: dict[str, Path] = {}
        self._started = False

    # ----------------------------------------------------------------------------------------------- env
    @property
    def env(self) -> dict[str, str]:
        """os.environ (now) without Slurm job / client variables, plus SLURM_CONF (and the sacct stand-in's
        folder first on PATH when ``sacct_shim``): pass to subprocesses that run Slurm clients."""
        assert self.conf is not None, "cluster not started"
        env = {k: v for k, v in os.environ.items() if not k.startswith(_CLIENT_ENV_PREFIXES)}
        env["SLURM_CONF"] = str(self.conf)
        env[_MARKER] = str(self.root)
        if self.sacct_shim:
            env["PATH"] = os.pathsep.join([str(self.root / "bin"), env.get("PATH", _SEARCH_PATH)])
        return env

    @contextlib.contextmanager
    def environ(self):
        """Temporarily make os.environ `env` (for in-process clients such as submitit); restored on exit."""
        saved = dict(os.environ)
        env = self.env
        try:
            for key in [k for k in os.environ if k not in env]:
                del os.environ[key]
            os.environ.update(env)
            yield env
        finally:
            for key in [k for k in os.environ if k not in saved]:
                del os.environ[key]
            os.environ.update(saved)

    # ------------------------------------------------------------------------------------------ clients
    def run(self, *args: str, check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess:
        """Run a Slurm client (``cluster.run("squeue", "-h")``) against this cluster; text output."""
        proc = subprocess.run(list(args), env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{shlex.join(args)} failed ({proc.returncode}): {proc.stdout}{proc.stderr}")
        return proc

    def sbatch(self, *args: str) -> str:
        """``sbatch --parsable ARGS`` (partition: the default); returns the job id."""
        out = self.run("sbatch", "--parsable", *args).stdout.strip()
        return out.split(";")[0]

    def job_info(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict ({} once slurmctld forgot the job)."""
        proc = self.run("scontrol", "show", "job", "-o", str(job_id), check=False)
        return parse_scontrol(proc.stdout) if proc.returncode == 0 else {}

    def job_state(self, job_id: str) -> str | None:
        return self.job_info(job_id).get("JobState")

    def in_queue(self, job_id: str) -> bool:
        """Whether ``squeue -h -j ID`` still lists the job (pending, running, completing, ...)."""
        proc = self.run("squeue", "-h", "-j", str(job_id), "-o", "%i", check=False)
        return proc.returncode == 0 and bool(proc.stdout.strip())

    def wait_state(self, job_id: str, states: str | tuple[str, ...], timeout: float = 30.0, poll: float = 0.2):
        """Wait until the job's state is one of `states` (e.g. "RUNNING"); returns it, raises on timeout."""
        states = (states,) if isinstance(states, str) else tuple(states)
        deadline = time.monotonic() + timeout
        state = None
        while time.monotonic() < deadline:
            state = self.job_state(job_id)
            if state in states:
                return state
            time.sleep(poll)
        raise TimeoutError(f"job {job_id} not {'/'.join(states)} after {timeout} s (last: {state})\n{self.log_tails()}")

    def wait_done(self, job_id: str, timeout: float = 30.0, poll: float = 0.2) -> str | None:
        """Poll ``squeue -h -j ID`` until the job left the queue; returns its final state from scontrol
        (COMPLETED, FAILED, CANCELLED, TIMEOUT, ...; None if already forgotten). Raises on timeout."""
        deadline = time.monotonic() + timeout
        while self.in_queue(job_id):
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still queued after {timeout} s: {self.job_info(job_id)}")
            time.sleep(poll)
        return self.job_state(job_id)

    def jobs(self) -> list[str]:
        """Ids of the jobs in the queue."""
        proc = self.run("squeue", "-h", "-o", "%i", check=False)
        return proc.stdout.split() if proc.returncode == 0 else []

    def cancel_all(self, timeout: float = 20.0) -> None:
        """scancel every queued job and wait (up to `timeout`) until the queue is empty."""
        ids = self.jobs()
        if ids:
            self.run("scancel", *ids, check=False)
        deadline = time.monotonic() + timeout
        while ids and time.monotonic() < deadline:
            time.sleep(0.2)
            ids = self.jobs()

    def log_tails(self, lines: int = 30) -> str:
        """The last lines of the daemons' logs and of their stdout/stderr (for error messages)."""
        paths = sorted({p for log in self._logs.values() for p in (log, log.with_suffix(".stdout")) if p.exists()})
        return "\n".join(f"--- {path} ---\n{_tail(path, lines)}" for path in paths)

    # ------------------------------------------------------------------------------------------ start/stop
    def _write_files(self) -> None:
        root = self.root
        for sub in ("munge", "state", "spool", "log", "run", "bin"):
            (root / sub).mkdir()
        # munged wants every directory of its socket path searchable by all and writable by no one else.
        os.chmod(root, 0o755)
        os.chmod(root / "munge", 0o755)
        key = root / "munge" / "munge.key"
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(1024))
        self.munge_socket = root / "munge" / "munge.socket"
        self.ctld_port, self.slurmd_port = _free_ports(2)
        host = socket.gethostname()
        self.conf = root / "slurm.conf"
        node_line = f"NodeName={self.node} NodeAddr=127.0.0.1 NodeHostname={self.node} State=UNKNOWN"
        node_line += f" CPUs={self.cpus} RealMemory={self.memory_mb}"
        self.conf.write_text(
            textwrap.dedent(
                f"""\
                # One-node test cluster written by tests/slurm_cluster.py
                ClusterName={self.cluster_name}
                SlurmctldHost={host}(127.0.0.1)
                SlurmctldPort={self.ctld_port}
                SlurmdPort={self.slurmd_port}
                AuthType=auth/munge
                CredType=cred/munge
                AuthInfo=socket={self.munge_socket},cred_expire={self.cred_expire}
                SlurmUser=root
                SlurmdUser=root
                StateSaveLocation={root}/state
                SlurmdSpoolDir={root}/spool
                SlurmctldPidFile={root}/run/slurmctld.pid
                SlurmdPidFile={root}/run/slurmd.pid
                SlurmctldLogFile={root}/log/slurmctld.log
                SlurmdLogFile={root}/log/slurmd.log
                SlurmctldDebug=info
                SlurmdDebug=info
                ProctrackType=proctrack/linuxproc
                TaskPlugin=task/none
                SelectType=select/cons_tres
                SelectTypeParameters=CR_CPU
                SchedulerType=sched/backfill
                PreemptType=preempt/none
                ReturnToService=2
                JobRequeue=1
                MpiDefault=none
                SwitchType=switch/none
                AccountingStorageType=accounting_storage/none
                JobAcctGatherType=jobacct_gather/none
                JobCompType=jobcomp/none
                SlurmdParameters=config_overrides
                KillWait=5
                MinJobAge=3600
                InactiveLimit=0
                SchedulerParameters=bf_interval=1,sched_interval=2
                SlurmctldTimeout=30
                SlurmdTimeout=60
                {self.extra_conf}
                {node_line}
                PartitionName={self.partition} Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
                """
            )
        )
        if self.sacct_shim:
            shim = root / "bin" / "sacct"
            shim.write_text(_SACCT_SHIM.format(python=sys.executable))
            shim.chmod(0o755)

    def _spawn(self, name: str, argv: list[str], log: Path) -> subprocess.Popen:
        self._logs[name] = log
        with open(log.with_suffix(".stdout"), "ab") as out:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self._daemon_env(),
                start_new_session=True,
                cwd=self.root,
                preexec_fn=_die_with_parent,
            )
        self._procs[name] = proc
        return proc

    def _daemon_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(_CLIENT_ENV_PREFIXES)}
        env.update(SLURM_CONF=str(self.conf), **{_MARKER: str(self.root)})
        env["PATH"] = _SEARCH_PATH
        return env

    def _check_alive(self) -> None:
        for name, proc in self._procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}\n{self.log_tails()}")

    def start(self) -> SlurmCluster:
        assert not self._started, "already started"
        missing = missing_slurm_binaries()
        if missing:
            raise RuntimeError(f"Slurm binaries missing: {missing} (see ensure_slurm_installed)")
        t0 = time.monotonic()
        self.root = Path(tempfile.mkdtemp(prefix="lmlab-slurm-", dir=self.parent_dir))
        self._started = True
        atexit.register(self.stop)
        try:
            self._write_files()
            root = self.root
            self._spawn(
                "munged",
                [
                    _which("munged"),
                    "--foreground",
                    f"--socket={self.munge_socket}",
                    f"--key-file={root}/munge/munge.key",
                    f"--pid-file={root}/munge/munged.pid",
                    f"--log-file={root}/log/munged.log",
                    f"--seed-file={root}/munge/munged.seed",
                    "--num-threads=2",
                ],
                root / "log" / "munged.stdout",
            )
            self._wait(lambda: self.munge_socket.exists(), 15, "munged socket")
            self._spawn(
                "slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.conf)], root / "log" / "slurmctld.log"
            )
            self._spawn(
                "slurmd", [_which("slurmd"), "-D", "-N", self.node, "-f", str(self.conf)], root / "log" / "slurmd.log"
            )
            self._wait(self._node_idle, self.start_timeout, "node idle in sinfo")
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - t0
        return self

    def _node_idle(self) -> bool:
        proc = self.run("sinfo", "-h", "-n", self.node, "-o", "%T", check=False, timeout=15)
        return proc.returncode == 0 and proc.stdout.strip() == "idle"

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            self._check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"Slurm test cluster: no {what} after {timeout} s\n{self.log_tails()}")
            time.sleep(0.25)

    def _strays(self) -> list[int]:
        """PIDs (not this process, not the daemons) whose environment has this cluster's marker or SLURM_CONF
        (slurmd puts it in every job's): slurmstepd and job processes left behind (slurmstepd outlives slurmd by
        design), or clients a test started with `env`."""
        markers = {f"{_MARKER}={self.root}".encode(), f"SLURM_CONF={self.conf}".encode()}
        skip = {os.getpid(), *(p.pid for p in self._procs.values())}
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) in skip:
                continue
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if markers.intersection(f.read().split(b"\0")):
                        found.append(int(entry))
            except OSError:
                continue
        return found

    @staticmethod
    def _terminate(proc_or_pid, timeout: float) -> None:
        if isinstance(proc_or_pid, subprocess.Popen):
            proc = proc_or_pid
            if proc.poll() is not None:
                return
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc_or_pid, signal.SIGKILL)

    def stop(self) -> None:
        """Cancel the jobs, stop slurmd, slurmctld and munged (SIGTERM, SIGKILL after 15 s) by the PIDs started
        here, kill processes left with this cluster's marker, and delete the folder (unless ``keep``)."""
        if not self._started:
            return
        self._started = False
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)
        try:
            if all(name in self._procs and self._procs[name].poll() is None for name in ("slurmctld", "slurmd")):
                with contextlib.suppress(Exception):
                    self.cancel_all(timeout=15)
        finally:
            for name in ("slurmd", "slurmctld"):
                if name in self._procs:
                    self._terminate(self._procs[name], 15)
            for _ in range(2):  # slurmstepd and job processes that outlived the cancel, then their children
                for pid in self._strays():
                    self._terminate(pid, 0)
                time.sleep(0.2)
            if "munged" in self._procs:
                self._terminate(self._procs["munged"], 15)
            if self.root is not None and not self.keep:
                shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> SlurmCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# One cluster per test session, shared by every module that imports the fixture (pytest makes one fixture
# definition per importing module, so a session-scoped fixture alone would start one cluster per module).
_shared: dict[str, object] = {"cluster": None, "users": 0}


def _report(request, text: str) -> None:
    capman = request.config.pluginmanager.getplugin("capturemanager")
    with capman.global_and_fixture_disabled() if capman else contextlib.nullcontext():
        print(f"\n[slurm_cluster] {text}", flush=True)


@pytest.fixture(scope="session", name="slurm_cluster")
def slurm_cluster_fixture(request):
    """A running `SlurmCluster` (with the sacct stand-in on its `env` PATH), shared by the session; skips
    the test when Slurm is missing and cannot be apt-installed."""
    if _shared["cluster"] is None:
        t0 = time.monotonic()
        reason = ensure_slurm_installed(verbose=False)
        if reason:
            pytest.skip(reason)
        installed = time.monotonic() - t0
        if installed > 1:
            _report(request, f"installed Slurm with apt-get in {installed:.1f} s")
        cluster = SlurmCluster(sacct_shim=True).start()
        _report(request, f"cluster up in {cluster.start_seconds:.1f} s ({cluster.root}, {cluster.cpus} CPUs)")
        _shared["cluster"] = cluster
    _shared["users"] += 1
    try:
        yield _shared["cluster"]
    finally:
        _shared["users"] -= 1
        if _shared["users"] == 0:
            _shared["cluster"].stop()
            _shared["cluster"] = None


slurm_cluster = slurm_cluster_fixture  # `from slurm_cluster import slurm_cluster` works too (ruff then says F811)
