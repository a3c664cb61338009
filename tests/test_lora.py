"""lmlab.models.lora: fresh adapters change nothing, only adapters train, merging folds them in exactly."""

import pytest
import torch

from lmlab.config import LoraConfig, ModelConfig
from lmlab.models import build_model
from lmlab.models.lora import add_lora, has_lora, lora_parameters, merge_lora


def tiny(seed=0):
    return build_model(ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64, vocab_size=100),
                       seed=seed)


def test_fresh_adapters_change_nothing_and_only_they_train():
    model = tiny()
    x = torch.randint(0, 100, (2, 16))
    before = model(x)
    names_before = set(model.state_dict())
    wrapped = add_lora(model, LoraConfig(rank=4, targets=["wq", "wv", "feed_forward.w2"]))
    assert wrapped == [f"layers.{i}.{n}" for i in range(2) for n in ("attention.wq", "attention.wv",
                                                                        "feed_forward.w2")]
    assert torch.equal(model(x), before)  # B starts at zero
    assert names_before < set(model.state_dict())  # the base names stay; the adapters join them
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(lora_parameters(model)) != set()
    assert has_lora(model)
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        add_lora(model, LoraConfig(rank=4))


def test_adapted_layer_equals_the_low_rank_formula_and_merging_folds_it_in():
    model = tiny()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    add_lora(model, LoraConfig(rank=3, alpha=6.0), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randint(0, 100, (4, 24))
    for _ in range(5):
        loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    for k, v in base.items():  # the base weights never moved
        assert torch.equal(model.state_dict()[k], v), k
    wq = model.layers[0].attention.wq
    h = torch.randn(5, 32)
    ref = h @ wq.weight.T + 2.0 * (h @ wq.lora_a.T @ wq.lora_b.T)  # scale = alpha / rank = 2
    assert torch.allclose(wq(h), ref, atol=1e-6) and wq.lora_b.abs().sum() > 0
    adapted = model(x)
    merge_lora(model)
    assert not has_lora(model) and set(model.state_dict()) == set(base)
    assert torch.allclose(model(x), adapted, atol=1e-5)
    assert all(p.requires_grad for p in model.parameters())


def test_lora_errors():
    model = tiny()
    with pytest.raises(ValueError, match=r"targets \['q_proj'\] match no linear layer; .*layers\.0\.attention\.wq"):
        add_lora(model, LoraConfig(rank=2, targets=["q_proj"]))
    with pytest.raises(ValueError, match="rank must be positive"):
        add_lora(model, LoraConfig(rank=0))
    from lmlab.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"model\.lora\.dropout"):
        load_config(None, ["model.lora.dropout=1.5"])


def test_a_lora_run_trains_only_its_adapters_resumes_exactly_and_reloads(tmp_path):
    """Through the trainer: the frozen weights end as they started, the loss falls, a resumed run gives the same
    losses to the last bit, and load_run rebuilds the adapted model from the run folder."""
    from test_train import TEXT, losses, make_cfg

    from lmlab.train import Trainer
    from lmlab.train.checkpoint import load_run

    corpus = tmp_path / "c.txt"
    corpus.write_text(TEXT)
    lora = ["model.lora.rank=4", "model.lora.targets=[wq,wv,w2]", "optim.lr=0.05"]
    straight = make_cfg(tmp_path, corpus, *lora, name="straight")
    trainer = Trainer(straight)
    start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.fit()
    end = trainer.model.state_dict()
    for k, v in start.items():
        assert torch.equal(end[k], v) != k.endswith(("lora_a", "lora_b")), k  # only the adapters moved
    split = make_cfg(tmp_path, corpus, *lora, name="split")
    Trainer(split).fit(stop_after=5)
    Trainer(split).fit()
    a = losses(straight.run_dir)
    assert a == losses(split.run_dir) and a[-1][1] < a[0][1]
    _, model, _ = load_run(straight.run_dir)
    assert has_lora(model) and all(torch.equal(model.state_dict()[k], v) for k, v in end.items())
