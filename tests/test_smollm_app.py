"""apps/smollm/pretrain.py: the BPE model's validation bytes are exactly the byte-level Shakespeare model's."""

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "apps" / "smollm"))


def test_split_and_shards_give_the_byte_models_validation_bytes(tmp_path):
    import pretrain

    from lmlab.config import load_config
    from lmlab.data.base import expand_files
    from lmlab.data.shards import open_shard
    from lmlab.data.text import encode_files, split_tokens
    from lmlab.tokenizers import ByteTokenizer, build_tokenizer

    overrides = pretrain.tokenizer_overrides("gpt2", tmp_path)
    extra = pretrain.prepare(overrides, tmp_path, "gpt2")
    assert extra == [f"data.train_files=[{tmp_path / 'train_gpt2'}]", f"data.val_files=[{tmp_path / 'val_gpt2'}]"]
    # the byte pipeline of apps/shakespeare/quick.yaml: the same files, separator and val_fraction
    byte = ByteTokenizer()
    stream = encode_files(expand_files([pretrain.CORPUS]), byte, separator=pretrain.SEPARATOR)
    train_b, val_b = split_tokens(stream, pretrain.VAL_FRACTION)
    assert bytes(np.asarray(val_b, dtype=np.uint8)) == (tmp_path / "val.txt").read_bytes()
    assert bytes(np.asarray(train_b, dtype=np.uint8)) == (tmp_path / "train.txt").read_bytes()
    # the BPE shard of the validation part decodes to those bytes, and its byte lengths add up to them
    tok = build_tokenizer(load_config(None, overrides).tokenizer)
    val = open_shard(tmp_path / "val_gpt2", tok)
    ids = [int(t) for t in val[0:len(val)]]
    assert tok.decode(ids).encode() == (tmp_path / "val.txt").read_bytes()
    lengths = tok.token_byte_lengths()
    assert sum(lengths[t] for t in ids) == (tmp_path / "val.txt").stat().st_size == 505_728
    meta = json.loads((tmp_path / "val_gpt2" / "meta.json").read_text())
    assert meta["num_tokens"] == len(ids) < 505_728 / 3  # ~3 bytes per GPT-2 token
    # a second call reuses the files
    mtime = (tmp_path / "val_gpt2" / "meta.json").stat().st_mtime_ns
    pretrain.prepare(overrides, tmp_path, "gpt2")
    assert (tmp_path / "val_gpt2" / "meta.json").stat().st_mtime_ns == mtime
