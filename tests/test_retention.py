"""lmlab.evals.retention: KL to the base, bits per byte and multiple choice, each against a one-sequence reference."""

import math

import pytest
import torch
import torch.nn.functional as F

from lmlab.config import ModelConfig
from lmlab.evals.retention import (
    base_answers,
    bits_per_byte,
    build_cloze_items,
    kl_to_base,
    multiple_choice,
    retention,
    tool_use,
)
from lmlab.models import build_model
from lmlab.tokenizers import ByteTokenizer, DialogTokenizer

TEXT = ("The river rose in the night. By morning the fields were under water. Farmers moved their animals to the "
        "hills. A new bridge was built in spring. It took four months to finish. The town held a fair to open it. "
        "Children ran across it all day long. The mayor gave a short speech at noon. Nobody remembered what he said. "
        "Rain came again in the autumn. This time the new bridge held. The farmers stayed in their houses. "
        "A teacher wrote the story down for her class. Her students drew pictures of the flood. One drawing won a "
        "prize in the city. The prize was a box of paints. The student gave it to the school. Every class used it "
        "for a year. The river stayed calm the next spring. Boats came back to the old harbour. Fishermen sold "
        "their catch on the bridge. Tourists came to see the famous drawing.")


def tiny(seed):
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=2, max_seq_len=256, vocab_size=264)
    return build_model(cfg, seed=seed).eval()


@pytest.fixture(scope="module")
def models():
    base = tiny(0)
    other = tiny(0)
    with torch.no_grad():  # a "finetuned" model: the base with some weights moved
        for p in other.layers[1].parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    return base, other


def one_seq_log_probs(model, seq):
    return F.log_softmax(model(torch.tensor([seq])).float(), -1)[0]


def test_kl_to_base_equals_one_sequence_reference_and_is_zero_for_the_base(models):
    base, other = models
    seqs = [(list(range(10, 40)), 12), (list(range(50, 60)), 3), (list(range(100, 105)), 5)]  # the last scores none
    got = kl_to_base(other, base, seqs, batch_size=2)
    total = count = 0
    firsts, rests = [], []
    for toks, start in seqs:
        lb, lm = one_seq_log_probs(base, toks), one_seq_log_probs(other, toks)
        kl = F.kl_div(lm, lb, log_target=True, reduction="none").sum(-1)[start - 1:len(toks) - 1]
        total, count = total + kl.sum().item(), count + kl.numel()
        if kl.numel():
            firsts.append(kl[0].item())
            rests += kl[1:].tolist()
    assert got["kl_tokens"] == count == 18 + 7
    assert got["kl"] == pytest.approx(total / count, rel=1e-5) and got["kl"] > 1e-4
    assert got["kl_first"] == pytest.approx(sum(firsts) / 2, rel=1e-5)
    assert got["kl_rest"] == pytest.approx(sum(rests) / (18 + 7 - 2), rel=1e-5)
    assert kl_to_base(base, base, seqs)["kl"] == pytest.approx(0.0, abs=1e-7)


def test_bits_per_byte_equals_the_mean_loss_over_bytes(models):
    base, _ = models
    tok = ByteTokenizer()
    got = bits_per_byte(base, tok, TEXT, seq_len=64, batch_size=3)
    ids = tok.encode(TEXT)
    nll = n = 0
    for i in range(0, len(ids), 64):
        w = ids[i:i + 64]
        lp = one_seq_log_probs(base, w)
        nll -= lp[:-1].gather(-1, torch.tensor(w[1:])[:, None]).sum().item()
        n += len(w) - 1
    assert got["bpb_bytes"] == got["bpb_tokens"] == n  # bytes: one token per byte
    assert got["bpb"] == pytest.approx(nll / (math.log(2) * n), rel=1e-5)
    assert 7 < got["bpb"] < 9  # an untrained byte model: about log2(264) bits


