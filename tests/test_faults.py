"""Fault battery: every command used wrongly, or stopped at a bad moment, ends in one line (exit 1 for bad data
or state, 2 for bad usage or config) or in correct behaviour, and never loses or damages a run.

Cases that depend on the process (signals, a closed pipe, tracebacks on stderr) run the CLI in a subprocess;
the rest call ``lmlab.cli.main`` in-process, the same code path without paying for a Python start each.
"""

import hashlib
import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_train import TEXT

from lmlab.cli import main as lmlab_main
from lmlab.config import load_config
from lmlab.monitor.metrics import read_metrics
from lmlab.train import Trainer
from lmlab.train.checkpoint import CheckpointManager, step_of
from lmlab.train.trainer import write_json_atomic

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def run_cfg(tmp_path):
    """A YAML config of a tiny byte-level run (12 steps, checkpoints every 4) and its folder."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    cfg = {"name": "r", "runs_dir": str(tmp_path / "runs"),
           "model": {"dim": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 64},
           "data": {"train_files": [str(corpus)], "seq_len": 32, "batch_size": 4},
           "optim": {"lr": 0.01, "warmup_steps": 3},
           "train": {"steps": 12, "log_every": 1, "ckpt_every": 4, "keep_last": 3, "threads": 1},
           "logging": {"progress": False}, "sample": {"max_new_tokens": 240}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, tmp_path / "runs" / "r"


def cli(argv):
    """``lmlab ARGV`` in this process; its exit status (a config error exits through SystemExit)."""
    try:
        return lmlab_main(argv)
    except SystemExit as e:
        return e.code


def run_cli(*args, script=None, timeout=120):
    """``lmlab ARGS`` in a fresh Python process (``script`` runs first, e.g. to patch a method)."""
    code = (script or "") + "\nimport sys\nfrom lmlab.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


def snapshot(folder):
    """Every file under ``folder`` with a hash of its bytes: equal snapshots mean nothing changed."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def one_line_error(res_or_err, code=None):
    err = res_or_err if isinstance(res_or_err, str) else res_or_err.stderr
    lines = [ln for ln in err.splitlines() if ln.strip() and " INFO " not in ln and " WARNING " not in ln]
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    if code is not None:
        assert res_or_err.returncode == code, err
    return lines[0]


def strict_json(path):
    """json.loads refusing NaN / Infinity (which Python's json accepts but JSON does not)."""
    def refuse(const):
        raise ValueError(f"{path}: not valid JSON: {const}")
    return json.loads(Path(path).read_text(), parse_constant=refuse)


def train_rows(run_dir):
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


def raw_train_steps(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if "loss" in r]


# ---- lost or damaged work -------------------------------------------------------------------------------------

# Sends the signal to this process as the final (or a periodic) evaluation starts: deterministic, and it runs the
# real handler at the moment the issue names.
SIGNAL_AT = """
import os, signal
from lmlab.train import trainer
_orig = trainer.Trainer.{method}
def _patched(self, *a, **k):
    if {when}:
        os.kill(os.getpid(), signal.{sig})
    return _orig(self, *a, **k)
trainer.Trainer.{method} = _patched
"""


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_signal_during_final_evaluation_keeps_the_run(run_cfg, sig):
    cfg, run = run_cfg
    res = run_cli("train", cfg, script=SIGNAL_AT.format(method="evaluate", when="not a and not k", sig=sig))
    assert res.returncode == 128 + signal.Signals[sig].value, res.stderr
    assert "Traceback" not in res.stderr and f"interrupted by {sig}" in res.stdout
    final = run / "checkpoints" / "step_00000012"
    assert final.is_dir(), "the final weights were saved before the final evaluation"
    summary = strict_json(run / "summary.json")
    assert summary["status"] == f"interrupted by {sig}" and summary["step"] == 12 and "val_loss" not in summary
    before = snapshot(final)
    rerun = run_cli("train", cfg)  # only evaluates
    assert rerun.returncode == 0, rerun.stderr
    assert "status=completed" in rerun.stdout and "resumed=True" in rerun.stdout and "val_loss=" in rerun.stdout
    assert snapshot(final) == before, "the final checkpoint is not written again"
    assert raw_train_steps(run) == list(range(1, 13)), "no step was trained again"
    vals = [r for r in read_metrics(run / "metrics.jsonl") if "val_loss" in r]
    assert [r["step"] for r in vals] == [12]
    assert strict_json(run / "summary.json")["status"] == "completed"


