"""Parallel training with real processes (torchrun, gloo, CPU): DDP, FSDP2, tensor parallel, FSDP2 + TP,
activation checkpointing and compile give the single-process losses on the same global batch, and a checkpoint
saved by 2 processes resumes in 1 (and the reverse) to the same losses."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from lmlab.config import ConfigError, ParallelConfig, load_config
from lmlab.monitor.metrics import read_metrics
from lmlab.train.distributed import parallel_sizes

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

TEXT = ("To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"
        "The slings and arrows of outrageous fortune,\nOr to take arms against a sea of troubles\n") * 40
STEPS = 6


def base(tmp_path: Path, name: str, *extra: str) -> list[str]:
    corpus = tmp_path / "corpus.txt"
    if not corpus.exists():
        corpus.write_text(TEXT)
    return [f"name={name}", f"runs_dir={tmp_path / 'runs'}", f"data.train_files=[{corpus}]", "data.val_fraction=0.1",
            "model.dim=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.max_seq_len=64",
            "data.seq_len=32", "data.batch_size=8", "optim.warmup_steps=2", "optim.lr=0.01", f"train.steps={STEPS}",
            "train.log_every=1", "train.threads=1", "logging.progress=false", *extra]


def train(tmp_path: Path, name: str, nproc: int, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    """``lmlab train`` with the overrides, under torchrun with ``nproc`` processes (or plainly with 1)."""
    config = tmp_path / "base.yaml"
    if not config.exists():
        config.write_text("name: base\n")
    args = [str(config), *base(tmp_path, name, *extra)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "lmlab.cli", "train", *args]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--standalone",
               "-m", "lmlab.cli", "train", *args]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd[:8])} ... exited {p.returncode}:\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}")
    return p


def losses(tmp_path: Path, name: str) -> list[float]:
    rows = read_metrics(tmp_path / "runs" / name / "metrics.jsonl")
    return [r["loss"] for r in rows if "loss" in r]


def val_loss(tmp_path: Path, name: str) -> float:
    return json.loads((tmp_path / "runs" / name / "summary.json").read_text())["val_loss"]


def close(a: list[float], b: list[float], tol: float = 2e-5) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= tol * max(1.0, abs(y)) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    train(tmp, "single", 1)
    return tmp, losses(tmp, "single"), val_loss(tmp, "single")


@pytest.mark.parametrize("name,nproc,extra", [
    ("fsdp", 2, []),
    ("ddp", 2, ["parallel.dp_replicate=2", "parallel.dp_shard=1"]),
    ("tp", 2, ["parallel.tp=2", "parallel.dp_shard=1"]),
    ("tp_sequence_parallel", 2, ["parallel.tp=2", "parallel.dp_shard=1", "parallel.sequence_parallel=true"]),
    ("tp_loss_parallel", 2, ["parallel.tp=2", "parallel.dp_shard=1", "parallel.loss_parallel=true"]),
    ("fsdp_ac_compile", 2, ["parallel.activation_checkpoint=full", "train.compile=true"]),
    ("fsdp_selective_ac_accum", 2, ["parallel.activation_checkpoint=selective", "train.grad_accum=2",
                                    "data.batch_size=4"]),
])
def test_parallel_training_matches_one_process(single, name, nproc, extra):
    tmp, ref, ref_val = single
    train(tmp, name, nproc, *extra)
    got = losses(tmp, name)
    if "train.grad_accum=2" in extra:  # 2 micro-batches of 4 = the same global batch of 8
        assert close(got, ref, 1e-4), (got, ref)
    else:
        assert close(got, ref), (got, ref)
    assert abs(val_loss(tmp, name) - ref_val) < 1e-4
    assert ref[-1] < ref[0]


@pytest.mark.parametrize("mixers", ["[mingru,attention]", "[mamba2,hawk]"])
def test_fsdp2_with_recurrent_mixers_matches_one_process(tmp_path, mixers):
    """FSDP2 shards recurrent blocks like attention blocks (each block, then the root): the same losses."""
    extra = (f"model.layer_mixers={mixers}", "model.recurrent.head_dim=8", "model.recurrent.state_dim=4",
             "model.recurrent.chunk_size=8")
    train(tmp_path, "one", 1, *extra)
    train(tmp_path, "fsdp", 2, *extra)
    ref, got = losses(tmp_path, "one"), losses(tmp_path, "fsdp")
    assert close(got, ref), (got, ref)
    assert abs(val_loss(tmp_path, "fsdp") - val_loss(tmp_path, "one")) < 1e-4
    assert ref[-1] < ref[0]


@pytest.mark.parametrize("name,extra", [("hsdp_tp", ("parallel.dp_replicate=2", "parallel.tp=2")),
                                        ("hsdp", ("parallel.dp_replicate=2",))])
def test_four_processes_match_one_process(single, name, extra):
    """HSDP (2 replicas x 2 shards) and HSDP + tensor parallel (2 replicas x 2 tensor-parallel ranks)."""
    tmp, ref, _ = single
    train(tmp, name, 4, *extra)
    assert close(losses(tmp, name), ref), (losses(tmp, name), ref)


TP2 = ("parallel.tp=2", "parallel.dp_shard=1")


@pytest.mark.parametrize("name,first,second", [("fsdp2_to_1", (2, ()), (1, ())), ("1_to_fsdp2", (1, ()), (2, ())),
                                               ("fsdp2_to_tp2", (2, ()), (2, TP2))])
def test_checkpoint_reshards_across_world_sizes(single, name, first, second):
    """Saved by one mesh, resumed by another: model and optimizer resharded by DCP, the data position carried
    over (the global batch is the same), every loss as in the one-process run."""
    tmp, ref, _ = single
    train(tmp, name, first[0], *first[1], f"train.steps={STEPS // 2}", "train.ckpt_every=1")
    train(tmp, name, second[0], *second[1])
    assert close(losses(tmp, name), ref), (losses(tmp, name), ref)


def test_a_changed_global_batch_is_refused_on_resume(single):
    tmp, _, _ = single
    train(tmp, "batch", 2, f"train.steps={STEPS // 2}")
    p = train(tmp, "batch", 1, "data.batch_size=4", check=False)
    assert p.returncode == 1 and "the global batch was 4 x 2 ranks = 8 rows and is now 4 x 1 = 4" in p.stderr, \
        p.stderr[-2000:]


def test_world_size_must_match_the_mesh(tmp_path):
    with pytest.raises(ConfigError, match=r"dp_replicate=1 x dp_shard=3 x tp=1 = 3, but the world size is 2"):
        parallel_sizes(ParallelConfig(dp_shard=3), 2)
    with pytest.raises(ConfigError, match="does not divide the world size 3"):
        parallel_sizes(ParallelConfig(tp=2), 3)
    assert parallel_sizes(ParallelConfig(tp=2), 4).dp_shard == 2
    with pytest.raises(ConfigError, match="sequence_parallel"):
        load_config(None, ["parallel.sequence_parallel=true"])
    # under torchrun: the error is one line naming the sizes, exit status 2, nothing trained
    p = train(tmp_path, "bad", 2, "parallel.tp=3", check=False)
    assert p.returncode != 0 and "parallel: dp_replicate=1 x tp=3 = 3 does not divide the world size 2" in p.stderr
    assert not (tmp_path / "runs" / "bad" / "checkpoints").exists()


def test_lora_under_tensor_parallel_is_refused(tmp_path):
    p = train(tmp_path, "lora_tp", 2, "parallel.tp=2", "parallel.dp_shard=1", "model.lora.rank=2", check=False)
    assert p.returncode != 0 and "parallel.tp=2: model.lora: LoRA adapters have no tensor-parallel plan" in p.stderr
    assert not (tmp_path / "runs" / "lora_tp" / "checkpoints").exists()


def test_recall_evaluation_is_split_across_processes_and_equals_one_process(tmp_path):
    """A run under FSDP2 evaluates recall with the SQL tool live, each process answering its share of the
    questions on a full replica; the gathered verdicts equal one process evaluating the same checkpoint."""
    from memory.build_data import build_dataset

    d = tmp_path / "d"
    build_dataset(d, people=6, ood=0, seed=0, paraphrases=1)
    recall = [f"evals.recall.sets=[{d / 'eval_train.jsonl'}]", f"evals.recall.db={d / 'people.sqlite'}",
              "evals.recall.max_new_tokens=40", "evals.recall.every=10"]
    train(tmp_path, "tool", 2, "data.kind=dialog", f"data.train_files=[{d / 'tool_train.jsonl'}]",
          "data.val_fraction=0", "model.max_seq_len=256", "data.seq_len=256", "train.steps=20", "optim.lr=0.02",
          *recall)
    run = tmp_path / "runs" / "tool"
    got = [json.loads(x) for x in (run / "recall" / "train_step20.jsonl").read_text().splitlines()]
    assert len(got) == 30 and len({r["person"] for r in got}) == 6  # every question once, in question order
    assert [r["attribute"] for r in got][:5] != [None] * 5
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "lmlab.cli", "eval", str(run)], capture_output=True, text=True,
                       env=env, timeout=300)  # the run's sets and tool, its final checkpoint
    assert p.returncode == 0, p.stderr[-3000:]
    one = [json.loads(x) for x in (run / "recall" / "eval" / "train_step20.jsonl").read_text().splitlines()]
    assert [r["answer"] for r in got] == [r["answer"] for r in one]
    assert got == one


TP_GENERATE = """
import json, sys
import torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor.parallel import parallelize_module
from lmlab.config import EngineConfig, InitConfig, ModelConfig
from lmlab.inference import Engine, Request, SamplingParams
from lmlab.models import build_model, materialize, resolve_vocab
from lmlab.tokenizers import ByteTokenizer

