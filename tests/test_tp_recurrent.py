"""Tensor parallel for the recurrent mixers (each mixer's ``tensor_parallel_plan``, merged per layer by
``Transformer.tensor_parallel_plan``): tp=2 over 2 gloo processes on CPU gives the one-process losses, gradients and
updated weights for every mixer and a hybrid stack, with and without sequence parallel; the trainer (CLI) under
tp=2 and under FSDP2 x TP gives the one-process losses; sizes that do not split are refused naming the config key."""

import json
import os
import subprocess
import sys

import pytest
import torch.distributed as dist
from test_distributed import close, losses, train, val_loss

from lmlab.config import ModelConfig
from lmlab.models import build_model
from lmlab.models.recurrent import RECURRENT_MIXERS

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

# (case id, model overrides, sequence_parallel): every mixer alone (minLSTM and Hawk without / with a convolution
# under the default conv_width, minGRU with its model-width convolution), a hybrid stack, and each with sequence
# parallel
STACKS = [("mingru", {"mixer": "mingru"}), ("minlstm_noconv", {"mixer": "minlstm", "conv_width": 0}),
          ("hawk", {"mixer": "hawk"}), ("mamba2", {"mixer": "mamba2"}),
          ("attention+mamba2", {"layer_mixers": ["attention", "mamba2"]})]
CASES = [(f"{name}{'/sp' if sp else ''}", stack, sp) for name, stack in STACKS for sp in (False, True)]

SCRIPT = """
import json, os, sys, warnings
import torch, torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import parallelize_module
from lmlab.config import ModelConfig
from lmlab.models import build_model, materialize

torch.set_num_threads(1)
dist.init_process_group("gloo")
mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("tp",))


def full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


def rel(a, b):  # max |a - b| relative to the largest |b| of the tensor
    return ((full(a) - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


out = {}
for name, stack, sp in json.loads(sys.argv[2]):
    conv = stack.pop("conv_width", None)
    cfg = ModelConfig(vocab_size=48, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64, multiple_of=8,
                      **stack)
    cfg.recurrent.head_dim, cfg.recurrent.state_dim, cfg.recurrent.chunk_size = 8, 4, 8
    if conv is not None:
        cfg.recurrent.conv_width = conv
    ref = materialize(build_model(cfg, device="meta"), "cpu", seed=0)  # one process: the reference
    tp = materialize(build_model(cfg, device="meta"), "cpu", seed=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        parallelize_module(tp, mesh, tp.tensor_parallel_plan(mesh.size(), sequence_parallel=sp))
    unresolved = [str(w.message) for w in caught if "could not be resolved" in str(w.message)]
    assert not unresolved, unresolved  # every key of the plan names a module of this model
    refs, tps = dict(ref.named_parameters()), dict(tp.named_parameters())
    assert refs.keys() == tps.keys()
    g = torch.Generator().manual_seed(1)
    # SGD: an update proportional to the gradient keeps float32 roundings at their size (Adam would magnify them
    # in parameters with tiny gradients); the trainer tests below run AdamW
    opts = [torch.optim.SGD(m.parameters(), lr=0.5, momentum=0.9) for m in (ref, tp)]
    row = {"loss": [], "grad": 0.0, "weight": 0.0,
           "local": {k: list(p.to_local().shape) for k, p in tps.items() if isinstance(p, DTensor)}}
    for step in range(3):
        tokens = torch.randint(0, 48, (4, 25), generator=g)
        doc_ids = torch.cumsum(torch.rand(4, 24, generator=g) < 0.15, dim=1)  # packed rows: documents restart
        losses = []
        for m, opt in zip((ref, tp), opts):
            logits = m(tokens[:, :-1], doc_ids=doc_ids)
            loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
            loss.backward()
            losses.append(loss.item())
        row["loss"].append(losses)
        row["grad"] = max(row["grad"], max(rel(tps[k].grad, p.grad) for k, p in refs.items()))
        for opt in opts:
            opt.step()
            opt.zero_grad()
        row["weight"] = max(row["weight"], max(rel(tps[k].detach(), p.detach()) for k, p in refs.items()))
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, row)  # every process's own view (replicated parameters included)
    out[name] = rows
if dist.get_rank() == 0:
    json.dump(out, open(sys.argv[1], "w"))
dist.barrier()
dist.destroy_process_group()
sys.stdout.flush()
os._exit(0)  # as lmlab's CLI: no interpreter teardown after a process group
"""


