"""Synthetic people, their facts, the dialogs that teach them, and the SQLite database that holds them.

The memory app (arXiv 2508.20755) trains small models either to *memorise* facts about synthetic people
(in-weight: question -> answer) or to *look them up* (in-tool: question -> SQL -> database turn -> answer).
This module is the generator library; ``apps/memory/build_data.py`` writes whole datasets with it.

People. A person is a dict ``{"name": "Ada Smith", "birth_date": "March 3, 1987", "birth_city": ...,
"current_city": ..., "occupation": ..., "university": ...}``. Values are drawn uniformly and independently
from the value lists of :data:`VALUES` (``memory.names``), so the information content of one person is
``bits_per_person() = sum(log2(cardinality))``:

====================  ===========  ======
attribute             cardinality  bits
====================  ===========  ======
birth_date            24107        14.557  (every valid day of 1940-01-01 .. 2005-12-31)
birth_city            191          7.577
current_city          191          7.577
occupation            110          6.781
university            60           5.907
total                              42.400 bits per person (8.480 bits per fact on average)
====================  ===========  ======

Dependent attributes (``alpha``). ``make_people(..., alpha=a)``: for each person and attribute, with
probability ``a`` the value is a deterministic function of the *last name* (a sha256 of attribute and last
name indexes the value list, :func:`dependent_value`), else uniform. ``alpha=0`` (default) gives independent
facts; ``alpha=1`` makes every attribute a function of the last name, so a model could learn the rule
instead of memorising each person. The random draws do not depend on ``alpha``: the same seed gives the
same names and the same uniform values whatever ``alpha``, only the replaced values differ.

Name split for out-of-distribution (OOD) tests. The first-name and the last-name lists are each shuffled
with ``random.Random(NAME_SPLIT_SEED)`` (``NAME_SPLIT_SEED = 2508``, fixed) and cut: the first 20% are OOD,
the rest in-distribution (ID). Training people use only ID first *and* ID last names; OOD people only OOD
first and OOD last names, so no OOD first or last name ever appears in training data. The ID pool holds
518,518 full names (tests check >= 100k), the OOD pool 32,436. Editing ``memory.names`` changes the split.

Templates. Questions, answers and biography sentences are jinja2 templates (:data:`QUESTION_TEMPLATES`,
:data:`ANSWER_TEMPLATES`, :data:`BIO_TEMPLATES`) with the variables ``name`` and ``value`` used as plain
substitutions (no filters): each is rendered once by jinja2 with sentinel strings, and filling the
sentinels gives exactly what jinja2 would render (tested), thousands of times faster. Every answer is
``prefix + value + suffix`` with the value once and the suffix ending in ".", so :func:`answer_regex` can
read the value back.

Usage::

    from memory.people import make_people, qa_dialog, tool_dialog, build_database, db_text, answer_regex
    people = make_people(1000, seed=0)
    build_database("people.sqlite", people)
    p = people[0]
    qa_dialog(p, "birth_city", q_idx=0, a_idx=1)   # [user question, assistant answer]
    with sqlite3.connect("people.sqlite") as conn:
        tool_dialog(p, "birth_city", 0, 1, db_text(conn, "birth_city", p["name"]))
    re.fullmatch(answer_regex("birth_city", p["name"]), "Ada Smith was born in Lima.").group("value")  # "Lima"
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import math
import os
import random
import re
import sqlite3
from collections.abc import Iterable, Sequence
from contextlib import closing
from pathlib import Path
from typing import Any

import jinja2

from memory.names import CITIES, FIRST_NAMES, LAST_NAMES, OCCUPATIONS, UNIVERSITIES
from memory.novel import NOVEL_CITIES, NOVEL_FIRST_NAMES, NOVEL_LAST_NAMES, NOVEL_OCCUPATIONS, NOVEL_UNIVERSITIES

try:  # the library's formatter of database turns, when present; else the same format here
    from lmlab.tools.sql import format_rows as _lib_format_rows
except ImportError:  # pragma: no cover - depends on what the tree holds
    _lib_format_rows = None

__all__ = [
    "ABSENT_TOOL_ANSWERS",
    "ABSENT_WEIGHT_ANSWERS",
    "absent_dialogs",
    "make_absent",
    "make_practice",
    "ANSWER_TEMPLATES",
    "ATTRIBUTES",
    "BIO_TEMPLATES",
    "CARDINALITIES",
    "ID_FIRST_NAMES",
    "ID_LAST_NAMES",
    "NAME_SPLIT_SEED",
    "OOD_FIRST_NAMES",
    "OOD_LAST_NAMES",
    "QUESTION_TEMPLATES",
    "VALUES",
    "answer_regex",
    "bits_per_person",
    "bits_per_value",
    "rule_bits",
    "biography",
    "build_database",
    "cardinality",
    "db_text",
    "dependent_value",
    "format_rows",
    "make_novel_people",
    "make_pseudo_practice",
    "make_people",
    "name_pool",
    "parse_answer",
    "qa_dialog",
    "render_answer",
    "render_question",
    "render_template",
    "rng_stream",
    "sql_query",
    "tool_dialog",
]

# ----------------------------------------------------------------------------------------------- attributes


_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December")


def _dates(first: _dt.date = _dt.date(1940, 1, 1), last: _dt.date = _dt.date(2005, 12, 31)) -> tuple[str, ...]:
    # built without strftime so that the strings never depend on the process locale
    start, stop = first.toordinal(), last.toordinal()
    return tuple(
        f"{_MONTHS[d.month - 1]} {d.day}, {d.year}" for d in map(_dt.date.fromordinal, range(start, stop + 1))
    )


#: The attributes of a person, in column order.
ATTRIBUTES: tuple[str, ...] = ("birth_date", "birth_city", "current_city", "occupation", "university")

#: The value list of each attribute (values are drawn uniformly from it).
VALUES: dict[str, tuple[str, ...]] = {
    "birth_date": _dates(),
    "birth_city": CITIES,
    "current_city": CITIES,
    "occupation": OCCUPATIONS,
    "university": UNIVERSITIES,
}

#: Held-out value lists (``memory.novel``): what *novel* people are made of; the training generator never draws
#: from them (birth dates 1900-1939 and 2006-2024 lie outside the training range).
NOVEL_VALUES: dict[str, tuple[str, ...]] = {
    "birth_date": _dates(_dt.date(1900, 1, 1), _dt.date(1939, 12, 31)) + _dates(_dt.date(2006, 1, 1),
                                                                              _dt.date(2024, 12, 31)),
    "birth_city": NOVEL_CITIES,
    "current_city": NOVEL_CITIES,
    "occupation": NOVEL_OCCUPATIONS,
    "university": NOVEL_UNIVERSITIES,
}

#: Number of possible values of each attribute.
CARDINALITIES: dict[str, int] = {a: len(v) for a, v in VALUES.items()}


def cardinality(attribute: str) -> int:
    """Number of possible values of ``attribute``."""
    _check_attribute(attribute)
    return CARDINALITIES[attribute]


def bits_per_value(cardinality: int, alpha: float = 0.0) -> float:
    """Entropy (bits) of one attribute value that equals a known function of the last name with probability
    ``alpha`` and is otherwise uniform over ``cardinality`` values: what a model that knows the rule must still
    store per fact. ``alpha=0``: log2(cardinality); ``alpha=1``: 0."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    k = int(cardinality)
    if alpha == 0.0:
        return math.log2(k)
    rule = alpha + (1.0 - alpha) / k  # the rule's value: drawn by the rule, or by the uniform draw landing on it
    other = (1.0 - alpha) / k  # each of the k - 1 other values
    return float(-sum(q * math.log2(q) for q in (rule, *([other] * (k - 1))) if q > 0))


