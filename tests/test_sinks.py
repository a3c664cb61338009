"""Metrics sinks: TensorBoard and wandb (offline) written, resumed and read back; `lmlab sync`; read_metrics."""

import json
import math
import os
import shutil
import struct
from pathlib import Path

import pytest
from test_train import corpus, make_cfg  # noqa: F401 - the tiny config and corpus of the trainer tests

from lmlab.monitor.metrics import JsonlSink, TensorboardSink, WandbSink, read_metrics, wandb_run_id
from lmlab.monitor.sync import main as sync_main


# ------------------------------------------------------------------------------------------------- readers
def tb_scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar TensorBoard shows for a log folder: {tag: [(step, value), ...]} (after its purges)."""
    ea = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    acc = ea.EventAccumulator(str(log_dir), size_guidance={ea.SCALARS: 0})  # 0: keep all, no sampling
    acc.Reload()
    series = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    return {tag: points for tag, points in series.items() if points}  # a tag whose points were all purged shows none


def wandb_records(path):
    """The protobuf records of a .wandb transaction log (a leveldb log: 7-byte header ':W&B' + magic + version, then
    32 KiB blocks of chunks with a 7-byte header: crc32, length, type FULL=1 / FIRST=2 / MIDDLE=3 / LAST=4). wandb
    0.31 ships no Python reader of its own (its reader is in the Go core)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B"
    i, buf = 7, b""
    while i + 7 <= len(data):
        if 32768 - i % 32768 < 7:  # a block's tail too short for a header is padding
            i += 32768 - i % 32768
            continue
        _, n, kind = struct.unpack("<IHB", data[i:i + 7])
        if kind == 0:
            break
        buf += data[i + 7:i + 7 + n]
        i += 7 + n
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            buf = b""
            yield rec


def wandb_history(path) -> list[dict]:
    rows = []
    for rec in wandb_records(path):
        if rec.WhichOneof("record_type") == "history":
            rows.append({it.key or "/".join(it.nested_key): json.loads(it.value_json) for it in rec.history.item})
    return rows


def wandb_run_record(path):
    return next(r.run for r in wandb_records(path) if r.WhichOneof("record_type") == "run")


def offline_runs(run_dir) -> list[Path]:
    """The .wandb files `wandb sync RUN/wandb` would upload (it looks one folder down)."""
    return sorted(p for p in Path(run_dir).glob("wandb/*/run-*.wandb") if not p.parent.is_symlink())


