"""Mamba2 checkpoints and state dicts saved before the projection was laid out by heads still load.

Before, a Mamba2 mixer had one ``in_proj`` over [z, x, B, C, dt] (inner, inner, N, N, H rows) and one convolution
over [x, B, C] (``conv_weight``, ``conv_bias``). :class:`OldMamba2` below is that module with its forward as it was;
a model trained and checkpointed with it must load into today's model (weights and AdamW moments, through
``Mamba2.from_old_layout``) and then compute, and keep training, exactly as the old one does.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmlab.config import ModelConfig
from lmlab.models import build_model
from lmlab.models.layers import RMSNorm
from lmlab.models.mamba2 import Mamba2, ssd_chunked
from lmlab.models.recurrent import causal_conv1d
from lmlab.train.checkpoint import CheckpointError, CheckpointManager

pytestmark = pytest.mark.usefixtures("one_thread")


class OldMamba2(nn.Module):
    """The Mamba2 mixer in the layout before the by-heads one, weights taken from a current ``new`` mixer."""

    def __init__(self, new: Mamba2):
        super().__init__()
        h, p, n, inner = new.n_heads, new.head_dim, new.state_dim, new.inner
        self.h, self.p, self.n, self.inner, self.chunk = h, p, n, inner, new.chunk_size
        self.in_proj = nn.Linear(new.dim, 2 * inner + 2 * n + h, bias=False)
        self.conv_weight = nn.Parameter(torch.empty(inner + 2 * n, new.conv_width))
        self.conv_bias = nn.Parameter(torch.empty(inner + 2 * n))
        self.dt_bias, self.A_log, self.D = (nn.Parameter(t.detach().clone()) for t in (new.dt_bias, new.A_log, new.D))
        self.norm = RMSNorm(inner, new.norm.eps)
        self.out_proj = nn.Linear(inner, new.dim, bias=False)
        with torch.no_grad():
            z, x, dt = new.head_proj.weight.unflatten(0, (h, 2 * p + 1)).split([p, p, 1], dim=1)
            self.in_proj.weight.copy_(torch.cat([z.flatten(0, 1), x.flatten(0, 1), new.bc_proj.weight,
                                                 dt.flatten(0, 1)]))
            self.conv_weight.copy_(torch.cat([new.x_conv.weight, new.bc_conv.weight]))
            self.conv_bias.copy_(torch.cat([new.x_conv.bias, new.bc_conv.bias]))
            self.norm.weight.copy_(new.norm.weight)
            self.out_proj.weight.copy_(new.out_proj.weight)

    def forward(self, x, resets=None, state=None):
        assert state is None
        b, t, _ = x.shape
        z, xbc, dt = self.in_proj(x).split([self.inner, self.inner + 2 * self.n, self.h], dim=-1)
        y, conv_state = causal_conv1d(xbc, self.conv_weight, self.conv_bias, resets)
        xs, B, C = F.silu(y).split([self.inner, self.n, self.n], dim=-1)
        xs = xs.reshape(b, t, self.h, self.p)
        dt = F.softplus(dt + self.dt_bias)
        y, ssm = ssd_chunked(xs, dt, -torch.exp(self.A_log), B, C, self.chunk, None, resets)
        y = y + self.D[:, None] * xs
        return self.out_proj(self.norm(y.reshape(b, t, self.inner) * F.silu(z))), {"ssm": ssm, "conv": conv_state}


def config(state_dim=4):
    cfg = ModelConfig(vocab_size=50, dim=16, n_layers=2, n_heads=2, multiple_of=8, max_seq_len=64, mixer="mamba2")
    cfg.recurrent.head_dim, cfg.recurrent.state_dim, cfg.recurrent.chunk_size = 8, state_dim, 8
    return cfg


def old_model(new):
    old = copy.deepcopy(new)
    for layer in old.layers:
        layer.mixer = OldMamba2(layer.mixer)
    return old


def adamw(model):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                             lr=1e-2)


def train_step(model, opt, tokens):
    opt.zero_grad()
    logits = model(tokens[:, :-1])
    F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
    opt.step()


def test_old_layout_checkpoint_loads_and_trains_on_exactly(tmp_path):
    torch.manual_seed(0)
    new = build_model(config(), seed=1)
    old = old_model(new)
    batches = [torch.randint(0, 50, (4, 24)) for _ in range(4)]
    with torch.no_grad():  # the test's old module is the old layout of the same weights
        torch.testing.assert_close(old(batches[0]), new(batches[0]), rtol=0, atol=1e-6)
    opt_old = adamw(old)
    for b in batches[:3]:
        train_step(old, opt_old, b)
    names = {n for n, _ in old.named_parameters()}
    assert "layers.0.mixer.in_proj.weight" in names and "layers.0.mixer.head_proj.weight" not in names
    path = CheckpointManager(tmp_path).save(3, old, opt_old)

    fresh = build_model(config(), seed=7)  # other weights: everything must come from the checkpoint
    opt = adamw(fresh)
    CheckpointManager(tmp_path).load(path, fresh, opt)
    probe = torch.randint(0, 50, (3, 40))
    with torch.no_grad():
        torch.testing.assert_close(fresh(probe), old(probe), rtol=0, atol=1e-5)
    # one more step on each: equal only if the AdamW moments and step counts were converted with the weights
    train_step(old, opt_old, batches[3])
    train_step(fresh, opt, batches[3])
    with torch.no_grad():
        torch.testing.assert_close(fresh(probe), old(probe), rtol=0, atol=1e-5)

    inference = build_model(config(), seed=9)  # weights only (what `lmlab generate` / `eval` load)
    CheckpointManager(tmp_path).load(path, inference)
    state = opt.state[fresh.layers[1].mixer.head_proj.weight]
    assert int(state["step"]) == 4 and state["exp_avg"].abs().sum() > 0


def test_old_layout_state_dict_loads():
    torch.manual_seed(0)
    new = build_model(config(), seed=1)
    old = old_model(new)
    fresh = build_model(config(), seed=5)
    fresh.load_state_dict(old.state_dict())
    x = torch.randint(0, 50, (2, 30))
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), old(x), rtol=0, atol=1e-6)


def test_old_layout_of_another_shape_is_refused_by_name(tmp_path):
    old = old_model(build_model(config(state_dim=4), seed=1))
    path = CheckpointManager(tmp_path).save(1, old, None)
    other = build_model(config(state_dim=8), seed=1)
    with pytest.raises(CheckpointError,
                       match=r"layers\.0\.mixer: old-layout Mamba2 parameter in_proj\.weight has shape \(76, 16\)"
                             r".*needs 84 rows"):
        CheckpointManager(tmp_path).load(path, other)


FSDP_SCRIPT = """
import os, sys
import torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
sys.path.insert(0, sys.argv[2])
from test_mamba2_old_layout import adamw, config, train_step
from lmlab.models import build_model
from lmlab.train.checkpoint import CheckpointManager