def bits_per_person(alpha: float = 0.0) -> float:
    """Information content of one person's attributes: with ``alpha=0`` (uniform, independent draws) the sum of
    log2(cardinality); with ``alpha > 0``, the sum of :func:`bits_per_value` (given the last-name rule, which costs
    :func:`rule_bits` once per last name on top)."""
    return float(sum(bits_per_value(c, alpha) for c in CARDINALITIES.values()))


def rule_bits(last_names: int) -> float:
    """Bits of the last-name rule itself (alpha > 0): one value per attribute for each distinct last name."""
    return float(last_names * sum(math.log2(c) for c in CARDINALITIES.values()))


def _check_attribute(attribute: str) -> None:
    if attribute not in VALUES:
        raise ValueError(f"unknown attribute {attribute!r}; expected one of {list(ATTRIBUTES)}")


# ------------------------------------------------------------------------------------------------ name split

#: Seed of the fixed ID / OOD split of the first-name and last-name lists.
NAME_SPLIT_SEED = 2508
_OOD_FRACTION = 0.2


def _split(names: Sequence[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    shuffled = list(names)
    random.Random(NAME_SPLIT_SEED).shuffle(shuffled)
    k = round(len(shuffled) * _OOD_FRACTION)
    return tuple(shuffled[k:]), tuple(shuffled[:k])


ID_FIRST_NAMES, OOD_FIRST_NAMES = _split(FIRST_NAMES)
ID_LAST_NAMES, OOD_LAST_NAMES = _split(LAST_NAMES)


def name_pool(ood: bool = False) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(first names, last names) that training (``ood=False``) or OOD (``ood=True``) people are made of."""
    return (OOD_FIRST_NAMES, OOD_LAST_NAMES) if ood else (ID_FIRST_NAMES, ID_LAST_NAMES)


# -------------------------------------------------------------------------------------------------- people


def rng_stream(seed: int, *tags: str) -> random.Random:
    """A local generator for one stream of ``seed`` (streams never share draws)."""
    digest = hashlib.sha256(repr((int(seed), *tags)).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def dependent_value(last_name: str, attribute: str) -> str:
    """The value ``attribute`` takes for every dependent draw of people with ``last_name`` (alpha > 0)."""
    _check_attribute(attribute)
    h = int.from_bytes(hashlib.sha256(f"{attribute}\x00{last_name}".encode()).digest()[:8], "big")
    values = VALUES[attribute]
    return values[h % len(values)]


def _draw_values(rng: random.Random, last_name: str, alpha: float) -> dict[str, str]:
    """One person's attribute values: each follows the last name with probability ``alpha``, else is uniform."""
    person = {}
    for a in ATTRIBUTES:
        values = VALUES[a]
        u, r = rng.random(), rng.randrange(len(values))  # both drawn always: alpha changes no other draw
        person[a] = dependent_value(last_name, a) if u < alpha else values[r]
    return person


def make_novel_people(n: int, seed: int) -> list[dict[str, str]]:
    """``n`` *novel* people: names and every attribute value from the held-out lists of ``memory.novel`` (never
    drawn for training, OOD, absent or practice people), deterministic given the arguments."""
    pool = len(NOVEL_FIRST_NAMES) * len(NOVEL_LAST_NAMES)
    if not 0 <= n <= pool:
        raise ValueError(f"{n} novel people asked for; the held-out name lists make 0 to {pool}")
    rng = rng_stream(seed, "people", "novel")
    people = []
    for k in rng.sample(range(pool), n):
        f, last = divmod(k, len(NOVEL_LAST_NAMES))
        values = {a: NOVEL_VALUES[a][rng.randrange(len(NOVEL_VALUES[a]))] for a in ATTRIBUTES}
        people.append({"name": f"{NOVEL_FIRST_NAMES[f]} {NOVEL_LAST_NAMES[last]}", **values})
    return people


def make_people(n: int, seed: int, *, ood: bool = False, alpha: float = 0.0, families: int = 0
                ) -> list[dict[str, str]]:
    """``n`` people with distinct full names, deterministic given the arguments.

    ``ood=False`` draws names from the in-distribution halves of the name lists, ``ood=True`` from the OOD
    parts; ``alpha`` in [0, 1] is the probability that an attribute is a function of the last name.
    ``families > 0``: every last name comes from a seeded choice of that many last names (many people per family,
    as in the paper's compressibility data: there a dependent attribute is shared by a whole family); 0: any.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    firsts, lasts = name_pool(ood)
    if families:
        if not 0 < families <= len(lasts):
            raise ValueError(f"families must be in 1..{len(lasts)} (last names of the pool), got {families}")
        lasts = rng_stream(seed, "families", "ood" if ood else "id").sample(list(lasts), families)
    pool = len(firsts) * len(lasts)
    if n > pool:
        raise ValueError(f"{n} people asked for, but the {'OOD' if ood else 'ID'} name pool holds only {pool} names"
                         + (f" ({families} families)" if families else ""))
    rng = rng_stream(seed, "people", "ood" if ood else "id")
    picks = rng.sample(range(pool), n)
    people = []
    for k in picks:
        f, last = divmod(k, len(lasts))
        people.append({"name": f"{firsts[f]} {lasts[last]}", **_draw_values(rng, lasts[last], alpha)})
    return people


# ----------------------------------------------------------------------------------------------- templates

#: Question paraphrases per attribute (jinja2; variable ``name``).
QUESTION_TEMPLATES: dict[str, tuple[str, ...]] = {
    "birth_date": (
        "When was {{ name }} born?",
        "What is the birth date of {{ name }}?",
        "On what date was {{ name }} born?",
        "What is {{ name }}'s date of birth?",
        "Which day was {{ name }} born on?",
    ),
    "birth_city": (
        "Where was {{ name }} born?",
        "What is the birth city of {{ name }}?",
        "In which city was {{ name }} born?",
        "What city is {{ name }} originally from?",
        "Which city is the birthplace of {{ name }}?",
    ),
    "current_city": (
        "Where does {{ name }} live?",
        "What is the current city of {{ name }}?",
        "In which city does {{ name }} live now?",
        "Which city is {{ name }} living in?",
        "Where does {{ name }} currently reside?",
    ),
    "occupation": (
        "What does {{ name }} do for a living?",
        "What is the occupation of {{ name }}?",
        "What is {{ name }}'s job?",
        "Which profession does {{ name }} work in?",
        "What line of work is {{ name }} in?",
    ),
    "university": (
        "Where did {{ name }} study?",
        "Which university did {{ name }} attend?",
        "What is the alma mater of {{ name }}?",
        "At which university did {{ name }} study?",
        "Where did {{ name }} go to university?",
    ),
}

#: Answer paraphrases per attribute (jinja2; ``name`` and ``value``): the value once, then a suffix ending in ".".
ANSWER_TEMPLATES: dict[str, tuple[str, ...]] = {
    "birth_date": (
        "{{ name }} was born on {{ value }}.",
        "The birth date of {{ name }} is {{ value }}.",
        "{{ name }}'s date of birth is {{ value }}.",
    ),
    "birth_city": (
        "{{ name }} was born in {{ value }}.",
        "The birth city of {{ name }} is {{ value }}.",
        "{{ name }} is originally from {{ value }}.",
    ),
    "current_city": (
        "{{ name }} lives in {{ value }}.",
        "The current city of {{ name }} is {{ value }}.",
        "{{ name }} currently resides in {{ value }}.",
    ),
    "occupation": (
        "The occupation of {{ name }} is {{ value }}.",
        "{{ name }} works in the profession of {{ value }}.",
        "{{ name }}'s job title is {{ value }}.",
    ),
    "university": (
        "{{ name }} studied at {{ value }}.",
        "The alma mater of {{ name }} is {{ value }}.",
        "{{ name }} graduated from {{ value }}.",
    ),
}

#: Biography sentences per attribute (jinja2; ``name`` and ``value``), for the optional biography text.
BIO_TEMPLATES: dict[str, tuple[str, ...]] = {
    "birth_date": (
        "{{ name }} was born on {{ value }}.",
        "{{ name }} came into the world on {{ value }}.",
        "On {{ value }}, {{ name }} was born.",
        "{{ name }} celebrates a birthday every year, having been born on {{ value }}.",
    ),
    "birth_city": (
        "{{ name }} was born in {{ value }}.",
        "{{ name }} spent the first years of life in {{ value }}, the city of birth.",
        "The city of {{ value }} is where {{ name }} was born.",
        "{{ name }} is a native of {{ value }}.",
    ),
    "current_city": (
        "{{ name }} now lives in {{ value }}.",
        "These days {{ name }} calls {{ value }} home.",
        "{{ name }} moved to {{ value }} and lives there today.",
        "Today {{ name }} resides in {{ value }}.",
    ),
    "occupation": (
        "{{ name }} works in the profession of {{ value }}.",
        "By trade, {{ name }} is a professional {{ value }}.",
        "The occupation of {{ name }} is {{ value }}.",
        "{{ name }} earns a living with the job of {{ value }}.",
    ),
    "university": (
        "{{ name }} studied at {{ value }}.",
        "{{ name }} graduated from {{ value }}.",
        "{{ value }} is the alma mater of {{ name }}.",
        "{{ name }} attended {{ value }} as a student.",
    ),
}

_NAME, _VALUE = "\x00NAME\x00", "\x00VALUE\x00"
_ENV = jinja2.Environment(undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=True)


def render_template(template: str, **variables: str) -> str:
    """Render one template with jinja2 (the reference the fast paths below are tested against)."""
    return _ENV.from_string(template).render(**variables)


def _skeletons(templates: dict[str, tuple[str, ...]], value: bool) -> dict[str, tuple[str, ...]]:
    out = {}
    for a, ts in templates.items():
        out[a] = tuple(render_template(t, name=_NAME, value=_VALUE) for t in ts)
        for t, s in zip(ts, out[a]):
            if _NAME not in s or (value and _VALUE not in s):
                raise ValueError(f"template {t!r} of {a} must use name{' and value' if value else ''}")
    return out


_Q = _skeletons(QUESTION_TEMPLATES, value=False)
_A = _skeletons(ANSWER_TEMPLATES, value=True)
_B = _skeletons(BIO_TEMPLATES, value=True)
for _a, _ss in _A.items():
    for _s in _ss:
        _suffix = _s.split(_VALUE)[-1]
        if _s.count(_VALUE) != 1 or not _suffix.endswith(".") or _NAME in _suffix:
            raise ValueError(f"answer template of {_a} must hold the value once, then a suffix ending in '.': {_s!r}")


def _fill(skeleton: str, name: str, value: str = "") -> str:
    return skeleton.replace(_NAME, name).replace(_VALUE, value)


def render_question(attribute: str, q_idx: int, name: str) -> str:
    """Question paraphrase ``q_idx`` of ``attribute`` about ``name``."""
    _check_attribute(attribute)
    return _fill(_Q[attribute][q_idx], name)


def render_answer(attribute: str, a_idx: int, name: str, value: str) -> str:
    """Answer paraphrase ``a_idx`` of ``attribute``: the sentence stating ``value`` for ``name``."""
    _check_attribute(attribute)
    return _fill(_A[attribute][a_idx], name, value)


def _regex_skeleton(attribute: str) -> str:
    parts = [s.split(_VALUE) for s in _A[attribute]]

    def esc(text: str) -> str:  # escape everything but the name sentinel, which stays for the name to fill
        return _NAME.join(re.escape(piece) for piece in text.split(_NAME))

    head = "(?:" + "|".join(f"(?P<t{i}>{esc(p)})" for i, (p, _) in enumerate(parts)) + ")"
    tail = esc(parts[-1][1])
    for i in range(len(parts) - 2, -1, -1):
        tail = f"(?(t{i}){esc(parts[i][1])}|{tail})"
    return f"{head}(?P<value>.+?){tail}"


_RX = {a: _regex_skeleton(a) for a in ATTRIBUTES}


def answer_regex(attribute: str, name: str) -> str:
    """A regex for ``re.fullmatch`` matching every answer paraphrase of ``attribute`` about ``name``.

    The value is the named group ``value``. Python ``re`` forbids one group name in several alternatives,
    so the prefixes are alternatives ``(?P<t0>..)|(?P<t1>..)|..`` and the suffix that follows the value is
    chosen by conditionals on which prefix matched: only whole paraphrases match, never a prefix of one
    with the suffix of another.
    """
    _check_attribute(attribute)
    return _RX[attribute].replace(_NAME, re.escape(name))


def parse_answer(attribute: str, name: str, text: str) -> str | None:
    """The value an answer states, or None when ``text`` is not one of the answer paraphrases."""
    m = re.fullmatch(answer_regex(attribute, name), text.strip())
    return m.group("value") if m else None


def biography(person: dict[str, str], rng: random.Random) -> str:
    """One paragraph stating every attribute of ``person``, with sentence templates drawn from ``rng``."""
    return " ".join(
        _fill(_B[a][rng.randrange(len(_B[a]))], person["name"], person[a]) for a in ATTRIBUTES
    )


# ---------------------------------------------------------------------------------------------------- SQL


def sql_query(attribute: str, name: str) -> str:
    """The one SQL shape the in-tool model learns: ``SELECT <attribute> FROM people WHERE name = '<name>'``."""
    _check_attribute(attribute)
    if "'" in name:
        raise ValueError(f"name {name!r} holds a quote; names of this app never do")
    return f"SELECT {attribute} FROM people WHERE name = '{name}'"


def _format_rows_local(rows: Iterable[Sequence[Any]]) -> str:
    lines = [" | ".join("NULL" if v is None else str(v) for v in row) for row in rows]
    return "\n".join(lines) if lines else "no rows"


def format_rows(rows: Iterable[Sequence[Any]]) -> str:
    """Database turn text: one line per row, values joined by " | ", None as NULL, no header; "no rows" if none.

    Uses ``lmlab.tools.sql.format_rows`` when the library has it, else a local copy of the same behaviour.
    """
    rows = list(rows)
    return _lib_format_rows(rows) if _lib_format_rows is not None else _format_rows_local(rows)


def build_database(path: str | os.PathLike, people: Iterable[dict[str, str]]) -> None:
    """Write a fresh SQLite file with table ``people(name TEXT PRIMARY KEY, <attribute> TEXT, ...)``.

    Rows go in the given order, in one transaction, rollback journal (no WAL): the same people give the
    same bytes.
    """
    p = Path(path)
    for stale in (p, p.with_name(p.name + "-journal")):
        stale.unlink(missing_ok=True)
    cols = ", ".join(f"{a} TEXT" for a in ATTRIBUTES)
    with closing(sqlite3.connect(p)) as conn:
        conn.execute(f"CREATE TABLE people (name TEXT PRIMARY KEY, {cols})")
        conn.executemany(
            f"INSERT INTO people VALUES ({', '.join('?' * (len(ATTRIBUTES) + 1))})",
            ([q["name"], *(q[a] for a in ATTRIBUTES)] for q in people),
        )
        conn.commit()


def db_text(conn: sqlite3.Connection, attribute: str, name: str) -> str:
    """Run :func:`sql_query` for ``(attribute, name)`` on the database and format the rows as a database turn.

    The name is bound as a parameter of the same statement (``... WHERE name = ?``): the same rows as the
    literal SQL text (tested), but one compiled statement for all names instead of one per query.
    """
    _check_attribute(attribute)
    return format_rows(conn.execute(f"SELECT {attribute} FROM people WHERE name = ?", (name,)).fetchall())


# -------------------------------------------------------------------------------------------------- dialogs


def qa_dialog(person: dict[str, str], attribute: str, q_idx: int, a_idx: int) -> list[dict[str, str]]:
    """In-weight dialog: the user asks, the assistant answers from memory."""
    name = person["name"]
    return [
        {"source": "user", "content": render_question(attribute, q_idx, name)},
        {"source": "assistant", "content": render_answer(attribute, a_idx, name, person[attribute])},
    ]


def make_absent(n: int, seed: int, exclude: set[str]) -> list[str]:
    """``n`` distinct in-distribution full names outside ``exclude`` (the training people): people the
    database does not know. Their own seeded stream: adding them changes no training person."""
    firsts, lasts = name_pool(False)
    if n + len(exclude) > len(firsts) * len(lasts):
        raise ValueError(f"{n} absent people do not fit in the name pool beside {len(exclude)} training people")
    rng = rng_stream(seed, "absent")
    names: list[str] = []
    seen = set(exclude)
    while len(names) < n:
        name = f"{rng.choice(firsts)} {rng.choice(lasts)}"
        if name not in seen:
            seen.add(name)
            names.append(name)
    return names


def make_practice(n: int, seed: int, exclude: set[str], *, alpha: float = 0.0) -> list[dict[str, str]]:
    """``n`` practice people: distinct in-distribution full names outside ``exclude`` (the training and absent
    people), with attribute values drawn as :func:`make_people` draws them. They live in a database of their own
    (not the evaluation database) and are each asked about once, so they hold nothing worth memorising: they
    give a tool user thousands of distinct names and values to copy (see build_data). Their own seeded stream:
    adding them changes no training or absent person."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    firsts, lasts = name_pool(False)
    if n + len(exclude) > len(firsts) * len(lasts):
        raise ValueError(f"{n} practice people do not fit in the name pool beside {len(exclude)} other people")
    rng = rng_stream(seed, "practice")
    seen = set(exclude)
    out: list[dict[str, str]] = []
    while len(out) < n:
        f, last = rng.randrange(len(firsts)), rng.randrange(len(lasts))
        name = f"{firsts[f]} {lasts[last]}"
        if name in seen:
            continue
        seen.add(name)
        out.append({"name": name, **_draw_values(rng, lasts[last], alpha)})
    return out


_ONSETS = ("", "b", "br", "ch", "d", "dr", "f", "g", "gr", "h", "j", "k", "kh", "kl", "l", "m", "n", "ng", "p", "ph",
           "pr", "qu", "r", "s", "sh", "sk", "st", "t", "th", "tr", "ts", "v", "w", "x", "y", "z", "zh")
_NUCLEI = ("a", "e", "i", "o", "u", "aa", "ae", "ai", "au", "ee", "ei", "ia", "io", "oo", "ou", "ua", "y")
_CODAS = ("", "", "", "n", "r", "s", "l", "k", "m", "t", "nd", "rk", "sh", "x", "ng", "tt", "ll", "ss", "nn", "pp",
          "rr", "dd", "ff", "mm", "gg")
_PSEUDO_UNIVERSITIES = ("University of {}", "{} University", "{} Institute of {}", "Universidad de {}",
                        "{} State University", "Universite de {}", "{} College")


def pseudo_word(rng: random.Random, min_len: int = 2, max_len: int = 12) -> str:
    """A pronounceable made-up word of ``min_len`` to ``max_len`` letters (lower case), from random syllables, some
    repeated and some with doubled consonants."""
    target = rng.randint(min_len, max_len)
    word = ""
    while len(word) < target:
        syllable = rng.choice(_ONSETS) + rng.choice(_NUCLEI) + rng.choice(_CODAS)
        word += syllable * (2 if rng.random() < 0.2 else 1)  # repeats ("nana") and double letters are the hard
    return word[:target]                                      # cases of copying


#: Lower-case words that stand inside many real place and institution names ("Saint-Denis de la Reunion",
#: "Frankfurt am Main", "Stratford upon Avon"): ``make_pseudo_practice(wide=True)`` puts them between the made-up
#: words of some values, so that a copy does not stop or loop where a capitalised word was expected.
_PARTICLES = ("de", "la", "de la", "del", "da", "do", "of", "on", "upon", "am", "an der", "van", "von", "der", "sur",
              "al", "el", "y", "les", "di", "du", "bin", "and")


def _pseudo_values(rng: random.Random, particles: bool = False) -> dict[str, str]:
    """Attribute values made of pseudo-words, and birth dates of years 1000-2999: strings to copy, never to recall.
    ``particles``: the words of one multi-word city in two, and one university in four, are joined by lower-case
    words of :data:`_PARTICLES` (the draws of the plain values are made first, so they do not change)."""
    def cap(n_words: int, lo: int = 2, hi: int = 11) -> str:
        return " ".join(pseudo_word(rng, lo, hi).capitalize() for _ in range(n_words))

    day = _dt.date.fromordinal(rng.randint(_dt.date(1000, 1, 1).toordinal(), _dt.date(2999, 12, 31).toordinal()))
    template = rng.choice(_PSEUDO_UNIVERSITIES)
    values = {
        "birth_date": f"{_MONTHS[day.month - 1]} {day.day}, {day.year}",
        "birth_city": cap(rng.choice((1, 1, 1, 2, 3))),
        "current_city": cap(rng.choice((1, 1, 1, 2, 3))),
        "occupation": " ".join(pseudo_word(rng, 3, 12) for _ in range(rng.choice((1, 1, 2, 3)))),
        "university": template.format(*(cap(1, 3, 12) for _ in range(template.count("{}")))),
    }
    if particles:
        for key in ("birth_city", "current_city"):
            first, *rest = values[key].split(" ")
            if rest and rng.random() < 0.5:
                values[key] = first + "".join(f" {rng.choice(_PARTICLES)} {word}" for word in rest)
        if rng.random() < 0.25:
            values["university"] += f" {rng.choice(_PARTICLES)} {cap(1, 3, 12)}"
    return values


#: Prefixes that put a capital inside a made-up name ("McKorra", "DeShai", "VanTrull"), as "McAllister" or
#: "MacLeod" have one (``make_pseudo_practice(varied=True)``).
_INNER_CAPITAL_PREFIXES = ("Mc", "Mac", "De", "Di", "Da", "Van", "La", "Le", "Fitz", "Ja")


def _vary_spelling(rng: random.Random, first: str, last: str) -> tuple[str, str]:
    """Spellings that plain capitalised pseudo-words lack, each drawn independently: an inner capital in the last
    name (one in four) or in the first (one in ten), and a last name that begins with the first name ("Tara
    Tarakoff", one in ten: the copy must follow the right one of two similar strings)."""
    if rng.random() < 0.1:
        last = first + pseudo_word(rng, 2, 8)
    if rng.random() < 0.25:
        last = rng.choice(_INNER_CAPITAL_PREFIXES) + last.capitalize()
    if rng.random() < 0.1:
        first = rng.choice(_INNER_CAPITAL_PREFIXES) + first.capitalize()
    return first, last


def _name_length(rng: random.Random, short_share: float, hi: int) -> int:
    """A made-up name's length: 2-3 letters with probability ``short_share``, else 2 to ``hi``."""
    return rng.randint(2, 3) if rng.random() < short_share else rng.randint(2, hi)


def make_pseudo_practice(n: int, seed: int, exclude: set[str], *, varied: bool = False,
                         wide: bool = False) -> list[dict[str, str]]:
    """``n`` practice people made of pseudo-words: first names of 2-12 letters, last names of 2-16 (one in ten
    hyphenated), values as :func:`_pseudo_values`. Like :func:`make_practice`'s people they live in a database of
    their own and are asked about once; made-up strings give the copying a tool user learns no vocabulary to lean
    on. Names or values that are real words of the app's lists (training or held-out ``memory.novel``) are
    redrawn. Their own seeded stream. ``varied`` adds the spellings of :func:`_vary_spelling` (inner capitals,
    a last name that starts with the first name; its own stream, so the plain people do not change). ``wide``
    (implies ``varied``; a stream of its own) widens the shapes further: one first name in four and one last name
    in six of 2-3 letters ("Jo Od" is the hardest name to find in a question: uniform lengths make it rare), and
    lower-case particles inside some multi-word values ("Vossa de la Trenn")."""
    varied = varied or wide
    taken = set(exclude) | set(FIRST_NAMES) | set(LAST_NAMES) | set(NOVEL_FIRST_NAMES) | set(NOVEL_LAST_NAMES)
    known = {v for vals in list(VALUES.values()) + list(NOVEL_VALUES.values()) for v in vals}
    rng = rng_stream(seed, "practice", "pseudo-wide" if wide else "pseudo-varied" if varied else "pseudo")
    out: list[dict[str, str]] = []
    while len(out) < n:
        if wide:
            n_first, n_last = _name_length(rng, 0.25, 12), _name_length(rng, 1 / 6, 16)
            first, last = pseudo_word(rng, n_first, n_first).capitalize(), pseudo_word(rng, n_last, n_last).capitalize()
        else:
            first = pseudo_word(rng, 2, 12).capitalize()
            last = pseudo_word(rng, 2, 16).capitalize()
        if varied:
            first, last = _vary_spelling(rng, first, last)
        if rng.random() < 0.1:
            last = f"{last}-{pseudo_word(rng, 2, 9).capitalize()}"
        values = _pseudo_values(rng, particles=wide)
        name = f"{first} {last}"
        if name in taken or first in taken or last in taken or any(v in known for v in values.values()):
            continue
        taken.add(name)
        out.append({"name": name, **values})
    return out


#: What the assistant says about a person it cannot find (in-tool) or does not know (in-weight). The name
#: stands first, inside and last, as in the fact answers, so that these answers teach copying a name into
#: every place an answer puts it.
ABSENT_TOOL_ANSWERS = (
    "There is no record of {name} in the database.",
    "{name} is not in the database.",
    "The database has no entry for {name}.",
)
ABSENT_WEIGHT_ANSWERS = (
    "I do not know {name}.",
    "{name} is not someone I know.",
    "I have no information about {name}.",
)


def absent_dialogs(name: str, attribute: str, q_idx: int, db_text: str, a_idx: int = 0
                   ) -> tuple[list[dict], list[dict]]:
    """(in-weight, in-tool) dialogs of a question about someone absent from the database: the in-weight
    assistant says it does not know the person; the in-tool one queries, reads ``db_text`` (``no rows``) and
    says so (answer paraphrase ``a_idx``). No attribute value appears: these dialogs hold no fact."""
    q = render_question(attribute, q_idx, name)
    weight = [{"source": "user", "content": q},
              {"source": "assistant", "content": ABSENT_WEIGHT_ANSWERS[a_idx].format(name=name)}]
    tool = [{"source": "user", "content": q},
            {"source": "assistant", "content": f"```sql\n{sql_query(attribute, name)}\n```"},
            {"source": "database", "content": db_text},
            {"source": "assistant", "content": ABSENT_TOOL_ANSWERS[a_idx].format(name=name)}]
    return weight, tool


def tool_dialog(
    person: dict[str, str], attribute: str, q_idx: int, a_idx: int, db_text: str
) -> list[dict[str, str]]:
    """In-tool dialog: question, the SQL call in a ```sql block, the database turn ``db_text``, the answer."""
    name = person["name"]
    return [
        {"source": "user", "content": render_question(attribute, q_idx, name)},
        {"source": "assistant", "content": f"```sql\n{sql_query(attribute, name)}\n```"},
        {"source": "database", "content": db_text},
        {"source": "assistant", "content": render_answer(attribute, a_idx, name, person[attribute])},
    ]
