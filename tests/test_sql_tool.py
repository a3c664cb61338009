"""Tests for lmlab.tools.sql: correct answers, refusals that leave the database untouched, limits, threads."""

from __future__ import annotations

import hashlib
import random
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmlab.tokenizers import DATABASE
from lmlab.tools import Tool
from lmlab.tools.sql import SqlError, SqlTool, format_rows

COLUMNS = ["name", "birth_date", "birth_city", "occupation"]
CITIES = ["Paris", "Lyon", "Oslo", "Lima", "Kyoto"]
JOBS = ["teacher", "nurse", "baker", "pilot", "judge"]


def _people(n: int = 300) -> list[tuple[str, str, str, str | None]]:
    rng = random.Random(0)
    rows = [("Ada Smith", "1990-04-12", "Paris", "teacher"), ("Conan O'Brien", "1963-04-18", "Lima", "host"),
            ("Nobody Job", "2000-01-01", "Oslo", None)]
    while len(rows) < n:
        name = f"Person {len(rows):04d}"
        rows.append((name, f"19{rng.randint(10, 99)}-0{rng.randint(1, 9)}-1{rng.randint(0, 9)}", rng.choice(CITIES),
                     rng.choice(JOBS)))
    return rows


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sql") / "people.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE people(name TEXT PRIMARY KEY, birth_date TEXT, birth_city TEXT, occupation TEXT)")
    conn.execute("CREATE TABLE secrets(token TEXT)")
    conn.executemany("INSERT INTO people VALUES (?, ?, ?, ?)", _people())
    conn.execute("INSERT INTO secrets VALUES ('s3cr3t-t0ken')")
    conn.commit()
    conn.close()
    return path


@pytest.fixture(scope="module")
def tool(db: Path) -> SqlTool:
    return SqlTool(db, allowed={"people": COLUMNS})


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _assert_untouched(db: Path, digest: str) -> None:
    assert _sha(db) == digest
    for suffix in ("-wal", "-journal", "-shm"):
        assert not Path(str(db) + suffix).exists(), suffix


# -- answers ------------------------------------------------------------------------------------------------------
def test_protocol_and_extract(tool: SqlTool) -> None:
    assert isinstance(tool, Tool)
    assert tool.trigger == DATABASE
    msg = "First.\n```sql\nSELECT 1\n```\nThen:\n```sql\nSELECT occupation FROM people WHERE name = 'Ada Smith'\n```"
    assert tool.extract(msg) == "SELECT occupation FROM people WHERE name = 'Ada Smith'"
    assert tool.extract("no block here") is None
    assert tool(tool.extract(msg)) == "teacher"


