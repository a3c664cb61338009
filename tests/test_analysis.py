"""Run analysis: loading run folders (nested grids), metric helpers, CSV, the runs table, plots (lines, `lmlab plot`,
the capacity figure; PNG and SVG) and the HTML report."""

import base64
import csv
import json
import math
import re
import statistics

import pytest
import yaml

from lmlab.analysis import RunRecord, load_runs, plot_lines, write_csv, write_html_report
from lmlab.analysis.report import PNG_SIGNATURE, Section


def make_run(folder, config, metrics=(), summary=None):
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    if metrics:
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics))
    if summary is not None:
        (folder / "summary.json").write_text(json.dumps(summary))
    return folder


@pytest.fixture
def runs_root(tmp_path):
    root = tmp_path / "runs"
    for dim in (32, 64):
        rows = [{"step": s, "loss": 4.0 / s * 32 / dim, "acc": min(1.0, s * dim / 640)} for s in range(1, 11)]
        rows.insert(5, {"step": 5, "val_loss": 9.0 / dim})
        make_run(root / "grid" / f"dim={dim}", {"name": f"grid/dim={dim}", "model": {"dim": dim, "n_layers": 2},
                                                "tags": {"mode": "tool"}},
                 rows, {"status": "completed", "step": 10, "num_params": dim * 100})
    make_run(root / "lonely", {"name": "lonely", "model": {"dim": 16}})  # no metrics, no summary yet
    # a checkpoint folder's config is not a run
    make_run(root / "lonely" / "checkpoints" / "step_5", {"name": "not a run"})
    return root


def test_load_runs_nested_and_helpers(runs_root):
    runs = load_runs(runs_root)
    assert [r.name for r in runs] == ["grid/dim=32", "grid/dim=64", "lonely"]
    a, b, lonely = runs
    assert isinstance(a, RunRecord) and a.path == runs_root / "grid" / "dim=32"
    assert a.flat_config["model.dim"] == 32 and a.flat_config["tags.mode"] == "tool" and a.get("model.n_layers") == 2
    assert a.summary["num_params"] == 3200 and lonely.summary == {} and lonely.metrics == []
    steps, losses = a.series("loss")
    assert steps == list(range(1, 11)) and losses[0] == 4.0 and losses[-1] == pytest.approx(0.4)
    assert a.series("val_loss") == ([5], [9.0 / 32])
    assert a.final("loss") == pytest.approx(0.4) and a.best("loss", mode="min") == pytest.approx(0.4)
    assert a.best("loss") == 4.0 and a.final("nope") is None and a.best("nope") is None
    # acc = s*dim/640: dim 32 reaches 0.5 at step 10, dim 64 at step 5; 0.99 only dim 64 (step 10)
    assert a.first_step_reaching("acc", 0.5) == 10 and b.first_step_reaching("acc", 0.5) == 5
    assert a.first_step_reaching("acc", 0.99) is None and b.first_step_reaching("acc", 0.99) == 10
    assert a.first_step_reaching("loss", 1.0, mode="min") == 4
    with pytest.raises(ValueError):
        a.best("loss", mode="median")
    # globs and a sub-root give the same runs, named relative to their root
    assert [r.name for r in load_runs(str(runs_root / "gr*"))] == ["dim=32", "dim=64"]
    assert [r.name for r in load_runs([runs_root / "grid", runs_root / "grid" / "dim=32"])] == ["dim=32", "dim=64"]
    assert load_runs(runs_root / "missing") == []


def test_write_csv_stable_columns(tmp_path):
    rows = [{"name": "a", "x": 1.5, "y": None}, {"name": "b", "z": "q,uote\"d", "x": 2}]
    p = write_csv(rows, tmp_path / "out" / "t.csv")
    with p.open() as f:
        got = list(csv.reader(f))
    assert got == [["name", "x", "y", "z"], ["a", "1.5", "", ""], ["b", "2", "", 'q,uote"d']]
    write_csv(rows, p, columns=["x", "name"])
    assert p.read_text().splitlines() == ["x,name", "1.5,a", "2,b"]


