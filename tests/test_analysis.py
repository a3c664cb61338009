"""Run analysis: loading run folders (nested grids), metric helpers, CSV, plots and the HTML report."""

import base64
import csv
import json
import re

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
