"""Recurrent mixers inside the model (model.mixer, model.layer_mixers): packed rows == documents alone, the parallel
forward == token-by-token decoding through a state cache, training and exact resume, clear refusals (tensor-parallel
sizes, export)."""

import pytest
import torch

from lmlab.config import ConfigError, ModelConfig, load_config
from lmlab.models import build_model
from lmlab.models.recurrent import RECURRENT_MIXERS
from lmlab.monitor.metrics import read_metrics
from lmlab.train import Trainer

MIXERS = list(RECURRENT_MIXERS)
# every recurrent mixer alone, and two hybrids (recurrent + attention)
STACKS = [{"mixer": m} for m in MIXERS] + [{"layer_mixers": [m, "attention"]} for m in MIXERS[:2]]
IDS = [s.get("mixer") or "+".join(s["layer_mixers"]) for s in STACKS]


def tiny(**kw):
    base = dict(vocab_size=40, dim=32, n_layers=2, n_heads=2, max_seq_len=128, multiple_of=8)
    base.update(kw)
    cfg = ModelConfig(**base)
    cfg.recurrent.head_dim = 8
    cfg.recurrent.state_dim = 4
    cfg.recurrent.chunk_size = 8
    return cfg


class StateCache:
    """The smallest cache a recurrent (or hybrid) model decodes with: whole sequences of B rows, keys/values kept
    contiguously, recurrent states per layer."""

    def __init__(self):
        self.states, self.k, self.v = {}, {}, {}
        self.pos = 0

    def begin(self, b, t):
        self.positions = torch.arange(self.pos, self.pos + t).expand(b, t)
        self.mask = None if self.pos == 0 else torch.ones(b, 1, t, self.pos + t, dtype=torch.bool).tril(self.pos)
        self.pos += t
        return self

    def update(self, layer, k, v):
        self.k[layer] = torch.cat([self.k[layer], k], 2) if layer in self.k else k
        self.v[layer] = torch.cat([self.v[layer], v], 2) if layer in self.v else v
        return self.k[layer], self.v[layer]

    def recurrent_state(self, layer):
        return self.states.get(layer)

    def set_recurrent_state(self, layer, state):
        self.states[layer] = state


@pytest.mark.parametrize("stack", STACKS, ids=IDS)
def test_packed_rows_equal_documents_alone(stack):
    torch.manual_seed(0)
    model = build_model(tiny(**stack), seed=0).eval()
    lengths = [5, 11, 3, 13]
    docs = [torch.randint(0, 40, (n,)) for n in lengths]
    tokens = torch.cat(docs)[None]
    doc_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    with torch.no_grad():
        packed = model(tokens, doc_ids=doc_ids)[0]
        alone = torch.cat([model(d[None])[0] for d in docs])
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stack", STACKS, ids=IDS)
def test_decoding_through_states_equals_the_parallel_forward(stack):
    torch.manual_seed(1)
    model = build_model(tiny(**stack), seed=1).eval()
    tokens = torch.randint(0, 40, (3, 21))
    with torch.no_grad():
        full = model(tokens)
        cache = StateCache()
        parts = [model(tokens[:, :9], cache=cache.begin(3, 9))]  # a prefill of 9 tokens, then one at a time
        for t in range(9, 21):
            parts.append(model(tokens[:, t:t + 1], cache=cache.begin(3, 1)))
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)


def test_recurrent_blocks_names_and_mlp_switch():
    m = MIXERS[0]
    model = build_model(tiny(layer_mixers=[m, "attention"]), seed=0)
    names = {n for n, _ in model.named_parameters()}
    assert any(n.startswith("layers.0.mixer.") for n in names) and "layers.0.mixer_norm.weight" in names
    assert "layers.1.attention.wq.weight" in names and not any(n.startswith("layers.1.mixer") for n in names)
    cfg = tiny(mixer=m)
    cfg.recurrent.mlp = False
    bare = build_model(cfg, seed=0)
    assert not any("feed_forward" in n for n, _ in bare.named_parameters())
    assert bare.num_params() < build_model(tiny(mixer=m), seed=0).num_params()
    # FLOPs: the scans' work on top of 6 x the parameters
    assert model.flops_per_token(64) > 6 * model.num_params(exclude_embeddings=True)


def test_unknown_mixer_and_refusals(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.layer_mixers\[1\].*unknown mixer 'lstm'"):
        load_config(None, ["model.layer_mixers=[attention,lstm]"])
    model = build_model(tiny(mixer=MIXERS[0]), seed=0)
    assert "layers.1.mixer.out_proj" in model.tensor_parallel_plan(2)  # each mixer's plan (tests/test_tp_recurrent.py)
    with pytest.raises(ValueError, match=r"model\.recurrent\.head_dim.*parallel\.tp=3"):  # 8 heads of 8
        model.tensor_parallel_plan(3)
    from lmlab.hf import ExportError, model_config_to_hf

    with pytest.raises(ExportError, match="recurrent mixers"):
        model_config_to_hf(model.cfg)


TEXT = "the cat sat on the mat and the dog sat on the log. " * 80


@pytest.mark.parametrize("mixer", MIXERS)
def test_trains_and_resumes_exactly(tmp_path, mixer, one_thread):
    corpus = tmp_path / "c.txt"
    corpus.write_text(TEXT)

    def cfg(name, steps=10):
        return load_config(None, [
            f"name={name}", f"runs_dir={tmp_path}", f"data.train_files=[{corpus}]", f"model.mixer={mixer}",
            "model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.max_seq_len=64", "model.multiple_of=8",
            "model.recurrent.head_dim=8", "model.recurrent.state_dim=4", "model.recurrent.chunk_size=8",
            "data.seq_len=32", "data.batch_size=4", "optim.lr=0.01", "optim.warmup_steps=2", f"train.steps={steps}",
            "train.log_every=1", "logging.progress=false", "data.packing=true"])

    Trainer(cfg("straight")).fit()
    split = cfg("split")
    Trainer(split).fit(stop_after=4)
    Trainer(split).fit()
    a = [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "straight" / "metrics.jsonl") if "loss" in r]
    b = [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "split" / "metrics.jsonl") if "loss" in r]
    assert a == b and len(a) == 10
    assert a[-1][1] < a[0][1] - 0.5  # it learns
