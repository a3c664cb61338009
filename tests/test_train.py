"""Trainer: exact resume, atomic checkpoints, signals, non-finite stops, schedules, accumulation, export."""

import json
import logging
import math
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from lmlab.config import ConfigError, OptimConfig, load_config
from lmlab.monitor.metrics import read_metrics
from lmlab.train import Trainer, TrainingError
from lmlab.train import checkpoint as ckpt_mod
from lmlab.train.checkpoint import CheckpointError, CheckpointManager, load_run
from lmlab.train.optim import build_optimizer, lr_factor, param_groups, set_lr

TEXT = ("To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"
        "The slings and arrows of outrageous fortune,\nOr to take arms against a sea of troubles\n") * 40


@pytest.fixture
def corpus(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_text(TEXT)
    return p


def make_cfg(tmp_path, corpus, *overrides, name="r"):
    base = [f"name={name}", f"runs_dir={tmp_path / 'runs'}", f"data.train_files=[{corpus}]",
            "model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.max_seq_len=64",
            "data.seq_len=32", "data.batch_size=4", "optim.warmup_steps=3", "optim.lr=0.01",
            "train.steps=12", "train.log_every=1", "logging.progress=false"]
    return load_config(None, base + list(overrides))


def losses(run_dir):
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


@pytest.mark.parametrize("extra", [[], ["train.grad_accum=2", "data.prefetch=thread"],
                                   ["optim.lr_scale={'layers.*.attention.w[qk].weight': 3}"],
                                   ["optim.name=muon", "optim.muon_lr=0.05"]])
def test_resume_is_bitwise_exact(tmp_path, corpus, extra):
    straight = make_cfg(tmp_path, corpus, *extra, name="straight")
    Trainer(straight).fit()
    split = make_cfg(tmp_path, corpus, *extra, name="split")
    first = Trainer(split).fit(stop_after=5)
    assert first["status"] == "paused after 5 steps" and first["step"] == 5
    second = Trainer(split).fit()
    assert second["resumed"] and second["step"] == 12
    a, b = losses(straight.run_dir), losses(split.run_dir)
    assert [s for s, _ in a] == list(range(1, 13))
    assert a == b  # every step's loss equal to the last bit
    assert a[-1][1] < a[0][1]  # and it actually learned something


def test_resume_continues_the_token_count(tmp_path, corpus):
    """The logged token count goes on across a resume: after step s, s * batch_size * seq_len positions were seen
    (4 * 32 here), in the metrics and in the checkpoint a later resume reads."""
    split = make_cfg(tmp_path, corpus, name="split")
    Trainer(split).fit(stop_after=5)
    assert Trainer(split).fit()["resumed"]
    rows = [r for r in read_metrics(split.run_dir / "metrics.jsonl") if "loss" in r]
    assert [(r["step"], r["tokens"]) for r in rows] == [(s, s * 4 * 32) for s in range(1, 13)]
    latest = CheckpointManager(split.run_dir).latest()
    assert json.loads((latest / "meta.json").read_text())["tokens_seen"] == 12 * 4 * 32


class DrawingTrainer(Trainer):
    """Draws from every global RNG at each step (as dropout or sampled rollouts would)."""

    draws: list = []

    def train_step(self):
        m = super().train_step()
        DrawingTrainer.draws.append((torch.rand(()).item(), random.random(), float(np.random.rand())))
        return m


def test_resume_restores_every_rng(tmp_path, corpus):
    DrawingTrainer.draws = []
    torch.manual_seed(5), random.seed(5), np.random.seed(5)  # the trainer seeds them all: the process's state is moot
    DrawingTrainer(make_cfg(tmp_path, corpus, name="straight")).fit()
    straight, DrawingTrainer.draws = DrawingTrainer.draws, []
    split = make_cfg(tmp_path, corpus, name="split")
    DrawingTrainer(split).fit(stop_after=5)
    torch.manual_seed(999), random.seed(999), np.random.seed(999)  # a new process starts from other states
    DrawingTrainer(split).fit()
    assert len(straight) == 12 and DrawingTrainer.draws == straight


@pytest.mark.parametrize("kind", ["text", "dialog"])
def test_resume_across_an_epoch_boundary_is_exact(tmp_path, corpus, kind):
    extra = ["train.steps=70", "train.log_every=1"]
    if kind == "dialog":
        dialogs = tmp_path / "d.jsonl"
        dialogs.write_text("".join(json.dumps([{"source": "user", "content": f"What is {i} + {i}?"},
                                               {"source": "assistant", "content": f"It is {2 * i}."}]) + "\n"
                                   for i in range(60)))
        extra += ["data.kind=dialog", f"data.train_files=[{dialogs}]", "data.packing=false"]
    Trainer(make_cfg(tmp_path, corpus, *extra, name="straight")).fit()
    split = make_cfg(tmp_path, corpus, *extra, name="split")
    first = Trainer(split)
    first.fit(stop_after=55)
    saved = torch.load(CheckpointManager(split.run_dir).latest() / "rank_0.pt", weights_only=False)["data"]
    assert saved["epoch"] >= 1 and saved["index"] > 0, saved  # the stop is inside a later epoch
    assert Trainer(split).fit()["resumed"]
    assert losses(split.run_dir) == losses(tmp_path / "runs" / "straight")


def test_checkpoint_failure_mid_save_keeps_previous_usable(tmp_path, corpus, monkeypatch):
    cfg = make_cfg(tmp_path, corpus, "train.steps=4")
    tr = Trainer(cfg)
    tr.train_step()
    good = tr.save()
    ref = {k: v.clone() for k, v in tr.model.state_dict().items()}
    tr.train_step()

    real_write = ckpt_mod._write_rank_state

    def failing_write(state, path):
        real_write(state, path)  # the DCP files and this rank's file are written...
        raise OSError("disk full (simulated)")  # ...then the save dies before meta.json and the rename

    monkeypatch.setattr(ckpt_mod, "_write_rank_state", failing_write)
    with pytest.raises(OSError, match="disk full"):
        tr.save()
    monkeypatch.setattr(ckpt_mod, "_write_rank_state", real_write)
    manager = CheckpointManager(cfg.run_dir)
    assert manager.latest() == good
    assert (manager.dir / "step_00000002.tmp").is_dir()  # the half-written folder is left aside, never loaded
    fresh = Trainer(cfg)
    assert fresh.resume() and fresh.step == 1
    assert all(torch.equal(fresh.model.state_dict()[k], ref[k]) for k in ref)
    fresh.train_step()
    fresh.save()
    assert not list(manager.dir.glob("*.tmp"))  # the next save cleaned it up


def test_keep_last_and_corrupt_checkpoint(tmp_path, corpus):
    cfg = make_cfg(tmp_path, corpus, "train.steps=6", "train.ckpt_every=1", "train.keep_last=2")
    Trainer(cfg).fit()
    manager = CheckpointManager(cfg.run_dir)
    assert [p.name for p in manager.complete()] == ["step_00000005", "step_00000006"]
    (manager.latest() / "meta.json").write_text("{not json")
    refuse = make_cfg(tmp_path, corpus, "train.steps=6", "train.ckpt_fallback=false")
    with pytest.raises(CheckpointError, match=r"step_00000006/meta.json: unreadable.*step_00000005 loads"):
        Trainer(refuse).resume()
    trainer = Trainer(cfg)
    assert trainer.resume() and trainer.step == 5  # falls back, and sets the damaged one aside
    assert sorted(p.name for p in manager.dir.iterdir()) == ["step_00000005", "step_00000006.damaged"]
    for f in manager.complete()[0].glob("*.distcp"):
        f.write_bytes(b"garbage")
    model = Trainer(cfg).model
    with pytest.raises(CheckpointError, match=r"step_00000005: damaged: __0_0.distcp has 7 bytes"):
        ckpt_mod.load_checkpoint(manager.complete()[0], model)



def test_a_checkpoint_with_the_old_smear_parameter_names_resumes_exactly(tmp_path, corpus, monkeypatch):
    """Checkpoints saved before smeared keys became a module (KeySmear) name its parameters
    ``layers.N.attention.smear`` and ``layers.N.attention.query_smear``, in the model and the optimizer state alike:
    such a checkpoint still resumes, and the run goes on exactly as a straight one (model and AdamW moments restored
    under the new names ``attention.smear.keys`` / ``.queries``)."""
    smear = ["model.smear_keys=2", "model.smear_queries=true", "model.n_kv_heads=1", "train.steps=8"]
    straight = make_cfg(tmp_path, corpus, *smear, name="straight")
    Trainer(straight).fit()

    def old(name):
        return name.replace("attention.smear.keys", "attention.smear").replace("attention.smear.queries",
                                                                              "attention.query_smear")

    real = ckpt_mod.get_state_dict

    def old_style(model, optimizer):  # the state dicts as DCP got them before the renaming
        model_sd, optim_sd = real(model, optimizer)
        optim_sd["state"] = {old(k): v for k, v in optim_sd["state"].items()}
        for group in optim_sd["param_groups"]:
            group["params"] = [old(k) for k in group["params"]]
        return {old(k): v for k, v in model_sd.items()}, optim_sd

    split = make_cfg(tmp_path, corpus, *smear, name="split")
    monkeypatch.setattr(ckpt_mod, "get_state_dict", old_style)
    Trainer(split).fit(stop_after=4)
    monkeypatch.setattr(ckpt_mod, "get_state_dict", real)
    import torch.distributed.checkpoint as dcp
    saved = dcp.FileSystemReader(str(CheckpointManager(split.run_dir).latest())).read_metadata().state_dict_metadata
    assert {"model.layers.1.attention.smear", "optim.state.layers.1.attention.query_smear.exp_avg"} <= set(saved)
    assert not any("smear.keys" in k or "smear.queries" in k for k in saved)
    resumed = Trainer(split).fit()
    assert resumed["resumed"] and resumed["step"] == 8
    assert losses(split.run_dir) == losses(straight.run_dir)  # every step's loss equal to the last bit
    _, model, _ = load_run(split.run_dir)  # and its newest checkpoint (new names) loads for generation/evals
    assert model.layers[0].attention.smear.queries.abs().sum() > 0

def test_non_finite_loss_stops_naming_the_step(tmp_path, corpus):
    cfg = make_cfg(tmp_path, corpus)
    tr = Trainer(cfg)
    tr.train_step()
    tr.train_step()
    good = tr.save()
    with torch.no_grad():
        tr.model.layers[0].attention.wq.weight[0, 0] = float("nan")
    with pytest.raises(TrainingError, match=rf"non-finite loss at step 3 .*Last good checkpoint: {good}"):
        tr.train_step()
    assert CheckpointManager(cfg.run_dir).latest() == good


def test_grad_accumulation_matches_a_big_batch(tmp_path, corpus):
    big = Trainer(make_cfg(tmp_path, corpus, "data.batch_size=8", name="big"))
    acc = Trainer(make_cfg(tmp_path, corpus, "data.batch_size=4", "train.grad_accum=2", name="acc"))
    for _ in range(3):
        a, b = big.train_step(), acc.train_step()
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-5)
        assert math.isclose(a["grad_norm"], b["grad_norm"], rel_tol=1e-4)
    for (n, p), q in zip(big.model.named_parameters(), acc.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=n)


