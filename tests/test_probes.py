"""Probes: nothing when off, no hook on unrecorded steps, bitwise-neutral when on, statistics equal to direct
computations, attention entropy of the distribution the model uses, tensor files, resume, config errors."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_smear
from safetensors.torch import load_file

from lmlab.config import ConfigError, InitConfig, ModelConfig, ProbesConfig
from lmlab.models import build_model
from lmlab.models.layers import document_causal_mask
from lmlab.monitor import probes as probes_mod
from lmlab.monitor.probes import attention_probs, build_probes, read_probes

V = 61


def tiny(**kw) -> torch.nn.Module:
    base = dict(vocab_size=V, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48, max_seq_len=64,
                init=InitConfig(scheme="normal", std=0.1))
    base.update(kw)
    model = build_model(ModelConfig(**base), seed=3)
    randomize_smear(model)
    return model


def batches(n: int, b: int = 3, t: int = 16, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Packed rows: each row holds a few documents (block-diagonal causal mask)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        tokens = torch.randint(0, V, (b, t + 1), generator=g)
        cuts = torch.rand(b, t, generator=g) < 0.2
        out.append({"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "doc_ids": cuts.long().cumsum(1)})
    return out


def run(model, probes, steps: int = 3, accum: int = 2, grad_clip: float = 1.0, autocast: bool = False):
    """The trainer's step: begin, each micro-batch's forward and backward, after_backward, clip, AdamW, end.
    Returns the losses and, per step, the gradients and the weights after the step."""
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    data = batches(steps * accum)
    losses, grads, weights = [], [], []
    for step in range(1, steps + 1):
        micro = data[(step - 1) * accum: step * accum]
        n = sum(m["targets"].numel() for m in micro)
        if probes is not None:
            probes.begin(step)
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for m in micro:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                logits = model(m["inputs"], doc_ids=m["doc_ids"])
            loss = F.cross_entropy(logits.float().flatten(0, 1), m["targets"].flatten(), reduction="sum")
            (loss / n).backward()
            total += loss.item()
        if probes is not None:
            probes.after_backward(step)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
        opt.step()
        if probes is not None:
            probes.end(step)
        losses.append(total / n)
        weights.append({k: p.detach().clone() for k, p in model.named_parameters()})
    return losses, grads, weights


def on(**kw) -> ProbesConfig:
    base = dict(modules=["*"], params=["*"], every=1, attention_entropy=True)
    base.update(kw)
    return ProbesConfig(**base)


def hook_counts(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


def test_off_builds_nothing(tmp_path):
    model = tiny()
    assert build_probes(ProbesConfig(), model, tmp_path / "run") is None
    assert build_probes(ProbesConfig(every=1, attention_entropy=True, save_steps=[1]), model, tmp_path) is None
    assert not (tmp_path / "run").exists() and not list(tmp_path.iterdir())
    assert hook_counts(model) == 0


def test_no_hook_at_all_on_unrecorded_steps(tmp_path, monkeypatch, one_thread):
    model = tiny()
    probes = build_probes(on(every=3, save_steps=[2]), model, tmp_path)
    tensor_hooks = []
    real = torch.Tensor.register_hook
    monkeypatch.setattr(torch.Tensor, "register_hook", lambda t, fn: tensor_hooks.append(1) or real(t, fn))
    b = batches(1)[0]
    assert hook_counts(model) == 0  # building attaches nothing
    for step, recorded in [(1, False), (2, True), (3, True), (4, False), (5, False), (6, True)]:
        probes.begin(step)
        assert (hook_counts(model) > 0) == recorded
        assert not torch.nn.modules.module._global_forward_hooks
        tensor_hooks.clear()
        model(b["inputs"], doc_ids=b["doc_ids"]).sum().backward()
        assert bool(tensor_hooks) == recorded
        probes.after_backward(step)
        probes.end(step)
        assert hook_counts(model) == 0
    probes.begin(9)  # a recorded step that fails before its end: the next begin drops its hooks
    model(b["inputs"]).sum()
    assert hook_counts(model) > 0 and probes._act
    probes.begin(10)
    assert hook_counts(model) == 0 and not probes._act
    probes.close()
    assert [r["step"] for r in read_probes(tmp_path)] == [2, 3, 6]
    assert [p.name for p in (tmp_path / "probes").iterdir()] == ["step_2.safetensors"]


@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "bf16_autocast"])
def test_probes_change_nothing_bitwise(tmp_path, one_thread, autocast):
    ref = run(tiny(smear_keys=2, smear_queries=True), None, autocast=autocast)
    model = tiny(smear_keys=2, smear_queries=True)
    probes = build_probes(on(save_steps=[2]), model, tmp_path)
    got = run(model, probes, autocast=autocast)
    probes.close()
    assert got[0] == ref[0]  # losses
    for a, b in zip(got[1] + got[2], ref[1] + ref[2]):  # each step's gradients, then weights
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = read_probes(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3]
    row = rows[-1]
    assert all(isinstance(v, (int, float)) for v in row.values())  # flat numbers: one pandas column each
    for name in ("layers.0.attention", "layers.1.feed_forward", "layers.0.attention.smear", "norm", "output"):
        assert all(f"act/{name}/{s}" in row and f"grad/{name}/{s}" in row for s in probes_mod.STATS)
    assert [f"attn_entropy/layers.1.attention/h{j}" in row for j in range(5)] == [True] * 4 + [False]
    assert "act/rotary/norm" in row and "grad/rotary/norm" not in row  # buffers only: no gradient
    assert all(f"param/layers.0.attention.wq.weight/{s}" in row for s in ("norm", "grad_norm", "update_ratio"))


def test_statistics_equal_direct_computations(tmp_path, one_thread):
    model = tiny()
    name, pname = "layers.1.feed_forward", "layers.0.attention.wk.weight"
    probes = build_probes(ProbesConfig(modules=[name], params=["*.wk.weight", "norm.*"], every=2, save_steps=[1]),
                          model, tmp_path)
    acts, grads, before = [], [], {}
    mod = model.get_submodule(name)
    param = model.get_parameter(pname)

    def capture(m, args, out):
        acts.append(out.detach().clone())
        out.register_hook(lambda g: grads.append(g.detach().clone()))

    mod.register_forward_hook(capture)
    real_after = probes.after_backward

    def after_backward(step):  # what the weights and gradients are when the trainer calls it
        before.update(w=param.detach().clone(), g=param.grad.detach().clone())
        real_after(step)

    probes.after_backward = after_backward
    run(model, probes, steps=2, accum=2, grad_clip=1e-3)  # a small clip: the recorded gradient is the unclipped
    probes.close()
    rows = {r["step"]: r for r in read_probes(tmp_path)}
    assert sorted(rows) == [1, 2]
    row = rows[2]
    for kind, captured in (("act", acts[2:]), ("grad", grads[2:])):  # step 2's two micro-batches, pooled
        x = torch.cat(captured).double()
        assert x.shape == (6, 16, 32)
        want = {"norm": x.norm(dim=-1).mean(), "mean": x.mean(), "std": x.std(correction=0),
                "absmax": x.abs().max(), "zero_frac": (x == 0).double().mean()}
        for stat, value in want.items():
            assert row[f"{kind}/{name}/{stat}"] == pytest.approx(float(value), rel=1e-5, abs=1e-12), (kind, stat)
    assert row[f"act/{name}/std"] > 0 and row[f"grad/{name}/std"] > 0
    w_after = param.detach()
    assert row[f"param/{pname}/norm"] == pytest.approx(before["w"].norm().item(), rel=1e-6)
    assert row[f"param/{pname}/grad_norm"] == pytest.approx(before["g"].norm().item(), rel=1e-6)
    ratio = ((w_after - before["w"]).double().norm() / before["w"].double().norm()).item()
    assert row[f"param/{pname}/update_ratio"] == pytest.approx(ratio, rel=1e-5)
    assert 0 < ratio < 0.1
    assert {k.split("/")[1] for k in row if k.startswith("param/")} == {
        "layers.0.attention.wk.weight", "layers.1.attention.wk.weight", "norm.weight"}
    # save step 1: the two micro-batches' outputs and gradients, concatenated along the batch, exactly
    saved = load_file(tmp_path / "probes" / "step_1.safetensors")
    assert sorted(saved) == [f"act/{name}", f"grad/{name}"]
    assert torch.equal(saved[f"act/{name}"], torch.cat(acts[:2]))
    assert torch.equal(saved[f"grad/{name}"], torch.cat(grads[:2]))


def test_zero_activations_and_a_zero_weight(tmp_path):
    """zero_frac counts exact zeros; a parameter at zero has no update ratio (null), not a division by zero."""
    model = tiny(smear_keys=2, smear_queries=True)
    with torch.no_grad():
        model.layers[0].attention.wv.weight.zero_()
        model.layers[0].attention.smear.queries.zero_()
    probes = build_probes(ProbesConfig(modules=["layers.0.attention.wv"], params=["*.smear.queries"], every=1),
                          model, tmp_path)
    run(model, probes, steps=1, accum=1)
    probes.close()
    row = read_probes(tmp_path)[0]
    assert row["act/layers.0.attention.wv/zero_frac"] == 1.0 and row["act/layers.0.attention.wv/absmax"] == 0.0
    assert row["param/layers.0.attention.smear.queries/norm"] == 0.0
    assert row["param/layers.0.attention.smear.queries/update_ratio"] is None
    assert row["param/layers.1.attention.smear.queries/update_ratio"] > 0


@pytest.mark.parametrize("packed", [False, True])
def test_uniform_attention_has_entropy_log_of_visible_keys(tmp_path, packed):
    """Zero query and key projections: every query attends uniformly to the keys it may see, so its entropy is
    log(number of visible keys): log(position + 1) in its document."""
    model = tiny(qkv_bias=True)
    with torch.no_grad():
        for layer in model.layers:
            for lin in (layer.attention.wq, layer.attention.wk):
                lin.weight.zero_()
                lin.bias.zero_()
    probes = build_probes(ProbesConfig(modules=["layers.*.attention"], every=1), model, tmp_path)
    tokens = torch.randint(0, V, (2, 12))
    doc_ids = torch.tensor([[0] * 5 + [1] * 7, [0] * 12]) if packed else None
    lengths = [5, 7, 12] if packed else [12, 12]
    probes.begin(1)
    model(tokens, doc_ids=doc_ids)
    probes.end(1)
    probes.close()
    row = read_probes(tmp_path)[0]
    want = sum(math.log(i + 1) for n in lengths for i in range(n)) / 24
    for layer in range(2):
        for head in range(4):
            assert row[f"attn_entropy/layers.{layer}.attention/h{head}"] == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("variant", [dict(), dict(n_kv_heads=1, smear_keys=2, smear_channels=True,
                                                   smear_queries=True)], ids=["gqa", "mqa_smear"])
def test_recomputed_attention_is_the_models(tmp_path, monkeypatch, variant):
    """The recomputed distributions, applied to the values, give the module's own output; the recorded entropy
    (computed in small chunks here) is theirs."""
    model = tiny(**variant)
    attn = model.layers[1].attention
    inputs, outputs = [], []

    def capture(m, args, out):  # (returns None: the output stays)
        inputs.append(args)
        outputs.append(out.detach())

    attn.register_forward_hook(capture)
    monkeypatch.setattr(probes_mod, "ENTROPY_CHUNK", 100)  # chunks of rows and of queries
    probes = build_probes(ProbesConfig(modules=["layers.1.attention"], every=1), model, tmp_path)
    b = batches(1, b=3, t=20)[0]
    probes.begin(1)
    with torch.no_grad():
        model(b["inputs"], doc_ids=b["doc_ids"])
    probes.end(1)
    probes.close()
    x, cos, sin, mask, _ = inputs[0]
    assert mask is not None and torch.equal(mask, document_causal_mask(b["doc_ids"]))
    p = attention_probs(attn, x, cos, sin, mask)
    assert p.shape == (3, 4, 20, 20)
    torch.testing.assert_close(p.sum(-1), torch.ones(3, 4, 20))
    assert (p[~mask.expand_as(p)] == 0).all()
    v = attn.wv(x).view(3, 20, -1, attn.head_dim).transpose(1, 2)
    v = v.repeat_interleave(4 // v.shape[1], dim=1)
    y = attn.wo((p @ v).transpose(1, 2).reshape(3, 20, -1))
    torch.testing.assert_close(y, outputs[0], rtol=0, atol=1e-5)
    entropy = torch.special.entr(p).sum(-1).mean((0, 2))  # per head, over every query
    row = read_probes(tmp_path)[0]
    got = torch.tensor([row[f"attn_entropy/layers.1.attention/h{j}"] for j in range(4)])
    torch.testing.assert_close(got, entropy, rtol=1e-5, atol=0)
    assert entropy.std() > 1e-3  # the heads differ: a head mixed up would show


def test_activation_checkpointing_records_each_call_once(tmp_path, one_thread):
    """Backward recomputes checkpointed blocks' forwards: they are not recorded twice, and the names are the
    model's (no _checkpoint_wrapped_module)."""
    from lmlab.train.distributed import apply_activation_checkpointing

    rows, saved = [], []
    for i, ckpt in enumerate((False, True)):
        model = tiny()
        if ckpt:
            apply_activation_checkpointing(model, "full")
            assert any("_checkpoint_wrapped_module" in n for n, _ in model.named_modules())
        probes = build_probes(on(modules=["layers.*"], params=["layers.0.*"], save_steps=[1]), model,
                              tmp_path / str(i))
        run(model, probes, steps=1, accum=2)
        probes.close()
        rows.append(read_probes(tmp_path / str(i))[0])
        saved.append(load_file(tmp_path / str(i) / "probes" / "step_1.safetensors"))
    assert saved[0].keys() == saved[1].keys() and "act/layers.1.feed_forward.w2" in saved[1]
    for k in saved[0]:  # each call once: two micro-batches of 3 rows
        assert saved[1][k].shape == saved[0][k].shape == (6, 16, saved[0][k].shape[-1]), k
        torch.testing.assert_close(saved[1][k], saved[0][k], rtol=1e-5, atol=1e-7)
    assert rows[0].keys() == rows[1].keys()
    assert "act/layers.0/norm" in rows[1] and "grad/layers.1.attention.wq/std" in rows[1]
    for k in rows[0]:
        assert rows[1][k] == pytest.approx(rows[0][k], rel=1e-5, abs=1e-9), k


