"""Mutation check of the fast paths: does a deliberate one-line bug make the tests that cover that code fail?

Each mutant in ``scripts/mutant_list.py`` replaces one exact snippet of a source file (it must occur once) and
names the test files that should catch it. The check copies the tree to a scratch folder per worker, applies one
mutant at a time there (the working tree is never touched), runs those tests with ``pytest -x`` and counts the
mutant as killed when they fail. A mutant that survives is either a hole in the tests (write the test) or
equivalent (it changes nothing observable): the list then says why in ``equivalent``, and the report keeps it
apart.

Usage::

    make mutants                                   # = python scripts/mutants.py --jobs 2
    python scripts/mutants.py --only engine pool   # some modules
    python scripts/mutants.py --list               # the mutants, without running them

Prints one line per mutant, a table per module, and as the last line one JSON object (also written to
``runs/mutants/report.json``). Not part of CI: it runs the covering tests once per mutant (~15-30 minutes here).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from mutant_list import MUTANTS  # noqa: E402

COPY = ("src", "tests", "apps", "pyproject.toml")


def check_list(mutants: list[dict]) -> None:
    """Every mutant applies to exactly one place of the current tree (else the list is stale: fail loudly)."""
    for m in mutants:
        text = (ROOT / m["file"]).read_text()
        n = text.count(m["find"])
        if n != 1:
            raise SystemExit(f"mutant {m['id']}: its snippet occurs {n} times in {m['file']} (expected once)")


def make_tree(parent: Path, k: int) -> Path:
    tree = parent / f"tree{k}"
    for name in COPY:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, tree / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(src, tree / name)
    return tree


def run_tests(tree: Path, tests: list[str], timeout: float) -> tuple[int, float, str]:
    env = {**os.environ, "PYTHONPATH": str(tree / "src"), "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    t0 = time.time()
    try:
        res = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                             cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
        rc, out = res.returncode, res.stdout[-600:]
    except subprocess.TimeoutExpired:
        rc, out = -1, "timeout"
    return rc, time.time() - t0, out


def run_mutant(m: dict, tree: Path, timeout: float) -> dict:
    path = tree / m["file"]
    original = path.read_text()
    path.write_text(original.replace(m["find"], m["replace"]))
    try:
        rc, seconds, out = run_tests(tree, m["tests"], timeout)
    finally:
        path.write_text(original)
    status = "killed" if rc != 0 else ("equivalent" if m.get("equivalent") else "survived")
    return {"id": m["id"], "module": m["module"], "status": status, "seconds": round(seconds, 1),
            "timeout": rc == -1, "tail": "" if rc != 0 else out.strip().splitlines()[-1]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=2, help="mutants tested at once (one scratch tree each)")
    ap.add_argument("--only", nargs="*", help="modules to test (default: all)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per mutant's tests")
    ap.add_argument("--list", action="store_true", help="print the mutants and exit")
    ap.add_argument("--out", default=str(ROOT / "runs" / "mutants" / "report.json"))
    args = ap.parse_args(argv)
    mutants = [m for m in MUTANTS if not args.only or m["module"] in args.only]
    check_list(mutants)
    if args.list:
        for m in mutants:
            print(f"{m['id']:32s} {m['module']:12s} {m['file']}")
        return 0
    with tempfile.TemporaryDirectory(prefix="lmlab-mutants-") as scratch:
        trees = [make_tree(Path(scratch), k) for k in range(max(1, args.jobs))]
        probe = subprocess.run([sys.executable, "-c", "import lmlab; print(lmlab.__file__)"], capture_output=True,
                               text=True, env={**os.environ, "PYTHONPATH": str(trees[0] / "src")})
        if not probe.stdout.strip().startswith(str(trees[0])):
            raise SystemExit(f"the scratch tree's lmlab is not the one imported: {probe.stdout or probe.stderr}")
        covering = sorted({t for m in mutants for t in m["tests"]})
        rc, seconds, out = run_tests(trees[0], covering, args.timeout * 4)
        if rc != 0:
            raise SystemExit(f"the unmutated tests fail; fix them first:\n{out}")
        print(f"baseline: {len(covering)} test files pass in {seconds:.0f} s; {len(mutants)} mutants", flush=True)
        free = list(trees)

        def work(m: dict) -> dict:
            tree = free.pop()
            try:
                r = run_mutant(m, tree, args.timeout)
            finally:
                free.append(tree)
            print(f"{r['status']:10s} {r['id']:32s} {r['seconds']:6.1f} s {r['tail']}", flush=True)
            return r

        with ThreadPoolExecutor(max_workers=len(trees)) as pool:
            results = list(pool.map(work, mutants))
    per_module: dict[str, dict[str, int]] = defaultdict(lambda: {"killed": 0, "survived": 0, "equivalent": 0})
    for r in results:
        per_module[r["module"]][r["status"]] += 1
    print(f"\n{'module':14s} killed / non-equivalent  (equivalent)")
    for module, c in sorted(per_module.items()):
        print(f"{module:14s} {c['killed']:3d} / {c['killed'] + c['survived']:3d}            ({c['equivalent']})")
    killed = sum(c["killed"] for c in per_module.values())
    scored = killed + sum(c["survived"] for c in per_module.values())
    report = {"killed": killed, "scored": scored, "score": round(killed / max(scored, 1), 3),
              "equivalent": sum(c["equivalent"] for c in per_module.values()),
              "survivors": [r["id"] for r in results if r["status"] == "survived"],
              "per_module": dict(per_module), "mutants": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    summary = {k: report[k] for k in ("killed", "scored", "score", "equivalent", "survivors")}
    summary["per_module"] = {k: f"{v['killed']}/{v['killed'] + v['survived']}" for k, v in sorted(per_module.items())}
    print(json.dumps(summary))
    return 0 if not report["survivors"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