torch.set_num_threads(1)
dist.init_process_group("gloo")
mesh = init_device_mesh("cpu", (dist.get_world_size(),))
data = torch.load(os.path.join(sys.argv[1], "expected.pt"))
model = build_model(config(), seed=7)
for layer in model.layers:
    fully_shard(layer, mesh=mesh)
fully_shard(model, mesh=mesh)
opt = adamw(model)
CheckpointManager(sys.argv[1]).load(data["path"], model, opt)
assert isinstance(model.layers[0].mixer.head_proj.weight, DTensor)
train_step(model, opt, data["batch"])  # the same batch on both processes: the averaged gradient is the batch's
with torch.no_grad():
    err = (model(data["probe"]) - data["logits"]).abs().max().item()
if dist.get_rank() == 0:
    open(os.path.join(sys.argv[1], "err.txt"), "w").write(str(err))
dist.barrier()
dist.destroy_process_group()
sys.stdout.flush()
os._exit(0)
"""


def test_old_layout_checkpoint_loads_under_fsdp2(tmp_path):
    """2 gloo processes, FSDP2-sharded: the converted weights and moments are sharded like the model's own, and one
    more step gives the one-process old model's outputs."""
    import os
    import subprocess
    import sys

    torch.manual_seed(0)
    old = old_model(build_model(config(), seed=1))
    batches = [torch.randint(0, 50, (4, 24)) for _ in range(4)]
    opt = adamw(old)
    for b in batches[:3]:
        train_step(old, opt, b)
    path = CheckpointManager(tmp_path).save(3, old, opt)
    train_step(old, opt, batches[3])
    probe = torch.randint(0, 50, (3, 40))
    with torch.no_grad():
        logits = old(probe)
    torch.save({"path": str(path), "batch": batches[3], "probe": probe, "logits": logits}, tmp_path / "expected.pt")
    script = tmp_path / "fsdp.py"
    script.write_text(FSDP_SCRIPT)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        str(script), str(tmp_path), os.path.dirname(__file__)], capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert p.returncode == 0, p.stderr[-6000:]
    assert float((tmp_path / "err.txt").read_text()) < 1e-5
