"""apps/memory/finetune.py end to end on a tiny pretrained model made here: import, finetunes from it in both modes,
recall with the tool live, retention against the base, the report; a rerun reuses every cached measurement; the
same grid submitted to a real one-node Slurm cluster."""

import csv
import json
import sys
from pathlib import Path

import pytest
import yaml
from slurm_cluster import slurm_cluster_fixture  # noqa: F401  (the fixture "slurm_cluster")

ROOT = Path(__file__).resolve().parent.parent


def tiny_grid(tmp_path):
    """A tiny pretrained model imported into a run folder, and smollm.yaml's grid aimed at it (2 people, both modes,
    2 steps): ``(finetune module, grid path, overrides)``."""
    from test_pretrained import make_hf_folder

    from lmlab.pretrained import import_pretrained

    sys.path.insert(0, str(ROOT / "apps"))
    from memory import finetune

    folder, _, _ = make_hf_folder(tmp_path / "hf", shard=False, max_position_embeddings=512)
    base = import_pretrained(folder, tmp_path / "runs" / "base")
    grid = yaml.safe_load((ROOT / "apps" / "memory" / "smollm.yaml").read_text())
    grid["grid"] = {"tags.mode": ["weight", "tool"]}
    grid["model"] = {k: v for k, v in yaml.safe_load((base / "config.yaml").read_text())["model"].items()
                     if k in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "norm_eps",
                              "rope_theta", "max_seq_len", "tie_embeddings")}
    grid["tags"].update(base=str(base), people=2, ood=2)
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    over = [f"runs_dir={tmp_path / 'runs'}", "train.steps=2", "train.ckpt_every=2", "evals.recall.max_questions=4",
            "evals.recall.max_new_tokens=24", "optim.warmup_steps=1"]
    return finetune, path, over


def test_finetune_app_end_to_end(tmp_path, capsys):
    finetune, path, over = tiny_grid(tmp_path)
    assert finetune.main(["--grid", str(path), "--threads", "1", *over]) == 0
    report = tmp_path / "runs" / "memory" / "smollm" / "report"
    rows = list(csv.DictReader(open(report / "results.csv")))
    assert sorted(r["mode"] for r in rows) == ["tool", "weight"] and {r["facts"] for r in rows} == {"10"}
    for r in rows:
        assert float(r["kl"]) > 0 and float(r["bpb_base"]) > 0 and 0 < float(r["bpb_rel"]) < 2
        assert 0 <= float(r["mc/acc_norm"]) <= 1 and r["mc/n"] == "60" and r["recall/train/n"] == "4"
        assert 0 <= float(r["general_tool_call_rate"]) <= 1 and float(r["kl_first"]) >= 0
        assert float(r["kl"]) == pytest.approx((float(r["kl_first"]) * 48 + float(r["kl_rest"])
                                                * (int(r["kl_tokens"]) - 48)) / int(r["kl_tokens"]), rel=1e-6)
    assert (report / "retention.png").stat().st_size > 0
    ref = json.loads((report / "base_retention.json").read_text())
    assert len(ref["answers"]) == 48 and set(ref["scores"]) == {"bpb", "mc/acc", "mc/acc_norm"}
    cached = {p: p.stat().st_mtime_ns for p in [report / "base_retention.json",
                                                *report.parent.glob("*/retention.json")]}
    assert len(cached) == 3
    assert finetune.main(["--grid", str(path), "--report-only", *over]) == 0
    assert {p: p.stat().st_mtime_ns for p in cached} == cached  # nothing measured twice
    assert "2 of 2 runs have results" in capsys.readouterr().out