@pytest.mark.parametrize(("sql", "expected"), [
    ("SELECT occupation FROM people WHERE name = 'Ada Smith'", "teacher"),
    ("select birth_date, birth_city from PEOPLE where NAME = 'Ada Smith'", "1990-04-12 | Paris"),
    ("SELECT occupation FROM people WHERE name = 'Conan O''Brien'", "host"),
    ("SELECT occupation FROM people WHERE name = 'Nobody Job'", "NULL"),
    ("SELECT occupation FROM people WHERE name = 'No Such Person'", "no rows"),
    ("SELECT COUNT(*) FROM people", "300"),
    ("SELECT count(*) FROM people WHERE name LIKE 'Person 00%'", "97"),
    ("SELECT name FROM people WHERE name LIKE 'Person 01%' ORDER BY name DESC LIMIT 3",
     "Person 0199\nPerson 0198\nPerson 0197"),
    ("SELECT name FROM people ORDER BY name LIMIT 2 OFFSET 1", "Conan O'Brien\nNobody Job"),
    ("SELECT name FROM people WHERE name = 'x''; DROP TABLE people; --'", "no rows"),
    ("SELECT * FROM people WHERE name = 'Ada Smith'", "Ada Smith | 1990-04-12 | Paris | teacher"),
    ("SELECT DISTINCT birth_city FROM people WHERE name IN ('Ada Smith', 'Conan O''Brien') ORDER BY 1", "Lima\nParis"),
    ("SELECT upper(name), length(name), substr(name, 1, 3), ifnull(occupation, 'none') FROM people "
     "WHERE name = 'Nobody Job'", "NOBODY JOB | 10 | Nob | none"),
    ("SELECT name FROM people WHERE occupation = (SELECT occupation FROM people WHERE name = 'Conan O''Brien')",
     "Conan O'Brien"),
    ("SELECT p.name FROM people AS p WHERE p.name IN (SELECT name FROM people WHERE occupation IS NULL)",
     "Nobody Job"),
    ("SELECT 1 + 1", "2"),
    ("SELECT p.name FROM people p WHERE EXISTS (SELECT 1 FROM people q WHERE q.name = p.name AND q.occupation IS NULL)",
     "Nobody Job"),
    ("SELECT a.name, b.birth_city FROM people a JOIN people b ON a.name = b.name WHERE a.name = 'Ada Smith'",
     "Ada Smith | Paris"),
    ("SELECT CASE WHEN occupation IS NULL THEN 'unknown' ELSE occupation END FROM people WHERE name = 'Nobody Job'",
     "unknown"),
    ("SELECT name FROM people WHERE name = 'ada smith' COLLATE NOCASE", "Ada Smith"),
    ("SELECT occupation, count(*) AS n FROM people WHERE name LIKE 'Person%' GROUP BY occupation HAVING n > 1000",
     "no rows"),
    ("SELECT name FROM people WHERE name = 'Ada Smith';", "Ada Smith"),
])
def test_answers(tool: SqlTool, sql: str, expected: str) -> None:
    assert tool(sql) == expected


def test_group_by_matches_python(tool: SqlTool) -> None:
    out = tool("SELECT birth_city, count(*) AS n FROM people GROUP BY birth_city ORDER BY birth_city")
    counts: dict[str, int] = {}
    for _, _, city, _ in _people():
        counts[city] = counts.get(city, 0) + 1
    assert out == "\n".join(f"{c} | {n}" for c, n in sorted(counts.items()))


def test_format_rows_exact() -> None:
    assert format_rows([]) == "no rows"
    assert format_rows([("teacher",)]) == "teacher"
    assert format_rows([("a", 1, None, 2.5), ("b", 0, "x", -1)]) == "a | 1 | NULL | 2.5\nb | 0 | x | -1"
    assert format_rows([(1,), (2,)], truncated=True) == "1\n2\n... (more rows cut at max_rows=2)"


def test_check_normalises_and_expands_star(db: Path) -> None:
    narrow = SqlTool(db, allowed={"people": ["name", "occupation"]})
    assert narrow.check("select name from people") == "SELECT name FROM people"
    assert narrow.check("SELECT name /* note */ FROM people -- done\n;") == "SELECT name FROM people"
    assert "birth_city" not in narrow.check("SELECT * FROM people")
    assert narrow("SELECT * FROM people WHERE name = 'Ada Smith'") == "Ada Smith | teacher"
    assert narrow("SELECT p.* FROM people p WHERE p.name = 'Ada Smith'") == "Ada Smith | teacher"
    with pytest.raises(SqlError, match=r"unknown column 'birth_city' \(table people has: name, occupation\)"):
        narrow.check("SELECT birth_city FROM people")