def child_processes(name: str) -> list[int]:
    """Live child processes of this one whose command is ``name``."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        comm, rest = text[text.index("(") + 1:text.rindex(")")], text[text.rindex(")") + 2:].split()
        if comm == name and int(rest[1]) == os.getpid() and rest[0] != "Z":
            found.append(int(stat.parent.name))
    return found


@pytest.fixture
def wandb_home(tmp_path, monkeypatch):
    """wandb offline with an empty HOME and no WANDB_* folders set: whatever it writes outside the run folder shows
    up in that HOME."""
    pytest.importorskip("wandb")
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for var in ("XDG_CACHE_HOME", "XDG_CONFIG_HOME", "XDG_DATA_HOME", "WANDB_CACHE_DIR", "WANDB_DATA_DIR",
                "WANDB_CONFIG_DIR", "WANDB_DIR", "WANDB_MODE", "WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(var, raising=False)
    return home


def write_rows(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def rewind(path, step):
    """What the trainer does to metrics.jsonl when it resumes at ``step``."""
    write_rows(path, [json.loads(line) for line in path.read_text().splitlines() if json.loads(line)["step"] <= step])


# ------------------------------------------------------------------------------------------------- read_metrics
def test_read_metrics_keeps_every_row_of_a_step_and_drops_re_done_ones(tmp_path):
    p = tmp_path / "metrics.jsonl"
    write_rows(p, [{"step": 10, "loss": 3.0}, {"step": 10, "val_loss": 3.1}, {"step": 10, "recall/a/correct": 0.1},
                   {"step": 20, "loss": 2.0}, {"step": 20, "recall/a/correct": 0.2},  # then a crash; resume at 10
                   {"step": 20, "loss": 2.5}, {"step": 20, "recall/a/correct": 0.3},  # step 20 re-done
                   {"step": 30, "loss": 1.9},                                         # crash; resume at 20
                   {"step": 30, "loss": 1.8}, {"step": 40, "loss": 1.5},              # 30 re-done
                   {"step": 35, "loss": 1.6},                                         # crash; resume at 30
                   {"step": 35, "val_loss": 1.7}, {"step": 35, "recall/a/correct": 0.5},  # evaluations at the
                   {"step": 35, "val_loss": 1.65}])                                       # last step, then the final
    assert read_metrics(p) == [{"step": 10, "loss": 3.0}, {"step": 10, "val_loss": 3.1},
                               {"step": 10, "recall/a/correct": 0.1}, {"step": 20, "loss": 2.5},
                               {"step": 20, "recall/a/correct": 0.3}, {"step": 30, "loss": 1.8},
                               {"step": 35, "loss": 1.6}, {"step": 35, "recall/a/correct": 0.5},
                               {"step": 35, "val_loss": 1.65}]


# ------------------------------------------------------------------------------------------------- TensorBoard
def test_tensorboard_sink_writes_finite_numbers_only(tmp_path):
    sink = TensorboardSink(tmp_path / "tb")
    sink.log({"step": 1, "loss": 2.5, "tokens": 128, "nan": math.nan, "inf": math.inf, "none": None, "text": "hi",
              "flag": True, "recall/a/correct": 0.25})
    sink.log({"step": 2, "loss": 2.0, "tokens": 256, "nan": 1.0})
    sink.close()
    got = tb_scalars(tmp_path / "tb")
    assert got == {"loss": [(1, 2.5), (2, 2.0)], "tokens": [(1, 128.0), (2, 256.0)], "nan": [(2, 1.0)],
                   "recall/a/correct": [(1, 0.25)]}


def test_tensorboard_resume_shows_each_step_once_with_the_new_values(tmp_path):
    tb = tmp_path / "tb"
    sink = TensorboardSink(tb)
    for s in range(1, 11):  # logged, then a crash; the newest checkpoint is step 5
        sink.log({"step": s, "loss": float(s)})
    sink.log({"step": 8, "val_loss": 0.8})
    sink.close()
    sink = TensorboardSink(tb, start_step=5)
    for s in range(6, 13):
        sink.log({"step": s, "loss": 100.0 + s})
    sink.close()
    got = tb_scalars(tb)
    assert got["loss"] == [(s, float(s)) for s in range(1, 6)] + [(s, 100.0 + s) for s in range(6, 13)]
    assert "val_loss" not in got  # logged at a step that was re-done (and not re-logged): gone too
    # a resume that logs nothing before stopping again still hides the steps after its start
    TensorboardSink(tb, start_step=3).close()
    assert tb_scalars(tb)["loss"] == [(s, float(s)) for s in range(1, 4)]


# ------------------------------------------------------------------------------------------------- wandb
def test_wandb_run_id_is_stored_once_and_adopts_an_earlier_run(tmp_path):
    assert wandb_run_id(tmp_path / "a", create=False) is None
    first = wandb_run_id(tmp_path / "a")
    assert len(first) == 8 and first.isalnum() and first == first.lower()
    assert wandb_run_id(tmp_path / "a") == first == (tmp_path / "a" / "wandb_id").read_text().strip()
    assert wandb_run_id(tmp_path / "b") != first
    # a run logged before the id was stored (its id was its name): the same wandb run goes on
    legacy = tmp_path / "c" / "wandb" / "offline-run-20260101_000000-my-run"
    legacy.mkdir(parents=True)
    (legacy / "run-my-run.wandb").write_bytes(b"")
    (tmp_path / "c" / "wandb_id").write_text("")  # cut short by a crash: made again
    assert wandb_run_id(tmp_path / "c") == "my-run"


def test_wandb_offline_resume_continues_one_run_with_each_step_once(tmp_path, wandb_home):
    run = tmp_path / "runs" / "r"
    jsonl = run / "metrics.jsonl"
    rows = JsonlSink(jsonl)
    sink = WandbSink(run, "proj", "first-name", "offline", config={"model": {"dim": 32}})
    run_id = sink.id
    for s in range(1, 11):
        row = {"step": s, "loss": float(s), "none": None, "nan": math.nan, "note": "x"}
        rows.log(row)
        sink.log(row)
    sink.log({"step": 10, "val_loss": 0.5})
    sink.close()
    rows.close()
    assert child_processes("wandb-core") == []  # the service process ended with the sink
    first = offline_runs(run)
    assert len(first) == 1 and first[0].name == f"run-{run_id}.wandb"

    rewind(jsonl, 5)  # a crash after step 10; the newest checkpoint is step 5; renamed meanwhile
    sink = WandbSink(run, "proj", "new-name", "offline", config={"model": {"dim": 32}}, start_step=5)
    assert sink.id == run_id
    for s in range(6, 13):
        sink.log({"step": s, "loss": 100.0 + s})
    sink.close()

    current = offline_runs(run)
    assert len(current) == 1 and current[0].name == f"run-{run_id}.wandb"
    assert [p.name for p in (run / "wandb" / "superseded").iterdir()] == [first[0].parent.name]
    history = wandb_history(current[0])
    assert [(h["trainer/step"], h["loss"]) for h in history] == \
        [(s, float(s)) for s in range(1, 6)] + [(s, 100.0 + s) for s in range(6, 13)]
    assert all("none" not in h and "nan" not in h for h in history) and history[0]["note"] == "x"
    record = wandb_run_record(current[0])
    assert (record.run_id, record.display_name, record.project) == (run_id, "new-name", "proj")
    assert json.loads(next(i.value_json for i in record.config.update if i.key == "model")) == {"dim": 32}
    assert list(wandb_home.rglob("*")) == []  # nothing written outside the run folder
    assert child_processes("wandb-core") == []


# ------------------------------------------------------------------------------------------------- lmlab sync
CRASHED = [{"step": 1, "loss": 4.0}, {"step": 2, "loss": 3.0}, {"step": 2, "val_loss": 3.5}, {"step": 3, "loss": 2.9},
           {"step": 2, "loss": 3.0}, {"step": 2, "val_loss": 3.5},  # resumed from step 1: 2 re-done
           {"step": 3, "loss": 2.5}, {"step": 4, "loss": 2.0}, {"step": 4, "val_loss": 2.25}]


def test_sync_to_tensorboard_replays_each_step_once(tmp_path, capsys):
    run = tmp_path / "runs" / "a"
    write_rows(run / "metrics.jsonl", CRASHED)
    assert sync_main([str(run), "--to", "tensorboard"]) == 0
    want = {"loss": [(1, 4.0), (2, 3.0), (3, 2.5), (4, 2.0)], "val_loss": [(2, 3.5), (4, 2.25)]}
    assert tb_scalars(run / "tb") == want
    assert capsys.readouterr().out == f"{run}: 6 rows (steps 1..4) -> {run / 'tb'}\n"
    # again into the same folder, after the run went on with other values: purged and rewritten, each step once
    write_rows(run / "metrics.jsonl", [{"step": 1, "loss": 9.0}, {"step": 2, "loss": 8.0}])
    assert sync_main([str(run), "--to", "tensorboard"]) == 0
    assert tb_scalars(run / "tb") == {"loss": [(1, 9.0), (2, 8.0)]}


def test_sync_several_runs_through_the_cli_with_a_glob(tmp_path, capsys):
    from lmlab.cli import main as cli_main

    for name, loss in (("g-1", 1.0), ("g-2", 2.0)):
        write_rows(tmp_path / "runs" / name / "metrics.jsonl", [{"step": 1, "loss": loss}])
    out = tmp_path / "tb_all"
    assert cli_main(["sync", str(tmp_path / "runs" / "g-*"), "--to", "tensorboard", "--out", str(out)]) == 0
    assert tb_scalars(out / "g-1") == {"loss": [(1, 1.0)]} and tb_scalars(out / "g-2") == {"loss": [(1, 2.0)]}
    assert len(capsys.readouterr().out.splitlines()) == 2


def test_sync_to_wandb_replaces_the_live_offline_run(tmp_path, wandb_home, capsys):
    run = tmp_path / "runs" / "a"
    write_rows(run / "metrics.jsonl", CRASHED)
    (run / "config.yaml").write_text("name: the-run\nlogging:\n  wandb_project: proj\nmodel:\n  dim: 32\n")
    live = WandbSink(run, "proj", "the-run", "offline")  # a live log with the rows as they came, re-done ones twice
    for row in CRASHED:
        live.log(row)
    live.close()
    assert sync_main([str(run), "--to", "wandb"]) == 0
    assert f"wandb run {live.id} 'the-run'" in capsys.readouterr().out
    current = offline_runs(run)
    assert len(current) == 1 and current[0].name == f"run-{live.id}.wandb"  # the same run, not a second one
    assert len(list((run / "wandb" / "superseded").iterdir())) == 1
    history = [{k: v for k, v in h.items() if not k.startswith("_")} for h in wandb_history(current[0])]
    assert history == [{"trainer/step": r["step"], **{k: v for k, v in r.items() if k != "step"}}
                       for r in read_metrics(run / "metrics.jsonl")]
    record = wandb_run_record(current[0])
    assert (record.display_name, record.project) == ("the-run", "proj")
    assert list(wandb_home.rglob("*")) == []


@pytest.mark.parametrize("args, status, message", [
    (["{run}", "--to", "foo"], 2, "argument --to: invalid choice: 'foo'"),
    (["{run}"], 2, "the following arguments are required: --to"),
    (["{run}", "--to", "wandb", "--out", "x"], 2, "--out is for --to tensorboard"),
    (["{run}", "--to", "tensorboard", "--mode", "online"], 2, "--project and --mode are for --to wandb"),
    (["{tmp}/nowhere", "--to", "tensorboard"], 1, "nowhere: no such run folder"),
    (["{tmp}/runs/z*", "--to", "tensorboard"], 1, "no run folder matches"),
    (["{tmp}/runs/empty", "--to", "tensorboard"], 1, "is not a run folder: it has no metrics.jsonl"),
    (["{run}", "{tmp}/runs/bad", "--to", "tensorboard"], 1, "metrics.jsonl:2: malformed JSON"),
])
def test_sync_errors_are_one_line_and_write_nothing(tmp_path, capsys, args, status, message):
    run = tmp_path / "runs" / "good"
    write_rows(run / "metrics.jsonl", [{"step": 1, "loss": 1.0}])
    (tmp_path / "runs" / "empty").mkdir()
    (tmp_path / "runs" / "bad").mkdir()
    (tmp_path / "runs" / "bad" / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo\n')
    assert sync_main([a.format(run=run, tmp=tmp_path) for a in args]) == status
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lmlab sync: error: ") and message in err
    assert not (run / "tb").exists() and not (run / "wandb").exists()  # a bad RUN stops all before any write


# ------------------------------------------------------------------------------------------------- the trainer
@pytest.mark.slow
def test_trainer_resume_logs_each_step_once_to_tensorboard_and_wandb(tmp_path, corpus, wandb_home):  # noqa: F811
    from lmlab.train import Trainer
    from lmlab.train.checkpoint import CheckpointManager

    over = ["logging.tensorboard=true", "logging.wandb=true", "train.ckpt_every=2", "profile.measure_peak=false"]
    cfg = make_cfg(tmp_path, corpus, "train.steps=5", *over)
    Trainer(cfg).fit()
    shutil.rmtree(CheckpointManager(cfg.run_dir).latest())  # as if it crashed after step 5, saved at step 4
    assert Trainer(make_cfg(tmp_path, corpus, "train.steps=7", *over)).fit()["resumed"]
    losses = [(r["step"], r["loss"]) for r in read_metrics(cfg.run_dir / "metrics.jsonl") if "loss" in r]
    assert [s for s, _ in losses] == list(range(1, 8))
    tb = tb_scalars(cfg.run_dir / "tb")["loss"]
    assert [s for s, _ in tb] == list(range(1, 8)) and [v for _, v in tb] == pytest.approx([v for _, v in losses])
    (current,) = offline_runs(cfg.run_dir)
    wb = [(h["trainer/step"], h["loss"]) for h in wandb_history(current) if "loss" in h]
    assert wb == losses  # step 5 once (re-done), and the steps before the resume replayed
    assert list(wandb_home.rglob("*")) == []
