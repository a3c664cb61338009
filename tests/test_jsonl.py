"""JSONL reading shared by dialogs, prompt files and metrics: line numbers, odd separators, re-done steps."""

import json

import pytest

from lmlab.inference.sampling import read_prompts
from lmlab.jsonl import iter_jsonl
from lmlab.monitor.metrics import read_metrics


def test_iter_jsonl_lines_end_at_newline_only(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text(json.dumps({"t": "one\u2028two\u0085three"}, ensure_ascii=False) + "\n\n" + "[1, 2]\n")
    assert list(iter_jsonl(p)) == [(1, {"t": "one\u2028two\u0085three"}), (3, [1, 2])]
    p.write_text('{"ok": 1}\n{"broken": \n')
    with pytest.raises(ValueError, match=r"a\.jsonl:2: malformed JSON"):
        list(iter_jsonl(p))


def test_read_prompts_jsonl_keeps_unicode_separators(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text(json.dumps("line\u2028still the same prompt", ensure_ascii=False) + "\n" +
                 json.dumps({"prompt": "multi\nline"}) + "\n")
    assert read_prompts(p) == ["line\u2028still the same prompt", "multi\nline"]
    p.write_text('{"prompt": 3}\n')
    with pytest.raises(ValueError, match=r"p\.jsonl:1"):
        read_prompts(p)


def test_read_metrics_keeps_the_last_run_of_re_done_steps(tmp_path):
    p = tmp_path / "metrics.jsonl"
    rows = [{"step": 10, "loss": 3.0}, {"step": 20, "loss": 2.0}, {"step": 20, "val_loss": 2.5},
            {"step": 30, "loss": 1.9},                       # crash after step 30, resume from the step-20 checkpoint
            {"step": 30, "loss": 1.8}, {"step": 40, "loss": 1.5}, {"step": 40, "val_loss": 1.7}]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert read_metrics(p) == [{"step": 10, "loss": 3.0}, {"step": 20, "loss": 2.0}, {"step": 20, "val_loss": 2.5},
                               {"step": 30, "loss": 1.8}, {"step": 40, "loss": 1.5}, {"step": 40, "val_loss": 1.7}]
