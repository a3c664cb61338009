"""The memory app's analysis on synthetic run folders: result rows, minimum parameters, the log-log fit,
and the report files (CSV, PNGs, HTML)."""

import csv
import json

import pytest
import yaml
from memory.analyze import (
    base_budget,
    capacity_fit,
    convergence,
    fit_loglog,
    main,
    make_report,
    min_params_for,
    results_rows,
)

from lmlab.analysis import load_runs
from lmlab.analysis.report import PNG_SIGNATURE

ATTRS, BITS_PER_FACT = 4, 10.0
SIZES = {16: 3200, 32: 12800}  # dim -> params; in-weight capacity is params / 8 facts


def make_dataset(root, people):
    d = root / "data" / f"p{people}"
    d.mkdir(parents=True)
    manifest = {"people": people, "facts": people * ATTRS, "bits_per_person": ATTRS * BITS_PER_FACT,
                "bits_per_fact": BITS_PER_FACT}
    if people == 400:  # the layout memory.build_data writes: counts nested, the data seed at the top
        manifest = {"seed": 3, "bits_per_person": ATTRS * BITS_PER_FACT, "bits_per_fact": BITS_PER_FACT,
                    "paraphrases": 2, "counts": {"people": people, "facts": people * ATTRS, "ood": 10,
                                                 "lines": {"weight_train.jsonl": people * ATTRS * 2}},
                    "build_args": {"practice": 64, "practice_style": "varied"}}
    (d / "manifest.json").write_text(json.dumps(manifest))
    return d


def recall_at(mode, params, facts, step, steps=50):
    final = 0.99 if mode == "tool" else min(1.0, (params / 8) / facts)
    return final * step / steps


