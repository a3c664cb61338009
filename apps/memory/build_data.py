"""Build one memory-app dataset: synthetic people, their SQLite database, in-weight and in-tool dialogs, evals.

Usage::

    .venv/bin/python apps/memory/build_data.py --people 256 --ood 128 --seed 0 --out data/memory/p256
    .venv/bin/python apps/memory/build_data.py --people 100000 --ood 1000 --paraphrases 1 --alpha 0.5 --out DIR

or from Python: ``from memory.build_data import build_dataset; manifest = build_dataset(out, 256, 128, seed=0)``.

Files written into ``--out`` (JSONL lines have sorted keys and end in "\\n"; the same arguments give
byte-identical files, the SQLite file included; ``--seed`` is the data seed, independent of model seeds):

* ``people.jsonl``, ``ood_people.jsonl``: one person per line (``memory.people.make_people``); training people
  use in-distribution names only, OOD people OOD names only.
* ``people.sqlite``: table ``people`` with the training people then the OOD people (new people added to the
  database: a tool user can answer about them, an in-weight model cannot).
* ``weight_train.jsonl``: in-weight (question -> answer) dialogs, for each training person and attribute
  ``--paraphrases`` dialogs
  with distinct question paraphrases and random answer paraphrases: ``{"dialog": [user, assistant], "kind": "fact"}``
  (every training line names its kind: ``fact``, ``absent`` or ``practice``; ``data.lead_kinds`` can put the
  copying ones first, see quickstart.yaml).
* with ``--absent K``: the in-tool file also holds one question about each of K people absent from the
  database (in-distribution names, none of them a training person): the query, ``no rows`` and "There is no
  record of NAME in the database." (or one of two paraphrases that put the name first or last, as the fact
  answers do). They hold no fact; they show the tool user many more names than the training people (with 64
  people, a model otherwise learns the 64 names by heart instead of copying the asked name into its query, and
  fails on every new person). With ``--absent-in-weight`` the in-weight file gets the same questions, answered
  "I do not know NAME." (or a paraphrase); by default it holds facts only, so that an in-weight run spends
  all its steps on facts (with 4,096 absent questions and 64 people they would be 76% of its dialogs).
* with ``--practice K``: the in-tool file also holds one question about each of K *practice people*
  (in-distribution names, none of them a training or absent person; ``practice_people.jsonl``) who live in a
  database of their own, ``practice.sqlite``, not in ``people.sqlite``: the query, the row that database returns,
  and the answer sentence. Each is asked about once, so there is nothing to memorise; they give a tool user
  thousands of distinct names *and values* to copy. The absent questions teach copying names only, and with 64
  training people the values copied from the database into answers are those of 320 facts, few enough for the
  model to write them from memory: the tool user then miscopies the values of new people (measured in the
  quickstart: OOD recall 0.79 without practice people, 0.91-0.94 with them; README).
* ``tool_train.jsonl``: the same facts with the same paraphrase choices as in-tool dialogs
  ``[user, assistant sql, database, assistant]``; the database turn is the real query run on ``people.sqlite``.
* ``bios.txt``: one biography paragraph per training person (optional training text).
* ``eval_train.jsonl``, ``eval_ood.jsonl``: one question per (person, attribute):
  ``{"dialog": [user], "person", "attribute", "value", "answer_regex", "sql"}``; ``re.fullmatch(answer_regex,
  answer).group("value")`` reads a model's answer back.
* ``manifest.json`` (written last): seed, alpha, paraphrases, counts, cardinalities, bits, sha256 of each file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sqlite3
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from any cwd: import `memory`

from memory.people import (  # noqa: E402
    ABSENT_TOOL_ANSWERS,
    ANSWER_TEMPLATES,
    ATTRIBUTES,
    CARDINALITIES,
    NAME_SPLIT_SEED,
    QUESTION_TEMPLATES,
    absent_dialogs,
    answer_regex,
    biography,
    bits_per_person,
    build_database,
    db_text,
    make_absent,
    make_novel_people,
    make_people,
    make_practice,
    make_pseudo_practice,
    qa_dialog,
    render_question,
    rng_stream,
    rule_bits,
    sql_query,
    tool_dialog,
)

FORMAT_VERSION = 5  # 2: three answer paraphrases for absent people; 3: absent questions in-tool only by default;
# 4: practice people; 5: each training line names its kind (fact, absent, practice)
log = logging.getLogger("memory.build_data")

FILES = (
    "people.jsonl",
    "ood_people.jsonl",
    "people.sqlite",
    "weight_train.jsonl",
    "tool_train.jsonl",
    "bios.txt",
    "eval_train.jsonl",
    "eval_ood.jsonl",
)
PRACTICE_FILES = ("practice_people.jsonl", "practice.sqlite")  # written only with practice people
PRACTICE_STYLES = ("lists", "pseudo", "mixed", "varied", "wide")
NOVEL_FILES = ("novel_people.jsonl", "eval_novel.jsonl")  # written only with novel people (in people.sqlite too)


_dumps = json.JSONEncoder(sort_keys=True, ensure_ascii=False).encode  # one encoder: json.dumps rebuilds it per call
_str = json.encoder.encode_basestring  # the (C) string escaper json.dumps(ensure_ascii=False) uses


def _dialog_line(turns: list[dict[str, str]], kind: str) -> str:
    """``_dumps({"dialog": turns, "kind": kind})`` for turns with exactly the keys content and source, three times
    faster."""
    body = ", ".join(f'{{"content": {_str(t["content"])}, "source": {_str(t["source"])}}}' for t in turns)
    return f'{{"dialog": [{body}], "kind": {_str(kind)}}}'


def _write_lines(path: Path, lines: Iterable[str]) -> int:
    n = 0
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for line in lines:
            f.write(line + "\n")
            n += 1
    return n


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _eval_lines(people: list[dict[str, str]], seed: int, stream: str) -> Iterator[str]:
    rng = rng_stream(seed, "eval", stream)
    for p in people:
        for a in ATTRIBUTES:
            q = render_question(a, rng.randrange(len(QUESTION_TEMPLATES[a])), p["name"])
            # the same text as _dumps of the record with sorted keys (tested), written out for speed
            yield (
                f'{{"answer_regex": {_str(answer_regex(a, p["name"]))}, "attribute": {_str(a)}, '
                f'"dialog": [{{"content": {_str(q)}, "source": "user"}}], "person": {_str(p["name"])}, '
                f'"sql": {_str(sql_query(a, p["name"]))}, "value": {_str(p[a])}}}'
            )


def build_args(people: int, ood: int, seed: int, alpha: float = 0.0, paraphrases: int = 4, absent: int = 0,
               absent_in_weight: bool = False, practice: int = 0, novel: int = 0,
               practice_style: str = "lists", families: int = 0) -> dict[str, Any]:
    """The arguments that decide a dataset's content, as the manifest records them (``build_args``): a folder
    whose manifest holds the same ones (and the same ``format_version``) holds the same files. ``families`` is
    recorded only when set (datasets built before it existed keep matching)."""
    return {"people": int(people), "ood": int(ood), "seed": int(seed), "alpha": float(alpha),
            "paraphrases": int(paraphrases), "absent": int(absent), "absent_in_weight": bool(absent_in_weight),
            "practice": int(practice), "novel": int(novel), "practice_style": str(practice_style),
            **({"families": int(families)} if families else {})}


def build_errors(people: int, ood: int, paraphrases: int, absent: int, practice: int,
                 alpha: float = 0.0, novel: int = 0, practice_style: str = "lists",
                 families: int = 0) -> list[tuple[str, str]]:
    """What is wrong with these build arguments, as ``(name, message)`` pairs (checked before anything is written)."""
    n_q = min(len(t) for t in QUESTION_TEMPLATES.values())
    errs = []
    if people < 1:
        errs.append(("people", f"must be >= 1 (people whose facts are learnt), got {people}"))
    for key, value in (("ood", ood), ("absent", absent), ("practice", practice), ("novel", novel)):
        if value < 0:
            errs.append((key, f"must be >= 0, got {value}"))
    if not 1 <= paraphrases <= n_q:
        errs.append(("paraphrases", f"must be in 1..{n_q} (distinct question templates per fact), got {paraphrases}"))
    if practice_style not in PRACTICE_STYLES:
        errs.append(("practice-style", f"must be one of {', '.join(PRACTICE_STYLES)}, got {practice_style!r}"))
    if not 0.0 <= alpha <= 1.0:
        errs.append(("alpha", f"must be a probability in [0, 1], got {alpha}"))
    if families < 0:
        errs.append(("families", f"must be >= 0 (0: any last name), got {families}"))
    return errs


def build_dataset(
    out: str | Path, people: int, ood: int, seed: int, alpha: float = 0.0, paraphrases: int = 4, absent: int = 0,
    absent_in_weight: bool = False, practice: int = 0, novel: int = 0, practice_style: str = "lists",
    families: int = 0,
) -> dict[str, Any]:
    """Write every file of the dataset into ``out`` (created if missing) and return the manifest. The ``absent``
    questions go into the in-tool file, and into the in-weight file too when ``absent_in_weight``; the
    ``practice`` questions into the in-tool file only. ``novel`` people (held-out names and values, see
    ``memory.novel``) join the database and get an evaluation set of their own, ``eval_novel.jsonl``; no training
    file changes with them. ``practice_style``: "lists" draws practice people from the training name and value
    lists, "pseudo" makes them of made-up words (``make_pseudo_practice``), "mixed" half of each, "varied" as
    "mixed" with the made-up names' spellings varied (inner capitals, a last name that starts with the first), "wide"
    as "varied" with more 2-3-letter names and lower-case particles inside some multi-word values."""
    for key, value in build_errors(people, ood, paraphrases, absent, practice, alpha, novel, practice_style,
                                   families):
        raise ValueError(f"{key} {value}")
    t0 = time.perf_counter()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out: {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    train = make_people(people, seed, alpha=alpha, families=families)
    test = make_people(ood, seed, ood=True, alpha=alpha, families=families)
    novel_people = make_novel_people(novel, seed)
    lines: dict[str, int] = {}
    lines["people.jsonl"] = _write_lines(out / "people.jsonl", [_dumps(p) for p in train])
    lines["ood_people.jsonl"] = _write_lines(out / "ood_people.jsonl", [_dumps(p) for p in test])
    db_path = out / "people.sqlite"
    build_database(db_path, train + test + novel_people)
    lines["people.sqlite"] = len(train) + len(test) + len(novel_people)  # rows
    log.info("%d + %d people and their database in %.1fs", len(train), len(test), time.perf_counter() - t0)
    absent_names = make_absent(absent, seed, {p["name"] for p in train})
    files = FILES + (NOVEL_FILES if novel else ())
    if novel:
        lines["novel_people.jsonl"] = _write_lines(out / "novel_people.jsonl", [_dumps(p) for p in novel_people])
        lines["eval_novel.jsonl"] = _write_lines(out / "eval_novel.jsonl", _eval_lines(novel_people, seed, "novel"))
    else:
        for stale in NOVEL_FILES:
            (out / stale).unlink(missing_ok=True)
    if practice:  # practice people: drawn after the absent ones, so that they change no absent name
        files = files + PRACTICE_FILES
        others = {p["name"] for p in train} | set(absent_names)
        # lists: all list-drawn; pseudo: none; mixed, varied and wide: half
        n_lists = {"lists": practice, "pseudo": 0}.get(practice_style, practice // 2)
        practice_people = make_practice(n_lists, seed, others, alpha=alpha)
        practice_people += make_pseudo_practice(practice - n_lists, seed, others | {p["name"] for p in practice_people},
                                                varied=practice_style == "varied",
                                                wide=practice_style == "wide")
        lines["practice_people.jsonl"] = _write_lines(out / "practice_people.jsonl",
                                                      [_dumps(p) for p in practice_people])
        build_database(out / "practice.sqlite", practice_people)
        lines["practice.sqlite"] = len(practice_people)
    else:
        practice_people = []
        for stale in PRACTICE_FILES:  # a folder rebuilt without practice people keeps no stale practice files
            (out / stale).unlink(missing_ok=True)

    rng = rng_stream(seed, "train-paraphrases")
    n_train = 0
    with (
        closing(sqlite3.connect(db_path.resolve().as_uri() + "?mode=ro", uri=True)) as conn,
        open(out / "weight_train.jsonl", "w", encoding="utf-8", newline="\n") as qa,
        open(out / "tool_train.jsonl", "w", encoding="utf-8", newline="\n") as tool,
    ):
        for p in train:
            for a in ATTRIBUTES:
                q_idxs = rng.sample(range(len(QUESTION_TEMPLATES[a])), paraphrases)
                a_idxs = [rng.randrange(len(ANSWER_TEMPLATES[a])) for _ in q_idxs]
                text = db_text(conn, a, p["name"])  # the real query on the built database
                for qi, ai in zip(q_idxs, a_idxs):
                    qa.write(_dialog_line(qa_dialog(p, a, qi, ai), "fact") + "\n")
                    tool.write(_dialog_line(tool_dialog(p, a, qi, ai, text), "fact") + "\n")
                    n_train += 1
        # questions about people the database does not know (no facts): one each, in the in-tool file (and the
        # in-weight one when asked)
        absent_rng = rng_stream(seed, "absent-questions")
        for name in absent_names:
            a = absent_rng.choice(ATTRIBUTES)
            qi = absent_rng.randrange(len(QUESTION_TEMPLATES[a]))
            ai = absent_rng.randrange(len(ABSENT_TOOL_ANSWERS))
            weight_d, tool_d = absent_dialogs(name, a, qi, db_text(conn, a, name), ai)
            if absent_in_weight:
                qa.write(_dialog_line(weight_d, "absent") + "\n")
            tool.write(_dialog_line(tool_d, "absent") + "\n")
        # practice people (no facts of the evaluation database): one question each, in the in-tool file, whose
        # database turn is the real query on their own database
        if practice_people:
            practice_rng = rng_stream(seed, "practice-questions")
            with closing(sqlite3.connect((out / "practice.sqlite").resolve().as_uri() + "?mode=ro", uri=True)) as pc:
                for p in practice_people:
                    a = practice_rng.choice(ATTRIBUTES)
                    qi = practice_rng.randrange(len(QUESTION_TEMPLATES[a]))
                    ai = practice_rng.randrange(len(ANSWER_TEMPLATES[a]))
                    tool.write(_dialog_line(tool_dialog(p, a, qi, ai, db_text(pc, a, p["name"])), "practice") + "\n")
    lines["tool_train.jsonl"] = n_train + len(absent_names) + len(practice_people)
    lines["weight_train.jsonl"] = n_train + (len(absent_names) if absent_in_weight else 0)
    bio_rng = rng_stream(seed, "bios")
    lines["bios.txt"] = _write_lines(out / "bios.txt", [biography(p, bio_rng) for p in train])
    lines["eval_train.jsonl"] = _write_lines(out / "eval_train.jsonl", _eval_lines(train, seed, "train"))
    lines["eval_ood.jsonl"] = _write_lines(out / "eval_ood.jsonl", _eval_lines(test, seed, "ood"))

    bits = bits_per_person(alpha)
    manifest = {
        "format_version": FORMAT_VERSION,
        "build_args": build_args(people, ood, seed, alpha, paraphrases, absent, absent_in_weight, practice, novel,
                                 practice_style, families),
        "families": int(families),
        "seed": int(seed),
        "alpha": float(alpha),
        "paraphrases": int(paraphrases),
        "absent": int(absent),
        "absent_in_weight": bool(absent_in_weight),
        "practice": int(practice),
        "novel": int(novel),
        "practice_style": practice_style,
        "name_split_seed": NAME_SPLIT_SEED,
        "attributes": list(ATTRIBUTES),
        "cardinalities": {a: CARDINALITIES[a] for a in ATTRIBUTES},
        "bits_per_person": bits,
        "bits_per_fact": bits / len(ATTRIBUTES),
        # alpha > 0: the last-name rule's own table, shared by the people of each last name (on top of bits_per_fact)
        "rule_bits": rule_bits(len({p["name"].split(" ", 1)[1] for p in train})) if alpha > 0 else 0.0,
        "counts": {
            "people": len(train),
            "ood": len(test),
            "absent": int(absent),
            "practice": int(practice),
            "novel": len(novel_people),
            "facts": len(train) * len(ATTRIBUTES),
            "ood_facts": len(test) * len(ATTRIBUTES),
            "lines": lines,
        },
        "sha256": {name: _sha256(out / name) for name in files},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, sort_keys=True, indent=2) + "\n", encoding="utf-8")
    log.info("dataset in %s: %d facts, %.1fs", out, manifest["counts"]["facts"], time.perf_counter() - t0)
    return manifest


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--people", type=int, required=True, help="training people (in-distribution names)")
    ap.add_argument("--ood", type=int, default=0, help="OOD people (held-out names), only in the database")
    ap.add_argument("--seed", type=int, default=0, help="data seed (independent of model seeds)")
    ap.add_argument("--alpha", type=float, default=0.0, help="probability that an attribute follows the last name")
    ap.add_argument("--paraphrases", type=int, default=4, help="dialogs per fact, each a distinct question template")
    ap.add_argument("--absent", type=int, default=0,
                    help="questions about people absent from the database (no facts; teach querying any name)")
    ap.add_argument("--absent-in-weight", action="store_true",
                    help="put the absent-people questions into the in-weight file too (default: in-tool only)")
    ap.add_argument("--practice", type=int, default=0,
                    help="questions about practice people of a database of their own, in-tool file only (teach "
                         "copying names and values)")
    ap.add_argument("--practice-style", default="lists", choices=PRACTICE_STYLES,
                    help="lists: practice people drawn from the training name and value lists; pseudo: made of "
                         "made-up words (copying with no vocabulary to lean on); mixed: half of each; varied: mixed, "
                         "with inner capitals and last names that begin with the first name among the made-up ones; "
                         "wide: varied, with more 2-3-letter names and lower-case particles inside some values")
    ap.add_argument("--novel", type=int, default=0,
                    help="novel people (held-out names and attribute values, memory.novel): in the database, asked "
                         "about in eval_novel.jsonl; no training file changes")
    ap.add_argument("--families", type=int, default=0,
                    help="draw last names from this many families (many people per last name, for --alpha); 0: any")
    ap.add_argument("--out", required=True, help="output folder")
    args = ap.parse_args(argv)
    for key, msg in build_errors(args.people, args.ood, args.paraphrases, args.absent, args.practice, args.alpha,
                                 args.novel, args.practice_style, args.families):
        ap.error(f"--{key}: {msg}")  # one line, exit status 2, before anything is written
    if Path(args.out).exists() and not Path(args.out).is_dir():
        ap.error(f"--out: {args.out} exists and is not a folder")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    t0 = time.perf_counter()
    manifest = build_dataset(args.out, args.people, args.ood, args.seed, args.alpha, args.paraphrases, args.absent,
                             args.absent_in_weight, args.practice, args.novel, args.practice_style, args.families)
    print(json.dumps({"out": str(args.out), **manifest["counts"], "seconds": round(time.perf_counter() - t0, 2)}))
    return manifest


if __name__ == "__main__":
    main()
