"""`lmlab report`: one HTML report of tiny real runs (Trainer), its sections, columns and figures; bad usage."""

import csv
import html
import re
import statistics

import pytest
from test_profiler import make_cfg
from test_report_browser import browser, inspect_page, problems  # noqa: F401 (browser: the fixture)

from lmlab.analysis import load_runs
from lmlab.analysis.run_report import default_by, main, make_report, step_times, varying_keys
from lmlab.monitor.probes import read_probes
from lmlab.train import Trainer

PROBES = ["probes.modules=[layers.*.attention]", "probes.params=[layers.*.attention.wq.weight]", "probes.every=2"]


@pytest.fixture(scope="module")
def probed(tmp_path_factory, one_thread):
    """Four runs (model.dim 16/32 x seed 0/1) with probes, timers, MFU and a validation loss."""
    tmp = tmp_path_factory.mktemp("probed")
    for dim in (16, 32):
        for seed in (0, 1):
            cfg = make_cfg(tmp, f"model.dim={dim}", f"seed={seed}", *PROBES, "train.log_every=2",
                           "data.val_fraction=0.1", "train.eval_every=4", "train.peak_flops=1e11",
                           name=f"d{dim}_s{seed}")
            Trainer(cfg).fit()
    return tmp / "runs"


@pytest.fixture(scope="module")
def plain(tmp_path_factory, one_thread):
    """Two runs differing only in seed: no probes, no step timers."""
    tmp = tmp_path_factory.mktemp("plain")
    for seed in (0, 1):
        Trainer(make_cfg(tmp, f"seed={seed}", "profile.timers=false", "profile.measure_peak=false",
                         name=f"s{seed}")).fit()
    return tmp / "runs"


def sections(page: str) -> dict[str, str]:
    """``{heading: the HTML up to the next heading}``."""
    parts = re.split(r"<h2>(.*?)</h2>", page)
    return {html.unescape(h): body for h, body in zip(parts[1::2], parts[2::2])}


def first_table(body: str) -> tuple[list[str], list[list[str]]]:
    table = body[body.index("<table"):body.index("</table>")]
    head = [html.unescape(c) for c in re.findall(r"<th>(.*?)</th>", table)]
    rows = [[html.unescape(c) for c in re.findall(r"<td>(.*?)</td>", tr)]
            for tr in re.findall(r"<tr>(.*?)</tr>", table.split("<tbody>")[1])]
    return head, rows


def n_images(body: str) -> int:
    return body.count("<img ")


def test_report_of_probed_runs(probed, tmp_path, capsys):
    out = tmp_path / "report"
    assert main([str(probed), "--out", str(out), "--by", "model.dim"]) == 0
    assert "wrote" in capsys.readouterr().out
    page = (out / "report.html").read_text()
    secs = sections(page)
    assert list(secs) == ["Runs", "Curves", "Final values", "Step time and throughput",
                          "Probes: attention entropy per head", "Probes: activation and gradient norms",
                          "Probes: update / weight ratio"]
    assert not any("Skipped" in body for body in secs.values())
    # every figure written is embedded once, and the HTML loads nothing from outside
    figures = sorted(p.name for p in out.glob("*.png"))
    assert n_images(page) == len(figures) == 11
    assert sorted(re.findall(r'<img alt="([^"]+)"', page)) == figures
    assert "src=\"data:image/png;base64," in page and "http" not in page.replace("http-equiv", "")
    assert [n_images(b) for b in secs.values()] == [0, 2, 2, 1, 4, 1, 1]  # loss+val_loss; final of both; 4 runs

    # summary table: each run once; the varying keys only (dim, then seed), common ones listed above it
    head, rows = first_table(secs["Runs"])
    assert head[:3] == ["name", "model.dim", "seed"]
    assert not {"model.n_layers", "optim.lr", "config.name", "train.steps"} & set(head)
    assert {"params", "status", "steps", "final.loss", "best.loss", "final.val_loss", "tokens_per_s", "mfu",
            "peak_mem_mb", "train_time_s"} <= set(head)
    runs = {r.name: r for r in load_runs(probed)}
    assert [r[0] for r in rows] == sorted(runs) == ["d16_s0", "d16_s1", "d32_s0", "d32_s1"]
    for row in rows:
        cell = dict(zip(head, row))
        run = runs[cell["name"]]
        assert cell["model.dim"] == str(run.get("model.dim")) and cell["seed"] == str(run.get("seed"))
        assert float(cell["final.loss"]) == pytest.approx(run.final("loss"), rel=1e-3)
        assert float(cell["best.loss"]) == pytest.approx(run.best("loss", mode="min"), rel=1e-3)
        assert cell["status"] == "completed" and cell["steps"] == "8"
    common = secs["Runs"].split("<table")[0]
    assert "Common settings" in common and "n_layers=2" in common and "lr=0.01" in common

    # runs.csv: the full runs_table, one row per run
    with (out / "runs.csv").open() as f:
        csv_rows = list(csv.DictReader(f))
    assert [r["name"] for r in csv_rows] == sorted(runs) and "model.n_layers" in csv_rows[0]

    # profiler table: the means of the last rows' timers
    head, rows = first_table(secs["Step time and throughput"])
    assert head[:7] == ["name", "step_ms", "data_ms", "forward_ms", "backward_ms", "optim_ms", "other_ms"]
    cell = dict(zip(head, rows[0]))
    timed = [r for r in runs["d16_s0"].metrics if "time/step_ms" in r][-5:]
    assert float(cell["step_ms"]) == pytest.approx(statistics.fmean(r["time/step_ms"] for r in timed), abs=0.01)
    assert float(cell["mfu"]) > 0