def test_patterns_that_match_nothing_are_config_errors(tmp_path):
    model = tiny()
    with pytest.raises(ConfigError, match=r"probes\.modules: 'layers\.\*\.attn' matches no module.*"
                                          r"layers\.0\.attention"):
        build_probes(ProbesConfig(modules=["layers.*.attention", "layers.*.attn"]), model, tmp_path)
    with pytest.raises(ConfigError, match=r"probes\.modules: 'layers' matches no module"):  # a container, not called
        build_probes(ProbesConfig(modules=["layers"]), model, tmp_path)
    with pytest.raises(ConfigError, match=r"probes\.params: '\*\.wz\.weight' matches no parameter"):
        build_probes(ProbesConfig(params=["*.wz.weight"]), model, tmp_path)
    with pytest.raises(ConfigError, match=r"train\.compile"):
        build_probes(ProbesConfig(modules=["norm"]), model, tmp_path, compiled=True)
    model.layers[1] = torch.compile(model.layers[1])  # as distributed runs compile each block
    with pytest.raises(ConfigError, match=r"train\.compile"):
        build_probes(ProbesConfig(modules=["norm"]), model, tmp_path)
    assert not list(tmp_path.iterdir()) and hook_counts(model) == 0


def test_tied_output_head_is_found_under_both_names(tmp_path):
    model = tiny(tie_embeddings=True)
    probes = build_probes(ProbesConfig(params=["output.weight", "tok_embeddings.weight"], every=1), model, tmp_path)
    run(model, probes, steps=1, accum=1)
    probes.close()
    row = read_probes(tmp_path)[0]
    for s in ("norm", "grad_norm", "update_ratio"):
        assert row[f"param/output.weight/{s}"] == row[f"param/tok_embeddings.weight/{s}"]