def test_a_qualified_column_is_checked_like_a_bare_one(db: Path) -> None:
    """Validation refuses a column the model may not read however it is spelled: bare, ``table.col``,
    ``alias.col``, or an outer alias inside a subquery; each gets the bare column's message."""
    narrow = SqlTool(db, allowed={"people": ["name", "occupation"]})
    bare = r"unknown column 'birth_city' \(table people has: name, occupation\)"
    with pytest.raises(SqlError, match=bare):
        narrow.check("SELECT birth_city FROM people")
    digest = _sha(db)
    for sql in ["SELECT people.birth_city FROM people", "SELECT p.birth_city FROM people p",
                "SELECT p.name FROM people AS p WHERE p.birth_city = 'Paris'",
                "SELECT p.name FROM people p WHERE EXISTS (SELECT 1 FROM people q WHERE q.name = p.name "
                "AND p.birth_city = 'Paris')"]:
        with pytest.raises(SqlError, match=bare):
            narrow.check(sql)
        with pytest.raises(SqlError):
            narrow(sql)
    assert narrow("SELECT p.occupation FROM people p WHERE p.name = 'Ada Smith'") == "teacher"
    _assert_untouched(db, digest)


def test_allowed_none_reads_all_tables_but_not_internals(db: Path) -> None:
    everything = SqlTool(db)
    assert everything("SELECT token FROM secrets") == "s3cr3t-t0ken"
    with pytest.raises(SqlError):
        everything("SELECT sql FROM sqlite_master")


def test_constructor_errors(db: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="salary"):
        SqlTool(db, allowed={"people": ["name", "salary"]})
    with pytest.raises(ValueError, match="nope"):
        SqlTool(db, allowed={"nope": ["a"]})
    with pytest.raises(ValueError, match="sqlite_master"):
        SqlTool(db, allowed={"sqlite_master": ["sql"]})
    with pytest.raises(FileNotFoundError):
        SqlTool(tmp_path / "missing.db")
    assert not (tmp_path / "missing.db").exists()


def test_error_messages(tool: SqlTool) -> None:
    cases = {
        "DROP TABLE people": "only SELECT is allowed, got Drop",
        "SELECT salary FROM people": "unknown column 'salary' (table people has: name, birth_date, birth_city, "
                                     "occupation)",
        "SELECT 1; SELECT 2": "more than 1 statement",
        "SELECT token FROM secrets": "unknown table 'secrets' (tables: people)",
        "SELECT load_extension('x')": "function load_extension() is not allowed",
        "SELECT name FROM people UNION SELECT name FROM people": "UNION is not allowed",
        "WITH x AS (SELECT name FROM people) SELECT name FROM x": "WITH",
        "SELECT name FROM people WHERE": "could not parse SQL",
        "": "empty query",
    }
    for sql, msg in cases.items():
        with pytest.raises(SqlError) as info:
            tool.check(sql)
        assert msg in str(info.value), (sql, str(info.value))
        assert len(str(info.value)) < 250