def test_plots_and_html_report(tmp_path, runs_root):
    runs = load_runs(runs_root)
    png = plot_lines({r.name: r.series("loss") for r in runs}, tmp_path / "loss.png", "step", "loss", "Loss",
                     logx=True, logy=True)
    empty = plot_lines({"nothing": ([], [])}, tmp_path / "empty.png", "x", "y", "Empty")
    for p in (png, empty):
        assert p.read_bytes().startswith(PNG_SIGNATURE) and p.stat().st_size > 1000
    table = [{"run": r.name, "final_loss": r.final("loss"), "params": r.summary.get("num_params")} for r in runs]
    out = write_html_report(tmp_path / "rep" / "report.html", "Grid <results> & more", [
        Section("Losses", text="a < b & c", table=table, images=[png]),
        {"heading": "Nothing drawn", "image": empty},
    ])
    text = out.read_text()
    assert "<title>Grid &lt;results&gt; &amp; more</title>" in text
    assert "a &lt; b &amp; c" in text and "a < b & c" not in text
    assert "<td>grid/dim=32</td>" in text and "<td>0.4</td>" in text and "<td>6400</td>" in text
    imgs = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(imgs) == 2 and base64.b64decode(imgs[0]) == png.read_bytes()
    bad = tmp_path / "bad.png"
    bad.write_text("not a png")
    with pytest.raises(ValueError, match="not a PNG"):
        write_html_report(tmp_path / "x.html", "x", [Section("s", images=[bad])])


def test_importing_lmlab_analysis_does_not_import_matplotlib():
    import subprocess
    import sys

    code = "import sys, lmlab.analysis; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# --- reading metrics back: resumes, rows of several kinds at one step, bad lines --------------------------------

def test_read_metrics_resume_and_same_step_kinds(tmp_path, caplog):
    from lmlab.monitor.metrics import read_metrics

    lines = [
        {"step": 100, "loss": 3.0}, {"step": 100, "recall/train/correct": 0.1},  # two kinds at one step: both kept
        {"step": 200, "loss": 2.0}, {"step": 300, "loss": 1.5}, {"step": 300, "val_loss": 1.9},
        {"step": 200, "loss": 2.1},  # resumed from step 100: the old 200 and 300 rows (loss and val) are re-done
        {"step": 300, "loss": 1.4},
        {"step": 300, "recall/train/correct": 0.5}, {"step": 300, "recall/train/correct": 0.6},  # logged twice
    ]
    p = tmp_path / "metrics.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in lines) + "\n")
    rows = read_metrics(p)
    assert [(r["step"], sorted(k for k in r if k != "step")) for r in rows] == [
        (100, ["loss"]), (100, ["recall/train/correct"]), (200, ["loss"]), (300, ["loss"]),
        (300, ["recall/train/correct"])]
    assert rows[2]["loss"] == 2.1 and rows[3]["loss"] == 1.4 and rows[4]["recall/train/correct"] == 0.6
    # a line cut short by a crash is skipped with a warning; the rest of the run stays
    p.write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n{\"step\": 2, \"lo\n" + json.dumps({"step": 3, "loss": 0.5}))
    with caplog.at_level("WARNING"):
        rows = read_metrics(p)
    assert [r["step"] for r in rows] == [1, 3] and "metrics.jsonl:2: malformed JSON" in caplog.text


def test_final_loss_keeps_the_training_row_of_an_evaluation_step(tmp_path):
    # the trainer logs the loss at step 500, then the recall evaluation of step 500: neither replaces the other
    run = make_run(tmp_path / "r", {"name": "r"}, [{"step": 400, "loss": 2.0}, {"step": 500, "loss": 1.0},
                                                   {"step": 500, "recall/train/correct": 0.9}])
    (r,) = load_runs(run)
    assert r.final("loss") == 1.0 and r.series("loss") == ([400, 500], [2.0, 1.0])


def test_load_runs_follows_links_without_looping(tmp_path):
    make_run(tmp_path / "store" / "a", {"name": "a"}, [{"step": 1, "loss": 1.0}])
    pick = tmp_path / "pick"
    pick.mkdir()
    (pick / "linked_a").symlink_to(tmp_path / "store" / "a", target_is_directory=True)
    (pick / "loop").symlink_to(pick, target_is_directory=True)  # a link back up the tree
    runs = load_runs(pick)
    assert [r.name for r in runs] == ["linked_a"] and runs[0].final("loss") == 1.0


