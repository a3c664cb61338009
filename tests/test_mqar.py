"""MQAR data kind (lmlab.data.mqar): sequence structure, seeds, the fixed validation set, exact loader resume,
accuracy with its slices, config refusals, and a tiny attention model that learns to answer."""

import json

import numpy as np
import pytest
import torch

from lmlab.config import ConfigError, DataConfig, MQARConfig, load_config
from lmlab.data import DataError, build_loader
from lmlab.data.mqar import MQARRows, distance_bin, evaluate_mqar, example_rng, make_example, mqar_accuracy
from lmlab.tokenizers import ByteTokenizer

IGNORE = -100


@pytest.fixture(scope="module")
def tok():
    return ByteTokenizer()


def check_structure(ex, vocab_size, n, q):
    """Every property a sequence must have (see the module doc of lmlab.data.mqar)."""
    inputs, targets, dist = ex["inputs"], ex["targets"], ex["distance"]
    half = vocab_size // 2
    keys, values = inputs[0:2 * n:2], inputs[1:2 * n:2]
    assert ex["num_kv_pairs"] == n
    assert ((keys >= 1) & (keys < half)).all() and ((values >= half) & (values < vocab_size)).all()
    assert len(set(keys.tolist())) == n and len(set(values.tolist())) == n
    pair = dict(zip(keys.tolist(), values.tolist()))
    where = np.flatnonzero(targets != IGNORE)
    assert len(where) == q  # the loss only at the queries
    assert (where >= 2 * n).all() and ((where - 2 * n) % 2 == 0).all()  # each at the start of a slot after the pairs
    assert len(set(inputs[where].tolist())) == q  # distinct keys asked
    for p in where:
        key = int(inputs[p])
        assert targets[p] == pair[key]  # the value paired with that key
        assert dist[p] == p - 2 * keys.tolist().index(key)
    assert (dist[targets == IGNORE] == -1).all()
    assert ((inputs >= 0) & (inputs < vocab_size)).all()


@pytest.mark.parametrize("placement", ["power", "uniform"])
@pytest.mark.parametrize("n,q", [(8, 0), (8, 3), (1, 0)])
def test_sequence_structure(placement, n, q):
    for i in range(50):
        ex = make_example(example_rng(0, 0, i), 64, 48, n, q, placement)
        check_structure(ex, 64, n, q or n)


def test_fill_and_tight_fit():
    ex = make_example(example_rng(1, 0, 0), 32, 20, 5, 0, random_fill=False)  # 2n + 2q == seq_len: every slot used
    check_structure(ex, 32, 5, 5)
    assert (ex["inputs"][10:][ex["targets"][10:] == IGNORE] == 0).all()  # no random ids when random_fill is off
    ex = make_example(example_rng(1, 0, 0), 32, 64, 5)
    fill = ex["inputs"][10:][ex["targets"][10:] == IGNORE]
    assert len(set(fill.tolist())) > 10  # random ids fill the rest
    with pytest.raises(DataError, match="queries need"):
        make_example(example_rng(1, 0, 0), 32, 19, 5)