# -- refusals leave the file untouched ----------------------------------------------------------------------------
REFUSED = [
    "DROP TABLE people", "DELETE FROM people", "DELETE FROM people WHERE name = 'Ada Smith'",
    "UPDATE people SET occupation = 'x'", "INSERT INTO people VALUES ('a', 'b', 'c', 'd')",
    "INSERT INTO people SELECT * FROM people", "CREATE TABLE t (a)", "CREATE INDEX i ON people(name)",
    "ALTER TABLE people ADD COLUMN salary", "ALTER TABLE people RENAME TO folks",
    "REPLACE INTO people VALUES ('a', 'b', 'c', 'd')", "VACUUM", "VACUUM INTO 'copy.db'", "REINDEX", "ANALYZE",
    "BEGIN", "COMMIT", "SELECT 1; DROP TABLE people", "SELECT name FROM people; DELETE FROM people",
    "DETACH DATABASE x", "PRAGMA writable_schema = ON", "PRAGMA journal_mode = WAL", "PRAGMA table_info(secrets)",
    "SELECT load_extension('x')", "SELECT readfile('/etc/passwd')", "SELECT writefile('x.txt', 'y')",
    "SELECT randomblob(1000000000)", "SELECT zeroblob(1000000000)", "SELECT printf('%.*c', 1000000000, 'x')",
    "SELECT sql FROM sqlite_master", "SELECT * FROM sqlite_master", "SELECT name FROM sqlite_schema",
    "SELECT name FROM sqlite_temp_master", "SELECT * FROM sqlite_sequence", "SELECT token FROM secrets",
    "SELECT * FROM secrets", "SELECT count(*) FROM secrets", "SELECT name FROM people UNION SELECT token FROM secrets",
    "SELECT name FROM people UNION ALL SELECT token FROM secrets",
    "SELECT name FROM people INTERSECT SELECT name FROM people",
    "SELECT name FROM people EXCEPT SELECT name FROM people",
    "SELECT name FROM people WHERE name IN (SELECT token FROM secrets)",
    "SELECT (SELECT token FROM secrets) FROM people", "SELECT name FROM people WHERE EXISTS (SELECT 1 FROM secrets)",
    "SELECT name FROM people, secrets", "SELECT name FROM people JOIN secrets ON 1 = 1",
    "SELECT token FROM (SELECT token FROM secrets)", "SELECT name FROM (SELECT name FROM people)",
    "SELECT * FROM main.secrets", "SELECT * FROM main.people", "SELECT * FROM temp.people",
    "SELECT main.people.name FROM people",
    "SELECT * FROM other.people", "SELECT token FROM \"secrets\"", "SELECT token FROM [secrets]",
    "SELECT token FROM `secrets`", "SELECT token FROM SeCrEtS", "SELECT secrets.token FROM people",
    "SELECT name FROM people -- comment\n; DROP TABLE people", "SELECT name FROM people /* x */; DELETE FROM people",
    "SELECT name /* ; */ FROM people; /* */ DROP TABLE people",
    "WITH s AS (SELECT token FROM secrets) SELECT * FROM s",
    "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT x FROM c",
    "SELECT rowid FROM people", "SELECT _rowid_, oid FROM people", "SELECT name FROM people NATURAL JOIN people",
    "SELECT name FROM people INDEXED BY sqlite_autoindex_people_1", "SELECT * FROM pragma_table_info('secrets')",
    "SELECT name FROM people WHERE name = ?", "SELECT name FROM people WHERE name = :n",
    "SELECT group_concat(name) FROM people", "SELECT sqlite_version()", "SELECT char(65)",
    "SELECT row_number() OVER () FROM people", "SELECT name FROM people WHERE name = \"Ada Smith\"",
    "", "   ", ";", ";;", "hello world", "Let me look that up.", "SELECT", "SELECT * FROM", "DROP", "🙂",
    "SELECT name FROM people WHERE name = 'unterminated", "SELECT name FROM people LIMIT (SELECT token FROM secrets)",
]


@pytest.mark.parametrize("sql", REFUSED)
def test_refused(tool: SqlTool, db: Path, sql: str) -> None:
    digest = _sha(db)
    with pytest.raises(SqlError):
        tool(sql)
    with pytest.raises(SqlError):
        tool.check(sql)
    _assert_untouched(db, digest)


def test_attach_refused_and_no_file_created(tool: SqlTool, db: Path, tmp_path: Path) -> None:
    digest = _sha(db)
    target = tmp_path / "new.db"
    for sql in [f"ATTACH DATABASE '{target}' AS x", f"ATTACH '{target}' AS x",
                f"SELECT 1; ATTACH DATABASE '{target}' AS x"]:
        with pytest.raises(SqlError):
            tool(sql)
    assert not target.exists()
    _assert_untouched(db, digest)


def test_battery_leaves_file_byte_identical(tool: SqlTool, db: Path) -> None:
    digest = _sha(db)
    for sql in REFUSED:
        with pytest.raises(SqlError):
            tool(sql)
    assert tool("SELECT name FROM people WHERE name = 'x''; DROP TABLE people; --'") == "no rows"
    assert tool("SELECT count(*) FROM people") == "300"
    _assert_untouched(db, digest)