world = int(__import__("os").environ.get("WORLD_SIZE", "1"))
tok = ByteTokenizer()
cfg = resolve_vocab(ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128,
                                init=InitConfig(scheme="width")), tok.vocab_size)
model = materialize(build_model(cfg, device="meta"), "cpu", seed=0)
if world > 1:
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    parallelize_module(model, mesh, model.tensor_parallel_plan(world))
engine = Engine.from_config(model, tok, EngineConfig(max_batch=4, page_size=8))
prompts = ["To be", "or not to be, that is", "Whether 'tis nobler in the mind", "a", "The slings and arrows", "Or"]
reqs = [Request(prompt=tok.encode(p), params=SamplingParams(max_new_tokens=24, temperature=0.0 if i % 2 else 0.8,
                seed=i), id=i) for i, p in enumerate(prompts)]
out = [r.tokens for r in engine.generate(reqs)]
heads = engine.pool.k.shape
if world == 1 or dist.get_rank() == 0:
    json.dump({"tokens": out, "pool_shape": list(heads)}, open(sys.argv[1], "w"))
if world > 1:
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    __import__("os")._exit(0)  # as lmlab's CLI: no interpreter teardown after a process group (it can abort)
"""


def test_tensor_parallel_generation_shards_the_kv_cache_by_heads_and_equals_one_process(tmp_path):
    script = tmp_path / "gen.py"
    script.write_text(TP_GENERATE)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    outs = {}
    for n in (1, 2):
        cmd = [sys.executable, str(script), str(tmp_path / f"out{n}.json")]
        if n > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n), *cmd[1:]]
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert p.returncode == 0, p.stderr[-4000:]
        outs[n] = json.loads((tmp_path / f"out{n}.json").read_text())
    assert outs[2]["tokens"] == outs[1]["tokens"]
    assert all(len(t) == 24 for t in outs[1]["tokens"])
    one, two = outs[1]["pool_shape"], outs[2]["pool_shape"]
    differ = [i for i, (a, b) in enumerate(zip(one, two)) if a != b]  # the heads dimension only, halved
    assert len(differ) == 1 and one[differ[0]] == 2 * two[differ[0]] == 2, (one, two)


def test_export_consolidates_a_distributed_checkpoint(single, tmp_path):
    """``lmlab export`` of a run trained by 2 FSDP2 processes writes whole tensors (DCP reshards the shards into one
    process), equal to the one-process run's export up to the runs' float differences."""
    from safetensors.torch import load_file

    tmp, _, _ = single
    if not (tmp / "runs" / "fsdp" / "summary.json").exists():
        train(tmp, "fsdp", 2)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("fsdp", "single"):
        p = subprocess.run([sys.executable, "-m", "lmlab.cli", "export", str(tmp / "runs" / name),
                            str(tmp_path / name)], capture_output=True, text=True, env=env, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
    a, b = load_file(tmp_path / "fsdp" / "model.safetensors"), load_file(tmp_path / "single" / "model.safetensors")
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4


def test_sigterm_under_torchrun_saves_and_the_rerun_resumes_exactly(single, tmp_path):
    """torchrun forwards SIGTERM to every process: all stop at the same step, save one checkpoint, and the rerun
    continues to the losses of an uninterrupted run of the same mesh (to float32 rounding: a 2-process FSDP2 run
    and a one-process run drift apart by ~1e-5 over 150 steps, so the reference is a 2-process run too)."""
    import signal
    import time

    steps = 150
    straight = tmp_path / "straight"
    straight.mkdir()
    train(straight, "r", 2, f"train.steps={steps}")
    config = tmp_path / "base.yaml"
    config.write_text("name: base\n")
    args = [str(config), *base(tmp_path, "r", f"train.steps={steps}")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "-m", "lmlab.cli", "train", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    metrics = tmp_path / "runs" / "r" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 5):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    try:
        out, err = proc.communicate(timeout=20)  # torchrun kills its workers 30 s after its SIGTERM
    except subprocess.TimeoutExpired:  # a hang (seen once under load): every thread's stack, through faulthandler
        workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        for pid in workers:
            os.kill(int(pid), signal.SIGABRT)
        out, err = proc.communicate(timeout=120)
    assert (tmp_path / "runs" / "r" / "summary.json").exists(), f"{proc.returncode}\n{out[-2000:]}\n{err[-5000:]}"
    summary = json.loads((tmp_path / "runs" / "r" / "summary.json").read_text())
    assert summary["status"] == "interrupted by SIGTERM" and 5 <= summary["step"] < steps, summary
    assert summary["checkpoint"].endswith(f"step_{summary['step']:08d}")
    train(tmp_path, "r", 2, f"train.steps={steps}")
    assert close(losses(tmp_path, "r"), losses(straight, "r")), (summary, losses(tmp_path, "r"), losses(straight, "r"))


LATE_SIGNAL = """
import json, os, signal, sys
from lmlab.config import load_config
from lmlab.train import train_run
from lmlab.train.distributed import Parallel

