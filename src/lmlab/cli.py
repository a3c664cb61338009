"""The ``lmlab`` command line.

Usage::

    lmlab train apps/shakespeare/quick.yaml train.steps=100  # train (resumes runs/NAME if it has a checkpoint)
    lmlab generate runs/NAME --prompt "ROMEO:" --temperature 0.8 --top-p 0.95 --seed 1  # streams the text
    lmlab generate runs/NAME --prompts-file prompts.txt --max-new-tokens 100  # one prompt per line (or .jsonl)
    lmlab generate runs/smol --chat "What is the capital of France?"   # a dialog turn (no message: stdin lines)
    lmlab import SmolLM2-135M-Instruct.Q4_1.gguf --out runs/smol   # a GGUF / HF Llama folder / hub id -> run folder
    lmlab eval runs/NAME --max-questions 0                  # fact recall, SQL tool live (the run's evals.recall)
    lmlab export runs/NAME out/                              # Hugging Face Llama folder of the newest checkpoint
    lmlab config apps/shakespeare/demo.yaml model.dim=128   # print the resolved config as YAML
    lmlab grid my_grid.yaml                                  # list a grid's runs: done / partial / new
    lmlab grid my_grid.yaml --run --jobs 2                   # train the unfinished ones, 2 at a time
    lmlab grid my_grid.yaml train.steps=500 --run --threads 4  # overrides before the flags
    lmlab describe                                           # every config key with its type, default, help
    lmlab shards --tokenizer byte --out data/shk FILES...    # pretokenize a corpus (see lmlab.data.shards)
    lmlab plot 'runs/memory/*' --x step --y loss --by tags.mode --out out/loss.png   # curves grouped by a key
    lmlab sync runs/NAME --to tensorboard                    # replay metrics.jsonl into TensorBoard (or wandb)
    lmlab profile runs/NAME                                  # top operators of the run's torch.profiler trace
    lmlab report 'runs/memory/*' --by tags.mode --out out/report   # HTML report: table, curves, probes, timings

Config problems (unknown key, wrong type, bad YAML) and bad usage (a bad option value, a prompt that does not
fit the context) print one line and exit with status 2; bad data or state (a data file, a non-finite loss, an
unreadable checkpoint) print one line and exit with status 1; a training run stopped by SIGINT/SIGTERM saves
a checkpoint and exits with 128 + the signal number.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

import yaml

from lmlab.config import config_to_dict, describe, exit_on_config_error, load_config, load_grid

log = logging.getLogger("lmlab")


def _cmd_config(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    sys.stdout.write(yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True))
    return 0


def _cmd_grid(args: argparse.Namespace) -> int:
    from lmlab.launch import GridInterrupted, run_grid, run_state

    if args.jobs < 1 or (args.threads is not None and args.threads < 1):
        print("error: --jobs and --threads must be >= 1", file=sys.stderr)
        return 2
    configs = load_grid(args.config, args.overrides)
    if args.slurm or args.dry_run:
        from lmlab.launch.slurm import SlurmError, describe_submission, submit_grid

        if args.dry_run:
            print(describe_submission(configs))
            return 0
        try:
            submit_grid(configs)
        except SlurmError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    if not args.run:
        from lmlab.launch.local import read_attempt
        from lmlab.launch.slurm import job_log, read_jobs, slurm_states

        states = [run_state(cfg.run_dir, cfg.train.steps) for cfg in configs]
        jobs = read_jobs(configs)
        queued = slurm_states(list(jobs.values()))
        width = max(len(cfg.name) for cfg in configs)
        for cfg, state in zip(configs, states):
            job = jobs.get(cfg.name)
            extra = ""
            if job is not None:
                slurm = queued.get(job) or ("failed" if _slurm_failed(cfg.run_dir) else "not in the queue")
                extra = f"  slurm job {job}: {slurm}; log {job_log(cfg.run_dir)}"
            attempt = read_attempt(cfg.run_dir)["attempt"]  # train.restart: a run on its k-th start over
            tried = f" (attempt {attempt}: restarted {attempt}x)" if attempt else ""
            print(f"{cfg.name:<{width}}  {state}{tried}{extra}")
        counts = ", ".join(f"{states.count(s)} {s}" for s in ("done", "partial", "new") if states.count(s))
        print(f"{len(configs)} runs: {counts} (--run to train the unfinished ones here, --slurm to submit them)")
        return 0
    try:
        outcomes = run_grid(configs, jobs=args.jobs, threads=args.threads)
    except GridInterrupted as e:
        return e.report()
    return 1 if any(o.status == "failed" for o in outcomes) else 0


def _slurm_failed(run_dir: str | os.PathLike) -> bool:
    """A run whose Slurm job left the queue without finishing: its summary says neither done nor interrupted."""
    from lmlab.launch import read_summary

    status = str(read_summary(run_dir).get("status", ""))
    return not status.startswith(("completed", "stopped", "interrupted"))


def _cmd_train(args: argparse.Namespace) -> int:
    from lmlab.train import train_run

    cfg = load_config(args.config, args.overrides)
    try:
        summary = train_run(cfg)
    finally:
        distributed = _leave_process_group()
    print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))
    rc = 0
    if summary["status"].startswith("interrupted by "):
        rc = 128 + signal.Signals[summary["status"].split()[-1]].value
    if distributed:  # everything is saved; skip interpreter teardown, where torch.distributed's threads sometimes
        _exit_now(rc)  # abort the process ("terminate called without an active exception": seen in 2 test-suite runs)
    return rc


def _exit_now(rc: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(rc)


def _leave_process_group() -> bool:
    """Under torchrun: wait for every process, then close the process group (a process leaving while another
    still talks to it makes gloo abort the other). True when there was one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()
        return True
    return False