def test_metrics_rows_and_bits_per_byte(tmp_path, corpus):
    cfg = make_cfg(tmp_path, corpus, "train.steps=4", "train.log_every=2", "train.eval_every=2")
    summary = Trainer(cfg).fit()
    rows = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [2, 4]
    for key in ("lr", "grad_norm", "tokens_per_s", "loss_tokens_per_s", "tokens", "peak_mem_mb"):
        assert all(r[key] > 0 for r in train_rows), key
    val = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in val] == [2, 4]
    # byte tokenizer: one byte per target token, so bits per byte = loss / ln 2
    assert math.isclose(val[-1]["val_bpb"], val[-1]["val_loss"] / math.log(2), rel_tol=1e-9)
    assert summary["val_bpb"] == val[-1]["val_bpb"]
    assert (cfg.run_dir / "config.yaml").is_file()
    assert load_config(cfg.run_dir / "config.yaml") == cfg


def test_lr_schedules():
    cos = OptimConfig(lr=1.0, schedule="cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, cos, 100) == pytest.approx(0.1)
    assert lr_factor(9, cos, 100) == pytest.approx(1.0)
    assert lr_factor(10, cos, 100) == pytest.approx(1.0)
    assert lr_factor(99, cos, 100) == pytest.approx(0.1)
    assert lr_factor(10 + 89 // 2, cos, 100) == pytest.approx(0.55, abs=0.02)
    # hand-derived: 91 steps after a warmup of 10 span 90; a third of the way the cosine is 1/2, two thirds -1/2
    # (a linear decay would give 0.7 and 0.4)
    assert lr_factor(40, cos, 101) == pytest.approx(0.1 + 0.9 * 0.5 * 1.5)  # 0.775
    assert lr_factor(70, cos, 101) == pytest.approx(0.1 + 0.9 * 0.5 * 0.5)  # 0.325
    wsd = OptimConfig(lr=1.0, schedule="wsd", warmup_steps=5, decay_fraction=0.2, min_lr_ratio=0.0)
    assert [lr_factor(s, wsd, 100) for s in (5, 50, 79)] == [1.0, 1.0, 1.0]
    assert lr_factor(80, wsd, 100) == pytest.approx(1 - 1 / 20)
    assert lr_factor(99, wsd, 100) == pytest.approx(0.0)
    const = OptimConfig(lr=1.0, schedule="constant", warmup_steps=0)
    assert lr_factor(0, const, 10) == lr_factor(9, const, 10) == 1.0


def test_weight_decay_skips_norms_biases_and_embeddings(tmp_path, corpus):
    tr = Trainer(make_cfg(tmp_path, corpus, "model.qkv_bias=true", "model.tie_embeddings=true"))
    decay, no_decay = param_groups(tr.model, 0.1)
    names = {id(p): n for n, p in tr.model.named_parameters()}
    assert all(names[id(p)].endswith(("wq.weight", "wk.weight", "wv.weight", "wo.weight", "w1.weight",
                                      "w2.weight", "w3.weight")) for p in decay["params"])
    assert {names[id(p)] for p in no_decay["params"]} >= {"tok_embeddings.weight", "norm.weight",
                                                           "layers.0.attention.wq.bias"}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(tr.model.parameters()))


def test_no_decay_patterns_leave_the_named_matrices_undecayed(tmp_path, corpus):
    """optim.no_decay moves the matrices its glob patterns name to the undecayed group, and only those: an AdamW
    step with zero gradients and a large decay shrinks every other matrix and leaves those as they were. A pattern
    that names no decayed matrix (a typo, or a norm that is never decayed anyway) is a config error."""
    tr = Trainer(make_cfg(tmp_path, corpus, "optim.no_decay=['layers.*.attention.w[qk].weight']"))
    names = {id(p): n for n, p in tr.model.named_parameters()}
    decay, rest = (group["params"] for group in tr.optimizer.param_groups)
    kept = {n for n, p in tr.model.named_parameters() if n.endswith(("attention.wq.weight", "attention.wk.weight"))}
    assert len(kept) == 2 * tr.model.cfg.n_layers
    assert kept <= {names[id(p)] for p in rest} and not kept & {names[id(p)] for p in decay}
    assert {names[id(p)] for p in decay} == {n for n in names.values()
                                             if n.endswith(("wv.weight", "wo.weight", "w1.weight", "w2.weight",
                                                            "w3.weight")) or n == "output.weight"}

    model = tr.model
    opt = build_optimizer(model, OptimConfig(lr=0.5, weight_decay=1.0, no_decay=["layers.0.*"]))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in model.named_parameters():
        undecayed = n.startswith("layers.0.") or p.ndim < 2 or n == "tok_embeddings.weight"
        assert torch.equal(p, before[n]) == undecayed, n

    with pytest.raises(ConfigError, match=r"optim.no_decay: 'layers.\*.attention_norm.weight' names no weight-dec"):
        Trainer(make_cfg(tmp_path, corpus, "optim.no_decay=[layers.*.attention_norm.weight]", name="typo"))


def test_muon_updates_equal_torch_muon_on_the_matrices_and_adamw_on_the_rest(tmp_path, corpus):
    """optim.name=muon: the blocks' 2-D weights (optim.muon_params) take torch.optim.Muon's updates at muon_lr times
    their lr_scale, everything else (embedding, output head, norms) torch.optim.AdamW's at lr, with the weight decay
    of param_groups; both through six steps of random gradients and a state_dict round trip halfway, against the
    reference optimizers run on copies of the same weights. A pattern that names no matrix is a config error."""
    import copy

    tr = Trainer(make_cfg(tmp_path, corpus, "optim.name=muon", "optim.muon_lr=0.05", "optim.weight_decay=0.1",
                          "optim.lr_scale={'layers.1.*': 0.5}"))
    model, cfg = tr.model, tr.cfg.optim
    names = {id(p): n for n, p in model.named_parameters()}
    muon_names = {names[id(p)] for g in tr.optimizer.param_groups if g["muon"] for p in g["params"]}
    assert muon_names == {n for n, p in model.named_parameters() if n.startswith("layers.") and p.ndim == 2}
    ref_model = copy.deepcopy(model)
    ref_params = dict(ref_model.named_parameters())
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    ref_muon, ref_adam = [], []
    for g in tr.optimizer.param_groups:
        params = [ref_params[names[id(p)]] for p in g["params"]]
        scale = 0.5 if names[id(g["params"][0])].startswith("layers.1.") else 1.0
        if g["muon"]:
            ref_muon.append({"params": params, "lr": cfg.muon_lr * scale, "weight_decay": g["weight_decay"]})
        else:
            ref_adam.append({"params": params, "lr": cfg.lr * scale, "weight_decay": g["weight_decay"]})
    muon = torch.optim.Muon(ref_muon, lr=cfg.muon_lr, momentum=cfg.muon_momentum, nesterov=True)
    adam = torch.optim.AdamW(ref_adam, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, foreach=False)
    assert any(g["weight_decay"] > 0 for g in ref_muon) and any(g["weight_decay"] > 0 for g in ref_adam)
    opt = tr.optimizer
    opt.ns_dtype = torch.bfloat16  # torch.optim.Muon's; on CPU MuonAdamW runs it in float32 (checked below)
    gen = torch.Generator().manual_seed(0)
    for step in range(6):
        set_lr(opt, cfg.lr)
        for n, p in model.named_parameters():
            p.grad = torch.randn(p.shape, generator=gen)
            ref_params[n].grad = p.grad.clone()
        opt.step()
        muon.step()
        adam.step()
        if step == 2:  # a resumed optimizer continues exactly
            state = copy.deepcopy(opt.state_dict())
            opt = build_optimizer(model, cfg)
            opt.ns_dtype = torch.bfloat16
            opt.load_state_dict(state)
        for n, p in model.named_parameters():
            torch.testing.assert_close(p, ref_params[n], rtol=1e-6, atol=1e-7, msg=f"{n} at step {step}")
    assert all(not torch.equal(p, initial[n]) for n, p in model.named_parameters())  # every weight moved

    # the float32 iteration (the CPU default) is the bfloat16 one to bfloat16's precision, and both orthogonalise:
    # every singular value of the result within 0.6-1.3, the singular vectors of the input kept
    from lmlab.train.optim import orthogonalize

    for shape in [(64, 64), (176, 64), (64, 176)]:
        g = torch.randn(shape, generator=gen)
        fast, ref = orthogonalize(g, 5, torch.float32), orthogonalize(g, 5, torch.bfloat16).float()
        assert (fast - ref).norm() / ref.norm() < 0.03
        u, _, vh = torch.linalg.svd(g.double(), full_matrices=False)
        sv = torch.linalg.svdvals(fast.double())
        assert 0.6 < sv.min() and sv.max() < 1.3
        polar = u @ vh
        assert (fast.double() * polar).sum() / (fast.double().norm() * polar.norm()) > 0.95
    assert build_optimizer(model, cfg).ns_dtype is None  # float32 on CPU parameters, bfloat16 on CUDA ones

    with pytest.raises(ConfigError, match=r"optim.muon_params: 'blocks.\*' names no 2-D weight"):
        Trainer(make_cfg(tmp_path, corpus, "optim.name=muon", "optim.muon_params=['blocks.*']", name="typo"))
    with pytest.raises(ConfigError, match="muon_lr"):
        make_cfg(tmp_path, corpus, "optim.name=muon", "optim.muon_lr=0", name="zero")


def test_lr_scale_multiplies_the_learning_rate_of_the_parameters_it_names(tmp_path, corpus):
    """optim.lr_scale: the named parameters (first matching pattern) get a multiple of the scheduled learning rate.
    Adam's first step moves each weight by lr * sign(grad): 10x, 0.5x or 1x that, as their pattern says; weight decay
    stays as it was (the embedding and norms undecayed). A pattern that names no parameter is a config error."""
    tr = Trainer(make_cfg(tmp_path, corpus, "optim.lr_scale={'layers.*.attention.wq.weight': 10, 'layers.1.*': 0.5}"))
    model = tr.model
    groups = {(g["weight_decay"] > 0, g["lr_scale"]): len(g["params"]) for g in tr.optimizer.param_groups}
    n_layers = model.cfg.n_layers
    assert groups[(True, 10.0)] == n_layers  # wq of every layer: the first pattern wins over the later ones
    assert groups[(False, 0.5)] >= 2 and groups[(True, 0.5)] >= 5  # layer 1's norms, and its other matrices
    opt = build_optimizer(model, OptimConfig(lr=1e-3, weight_decay=0.0, lr_scale=tr.cfg.optim.lr_scale))
    set_lr(opt, 1e-3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)
    opt.step()
    for n, p in model.named_parameters():
        want = 10.0 if n.endswith("attention.wq.weight") else 0.5 if n.startswith("layers.1.") else 1.0
        step = (before[n] - p.detach()).abs()
        torch.testing.assert_close(step, torch.full_like(step, 1e-3 * want), rtol=1e-3, atol=1e-9, msg=n)
    with pytest.raises(ConfigError, match=r"optim.lr_scale: 'layers.\*.attention.smear.keys' names no trainable"):
        Trainer(make_cfg(tmp_path, corpus, "optim.lr_scale={'layers.*.attention.smear.keys': 10}", name="typo"))
    with pytest.raises(ConfigError, match=r"'layers.1.attention.\*' names no .* that an earlier pattern does not"):
        Trainer(make_cfg(tmp_path, corpus, "optim.lr_scale={'layers.1.*': 2, 'layers.1.attention.*': 3}",
                         name="shadow"))
    with pytest.raises(ConfigError, match="lr_scale"):
        make_cfg(tmp_path, corpus, "optim.lr_scale={'layers.*': 0}", name="zero")


def test_bf16_autocast_on_cpu_trains_like_float32(tmp_path, corpus):
    fp32 = Trainer(make_cfg(tmp_path, corpus, "train.steps=6", name="fp32")).fit()
    bf16 = Trainer(make_cfg(tmp_path, corpus, "train.dtype=bfloat16", "train.steps=6", name="bf16")).fit()
    a, b = losses(tmp_path / "runs" / "fp32"), losses(tmp_path / "runs" / "bf16")
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, 7))
    assert a != b, "autocast ran in bf16, not float32"
    assert all(abs(x - y) < 0.02 * x for (_, x), (_, y) in zip(a, b)), (a, b)
    assert abs(bf16["val_loss"] - fp32["val_loss"]) < 0.02 * fp32["val_loss"]