# Sends SIGTERM to the trainer while the forked recall workers answer their shares (evals.recall.procs=2).
SIGNAL_IN_FORKED_RECALL = """
import os, signal
import lmlab.evals.recall as recall
_orig = recall.fork_map
def _patched(items, fn, procs):
    parent = os.getpid()
    def share(mine):
        if os.getpid() == parent:
            os.kill(parent, signal.SIGTERM)
        return fn(mine)
    return _orig(items, share, procs)
recall.fork_map = _patched
"""


@pytest.mark.parametrize("procs", [1, 2])
def test_signal_during_final_recall_evaluation_keeps_the_run(run_cfg, tmp_path, procs):
    cfg, run = run_cfg
    qs = tmp_path / "eval_train.jsonl"
    qs.write_text("".join(json.dumps({"dialog": [{"source": "user", "content": f"Who is {i}?"}], "value": "x",
                                      "answer_regex": "(?P<value>x)"}) + "\n" for i in range(4)))
    recall = [f"evals.recall.sets=[{qs}]", "evals.recall.max_new_tokens=8", f"evals.recall.procs={procs}"]
    script = (SIGNAL_AT.format(method="evaluate_recall", when="True", sig="SIGTERM") if procs == 1 else
              SIGNAL_IN_FORKED_RECALL)
    res = run_cli("train", cfg, *recall, script=script)
    assert res.returncode == 128 + signal.SIGTERM, res.stderr
    assert "Traceback" not in res.stderr
    assert (run / "checkpoints" / "step_00000012").is_dir()
    rerun = run_cli("train", cfg, *recall)
    assert rerun.returncode == 0 and "recall/train/correct=" in rerun.stdout, rerun.stderr
    assert raw_train_steps(run) == list(range(1, 13))
    assert len((run / "recall" / "train_step12.jsonl").read_text().splitlines()) == 4


def test_signal_during_periodic_evaluation_saves_and_resumes_exactly(run_cfg):
    cfg, run = run_cfg
    ref = run_cli("train", cfg, "name=ref", "train.eval_every=5", "train.eval_batches=2")
    assert ref.returncode == 0, ref.stderr
    res = run_cli("train", cfg, "train.eval_every=5", "train.eval_batches=2",
                  script=SIGNAL_AT.format(method="evaluate", when="self.step == 5", sig="SIGTERM"))
    assert res.returncode == 128 + signal.SIGTERM and "Traceback" not in res.stderr, res.stderr
    assert step_of(CheckpointManager(run).latest()) == 5, "saved at the step whose evaluation was cut short"
    rerun = run_cli("train", cfg, "train.eval_every=5", "train.eval_batches=2")
    assert rerun.returncode == 0, rerun.stderr
    ref_losses = [(r["step"], r["loss"]) for r in train_rows(run.parent / "ref")]
    assert [(r["step"], r["loss"]) for r in train_rows(run)] == ref_losses
    assert raw_train_steps(run) == list(range(1, 13))


def test_signal_during_the_evaluation_that_decides_a_restart_still_restarts(run_cfg):
    """train.restart: a signal that cuts the deciding evaluation short leaves a checkpoint at that step and no
    verdict; the rerun runs that evaluation first and starts the next attempt, ending as an unbroken run does."""
    cfg, run = run_cfg
    restart = ["train.eval_every=2", "train.eval_batches=1", "train.restart.metric=val_loss",
               "train.restart.at_step=4", "train.restart.above=0", "train.restart.max_restarts=1"]
    ref = run_cli("train", cfg, "name=ref", *restart)
    assert ref.returncode == 0, ref.stderr
    res = run_cli("train", cfg, *restart, script=SIGNAL_AT.format(
        method="evaluate", when="self.step == 4 and self.attempt['attempt'] == 0", sig="SIGTERM"))
    assert res.returncode == 128 + signal.SIGTERM and "Traceback" not in res.stderr, res.stderr
    assert step_of(CheckpointManager(run).latest()) == 4 and not (run / "attempts").exists()
    assert not [r for r in read_metrics(run / "metrics.jsonl") if r["step"] == 4 and "val_loss" in r]
    rerun = run_cli("train", cfg, *restart)
    assert rerun.returncode == 0, rerun.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["restarts"] == 1, summary
    decided = [r for r in read_metrics(run / "attempts" / "0" / "metrics.jsonl") if "val_loss" in r]
    assert [r["step"] for r in decided] == [2, 4]  # the cut evaluation, run on resuming
    ref_run = run.parent / "ref"
    assert [r["val_loss"] for r in decided] == [r["val_loss"] for r in read_metrics(
        ref_run / "attempts" / "0" / "metrics.jsonl") if "val_loss" in r]
    assert ([(r["step"], r["loss"]) for r in train_rows(run)] == [(r["step"], r["loss"]) for r in train_rows(ref_run)])


