"""The light profiler: step timers and MFU in metrics.jsonl, the CPU peak cache, the torch.profiler window and
`lmlab profile`."""

import json
import time

import pytest
import torch

from lmlab.cli import main as cli_main
from lmlab.config import ConfigError, load_config
from lmlab.monitor import profiler
from lmlab.monitor.metrics import read_metrics
from lmlab.monitor.profiler import StepTimer, TraceError, find_trace, top_operators
from lmlab.train import Trainer

TEXT = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 60


def make_cfg(tmp_path, *overrides, name="p"):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    base = [f"name={name}", f"runs_dir={tmp_path / 'runs'}", f"data.train_files=[{corpus}]",
            "model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.max_seq_len=64",
            "data.seq_len=32", "data.batch_size=4", "optim.warmup_steps=2", "optim.lr=0.01",
            "train.steps=8", "train.log_every=4", "logging.progress=false"]
    return load_config(None, base + list(overrides))


def test_step_timer_sums_phases_per_window():
    timer = StepTimer("cpu")
    for _ in range(4):
        with timer.phase("forward"):
            time.sleep(0.01)
    with timer.phase("eval"):
        time.sleep(0.02)
    out = timer.window(steps=4)
    assert 9 <= out["time/forward_ms"] < 30  # mean per step, in ms
    assert 0.018 <= out["time/eval_s"] < 0.1  # evaluations: a total, in s
    assert timer.window(steps=4) == {}  # a new window starts empty


def test_disabled_timer_is_a_shared_no_op():
    timer = StepTimer("cpu", enabled=False)
    assert timer.phase("forward") is timer.phase("backward")  # one null context, nothing allocated per step
    with timer.phase("forward"):
        pass
    timer.add("eval", 1.0)
    assert timer.window(steps=1) == {}