def test_step_times_split_the_step(probed):
    run = next(r for r in load_runs(probed) if r.name == "d32_s1")
    t = step_times(run, last=2)
    rows = [r for r in run.metrics if "time/step_ms" in r][-2:]
    for phase in ("data", "forward", "backward", "optim"):
        assert t[f"{phase}_ms"] == pytest.approx(statistics.fmean(r[f"time/{phase}_ms"] for r in rows))
    parts = sum(t[f"{p}_ms"] for p in ("data", "forward", "backward", "optim"))
    assert t["other_ms"] == pytest.approx(t["step_ms"] - parts) and t["other_ms"] >= 0
    assert t["eval_s"] == pytest.approx(sum(r["time/eval_s"] for r in run.metrics if "time/eval_s" in r))
    assert t["peak_mem_mb"] == max(r["peak_mem_mb"] for r in run.metrics if "peak_mem_mb" in r)


def test_probes_of_more_runs_than_shown_are_averaged_per_group(probed, tmp_path):
    done = make_report(load_runs(probed), tmp_path / "r", by=["model.dim"], probe_runs=2)
    assert list(done["probes"]) == ["model.dim=16 (mean of 2 runs)", "model.dim=32 (mean of 2 runs)"]
    a, b = (read_probes(probed / f"d16_s{s}") for s in (0, 1))
    mean = done["probes"]["model.dim=16 (mean of 2 runs)"]
    assert [r["step"] for r in mean] == [2, 4, 6, 8]
    for key in ("act/layers.1.attention/norm", "grad/layers.0.attention/norm",
                "param/layers.0.attention.wq.weight/update_ratio"):
        assert [r[key] for r in mean] == pytest.approx([(x[key] + y[key]) / 2 for x, y in zip(a, b)])
    # per-head entropy: one figure per group, of its first run (heads do not line up across seeds)
    assert [p.name for p in done["images"] if p.name.startswith("probes_entropy")] == [
        "probes_entropy_model.dim=16.png", "probes_entropy_model.dim=32.png"]
    page = done["path"].read_text()
    assert "A group shows its first run" in page and "showing" not in page  # two groups: both shown