def _generate_across_processes(engine: Any, prompts: list[str], params: Any) -> int:
    """Prompts split across the processes torchrun started (each with the whole model), completions gathered and
    printed by rank 0 in prompt order: the same text as one process (each row keeps its own seed)."""
    import torch.distributed as dist

    from lmlab.comm import split_gather
    from lmlab.inference.sampling import row_params

    dist.init_process_group("nccl" if engine.pool.device.type == "cuda" else "gloo")
    try:
        rows = list(zip(prompts, row_params(params, len(prompts))))
        texts = split_gather(rows, lambda mine: engine.generate_text([p for p, _ in mine], [r for _, r in mine])
                             if mine else [])
        if dist.get_rank() == 0:
            for i, (prompt, text) in enumerate(zip(prompts, texts)):
                print(f"=== {i}\n{prompt}{text}")
    finally:
        _leave_process_group()
    _exit_now(0)
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from lmlab.inference.engine import Engine
    from lmlab.inference.sampling import SamplingParams, read_prompts
    from lmlab.train.checkpoint import load_run

    if args.chat is not None:
        if args.prompt or args.prompts_file:
            raise UsageError("--chat takes the message itself (or reads them from stdin): drop --prompt / "
                             "--prompts-file")
        return _chat(args)
    prompts = list(args.prompt or [])
    if args.prompts_file:
        prompts += read_prompts(args.prompts_file)
    cfg, model, tokenizer = load_run(args.run, step=args.step)
    if not prompts:
        prompts = list(cfg.sample.prompts)
    if not prompts:
        raise UsageError("no prompt: pass --prompt TEXT or --prompts-file FILE (the run's sample.prompts is empty)")
    given = {k: v for k, v in (("max_new_tokens", args.max_new_tokens), ("temperature", args.temperature),
                               ("top_k", args.top_k), ("top_p", args.top_p), ("seed", args.seed)) if v is not None}
    params = _checked(lambda: SamplingParams.from_config(cfg.sample, cfg.seed, **given))
    engine = Engine.from_config(model, tokenizer, cfg.engine)
    if args.max_new_tokens is None:  # the run's default may not fit after a long prompt: cap it, and say so
        room = engine.context_limit - max(len(tokenizer.encode(p)) for p in prompts)
        if 0 < room < params.max_new_tokens:
            log.info("sample.max_new_tokens=%d capped to %d: the longest prompt leaves %d of the model's %d "
                     "tokens of context (--max-new-tokens N to choose)", params.max_new_tokens, room, room,
                     engine.context_limit)
            params = dataclasses.replace(params, max_new_tokens=room)
    _checked(lambda: engine.text_requests(prompts, params))  # every prompt fits, before any output
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun: each process answers its share of the prompts
        return _generate_across_processes(engine, prompts, params)
    if len(prompts) == 1:  # stream one completion as it is generated
        sys.stdout.write(prompts[0])
        engine.generate_text(prompts, params, on_text=lambda row, piece: (sys.stdout.write(piece), sys.stdout.flush()))
        sys.stdout.write("\n")
        return 0
    for i, (prompt, text) in enumerate(zip(prompts, engine.generate_text(prompts, params))):
        print(f"=== {i}\n{prompt}{text}")
    return 0