def test_metrics_rows_carry_timers_mfu_and_memory(tmp_path, one_thread):
    cfg = make_cfg(tmp_path, "train.peak_flops=1e11", "data.val_fraction=0.1", "train.eval_every=4",
                   "train.ckpt_every=4")
    summary = Trainer(cfg).fit()
    rows = [r for r in read_metrics(cfg.run_dir / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == [4, 8]
    for r in rows:
        phases = sum(r[f"time/{k}_ms"] for k in ("data", "forward", "backward", "optim"))
        assert 0 < phases <= r["time/step_ms"] * 1.05  # the phases are parts of the step's wall time
        assert r["time/forward_ms"] > 0 and r["time/backward_ms"] > 0
        assert r["peak_mem_mb"] > 10
        expected = summary["flops_per_token"] * r["tokens_per_s"] / 1e11
        assert r["mfu"] == pytest.approx(expected, rel=1e-9)
    # the evaluation and checkpoint after step 4 are reported in the next window, as totals
    assert rows[1]["time/eval_s"] > 0 and rows[1]["time/ckpt_s"] > 0
    assert "time/eval_s" not in rows[0]
    assert summary["peak_flops"] == 1e11 and summary["peak_mem_mb"] > 10


def test_timers_change_no_loss(tmp_path, one_thread):
    on = make_cfg(tmp_path, "train.log_every=1", name="on")
    off = make_cfg(tmp_path, "train.log_every=1", "profile.timers=false", "profile.measure_peak=false", name="off")
    Trainer(on).fit()
    Trainer(off).fit()
    a = [(r["step"], r["loss"]) for r in read_metrics(on.run_dir / "metrics.jsonl") if "loss" in r]
    b = [(r["step"], r["loss"]) for r in read_metrics(off.run_dir / "metrics.jsonl") if "loss" in r]
    assert a == b and len(a) == 8
    off_rows = read_metrics(off.run_dir / "metrics.jsonl")
    assert not any(k.startswith("time/") and k != "time/step_ms" for r in off_rows for k in r)
    assert not any("mfu" in r for r in off_rows)  # CPU, no peak given, none measured: no MFU column


def test_cpu_peak_is_measured_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("LMLAB_CACHE", str(tmp_path / "cache"))
    calls = []
    real = profiler.measure_matmul_flops

    def counting(*a, **kw):
        calls.append(1)
        return real(n=256, repeats=2)

    monkeypatch.setattr(profiler, "measure_matmul_flops", counting)
    first = profiler.cpu_matmul_peak(threads=1)
    assert first > 1e8 and len(calls) == 1
    assert profiler.cpu_matmul_peak(threads=1) == first and len(calls) == 1  # from the cache
    entry = next(iter(json.loads((tmp_path / "cache" / "peak_flops.json").read_text()).values()))
    assert entry["flops"] == first and entry["threads"] == 1
    monkeypatch.setattr(profiler, "measure_matmul_flops", lambda *a, **kw: first / 10)
    assert profiler.cpu_matmul_peak(threads=1, refresh=True) == first  # a slower re-measurement keeps the best
    profiler.cpu_matmul_peak(threads=2)
    assert len(json.loads((tmp_path / "cache" / "peak_flops.json").read_text())) == 2  # one entry per thread count


def test_matmul_flops_counts_two_flops_per_multiply_add(monkeypatch):
    ticks = iter([0.0, 0.5] * 10)
    monkeypatch.setattr(profiler.time, "perf_counter", lambda: next(ticks))
    assert profiler.measure_matmul_flops(n=64, repeats=3) == pytest.approx(2 * 64**3 / 0.5)


def test_top_operators_self_time_excludes_nested_operators():
    ev = [  # one thread: a(0..100) holds b(10..40) which holds c(20..30); then b again (50..60); another thread
        {"ph": "X", "cat": "cpu_op", "name": "a", "ts": 0, "dur": 100, "pid": 1, "tid": 1},
        {"ph": "X", "cat": "cpu_op", "name": "b", "ts": 10, "dur": 30, "pid": 1, "tid": 1},
        {"ph": "X", "cat": "cpu_op", "name": "c", "ts": 20, "dur": 10, "pid": 1, "tid": 1},
        {"ph": "X", "cat": "cpu_op", "name": "b", "ts": 50, "dur": 10, "pid": 1, "tid": 1},
        {"ph": "X", "cat": "cpu_op", "name": "b", "ts": 5, "dur": 7, "pid": 1, "tid": 2},
        {"ph": "X", "cat": "python_function", "name": "py", "ts": 0, "dur": 500, "pid": 1, "tid": 1},
        {"ph": "i", "cat": "cpu_op", "name": "instant", "ts": 3, "pid": 1, "tid": 1},
    ]
    rows = {r["name"]: r for r in top_operators(ev)}
    assert set(rows) == {"a", "b", "c"}
    assert rows["a"] == {"name": "a", "calls": 1, "total_us": 100.0, "self_us": 60.0}
    assert rows["b"] == {"name": "b", "calls": 3, "total_us": 47.0, "self_us": 37.0}
    assert rows["c"]["self_us"] == 10.0
    assert [r["name"] for r in top_operators(ev)] == ["a", "b", "c"]
    assert [r["name"] for r in top_operators(ev, sort="total")][0] == "a"


def test_trace_window_and_lmlab_profile(tmp_path, one_thread, capsys):
    cfg = make_cfg(tmp_path, "profile.trace_start=3", "profile.trace_steps=2", "profile.trace_warmup=1")
    Trainer(cfg).fit()
    trace = cfg.run_dir / "profile" / "trace_step3.json"
    assert find_trace(cfg.run_dir) == trace
    events = json.loads(trace.read_text())["traceEvents"]
    steps = {e["name"] for e in events if e.get("cat") == "user_annotation" and e["name"].startswith("ProfilerStep")}
    assert steps == {"ProfilerStep#1", "ProfilerStep#2"}  # the two active steps, not the warm-up one
    names = {r["name"] for r in top_operators(events)}
    assert "aten::mm" in names or "aten::addmm" in names
    assert cli_main(["profile", str(cfg.run_dir), "--top", "5"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("CPU operators by self time") and len(out) == 2 + 5
    # resumed past the window: no new trace
    trace.unlink()
    Trainer(make_cfg(tmp_path, "profile.trace_start=3", "train.steps=10")).fit()
    assert not trace.exists()


def test_lmlab_profile_errors(tmp_path, capsys):
    assert cli_main(["profile", str(tmp_path)]) == 1
    assert "no profile/trace_*.json" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert cli_main(["profile", str(bad)]) == 1
    assert "not a Chrome trace" in capsys.readouterr().err
    with pytest.raises(TraceError, match="neither a run folder"):
        find_trace(tmp_path / "missing")
    assert cli_main(["profile", str(bad), "--top", "0"]) == 2


@pytest.mark.parametrize("over, key", [(["profile.trace_start=2", "profile.trace_warmup=2"], "profile.trace_warmup"),
                                       (["profile.trace_steps=0"], "profile.trace_steps")])
def test_profile_config_errors(tmp_path, over, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        make_cfg(tmp_path, *over)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA timers and memory snapshot need a GPU")
def test_cuda_timers_and_memory_snapshot(tmp_path):
    cfg = make_cfg(tmp_path, "train.device=cuda", "profile.trace_start=3", "profile.memory=true")
    Trainer(cfg).fit()
    rows = [r for r in read_metrics(cfg.run_dir / "metrics.jsonl") if "loss" in r]
    assert rows[-1]["time/forward_ms"] > 0 and rows[-1]["mfu"] > 0
    assert (cfg.run_dir / "profile" / "memory_step3.pickle").stat().st_size > 0