def test_yaml_goes_through_libyaml_when_available():
    from lmlab.analysis import runs as runs_mod

    if getattr(yaml, "CSafeLoader", None) is None:
        pytest.skip("PyYAML built without libyaml")
    assert runs_mod._YAML_LOADER is yaml.CSafeLoader
    text = "a: 1\nb: [x, 2.5]\nc: {d: null, e: 'on'}\nf: 1e-3\n"
    assert runs_mod._load_yaml(text) == yaml.safe_load(text)


# --- runs_table --------------------------------------------------------------------------------------------------

def test_best_mode_rule():
    from lmlab.analysis import best_mode

    lower = ("loss", "val_loss", "bpb", "val_ppl", "recall/train/miss/wrong_value")
    assert [best_mode(m) for m in lower] == ["min"] * 5
    assert [best_mode(m) for m in ("acc", "recall/train/correct", "val_accuracy", "exact_match", "f1")] == ["max"] * 5
    assert [best_mode(m) for m in ("lr", "grad_norm", "tokens_per_s", "loss_tokens_per_s", "peak_mem_mb",
                                   "recall/train/n", "time", "tokens", "recall/train/tool_call_rate")] == [None] * 9


def test_runs_table_columns_and_values(runs_root):
    import pandas as pd

    from lmlab.analysis import runs_table

    df = runs_table(runs_root)
    assert list(df["name"]) == ["grid/dim=32", "grid/dim=64", "lonely"]
    assert list(df.columns[:3]) == ["name", "path", "steps"]
    a = df.set_index("name").loc["grid/dim=32"]
    assert a["model.dim"] == 32 and a["model.n_layers"] == 2 and a["tags.mode"] == "tool" and a["steps"] == 10
    assert a["summary.num_params"] == 3200 and a["summary.status"] == "completed"
    assert a["config.name"] == "grid/dim=32" and df.set_index("name").loc["lonely", "config.name"] == "lonely"
    assert a["final.loss"] == pytest.approx(0.4) and a["best.loss"] == pytest.approx(0.4)  # min for losses
    assert a["final.val_loss"] == pytest.approx(9 / 32) and a["best.val_loss"] == pytest.approx(9 / 32)
    assert a["final.acc"] == pytest.approx(0.5) and a["best.acc"] == pytest.approx(0.5)
    b = df.set_index("name").loc["grid/dim=64"]
    assert b["best.acc"] == 1.0 and b["final.acc"] == 1.0  # acc = min(1, s*64/640): max for accuracies
    lonely = df.set_index("name").loc["lonely"]
    assert lonely["model.dim"] == 16 and lonely["steps"] is pd.NA and math.isnan(lonely["final.loss"])
    assert str(df["steps"].dtype) == "Int64"
    # column groups in a fixed order: config, then summary.*, final.*, best.*
    cols = list(df.columns)
    firsts = [next(i for i, c in enumerate(cols) if c.startswith(p)) for p in ("summary.", "final.", "best.")]
    lasts = [max(i for i, c in enumerate(cols) if c.startswith(p)) for p in ("summary.", "final.", "best.")]
    assert cols.index("model.dim") < firsts[0] and lasts[0] < firsts[1] and lasts[1] < firsts[2]
    assert not any(c.startswith("best.") and c[5:] in ("lr",) for c in cols)
    # grouping works on any column, lists included (kept as tuples)
    assert df.groupby("model.dim")["final.loss"].mean().loc[64] == pytest.approx(0.2)


def test_runs_table_lists_and_records_and_curves(tmp_path):
    from lmlab.analysis import curves_table, runs_table

    make_run(tmp_path / "a", {"data": {"files": ["x", "y"]}, "seed": 1},
             [{"step": 1, "loss": 2.0, "lr": 0.1}, {"step": 2, "loss": 1.0, "lr": 0.05, "bad": float("nan")}],
             {"num_params": 10})
    make_run(tmp_path / "b", {"data": {"files": ["z"]}, "seed": 2}, [{"step": 5, "loss": 3.0, "acc": 0.5}])
    runs = load_runs(tmp_path)
    df, curves = runs_table(runs, curves=True)
    assert df["data.files"].tolist() == [("x", "y"), ("z",)] and df.groupby("data.files").ngroups == 2
    assert "best.lr" not in df.columns and df["final.lr"].tolist()[0] == 0.05 and "final.bad" not in df.columns
    assert df["best.acc"].isna().tolist() == [True, False]
    assert curves.columns.tolist() == ["run", "step", "metric", "value"]
    assert sorted(map(tuple, curves.values.tolist())) == sorted([
        ("a", 1, "loss", 2.0), ("a", 1, "lr", 0.1), ("a", 2, "loss", 1.0), ("a", 2, "lr", 0.05),
        ("b", 5, "loss", 3.0), ("b", 5, "acc", 0.5)])
    assert curves_table(runs, metrics=["acc"]).values.tolist() == [["b", 5, "acc", 0.5]]
    # records, a root, or a glob give the same table
    assert runs_table(str(tmp_path / "*"))["name"].tolist() == ["a", "b"]
    assert runs_table(runs[1])["seed"].tolist() == [2]


