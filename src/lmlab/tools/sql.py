"""A safe, read-only SQLite tool for model-written SQL.

The model under study writes a query in a ```sql ... ``` block; the generation engine extracts it, calls
:class:`SqlTool` in a worker thread and injects the returned text as the ``<|database|>`` turn. Model output is
untrusted, so a query reaches the database only after two independent gates:

1. **Validation** (:meth:`SqlTool.check`, sqlglot, dialect sqlite, before anything touches the db): exactly one
   statement; a plain ``SELECT`` (WHERE, JOIN, GROUP BY/HAVING, aggregates, ORDER BY, LIMIT/OFFSET, DISTINCT,
   CASE, LIKE/GLOB/IN/BETWEEN, scalar/IN/EXISTS subqueries over allowed tables); every table and column must be
   allowed; functions only from a small allowlist; every syntax node from an allowlist. Refused: CTEs (``WITH``)
   and set operations (``UNION``/``INTERSECT``/``EXCEPT``, simplest to reason about: one SELECT at a time),
   subqueries in FROM, NATURAL joins and INDEXED BY (they read columns/indexes implicitly), schema-qualified
   names (``main.x``), ``sqlite_*`` tables, parameters (``?``), window functions. ``SELECT *`` is expanded to the
   allowed columns, so a table's non-allowed columns never leak. What runs is the validated, normalised SQL.
2. **Execution** (per call, so it is thread-safe): a ``mode=ro`` URI connection with ``PRAGMA query_only``, load
   extensions off, an authorizer that allows only SELECT, reads of allowed table columns and allowlisted
   functions (no ATTACH, PRAGMA, writes), a progress handler that stops the query after ``timeout_s``, at most
   ``max_rows + 1`` rows fetched, and the text cut at ``max_chars``.

Any refusal or failure raises :class:`SqlError`, whose short message is safe to show to the model.

The answer format is fixed because training data is generated with it (:func:`format_rows`): one line per row,
values joined by `` | ``, ``NULL`` for None, no header, ``no rows`` for an empty result.

Usage::

    from lmlab.tools.sql import SqlTool
    tool = SqlTool("people.db", allowed={"people": ["name", "birth_date", "birth_city", "occupation"]})
    tool(tool.extract("Let me look.\\n```sql\\nSELECT occupation FROM people WHERE name = 'Ada Smith'\\n```"))
    # -> 'teacher'
    tool.check("SELECT salary FROM people")  # SqlError: unknown column 'salary' (table people has: name, ...)
"""

from __future__ import annotations

import logging
import re
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import sqlglot
from sqlglot import exp

from lmlab.tokenizers import DATABASE
from lmlab.tools import CodeBlockTool

__all__ = ["SqlError", "SqlTool", "format_rows"]

log = logging.getLogger(__name__)


class _QuietWhileParsing(logging.Filter):
    """Drops sqlglot's own log records (e.g. "contains unsupported syntax. Falling back to parsing as a
    'Command'") while this thread is validating a model's query: a refusal is the tool's answer to the model,
    not something for the user's terminal. sqlglot used elsewhere in the process keeps its warnings."""

    state = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(self.state, "on", False)


logging.getLogger("sqlglot").addFilter(_QuietWhileParsing())

MAX_SQL_CHARS = 10_000  # model queries are short; this bounds the parser's work