def test_float32_modules_run_in_float32_under_bf16_autocast_and_train(tmp_path, corpus, caplog):
    """train.float32_modules: the matched modules compute in float32 inside bf16 autocast (each output equals the
    same module run in plain float32 on the same inputs, exactly), the rest in bf16; names, state dict and
    checkpoints are unchanged; the run trains like float32 and resumes; a pattern that matches nothing is refused."""
    import copy

    from lmlab.train.precision import keep_float32

    model = Trainer(make_cfg(tmp_path, corpus, "train.steps=1", name="probe")).model
    plain = copy.deepcopy(model)
    keys = list(model.state_dict())
    assert keep_float32(model, ["layers.*.attention", "output"]) == ["layers.0.attention", "layers.1.attention",
                                                                       "output"]
    assert list(model.state_dict()) == keys and type(model.layers[0].attention).__name__ == "Float32Attention"
    seen: dict[str, tuple] = {}

    def record(name):
        def hook(mod, args, out):
            seen[name] = (tuple(a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args), out.detach())
        return hook

    for name in ("layers.1.attention", "layers.1.attention.wq", "layers.1.feed_forward.w1", "output"):
        model.get_submodule(name).register_forward_hook(record(name))
    x = torch.randint(0, 200, (2, 24))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x)
    assert seen["layers.1.attention.wq"][1].dtype == torch.float32
    assert seen["layers.1.feed_forward.w1"][1].dtype == torch.bfloat16
    for name in ("layers.1.attention", "output"):
        args, out = seen[name]
        assert out.dtype == torch.float32
        ref = plain.get_submodule(name)(*[a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                                          for a in args])
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
    with torch.no_grad():  # outside autocast the module is the plain one
        torch.testing.assert_close(model(x), plain(x), rtol=0, atol=0)

    fp32 = Trainer(make_cfg(tmp_path, corpus, "train.steps=6", name="fp32")).fit()
    mixed = ("train.dtype=bfloat16", "train.float32_modules=[layers.*.attention]")
    full = Trainer(make_cfg(tmp_path, corpus, *mixed, "train.steps=6", name="mixed")).fit()
    assert abs(full["val_loss"] - fp32["val_loss"]) < 0.02 * fp32["val_loss"]
    resumed = make_cfg(tmp_path, corpus, *mixed, "train.steps=6", name="resumed")
    Trainer(resumed).fit(stop_after=3)
    assert Trainer(resumed).fit()["resumed"]
    assert losses(tmp_path / "runs" / "resumed") == losses(tmp_path / "runs" / "mixed")
    with pytest.raises(ConfigError, match=r"train.float32_modules: 'layers.\*.atention' matches no module"):
        Trainer(make_cfg(tmp_path, corpus, "train.float32_modules=[layers.*.atention]", name="typo"))
    # a float32 run has no autocast to step out of: said once, as a warning
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lmlab.train.trainer"):
        Trainer(make_cfg(tmp_path, corpus, "train.float32_modules=[output]", name="noop"))
    said = [r.getMessage() for r in caplog.records if "no effect" in r.getMessage()]
    assert said == ["train.float32_modules has no effect: train.dtype=auto computes in float32 on cpu (set "
                    "train.dtype=bfloat16 for bf16 autocast)"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lmlab.train.trainer"):
        Trainer(make_cfg(tmp_path, corpus, *mixed, name="mixed2"))
    assert not [r for r in caplog.records if "no effect" in r.getMessage()]


def test_export_loads_in_transformers(tmp_path, corpus):
    transformers = pytest.importorskip("transformers")
    cfg = make_cfg(tmp_path, corpus, "train.steps=3", "model.n_kv_heads=1")
    Trainer(cfg).fit()
    out = tmp_path / "hf"
    res = subprocess.run([sys.executable, "-m", "lmlab.cli", "export", str(cfg.run_dir), str(out)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    _, model, tok = load_run(cfg.run_dir)
    x = torch.tensor([tok.encode("To be, or not to be")])
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(CheckpointError, match="no checkpoint for step 99"):
        load_run(cfg.run_dir, step=99)


@pytest.mark.slow
def test_sigterm_saves_and_rerun_resumes_exactly(tmp_path, corpus):
    args = ["model.dim=16", "model.n_layers=1", "train.steps=300", "data.batch_size=2", "data.seq_len=16"]
    ref = make_cfg(tmp_path, corpus, *args, name="ref")
    Trainer(ref).fit()
    cfg = make_cfg(tmp_path, corpus, *args, name="sig")
    yaml_path = tmp_path / "sig.yaml"
    from lmlab.config import save_config
    save_config(cfg, yaml_path)
    cmd = [sys.executable, "-m", "lmlab.train", str(yaml_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = cfg.run_dir / "metrics.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 20):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "interrupted by SIGTERM" in out
    stopped_at = CheckpointManager(cfg.run_dir).latest()
    assert stopped_at is not None and 20 <= ckpt_mod.step_of(stopped_at) < 300
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=600)  # loaded machines took > 120 s
    assert rerun.returncode == 0, rerun.stderr
    assert "resumed=True" in rerun.stdout
    assert losses(cfg.run_dir) == losses(ref.run_dir)


def test_cli_errors_are_one_line(tmp_path, corpus):
    res = subprocess.run([sys.executable, "-m", "lmlab.cli", "train", "/nonexistent.yaml"], capture_output=True,
                         text=True)
    assert res.returncode == 2 and "config file not found" in res.stderr
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(f"runs_dir: {tmp_path}\ndata: {{train_files: [{tmp_path}/missing*.txt]}}\n")
    res = subprocess.run([sys.executable, "-m", "lmlab.cli", "train", str(cfg_path)], capture_output=True, text=True)
    assert res.returncode == 1 and "missing*.txt" in res.stderr and "Traceback" not in res.stderr


def test_generate_cli_streams_the_same_text_as_the_library(tmp_path, corpus):
    from lmlab.inference import Engine, SamplingParams

    cfg = make_cfg(tmp_path, corpus, "train.steps=3")
    Trainer(cfg).fit()
    res = subprocess.run([sys.executable, "-m", "lmlab.cli", "generate", str(cfg.run_dir), "--prompt", "To be",
                          "--max-new-tokens", "12", "--temperature", "0"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    run_cfg, model, tok = load_run(cfg.run_dir)
    engine = Engine.from_config(model, tok, run_cfg.engine)  # as the CLI builds it
    expected = engine.generate_text(["To be"], SamplingParams(max_new_tokens=12, temperature=0.0))[0]
    assert res.stdout == "To be" + expected + "\n"
    prompts = tmp_path / "p.txt"
    prompts.write_text("To be\nOr not\n")
    res = subprocess.run([sys.executable, "-m", "lmlab.cli", "generate", str(cfg.run_dir), "--prompts-file",
                          str(prompts), "--max-new-tokens", "5"], capture_output=True, text=True)
    assert res.returncode == 0 and "=== 0\nTo be" in res.stdout and "=== 1\nOr not" in res.stdout


def test_wandb_offline_and_tensorboard_sinks(tmp_path, corpus, monkeypatch):
    pytest.importorskip("wandb")
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = make_cfg(tmp_path, corpus, "train.steps=4", "train.log_every=2", "logging.wandb=true",
                   "logging.tensorboard=true")
    Trainer(cfg).fit()
    acc = EventAccumulator(str(cfg.run_dir / "tb"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == [2, 4]
    jsonl = [r["loss"] for r in read_metrics(cfg.run_dir / "metrics.jsonl") if "loss" in r]
    assert [e.value for e in acc.Scalars("loss")] == pytest.approx(jsonl)
    assert "val_bpb" in acc.Tags()["scalars"]
    runs = list((cfg.run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path, corpus):
    eager = Trainer(make_cfg(tmp_path, corpus, name="eager"))
    compiled = Trainer(make_cfg(tmp_path, corpus, "train.compile=true", name="compiled"))
    assert compiled.step_model is not compiled.model  # really wrapped by torch.compile
    for _ in range(3):
        a, b = eager.train_step(), compiled.train_step()
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-4), (a, b)
    ev_a, ev_b = eager.evaluate(2), compiled.evaluate(2)
    assert math.isclose(ev_a["val_loss"], ev_b["val_loss"], rel_tol=1e-4)


def test_compile_on_cpu_without_a_cpp_compiler_fails_before_training_with_the_fix(tmp_path, corpus):
    import torch._inductor.config as inductor_config

    # inductor's own patch (pytest's monkeypatch does not restore its config entries)
    with inductor_config.patch({"cpp.cxx": (str(tmp_path / "no-such-c++"),)}):
        with pytest.raises(ConfigError, match=r"C\+\+ compiler.*train.compile=false"):
            Trainer(make_cfg(tmp_path, corpus, "train.compile=true"))
    assert not list(tmp_path.rglob("step_*"))  # nothing trained, no checkpoint
    from torch._inductor.cpp_builder import get_cpp_compiler

    assert get_cpp_compiler()  # the compiler is found again after the test


@pytest.mark.slow
def test_compiled_dialog_training_keeps_sparse_logits_and_matches_the_full_head(tmp_path, corpus):
    """Unpacked dialogs: every batch as wide as its longest dialog and the loss on the answers only. Compiled, the
    output head still runs only at the target positions (the trunk is one graph, traced again once with a dynamic
    width; the head after a graph break), with the losses and weights of the eager full-head reference."""
    dialogs = tmp_path / "d.jsonl"
    dialogs.write_text("".join(json.dumps([{"source": "user", "content": "What is " + "x" * (i % 13) + f" {i}?"},
                                           {"source": "assistant", "content": f"It is {7 * i}."}]) + "\n"
                               for i in range(40)))
    extra = ["data.kind=dialog", f"data.train_files=[{dialogs}]", "data.packing=false", "data.seq_len=48",
             "model.smear_keys=2"]
    ref = Trainer(make_cfg(tmp_path, corpus, *extra, "train.sparse_logits=false", name="full"))
    compiled = Trainer(make_cfg(tmp_path, corpus, *extra, "train.compile=true", name="compiled"))
    step_model, seen = compiled.step_model, []

    def recording(inputs, **kw):  # what the training step hands the compiled model
        seen.append((inputs.shape[1], kw.get("logits_at") is not None))
        return step_model(inputs, **kw)

    compiled.step_model = recording
    for _ in range(6):
        a, b = ref.train_step(), compiled.train_step()
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-4), (a, b)
    assert all(sparse for _, sparse in seen) and len({w for w, _ in seen}) > 1  # sparse head, several widths
    for p, q in zip(ref.model.parameters(), compiled.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_early_stop_on_a_target_and_on_a_plateau_resumes_exactly(tmp_path, corpus):
    common = ["train.steps=40", "train.eval_every=2", "train.eval_batches=1", "train.early_stop.metric=val_loss",
              "train.early_stop.mode=min"]
    # a plateau by construction: no change beats min_delta=10, so the first evaluation sets the best and the
    # next two count as two without improvement -> stop right after the third evaluation, at step 6
    plateau = common + ["train.early_stop.patience=2", "train.early_stop.min_delta=10"]
    straight = Trainer(make_cfg(tmp_path, corpus, *plateau, name="plateau")).fit()
    assert straight["step"] == 6 and straight["status"].startswith("stopped by early stop: val_loss has not")
    assert "val_loss" in straight  # the final evaluation ran
    split = make_cfg(tmp_path, corpus, *plateau, name="split")
    assert Trainer(split).fit(stop_after=3)["step"] == 3  # one evaluation (step 2) before the pause
    resumed = Trainer(split).fit()
    assert resumed["step"] == 6 and resumed["status"] == straight["status"]  # the plateau count was resumed
    assert Trainer(split).fit()["status"] == straight["status"]  # a rerun of the stopped run does nothing
    assert losses(split.run_dir) == losses(tmp_path / "runs" / "plateau")
    # a target: stop at the first evaluation whose loss is at most the target (here, any)
    hit = Trainer(make_cfg(tmp_path, corpus, *common, "train.early_stop.target=100", name="target")).fit()
    assert hit["step"] == 2 and "reached the target 100" in hit["status"]


def test_early_stop_cooldown_decays_the_lr_to_zero_then_stops_and_resumes_exactly(tmp_path, corpus):
    # plateau by construction (min_delta=10) at the third evaluation, step 6; then 8 steps of linear decay
    cool = ["train.steps=40", "train.eval_every=2", "train.eval_batches=1", "train.early_stop.metric=val_loss",
            "train.early_stop.mode=min", "train.early_stop.patience=2", "train.early_stop.min_delta=10",
            "train.early_stop.cooldown=8", "optim.schedule=cosine"]
    straight = Trainer(make_cfg(tmp_path, corpus, *cool, name="cool")).fit()
    assert straight["step"] == 14, straight
    assert "has not improved on" in straight["status"] and "for 2 evaluations at step 6;" in straight["status"]
    assert "decayed to 0 over 8 steps" in straight["status"]
    rows = [r for r in read_metrics(tmp_path / "runs" / "cool" / "metrics.jsonl") if "lr" in r]
    lrs = {r["step"]: r["lr"] for r in rows}
    from lmlab.train.optim import lr_at

    cfg = make_cfg(tmp_path, corpus, *cool, name="cool")
    assert [lrs[s] for s in range(1, 7)] == pytest.approx([lr_at(s - 1, cfg.optim, 40) for s in range(1, 7)])
    # then step 6+k (k = 1..8) runs at lr(6) * (1 - (k-1)/8): from the schedule's value at the plateau down (not
    # from the cosine's later values), the last one 1/8 of it
    at_plateau = lr_at(6, cfg.optim, 40)
    assert at_plateau != pytest.approx(lr_at(10, cfg.optim, 40))
    assert [lrs[6 + k] for k in range(1, 9)] == pytest.approx([at_plateau * (1 - (k - 1) / 8) for k in range(1, 9)])
    split = make_cfg(tmp_path, corpus, *cool, name="split")
    assert Trainer(split).fit(stop_after=9)["step"] == 9  # paused inside the cooldown
    resumed = Trainer(split).fit()
    assert resumed["step"] == 14 and resumed["status"] == straight["status"]
    assert losses(split.run_dir) == losses(tmp_path / "runs" / "cool")
    from lmlab.config import ConfigError

    with pytest.raises(ConfigError, match="train.early_stop.cooldown: starts on a plateau or at the target"):
        load_config(None, ["train.early_stop.metric=val_loss", "train.eval_every=5", "train.early_stop.patience=0",
                           "train.early_stop.cooldown=10"])


def test_early_stop_cooldown_from_a_target_decays_from_where_the_target_was_reached(tmp_path, corpus):
    """A target with a cooldown starts the decay at the first evaluation that reaches it (any val_loss <= 100:
    step 2), runs the cooldown's 8 steps from the schedule's value there, ignores the later evaluations (which
    reach the target again) and stops at step 10, with a status that says what started it; a pause inside the
    cooldown resumes to the same losses."""
    from lmlab.train.optim import lr_at

    hit = ["train.steps=40", "train.eval_every=2", "train.eval_batches=1", "train.early_stop.metric=val_loss",
           "train.early_stop.mode=min", "train.early_stop.target=100", "train.early_stop.cooldown=8",
           "optim.schedule=constant", "optim.warmup_steps=4"]
    straight = Trainer(make_cfg(tmp_path, corpus, *hit, name="hit")).fit()
    assert straight["step"] == 10, straight
    assert straight["status"].startswith("stopped by early stop: val_loss=") and "reached the target 100 at step 2" \
        in straight["status"] and "decayed to 0 over 8 steps" in straight["status"]
    cfg = make_cfg(tmp_path, corpus, *hit, name="hit")
    lrs = {r["step"]: r["lr"] for r in read_metrics(tmp_path / "runs" / "hit" / "metrics.jsonl") if "lr" in r}
    at_hit = lr_at(2, cfg.optim, 40)  # still in the warmup: below the peak
    assert at_hit < cfg.optim.lr
    assert [lrs[2 + k] for k in range(1, 9)] == pytest.approx([at_hit * (1 - (k - 1) / 8) for k in range(1, 9)])
    split = make_cfg(tmp_path, corpus, *hit, name="split_hit")
    assert Trainer(split).fit(stop_after=5)["step"] == 5
    resumed = Trainer(split).fit()
    assert resumed["step"] == 10 and resumed["status"] == straight["status"]
    assert losses(split.run_dir) == losses(tmp_path / "runs" / "hit")


def test_loss_over_target_positions_only_equals_the_full_logits_loss(tmp_path):
    """The trainer's fast path (output head at target positions only) against the full-logits reference."""
    import torch.nn.functional as F

    from lmlab.data.base import IGNORE

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"dialog": [{"source": "user", "content": f"question {i} " * (1 + i % 5)},
                                                   {"source": "assistant", "content": f"answer {i}"}]}) + "\n"
                            for i in range(40)))
    cfg = load_config(None, [f"runs_dir={tmp_path}", "data.kind=dialog", f"data.train_files=[{data}]",
                             "data.val_fraction=0", "data.packing=false", "data.batch_size=8", "model.dim=32",
                             "model.n_layers=2", "model.n_heads=2", "model.max_seq_len=128", "data.seq_len=128"])
    tr = Trainer(cfg)
    batch = tr._to_device(next(iter(tr.train_loader)))
    keep = batch["targets"] != IGNORE
    assert 0 < int(keep.sum()) < keep.numel() // 2  # answers only: most positions are no target
    fast = tr._loss_sum(tr.model, batch)
    g_fast = torch.autograd.grad(fast, list(tr.model.parameters()))
    tr.cfg.train.sparse_logits = False  # the reference path of the trainer itself
    assert torch.allclose(tr._loss_sum(tr.model, batch), fast, rtol=1e-5)
    logits = tr.model(batch["inputs"])
    ref = F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(), ignore_index=IGNORE, reduction="sum")
    g_ref = torch.autograd.grad(ref, list(tr.model.parameters()))
    assert torch.allclose(fast, ref, rtol=1e-5)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(g_fast, g_ref))
    assert torch.equal(tr.model(batch["inputs"], logits_at=keep), logits[keep])
    with pytest.raises(ValueError, match="logits_at must be a bool mask"):
        tr.model(batch["inputs"], logits_at=keep.long())


def test_early_stop_config_is_checked():
    from lmlab.config import ConfigError

    with pytest.raises(ConfigError, match="train.early_stop.metric: val_loss is logged only by periodic validation"):
        load_config(None, ["train.early_stop.metric=val_loss", "train.early_stop.patience=3"])
    with pytest.raises(ConfigError, match="set a target or a patience"):
        load_config(None, ["train.early_stop.metric=val_loss", "train.eval_every=5"])
    with pytest.raises(ConfigError, match="evals.recall.every"):
        load_config(None, ["train.early_stop.metric=recall/train/correct", "train.early_stop.target=0.95"])


class CountingRecall(Trainer):
    """A stand-in recall evaluation (its value grows with the step) that records when it runs."""

    calls: list = []

    def evaluate_recall(self):
        CountingRecall.calls.append(self.step)
        return {"recall/train/correct": round(0.2 * self.step, 6)}


def test_an_early_stop_on_recall_does_not_evaluate_its_step_twice(tmp_path, corpus):
    common = ["evals.recall.sets=[unused.jsonl]", "evals.recall.every=2", "data.val_fraction=0",
              "evals.recall.max_new_tokens=16"]
    CountingRecall.calls = []
    s = CountingRecall(make_cfg(tmp_path, corpus, *common, "train.early_stop.metric=recall/train/correct",
                                "train.early_stop.target=0.75", name="stop")).fit()
    assert s["step"] == 4 and "reached the target" in s["status"]
    assert CountingRecall.calls == [2, 4]  # the stop step's recall is the final one
    assert s["recall/train/correct"] == 0.8
    rows = [r for r in read_metrics(tmp_path / "runs" / "stop" / "metrics.jsonl") if "recall/train/correct" in r]
    assert [(r["step"], r["recall/train/correct"]) for r in rows] == [(2, 0.4), (4, 0.8)]
    CountingRecall.calls = []  # a run that completes is still evaluated at its end
    done = CountingRecall(make_cfg(tmp_path, corpus, *common, "train.steps=5", name="full")).fit()
    assert done["status"] == "completed" and CountingRecall.calls == [2, 4, 5] and done["recall/train/correct"] == 1.0


def test_restart_starts_over_with_shifted_seeds_and_resumes_inside_an_attempt_exactly(tmp_path, corpus):
    """train.restart: the evaluation at at_step sends the run back (here always: val_loss > 0), attempt k trains
    exactly as a fresh run with seed + k * 1000 would (init, data order, RNG), the abandoned attempts' files move to
    attempts/K/, the last attempt trains to the end, and a run paused inside an attempt resumes it exactly."""
    from lmlab.launch.local import read_attempt
    from lmlab.train import train_run

    common = ["train.eval_every=2", "train.eval_batches=1"]
    restart = ["train.restart.metric=val_loss", "train.restart.at_step=4", "train.restart.above=0",
               "train.restart.max_restarts=2"]
    straight = train_run(make_cfg(tmp_path, corpus, *common, *restart, name="straight"))
    run = tmp_path / "runs" / "straight"
    assert straight["status"] == "completed" and straight["step"] == 12, straight
    assert straight["restarts"] == 2 and straight["seed_offset"] == 2000
    for k in (0, 1):
        gone = run / "attempts" / str(k)
        summary = json.loads((gone / "summary.json").read_text())
        assert summary["status"].startswith("restart: val_loss=") and summary["status"].endswith("> 0 at step 4")
        assert summary["step"] == 4 and (gone / "checkpoints").is_dir() and (gone / "metrics.jsonl").is_file()
    assert sorted(p.name for p in (run / "attempts").iterdir()) == ["0", "1"]
    assert read_attempt(run)["attempt"] == 2 and [h["step"] for h in read_attempt(run)["history"]] == [4, 4]
    # each attempt is the run a fresh seed gives: attempt 0 the config's seed, the last one seed + 2000
    first = Trainer(make_cfg(tmp_path, corpus, *common, "train.steps=4", name="seed0")).fit()
    assert first["step"] == 4
    assert losses(run / "attempts" / "0") == losses(tmp_path / "runs" / "seed0")
    Trainer(make_cfg(tmp_path, corpus, *common, "seed=2000", name="seed2000")).fit()
    assert losses(run) == losses(tmp_path / "runs" / "seed2000")
    assert losses(run / "attempts" / "1")[:4] != losses(run / "attempts" / "0")[:4]
    # paused inside attempt 1, then resumed by train_run: the same attempts, the same final run
    split_cfg = make_cfg(tmp_path, corpus, *common, *restart, name="split")
    t = Trainer(split_cfg)
    sent_back = t.fit()
    assert sent_back["status"].startswith("restart: ") and sent_back["step"] == 4
    t.abandon_attempt(sent_back["status"].removeprefix("restart: "))
    assert Trainer(split_cfg).fit(stop_after=3)["step"] == 3
    resumed = train_run(split_cfg)
    assert resumed["status"] == "completed" and resumed["restarts"] == 2
    split = tmp_path / "runs" / "split"
    assert losses(split) == losses(run)
    assert losses(split / "attempts" / "1") == losses(run / "attempts" / "1")
    assert train_run(split_cfg)["restarts"] == 2  # a finished run: nothing to do, nothing moves
    # the process ends between the verdict and setting the attempt aside: the next one acts on the logged verdict
    late_cfg = make_cfg(tmp_path, corpus, *common, *restart, name="late")
    assert Trainer(late_cfg).fit()["status"].startswith("restart: ")
    assert train_run(late_cfg)["restarts"] == 2
    assert losses(tmp_path / "runs" / "late") == losses(run)
    assert losses(tmp_path / "runs" / "late" / "attempts" / "0") == losses(run / "attempts" / "0")
    assert sorted(p.name for p in (split / "attempts").iterdir()) == ["0", "1"]
    # a damaged attempt record is refused (it names the seeds of the checkpoints beside it)
    (split / "attempt.json").write_text("{not json")
    with pytest.raises(ConfigError, match="attempt.json: not a readable attempt record"):
        Trainer(split_cfg)


def test_restart_config_errors(tmp_path, corpus):
    with pytest.raises(ConfigError, match="train.restart.at_step: 3 is not a step of a periodic evaluation"):
        make_cfg(tmp_path, corpus, "train.eval_every=2", "train.restart.metric=val_loss", "train.restart.at_step=3",
                 "train.restart.above=1")
    with pytest.raises(ConfigError, match="train.restart.below: set exactly one of below and above"):
        make_cfg(tmp_path, corpus, "train.eval_every=2", "train.restart.metric=val_loss", "train.restart.at_step=2")
    with pytest.raises(ConfigError, match="is not before train.steps=12"):
        make_cfg(tmp_path, corpus, "train.eval_every=2", "train.restart.metric=val_loss", "train.restart.at_step=12",
                 "train.restart.above=1")