agreements = []
real = Parallel.any_rank

def any_rank_then_a_late_signal(self, flags):
    out = real(self, flags)
    agreements.append(out)
    if int(os.environ["RANK"]) == 1 and len(agreements) == 4:  # the agreement after step 3 has just been reached
        os.kill(os.getpid(), signal.SIGTERM)  # the handler runs before this function returns
    return out

Parallel.any_rank = any_rank_then_a_late_signal
summary = train_run(load_config(sys.argv[1], sys.argv[2:]))
print("SUMMARY", json.dumps({"rank": int(os.environ["RANK"]), "status": summary["status"], "step": summary["step"]}))
"""


def test_a_signal_landing_just_after_the_agreement_stops_every_process_at_the_next_step(tmp_path):
    """The stop decision is the all-reduced one: a SIGTERM that reaches one process between the agreement after a
    step and the loop's check must not stop that process alone (it would save while the others train the next
    step: a hang in mismatched collectives, seen in CI). Both stop together one step later, saved and resumable."""
    import signal

    script = tmp_path / "late_signal.py"
    script.write_text(LATE_SIGNAL)
    config = tmp_path / "base.yaml"
    config.write_text("name: base\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
           str(config), *base(tmp_path, "r", "train.steps=20")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)  # a hang is killed with its workers, not left behind
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"the processes hung after a late signal:\n{err[-4000:]}") from None
    summaries = sorted((json.loads(line.split(" ", 1)[1]) for line in out.splitlines()
                        if line.startswith("SUMMARY ")), key=lambda s: s["rank"])
    assert [s["rank"] for s in summaries] == [0, 1], f"{proc.returncode}\n{out[-2000:]}\n{err[-4000:]}"
    assert all(s == {"rank": s["rank"], "status": "interrupted by SIGTERM", "step": 4} for s in summaries), summaries
    saved = json.loads((tmp_path / "runs" / "r" / "summary.json").read_text())
    assert saved["status"] == "interrupted by SIGTERM" and saved["checkpoint"].endswith("step_00000004"), saved
    train(tmp_path, "r", 2, "train.steps=20")  # and the rerun finishes from there
    assert json.loads((tmp_path / "runs" / "r" / "summary.json").read_text())["status"] == "completed"


def test_generate_under_torchrun_splits_the_prompts_and_prints_one_process_text(single):
    tmp, _, _ = single
    args = ["generate", str(tmp / "runs" / "single"), "--prompt", "To be", "--prompt", "Whether", "--prompt", "The",
            "--max-new-tokens", "16", "--temperature", "0.8", "--seed", "3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "lmlab.cli", *args], capture_output=True, text=True, env=env,
                         timeout=300)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "lmlab.cli", *args], capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-3000:]
    assert one.stdout.count("=== ") == 3 and two.stdout == one.stdout


def test_float32_modules_under_fsdp2_match_one_process_and_refuse_bf16_parameters(tmp_path):
    """``train.float32_modules`` under FSDP2 (2 gloo processes, float32 parameters, bf16 autocast) gives the losses of
    one process with the same settings (the swapped attention modules shard like any other); with FSDP2 casting the
    parameters to bf16 (``parallel.param_dtype=bfloat16``) the run stops before training with a ConfigError naming
    both settings."""
    mixed = ["train.dtype=bfloat16", "train.float32_modules=[layers.*.attention]"]
    train(tmp_path, "one", 1, *mixed)
    train(tmp_path, "fsdp", 2, *mixed, "parallel.param_dtype=float32")
    one, fsdp = losses(tmp_path, "one"), losses(tmp_path, "fsdp")
    assert close(fsdp, one, 2e-2), (fsdp, one)  # bf16 matmuls over half batches: not bitwise
    assert one[-1] < one[0]
    p = train(tmp_path, "fsdp_bf16", 2, *mixed, "parallel.param_dtype=bfloat16", check=False)
    assert p.returncode != 0
    assert "train.float32_modules needs float32 parameters" in p.stderr and "parallel.param_dtype" in p.stderr, \
        p.stderr[-3000:]
    assert not (tmp_path / "runs" / "fsdp_bf16" / "metrics.jsonl").exists() or not losses(tmp_path, "fsdp_bf16")


def test_restart_under_fsdp2_starts_over_in_every_process_like_one_process_with_the_next_seed(tmp_path):
    """train.restart under torchrun: every process sees the deciding evaluation, rank 0 moves the attempt aside, all
    start over with the shifted seed; the result is the one-process run trained with that seed."""
    restart = ["train.eval_every=2", "train.eval_batches=1", "train.restart.metric=val_loss", "train.restart.at_step=2",
               "train.restart.above=0", "train.restart.max_restarts=1"]
    train(tmp_path, "fsdp_restart", 2, *restart)
    run = tmp_path / "runs" / "fsdp_restart"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["restarts"] == 1 and summary["seed_offset"] == 1000
    gone = json.loads((run / "attempts" / "0" / "summary.json").read_text())
    assert gone["status"].startswith("restart: val_loss=") and gone["step"] == 2
    train(tmp_path, "single_seed1000", 1, "seed=1000", "train.eval_every=2", "train.eval_batches=1")
    assert close(losses(tmp_path, "fsdp_restart"), losses(tmp_path, "single_seed1000"))