def test_multiple_choice_scores_by_hand_and_batching_changes_nothing(models):
    base, other = models
    tok = ByteTokenizer()
    items = build_cloze_items(TEXT, 6, seed=3)
    assert len(items) >= 3
    got = multiple_choice(other, tok, items, batch_size=16)
    assert got == multiple_choice(other, tok, items, batch_size=1)
    acc = acc_norm = 0
    for item in items:
        ctx = tok.encode(item["context"])
        scores = []
        for e in item["endings"]:
            whole = ctx + tok.encode(e)
            lp = one_seq_log_probs(other, whole)
            s = lp[len(ctx) - 1:-1].gather(-1, torch.tensor(whole[len(ctx):])[:, None]).sum().item()
            scores.append((s, s / len(e.encode())))
        acc += max(range(len(scores)), key=lambda j: scores[j][0]) == item["label"]
        acc_norm += max(range(len(scores)), key=lambda j: scores[j][1]) == item["label"]
    assert got["mc/acc"] == acc / len(items) and got["mc/acc_norm"] == acc_norm / len(items)
    with pytest.raises(ValueError, match="item 0: label 7 is not an index of its 2 endings"):
        multiple_choice(other, tok, [{"context": "a", "endings": [" b", " c"], "label": 7}])


def test_cloze_items_are_deterministic_and_well_formed():
    items = build_cloze_items(TEXT, 5, seed=0)
    assert items == build_cloze_items(TEXT, 5, seed=0) and items != build_cloze_items(TEXT, 5, seed=1)
    for item in items:
        assert len(item["endings"]) == 4 and len(set(item["endings"])) == 4
        right = item["endings"][item["label"]]
        assert right.startswith(" ") and (item["context"] + right).replace("  ", " ") in " ".join(TEXT.split())
    assert build_cloze_items("Too short.", 5) == []


def test_retention_report_and_base_answers(models):
    base, other = models
    tok = ByteTokenizer()
    answers = base_answers(base, DialogTokenizer(tok), ["Hello?", [{"source": "user", "content": "Why?"}]],
                           max_new_tokens=8)
    prompt = DialogTokenizer(tok).encode_prompt([{"source": "user", "content": "Hello?"}])
    assert answers[0][1] == len(prompt) and answers[0][0][:len(prompt)] == prompt and len(answers[0][0]) > len(prompt)
    items = build_cloze_items(TEXT, 6)
    same = retention(base, base, tok, answers, TEXT, items, seq_len=64)
    assert same["kl"] == pytest.approx(0, abs=1e-7) and same["bpb_rel"] == 1 and same["mc/acc_rel"] == 1
    moved = retention(other, base, tok, answers, TEXT, items, seq_len=64,
                      base_scores={"bpb": same["bpb"], "mc/acc": same["mc/acc"], "mc/acc_norm": same["mc/acc_norm"]})
    assert moved["kl"] > 0 and moved["bpb_base"] == same["bpb"] and moved["bpb_rel"] == same["bpb"] / moved["bpb"]


def test_tool_use_counts_the_general_prompts_answered_with_a_live_tool_call(tmp_path):
    """A model trained only on tool dialogs calls the tool for every question, general ones included (what an
    in-tool finetune that never saw a question without a call learns); the untrained one never does."""
    import sqlite3

    from lmlab.tools.sql import SqlTool

    db = tmp_path / "t.sqlite"
    with sqlite3.connect(db) as c:
        c.execute("CREATE TABLE people (name TEXT, city TEXT)")
        c.execute("INSERT INTO people VALUES ('Ada', 'Paris')")
    dtok = DialogTokenizer(ByteTokenizer())
    names = ["Ada", "Bo", "Cy", "Di", "Ed", "Flo"]
    dialogs = [[{"source": "user", "content": f"Where does {n} live?"},
                {"source": "assistant", "content": f"```sql\nSELECT city FROM people WHERE name = '{n}'\n```"},
                {"source": "database", "content": "Paris"},
                {"source": "assistant", "content": f"{n} lives in Paris."}] for n in names]
    model = tiny(0).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    enc = [dtok.encode_dialog(d) for d in dialogs]
    width = max(len(t) for t, _ in enc)
    toks = torch.tensor([t + [0] * (width - len(t)) for t, _ in enc])
    mask = torch.tensor([m + [0] * (width - len(m)) for _, m in enc], dtype=torch.bool)
    targets = torch.where(mask[:, 1:], toks[:, 1:], -100)
    for _ in range(150):
        loss = F.cross_entropy(model(toks[:, :-1]).flatten(0, 1), targets.flatten(), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    general = ["What is the capital of France?", "Write a haiku about the sea.", "How many legs does a spider have?"]
    rate, texts = tool_use(model, dtok, general, SqlTool(db), max_new_tokens=40)
    assert rate == {"general_tool_call_rate": 1.0}
    assert len(texts) == 3 and all("<|database|>" in t for t in texts), texts
    assert tool_use(tiny(0), dtok, general, SqlTool(db), max_new_tokens=40)[0] == {"general_tool_call_rate": 0.0}