# --- plots: formats ------------------------------------------------------------------------------------------------

def assert_image(path, mime):
    from lmlab.analysis.report import image_mime

    data = path.read_bytes()
    assert len(data) > 1000 and image_mime(data) == mime, (path, data[:80])


def test_plot_lines_svg_and_bad_suffix(tmp_path):
    from lmlab.analysis import save_figure

    svg = plot_lines({"a": ([1, 2, 3], [3.0, 2.0, 1.0])}, tmp_path / "l.svg", "x", "y", "t")
    assert_image(svg, "image/svg+xml")
    assert svg.read_text().count("<svg") == 1
    again = plot_lines({"a": ([1, 2, 3], [3.0, 2.0, 1.0])}, tmp_path / "l2.svg", "x", "y", "t")
    assert again.read_bytes() == svg.read_bytes()  # no date in the file: the same figure gives the same bytes
    with pytest.raises(ValueError, match="unsupported figure format '.jpg'"):
        plot_lines({"a": ([1], [1])}, tmp_path / "l.jpg", "x", "y", "t")
    with pytest.raises(ValueError, match="unsupported"):
        save_figure(None, tmp_path / "noext")


def test_html_report_embeds_svg_and_renders_tables(tmp_path):
    import pandas as pd

    png = plot_lines({"a": ([1, 2], [1.0, 2.0])}, tmp_path / "a.png", "x", "y", "t")
    svg = plot_lines({"a": ([1, 2], [1.0, 2.0])}, tmp_path / "a.svg", "x", "y", "t")
    df = pd.DataFrame({"run": ["r1", "r2"], "loss": [0.123456, float("nan")], "dim": [32, 64]})
    out = write_html_report(tmp_path / "r.html", "T", [
        Section("Runs", table=df, images=[png, svg]),
        Section("Fit", table={"slope": 0.98765, "params per fact": 63}),
        Section("Empty", table=df.iloc[:0], text="no rows"),
    ])
    text = out.read_text()
    svgs = re.findall(r'src="data:image/svg\+xml;base64,([A-Za-z0-9+/=]+)"', text)
    pngs = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(svgs) == 1 and base64.b64decode(svgs[0]) == svg.read_bytes()
    assert len(pngs) == 1 and base64.b64decode(pngs[0]) == png.read_bytes()
    assert "<th>run</th><th>loss</th><th>dim</th>" in text and "<td>0.1235</td>" in text
    assert "<tr><td>r2</td><td></td><td>64</td></tr>" in text  # NaN is an empty cell
    assert "<th>key</th><th>value</th>" in text and "<td>slope</td><td>0.9877</td>" in text
    assert text.count("<table") == 2 and "no rows" in text  # an empty DataFrame: no table
    assert "http://" not in text and "https://" not in text and "<script>" in text  # one offline file
    bad = tmp_path / "bad.svg"
    bad.write_text("<svg><unclosed")
    with pytest.raises(ValueError, match="not a PNG or SVG"):
        write_html_report(tmp_path / "x.html", "x", [Section("s", images=[bad])])


# --- lmlab plot -----------------------------------------------------------------------------------------------------

@pytest.fixture
def seeds_root(tmp_path):
    """dim 16 / 32, seeds 0-2, modes weight / tool: loss = (1 + 0.1 seed) * 32 / dim / step; recall logged every
    2 steps on its own rows; num_params = 100 dim."""
    root = tmp_path / "seeds"
    for mode in ("weight", "tool"):
        for dim in (16, 32):
            for seed in range(3):
                rows = []
                for s in range(1, 7):
                    rows.append({"step": s, "loss": (1 + 0.1 * seed) * 32 / dim / s, "lr": 0.1})
                    if s % 2 == 0:
                        rows.append({"step": s, "recall/train/correct": min(1.0, s * dim / 96) * (1 - 0.1 * seed)})
                make_run(root / f"grid_{mode}" / f"dim={dim}_seed={seed}",
                         {"seed": seed, "model": {"dim": dim}, "tags": {"mode": mode}, "optim": {"lr": 0.003}},
                         rows, {"num_params": 100 * dim, "status": "completed"})
    return root