@pytest.mark.parametrize("finished", [True, False])
def test_failed_resume_of_another_model_changes_nothing(run_cfg, finished):
    cfg, run = run_cfg
    assert cli(["train", str(cfg)] + ([] if finished else ["train.steps=6"])) == 0
    before = snapshot(run)
    res = run_cli("train", cfg, "model.dim=64")
    line = one_line_error(res, 2)
    assert "model.dim: 32 -> 64" in line and str(run) in line
    assert snapshot(run) == before
    gen = run_cli("generate", run, "--prompt", "To", "--max-new-tokens", "4")
    assert gen.returncode == 0 and gen.stdout.startswith("To"), gen.stderr


def test_rerun_of_a_finished_run_does_nothing(run_cfg, capsys):
    cfg, run = run_cfg
    assert cli(["train", str(cfg)]) == 0
    before = snapshot(run)
    assert cli(["train", str(cfg), "optim.lr=0.02"]) == 0  # a changed lr is named, but nothing is trained
    out = capsys.readouterr().out
    assert "status=completed" in out and "step=12" in out
    assert snapshot(run) == before


def test_damaged_newest_checkpoint_falls_back_and_resumes_exactly(run_cfg):
    cfg, run = run_cfg
    assert cli(["train", str(cfg), "name=ref"]) == 0
    trainer = Trainer(load(cfg))
    trainer.fit(stop_after=8)  # checkpoints at 4 and 8
    newest = CheckpointManager(run).latest()
    assert step_of(newest) == 8
    distcp = next(newest.glob("*.distcp"))
    distcp.write_bytes(distcp.read_bytes()[:100])  # truncated
    refused = run_cli("train", cfg, "train.ckpt_fallback=false")
    line = one_line_error(refused, 1)
    assert "step_00000008" in line and "step_00000004" in line and "damaged" in line
    gen = run_cli("generate", run, "--prompt", "To", "--max-new-tokens", "4")
    assert gen.returncode == 0 and "step_00000008 is damaged" in gen.stderr, gen.stderr
    assert newest.is_dir(), "a read-only command moves nothing"
    res = run_cli("train", cfg)
    assert res.returncode == 0 and "step_00000008 is damaged" in res.stderr, res.stderr
    assert (newest.parent / "step_00000008.damaged").is_dir(), "set aside, not deleted"
    ref = [(r["step"], r["loss"]) for r in train_rows(run.parent / "ref")]
    assert [(r["step"], r["loss"]) for r in train_rows(run)] == ref
    assert raw_train_steps(run) == list(range(1, 13))


def test_damaged_legacy_checkpoint_without_file_sizes_falls_back(run_cfg):
    """Checkpoints written before meta.json listed file sizes: the failed load itself shows the damage."""
    cfg, run = run_cfg
    Trainer(load(cfg)).fit(stop_after=8)
    newest = CheckpointManager(run).latest()
    meta = json.loads((newest / "meta.json").read_text())
    del meta["files"]
    (newest / "meta.json").write_text(json.dumps(meta))
    for f in newest.glob("*.distcp"):
        f.write_bytes(b"garbage")
    summary = Trainer(load(cfg)).fit()
    assert summary["status"] == "completed" and summary["resumed"]
    assert (newest.parent / "step_00000008.damaged").is_dir()


def test_no_loadable_checkpoint_is_refused_not_restarted(run_cfg):
    cfg, run = run_cfg
    Trainer(load(cfg)).fit(stop_after=4)
    only = CheckpointManager(run).latest()
    (only / "meta.json").write_text("{not json")
    before = snapshot(run)
    res = run_cli("train", cfg)
    line = one_line_error(res, 1)
    assert "step_00000004" in line and "unreadable" in line
    assert snapshot(run) == before