def make_memory_runs(tmp_path, modes=("weight", "tool"), people=(100, 200, 400), scale=1.0):
    root = tmp_path / "runs"
    for p in people:
        make_dataset(tmp_path, p)
    for mode in modes:
        for p in people:
            for dim, params in SIZES.items():
                name = f"mem/mode={mode}_people={p}_dim={dim}"
                run = root / name
                run.mkdir(parents=True)
                cfg = {"name": name, "seed": 0, "model": {"dim": dim, "n_layers": 2}, "data": {"batch_size": 32},
                       "tags": {"mode": mode, "people": p, "data_dir": f"data/p{p}",
                                **({"data_seed": 7} if p != 400 else {})}}
                (run / "config.yaml").write_text(yaml.safe_dump(cfg))
                rows = []
                for step in range(10, 51, 10):
                    rows.append({"step": step, "loss": 1.0 / step})
                    rows.append({"step": step, **{f"recall/{s}/{k}": v for s in ("train", "ood") for k, v in {
                        "correct": scale * recall_at(mode, params, p * ATTRS, step) * (0.5 if s == "ood" else 1),
                        "tool_call_rate": 1.0 if mode == "tool" else 0.0,
                        "valid_sql_rate": 0.98 if mode == "tool" else 0.0, "n": 64}.items()}})
                (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
                (run / "summary.json").write_text(json.dumps({"status": "completed", "step": 50, "num_params": params,
                                                              "train_time_s": 12.5}))
    return root


def test_results_rows(tmp_path):
    root = make_memory_runs(tmp_path)
    (root / "other").mkdir()  # a non-memory run is ignored
    (root / "other" / "config.yaml").write_text(yaml.safe_dump({"name": "other", "tags": {}}))
    rows = results_rows(load_runs(root))
    assert len(rows) == 12
    by = {(r["mode"], r["people"], r["dim"]): r for r in rows}
    w = by[("weight", 200, 16)]  # 800 facts, capacity 400: recall 0.5
    assert w["facts"] == 800 and w["bits_per_fact"] == BITS_PER_FACT and w["params"] == 3200
    assert w["recall_train_final"] == pytest.approx(0.5) and w["recall_train_best"] == pytest.approx(0.5)
    assert w["step_recall_95"] is None and w["recall_ood_final"] == pytest.approx(0.25)
    assert w["seed"] == 0 and w["data_seed"] == 7 and w["n_layers"] == 2 and w["steps"] == 50
    assert w["status"] == "completed" and w["train_time_s"] == 12.5 and w["tool_call_rate_train"] == 0.0
    t = by[("tool", 400, 16)]
    assert t["facts"] == 1600 and t["data_seed"] == 3  # from a nested manifest; no tags.data_seed
    assert t["practice"] == 64 and t["practice_style"] == "varied"  # as the dataset was built
    assert w["practice"] is None and w["smear_queries"] is False
    assert t["recall_train_final"] == pytest.approx(0.99) and t["step_recall_95"] == 50
    assert t["tool_call_rate_ood"] == 1.0 and t["valid_sql_rate_train"] == 0.98
    assert by[("weight", 100, 32)]["step_recall_95"] == 50  # recall 1.0 reached only at the last row
    # exposures per fact (in-weight, where the manifest says how many dialogs teach each fact): 50 steps x 32
    # dialogs over 1,600 facts; bits per parameter: best recall x facts x bits per fact / params
    w400 = by[("weight", 400, 32)]
    assert w400["exposures_final"] == pytest.approx(50 * 32 / 1600) == w400["exposures_95"]  # reached at step 50
    assert w400["bits_per_param"] == pytest.approx(1.0 * 1600 * BITS_PER_FACT / 12800)
    assert by[("weight", 100, 32)]["exposures_95"] is None  # no paraphrase count in that manifest: unknown
    assert t["exposures_final"] is None and t["bits_per_param"] is None  # in-tool: no fact is in the weights
    assert w["batch_size"] == 32 and w["smear_keys"] == 0


def test_min_params_means_over_seeds():
    rows = [
        # facts 400: the small model reaches 0.95 with one seed only (mean 0.935): the large one counts
        {"mode": "weight", "facts": 400, "params": 100, "recall_train_best": 0.97, "bits_per_fact": 10.0},
        {"mode": "weight", "facts": 400, "params": 100, "recall_train_best": 0.90, "bits_per_fact": 10.0},
        {"mode": "weight", "facts": 400, "params": 300, "recall_train_best": 0.96, "bits_per_fact": 10.0},
        {"mode": "weight", "facts": 400, "params": 900, "recall_train_best": 1.0, "bits_per_fact": 10.0},
        # facts 800: nothing reaches it
        {"mode": "weight", "facts": 800, "params": 900, "recall_train_best": 0.5, "bits_per_fact": 10.0},
        {"mode": "tool", "facts": 800, "params": 100, "recall_train_best": 0.99, "bits_per_fact": 10.0},
        {"mode": "tool", "facts": 800, "params": 50, "recall_train_best": None},  # no recall logged: ignored
    ]
    got = min_params_for(rows)
    assert [(r["mode"], r["facts"], r["params"], r["seeds"]) for r in got] == [("weight", 400, 300, 1),
                                                                             ("tool", 800, 100, 1)]
    assert [r["params"] for r in min_params_for(rows, threshold=0.9)][0] == 100  # mean 0.935 >= 0.9
    # alpha (compressible facts) is a group of its own, and the capacity fit uses alpha 0 only
    dep = [{"mode": "weight", "facts": 400, "alpha": 0.8, "params": 100, "recall_train_best": 0.99,
            "bits_per_fact": 2.4}]
    got = min_params_for(rows + dep)
    assert [(r["facts"], r["alpha"], r["params"]) for r in got if r["mode"] == "weight"] == [(400, 0.0, 300),
                                                                                         (400, 0.8, 100)]
    assert capacity_fit(got)["params_per_fact"] == 300 / 400


def test_alpha_runs_get_their_own_minimum_and_figure(tmp_path):
    root = tmp_path / "runs"
    for alpha, bits, cap in ((0.0, 8.0, 1.0), (0.8, 2.0, 4.0)):  # compressible facts: 4x the facts per parameter
        d = tmp_path / "data" / f"a{alpha}"
        d.mkdir(parents=True)
        (d / "manifest.json").write_text(json.dumps({"alpha": alpha, "bits_per_fact": bits, "paraphrases": 1,
                                                     "counts": {"people": 100, "facts": 400,
                                                                "lines": {"weight_train.jsonl": 400}}}))
        for dim, params in SIZES.items():
            run = root / f"alpha{alpha}_dim{dim}"
            run.mkdir(parents=True)
            cfg = {"name": run.name, "seed": 0, "model": {"dim": dim, "n_layers": 2}, "data": {"batch_size": 8},
                   "tags": {"mode": "weight", "people": 100, "data_dir": f"data/a{alpha}"}}
            (run / "config.yaml").write_text(yaml.safe_dump(cfg))
            recall = min(1.0, cap * params / 8 / 400 / 4)  # alpha 0: only the large size; alpha 0.8: both
            (run / "metrics.jsonl").write_text(json.dumps({"step": 50, "recall/train/correct": recall}) + "\n")
            (run / "summary.json").write_text(json.dumps({"status": "completed", "step": 50, "num_params": params}))
    summary = make_report(root, tmp_path / "out")
    mins = [(r["alpha"], r["params"]) for r in summary["min_params"]]
    assert mins == [(0.0, 12800), (0.8, 3200)]
    assert {r["alpha"] for r in summary["rows"]} == {0.0, 0.8}
    assert (tmp_path / "out" / "params_vs_alpha.png").read_bytes().startswith(PNG_SIGNATURE)
    assert "Compressibility (alpha)" in (tmp_path / "out" / "report.html").read_text()


def test_loglog_fit_and_capacity():
    facts = [100, 400, 1600, 6400]
    slope, intercept = fit_loglog(facts, [8 * f for f in facts])
    assert slope == pytest.approx(1.0) and 10 ** intercept == pytest.approx(8.0)
    slope, _ = fit_loglog(facts, [3 * f ** 0.5 for f in facts])
    assert slope == pytest.approx(0.5)
    with pytest.raises(ValueError):
        fit_loglog([100, 100], [1, 2])
    mins = [{"mode": "weight", "facts": f, "params": 8 * f, "bits_per_fact": 10.0} for f in facts]
    fit = capacity_fit(mins + [{"mode": "tool", "facts": 100, "params": 5, "bits_per_fact": 10.0}])
    assert fit["slope"] == pytest.approx(1.0) and fit["params_per_fact"] == 8
    assert fit["bits_per_param"] == pytest.approx(10.0 / 8) and fit["points"] == 4
    assert fit["params_per_added_fact"] == pytest.approx(8.0) and fit["largest_facts"] == 6400
    assert fit["params_per_fact_largest"] == 8 and fit["bits_per_param_largest"] == pytest.approx(10.0 / 8)
    # an intercept (embeddings) makes the params per fact fall with facts, while the added cost stays 8
    shifted = capacity_fit([{**m, "params": 8 * m["facts"] + 5000} for m in mins])
    assert shifted["params_per_added_fact"] == pytest.approx(8.0)
    assert shifted["params_per_fact_largest"] == pytest.approx(8 + 5000 / 6400)
    one = capacity_fit(mins[:1])
    assert one["slope"] is None and one["params_per_fact"] == 8
    assert capacity_fit([], "tool")["params_per_fact"] is None


def test_make_report_writes_everything(tmp_path, capsys):
    root = make_memory_runs(tmp_path)
    out = tmp_path / "out"
    summary = make_report(root, out)
    assert summary["runs"] == 12 and summary["modes"] == {"weight": 6, "tool": 6}
    # in-weight: 400 facts -> small (3200); 800 and 1600 facts -> large (12800); in-tool: small everywhere
    mins = [(r["mode"], r["facts"], r["params"]) for r in summary["min_params"]]
    assert mins == [("weight", 400, 3200), ("weight", 800, 12800), ("weight", 1600, 12800),
                    ("tool", 400, 3200), ("tool", 800, 3200), ("tool", 1600, 3200)]
    fit = summary["fit"]["weight"]
    assert fit["slope"] == pytest.approx(fit_loglog([400, 800, 1600], [3200, 12800, 12800])[0])
    assert fit["params_per_fact"] == 8  # median of 3200/400, 12800/800, 12800/1600
    assert fit["bits_per_param"] == pytest.approx(1.25)  # median of facts * 10 bits / params
    with (out / "results.csv").open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == 12 and {r["mode"] for r in table} == {"weight", "tool"}
    assert table[0]["name"].startswith("mem/") and "recall_train_best" in table[0]
    for png in ("recall_vs_facts", "min_params_vs_facts", "recall_vs_step", "ood_recall", "bits_vs_exposures",
                "capacity"):
        data = (out / f"{png}.png").read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 1000
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 6 and "mem/mode=tool_people=400_dim=16" in html
    assert "Knowledge capacity (Physics of LMs 3.3)" in html
    assert "facts^" in html and "params per added fact" in html

    assert main([str(root), "--out", str(tmp_path / "cli")]) == 0
    text = capsys.readouterr().out
    assert text.splitlines()[0].split()[:3] == ["name", "mode", "facts"] and "in-weight: min params ~ facts^" in text
    assert (tmp_path / "cli" / "report.html").is_file()


def test_report_without_any_run_reaching_the_threshold(tmp_path):
    root = make_memory_runs(tmp_path, scale=0.5)  # recall at most 0.5: nothing reaches 95%
    summary = make_report(root, tmp_path / "out")
    assert summary["min_params"] == [] and summary["fit"]["weight"]["slope"] is None
    assert any("no model size reaches 95%" in n for n in summary["notes"])
    assert "no model size reaches 95%" in (tmp_path / "out" / "report.html").read_text()
    empty = make_report(tmp_path / "nothing", tmp_path / "out2")  # no runs at all
    assert empty["runs"] == 0 and (tmp_path / "out2" / "report.html").is_file()
    assert (tmp_path / "out2" / "min_params_vs_facts.png").read_bytes().startswith(PNG_SIGNATURE)


def test_script_runs_from_another_folder(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "apps" / "memory" / "analyze.py"
    root = make_memory_runs(tmp_path, modes=("tool",), people=(100,))
    res = subprocess.run([sys.executable, str(script), str(root)], cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "mem/mode=tool_people=100_dim=16" in res.stdout and (root / "report" / "report.html").is_file()


def test_capacity_compares_sizes_under_one_budget_and_reports_convergence():
    def row(facts, params, recall, budget):
        return {"mode": "weight", "facts": facts, "params": params, "recall_train_best": recall,
                "bits_per_fact": 8.0, "budget_exposures": budget}
    rows = [row(320, 42_000, 0.96, 1200), row(320, 34_000, 0.92, 1200), row(320, 26_000, 0.83, 1200),
            row(640, 80_000, 0.96, 1200.4), row(640, 61_000, 0.90, 1200),
            # twice the budget at 320 facts: a smaller size now reaches it, one still does not
            row(320, 26_000, 0.97, 2400), row(320, 20_000, 0.5, 2400)]
    assert base_budget(rows) == 1200  # two numbers of facts at 1,200, one at 2,400
    at_base = min_params_for(rows, budget=1200)
    assert [(r["facts"], r["params"]) for r in at_base] == [(320, 42_000), (640, 80_000)]
    assert [(r["facts"], r["params"]) for r in min_params_for(rows)] == [(320, 26_000), (640, 80_000)]
    conv = convergence(rows)
    assert [(c["facts"], c["budget_exposures"], c["min_params"], c["sizes_tried"]) for c in conv] == [
        (320, 1200, 42_000, 3), (320, 2400, 26_000, 2)]
    assert conv[0]["ratio_to_base"] == 1.0 and abs(conv[1]["ratio_to_base"] - 42 / 26) < 1e-9
    # a budget at which nothing reaches the threshold: no minimum, no ratio
    conv = convergence(rows[:5] + [row(320, 20_000, 0.5, 2400)])
    assert conv[1]["min_params"] is None and conv[1]["ratio_to_base"] is None
    assert base_budget([]) is None


def test_capacity_figure_in_the_report_and_svg_figures(tmp_path, monkeypatch):
    """The capacity figure gets the runs that the smallest-size curve compares (in-weight at the base budget, every
    in-tool run), with best train recall; ``fmt="svg"`` writes every figure as SVG and embeds them."""
    import memory.analyze as analyze

    from lmlab.analysis.report import image_mime

    seen = {}
    real = analyze.plot_capacity

    def spy(rows, path, **kw):
        seen["rows"] = rows
        seen["result"] = real(rows, path, **kw)
        return seen["result"]

    monkeypatch.setattr(analyze, "plot_capacity", spy)
    root = make_memory_runs(tmp_path)
    summary = analyze.make_report(root, tmp_path / "out", fmt="svg")
    rows = seen["rows"]
    assert len(rows) == 12 and all(r["recall"] == r["recall_train_best"] for r in rows)
    # in-weight recall min(1, params / 8 / facts) over facts 400/800/1600 and 3,200 / 12,800 params: contours
    assert seen["result"]["points"] == {"weight": 6, "tool": 6}
    assert seen["result"]["contours"]["weight"] == [0.5, 0.9, 0.95]
    # in-weight stores at most 1.0 x 1600 facts x 10 bits / 12,800 params = 1.25 bits per parameter
    assert seen["result"]["max_bits_per_param"] == pytest.approx(1.25)
    svgs = sorted(p.name for p in (tmp_path / "out").glob("*.svg"))
    assert svgs == ["bits_vs_exposures.svg", "capacity.svg", "min_params_vs_facts.svg", "ood_recall.svg",
                    "recall_vs_facts.svg", "recall_vs_step.svg"]
    assert all(image_mime((tmp_path / "out" / n).read_bytes()) == "image/svg+xml" for n in svgs)
    html = (tmp_path / "out" / "report.html").read_text()
    assert html.count("data:image/svg+xml;base64,") == 6 and "data:image/png" not in html
    assert summary["files"]["capacity"].endswith("capacity.svg")
    with pytest.raises(ValueError, match="fmt must be png or svg"):
        analyze.make_report(root, tmp_path / "x", fmt="gif")


def test_smear_weights_reads_each_layers_previous_key_weight_from_the_checkpoint(tmp_path, capsys):
    """apps/memory/smear_weights.py: per layer, the largest weight a head gives the previous token's key, read from
    the run's checkpoint (None for a layer without smeared keys), and the recall its metrics logged last."""
    import torch
    from memory.smear_weights import main as smear_weights

    from lmlab.config import load_config
    from lmlab.train import Trainer

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"dialog": [{"source": "user", "content": f"q{i}"},
                                                   {"source": "assistant", "content": f"a{i}"}]}) + "\n"
                            for i in range(64)))
    cfg = load_config(None, [f"runs_dir={tmp_path}", "name=r", "tokenizer.kind=byte", "data.kind=dialog",
                             f"data.train_files=[{data}]", "data.val_fraction=0", "data.seq_len=32",
                             "data.batch_size=4", "model.dim=32", "model.n_layers=2", "model.n_heads=2",
                             "model.max_seq_len=64", "model.smear_keys=2", "model.smear_layers=[-1]",
                             "train.steps=3", "logging.progress=false"])
    trainer = Trainer(cfg)
    trainer.fit()
    want = torch.softmax(trainer.model.layers[1].attention.smear.keys.detach(), -1)[:, 1].max().item()
    with open(cfg.run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 3, "recall/novel/correct": 0.5}) + "\n")
    (row,) = smear_weights([str(cfg.run_dir), "--csv", str(tmp_path / "w.csv"), "--heads"])
    assert row["prev_key_max_layer0"] is None and row["prev_key_max_layer1"] == round(want, 3)
    assert row["recall_novel"] == 0.5
    assert "layer 1 head 1:" in capsys.readouterr().out
    assert (tmp_path / "w.csv").read_text().splitlines()[0].startswith("run,prev_key_max_layer0,prev_key_max_layer1")