# sqlglot function nodes that are allowed, and the SQLite function names they may call at run time.
_FUNC_NODES: tuple[type[exp.Expression], ...] = (
    exp.Count, exp.Min, exp.Max, exp.Sum, exp.Avg, exp.Lower, exp.Upper, exp.Length, exp.Trim, exp.Substring,
    exp.Abs, exp.Round, exp.Coalesce, exp.Nullif, exp.StrPosition, exp.Cast, exp.Typeof,
)
_ANONYMOUS_FUNCS = frozenset({"total", "ltrim", "rtrim", "substr", "ifnull", "instr"})
_SQLITE_FUNCS = frozenset({
    "count", "min", "max", "sum", "avg", "total", "lower", "upper", "length", "trim", "ltrim", "rtrim", "substr",
    "substring", "abs", "round", "coalesce", "ifnull", "nullif", "instr", "typeof", "like", "glob",
})
# Structural nodes a plain SELECT may contain; anything else is refused.
_SYNTAX_NODES: tuple[type[exp.Expression], ...] = (
    exp.Select, exp.From, exp.Join, exp.Where, exp.Group, exp.Having, exp.Order, exp.Ordered, exp.Limit,
    exp.Offset, exp.Distinct, exp.Column, exp.Identifier, exp.Star, exp.Table, exp.TableAlias, exp.Alias,
    exp.Literal, exp.Null, exp.Boolean, exp.HexString, exp.Paren, exp.Subquery, exp.Exists, exp.In, exp.Tuple,
    exp.Between, exp.Is, exp.Not, exp.Neg, exp.And, exp.Or, exp.EQ, exp.NEQ, exp.GT, exp.GTE, exp.LT, exp.LTE,
    exp.Add, exp.Sub, exp.Mul, exp.Div, exp.Mod, exp.DPipe, exp.Like, exp.Glob, exp.Escape, exp.Case, exp.If,
    exp.Collate, exp.Var, exp.DataType,
)
_SELECT_ARGS = frozenset({"expressions", "distinct", "from_", "joins", "where", "group", "having", "order", "limit",
                          "offset"})
_COLLATIONS = frozenset({"nocase", "binary", "rtrim"})


class SqlError(ValueError):
    """A refused or failed query; the message is short and safe to show to the model."""


def format_rows(rows: Sequence[Sequence[Any]], truncated: bool = False) -> str:
    """The tool's answer text: one line per row, values joined by `` | `` (None -> ``NULL``), no header;
    ``no rows`` when empty; with ``truncated``, a last line saying more rows were cut at ``len(rows)``."""
    if not rows:
        return "no rows"
    lines = [" | ".join("NULL" if v is None else str(v) for v in row) for row in rows]
    if truncated:
        lines.append(f"... (more rows cut at max_rows={len(rows)})")
    return "\n".join(lines)


def _connect_ro(db_path: Path) -> sqlite3.Connection:
    uri = f"file:{urllib.parse.quote(str(db_path))}?mode=ro"
    conn = sqlite3.connect(uri, uri=True, check_same_thread=False)
    if hasattr(conn, "enable_load_extension"):
        conn.enable_load_extension(False)
    conn.execute("PRAGMA query_only = ON")
    return conn


def _short(msg: str, n: int = 200) -> str:
    msg = " ".join(str(msg).split())
    return msg if len(msg) <= n else msg[: n - 3] + "..."


