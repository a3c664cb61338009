"""The in-weight vs in-tool experiment, end to end: data, training grid, recall with live SQL, results, report.

For each grid point of the YAML (people x mode x model size x seed), builds the dataset the point names
(``tags.data_dir``; built once, reused when its manifest matches), trains the model (``lmlab.launch.run_grid``:
finished runs are skipped, unfinished ones resume), evaluates recall through the generation engine with the
SQL tool live (during training and at the end, see ``evals.recall``), then writes ``results.csv``, the plots and
``report.html`` beside the runs and prints the results table.

Usage::

    .venv/bin/python apps/memory/run.py                                   # the quickstart (11-12 min on 2 cores)
    .venv/bin/python apps/memory/run.py --grid apps/memory/reproduce.yaml --jobs 2  # in-tool, plain + smear
    .venv/bin/python apps/memory/run.py --grid apps/memory/capacity.yaml --jobs 2    # in-weight capacity
    .venv/bin/python apps/memory/run.py --jobs 1 train.steps=100           # overrides apply to every run
    .venv/bin/python apps/memory/run.py --report-only                      # redraw results from the run folders

Tags the YAML must set (see quickstart.yaml): ``mode`` (weight | tool), ``people``, ``ood`` (OOD people in the
database and the OOD eval set), ``data_seed``, ``data_dir``; optional ``alpha`` (dependent attributes, default 0)
``paraphrases`` (dialogs per fact, default 4), ``absent`` (questions about people absent from the database,
default 0), ``absent_in_weight`` (put them in the in-weight file too, default false) and ``practice`` (questions
about practice people of a database of their own, in-tool file only, default 0) and ``families`` (last names drawn
from this many families, for ``alpha`` experiments, default 0: any); see build_data.py.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from any cwd: import `memory`

from lmlab.config import ConfigError, exit_on_config_error  # noqa: E402
from lmlab.launch import exit_on_grid_interrupt, run_grid  # noqa: E402
from lmlab.launch.local import usable_cpus  # noqa: E402
from memory.analyze import format_table, make_report  # noqa: E402
from memory.build_data import FORMAT_VERSION, build_args, build_dataset  # noqa: E402

HERE = Path(__file__).resolve().parent
log = logging.getLogger("memory")


def dataset_args(tags: dict) -> dict:
    """build_dataset's arguments from a run's tags (a ConfigError names a missing or bad tag)."""
    try:
        return {"out": str(tags["data_dir"]), "people": int(tags["people"]), "ood": int(tags["ood"]),
                "seed": int(tags["data_seed"]), "alpha": float(tags.get("alpha", 0.0)),
                "paraphrases": int(tags.get("paraphrases", 4)), "absent": int(tags.get("absent", 0)),
                "absent_in_weight": bool(tags.get("absent_in_weight", False)),
                "practice": int(tags.get("practice", 0)), "novel": int(tags.get("novel", 0)),
                "practice_style": str(tags.get("practice_style", "lists")),
                "families": int(tags.get("families", 0))}
    except KeyError as e:
        raise ConfigError(f"tags.{e.args[0]}: the memory app needs this tag (see quickstart.yaml)") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"tags: {e}") from None


def ensure_dataset(args: dict) -> str:
    """Build the dataset unless its folder already holds a complete one made with the same arguments."""
    out = Path(args["out"])
    manifest = out / "manifest.json"
    if manifest.is_file():
        m = json.loads(manifest.read_text())
        wanted = build_args(**{k: v for k, v in args.items() if k != "out"})
        if m.get("format_version") == FORMAT_VERSION and m.get("build_args") == wanted:
            return "reused"
    t0 = time.time()
    build_dataset(**args)
    return f"built in {time.time() - t0:.1f} s"


def default_jobs() -> int:
    """Runs trained at once by default: one and a half per core (one thread each). The grids here mix runs of
    unequal length (an in-tool run takes ~2.2x an in-weight one), and with one run per core the last runs finish on
    one core while the other idles; three at a time on two cores share them to the end. Measured, the quickstart on
    2 cores the same day: 11 min 5 s with 3 at a time, 12 min 37 s with 2, identical results (every run is one
    thread; the in-tool runs took 7:21-7:23 at 2/3 of a core each, against 5:01-5:11 alone on one)."""
    return max(1, usable_cpus() * 3 // 2)


@exit_on_config_error
@exit_on_grid_interrupt
def main(argv: list[str] | None = None) -> int:
    from lmlab.launch import grid_app_arguments, parse_grid_app

    t0 = time.time()
    p = grid_app_arguments(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]),
                           str(HERE / "quickstart.yaml"), jobs=default_jobs(),
                           report_help="skip data and training; rebuild the report")
    p.add_argument("--slurm", action="store_true", help="build the datasets here, then submit the unfinished runs "
                   "to Slurm as one array job (resources: launch.slurm); rerun with --report-only once they are done")
    p.add_argument("--dry-run", action="store_true", help="print the runs and the array job(s) --slurm would submit "
                   "(size, resources), build and submit nothing")
    a, configs = parse_grid_app(p, argv)
    root = configs[0].run_dir.parent  # the grid's folder: runs/memory/quick for memory/quick/people=64_mode=tool
    if len({c.run_dir.parent for c in configs}) != 1:
        raise ConfigError(f"{a.grid}: the runs of the grid must share one parent folder")
    if a.dry_run:
        from lmlab.launch.slurm import describe_submission

        print(describe_submission(configs))
        print(f"datasets: {len({dataset_args(c.tags)['out'] for c in configs})} (built before submitting)")
        return 0
    if not a.report_only:
        datasets = {}
        for cfg in configs:
            args = dataset_args(cfg.tags)
            if datasets.setdefault(args["out"], args) != args:
                raise ConfigError(f"{cfg.name}: tags.data_dir {args['out']} is shared by runs that need different "
                                  f"datasets ({datasets[args['out']]} vs {args}); name every tag that differs in it")
        for out, args in datasets.items():
            log.info("dataset %s: %s", out, ensure_dataset(args))
        if a.slurm:
            from lmlab.launch.slurm import submit_grid

            submit_grid(configs)
            print(f"`lmlab grid {a.grid}` shows each run's state; `{sys.argv[0]} --grid {a.grid} --report-only` "
                  "writes the report once they are done")
            return 0
        outcomes = run_grid(configs, jobs=a.jobs, threads=a.threads)
        failed = [o for o in outcomes if o.status == "failed"]
    else:
        failed = []
    summary = make_report(root, root / "report", runs=[c.run_dir for c in configs])
    print(format_table(summary["rows"]))
    print(f"\n{len(summary['rows'])} of {len(configs)} runs have results ({time.time() - t0:.0f} s); "
          f"results: {root / 'report' / 'results.csv'}, "
          f"report: {root / 'report' / 'report.html'}")
    for mode, fit in (summary.get("fit") or {}).items():
        if fit.get("slope") is not None:
            print(f"{mode}: smallest params reaching {summary['threshold']:.0%} recall ~ facts^{fit['slope']:.2f}, "
                  f"median {fit['params_per_fact']:.3g} params/fact")
    if failed:
        print(f"{len(failed)} runs failed: {', '.join(o.name for o in failed)} (see their train.log)")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