@pytest.fixture
def captured(monkeypatch):
    """The matplotlib axes each plot saves: lines' data and error bars, read from the figure itself."""
    from lmlab.analysis import plot as plot_mod
    from lmlab.analysis import report as report_mod

    figures = []
    real = report_mod.save_figure

    def spy(fig, path, *a, **k):
        figures.append([{"lines": [(list(ln.get_xdata()), list(ln.get_ydata()), ln.get_label()) for ln in ax.lines],
                         "collections": list(ax.collections), "title": ax.get_title(),
                         "legend": [t.get_text() for t in ax.get_legend().get_texts()] if ax.get_legend() else []}
                        for ax in fig.axes])
        return real(fig, path, *a, **k)

    monkeypatch.setattr(plot_mod, "save_figure", spy)
    monkeypatch.setattr(report_mod, "save_figure", spy)
    return figures


def test_plot_curves_groups_seeds(seeds_root, tmp_path, captured):
    from lmlab.analysis.plot import plot_curves

    runs = load_runs(seeds_root)
    drawn = plot_curves(runs, "loss", tmp_path / "loss.png", by=["model.dim"])
    assert_image(drawn["path"], "image/png")
    assert list(drawn["groups"]) == ["16", "32"]
    g16 = drawn["groups"]["16"]
    assert g16["n_runs"] == 6 and g16["x"] == [1, 2, 3, 4, 5, 6]
    # mean over seeds 0-2 and both modes of (1 + 0.1 seed) * 2 / step; band = seed 0 .. seed 2
    assert g16["y"][0] == pytest.approx(2 * 1.1) and g16["lo"][0] == pytest.approx(2.0) and g16["hi"][0] == 2.4
    assert drawn["groups"]["32"]["y"][5] == pytest.approx(1.1 / 6)
    (ax,) = captured[-1]
    assert [label for _, _, label in ax["lines"]] == ["16 (6 runs)", "32 (6 runs)"]  # one line per group
    assert ax["lines"][0][1] == pytest.approx(g16["y"]) and len(ax["collections"]) == 2  # two min-max bands
    # the accuracy metric works the same, on the rows that carry it; two keys; one line per run
    drawn = plot_curves(runs, "recall/train/correct", tmp_path / "recall.svg", by=["tags.mode", "model.dim"],
                        style="lines")
    assert_image(drawn["path"], "image/svg+xml")
    assert list(drawn["groups"]) == ["tags.mode=tool, model.dim=16", "tags.mode=tool, model.dim=32",
                                     "tags.mode=weight, model.dim=16", "tags.mode=weight, model.dim=32"]
    assert drawn["groups"]["tags.mode=weight, model.dim=32"]["x"] == [2, 4, 6]
    assert drawn["groups"]["tags.mode=weight, model.dim=32"]["hi"] == pytest.approx([2 / 3, 1.0, 1.0])
    assert len(captured[-1][0]["lines"]) == 12 and not captured[-1][0]["collections"]  # 12 thin lines, no band


def test_plot_final_error_bars(seeds_root, tmp_path, captured):
    from lmlab.analysis.plot import plot_final

    runs = load_runs(seeds_root)
    drawn = plot_final(runs, "model.dim", "loss", tmp_path / "final.svg", by=["tags.mode"])
    assert_image(drawn["path"], "image/svg+xml")
    w = drawn["groups"]["weight"]
    # final loss at step 6: (1 + 0.1 seed) * 32 / dim / 6; mean of seeds, bars min..max
    assert w["x"] == [16, 32] and w["n"] == [3, 3]
    assert w["y"] == pytest.approx([1.1 / 3, 1.1 / 6]) and w["lo"] == pytest.approx([1 / 3, 1 / 6])
    assert w["hi"] == pytest.approx([1.2 / 3, 1.2 / 6])
    (ax,) = captured[-1]
    assert ax["legend"] == ["tool", "weight"]
    assert [y for _, y, _ in ax["lines"][:1]] == [pytest.approx(drawn["groups"]["tool"]["y"])]
    std = plot_final(runs, "summary.num_params", "loss", tmp_path / "std.png", err="std", logx=True)
    (g,) = std["groups"].values()
    assert g["x"] == [1600, 3200] and g["n"] == [6, 6]
    sd = statistics.stdev([(1 + 0.1 * s) / 3 for s in range(3)] * 2)
    assert g["hi"][0] - g["y"][0] == pytest.approx(sd) and g["y"][0] - g["lo"][0] == pytest.approx(sd)
    # best of each run (max for recall), a string x drawn as categories
    best = plot_final(runs, "tags.mode", "recall/train/correct", tmp_path / "best.png", stat="best")
    (g,) = best["groups"].values()
    assert g["x"] == ["tool", "weight"] and g["hi"] == pytest.approx([1.0, 1.0]) and g["lo"] == [0.8, 0.8]


