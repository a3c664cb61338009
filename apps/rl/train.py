"""The RL app: GRPO with tool-use rollouts on the memory app's people, end to end.

Prepares the data (the memory app's dataset of ``tags.sft_config``, split for RL), trains the SFT model that GRPO
starts from when it is missing, runs GRPO (``lmlab.train.grpo``), then writes a report (``RUN/report/``: recall
before and after, curves). Every stage is skipped when done and resumes when cut short.

Usage::

    python -m apps.rl.train config=apps/rl/configs/r1.yaml                 # from the repository root
    python -m apps.rl.train config=apps/rl/configs/r1.yaml runs_dir=/tmp/rl train.steps=50 sft.train.steps=300
    python -m apps.rl.train config=apps/rl/configs/template.yaml           # the answer template from reward alone
    lmlab train apps/rl/configs/r1.yaml                                    # GRPO alone, once prepared

Overrides apply to the GRPO config; ``tags.sft_overrides`` (a list in the GRPO config) and ``sft.KEY=VALUE`` ones
to the SFT config (its ``runs_dir`` and ``seed`` follow the GRPO config's).

The RL data folder (``tags.rl_data``) holds: ``people.sqlite`` (the memory dataset's database), ``sft_train.jsonl``
(its in-tool dialogs; with ``tags.template_share`` < 1 only that share of the final answers is a sentence, the
others are the bare value from the database), ``eval_train.jsonl`` (training people), ``rl_prompts.jsonl`` (the
questions about the first half of the OOD people, GRPO's prompts) and ``eval_heldout.jsonl`` (the other half:
neither SFT nor GRPO sees them).
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the memory app's modules (`memory.*`), as its own scripts import them

from memory.run import dataset_args, ensure_dataset  # noqa: E402

from lmlab.config import Config, ConfigError, exit_on_config_error, load_config  # noqa: E402
from lmlab.train import build_trainer  # noqa: E402

log = logging.getLogger("rl")
PREP_VERSION = 1


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)


def bare_answers(dialogs: list[dict[str, Any]], template_share: float, seed: int) -> list[dict[str, Any]]:
    """The in-tool dialogs with all but a seeded ``template_share`` of their final answers replaced by the bare
    value the database returned (the answer without its sentence)."""
    rng = random.Random(f"bare/{seed}")
    out = []
    for d in dialogs:
        turns = [dict(t) for t in d["dialog"]]
        if rng.random() >= template_share and len(turns) >= 4 and turns[-2]["source"] == "database":
            turns[-1]["content"] = turns[-2]["content"]
        out.append({**d, "dialog": turns})
    return out


def prepare_rl_data(sft: Config) -> Path:
    """Build (or reuse) the memory dataset named by the SFT config's tags and the RL data folder ``tags.rl_data``."""
    tags = sft.tags
    args = dataset_args(tags)
    log.info("memory dataset %s: %s", args["out"], ensure_dataset(args))
    src, out = Path(args["out"]), Path(str(tags["rl_data"]))
    share = float(tags.get("template_share", 1.0))
    if not 0.0 <= share <= 1.0:
        raise ConfigError(f"tags.template_share={share}: must be in [0, 1]")
    wanted = {"version": PREP_VERSION, "data": json.loads((src / "manifest.json").read_text())["build_args"],
              "template_share": share}
    manifest = out / "manifest.json"
    if manifest.is_file() and json.loads(manifest.read_text()) == wanted:
        return out
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src / "people.sqlite", out / "people.sqlite")
    _write_jsonl(out / "sft_train.jsonl", bare_answers(_jsonl(src / "tool_train.jsonl"), share, args["seed"]))
    shutil.copyfile(src / "eval_train.jsonl", out / "eval_train.jsonl")
    ood = _jsonl(src / "eval_ood.jsonl")
    people = sorted({q["person"] for q in ood})
    if len(people) < 2:
        raise ConfigError(f"tags.ood={tags.get('ood')}: the RL split needs at least 2 OOD people")
    random.Random(f"split/{args['seed']}").shuffle(people)
    practise = set(people[:len(people) // 2])
    _write_jsonl(out / "rl_prompts.jsonl", [q for q in ood if q["person"] in practise])
    _write_jsonl(out / "eval_heldout.jsonl", [q for q in ood if q["person"] not in practise])
    manifest.write_text(json.dumps(wanted, indent=1, sort_keys=True) + "\n")
    log.info("RL data in %s: %d OOD people for GRPO, %d held out", out, len(practise), len(people) - len(practise))
    return out


def report(cfg: Config, sft: Config) -> dict[str, Any]:
    """Recall of the SFT model and of the GRPO model on each set, and the curves (``RUN/report/``)."""
    from lmlab.launch import read_summary
    from lmlab.monitor.metrics import read_metrics

    before, after = read_summary(sft.run_dir), read_summary(cfg.run_dir)
    sets = sorted({k.split("/")[1] for k in after if k.startswith("recall/") and k.endswith("/correct")})
    table = {s: {"sft": before.get(f"recall/{s}/correct"), "grpo": after.get(f"recall/{s}/correct")} for s in sets}
    rows = read_metrics(cfg.run_dir / "metrics.jsonl")
    out = cfg.run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    result = {"sft_run": str(sft.run_dir), "grpo_run": str(cfg.run_dir), "steps": after.get("step"),
              "recall": table, "train_time_s": after.get("train_time_s")}
    (out / "results.json").write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    train = [r for r in rows if "rl/reward" in r]
    for key, label in (("rl/reward", "reward"), ("rl/correct", "correct (sampled)"), ("rl/format", "template")):
        if train:
            axes[0].plot([r["step"] for r in train], [r[key] for r in train], label=label, lw=1)
    axes[0].set(xlabel="GRPO step", title="rollouts (temperature 1)")
    axes[0].legend()
    for s in sets:
        pts = [(r["step"], r[f"recall/{s}/correct"]) for r in rows if f"recall/{s}/correct" in r]
        pts = [(0, before.get(f"recall/{s}/correct"))] + pts if before.get(f"recall/{s}/correct") is not None else pts
        axes[1].plot(*zip(*pts), marker="o", ms=3, label=s)
    axes[1].set(xlabel="GRPO step", ylabel="recall (greedy, tool live)", ylim=(0, 1.02), title="recall")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)
    return result


@exit_on_config_error
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    paths = [a.split("=", 1)[1] for a in argv if a.startswith("config=")]
    if len(paths) != 1:
        print(__doc__)
        raise ConfigError("give exactly one config=PATH (then dotted.key=value overrides)")
    overrides = [a for a in argv if not a.startswith(("config=", "sft."))]
    sft_overrides = [a.removeprefix("sft.") for a in argv if a.startswith("sft.")]
    cfg = load_config(paths[0], overrides)
    if cfg.train.objective != "grpo":
        raise ConfigError(f"{paths[0]}: train.objective must be grpo for the RL app, got {cfg.train.objective!r}")
    sft_path = cfg.tags.get("sft_config")
    if not sft_path:
        raise ConfigError(f"{paths[0]}: tags.sft_config names the SFT config GRPO starts from")
    listed = cfg.tags.get("sft_overrides") or []
    if not isinstance(listed, list) or not all(isinstance(x, str) for x in listed):
        raise ConfigError(f"tags.sft_overrides must be a list of 'key=value' strings, got {listed!r}")
    sft = load_config(sft_path, [f"runs_dir={cfg.runs_dir}", f"seed={cfg.seed}", *listed, *sft_overrides])
    if str(sft.tags.get("rl_data")) != str(cfg.tags.get("rl_data")):
        raise ConfigError(f"tags.rl_data differs: {cfg.tags.get('rl_data')} ({paths[0]}) vs "
                          f"{sft.tags.get('rl_data')} ({sft_path}): GRPO must read the data its SFT run was made for")
    if Path(cfg.train.init_from) != sft.run_dir:
        raise ConfigError(f"train.init_from={cfg.train.init_from} is not the SFT run {sft.run_dir} of {sft_path}")
    prepare_rl_data(sft)
    s = build_trainer(sft).fit()
    if not str(s["status"]).startswith(("completed", "stopped by early stop")):
        log.warning("the SFT run ended with %r: rerun to resume it", s["status"])
        return 1
    g = build_trainer(cfg).fit()
    if not str(g["status"]).startswith(("completed", "stopped by early stop")):
        log.warning("the GRPO run ended with %r: rerun to resume it", g["status"])
        return 1
    result = report(cfg, sft)
    print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