def test_metrics_after_a_crash_and_resume_hold_each_step_once(run_cfg):
    cfg, run = run_cfg
    assert cli(["train", str(cfg), "name=ref"]) == 0
    Trainer(load(cfg)).fit(stop_after=8)
    # a crash after step 8 was logged but before its checkpoint: rows 5-8 now lie past the newest checkpoint
    import shutil
    shutil.rmtree(CheckpointManager(run).latest())
    assert raw_train_steps(run) == list(range(1, 9))
    assert cli(["train", str(cfg)]) == 0
    assert raw_train_steps(run) == list(range(1, 13)), "every step once, in the file itself"
    dropped = [json.loads(x)["step"] for x in (run / "metrics.dropped.jsonl").read_text().splitlines()]
    assert dropped == [5, 6, 7, 8], "the rows past the checkpoint are kept aside"
    ref = [(r["step"], r["loss"]) for r in train_rows(run.parent / "ref")]
    assert [(r["step"], r["loss"]) for r in train_rows(run)] == ref


@pytest.mark.parametrize("name", ["../escaped", "", "/tmp/abs", "a/../../b", "a//b", "."])
def test_run_names_stay_inside_runs_dir(run_cfg, tmp_path, capsys, name):
    cfg, _ = run_cfg
    assert cli(["train", str(cfg), f"name={name}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("config error: name:"), err
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "runs").exists()


def test_dialogs_without_loss_tokens_are_refused(tmp_path, capsys):
    good = tmp_path / "good.jsonl"
    silent = tmp_path / "silent.jsonl"
    good.write_text("".join(json.dumps([{"source": "user", "content": f"hi {i}"},
                                        {"source": "assistant", "content": "yo"}]) + "\n" for i in range(40)))
    silent.write_text("".join(json.dumps([{"source": "user", "content": f"hi {i}"}]) + "\n" for i in range(40)))
    base = [f"runs_dir={tmp_path / 'runs'}", "data.kind=dialog", "data.seq_len=32", "data.batch_size=4",
            "model.dim=32", "model.n_layers=1", "model.n_heads=2", "model.max_seq_len=64", "train.steps=2",
            "logging.progress=false"]
    for files in ([f"data.train_files=[{silent}]"], [f"data.train_files=[{good}]", f"data.val_files=[{silent}]"]):
        assert cli(["train", str(_empty_yaml(tmp_path)), *base, *files]) == 1
        err = capsys.readouterr().err
        assert "no token to train on" in err and "silent.jsonl" in err and "assistant" in err
    assert not (tmp_path / "runs").exists()


def _empty_yaml(tmp_path):
    p = tmp_path / "empty.yaml"
    p.write_text("{}\n")
    return p


def test_summary_is_strict_json(tmp_path):
    write_json_atomic(tmp_path / "s.json", {"val_loss": float("nan"), "x": float("inf"), "step": 3})
    assert strict_json(tmp_path / "s.json") == {"val_loss": None, "x": None, "step": 3}


# ---- tracebacks on user error ---------------------------------------------------------------------------------

@pytest.fixture
def trained(run_cfg):
    cfg, run = run_cfg
    assert cli(["train", str(cfg)]) == 0
    return run


@pytest.mark.parametrize("args, code, says", [
    (["--temperature", "-1"], 2, "temperature must be finite and >= 0"),
    (["--temperature", "nan"], 2, "temperature must be finite"),
    (["--temperature", "inf"], 2, "temperature must be finite"),
    (["--top-p", "0"], 2, "top_p must be in (0, 1]"),
    (["--top-p", "1.5"], 2, "top_p must be in (0, 1]"),
    (["--top-k", "-1"], 2, "top_k must be >= 0"),
    (["--max-new-tokens", "-1"], 2, "max_new_tokens must be >= 0"),
    (["--max-new-tokens", "100"], 2, "exceed 64"),
    (["--prompt", ""], 2, "encodes to no tokens"),
    ([], 2, "no prompt"),
    (["--prompt", "x" * 64], 2, "the prompt has 64 tokens"),
])
def test_generate_bad_usage_is_one_line(trained, capsys, args, code, says):
    if not any(a.startswith("--prompt") for a in args):
        args = args + (["--prompt", "To be"] if args else [])
    assert cli(["generate", str(trained), *args]) == code
    out, err = capsys.readouterr()
    assert out == "", "nothing is echoed before the request is checked"
    assert says in one_line_error(err)


def test_generate_bad_prompts_files(trained, tmp_path, capsys):
    binary = tmp_path / "prompts.txt"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe")
    assert cli(["generate", str(trained), "--prompts-file", str(binary)]) == 1
    assert "prompts.txt: not valid UTF-8" in one_line_error(capsys.readouterr().err)
    assert cli(["generate", str(trained), "--prompts-file", str(tmp_path / "nope.txt")]) == 1
    assert "nope.txt does not exist" in one_line_error(capsys.readouterr().err)


def test_generate_caps_the_default_to_the_context_and_says_so(trained, capsys, caplog):
    caplog.set_level(logging.INFO, logger="lmlab")
    # sample.max_new_tokens=240 does not fit after the prompt in model.max_seq_len=64: capped to 62
    assert cli(["generate", str(trained), "--prompt", "To", "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert "capped to 62" in caplog.text
    from lmlab.train.checkpoint import load_run
    run_cfg, model, tok = load_run(trained)
    from lmlab.inference import Engine, SamplingParams
    engine = Engine.from_config(model, tok, run_cfg.engine)  # as the CLI builds it
    expected = engine.generate_text(["To"], SamplingParams(max_new_tokens=62, temperature=0))[0]
    assert out == "To" + expected + "\n"


def test_export_refuses_before_writing(run_cfg, tmp_path, capsys):
    cfg, run = run_cfg
    assert cli(["train", str(cfg), "model.smear_keys=2", "train.steps=2"]) == 0
    out = tmp_path / "hf"
    assert cli(["export", str(run), str(out)]) == 1
    assert "smear_keys" in one_line_error(capsys.readouterr().err)
    assert not out.exists()
    afile = tmp_path / "file.txt"
    afile.write_text("keep me")
    assert cli(["export", str(run), str(afile)]) == 1
    assert "is not a folder" in one_line_error(capsys.readouterr().err)
    assert afile.read_text() == "keep me"


@pytest.mark.parametrize("override, says", [
    ("data.seq_len=100", "data.seq_len: 100 is longer than model.max_seq_len=64"),
    ("train.device=tpu", "train.device: 'tpu' is not a device"),
    ("sample.temperature=-1", "sample.temperature: must be finite"),
])
@pytest.mark.parametrize("command", ["config", "train"])
def test_config_cross_checks(run_cfg, capsys, command, override, says):
    cfg, run = run_cfg
    assert cli([command, str(cfg), override]) == 2
    assert says in one_line_error(capsys.readouterr().err)
    assert not run.exists()


def test_eval_bad_options(trained, tmp_path, capsys):
    qs = tmp_path / "eval_x.jsonl"
    qs.write_text(json.dumps({"dialog": [{"source": "user", "content": "Who?"}], "value": "x",
                              "answer_regex": "(?P<value>x)"}) + "\n")
    notdb = tmp_path / "notes.db"
    notdb.write_text("these are notes, not a database\n" * 50)
    assert cli(["eval", str(trained), "--set", str(qs), "--db", str(notdb)]) == 1
    assert "notes.db cannot be read as a SQLite database" in one_line_error(capsys.readouterr().err)
    assert cli(["eval", str(trained), "--set", str(qs), "--max-questions", "-3"]) == 2
    assert "--max-questions: must be >= 0" in one_line_error(capsys.readouterr().err)
    assert cli(["eval", str(trained), "--set", str(qs), "--procs", "0"]) == 2
    assert "--procs: must be >= 1" in one_line_error(capsys.readouterr().err)
    assert cli(["eval", str(trained), "--set", str(qs), "--max-batch", "-1"]) == 2
    assert "--max-batch: must be >= 0" in one_line_error(capsys.readouterr().err)
    assert cli(["eval", str(trained), "--set", str(qs), "--max-new-tokens", "0"]) == 2
    assert "--max-new-tokens: must be positive" in one_line_error(capsys.readouterr().err)
    assert cli(["eval", str(trained), "--set", str(qs), "--max-new-tokens", "100000"]) == 2
    assert "evals.recall.max_new_tokens=100000" in one_line_error(capsys.readouterr().err)
    assert cli(["eval", str(trained)]) == 2
    assert "no recall sets" in one_line_error(capsys.readouterr().err)


def test_eval_of_a_run_that_keeps_no_verdicts_still_writes_its_metrics(run_cfg, tmp_path, capsys):
    """The capacity and alpha presets set evals.recall.save_outputs false: `lmlab eval` of such a run writes the
    metrics file (it once failed there, after the whole evaluation, for want of its folder)."""
    cfg, run = run_cfg
    qs = tmp_path / "eval_x.jsonl"
    qs.write_text(json.dumps({"dialog": [{"source": "user", "content": "Who?"}], "value": "x",
                              "answer_regex": "(?P<value>x)"}) + "\n")
    assert cli(["train", str(cfg), "evals.recall.save_outputs=false"]) == 0
    # the run's max_new_tokens (160, the default) leaves no room in its 64-token context: one line, no traceback
    assert cli(["eval", str(run), "--set", str(qs)]) == 2
    assert (f"evals.recall.max_new_tokens=160: {qs}: question 0 has 6 prompt tokens, and with 160 new ones "
            "exceeds the 64-token context") in one_line_error(capsys.readouterr().err)
    assert not (run / "recall").exists()
    assert cli(["train", str(cfg), "evals.recall.sets=[x.jsonl]"]) == 2  # found before anything trains
    assert "evals.recall.max_new_tokens: 160 leaves no room" in one_line_error(capsys.readouterr().err)
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("max_new_tokens: 160", "max_new_tokens: 8"))
    assert cli(["eval", str(run), "--set", str(qs)]) == 0
    metrics = json.loads((run / "recall" / "eval" / "metrics_step12.json").read_text())
    assert metrics["step"] == 12 and metrics["recall/x/n"] == 1
    assert sorted(p.name for p in (run / "recall" / "eval").iterdir()) == ["metrics_step12.json"]


def test_closed_pipe_is_quiet():
    proc = subprocess.Popen([sys.executable, "-m", "lmlab.cli", "describe"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the first line (like `| head -0`)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 128 + signal.SIGPIPE
    assert err == "", err


@pytest.mark.parametrize("args, says", [
    (["--people", "-5"], "--people: must be >= 1"),
    (["--people", "0"], "--people: must be >= 1"),
    (["--people", "3", "--ood", "-1"], "--ood: must be >= 0"),
    (["--people", "3", "--absent", "-3"], "--absent: must be >= 0"),
    (["--people", "3", "--practice", "-2"], "--practice: must be >= 0"),
    (["--people", "3", "--paraphrases", "0"], "--paraphrases: must be in 1.."),
])
def test_build_data_refuses_bad_counts_before_writing(tmp_path, args, says):
    out = tmp_path / "data"
    res = subprocess.run([sys.executable, str(ROOT / "apps/memory/build_data.py"), *args, "--out", str(out)],
                         capture_output=True, text=True, timeout=60)
    assert says in one_line_error(res.stderr.splitlines()[-1]) and res.returncode == 2
    assert not out.exists()


def test_build_data_refuses_a_file_as_out(tmp_path):
    afile = tmp_path / "x.txt"
    afile.write_text("keep")
    res = subprocess.run([sys.executable, str(ROOT / "apps/memory/build_data.py"), "--people", "2", "--out",
                          str(afile)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "exists and is not a folder" in res.stderr
    assert afile.read_text() == "keep"


def test_help_says_defaults_run_folder_and_exit_codes(capsys):
    assert cli(["generate", "--help"]) == 0
    text = capsys.readouterr().out.split("\noptions:", 1)[1]
    for option in ("--prompt", "--prompts-file", "--max-new-tokens", "--temperature", "--top-k", "--top-p", "--seed",
                   "--step"):
        block = text.split(option, 1)[1].split("\n  --", 1)[0]
        assert "default" in block, f"{option} says no default: {block!r}"
    assert "exit status" in text
    assert cli(["train", "--help"]) == 0
    text = capsys.readouterr().out
    assert "runs_dir" in text and "exit status" in text and "128 + N" in text


def test_sql_refusals_keep_sqlglot_quiet(tmp_path, caplog):
    import sqlglot

    from lmlab.tools.sql import SqlError, SqlTool

    db = tmp_path / "p.sqlite"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE people (name TEXT)")
    tool = SqlTool(db)
    for query in ("SHOW TABLES", "EXPLAIN SELECT 1", "SELECT 1; LOAD x"):
        with pytest.raises(SqlError):
            tool.check(query)
    assert "Falling back" not in caplog.text
    sqlglot.parse("SHOW TABLES", read="sqlite")  # sqlglot used directly keeps its own warnings
    assert "Falling back" in caplog.text


def load(cfg_path):
    return load_config(cfg_path)