def test_report_skips_sections_without_data(plain, tmp_path):
    out = tmp_path / "report"
    assert main([str(plain), "--out", str(out), "--format", "svg"]) == 0
    page = (out / "report.html").read_text()
    secs = sections(page)
    assert list(secs) == ["Runs", "Curves", "Final values", "Step time and throughput", "Probes"]
    assert "Skipped: pass --by KEY" in secs["Final values"]
    assert "Skipped: no run has a probes.jsonl" in secs["Probes"]
    assert "No step-time breakdown" in secs["Step time and throughput"]  # throughput table, no bar
    assert [n_images(b) for b in secs.values()] == [0, 2, 0, 0, 0]  # the loss curves only (val_loss: at the end)
    assert page.count("data:image/svg+xml;base64,") == 2
    assert sorted(p.name for p in out.glob("*.svg")) == ["curves_loss.svg", "curves_val_loss.svg"]
    head, rows = first_table(secs["Runs"])
    assert head[:2] == ["name", "seed"] and "model.dim" not in head and [r[0] for r in rows] == ["s0", "s1"]
    assert "mfu" not in head  # no run has it
    assert "each run on its own" in secs["Curves"]
    # a second report in the same folder replaces the first one's figures
    assert main([str(plain), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["curves_loss.png", "curves_val_loss.png", "report.html",
                                                     "runs.csv"]


@pytest.mark.parametrize("args, message", [
    ([], "the following arguments are required"),
    (["{runs}"], "--out"),
    (["{empty}", "--out", "{out}"], "no run folders"),
    (["{runs}", "--out", "{out}", "--by", "model.dimm"], "unknown --by key 'model.dimm'; close matches: model.dim"),
    (["{runs}", "--out", "{out}", "--x", "tags.nope"], "unknown --x key 'tags.nope'"),
    (["{runs}", "--out", "{out}", "--format", "pdf"], "invalid choice: 'pdf'"),
    (["{runs}", "--out", "{out}", "--where", "seed=7"], "no run matches --where seed=7"),
])
def test_bad_usage_is_one_line_and_status_2(plain, tmp_path, capsys, args, message):
    (tmp_path / "empty").mkdir()
    fill = {"runs": str(plain), "empty": str(tmp_path / "empty"), "out": str(tmp_path / "out")}
    assert main([a.format(**fill) for a in args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists()  # nothing written


def test_varying_common_following_and_partial_keys():
    rows = [{"name": f"r{i}", "config.name": f"r{i}", "model.dim": dim, "seed": seed, "optim.lr": 0.01,
             "tags.people": people, "tags.data_dir": f"/data/people{people}", **extra}
            for i, (dim, seed, people, extra) in enumerate([(16, 0, 64, {}), (16, 1, 64, {}),
                                                            (32, 0, 256, {"parallel.tp": 1}), (32, 1, 256, {})])]
    varying, common, follows, partial = varying_keys(rows)
    # model.dim and the data folder split the runs as tags.people does: the tag (short values) stands for them
    assert varying == ["seed", "tags.people"]
    assert follows == {"model.dim": "tags.people", "tags.data_dir": "tags.people"}
    assert common == {"optim.lr": 0.01} and partial == ["parallel.tp"]
    # default groups: tags first, never seeds; four runs or fewer: each run on its own
    rows[1]["model.dim"] = 24
    varying, _, follows, _ = varying_keys(rows)
    assert varying == ["model.dim", "seed", "tags.people"] and follows == {"tags.data_dir": "tags.people"}
    more = rows + [dict(r, name=r["name"] + "b", seed=r["seed"] + 2) for r in rows]
    assert default_by(more, varying_keys(more)[0]) == ["tags.people", "model.dim"]
    assert default_by(rows, varying) == []
    only_seeds = [{"name": f"r{s}", "seed": s} for s in range(6)]
    assert default_by(only_seeds, varying_keys(only_seeds)[0]) == []


@pytest.mark.slow
def test_report_renders_in_a_real_browser(browser, probed, tmp_path):  # noqa: F811 (the fixture)
    out = tmp_path / "report"
    assert main([str(probed), "--out", str(out), "--by", "model.dim", "--format", "svg"]) == 0
    page = inspect_page(browser, out / "report.html")
    assert problems(page) == []
    assert len(page["images"]) == 11 and {img["type"] for img in page["images"]} == {"image/svg+xml"}
    assert all(img["width"] > 300 and img["height"] > 150 for img in page["images"])