def test_ranks_other_than_0_record_nothing_but_validate(tmp_path):
    model = tiny()
    assert build_probes(on(), model, tmp_path, rank=1, world_size=2) is None
    assert not list(tmp_path.iterdir())
    with pytest.raises(ConfigError, match="probes.modules"):
        build_probes(ProbesConfig(modules=["nope"]), model, tmp_path, rank=1, world_size=2)


def test_a_resumed_run_drops_rows_and_tensors_after_its_step(tmp_path, one_thread):
    model = tiny()
    probes = build_probes(ProbesConfig(modules=["norm"], every=2, save_steps=[3, 5]), model, tmp_path)
    run(model, probes, steps=6, accum=1)
    probes.close()
    assert [r["step"] for r in read_probes(tmp_path)] == [2, 3, 4, 5, 6]
    with open(tmp_path / "probes.jsonl", "a") as f:
        f.write('{"step": 7, "act/no')  # a line cut by a crash
    probes = build_probes(ProbesConfig(modules=["norm"], every=2, save_steps=[3, 5]), model, tmp_path, start_step=4)
    assert [r["step"] for r in read_probes(tmp_path)] == [2, 3, 4]
    dropped = (tmp_path / "probes.dropped.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in dropped[:2]] == [5, 6] and dropped[2] == '{"step": 7, "act/no'
    assert sorted(p.name for p in (tmp_path / "probes").iterdir()) == ["step_3.safetensors"]
    for step in (5, 6):  # the resumed run does them again: each once in the file
        probes.begin(step)
        model(batches(1)[0]["inputs"]).sum().backward()
        probes.after_backward(step)
        probes.end(step)
    probes.close()
    lines = (tmp_path / "probes.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [2, 3, 4, 5, 6]


def test_trainer_records_the_steps_asked_and_trains_the_same(tmp_path, one_thread):
    """Trainer(cfg).fit() with probes: rows at the recorded steps (every 3, and the save step 4) and losses in
    metrics.jsonl equal to the same run without probes; a run stopped and resumed writes the same rows once."""
    from lmlab.config import load_config
    from lmlab.monitor.metrics import read_metrics
    from lmlab.train import Trainer

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 40)
    probes = ["probes.modules=[layers.*.attention,norm]", "probes.params=['*']", "probes.every=3",
              "probes.save_steps=[4]"]

    def cfg(name, *extra):
        return load_config(None, [f"name={name}", f"runs_dir={tmp_path / 'runs'}", f"data.train_files=[{corpus}]",
                                  "model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.max_seq_len=64",
                                  "data.seq_len=32", "data.batch_size=4", "optim.warmup_steps=3", "train.steps=7",
                                  "train.grad_accum=2", "train.log_every=1", "logging.progress=false", *extra])

    def losses(c):
        return [(r["step"], r["loss"]) for r in read_metrics(c.run_dir / "metrics.jsonl") if "loss" in r]

    off, straight, split = cfg("off"), cfg("on", *probes), cfg("split", *probes)
    Trainer(off).fit()
    Trainer(straight).fit()
    assert not (off.run_dir / "probes.jsonl").exists() and not (off.run_dir / "probes").exists()
    assert losses(straight) == losses(off) and len(losses(off)) == 7
    rows = read_probes(straight.run_dir)
    assert [r["step"] for r in rows] == [3, 4, 6]
    assert {"act/layers.1.attention/std", "grad/norm/absmax", "attn_entropy/layers.0.attention/h1",
            "param/output.weight/update_ratio"} <= rows[0].keys()
    saved = load_file(straight.run_dir / "probes" / "step_4.safetensors")
    assert saved["act/layers.1.attention"].shape == (8, 32, 32)  # two micro-batches of 4 rows
    assert saved["act/norm"].shape == (8 * 32, 32)  # sparse logits: the final norm sees the target positions
    assert Trainer(split).fit(stop_after=5)["step"] == 5
    assert Trainer(split).fit()["resumed"]
    assert losses(split) == losses(off)
    lines = [json.loads(x) for x in (split.run_dir / "probes.jsonl").read_text().splitlines()]
    assert lines == rows  # every statistic equal to the last bit, each step once


def _cli_train(tmp_path, name: str, nproc: int, *extra: str):
    """``lmlab train`` with a tiny run's overrides, under torchrun with ``nproc`` gloo processes (or plainly)."""
    import os
    import subprocess
    import sys

    corpus = tmp_path / "corpus.txt"
    if not corpus.exists():
        corpus.write_text("To be, or not to be, that is the question:\nWhether 'tis nobler in the mind\n" * 40)
    args = [f"name={name}", f"runs_dir={tmp_path / 'runs'}", f"data.train_files=[{corpus}]", "data.val_fraction=0",
            "model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.max_seq_len=64", "data.seq_len=32",
            "data.batch_size=8", "optim.warmup_steps=2", "train.steps=4", "train.log_every=1", "train.threads=1",
            "logging.progress=false", "profile.measure_peak=false", *extra]
    config = tmp_path / "base.yaml"
    config.write_text("name: base\n")
    cmd = [sys.executable, "-m", "lmlab.cli", "train", str(config), *args]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--standalone",
               "-m", "lmlab.cli", "train", str(config), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow
def test_ddp_records_on_rank_0_the_one_process_parameter_statistics_and_fsdp2_is_refused(tmp_path):
    """Under DDP (2 gloo processes) rank 0 writes the rows; parameters' norms, gradient norms and update ratios
    equal those of one process on the same global batch (the gradients are averaged over the ranks), as do the
    losses. FSDP2 (DTensor parameters) stops with a ConfigError naming the probes."""
    from lmlab.monitor.metrics import read_metrics

    probes = ["probes.modules=[layers.*.attention]", "probes.params=['*']", "probes.every=2"]
    for name, nproc, extra in [("one", 1, probes), ("ddp", 2, ["parallel.dp_replicate=2", *probes])]:
        p = _cli_train(tmp_path, name, nproc, *extra)
        assert p.returncode == 0, p.stderr[-3000:]
    runs = tmp_path / "runs"

    def losses(name):
        return [r["loss"] for r in read_metrics(runs / name / "metrics.jsonl") if "loss" in r]

    assert len(losses("ddp")) == 4 and losses("ddp") == pytest.approx(losses("one"), rel=2e-5)
    one, ddp = read_probes(runs / "one"), read_probes(runs / "ddp")
    assert [r["step"] for r in ddp] == [r["step"] for r in one] == [2, 4]
    for a, b in zip(ddp, one):
        params = [k for k in b if k.startswith("param/")]
        assert params and a.keys() == b.keys()
        for k in params:
            assert a[k] == pytest.approx(b[k], rel=1e-4), k
        assert a["act/layers.0.attention/std"] != b["act/layers.0.attention/std"]  # rank 0's half of the batch
    p = _cli_train(tmp_path, "fsdp", 2, *probes)
    assert p.returncode != 0 and "probes support one process and DDP" in p.stderr, p.stderr[-3000:]
