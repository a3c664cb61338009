"""Distillation from a frozen teacher on chosen dialog files (data.distill_files, train.distill): which targets the
batches mark, the loss against a slow per-position reference (CE outside, weight x KL(teacher || model) inside),
that training pulls the model to the teacher, exact resume, and the errors of a bad setup."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmlab.config import ConfigError, load_config
from lmlab.data.base import IGNORE
from lmlab.data.dialog import DialogRows, load_dialogs
from lmlab.data.errors import DataError
from lmlab.tokenizers import ByteTokenizer, DialogTokenizer
from lmlab.train import Trainer


def _files(tmp_path: Path) -> tuple[Path, Path]:
    facts, general = tmp_path / "facts.jsonl", tmp_path / "general.jsonl"
    facts.write_text("".join(json.dumps([{"source": "user", "content": f"Where was person {i} born?"},
                                         {"source": "assistant", "content": f"In town {i * 7 % 13}."}]) + "\n"
                             for i in range(24)))
    general.write_text("".join(json.dumps({"dialog": [
        {"source": "user", "content": f"Say something about {w}."},
        {"source": "assistant", "content": f"A {w} is a thing that people talk about {'a lot' * (1 + i % 3)}."}]})
        + "\n" for i, w in enumerate(["cats", "rain", "tea", "maps", "ships", "bread", "clocks", "salt",
                                      "wool", "glass", "bees", "kites", "snow", "ink", "rope", "milk"])))
    return facts, general


def _cfg(tmp_path: Path, *overrides: str, name: str = "student"):
    facts, general = _files(tmp_path)
    return load_config(None, [
        f"runs_dir={tmp_path}/runs", f"name={name}", "seed=1", "data.kind=dialog",
        f"data.train_files=[{facts},{general}]", "data.val_fraction=0", "data.batch_size=4", "data.seq_len=96",
        "model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.max_seq_len=128", "tokenizer.kind=byte",
        "optim.lr=3e-3", "optim.warmup_steps=0", "train.threads=1", "train.log_every=1", "logging.progress=false",
        *overrides])


@pytest.fixture
def teacher(tmp_path) -> Path:
    """A teacher run trained a few steps on both files (its distributions differ from a fresh model's)."""
    Trainer(_cfg(tmp_path, "train.steps=15", name="teacher")).fit()
    return tmp_path / "runs" / "teacher"


@pytest.mark.parametrize("packing", [True, False])
def test_batches_mark_the_targets_of_distilled_files_only(tmp_path, packing):
    facts, general = _files(tmp_path)
    dtok = DialogTokenizer(ByteTokenizer())
    corpus = load_dialogs([facts, general], dtok, 96, distill=[general])
    assert corpus.distill.tolist() == [False] * 24 + [True] * 16
    rows = DialogRows(corpus, seq_len=96, batch_size=4, seed=0, packing=packing)
    plain = DialogRows(load_dialogs([facts, general], dtok, 96), seq_len=96, batch_size=4, seed=0, packing=packing)
    seen = 0
    for i in range(rows.num_batches(0)):
        b, p = rows.batch(0, i), plain.batch(0, i)
        assert "distill" not in p and all(np.array_equal(b[k], p[k]) for k in p)  # nothing else changes
        # slow reference: lay each row's dialogs again and mark the targets that fall in a distilled one
        want = np.zeros_like(b["distill"])
        for r, row in enumerate(rows.plan(0)[2][i].tolist()):
            c = 0
            for d in rows.row_dialogs(0, row):
                n = len(corpus.dialog(int(d))[0])
                if corpus.distill[d]:
                    want[r, c: c + n - 1] = b["targets"][r, c: c + n - 1] != IGNORE
                c += n
        assert np.array_equal(b["distill"], want)
        seen += int(want.sum())
    assert seen > 0
    with pytest.raises(DataError, match="data.distill_files: .*elsewhere.jsonl not among the files"):
        (tmp_path / "elsewhere.jsonl").write_text(general.read_text())
        load_dialogs([facts, general], dtok, 96, distill=[tmp_path / "elsewhere.jsonl"])


@pytest.mark.parametrize("sparse", [True, False])
def test_loss_equals_a_per_position_reference(tmp_path, teacher, sparse):
    general = tmp_path / "general.jsonl"
    tr = Trainer(_cfg(tmp_path, f"data.distill_files=[{general}]", f"train.distill.teacher={teacher}",
                      "train.distill.weight=0.7", "train.steps=3", f"train.sparse_logits={sparse}"))
    tr.train_step()  # the student moves away from its init
    batch = tr._to_device(next(tr.train_loader))
    assert batch["distill"].any() and (~batch["distill"] & (batch["targets"] != IGNORE)).any()
    fast = tr._loss_sum(tr.model, batch)
    g_fast = torch.autograd.grad(fast, list(tr.model.parameters()))
    want = torch.zeros((), dtype=torch.float64)
    for r in range(batch["inputs"].shape[0]):
        kw = {k: batch[k][r: r + 1] for k in ("doc_ids", "positions") if k in batch}
        s = F.log_softmax(tr.model(batch["inputs"][r: r + 1], **kw)[0].double(), -1)
        with torch.no_grad():
            t = F.log_softmax(tr.teacher(batch["inputs"][r: r + 1], **kw)[0].double(), -1)
        for i, target in enumerate(batch["targets"][r].tolist()):
            if target == IGNORE:
                continue
            if batch["distill"][r, i]:
                want = want + 0.7 * sum(t[i].exp()[v] * (t[i, v] - s[i, v]) for v in range(s.shape[-1]))
            else:
                want = want - s[i, target]
    g_ref = torch.autograd.grad(want, list(tr.model.parameters()))
    assert fast.item() == pytest.approx(want.item(), rel=1e-5)
    assert all(torch.allclose(a, b.float(), rtol=1e-3, atol=1e-6) for a, b in zip(g_fast, g_ref))


def test_distillation_pulls_the_model_to_its_teacher(tmp_path, teacher):
    """Distilled on the general file only (no cross-entropy there), a fresh model's KL to the teacher on those
    dialogs falls far below a fresh model's; a student that starts from the teacher's weights has KL 0."""
    general = tmp_path / "general.jsonl"
    common = [f"data.distill_files=[{general}]", f"train.distill.teacher={teacher}"]

    def kl_on_general(tr: Trainer) -> float:
        rows = DialogRows(load_dialogs([general], DialogTokenizer(ByteTokenizer()), 96), seq_len=96,
                          batch_size=16, seed=0, shuffle=False, packing=False, train=False)
        b = {k: torch.as_tensor(v) for k, v in rows.batch(0, 0).items()}
        keep = b["targets"] != IGNORE
        with torch.no_grad():
            s = F.log_softmax(tr.model(b["inputs"], logits_at=keep), -1)
            t = F.log_softmax(tr.teacher(b["inputs"], logits_at=keep), -1)
        return float((t.exp() * (t - s)).sum(-1).mean())

    fresh = Trainer(_cfg(tmp_path, *common, "train.steps=60", name="distilled"))
    before = kl_on_general(fresh)
    fresh.fit()
    after = kl_on_general(fresh)
    assert after < before / 4, (before, after)
    rows = [r for r in map(json.loads, (fresh.run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    shares = [r["distill_share"] for r in rows]  # the facts' targets keep the cross-entropy
    assert all(0 <= x <= 1 for x in shares) and 0.2 < sum(shares) / len(shares) < 0.8
    assert rows[-1]["distill_kl"] < rows[0]["distill_kl"] / 4
    same = Trainer(_cfg(tmp_path, *common, f"train.init_from={teacher}", "train.steps=1",
                        f"data.train_files=[{general}]", name="same"))
    m = same.train_step()
    assert m["loss"] == pytest.approx(0.0, abs=1e-6) and m["log"]["distill_share"] == 1.0
    assert kl_on_general(same) < 1e-3  # one step of zero gradient (AdamW without weight decay) moves nothing much


def test_resume_is_exact(tmp_path, teacher):
    general = tmp_path / "general.jsonl"
    common = [f"data.distill_files=[{general}]", f"train.distill.teacher={teacher}", "train.steps=6"]
    Trainer(_cfg(tmp_path, *common, name="straight")).fit()
    split = _cfg(tmp_path, *common, name="split")
    Trainer(split).fit(stop_after=3)
    assert Trainer(split).fit()["resumed"]

    def losses(run: Path) -> list[float]:
        return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]

    assert losses(split.run_dir) == losses(tmp_path / "runs" / "straight")


def test_a_bad_setup_is_an_error_naming_the_key(tmp_path):
    general = tmp_path / "x.jsonl"
    with pytest.raises(ConfigError, match="data.distill_files: distillation needs a teacher"):
        _cfg(tmp_path, f"data.distill_files=[{general}]")
    with pytest.raises(ConfigError, match="data.distill_files: marks dialogs to distill: needs kind: dialog"):
        _cfg(tmp_path, f"data.distill_files=[{general}]", "data.kind=text", "train.init_from=x")
    with pytest.raises(ConfigError, match="train.distill.weight: must be positive"):
        _cfg(tmp_path, "train.distill.weight=0")