@pytest.fixture(scope="module")
def tp_runs(tmp_path_factory):
    """Every case in one torchrun of 2 processes: {case: [rank 0's row, rank 1's row]}."""
    tmp = tmp_path_factory.mktemp("tp_recurrent")
    script = tmp / "tp.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        str(script), str(tmp / "out.json"), json.dumps(CASES)], capture_output=True, text=True,
                       env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-6000:]
    return json.loads((tmp / "out.json").read_text())


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_tp2_equals_one_process(tp_runs, case):
    """Losses of 3 SGD steps, the gradient of every parameter (DTensor shards gathered) at each step and the
    updated weights equal the one-process ones on both processes, to float32 rounding (per tensor, relative to its
    largest element; one process against float64 is ~1e-6 off by that measure); the mixers' parameters are split."""
    for row in tp_runs[case]:
        for tp_loss, ref_loss in row["loss"]:
            assert abs(tp_loss - ref_loss) <= 2e-6 * max(1.0, abs(ref_loss)), row["loss"]
        assert row["grad"] < 2e-5, row
        assert row["weight"] < 1e-5, row
    split = tp_runs[case][0]["local"]
    mixer = case.split("/")[0].split("+")[-1].split("_")[0]
    layer = 1 if "+" in case else 0
    expect = {"mingru": {"w_z.weight": [32, 32], "w_h.weight": [32, 32], "w_out.weight": [32, 32]},
              "minlstm": {"w_f.weight": [32, 32], "w_out.weight": [32, 32]},
              "hawk": {"w_in.weight": [32, 32], "w_a": [4, 8, 8], "a_param": [32], "conv.weight": [32, 4]},
              "mamba2": {"head_proj.weight": [4 * 17, 32], "x_conv.weight": [32, 4], "A_log": [4],
                         "norm.weight": [32], "out_proj.weight": [32, 32]}}[mixer]
    for name, shape in expect.items():
        assert split[f"layers.{layer}.mixer.{name}"] == shape, (name, split)
    assert not any(k.startswith(f"layers.{layer}.mixer.bc_") for k in split)  # B, C stay replicated


@pytest.mark.parametrize("name,model,parallel", [
    ("tp_mamba2_attention", ("model.layer_mixers=[mamba2,attention]",), ()),
    ("tp_sp_lp_hawk_minlstm", ("model.layer_mixers=[hawk,minlstm]",),
     ("parallel.sequence_parallel=true", "parallel.loss_parallel=true")),
])
def test_trainer_tp2_matches_one_process(tmp_path, name, model, parallel):
    """``lmlab train`` under torchrun with parallel.tp=2 (dp_shard=1), through the trainer's own parallelize,
    AdamW, gradient clipping and evaluation: the one-process losses."""
    small = ("model.recurrent.head_dim=8", "model.recurrent.state_dim=4", "model.recurrent.chunk_size=8")
    train(tmp_path, "one", 1, *model, *small)
    train(tmp_path, name, 2, "parallel.tp=2", "parallel.dp_shard=1", *parallel, *model, *small)
    ref, got = losses(tmp_path, "one"), losses(tmp_path, name)
    assert close(got, ref), (got, ref)
    assert abs(val_loss(tmp_path, name) - val_loss(tmp_path, "one")) < 1e-4
    assert ref[-1] < ref[0]