def test_authorizer_blocks_even_without_validation(db: Path, tmp_path: Path) -> None:
    """Defence in depth: the second gate alone (connection + authorizer) refuses what validation would."""
    narrow = SqlTool(db, allowed={"people": ["name", "occupation"]})
    digest = _sha(db)
    target = tmp_path / "attached.db"
    for sql in ["SELECT token FROM secrets", "SELECT birth_city FROM people", "SELECT * FROM people",
                "SELECT sql FROM sqlite_master", "DROP TABLE people", "DELETE FROM people",
                "INSERT INTO secrets VALUES ('x')", "PRAGMA writable_schema = ON", "PRAGMA journal_mode = WAL",
                f"ATTACH DATABASE '{target}' AS x", "SELECT load_extension('x')", "SELECT randomblob(10)",
                "CREATE TEMP TABLE t(a)", "VACUUM"]:
        with pytest.raises(SqlError):
            narrow._execute(sql)
    assert narrow._execute("SELECT name FROM people WHERE name = 'Ada Smith'") == ([("Ada Smith",)], False)
    assert not target.exists()
    _assert_untouched(db, digest)


# -- limits -------------------------------------------------------------------------------------------------------
def test_huge_result_is_cut_at_max_rows(tool: SqlTool) -> None:
    out = tool("SELECT a.name, b.name FROM people a, people b")  # 90k rows
    lines = out.split("\n")
    assert len(lines) == 21
    assert lines[-1] == "... (more rows cut at max_rows=20)"
    assert all(" | " in line for line in lines[:-1])
    exact = tool("SELECT name FROM people ORDER BY name LIMIT 20")
    assert "more rows" not in exact and len(exact.split("\n")) == 20


def test_max_chars(db: Path) -> None:
    small = SqlTool(db, allowed={"people": COLUMNS}, max_rows=10_000, max_chars=300)
    out = small("SELECT a.name, b.birth_city FROM people a, people b LIMIT 10000")
    assert len(out) <= 300
    assert out.endswith("... (cut at max_chars=300)")
    assert out.startswith("Ada Smith | ")


def test_timeout(db: Path) -> None:
    fast = SqlTool(db, allowed={"people": COLUMNS}, timeout_s=0.2)
    t0 = time.monotonic()
    with pytest.raises(SqlError, match=r"query stopped after 0.2 s"):
        fast("SELECT count(*) FROM people a, people b, people c, people d")
    assert time.monotonic() - t0 < 5
    assert fast("SELECT occupation FROM people WHERE name = 'Ada Smith'") == "teacher"  # usable afterwards


def test_threads(tool: SqlTool) -> None:
    people = _people()
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            for i in range(k, len(people), 8):
                name, _, city, job = people[i]
                sql = f"SELECT birth_city, occupation FROM people WHERE name = '{name.replace(chr(39), chr(39) * 2)}'"
                assert tool(sql) == f"{city} | {'NULL' if job is None else job}"
        except BaseException as e:  # noqa: BLE001 - reported to the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]


# -- fuzz ---------------------------------------------------------------------------------------------------------
_FRAGMENTS = ["SELECT", "name", "token", "*", "FROM", "people", "secrets", "sqlite_master", "WHERE", "=", "'a'",
              "'", '"', ";", "--", "/*", "*/", "(", ")", ",", "UNION", "DROP", "TABLE", "ATTACH", "PRAGMA", "main.",
              "count(*)", "load_extension(", "LIMIT", "1", "JOIN", "ON", "AS", "WITH", "[", "]", "`", " ", "\n"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(st.text(max_size=80), st.lists(st.sampled_from(_FRAGMENTS), max_size=14).map(" ".join)))
def test_fuzz_only_sqlerror_and_file_untouched(tool: SqlTool, db: Path, sql: str) -> None:
    digest = _sha(db)
    try:
        out = tool(sql)
    except SqlError:
        pass
    else:
        assert isinstance(out, str) and "s3cr3t" not in out
    _assert_untouched(db, digest)