def _chat(args: argparse.Namespace) -> int:
    """``lmlab generate RUN --chat [MESSAGE]``: the assistant's reply to one user message, or (no message) a
    conversation read from stdin, one user message per line; turns rendered by the run's dialog format."""
    import itertools

    from lmlab.inference.engine import Engine, Request
    from lmlab.inference.sampling import SamplingParams, TextStream
    from lmlab.tokenizers import DialogTokenizer
    from lmlab.train.checkpoint import load_run

    cfg, model, tokenizer = load_run(args.run, step=args.step)
    dtok = _checked(lambda: DialogTokenizer(tokenizer))
    given = {k: v for k, v in (("max_new_tokens", args.max_new_tokens), ("temperature", args.temperature),
                               ("top_k", args.top_k), ("top_p", args.top_p), ("seed", args.seed)) if v is not None}
    params = _checked(lambda: SamplingParams.from_config(cfg.sample, cfg.seed, **given))
    engine = Engine.from_config(model, dtok, cfg.engine)
    history: list[dict[str, str]] = []

    def reply(message: str) -> None:
        history.append({"source": "user", "content": message})
        p = params
        if args.max_new_tokens is None:  # the run's default, capped to the room the conversation leaves
            room = engine.context_limit - len(dtok.encode_prompt(history))
            if 0 < room < p.max_new_tokens:
                p = dataclasses.replace(p, max_new_tokens=room)
        stream = TextStream(tokenizer, 1, lambda row, piece: (sys.stdout.write(piece), sys.stdout.flush()))
        new: list[int] = []
        events = engine.stream([Request(dialog=list(history), params=p)])
        first = _checked(lambda: next(events))  # the request is checked (it fits the context) before any output
        for ev in itertools.chain([first], events):
            if ev.result is not None:
                done = ev.result.tokens[:-1] if ev.result.finish_reason == "stop" else ev.result.tokens
                stream.push(0, done, final=True)
                history.append({"source": "assistant", "content": ev.result.text or ""})
            elif ev.tokens:
                new += ev.tokens
                if new[-1] not in dtok.stop_ids:
                    stream.push(0, new)
        sys.stdout.write("\n")
        sys.stdout.flush()

    if args.chat:
        reply(args.chat)
        return 0
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            sys.stderr.write("> ")
            sys.stderr.flush()
        line = sys.stdin.readline()
        if not line:
            return 0
        if line.strip():
            reply(line.rstrip("\n"))


def _checked(make):
    """``make()``, with a ValueError (a bad sampling setting or prompt) turned into a usage error."""
    try:
        return make()
    except ValueError as e:
        raise UsageError(str(e)) from None