def test_fsdp2_x_tp_with_recurrent_mixers_matches_one_process(tmp_path):
    """4 processes: FSDP2 over dp_shard=2 composed with tp=2 (the mixers' DTensor shards sharded again by FSDP2,
    their replicated B/C weights by FSDP2 alone): the one-process losses."""
    extra = ("model.layer_mixers=[mamba2,hawk]", "model.recurrent.head_dim=8", "model.recurrent.state_dim=4",
             "model.recurrent.chunk_size=8")
    train(tmp_path, "one", 1, *extra)
    train(tmp_path, "fsdp_tp", 4, "parallel.tp=2", *extra)
    ref, got = losses(tmp_path, "one"), losses(tmp_path, "fsdp_tp")
    assert close(got, ref), (got, ref)


def tiny(**kw):
    cfg = ModelConfig(vocab_size=40, dim=32, n_layers=2, n_heads=2, max_seq_len=64, multiple_of=8, **kw)
    cfg.recurrent.head_dim = 8
    return cfg


@pytest.mark.parametrize("mixer,key", [("mingru", "model.recurrent.expand"), ("minlstm", "model.recurrent.expand"),
                                       ("hawk", "model.recurrent.head_dim"), ("mamba2", "model.recurrent.head_dim")])
def test_sizes_that_do_not_split_are_refused(mixer, key):
    model = build_model(tiny(mixer=mixer), seed=0)  # inner 64: 8 heads of 8
    assert any(k.startswith("layers.0.mixer.") for k in model.tensor_parallel_plan(2))
    assert any(k.startswith("layers.0.mixer.") for k in model.tensor_parallel_plan(8, sequence_parallel=True))
    with pytest.raises(ValueError, match=rf"{key}.*parallel\.tp=3"):
        model.tensor_parallel_plan(3)
    if mixer in ("hawk", "mamba2"):  # 64 channels split over 16 processes, but 8 heads do not
        with pytest.raises(ValueError, match=rf"{key}.* = 8, must divide by parallel\.tp=16"):
            model.tensor_parallel_plan(16)
    # a hybrid stack: the attention layers' heads are checked too (2 heads do not split over 4 processes)
    hybrid = build_model(tiny(layer_mixers=[mixer, "attention"]), seed=0)
    with pytest.raises(ValueError, match=r"model\.n_heads=2"):
        hybrid.tensor_parallel_plan(4)


def test_refusal_under_torchrun_names_the_key(tmp_path):
    """Through the trainer: the plan's ValueError becomes a ConfigError naming parallel.tp and the config key;
    nothing is trained."""
    p = train(tmp_path, "bad", 2, "parallel.tp=2", "parallel.dp_shard=1", "model.mixer=mamba2",
              "model.recurrent.head_dim=16", "model.recurrent.expand=1", "model.dim=48", "model.n_heads=4",
              check=False)  # 48 / 16 = 3 heads
    assert p.returncode != 0 and "model.recurrent.head_dim" in p.stderr and "parallel.tp=2" in p.stderr, \
        p.stderr[-3000:]
    assert not (tmp_path / "runs" / "bad" / "checkpoints").exists()


def test_every_mixer_writes_its_plan_beside_itself():
    for name in RECURRENT_MIXERS:
        model = build_model(tiny(mixer=name), seed=0)
        assert hasattr(model.layers[0].mixer, "tensor_parallel_plan"), name
    # per-layer keys: a hybrid stack gets attention keys for its attention layer only, and a block without an MLP
    # (model.recurrent.mlp=false) no MLP keys
    cfg = tiny(layer_mixers=["mamba2", "attention"])
    cfg.recurrent.mlp = False
    plan = build_model(cfg, seed=0).tensor_parallel_plan(2, sequence_parallel=True)
    assert "layers.1.attention.wq" in plan and not any(k.startswith("layers.0.attention") for k in plan)
    assert "layers.0.mixer.head_proj" in plan and "layers.0.mixer_norm" in plan and "layers.1.feed_forward.w1" in plan
    assert not any(k.startswith("layers.0.feed_forward") or k.startswith("layers.0.ffn_norm") for k in plan)