def test_plot_command_line(seeds_root, tmp_path, capsys):
    from lmlab.analysis.plot import main
    from lmlab.cli import main as lmlab_main

    out = tmp_path / "o"
    assert main([str(seeds_root), "--y", "loss", "--by", "model.dim", "--logy", "--out", str(out / "a.png")]) == 0
    assert_image(out / "a.png", "image/png")
    assert "wrote" in capsys.readouterr().out
    # through `lmlab plot`, a glob, a filter, SVG
    assert lmlab_main(["plot", str(seeds_root / "grid_*"), "--y", "recall/train/correct", "--by", "seed",
                       "--where", "tags.mode=weight", "--where", "model.dim!=16", "--out", str(out / "b.svg")]) == 0
    assert_image(out / "b.svg", "image/svg+xml")
    assert "(3 group(s), 3 run(s))" in capsys.readouterr().out
    assert main([str(seeds_root), "--final", "--x", "model.dim", "--y", "loss", "--by", "tags.mode", "--logx",
                 "--where", "optim.lr=3e-3", "--where", "seed=0,1", "--out", str(out / "c.svg")]) == 0
    assert "(2 group(s), 8 run(s))" in capsys.readouterr().out
    assert main([str(seeds_root), "--list-keys"]) == 0
    listed = capsys.readouterr().out
    assert "  model.dim: 16, 32" in listed and "  recall/train/correct" in listed


@pytest.mark.parametrize("args, message", [
    (["--y", "loss", "--by", "model.dimm"], "unknown --by key 'model.dimm'; close matches: model.dim"),
    (["--y", "loss", "--by", "dim"], "unknown --by key 'dim'; close matches: model.dim"),
    (["--y", "los"], "unknown --y metric 'los'; close matches: loss"),
    (["--y", "loss", "--where", "tags.mod=weight"], "unknown --where key 'tags.mod'; close matches: tags.mode"),
    (["--y", "loss", "--where", "seed"], "--where 'seed': expected KEY=VALUE"),
    (["--y", "loss", "--where", "seed=7"], "no run matches --where seed=7"),
    (["--final", "--y", "loss"], "--final/--best need --x KEY"),
    (["--final", "--x", "model.dimz", "--y", "loss"], "unknown --x key 'model.dimz'; close matches: model.dim"),
    (["--final", "--x", "tags.mode", "--y", "loss", "--logx"], "--logx needs a numeric --x"),
    (["--best", "--x", "model.dim", "--y", "lr"], "--best: no best value for 'lr'"),
    (["--y", "loss", "--out", "x.jpg"], "unsupported figure format '.jpg'"),
    (["--x", "step"], "--y METRIC is required"),
    (["--y", "loss", "--frobnicate"], "unrecognized arguments: --frobnicate"),
])
def test_plot_bad_usage_is_one_line_and_status_2(seeds_root, tmp_path, capsys, args, message):
    from lmlab.analysis.plot import main

    args = [a if a != "x.jpg" else str(tmp_path / a) for a in args]
    out = [] if "--out" in args else ["--out", str(tmp_path / "never.png")]
    assert main([str(seeds_root), *args, *out]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "never.png").exists()


def test_plot_no_runs(tmp_path, capsys):
    from lmlab.analysis.plot import main

    assert main([str(tmp_path / "nothing"), "--y", "loss"]) == 2
    assert "no run folders" in capsys.readouterr().err


# --- the capacity figure --------------------------------------------------------------------------------------------