def _cmd_eval(args: argparse.Namespace) -> int:
    import json

    from lmlab.evals.recall import run_recall_sets
    from lmlab.train.checkpoint import load_run, step_of

    cfg, model, tokenizer, path = load_run(args.run, step=args.step, with_path=True)
    changes = {k: v for k, v in (("sets", args.set), ("db", args.db), ("max_questions", args.max_questions),
                                 ("procs", args.procs), ("max_batch", args.max_batch),
                                 ("max_new_tokens", args.max_new_tokens)) if v is not None}
    if args.procs is None and sys.platform.startswith("linux") and next(model.parameters()).device.type == "cpu":
        from lmlab.launch.local import usable_cpus

        # standalone, the evaluation has the machine: one process per usable core, shared with the other ranks of
        # this machine under torchrun (the run's setting is for the evaluations during training, which share the
        # cores with the other runs of a grid)
        share = usable_cpus() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE") or 1))
        changes["procs"] = max(cfg.evals.recall.procs, share, 1)
    rc = dataclasses.replace(cfg.evals.recall, **changes)
    for key, msg in rc.check():
        raise UsageError(f"--{key.replace('_', '-')}: {msg}")
    if not rc.sets:
        raise UsageError("no recall sets: the run's config has no evals.recall.sets; pass --set FILE")
    step = step_of(path)
    # a folder of its own: the training-time evaluation of the same step (other sets, fewer questions) is kept
    folder = Path(args.run) / "recall" / "eval"
    metrics = run_recall_sets(model, tokenizer, rc, cfg.engine, out_dir=folder, step=step)
    print(f"step {step}, answered by {rc.procs} processes (one thread each)" if rc.procs > 1
          else f"step {step}, answered by one process")
    for key, value in metrics.items():
        print(f"{key:32s} {value:.4f}" if isinstance(value, float) else f"{key:32s} {value}")
    folder.mkdir(parents=True, exist_ok=True)  # (with evals.recall.save_outputs false nothing else made it)
    out = folder / f"metrics_step{step}.json"
    out.write_text(json.dumps({"step": step, **metrics}, indent=1, sort_keys=True) + "\n")
    print(f"wrote {out}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from lmlab.hf import hf_tokenizer_files, save_hf_folder
    from lmlab.models.lora import has_lora, merge_lora
    from lmlab.train.checkpoint import load_run

    cfg, model, _ = load_run(args.run, step=args.step)
    if has_lora(model):  # a LoRA finetune exports as the plain model it computes (updates folded into the weights)
        merge_lora(model)
    # an hf tokenizer goes along (tokenizer.json, tokenizer_config.json with the chat template): AutoTokenizer loads it
    files, ids = hf_tokenizer_files(cfg.tokenizer) if cfg.tokenizer.kind == "hf" else ({}, {})
    out = save_hf_folder(model, args.out, extra_files=files, extra_config=ids)
    print(f"wrote {out}: " + ", ".join(["config.json", "model.safetensors", *files]))
    return 0


def _cmd_describe(args: argparse.Namespace) -> int:
    print("\n".join(describe()))
    return 0


EXIT_CODES = """exit status: 0 done; 1 bad data or state (a data file, a checkpoint, a non-finite loss), one line on
stderr; 2 bad usage or config (an unknown key, a wrong value), one line on stderr."""
TRAIN_EPILOG = """The run folder is RUNS_DIR/NAME (the config's runs_dir and name; default runs/run): config.yaml,
metrics.jsonl, checkpoints/, summary.json. Running the same command again resumes from the newest checkpoint,
or only says so when the run is finished; a changed model or tokenizer is refused before anything is written.

""" + EXIT_CODES + """
128 + N: stopped by signal N (SIGINT, SIGTERM) after saving a checkpoint; run it again to go on."""


class UsageError(Exception):
    """A command used wrongly (a bad option value, a prompt that does not fit): one line, exit status 2."""


# Commands whose module parses its own arguments: name -> (module with main(argv) -> int, help)
DELEGATED = {
    "shards": ("lmlab.data.shards", "pretokenize a corpus into token shards"),
    "plot": ("lmlab.analysis.plot", "plot metrics of many runs (curves by a config key, final values vs a key)"),
    "sync": ("lmlab.monitor.sync", "replay a run's metrics.jsonl into wandb or TensorBoard"),
    "profile": ("lmlab.monitor.profiler", "print the top operators of a run's torch.profiler trace"),
    "import": ("lmlab.pretrained", "import a pretrained Llama (GGUF file, Hugging Face folder or hub id) into a run "
               "folder"),
    "report": ("lmlab.analysis.run_report", "one self-contained HTML report of many runs: summary table, curves, "
               "final values, probes, timings"),
    "lm-eval": ("lmlab.evals.harness", "score a run on lm-evaluation-harness tasks (loglikelihood, rolling "
                "perplexity, generation through the engine)"),
}


def _user_errors() -> tuple[type[Exception], ...]:
    from lmlab.data import DataError
    from lmlab.hf import ExportError
    from lmlab.pretrained import PretrainedError
    from lmlab.train import TrainingError
    from lmlab.train.checkpoint import CheckpointError

    return DataError, TrainingError, CheckpointError, ExportError, PretrainedError, FileNotFoundError


@exit_on_config_error
def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return _main(argv)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except _user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # the reader went away (`lmlab describe | head`): stop quietly, as Unix tools do
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so that flushing stdout at exit does not fail again
        return 128 + signal.SIGPIPE


def _main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DELEGATED:  # commands that own their parser (imported only when used)
        import importlib

        return importlib.import_module(DELEGATED[argv[0]][0]).main(argv[1:]) or 0
    parser = argparse.ArgumentParser(prog="lmlab", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    fmt = argparse.RawDescriptionHelpFormatter
    for name, fn, help_, epilog in (
        ("train", _cmd_train, "train a model (resumes from the run folder's newest checkpoint)", TRAIN_EPILOG),
        ("config", _cmd_config, "print the resolved config of a YAML file with overrides", None),
        ("grid", _cmd_grid, "list a grid's runs and their state (done / partial / new); --run trains them", None),
    ):
        p = sub.add_parser(name, help=help_, description=help_, epilog=epilog, formatter_class=fmt)
        p.add_argument("config", help="YAML config file")
        p.add_argument("overrides", nargs="*", help="dotted.key=value overrides (`lmlab describe` lists the keys)")
        p.set_defaults(fn=fn)
        if name == "grid":
            p.add_argument("--run", action="store_true", help="train every unfinished run (resuming partial ones)")
            p.add_argument("--jobs", type=int, default=1, help="runs at once (default 1)")
            p.add_argument("--threads", type=int, default=None, help="CPU threads per run (default cores // jobs)")
            p.add_argument("--slurm", action="store_true", help="submit the unfinished runs to Slurm (submitit): one "
                           "array job, resources from launch.slurm")
            p.add_argument("--dry-run", action="store_true", help="with --slurm: print the array job(s) and their "
                           "size, submit nothing")
    p = sub.add_parser("generate", help="sample from a run's checkpoint with the generation engine",
                       description="Sample from a run's checkpoint with the generation engine. Unset options take "
                                   "the run's sample: section (config.yaml).", epilog=EXIT_CODES, formatter_class=fmt)
    p.add_argument("run", help="run folder (runs/NAME)")
    p.add_argument("--prompt", action="append", help="a prompt (repeatable; default: the run's sample.prompts)")
    p.add_argument("--prompts-file", help="prompts, one per line (or a .jsonl of strings / {prompt: ...}), "
                   "after any --prompt (default: none)")
    p.add_argument("--max-new-tokens", type=int, help="tokens generated per prompt at most (default: the run's "
                   "sample.max_new_tokens, capped to what fits in model.max_seq_len after the prompt)")
    p.add_argument("--temperature", type=float, help="softmax temperature, >= 0; 0 = greedy (default: the run's "
                   "sample.temperature)")
    p.add_argument("--top-k", type=int, help="sample among the k most likely tokens; 0 = all (default: the run's "
                   "sample.top_k)")
    p.add_argument("--top-p", type=float, help="nucleus sampling mass in (0, 1]; 1 = off (default: the run's "
                   "sample.top_p)")
    p.add_argument("--seed", type=int, help="sampling seed; prompt i uses seed + i (default: sample.seed, else "
                   "the run's seed)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    p.add_argument("--chat", nargs="?", const="", default=None, metavar="MESSAGE",
                   help="chat: the assistant's reply to MESSAGE as a user turn (the run's tokenizer.chat_format and "
                        "system_prompt); without MESSAGE, a conversation read from stdin, one user message per line")
    p.set_defaults(fn=_cmd_generate)
    p = sub.add_parser("eval", help="recall evaluation (lmlab.evals.recall) of a run's checkpoint, tool live; "
                                    "writes RUN/recall/eval/", epilog=EXIT_CODES, formatter_class=fmt)
    p.add_argument("run", help="run folder (runs/NAME)")
    p.add_argument("--set", action="append", help="a JSONL recall set (repeatable; default: the run's evals.recall)")
    p.add_argument("--db", help="SQLite database for the SQL tool (default: the run's evals.recall.db)")
    p.add_argument("--max-questions", type=int, help="questions per set, >= 0; 0: all (default: the run's "
                   "evals.recall.max_questions)")
    p.add_argument("--procs", type=int, help="processes answering, one thread each (forked, Linux), >= 1 (default, "
                   "on Linux for a CPU model: one per usable core, at least the run's evals.recall.procs; else the "
                   "run's)")
    p.add_argument("--max-batch", type=int, help="questions decoded together at most, >= 0; 0: the run's "
                   "engine.max_batch (default: the run's evals.recall.max_batch)")
    p.add_argument("--max-new-tokens", type=int, help="tokens sampled per question at most, > 0 (default: the run's "
                   "evals.recall.max_new_tokens)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    p.set_defaults(fn=_cmd_eval)
    p = sub.add_parser("export", help="write a Hugging Face Llama folder from a run's checkpoint", epilog=EXIT_CODES,
                       formatter_class=fmt)
    p.add_argument("run", help="run folder (runs/NAME)")
    p.add_argument("out", help="output folder (created; config.json and model.safetensors are written into it, and "
                   "the tokenizer files of a tokenizer.kind hf run)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    p.set_defaults(fn=_cmd_export)
    p = sub.add_parser("describe", help="list every config key with its type, default and help")
    p.set_defaults(fn=_cmd_describe)
    for name, (_, help_) in DELEGATED.items():
        sub.add_parser(name, help=f"{help_} (lmlab {name} --help)")
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    raise SystemExit(main())