def test_power_placement_favours_short_gaps():
    def slots(placement):
        out = []
        for i in range(400):
            ex = make_example(example_rng(2, 0, i), 256, 128, 4, 0, placement)
            out += ((np.flatnonzero(ex["targets"] != IGNORE) - 8) // 2).tolist()
        return np.array(out)

    power, uniform = slots("power"), slots("uniform")
    space = (128 - 8) // 2
    assert abs(uniform.mean() - (space - 1) / 2) < 3  # uniform over the 60 slots
    # weight i^-0.99 over slots i = 1..60, 4 drawn without replacement: slot 0 is in ~half the sequences
    assert power.mean() < 0.6 * uniform.mean()
    assert 0.3 < (power == 0).sum() / 400 < 0.8
    assert (uniform == 0).sum() / 400 < 0.15


def test_seeds_and_the_fixed_validation_set(tok):
    cfg = DataConfig(kind="mqar", seq_len=32, batch_size=4, mqar=MQARConfig(vocab_size=64, num_kv_pairs=[4],
                                                                            train_size=64, val_size=10))
    a = next(build_loader(cfg, tok, "train", seed=0))
    b = next(build_loader(cfg, tok, "train", seed=0))
    c = next(build_loader(cfg, tok, "train", seed=1))
    assert torch.equal(a["inputs"], b["inputs"]) and torch.equal(a["targets"], b["targets"])
    assert not torch.equal(a["inputs"], c["inputs"])
    val0 = list(build_loader(cfg, tok, "val", seed=0))
    val1 = list(build_loader(cfg, tok, "val", seed=1))
    assert len(val0) == 3  # 10 rows in batches of 4: the last one padded with 2 empty rows
    for x, y in zip(val0, val1):  # the run seed does not change it
        assert torch.equal(x["inputs"], y["inputs"]) and torch.equal(x["targets"], y["targets"])
    assert (val0[-1]["targets"][2:] == IGNORE).all() and (val0[-1]["targets"][:2] != IGNORE).sum() == 8
    other = DataConfig(**{**vars(cfg), "mqar": MQARConfig(**{**vars(cfg.mqar), "val_seed": 7})})
    assert not torch.equal(next(iter(build_loader(other, tok, "val")))["inputs"], val0[0]["inputs"])
    # an example is a function of its seed and index only: the same row in any batch, shuffled or not
    src = MQARRows(cfg.mqar, 32, 4, "train", seed=0)
    rows = src.rows(0, 0)
    assert all(np.array_equal(a["inputs"][j].numpy(), src.example(int(r))["inputs"]) for j, r in enumerate(rows))
    unshuffled = MQARRows(cfg.mqar, 32, 4, "train", seed=0, shuffle=False)
    assert np.array_equal(unshuffled.batch(0, 0)["inputs"][0], src.example(0)["inputs"])
    # training and validation never share draws, even with equal seeds
    val_src = MQARRows(cfg.mqar, 32, 4, "val")
    same = MQARRows(cfg.mqar, 32, 4, "train", seed=cfg.mqar.val_seed, shuffle=False)
    assert not np.array_equal(val_src.example(0)["inputs"], same.example(0)["inputs"])


def test_mixture_of_pair_counts(tok):
    m = MQARConfig(vocab_size=64, num_kv_pairs=[2, 6], train_size=200, val_size=9)
    val = MQARRows(m, 32, 4, "val")
    assert [val.example(i)["num_kv_pairs"] for i in range(4)] == [2, 6, 2, 6]
    train = MQARRows(m, 32, 4, "train", seed=3)
    counts = [train.example(i)["num_kv_pairs"] for i in range(200)]
    assert 60 < counts.count(2) < 140 and counts.count(2) + counts.count(6) == 200
    for i in range(20):
        check_structure(train.example(i), 64, counts[i], counts[i])


@pytest.mark.parametrize("prefetch", ["none", "thread"])
def test_loader_resume_is_exact_across_epochs(tok, prefetch):
    m = MQARConfig(vocab_size=64, num_kv_pairs=[3, 4], train_size=40)
    cfg = DataConfig(kind="mqar", seq_len=24, batch_size=4, seed=5, prefetch=prefetch, prefetch_depth=3, mqar=m)
    reference = [next(it) for it in [build_loader(DataConfig(**{**vars(cfg), "prefetch": "none"}), tok)]
                 for _ in range(18)]
    with build_loader(cfg, tok) as first:
        assert len(first) == 10
        head = [next(first) for _ in range(7)]
        state = first.state_dict()
        assert (state["epoch"], state["index"]) == (0, 7)
    with build_loader(cfg, tok) as resumed:
        resumed.load_state_dict(json.loads(json.dumps(state)))
        tail = [next(resumed) for _ in range(11)]  # crosses into epoch 1 (reshuffled)
        assert resumed.epoch == 1
    for x, y in zip(head + tail, reference):
        assert torch.equal(x["inputs"], y["inputs"]) and torch.equal(x["targets"], y["targets"])
    epoch1 = {tuple(b["inputs"][0].tolist()) for b in reference[10:]}
    assert {tuple(b["inputs"][0].tolist()) for b in reference[:8]} != epoch1  # another order
    other = build_loader(DataConfig(**{**vars(cfg), "mqar": MQARConfig(**{**vars(m), "num_kv_pairs": [4]})}), tok)
    with pytest.raises(DataError, match=r"cannot resume.*num_kv_pairs"):
        other.load_state_dict(state)


def test_ranks_split_the_rows(tok):
    cfg = DataConfig(kind="mqar", seq_len=24, batch_size=2, mqar=MQARConfig(vocab_size=64, num_kv_pairs=[4],
                                                                            train_size=16, val_size=5))
    ranks = [build_loader(cfg, tok, "train", rank=r, world_size=2) for r in range(2)]
    rows = [set(map(int, ld.source.rows(0, i))) for ld in ranks for i in range(len(ld))]
    assert len(set().union(*rows)) == 16
    val = [list(build_loader(cfg, tok, "val", rank=r, world_size=2)) for r in range(2)]
    assert len(val[0]) == len(val[1]) == 2
    assert sum(int((b["targets"] != IGNORE).sum()) for v in val for b in v) == 5 * 4  # each val row once


def test_accuracy_on_hand_made_logits():
    targets = torch.full((2, 6), IGNORE)
    targets[0, 2], targets[0, 4], targets[1, 3] = 5, 6, 7
    distance = torch.full((2, 6), -1)
    distance[0, 2], distance[0, 4], distance[1, 3] = 2, 4, 9
    logits = torch.zeros(2, 6, 8)
    logits[0, 2, 5] = 1.0  # right
    logits[0, 4, 1] = 1.0  # wrong (predicts 1, target 6)
    logits[1, 3, 7] = 3.0  # right
    logits[0, 0, 3] = 9.0  # no target here: ignored
    m = mqar_accuracy(logits, targets, distance, torch.tensor([4, 8]))
    assert m["mqar/acc"] == pytest.approx(2 / 3) and m["mqar/n"] == 3
    assert m["mqar/acc/kv4"] == 0.5 and m["mqar/acc/kv8"] == 1.0
    assert m["mqar/acc/dist2-3"] == 1.0 and m["mqar/acc/dist4-7"] == 0.0 and m["mqar/acc/dist8-15"] == 1.0
    assert list(m) == ["mqar/acc", "mqar/n", "mqar/acc/kv4", "mqar/acc/kv8", "mqar/acc/dist2-3",
                       "mqar/acc/dist4-7", "mqar/acc/dist8-15"]
    # the logits of the query positions only (as logits_at gives them) count the same
    assert mqar_accuracy(logits[targets != IGNORE], targets) == {"mqar/acc": pytest.approx(2 / 3), "mqar/n": 3}
    with pytest.raises(ValueError, match="2 rows of logits for 3 query positions"):
        mqar_accuracy(logits[targets != IGNORE][:2], targets)
    assert [distance_bin(d) for d in (2, 3, 4, 7, 8, 100)] == ["dist2-3", "dist2-3", "dist4-7", "dist4-7",
                                                               "dist8-15", "dist64-127"]


def test_config_refusals(tok):
    base = ["data.kind=mqar", "data.mqar.num_kv_pairs=[8]"]
    with pytest.raises(ConfigError, match=r"data.seq_len: mqar: 8 pairs and 8 queries need seq_len >= 32"):
        load_config(None, [*base, "data.seq_len=30"])
    with pytest.raises(ConfigError, match="data.mqar.num_queries"):
        load_config(None, [*base, "data.mqar.num_queries=9"])
    with pytest.raises(ConfigError, match="data.mqar.num_kv_pairs: 8 pairs need as many distinct keys"):
        load_config(None, [*base, "data.mqar.vocab_size=16"])
    with pytest.raises(ConfigError, match="data.mqar.placement"):
        load_config(None, [*base, "data.mqar.placement=zipf"])
    cfg = load_config(None, [*base, "data.mqar.vocab_size=512"])
    with pytest.raises(DataError, match="vocab_size=512 is larger than the tokenizer's 264 ids"):
        build_loader(cfg.data, tok)


def test_attention_learns_easy_mqar(tmp_path, one_thread):
    from lmlab.train import Trainer
    from lmlab.train.checkpoint import load_run

    cfg = load_config(None, [
        "name=mqar", f"runs_dir={tmp_path}", "data.kind=mqar", "data.mqar.num_kv_pairs=[2]",
        "data.mqar.vocab_size=16", "data.mqar.val_size=256", "data.seq_len=16", "data.batch_size=32",
        "model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.max_seq_len=16", "optim.warmup_steps=5",
        "optim.lr=0.01", "train.steps=60", "train.log_every=10", "logging.progress=false", "train.device=cpu"])
    trainer = Trainer(cfg)
    before = evaluate_mqar(trainer.model, cfg.data)
    summary = trainer.fit()
    after = evaluate_mqar(trainer.model, cfg.data)
    chance = 1 / 8  # 8 values
    assert before["mqar/n"] == after["mqar/n"] == 512
    assert before["mqar/acc"] < 2 * chance
    assert after["mqar/acc"] > 2.5 * chance  # measured 0.46 (a value of the sequence); induction comes later
    assert summary["val_loss"] < 2.0  # the trainer's validation runs on the MQAR set: ln 8 = 2.08 is chance
    _, model, _ = load_run(cfg.run_dir)  # what the app evaluates: the final checkpoint
    assert evaluate_mqar(model, cfg.data, batch_size=50) == after
    # the app's report on this run: the evaluation cached in RUN/mqar_eval.json, a CSV row, the plots
    app = zoology_app()
    rows = app.make_report([cfg], tmp_path / "report")
    assert rows[0]["mqar/acc"] == after["mqar/acc"] and rows[0]["mixer"] == "attention"
    assert rows[0]["state_bytes"] == 2 * 2 * 16 * 2 * 16 * 4
    stored = json.loads((cfg.run_dir / "mqar_eval.json").read_text())
    assert stored["metrics"] == after
    csv_text = (tmp_path / "report" / "results.csv").read_text().splitlines()
    assert len(csv_text) == 2 and "mqar/acc/kv2" in csv_text[0]
    assert (tmp_path / "report" / "acc_vs_state.png").read_bytes()[:4] == b"\x89PNG"
    stored["metrics"]["mqar/acc"] = -1.0  # a stored result for the same checkpoint and task is reused...
    (cfg.run_dir / "mqar_eval.json").write_text(json.dumps(stored))
    assert app.evaluate_run(cfg.run_dir)["metrics"]["mqar/acc"] == -1.0
    stored["key"]["mqar"]["val_size"] = 7  # ...one for another task is redone
    (cfg.run_dir / "mqar_eval.json").write_text(json.dumps(stored))
    assert app.evaluate_run(cfg.run_dir)["metrics"] == after


def zoology_app():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "apps" / "zoology" / "run.py"
    spec = importlib.util.spec_from_file_location("zoology_run", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_state_bytes_per_sequence():
    from lmlab.models import build_model

    app = zoology_app()
    base = ["data.kind=mqar", "data.seq_len=128", "model.max_seq_len=128", "model.dim=64", "model.n_layers=3",
            "model.n_heads=4"]
    attn = load_config(None, base)
    assert app.state_bytes(attn) == 3 * 2 * 128 * 4 * 16 * 4  # layers x (K and V) x seq_len x heads x head_dim x 4
    gqa = load_config(None, [*base, "model.n_kv_heads=2"])
    assert app.state_bytes(gqa) == 3 * 2 * 128 * 2 * 16 * 4
    for mixer in ("mamba2", "hawk", "mingru", "minlstm"):
        cfg = load_config(None, [*base, f"model.mixer={mixer}"])
        model = build_model(cfg.model, vocab_size=264)
        per_layer = model.layers[0].mixer.num_state_elements() * 4
        assert per_layer > 0 and app.state_bytes(cfg) == 3 * per_layer  # independent of seq_len
        longer = load_config(None, [*base, f"model.mixer={mixer}", "data.seq_len=64"])
        assert app.state_bytes(longer) == app.state_bytes(cfg)
    hybrid = load_config(None, [*base, "model.layer_mixers=[hawk, hawk, attention]"])
    hawk = load_config(None, [*base, "model.mixer=hawk"])
    assert app.state_bytes(hybrid) == 2 * app.state_bytes(hawk) // 3 + app.state_bytes(attn) // 3
    assert app.mixer_label(hybrid) == "hawk+hawk+attention" and app.mixer_label(hawk) == "hawk"
    rows = [{"mixer": "a", "state_bytes": 8, "mqar/acc": 0.5}, {"mixer": "a", "state_bytes": 8, "mqar/acc": 0.7},
            {"mixer": "a", "state_bytes": 2, "mqar/acc": 0.1}, {"mixer": "b", "state_bytes": 4, "mqar/acc": 0.3}]
    assert app.best_points(rows, "state_bytes") == {"a": ([2.0, 8.0], [0.1, 0.7]), "b": ([4.0], [0.3])}
