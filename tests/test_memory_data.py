"""Tests of the memory app's data side: name lists, people, templates, the SQLite database and build_data."""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import sqlite3
import subprocess
import sys
from collections import defaultdict
from contextlib import closing
from pathlib import Path

import pytest
from memory import names, people
from memory.build_data import FILES, FORMAT_VERSION, build_dataset
from memory.people import (
    ABSENT_TOOL_ANSWERS,
    ABSENT_WEIGHT_ANSWERS,
    ANSWER_TEMPLATES,
    ATTRIBUTES,
    BIO_TEMPLATES,
    QUESTION_TEMPLATES,
    VALUES,
    answer_regex,
    bits_per_person,
    build_database,
    db_text,
    dependent_value,
    make_people,
    parse_answer,
    render_answer,
    render_question,
    render_template,
    sql_query,
)

ROOT = Path(__file__).resolve().parent.parent
NAME_RE = re.compile(r"[A-Za-z]+(-[A-Za-z]+)?")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _jsonl(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n")
    return [json.loads(line) for line in text.split("\n")[:-1]]


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("memory2000")
    build_dataset(out, people=2000, ood=300, seed=3, paraphrases=2)
    return out


# ------------------------------------------------------------------------------------------------ the lists


def test_lists_are_unique_clean_and_big_enough() -> None:
    for lst, least in [(names.FIRST_NAMES, 480), (names.LAST_NAMES, 480), (names.CITIES, 150),
                       (names.OCCUPATIONS, 100), (names.UNIVERSITIES, 20)]:
        assert isinstance(lst, tuple)
        assert len(lst) >= least
        assert len(set(lst)) == len(lst), [x for x in set(lst) if lst.count(x) > 1]
        assert all(x.isascii() and x == x.strip() and "'" not in x and "\n" not in x for x in lst)
    for n in names.FIRST_NAMES + names.LAST_NAMES:
        assert NAME_RE.fullmatch(n), n


def test_name_split_is_disjoint_and_id_pool_is_large() -> None:
    for full, id_part, ood_part in [(names.FIRST_NAMES, people.ID_FIRST_NAMES, people.OOD_FIRST_NAMES),
                                    (names.LAST_NAMES, people.ID_LAST_NAMES, people.OOD_LAST_NAMES)]:
        assert not set(id_part) & set(ood_part)
        assert sorted(id_part + ood_part) == sorted(full)
        assert 0.15 < len(ood_part) / len(full) < 0.25
    assert len(people.ID_FIRST_NAMES) * len(people.ID_LAST_NAMES) >= 100_000
    assert len(people.OOD_FIRST_NAMES) * len(people.OOD_LAST_NAMES) >= 10_000


def test_bits_per_person_and_dates() -> None:
    cards = people.CARDINALITIES
    assert len(ATTRIBUTES) >= 4 and len(set(cards.values())) >= 3
    assert bits_per_person() == pytest.approx(sum(math.log2(c) for c in cards.values()))
    assert bits_per_person() == pytest.approx(42.4003, abs=1e-3)
    # dependent attributes (alpha): the entropy of a value given the last-name rule (the mixture's entropy written
    # out by hand), its limits, and its fall with alpha
    assert people.bits_per_value(191, 0.0) == math.log2(191) and people.bits_per_value(191, 1.0) == 0.0
    k, a = 10, 0.5
    p_rule, p_other = a + (1 - a) / k, (1 - a) / k
    assert people.bits_per_value(k, a) == pytest.approx(-(p_rule * math.log2(p_rule)
                                                          + (k - 1) * p_other * math.log2(p_other)))
    curve = [bits_per_person(x / 10) for x in range(11)]
    assert curve[0] == bits_per_person() and curve[-1] == 0.0 and curve == sorted(curve, reverse=True)
    assert people.rule_bits(3) == pytest.approx(3 * bits_per_person())
    with pytest.raises(ValueError, match="alpha must be in"):
        people.bits_per_value(10, 1.5)
    dates = VALUES["birth_date"]
    assert len(dates) == len(set(dates)) == cards["birth_date"] == 24107  # 66 years, 16 of them leap
    assert dates[0] == "January 1, 1940" and dates[-1] == "December 31, 2005"
    assert "February 29, 2004" in dates and "February 29, 2005" not in dates and "April 31, 1990" not in dates
    assert people.cardinality("occupation") == len(names.OCCUPATIONS)
    with pytest.raises(ValueError, match="unknown attribute"):
        people.cardinality("shoe_size")


# ----------------------------------------------------------------------------------------------- people


def test_make_people_unique_deterministic_and_seeded() -> None:
    a = make_people(3000, seed=1)
    assert a == make_people(3000, seed=1)
    assert len({p["name"] for p in a}) == 3000
    assert set(a[0]) == {"name", *ATTRIBUTES}
    assert all(p[k] in VALUES[k] for p in a for k in ATTRIBUTES)
    b = make_people(3000, seed=2)
    assert [p["name"] for p in a] != [p["name"] for p in b]
    # the names do not depend on alpha, and uniform values are the same draws
    c = make_people(3000, seed=1, alpha=0.5)
    assert [p["name"] for p in c] == [p["name"] for p in a]
    with pytest.raises(ValueError, match="name pool"):
        make_people(10**7, seed=0, ood=True)
    with pytest.raises(ValueError, match="alpha"):
        make_people(3, seed=0, alpha=1.5)


def test_alpha_makes_attributes_a_function_of_the_last_name() -> None:
    def by_last(ps: list[dict]) -> dict[str, list[dict]]:
        g = defaultdict(list)
        for p in ps:
            g[p["name"].split(" ")[1]].append(p)
        return g

    dep = make_people(4000, seed=5, alpha=1.0)
    for last, group in by_last(dep).items():
        for a in ATTRIBUTES:
            assert {p[a] for p in group} == {dependent_value(last, a)}
    ind = make_people(4000, seed=5, alpha=0.0)
    for a in ATTRIBUTES:
        hits = sum(p[a] == dependent_value(p["name"].split(" ")[1], a) for p in ind) / len(ind)
        assert hits < 0.05, (a, hits)  # chance level is 1/cardinality <= 1/60
    shared = [g for g in by_last(ind).values() if len(g) >= 2]
    assert len(shared) > 100
    assert sum(len({p["birth_city"] for p in g}) == 1 for g in shared) < 0.2 * len(shared)
    half = make_people(4000, seed=5, alpha=0.5)
    hits = sum(p["birth_date"] == dependent_value(p["name"].split(" ")[1], "birth_date") for p in half) / 4000
    assert 0.45 < hits < 0.55


# -------------------------------------------------------------------------------------------- templates


def test_template_counts_and_fast_fill_matches_jinja() -> None:
    name = "Jean-Pierre Ben-David"
    for a in ATTRIBUTES:
        assert len(QUESTION_TEMPLATES[a]) >= 4 and len(ANSWER_TEMPLATES[a]) >= 3 and len(BIO_TEMPLATES[a]) >= 3
        assert len(set(QUESTION_TEMPLATES[a])) == len(QUESTION_TEMPLATES[a])
        value = VALUES[a][7]
        for i, t in enumerate(QUESTION_TEMPLATES[a]):
            assert render_question(a, i, name) == render_template(t, name=name)
        for i, t in enumerate(ANSWER_TEMPLATES[a]):
            assert render_answer(a, i, name, value) == render_template(t, name=name, value=value)


def test_every_answer_parses_back_to_its_value() -> None:
    names_ = ["Ada Smith", "Jean-Pierre Ben-David", "Hyun-woo Al-Sayed", "Marie-Claire Smith-Jones"]
    for a in ATTRIBUTES:
        for name in names_:
            rx = re.compile(answer_regex(a, name))
            for i in range(len(ANSWER_TEMPLATES[a])):
                for v in VALUES[a]:  # every value: dates with commas, cities with spaces ("Rio de Janeiro")
                    m = rx.fullmatch(render_answer(a, i, name, v))
                    assert m is not None and m.group("value") == v, (a, i, name, v)
        # wrong person, mixed paraphrases, missing period: no match
        assert parse_answer(a, "Ada Smith", render_answer(a, 0, "Ada Smithers", VALUES[a][0])) is None
        assert parse_answer(a, "Ada Smith", render_answer(a, 0, "Ada Smith", VALUES[a][0])[:-1]) is None
        assert parse_answer(a, "Ada Smith", " " + render_answer(a, 1, "Ada Smith", VALUES[a][3]) + "\n") == VALUES[a][3]
    assert parse_answer("birth_city", "Ada Smith", "Ada Smith was born in .") is None


def test_sql_and_dialog_shapes() -> None:
    p = make_people(1, seed=0)[0]
    assert sql_query("birth_city", "Ada Smith") == "SELECT birth_city FROM people WHERE name = 'Ada Smith'"
    with pytest.raises(ValueError):
        sql_query("birth_city", "Ada O'Brien")
    qa = people.qa_dialog(p, "occupation", 1, 2)
    assert [t["source"] for t in qa] == ["user", "assistant"]
    assert qa[0]["content"] == render_question("occupation", 1, p["name"])
    assert parse_answer("occupation", p["name"], qa[1]["content"]) == p["occupation"]
    tool = people.tool_dialog(p, "occupation", 1, 2, "DB")
    assert [t["source"] for t in tool] == ["user", "assistant", "database", "assistant"]
    assert tool[1]["content"] == f"```sql\nSELECT occupation FROM people WHERE name = '{p['name']}'\n```"
    assert tool[2]["content"] == "DB" and tool[3] == qa[1] and tool[0] == qa[0]


def test_format_rows_local_and_library_agree() -> None:
    cases = [[], [("Lima",)], [("a", None), (1, 2.5)], [("x | y",), ("z",)]]
    expected = ["no rows", "Lima", "a | NULL\n1 | 2.5", "x | y\nz"]
    for rows, want in zip(cases, expected):
        assert people._format_rows_local(rows) == want
        assert people.format_rows(rows) == want
    from lmlab.tools.sql import format_rows as lib

    for rows in cases:
        assert lib(rows) == people._format_rows_local(rows)


# ---------------------------------------------------------------------------------------------- database


def test_database_rows_and_deterministic_bytes(tmp_path: Path) -> None:
    ps = make_people(50, seed=0) + make_people(10, seed=0, ood=True)
    build_database(tmp_path / "a.sqlite", ps)
    build_database(tmp_path / "b.sqlite", ps)
    build_database(tmp_path / "b.sqlite", ps)  # rebuilding over an old file gives the same bytes
    assert _sha(tmp_path / "a.sqlite") == _sha(tmp_path / "b.sqlite")
    with closing(sqlite3.connect(tmp_path / "a.sqlite")) as conn:
        cols = [r[1] for r in conn.execute("PRAGMA table_info(people)")]
        assert cols == ["name", *ATTRIBUTES]
        rows = conn.execute("SELECT * FROM people ORDER BY rowid").fetchall()
        assert rows == [(p["name"], *(p[a] for a in ATTRIBUTES)) for p in ps]
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
        p = ps[-1]
        for a in ATTRIBUTES:
            literal = people.format_rows(conn.execute(sql_query(a, p["name"])).fetchall())
            assert db_text(conn, a, p["name"]) == literal == p[a]
        assert db_text(conn, "birth_city", "Nobody Here") == "no rows"


# --------------------------------------------------------------------------------------------- build_data


def test_build_is_deterministic_and_seeded(tmp_path: Path) -> None:
    m1 = build_dataset(tmp_path / "a", people=120, ood=40, seed=7)
    m2 = build_dataset(tmp_path / "b", people=120, ood=40, seed=7)
    assert m1 == m2
    for f in (*FILES, "manifest.json"):
        assert _sha(tmp_path / "a" / f) == _sha(tmp_path / "b" / f), f
    m3 = build_dataset(tmp_path / "c", people=120, ood=40, seed=8)
    assert m3["sha256"]["people.jsonl"] != m1["sha256"]["people.jsonl"]
    assert m3["sha256"]["people.sqlite"] != m1["sha256"]["people.sqlite"]
    with pytest.raises(ValueError, match="paraphrases"):
        build_dataset(tmp_path / "d", people=5, ood=0, seed=0, paraphrases=99)
    assert m1["rule_bits"] == 0.0
    dep = build_dataset(tmp_path / "e", people=120, ood=0, seed=7, alpha=0.5)  # what is left to store, per fact
    assert dep["bits_per_fact"] == pytest.approx(bits_per_person(0.5) / len(ATTRIBUTES))
    assert dep["bits_per_fact"] < m1["bits_per_fact"]
    lasts = {json.loads(x)["name"].split(" ", 1)[1] for x in (tmp_path / "e" / "people.jsonl").read_text().splitlines()}
    assert dep["rule_bits"] == pytest.approx(people.rule_bits(len(lasts))) and len(lasts) > 1
    # families: the paper's compressibility data puts many people in few families (a dependent value is a family's)
    fam = build_dataset(tmp_path / "f", people=120, ood=10, seed=7, alpha=0.5, families=6)
    rows = [json.loads(x) for x in (tmp_path / "f" / "people.jsonl").read_text().splitlines()]
    assert len({r["name"] for r in rows}) == 120 and len({r["name"].split(" ", 1)[1] for r in rows}) == 6
    assert fam["build_args"]["families"] == 6 and "families" not in m1["build_args"]  # old manifests keep matching
    assert fam["rule_bits"] == pytest.approx(people.rule_bits(6))
    by_family: dict = {}
    for r in rows:  # with alpha 0.5, about half of a family's values of an attribute are the family's own value
        by_family.setdefault(r["name"].split(" ", 1)[1], []).append(r["occupation"])
    shares = [max(map(vals.count, vals)) / len(vals) for vals in by_family.values()]
    assert sum(shares) / len(shares) > 0.4  # independent draws over 110 occupations: ~0.1
    with pytest.raises(ValueError, match="families must be in"):
        people.make_people(5, 0, families=10**6)
    with pytest.raises(ValueError, match=r"name pool holds only \d+ names \(2 families\)"):
        people.make_people(10**5, 0, families=2)
    assert people.make_people(50, 3) == people.make_people(50, 3, families=0)


def test_manifest_matches_files(big: Path) -> None:
    m = json.loads((big / "manifest.json").read_text())
    assert m["format_version"] == FORMAT_VERSION and m["seed"] == 3 and m["alpha"] == 0.0 and m["paraphrases"] == 2
    assert m["counts"]["people"] == 2000 and m["counts"]["ood"] == 300
    assert m["counts"]["facts"] == 2000 * len(ATTRIBUTES)
    assert m["bits_per_person"] == pytest.approx(bits_per_person())
    assert m["bits_per_fact"] == pytest.approx(bits_per_person() / len(ATTRIBUTES))
    assert m["cardinalities"] == people.CARDINALITIES
    for f in FILES:
        assert m["sha256"][f] == _sha(big / f), f
        if f.endswith((".jsonl", ".txt")):
            text = (big / f).read_text(encoding="utf-8")
            assert text.endswith("\n") and text.count("\n") == m["counts"]["lines"][f], f
    lines = m["counts"]["lines"]
    assert lines["weight_train.jsonl"] == lines["tool_train.jsonl"] == 2000 * len(ATTRIBUTES) * 2
    assert lines["eval_train.jsonl"] == 2000 * len(ATTRIBUTES) and lines["eval_ood.jsonl"] == 300 * len(ATTRIBUTES)
    assert lines["people.sqlite"] == 2300
    # every line is exactly json.dumps with sorted keys (the hand-written fast encoders included)
    for f in FILES:
        if f.endswith(".jsonl"):
            for line in (big / f).read_text().split("\n")[:-1]:
                assert line == json.dumps(json.loads(line), sort_keys=True, ensure_ascii=False), (f, line)


def test_ood_names_never_appear_in_training(big: Path) -> None:
    train = _jsonl(big / "people.jsonl")
    ood = _jsonl(big / "ood_people.jsonl")
    train_words = {w for p in train for w in p["name"].split(" ")}
    ood_first = {p["name"].split(" ")[0] for p in ood}
    ood_last = {p["name"].split(" ")[1] for p in ood}
    assert ood_first <= set(people.OOD_FIRST_NAMES) and ood_last <= set(people.OOD_LAST_NAMES)
    assert not (ood_first | ood_last) & train_words
    training_text = "\n".join((big / f).read_text() for f in ("weight_train.jsonl", "tool_train.jsonl", "bios.txt"))
    training_words = set(re.findall(r"[A-Za-z]+(?:-[A-Za-z]+)?", training_text))
    assert train_words <= training_words  # the word split sees names, hyphenated ones included
    assert not (set(people.OOD_FIRST_NAMES) | set(people.OOD_LAST_NAMES)) & training_words
    with closing(sqlite3.connect(big / "people.sqlite")) as conn:
        assert conn.execute("SELECT count(*) FROM people").fetchone()[0] == len(train) + len(ood)


def test_training_dialogs_match_people_and_database(big: Path) -> None:
    by_name = {p["name"]: p for p in _jsonl(big / "people.jsonl")}
    qa = _jsonl(big / "weight_train.jsonl")
    tool = _jsonl(big / "tool_train.jsonl")
    sql_re = re.compile(r"```sql\nSELECT (\w+) FROM people WHERE name = '([A-Za-z -]+)'\n```")
    fresh: dict[tuple[str, str], str] = {}
    with closing(sqlite3.connect(big / "people.sqlite")) as conn:
        for i, (q, t) in enumerate(zip(qa, tool)):
            q, t = q["dialog"], t["dialog"]
            m = sql_re.fullmatch(t[1]["content"])
            assert m, t[1]
            a, name = m.groups()
            if (name, a) not in fresh:  # the literal SQL text of the dialog, run afresh
                fresh[name, a] = people._format_rows_local(conn.execute(t[1]["content"][7:-4]).fetchall())
            value = by_name[name][a]
            assert t[2]["content"] == fresh[name, a] == value
            assert q[0] == t[0] and q[1] == t[3]
            assert q[0]["content"] in {render_question(a, j, name) for j in range(len(QUESTION_TEMPLATES[a]))}
            assert q[1]["content"] in {render_answer(a, j, name, value) for j in range(len(ANSWER_TEMPLATES[a]))}
            if i % 50 == 0:
                assert parse_answer(a, name, q[1]["content"]) == value
            if i % 2 == 1:  # the two paraphrases of one fact ask with distinct question templates
                assert qa[i - 1]["dialog"][0]["content"] != q[0]["content"]
    assert len(fresh) == len(by_name) * len(ATTRIBUTES)
    bios = (big / "bios.txt").read_text().split("\n")[:-1]
    assert len(bios) == len(by_name)
    for line, p in zip(bios, by_name.values()):
        assert p["name"] in line and all(p[a] in line for a in ATTRIBUTES)


def test_eval_files(big: Path) -> None:
    for f, src in (("eval_train.jsonl", "people.jsonl"), ("eval_ood.jsonl", "ood_people.jsonl")):
        ps = {p["name"]: p for p in _jsonl(big / src)}
        recs = _jsonl(big / f)
        assert {(r["person"], r["attribute"]) for r in recs} == {(n, a) for n in ps for a in ATTRIBUTES}
        rng = random.Random(0)
        for r in recs:
            assert set(r) == {"dialog", "person", "attribute", "value", "answer_regex", "sql"}
            assert r["value"] == ps[r["person"]][r["attribute"]]
            assert len(r["dialog"]) == 1 and r["dialog"][0]["source"] == "user"
            assert r["dialog"][0]["content"] in {
                render_question(r["attribute"], i, r["person"]) for i in range(len(QUESTION_TEMPLATES[r["attribute"]]))
            }
            assert r["answer_regex"] == answer_regex(r["attribute"], r["person"])
            if rng.random() < 0.1:  # compiling thousands of distinct regexes is slow; the round trip is tested above
                answer = render_answer(r["attribute"], rng.randrange(3), r["person"], r["value"])
                assert re.fullmatch(r["answer_regex"], answer).group("value") == r["value"]
            assert r["sql"] == sql_query(r["attribute"], r["person"])


def test_script_runs_from_any_cwd(tmp_path: Path) -> None:
    out = tmp_path / "data"
    res = subprocess.run(
        [sys.executable, str(ROOT / "apps" / "memory" / "build_data.py"), "--people", "6", "--ood", "3",
         "--seed", "11", "--paraphrases", "1", "--out", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.strip().split("\n")[-1])["people"] == 6
    assert json.loads((out / "manifest.json").read_text()) == build_dataset(tmp_path / "again", 6, 3, 11, paraphrases=1)


def test_every_training_line_names_its_kind(tmp_path):
    """fact / absent / practice on each line, in the counts the manifest gives, and a lead over the copying kinds
    fills the first batches of a real loader with them alone."""
    from lmlab.config import DataConfig
    from lmlab.data.loader import build_source
    from lmlab.tokenizers import ByteTokenizer

    m = build_dataset(tmp_path / "d", 20, 5, seed=2, paraphrases=2, absent=30, practice=40, absent_in_weight=True)
    for name, want in (("tool_train.jsonl", {"fact": 20 * len(ATTRIBUTES) * 2, "absent": 30, "practice": 40}),
                       ("weight_train.jsonl", {"fact": 20 * len(ATTRIBUTES) * 2, "absent": 30})):
        rows = [json.loads(x) for x in (tmp_path / "d" / name).read_text().splitlines()]
        kinds = [r["kind"] for r in rows]
        assert {k: kinds.count(k) for k in set(kinds)} == want and len(rows) == m["counts"]["lines"][name]
        for r in rows:  # the kind is the dialog's: an absent person's database turn (in-tool) finds nobody
            db = next((t["content"] for t in r["dialog"] if t["source"] == "database"), None)
            assert (db == "no rows") == (r["kind"] == "absent" and name == "tool_train.jsonl")
    src = build_source(DataConfig(kind="dialog", train_files=[str(tmp_path / "d" / "tool_train.jsonl")], seq_len=512,
                                  batch_size=4, packing=False, val_fraction=0, lead_kinds=["absent", "practice"],
                                  lead_steps=10), ByteTokenizer())
    first = [src.corpus.kinds[src.row_dialogs(0, int(r))[0]] for r in src.plan(0)[2][:10].reshape(-1)]
    assert set(first) == {"absent", "practice"}


def test_absent_people_hold_no_fact_and_change_no_training_person(tmp_path):
    import sqlite3

    plain = build_dataset(tmp_path / "plain", 40, 10, seed=3, paraphrases=1)
    more = build_dataset(tmp_path / "more", 40, 10, seed=3, paraphrases=1, absent=60, absent_in_weight=True)
    tool_only = build_dataset(tmp_path / "tool_only", 40, 10, seed=3, paraphrases=1, absent=60)
    for name in ("people.jsonl", "ood_people.jsonl", "people.sqlite", "eval_train.jsonl", "eval_ood.jsonl"):
        assert plain["sha256"][name] == more["sha256"][name] == tool_only["sha256"][name]
    assert more["counts"]["lines"]["tool_train.jsonl"] == 40 * len(ATTRIBUTES) + 60
    # by default the absent questions go to the in-tool file only; the in-weight file holds the facts alone
    assert tool_only["sha256"]["tool_train.jsonl"] == more["sha256"]["tool_train.jsonl"]
    assert tool_only["sha256"]["weight_train.jsonl"] == plain["sha256"]["weight_train.jsonl"]
    assert tool_only["counts"]["lines"]["weight_train.jsonl"] == 40 * len(ATTRIBUTES)
    assert tool_only["absent_in_weight"] is False and more["absent_in_weight"] is True
    tool = [json.loads(x)["dialog"] for x in (tmp_path / "more" / "tool_train.jsonl").read_text().splitlines()]
    weight = [json.loads(x)["dialog"] for x in (tmp_path / "more" / "weight_train.jsonl").read_text().splitlines()]
    def absent_name(answer: str, templates: tuple[str, ...]) -> str | None:
        for t in templates:
            m = re.fullmatch(re.escape(t).replace(re.escape("{name}"), "(?P<name>.+)"), answer)
            if m:
                return m.group("name")
        return None

    absent_tool = [d for d in tool if absent_name(d[-1]["content"], ABSENT_TOOL_ANSWERS)]
    absent_weight = [d for d in weight if absent_name(d[-1]["content"], ABSENT_WEIGHT_ANSWERS)]
    assert len(absent_tool) == len(absent_weight) == 60
    for answers in (ABSENT_TOOL_ANSWERS, ABSENT_WEIGHT_ANSWERS):  # every paraphrase is used
        used = {next(i for i, t in enumerate(answers) if absent_name(d[-1]["content"], (t,)))
                for d in (absent_tool if answers is ABSENT_TOOL_ANSWERS else absent_weight)}
        assert used == set(range(len(answers)))
    names = {absent_name(d[-1]["content"], ABSENT_TOOL_ANSWERS) for d in absent_tool}
    assert names == {absent_name(d[-1]["content"], ABSENT_WEIGHT_ANSWERS) for d in absent_weight}
    assert all(d[0] == w[0] for d, w in zip(absent_tool, absent_weight))  # the same question in both files
    people = {json.loads(x)["name"] for f in ("people.jsonl", "ood_people.jsonl")
              for x in (tmp_path / "more" / f).read_text().splitlines()}
    assert len(names) == 60 and not names & people
    with sqlite3.connect(tmp_path / "more" / "people.sqlite") as conn:
        for d in absent_tool:
            assert d[2] == {"source": "database", "content": "no rows"}
            sql = d[1]["content"].removeprefix("```sql\n").removesuffix("\n```")
            assert conn.execute(sql).fetchall() == []


def test_practice_people_live_in_their_own_database_and_change_nothing_else(tmp_path):
    absent = build_dataset(tmp_path / "absent", 40, 10, seed=3, paraphrases=1, absent=60)
    drill = build_dataset(tmp_path / "drill", 40, 10, seed=3, paraphrases=1, absent=60, practice=80)
    again = build_dataset(tmp_path / "again", 40, 10, seed=3, paraphrases=1, absent=60, practice=80)
    assert drill == again and set(drill["sha256"]) == set(FILES) | {"practice_people.jsonl", "practice.sqlite"}
    for f in drill["sha256"]:
        assert _sha(tmp_path / "drill" / f) == _sha(tmp_path / "again" / f) == drill["sha256"][f], f
    # every other file is the same; the in-tool file gains the practice questions at its end
    for f in FILES:
        if f != "tool_train.jsonl":
            assert drill["sha256"][f] == absent["sha256"][f], f
    before = (tmp_path / "absent" / "tool_train.jsonl").read_text()
    after = (tmp_path / "drill" / "tool_train.jsonl").read_text()
    assert after.startswith(before)
    assert drill["counts"]["practice"] == 80 and drill["build_args"]["practice"] == 80
    assert drill["counts"]["lines"]["tool_train.jsonl"] == 40 * len(ATTRIBUTES) + 60 + 80
    practice = _jsonl(tmp_path / "drill" / "practice_people.jsonl")
    dialogs = [json.loads(x)["dialog"] for x in after[len(before):].splitlines()]
    assert len(practice) == len(dialogs) == 80
    # names: in-distribution, distinct, none of them a training, OOD or absent person
    others = {p["name"] for f in ("people.jsonl", "ood_people.jsonl") for p in _jsonl(tmp_path / "drill" / f)}
    absent_names = {re.search(r"name = '(.+)'", json.loads(x)["dialog"][1]["content"]).group(1)
                    for x in before.splitlines()[40 * len(ATTRIBUTES):]}
    names = [p["name"] for p in practice]
    assert len(set(names)) == 80 and not set(names) & (others | absent_names)
    firsts, lasts = people.name_pool(False)
    assert all(n.split(" ")[0] in firsts and n.split(" ")[1] in lasts for n in names)
    by_name = {p["name"]: p for p in practice}
    sql_re = re.compile(r"```sql\n(SELECT (\w+) FROM people WHERE name = '([A-Za-z -]+)')\n```")
    with (closing(sqlite3.connect(tmp_path / "drill" / "practice.sqlite")) as pc,
          closing(sqlite3.connect(tmp_path / "drill" / "people.sqlite")) as ev):
        assert pc.execute("SELECT count(*) FROM people").fetchone()[0] == 80
        asked = []
        for d in dialogs:
            sql, a, name = sql_re.fullmatch(d[1]["content"]).groups()
            asked.append(name)
            value = by_name[name][a]
            assert d[2] == {"source": "database", "content": people._format_rows_local(pc.execute(sql).fetchall())}
            assert d[2]["content"] == value and ev.execute(sql).fetchall() == []  # not in the evaluation database
            assert d[0]["content"] in {render_question(a, j, name) for j in range(len(QUESTION_TEMPLATES[a]))}
            assert parse_answer(a, name, d[3]["content"]) == value
    assert sorted(asked) == sorted(names)  # each practice person asked about exactly once
    assert len({d[1]["content"].split()[2] for d in dialogs}) == len(ATTRIBUTES)  # every attribute asked
    # rebuilt without practice people, the folder keeps no stale practice files
    assert build_dataset(tmp_path / "drill", 40, 10, seed=3, paraphrases=1, absent=60) == absent
    assert not (tmp_path / "drill" / "practice.sqlite").exists()
    assert not (tmp_path / "drill" / "practice_people.jsonl").exists()
    with pytest.raises(ValueError, match="practice"):
        build_dataset(tmp_path / "bad", 5, 0, seed=0, practice=-1)


def test_novel_people_are_made_of_held_out_names_and_values_and_change_no_training_file(tmp_path):
    from memory.novel import NOVEL_FIRST_NAMES, NOVEL_LAST_NAMES

    # the held-out lists share nothing with the lists training, OOD, absent and practice people are drawn from
    assert not (set(NOVEL_FIRST_NAMES) | set(NOVEL_LAST_NAMES)) & (set(names.FIRST_NAMES) | set(names.LAST_NAMES))
    for a in ATTRIBUTES:
        assert not set(people.NOVEL_VALUES[a]) & set(VALUES[a]), a
    assert all(NAME_RE.fullmatch(n) for n in NOVEL_FIRST_NAMES + NOVEL_LAST_NAMES)
    assert min(map(len, NOVEL_FIRST_NAMES + NOVEL_LAST_NAMES)) == 2 and max(map(len, NOVEL_LAST_NAMES)) >= 16

    plain = build_dataset(tmp_path / "plain", 30, 6, seed=2, paraphrases=1, absent=20, practice=20)
    novel = build_dataset(tmp_path / "novel", 30, 6, seed=2, paraphrases=1, absent=20, practice=20, novel=12)
    assert novel["counts"]["novel"] == 12 and novel["build_args"]["novel"] == 12
    for f in plain["sha256"]:  # every file but the database is byte-identical
        if f != "people.sqlite":
            assert novel["sha256"][f] == plain["sha256"][f], f
    ps = _jsonl(tmp_path / "novel" / "novel_people.jsonl")
    assert ps == people.make_novel_people(12, 2) and len({p["name"] for p in ps}) == 12
    training = "".join((tmp_path / "novel" / f).read_text() for f in ("tool_train.jsonl", "weight_train.jsonl"))
    for p in ps:
        assert p["name"] not in training
        for a in ATTRIBUTES:
            assert p[a] in people.NOVEL_VALUES[a] and p[a] not in training, (a, p[a])
    recs = _jsonl(tmp_path / "novel" / "eval_novel.jsonl")
    assert {(r["person"], r["attribute"]) for r in recs} == {(p["name"], a) for p in ps for a in ATTRIBUTES}
    by_name = {p["name"]: p for p in ps}
    with (closing(sqlite3.connect(tmp_path / "novel" / "people.sqlite")) as db,
          closing(sqlite3.connect(tmp_path / "plain" / "people.sqlite")) as old):
        assert db.execute("SELECT count(*) FROM people").fetchone()[0] == 30 + 6 + 12
        for r in recs:  # the query each question needs finds the value; the old database does not know them
            assert r["value"] == by_name[r["person"]][r["attribute"]]
            assert people._format_rows_local(db.execute(r["sql"]).fetchall()) == r["value"]
            assert old.execute(r["sql"]).fetchall() == []
        assert db.execute("SELECT * FROM people WHERE rowid <= 36").fetchall() == old.execute(
            "SELECT * FROM people").fetchall()
    # rebuilt without novel people, the folder keeps no stale novel files
    assert build_dataset(tmp_path / "novel", 30, 6, seed=2, paraphrases=1, absent=20, practice=20) == plain
    assert not (tmp_path / "novel" / "eval_novel.jsonl").exists()


def _practice_styles(tmp_path, base: str, style: str, practice: int):
    """The same dataset built with practice styles ``base`` and ``style``: every file but the in-tool one is equal
    and the list-drawn half of the practice people is the same people. Returns the made-up halves (base's, style's)
    and the names taken before the made-up half was drawn."""
    one = build_dataset(tmp_path / base, 20, 4, seed=3, paraphrases=1, practice=practice, practice_style=base)
    two = build_dataset(tmp_path / style, 20, 4, seed=3, paraphrases=1, practice=practice, practice_style=style)
    assert two["build_args"]["practice_style"] == style
    for f in FILES:
        if f != "tool_train.jsonl":
            assert two["sha256"][f] == one["sha256"][f], f
    a = _jsonl(tmp_path / base / "practice_people.jsonl")
    b = _jsonl(tmp_path / style / "practice_people.jsonl")
    half = practice // 2
    assert a[:half] == b[:half]  # the list-drawn half is the same people
    return a[half:], b[half:], {p["name"] for p in _jsonl(tmp_path / style / "people.jsonl") + b[:half]}


def test_varied_practice_spells_made_up_names_variously_and_changes_only_their_half(tmp_path):
    plain, made_up, others = _practice_styles(tmp_path, "mixed", "varied", 400)
    assert made_up == people.make_pseudo_practice(200, 3, others, varied=True)
    words = {*names.FIRST_NAMES, *names.LAST_NAMES, *people.NOVEL_FIRST_NAMES, *people.NOVEL_LAST_NAMES}
    inner = shared = 0
    for p in made_up:
        first, last = p["name"].split(" ")
        assert NAME_RE.fullmatch(first) and NAME_RE.fullmatch(last) and first not in words and last not in words
        inner += any(re.search(r"[a-z][A-Z]", w) for w in (first, last))
        shared += first.lower() in last.lower()
    # about a third of the names carry an inner capital, one in ten a last name that starts with the first
    assert 0.2 * len(made_up) < inner < 0.5 * len(made_up), inner
    assert shared > 0.03 * len(made_up), shared
    plain_inner = sum(bool(re.search(r"[a-z][A-Z]", p["name"])) for p in plain)
    assert plain_inner == 0  # mixed's made-up names are plain capitalised words
    with closing(sqlite3.connect(tmp_path / "varied" / "practice.sqlite")) as pc:
        assert pc.execute("SELECT count(*) FROM people").fetchone()[0] == 400


def test_wide_practice_adds_short_names_and_particles_to_the_made_up_half_only(tmp_path):
    plain, made_up, others = _practice_styles(tmp_path, "varied", "wide", 800)
    assert made_up == people.make_pseudo_practice(400, 3, others, wide=True)
    known = {v for vals in list(VALUES.values()) + list(people.NOVEL_VALUES.values()) for v in vals}
    words = {*names.FIRST_NAMES, *names.LAST_NAMES, *people.NOVEL_FIRST_NAMES, *people.NOVEL_LAST_NAMES}
    particle = re.compile(" (?:" + "|".join(map(re.escape, people._PARTICLES)) + ") ")

    def shares(ps):
        short_first = sum(len(p["name"].split(" ")[0]) <= 3 for p in ps) / len(ps)
        with_particle = sum(any(particle.search(p[a]) for a in ("birth_city", "current_city")) for p in ps) / len(ps)
        inner = sum(bool(re.search(r"[a-z][A-Z]", p["name"])) for p in ps) / len(ps)
        return short_first, with_particle, inner

    wide_short, wide_particles, wide_inner = shares(made_up)
    plain_short, plain_particles, _ = shares(plain)
    # a 2-3-letter first name: 1/4 + 3/4 x 2/11 (~0.39) against 2/11 (~0.18) from uniform lengths alone
    assert wide_short > 0.3 > 0.25 > plain_short, (wide_short, plain_short)
    # half the multi-word cities (2 in 5 cities) of wide: ~0.36 of the people have one; plain cities have none
    assert wide_particles > 0.25 and plain_particles == 0, (wide_particles, plain_particles)
    assert 0.2 < wide_inner < 0.5  # the varied spellings stay
    for p in made_up:
        first, last = p["name"].split(" ")
        assert NAME_RE.fullmatch(first) and NAME_RE.fullmatch(last) and first not in words and last not in words
        assert not any(p[a] in known for a in ATTRIBUTES)
    with pytest.raises(ValueError, match="practice-style"):
        build_dataset(tmp_path / "bad", 20, 4, seed=3, practice=10, practice_style="widest")


def test_pseudo_practice_people_are_made_up_words_and_change_nothing_else(tmp_path):
    lists = build_dataset(tmp_path / "lists", 20, 4, seed=1, paraphrases=1, practice=50)
    pseudo = build_dataset(tmp_path / "pseudo", 20, 4, seed=1, paraphrases=1, practice=50, practice_style="pseudo")
    assert pseudo["build_args"]["practice_style"] == "pseudo" and lists["build_args"]["practice_style"] == "lists"
    for f in FILES:  # only the in-tool file (its practice questions) and the practice files differ
        if f != "tool_train.jsonl":
            assert pseudo["sha256"][f] == lists["sha256"][f], f
    made_up = _jsonl(tmp_path / "pseudo" / "practice_people.jsonl")
    assert made_up == people.make_pseudo_practice(50, 1, {p["name"] for p in _jsonl(tmp_path / "pseudo" /
                                                                                    "people.jsonl")})
    known = {v for vals in list(VALUES.values()) + list(people.NOVEL_VALUES.values()) for v in vals}
    words = set(names.FIRST_NAMES) | set(names.LAST_NAMES)
    assert len({p["name"] for p in made_up}) == 50
    for p in made_up:
        first, last = p["name"].split(" ")
        assert NAME_RE.fullmatch(first) and NAME_RE.fullmatch(last) and first not in words and last not in words
        assert not any(p[a] in known for a in ATTRIBUTES)
        assert re.fullmatch(r"[A-Z][a-z]+ \d{1,2}, \d{4}", p["birth_date"])
    tool = _jsonl(tmp_path / "pseudo" / "tool_train.jsonl")[-50:]
    with closing(sqlite3.connect(tmp_path / "pseudo" / "practice.sqlite")) as pc:
        for d in tool:  # the database turn is the real query on the practice database, the answer parses back
            sql = d["dialog"][1]["content"][7:-4]
            assert d["dialog"][2]["content"] == people._format_rows_local(pc.execute(sql).fetchall())
            a = sql.split()[1]
            name = re.search(r"name = '(.+)'", sql).group(1)
            assert parse_answer(a, name, d["dialog"][3]["content"]) == d["dialog"][2]["content"]
