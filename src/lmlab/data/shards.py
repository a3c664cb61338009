"""Token shards: a corpus tokenized once into a flat numpy memmap file plus a small JSON metadata file.

A shard is a folder holding ``tokens.bin`` (the token stream, uint16 when the vocabulary has at most
65536 ids, else uint32) and ``meta.json`` (format, dtype, number of tokens, tokenizer, source files).
The stream is exactly what :func:`lmlab.data.text.encode_files` gives for the same files, separator and
tokenizer, so the text and shard paths serve identical windows. Reading is zero-copy: windows are read
from the memmap, and a :class:`ShardTokens` pickles as file names (a prefetch process reopens the map).
Writing is atomic: an interrupted run leaves no half shard behind.

Usage (command line)::

    python -m lmlab.data.shards --tokenizer byte --out data/shakespeare corpus/*.txt
    python -m lmlab.data.shards --tokenizer tiktoken --tokenizer-path gpt2.tiktoken --out data/web web/*.txt

Usage (Python)::

    from lmlab.data.shards import open_shard, write_shard
    write_shard(["a.txt", "b.txt"], tokenizer, "data/ab")
    tokens = open_shard("data/ab", tokenizer)     # ShardTokens: len(tokens), tokens.take(idx), tokens[a:b]
    # in a config: data.kind=shards data.train_files=[data/ab]
"""

from __future__ import annotations

import argparse
import codecs
import json
import logging
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lmlab.data.base import expand_files, token_dtype
from lmlab.data.errors import DataError
from lmlab.data.text import read_text

__all__ = ["FORMAT", "ShardTokens", "load_shards", "main", "open_shard", "tokenizer_info", "write_shard"]

log = logging.getLogger(__name__)

FORMAT = "lmlab-shard/1"
META = "meta.json"
BIN = "tokens.bin"


def tokenizer_info(tokenizer: Any, **extra: Any) -> dict[str, Any]:
    """What the metadata records about a tokenizer (its class and size, plus e.g. its config)."""
    info: dict[str, Any] = {"class": type(tokenizer).__name__, "vocab_size": int(tokenizer.vocab_size)}
    specials = getattr(tokenizer, "special_tokens", None)
    if isinstance(specials, dict):
        info["special_tokens"] = {str(k): int(v) for k, v in specials.items()}
    info.update(extra)
    return info