class SqlTool:
    """Runs one validated, read-only SELECT per call on a SQLite file (see the module docstring).

    ``allowed`` maps table -> columns the model may read (case-insensitive); None means every table of the db
    (except ``sqlite_*``) with all its columns."""

    trigger: str = DATABASE

    def __init__(self, db_path: str | Path, allowed: Mapping[str, Sequence[str]] | None = None, max_rows: int = 20,
                 timeout_s: float = 1.0, max_chars: int = 2000) -> None:
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if max_chars < 64:
            raise ValueError(f"max_chars must be >= 64, got {max_chars}")
        self.db_path = Path(db_path).resolve()
        if not self.db_path.is_file():
            raise FileNotFoundError(f"SqlTool: no database file at {self.db_path}")
        self.max_rows, self.timeout_s, self.max_chars = max_rows, timeout_s, max_chars
        self._blocks = CodeBlockTool(self, language="sql", trigger=DATABASE)
        schema = self._read_schema()
        if allowed is None:
            allowed = {t: cols for t, cols in schema.items() if not t.lower().startswith("sqlite_")}
        # lower-case name -> (name as in the db, {lower-case column -> column as in the db})
        self._tables: dict[str, tuple[str, dict[str, str]]] = {}
        db_tables = {t.lower(): (t, {c.lower(): c for c in cols}) for t, cols in schema.items()}
        for table, cols in allowed.items():
            if table.lower().startswith("sqlite_"):
                raise ValueError(f"SqlTool: internal table {table!r} cannot be allowed")
            if table.lower() not in db_tables:
                raise ValueError(f"SqlTool: allowed table {table!r} is not in {self.db_path} (has: {sorted(schema)})")
            name, db_cols = db_tables[table.lower()]
            missing = [c for c in cols if c.lower() not in db_cols]
            if missing:
                has = list(db_cols.values())
                raise ValueError(f"SqlTool: allowed columns {missing} are not in table {name} (has: {has})")
            self._tables[table.lower()] = (name, {c.lower(): db_cols[c.lower()] for c in cols})

    def _read_schema(self) -> dict[str, list[str]]:
        conn = _connect_ro(self.db_path)
        try:
            tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY rowid")]
            return {t: [r[1] for r in conn.execute(f'PRAGMA table_info("{t.replace(chr(34), chr(34) * 2)}")')]
                    for t in tables}
        finally:
            conn.close()

    def __repr__(self) -> str:
        tables = [t for t, _ in self._tables.values()]
        return f"SqlTool({str(self.db_path)!r}, tables={tables}, max_rows={self.max_rows})"

    # -- Tool protocol -----------------------------------------------------------------------------------------
    def extract(self, message: str) -> str | None:
        """The last ```sql block of the message, or None."""
        return self._blocks.extract(message)

    def __call__(self, sql: str) -> str:
        """Validate then run ``sql``; the answer text (see :func:`format_rows`), or SqlError."""
        query = self.check(sql)
        rows, truncated = self._execute(query)
        text = format_rows(rows, truncated)
        if len(text) > self.max_chars:
            marker = f"... (cut at max_chars={self.max_chars})"
            text = text[: self.max_chars - len(marker) - 1] + "\n" + marker
        return text

    # -- validation --------------------------------------------------------------------------------------------
    def check(self, sql: str) -> str:
        """Validate ``sql`` without running it: the normalised SQL that would run, or SqlError."""
        if not isinstance(sql, str) or not sql.strip():
            raise SqlError("empty query")
        if len(sql) > MAX_SQL_CHARS:
            raise SqlError(f"query longer than {MAX_SQL_CHARS} characters")
        try:
            _QuietWhileParsing.state.on = True
            statements = [s for s in sqlglot.parse(sql, read="sqlite") if s is not None]
        except sqlglot.errors.ParseError as e:
            err = e.errors[0] if e.errors else {}
            what = re.sub(r"<Token token_type: TokenType\.(\w+).*?>", r"\1", str(err.get("description") or e))
            near = f" near '{_short(err['highlight'], 40)}'" if err.get("highlight") else ""
            raise SqlError(f"could not parse SQL: {_short(what, 120)}{near}") from None
        except Exception as e:  # noqa: BLE001 - any parser failure on untrusted text is a refused query
            raise SqlError(f"could not parse SQL: {_short(e) or type(e).__name__}") from None
        finally:
            _QuietWhileParsing.state.on = False
        if not statements:
            raise SqlError("empty query")
        if len(statements) > 1:
            raise SqlError(f"more than 1 statement (got {len(statements)})")
        stmt = statements[0]
        if not isinstance(stmt, exp.Select):
            if isinstance(stmt, exp.SetOperation):
                raise SqlError(f"{type(stmt).__name__.upper()} is not allowed: use a single SELECT")
            if isinstance(stmt, (exp.Condition, exp.Alias)):
                raise SqlError("not a SQL statement; only SELECT is allowed")
            kind = stmt.name.split()[0].title() if isinstance(stmt, exp.Command) and stmt.name else type(stmt).__name__
            raise SqlError(f"only SELECT is allowed, got {kind}")
        try:
            self._check_select(stmt, [])
            return stmt.sql(dialect="sqlite", comments=False)
        except SqlError:
            raise
        except Exception as e:  # noqa: BLE001 - an odd tree we do not understand is refused, not run
            log.debug("SqlTool: refusing %r after %r", sql, e)
            raise SqlError(f"unsupported SQL ({type(e).__name__})") from None

    def _table(self, t: exp.Table) -> str:
        if t.args.get("db") or t.args.get("catalog"):
            raise SqlError(f"schema-qualified table names are not allowed: {_short(t.sql(dialect='sqlite'))}")
        if not isinstance(t.this, exp.Identifier):
            raise SqlError("table-valued functions are not allowed")
        if t.args.get("indexed"):
            raise SqlError("INDEXED BY is not allowed")
        key = t.name.lower()
        if key not in self._tables:
            names = ", ".join(name for name, _ in self._tables.values())
            raise SqlError(f"unknown table '{t.name}' (tables: {names})")
        return key

    def _unknown_column(self, name: str, tables: Sequence[str]) -> SqlError:
        if not tables:
            return SqlError(f"unknown column '{name}' (no table in FROM)")
        t, cols = self._tables[tables[0]]
        return SqlError(f"unknown column '{name}' (table {t} has: {', '.join(cols.values())})")

    def _check_select(self, sel: exp.Select, outer: list[dict[str, str]]) -> None:
        for key, value in sel.args.items():
            if value and key not in _SELECT_ARGS:
                raise SqlError("WITH (CTE) is not allowed" if key == "with_" else f"unsupported SQL clause: {key}")
        if not sel.expressions:
            raise SqlError("SELECT needs at least one column or value")
        # sources of this SELECT: alias (lower) -> allowed table key, in FROM/JOIN order
        sources: dict[str, str] = {}
        tables: list[exp.Table] = []
        from_ = sel.args.get("from_")
        items = ([from_.this] if from_ else []) + [j.this for j in sel.args.get("joins") or []]
        for item in items:
            if not isinstance(item, exp.Table):
                raise SqlError("subqueries in FROM are not allowed; query the tables directly")
            key = self._table(item)
            alias = (item.alias or item.name).lower()
            if alias in sources:
                raise SqlError(f"table name or alias '{item.alias or item.name}' used twice; give each an alias")
            sources[alias] = key
            tables.append(item)
        for j in sel.args.get("joins") or []:
            if (j.args.get("method") or "").upper() == "NATURAL":
                raise SqlError("NATURAL JOIN is not allowed; use JOIN ... ON")
            for ident in j.args.get("using") or []:
                if not all(ident.name.lower() in self._tables[k][1] for k in sources.values()):
                    raise self._unknown_column(ident.name, list(sources.values()))
        self._expand_stars(sel, sources)
        aliases = {e.alias.lower() for e in sel.expressions if isinstance(e, exp.Alias)}
        scopes = [sources, *outer]
        table_ids = {id(t) for t in tables}
        for node in sel.walk(prune=lambda n: n is not sel and isinstance(n, exp.Select)):
            if node is not sel and isinstance(node, exp.Select):
                self._check_select(node, scopes)
            elif isinstance(node, exp.Func) and not isinstance(node, _SYNTAX_NODES):  # Case, Exists... are Funcs
                self._check_func(node)
            elif not isinstance(node, _SYNTAX_NODES):
                if isinstance(node, exp.SetOperation):
                    raise SqlError(f"{type(node).__name__.upper()} is not allowed: use a single SELECT")
                if isinstance(node, exp.Placeholder):
                    raise SqlError("parameters (?) are not allowed; write the values in the query")
                raise SqlError(f"unsupported SQL: {type(node).__name__}")
            elif isinstance(node, exp.Table) and id(node) not in table_ids:
                raise SqlError(f"unexpected table reference '{_short(node.sql(dialect='sqlite'))}'")
            elif isinstance(node, exp.Column):
                self._check_column(node, scopes, aliases)
            elif isinstance(node, exp.Star) and not isinstance(node.parent, exp.Count):
                raise SqlError("'*' is only allowed as SELECT * or COUNT(*)")
            elif isinstance(node, exp.Var) and not (isinstance(node.parent, exp.Collate)
                                                    and node.name.lower() in _COLLATIONS):
                raise SqlError(f"unexpected keyword '{_short(node.name, 40)}'")

    def _expand_stars(self, sel: exp.Select, sources: dict[str, str]) -> None:
        """Replace ``*`` and ``t.*`` in the select list by the allowed columns, so nothing else is read."""
        out: list[exp.Expression] = []
        for e in sel.expressions:
            if isinstance(e, exp.Star):
                if not sources:
                    raise SqlError("SELECT * needs a table in FROM")
                picked = list(sources.items())
            elif isinstance(e, exp.Column) and isinstance(e.this, exp.Star):
                if e.args.get("db") or e.args.get("catalog"):
                    raise SqlError("schema-qualified names are not allowed")
                q = e.table.lower()
                if q not in sources:
                    raise SqlError(f"unknown table '{e.table}' in '{e.table}.*'")
                picked = [(q, sources[q])]
            else:
                out.append(e)
                continue
            for alias, key in picked:
                for col in self._tables[key][1].values():
                    ident = exp.to_identifier(col, quoted=True)
                    out.append(exp.column(ident, table=exp.to_identifier(alias, quoted=True)))
        sel.set("expressions", out)

    def _check_column(self, col: exp.Column, scopes: list[dict[str, str]], aliases: set[str]) -> None:
        if col.args.get("db") or col.args.get("catalog"):
            raise SqlError(f"schema-qualified names are not allowed: {_short(col.sql(dialect='sqlite'))}")
        if isinstance(col.this, exp.Star):
            raise SqlError("'t.*' is only allowed in the SELECT list")
        name, q = col.name, col.table.lower()
        if q:
            for scope in scopes:
                if q in scope:
                    if name.lower() not in self._tables[scope[q]][1]:
                        raise self._unknown_column(name, [scope[q]])
                    return
            raise SqlError(f"unknown table '{col.table}' in '{col.table}.{name}'")
        for i, scope in enumerate(scopes):
            if any(name.lower() in self._tables[key][1] for key in scope.values()):
                return
            if i == 0 and name.lower() in aliases:
                return
        raise self._unknown_column(name, list(scopes[0].values()))

    def _check_func(self, f: exp.Func) -> None:
        if isinstance(f, exp.Anonymous):
            if f.name.lower() not in _ANONYMOUS_FUNCS:
                raise SqlError(f"function {f.name.lower()}() is not allowed")
        elif not isinstance(f, _FUNC_NODES):
            name = f.sql(dialect="sqlite", comments=False).split("(")[0].strip().lower()
            raise SqlError(f"function {_short(name, 40)}() is not allowed")

    # -- execution ---------------------------------------------------------------------------------------------
    def _authorize(self, action: int, arg1: str | None, arg2: str | None, db: str | None, _src: str | None) -> int:
        if action == sqlite3.SQLITE_SELECT:
            return sqlite3.SQLITE_OK
        if action == sqlite3.SQLITE_READ and arg1 and arg2 is not None:
            entry = self._tables.get(arg1.lower())
            # COUNT(*) reads the table with column '' (and no db name): a row count, no column data
            if entry is not None and db in (None, "main") and (arg2 == "" or (db and arg2.lower() in entry[1])):
                return sqlite3.SQLITE_OK
        if action == sqlite3.SQLITE_FUNCTION and arg2 and arg2.lower() in _SQLITE_FUNCS:
            return sqlite3.SQLITE_OK
        return sqlite3.SQLITE_DENY

    def _execute(self, query: str) -> tuple[list[tuple[Any, ...]], bool]:
        deadline = time.monotonic() + self.timeout_s
        stopped = False

        def progress() -> int:
            nonlocal stopped
            stopped = time.monotonic() > deadline
            return int(stopped)

        try:
            conn = _connect_ro(self.db_path)
        except sqlite3.Error as e:
            raise SqlError(f"database unavailable: {_short(e)}") from None
        try:
            if hasattr(conn, "setlimit"):  # Python >= 3.11
                conn.setlimit(sqlite3.SQLITE_LIMIT_ATTACHED, 0)
                conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, 1_000_000)
            conn.set_progress_handler(progress, 1000)
            conn.set_authorizer(self._authorize)
            cur = conn.execute(query)
            rows = cur.fetchmany(self.max_rows + 1)
        except sqlite3.Error as e:
            if stopped:
                raise SqlError(f"query stopped after {self.timeout_s:g} s") from None
            raise SqlError(f"sqlite: {_short(e)}") from None
        finally:
            conn.close()
        return rows[: self.max_rows], len(rows) > self.max_rows