def capacity_grid(facts_values=(250, 500, 1000, 2000), params_values=(1e4, 2e4, 4e4, 8e4)):
    """In-weight recall = min(1, params / 20 / facts) (capacity 20 params per fact); in-tool: 0.99 throughout."""
    return [{"mode": m, "params": p, "facts": f, "bits_per_fact": 8.0, "seed": s,
             "recall": (min(1.0, p / 20 / f) if m == "weight" else 0.99) - 0.01 * s}
            for m in ("weight", "tool") for p in params_values for f in facts_values for s in (0, 1)]


def test_capacity_plot_contours_on_a_grid(tmp_path, captured):
    import pandas as pd
    from matplotlib.contour import ContourSet

    from lmlab.analysis import plot_capacity

    rows = capacity_grid()
    got = plot_capacity(rows, tmp_path / "cap.png")
    assert_image(got["path"], "image/png")
    assert got["points"] == {"weight": 32, "tool": 32}
    assert got["contours"]["weight"] == [0.5, 0.9, 0.95]  # in-weight recall spans 0.115 .. 1.0
    assert got["contours"]["tool"] == []  # 0.98-0.99 everywhere: nothing to draw, and the panel says so
    assert any("(c) in-tool" in n and "never crosses 0.5, 0.9, 0.95" in n for n in got["notes"])
    # the most bits per parameter stored in-weight: 1000 facts x 8 bits at 2e4 params and recall 1.0 = 0.4
    assert got["max_bits_per_param"] == pytest.approx(1000 * 8 * 1.0 / 2e4)
    ax_bits, ax_w, ax_t = captured[-1][:3]
    contours = [c for c in ax_w["collections"] if isinstance(c, ContourSet)]
    assert len(contours) == 1 and list(contours[0].levels) == [0.5, 0.9, 0.95]
    assert not [c for c in ax_t["collections"] if isinstance(c, ContourSet)]
    refs = {label: (x, y) for x, y, label in ax_bits["lines"] if "bit" in label}
    x, y = refs["2 bit/parameter"]
    assert y == pytest.approx([2 * v for v in x])  # the 2 bits per parameter reference line
    # the 0.5 contour of in-weight recall lies where params / 20 / facts = 0.5 (log-linear interpolation)
    seg = contours[0].allsegs[0]
    pts = [p for s in seg for p in s]
    assert pts and all(abs(math.log10(px / (10 * fy))) < 0.2 for px, fy in pts)
    # a DataFrame with other column names, as SVG
    df = pd.DataFrame(rows).rename(columns={"recall": "recall_train_best", "params": "num_params"})
    got = plot_capacity(df, tmp_path / "cap.svg", recall="recall_train_best", params="num_params")
    assert_image(got["path"], "image/svg+xml")
    assert got["contours"]["weight"] == [0.5, 0.9, 0.95]


def test_capacity_plot_sparse_grids_do_not_crash(tmp_path):
    from lmlab.analysis import plot_capacity

    one_facts = capacity_grid(facts_values=(500,))
    got = plot_capacity(one_facts, tmp_path / "one.png")
    assert got["contours"] == {"weight": [], "tool": []} and got["points"] == {"weight": 8, "tool": 8}
    assert any("one number of facts (500)" in n for n in got["notes"])
    two = [r for r in capacity_grid() if r["mode"] == "weight"][:2]
    got = plot_capacity(two, tmp_path / "two.png")
    assert any("no contour: 1 grid point(s)" in n for n in got["notes"])  # two seeds of one point: merged
    assert any("(c) in-tool: no runs" in n for n in got["notes"])
    got = plot_capacity([], tmp_path / "empty.png")
    assert got["points"] == {"weight": 0, "tool": 0}
    for name in ("one", "two", "empty"):
        assert_image(tmp_path / f"{name}.png", "image/png")
    # collinear in log space (params = 40 x facts): no triangle to interpolate on
    line = [{"mode": "weight", "params": 40 * f, "facts": f, "bits_per_fact": 8, "recall": 0.9} for f in (1, 2, 4)]
    got = plot_capacity(line, tmp_path / "line.png")
    assert got["contours"]["weight"] == [] and any("cannot be triangulated" in n for n in got["notes"])
    with pytest.raises(ValueError, match="unsupported"):
        plot_capacity(one_facts, tmp_path / "cap.gif")