def test_replay_adds_the_file_to_every_run_and_refuses_a_base_whose_answers_never_end(tmp_path):
    """--replay puts tags.replay among each run's training files (once); the file holds the base's own answers
    that ended within the token budget (a budget none ends within gets a clear refusal, no empty file)."""
    from lmlab.config import ConfigError, load_grid

    finetune, path, over = tiny_grid(tmp_path)
    configs = load_grid(path, over)
    finetune.add_replay(configs)
    finetune.add_replay(configs)
    replay = str(configs[0].tags["replay"])
    assert replay.endswith("replay_smollm2.jsonl")
    assert all([str(f) for f in c.data.train_files][-1:] == [replay] and len(c.data.train_files) == 2
               for c in configs)
    base, prompts = Path(str(configs[0].tags["base"])), ROOT / "apps" / "memory" / "replay_prompts.jsonl"
    out = tmp_path / "replay.jsonl"
    with pytest.raises(ConfigError, match="answers ended within 1 tokens"):  # one token: an empty answer at best
        finetune.ensure_replay(base, out, prompts, max_new_tokens=1)
    assert not out.exists()
    assert "answers complete" in finetune.ensure_replay(base, out, prompts, max_new_tokens=12)
    lines = [json.loads(line)["dialog"] for line in out.read_text().splitlines()]
    asked = [d[0]["content"] for d in finetune.load_prompts(prompts)]
    assert 0 < len(lines) < len(asked) and json.loads(out.with_suffix(".json").read_text())["dialogs"] == len(lines)
    for d in lines:  # the base's chat template's system message, a replay question, the base's answer
        assert [t["source"] for t in d[-2:]] == ["user", "assistant"] and d[-2]["content"] in asked
        assert d[-1]["content"] and all(t["source"] == "system" for t in d[:-2])
    assert finetune.ensure_replay(base, out, prompts, max_new_tokens=12) == "reused"


def test_distill_learns_the_bases_distributions_on_the_replay_dialogs(tmp_path, capsys):
    """--replay --distill: the replay file is also each run's data.distill_files (the base, train.init_from, is the
    teacher); both runs train and are measured; --distill alone is refused."""
    finetune, path, over = tiny_grid(tmp_path)
    with pytest.raises(SystemExit):
        finetune.main(["--grid", str(path), "--distill", *over])
    assert "--distill distils on the replay dialogs: add --replay" in capsys.readouterr().err
    over = [*over, "name=memory/distill", f"tags.replay={tmp_path / 'replay.jsonl'}", "data.seq_len=512"]
    assert finetune.main(["--grid", str(path), "--replay", "--distill", "--threads", "1", *over]) == 0
    runs = sorted((tmp_path / "runs" / "memory" / "distill").glob("mode=*"))
    assert len(runs) == 2
    for run in runs:
        saved = yaml.safe_load((run / "config.yaml").read_text())
        assert saved["data"]["distill_files"] == [str(tmp_path / "replay.jsonl")]
        assert saved["data"]["train_files"][-1] == str(tmp_path / "replay.jsonl")
        assert "train.distill: teacher run" in (run / "train.log").read_text()
    assert "2 of 2 runs have results" in capsys.readouterr().out


def test_distill_preset_trains_each_run_on_its_facts_and_the_distilled_replay():
    from lmlab.config import load_grid

    configs = load_grid(ROOT / "apps" / "memory" / "smollm_distill.yaml")
    assert len(configs) == 6 and {int(c.tags["people"]) for c in configs} == {10, 20, 40}
    for c in configs:
        replay = str(c.tags["replay"])
        assert [str(f) for f in c.data.train_files] == [f"{c.tags['data_dir']}/{c.tags['mode']}_train.jsonl", replay]
        assert c.data.distill_files == [replay] and c.train.init_from and not c.train.distill.teacher
        assert c.optim.lr == {"tool": 3e-5, "weight": 1e-4}[c.tags["mode"]]


def test_finetune_app_submits_to_slurm(slurm_cluster, tmp_path, capsys):
    """--slurm: the base and the datasets are made here, the two runs train as one array job on the cluster, and
    --report-only then measures and reports them."""
    from test_slurm import summary, wait_for

    finetune, path, over = tiny_grid(tmp_path)
    with slurm_cluster.environ():
        assert finetune.main(["--grid", str(path), "--slurm", *over, "train.threads=1"]) == 0
    runs = sorted((tmp_path / "runs" / "memory" / "smollm").glob("mode=*"))
    assert [r.name for r in runs] == ["mode=tool", "mode=weight"]
    wait_for(lambda: all(summary(r).get("status") == "completed" for r in runs), 300, "completed runs", slurm_cluster)
    assert finetune.main(["--grid", str(path), "--report-only", *over]) == 0
    assert "2 of 2 runs have results" in capsys.readouterr().out