def write_shard(
    files: Sequence[str | os.PathLike],
    tokenizer: Any,
    out_dir: str | os.PathLike,
    separator: str = "\n",
    info: dict[str, Any] | None = None,
    progress: bool = True,
) -> Path:
    """Tokenize ``files`` (paths or globs, joined with ``separator``) into a shard folder; return meta.json's path.

    The folder is built beside ``out_dir`` and renamed into place at the end; an existing shard is replaced.
    """
    paths = expand_files(files, "shard input files")
    out = Path(out_dir)
    vocab = int(tokenizer.vocab_size)
    dtype = token_dtype(vocab)
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    sep = _encode_checked(tokenizer, separator, vocab, "the separator") if separator else np.zeros(0, np.int64)
    sources = []
    total = 0
    sizes = [p.stat().st_size for p in paths]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(sizes), unit="B", unit_scale=True, desc=f"tokenizing into {out}")
    try:
        with open(tmp / BIN, "wb") as f:
            for i, (p, size) in enumerate(zip(paths, sizes)):
                if i and len(sep):
                    sep.astype(dtype).tofile(f)
                    total += len(sep)
                ids = _encode_checked(tokenizer, read_text(p), vocab, str(p))
                ids.astype(dtype).tofile(f)
                total += len(ids)
                sources.append({"path": str(p), "bytes": size, "tokens": len(ids)})
                if bar is not None:
                    bar.update(size)
                    bar.set_postfix(tokens=total)
        if total == 0:
            raise DataError(f"the corpus {[str(p) for p in paths]} encodes to no tokens")
        meta = {
            "format": FORMAT,
            "dtype": dtype.name,
            "num_tokens": total,
            "tokenizer": info if info is not None else tokenizer_info(tokenizer),
            "separator": separator,
            "sources": sources,
        }
        (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if bar is not None:
            bar.close()
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    log.info("wrote %d tokens (%s) from %d files to %s", total, dtype.name, len(paths), out)
    return out / META


def _encode_checked(tokenizer: Any, text: str, vocab: int, what: str) -> np.ndarray:
    ids = np.asarray(tokenizer.encode(text), dtype=np.int64)
    if len(ids) and (ids.min() < 0 or ids.max() >= vocab):
        bad = int(ids.max() if ids.max() >= vocab else ids.min())
        raise DataError(f"{what}: the tokenizer produced id {bad}, outside its vocabulary of {vocab} ids")
    return ids


class ShardTokens:
    """A read-only token stream over one or more shards, zero-copy (numpy memmaps opened lazily).

    Supports ``len()``, ``take(indices) -> int64 array``, ``[i]`` and contiguous slices ``[a:b]`` (a view
    of the same files). Pickling keeps only the file names, so a prefetch process reopens the maps.
    """

    def __init__(self, parts: Sequence[tuple[str, str, int]], start: int = 0, stop: int | None = None) -> None:
        self.parts = [(str(p), str(d), int(n)) for p, d, n in parts]
        self.cum = np.concatenate([[0], np.cumsum([n for _, _, n in self.parts])]).astype(np.int64)
        self.start = int(start)
        self.stop = int(self.cum[-1] if stop is None else stop)
        self._maps: list[np.memmap] | None = None

    def __len__(self) -> int:
        return self.stop - self.start

    def _memmaps(self) -> list[np.memmap]:
        if self._maps is None:
            self._maps = [np.memmap(p, dtype=d, mode="r", shape=(n,)) for p, d, n in self.parts]
        return self._maps

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_maps": None}

    def __getitem__(self, key: int | slice) -> Any:
        if isinstance(key, slice):
            a, b, step = key.indices(len(self))
            if step != 1:
                raise ValueError("ShardTokens supports contiguous slices only")
            return ShardTokens(self.parts, self.start + a, self.start + max(a, b))
        i = int(key) + (len(self) if int(key) < 0 else 0)
        return int(self.take(np.array([i]))[0])

    def take(self, indices: Any) -> np.ndarray:
        """Tokens at ``indices`` (any shape) as int64; reads only those positions from disk."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"token index out of range for a stream of {len(self)} tokens")
        g = idx + self.start
        maps = self._memmaps()
        if len(maps) == 1:
            return maps[0][g].astype(np.int64)
        out = np.empty(idx.shape, dtype=np.int64)
        which = np.searchsorted(self.cum[1:], g, side="right")
        for p in np.unique(which).tolist():
            sel = which == p
            out[sel] = maps[p][g[sel] - self.cum[p]]
        return out

    def array(self) -> np.ndarray:
        """The whole stream as one array: a zero-copy memmap view for one shard, a copy for several."""
        maps = self._memmaps()
        if len(maps) == 1:
            return maps[0][self.start : self.stop]
        return np.concatenate(maps)[self.start : self.stop]


def open_shard(path: str | os.PathLike, tokenizer: Any = None) -> ShardTokens:
    """Open a shard folder (or its meta.json), checking it against its metadata and, if given, ``tokenizer``."""
    p = Path(path)
    meta_path = p / META if p.is_dir() else p
    if not meta_path.is_file():
        raise DataError(f"{p}: no {META} here; is it a shard folder written by `python -m lmlab.data.shards`?")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{meta_path}: cannot read the shard metadata ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise DataError(f"{meta_path}: not a shard metadata file of format {FORMAT!r} (format: {got!r})")
    for key, tp in (("dtype", str), ("num_tokens", int), ("tokenizer", dict)):
        if not isinstance(meta.get(key), tp):
            raise DataError(f"{meta_path}: metadata key {key!r} is missing or not a {tp.__name__}")
    dtype_name, n = meta["dtype"], meta["num_tokens"]
    if dtype_name not in ("uint16", "uint32"):
        raise DataError(f"{meta_path}: dtype {dtype_name!r} is not uint16 or uint32")
    vocab = meta["tokenizer"].get("vocab_size")
    if isinstance(vocab, int) and token_dtype(vocab).name != dtype_name:
        raise DataError(
            f"{meta_path}: metadata mismatch: dtype {dtype_name} but a vocabulary of {vocab} ids is stored "
            f"as {token_dtype(vocab).name}"
        )
    if n <= 0:
        raise DataError(f"{meta_path}: the shard holds no tokens")
    if tokenizer is not None and vocab != int(tokenizer.vocab_size):
        raise DataError(
            f"{meta_path}: the shard was written with a tokenizer of {vocab} ids "
            f"({meta['tokenizer'].get('class', '?')}), but the tokenizer in use ({type(tokenizer).__name__}) has "
            f"{tokenizer.vocab_size}; rebuild the shard with this tokenizer"
        )
    bin_path = meta_path.parent / BIN
    if not bin_path.is_file():
        raise DataError(f"{bin_path}: the token file of shard {meta_path} is missing")
    itemsize = np.dtype(dtype_name).itemsize
    expected, actual = n * itemsize, bin_path.stat().st_size
    if actual < expected:
        raise DataError(
            f"{bin_path}: truncated: {META} says {n} {dtype_name} tokens ({expected} bytes) but the file has "
            f"{actual} bytes"
        )
    if actual != expected:
        raise DataError(
            f"{bin_path}: size mismatch: {META} says {n} {dtype_name} tokens ({expected} bytes) but the file has "
            f"{actual} bytes (written with another dtype or metadata?)"
        )
    return ShardTokens([(str(bin_path), dtype_name, n)])


def load_shards(
    patterns: Sequence[str | os.PathLike], tokenizer: Any = None, what: str = "data.train_files"
) -> ShardTokens:
    """Open the shards named by paths or globs (folders or meta.json files) as one stream, in order."""
    parts: list[tuple[str, str, int]] = []
    for p in expand_files(patterns, what, allow_dirs=True):
        parts.extend(open_shard(p, tokenizer).parts)
    return ShardTokens(parts)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lmlab.data.shards",
        description="Pretokenize text files into a token shard (tokens.bin + meta.json) for data.kind=shards.",
    )
    parser.add_argument("files", nargs="+", help="text files or glob patterns, joined in order with --separator")
    parser.add_argument("--out", required=True, help="shard folder to write (replaced if it exists)")
    parser.add_argument("--tokenizer", default="byte", help="tokenizer kind: byte, tiktoken or hf")
    parser.add_argument("--tokenizer-path", default="", help="tiktoken BPE file or HF tokenizer.json")
    parser.add_argument("--encoding", default="", help="tiktoken: registered encoding name when no path is given")
    parser.add_argument("--pattern", default="gpt2", help="tiktoken: pre-tokenizer regex name or literal")
    parser.add_argument("--separator", default="\\n", help="text between files, with escapes (default: \\n)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        from lmlab.config import TokenizerConfig, config_from_dict
        from lmlab.tokenizers import build_tokenizer

        tcfg = config_from_dict(
            {"kind": args.tokenizer, "path": args.tokenizer_path, "encoding": args.encoding, "pattern": args.pattern},
            TokenizerConfig,
        )
        tokenizer = build_tokenizer(tcfg)
        # unicode_escape reads bytes as latin-1: escape what latin-1 lacks so that e.g. "→" survives
        separator = codecs.decode(args.separator.encode("latin-1", "backslashreplace"), "unicode_escape")
        info = tokenizer_info(tokenizer, config=dict(vars(tcfg)))
        meta = write_shard(args.files, tokenizer, args.out, separator, info=info, progress=not args.quiet)
    except (ValueError, OSError) as e:  # DataError and ConfigError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"shard": str(meta.parent), **{k: v for k, v in json.loads(meta.read_text()).items()
                                                     if k in ("dtype", "num_tokens")}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
