"""lmlab.evals.recall: question files, answer parsing (exact value, not a suffix), verdicts and rates."""

import json

import pytest

from lmlab.data import DataError
from lmlab.evals.recall import judge, load_questions, parse_answer, recall_metrics, set_name
from lmlab.inference import Result

PATTERNS = [r"Ada Smith works as an? (?P<value>.+?)\.", r"Ada Smith is employed as an? (?P<value>.+?)\."]


def test_parse_answer_is_exact():
    assert parse_answer("Ada Smith works as a teacher.", PATTERNS) == "teacher"
    assert parse_answer("  Ada Smith is employed as an engineer.\n", PATTERNS) == "engineer"
    # the value is everything the template leaves to it: trailing text makes a different (wrong) value
    assert parse_answer("Ada Smith works as a teacher. She likes it.", PATTERNS) == "teacher. She likes it"
    assert parse_answer("Bob Smith works as a teacher.", PATTERNS) is None  # wrong person
    assert parse_answer("teacher", PATTERNS) is None


def _result(dialog, calls=(), finish="stop"):
    return Result(id=0, prompt=[], tokens=[], finish_reason=finish, text="", dialog=dialog, cached_tokens=0,
                  tool_calls=list(calls))


def _q(tmp_path, lines):
    p = tmp_path / "eval_ood.jsonl"
    p.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return p


QUESTION = {"dialog": [{"source": "user", "content": "What does Ada Smith do?"}], "value": "teacher",
            "answer_regex": PATTERNS, "attribute": "occupation", "person": "Ada Smith"}


def test_judge_rates(tmp_path):
    (q,) = load_questions(_q(tmp_path, [QUESTION]))
    user = QUESTION["dialog"]
    call = "SELECT occupation FROM people WHERE name = 'Ada Smith'"
    tool_dialog = user + [{"source": "assistant", "content": f"```sql\n{call}\n```"},
                          {"source": "database", "content": "teacher"},
                          {"source": "assistant", "content": "Ada Smith works as a teacher."}]
    v = judge(q, _result(tool_dialog, [(call, "teacher")]))
    assert (v["tool_call"], v["valid_sql"], v["correct"], v["predicted"]) == (True, True, True, "teacher")
    # a refused query: a well-formed call, not valid SQL; the answer is wrong
    bad = tool_dialog[:2] + [{"source": "database", "content": "error: SqlError: no"},
                             {"source": "assistant", "content": "Ada Smith works as a nurse."}]
    v = judge(q, _result(bad, [(call, "error: SqlError: no")]))
    assert (v["tool_call"], v["valid_sql"], v["correct"]) == (True, False, False)
    # a trigger without a ```sql block: no well-formed call
    v = judge(q, _result(tool_dialog, [(None, "error: ValueError: no tool call found")]))
    assert (v["tool_call"], v["valid_sql"], v["correct"]) == (False, False, True)
    # in-weight answer, no tool; an answer with only the right suffix is wrong
    v = judge(q, _result(user + [{"source": "assistant", "content": "Ada Smith works as a teacher."}]))
    assert (v["tool_call"], v["correct"]) == (False, True)
    v = judge(q, _result(user + [{"source": "assistant", "content": "Ada Smith works as a head teacher."}]))
    assert not v["correct"] and v["predicted"] == "head teacher"
    # the prompt's turns never count as the answer
    v = judge(q, _result(user, finish="length"))
    assert v["answer"] == "" and not v["correct"]


def test_misses_are_classified_by_what_went_wrong_first(tmp_path):
    (q,) = load_questions(_q(tmp_path, [QUESTION]))
    user = QUESTION["dialog"]
    call = "SELECT occupation FROM people WHERE name = 'Ada Smith'"

    def tool_turns(db, final):
        turns = user + [{"source": "assistant", "content": f"```sql\n{call}\n```"},
                        {"source": "database", "content": db}]
        return turns + ([{"source": "assistant", "content": final}] if final is not None else [])

    cases = [
        (tool_turns("teacher", "Ada Smith works as a teacher."), [(call, "teacher")], True, None),
        (tool_turns("no rows", "Ada Smith works as a nurse."), [(call, "no rows")], True, "query_missed"),
        (tool_turns("nurse | Lima", "Ada Smith works as a nurse."), [(call, "nurse | Lima")], True, "query_missed"),
        (tool_turns("teacher | Lima", "Ada Smith works as a nurse."), [(call, "teacher | Lima")], True,
         "value_miscopied"),
        (tool_turns("teacher", "Ada Smith works as a teacher"), [(call, "teacher")], True, "no_template"),
        (tool_turns("error: SqlError: no", "Ada Smith works as a teacher!"), [(call, "error: SqlError: no")], True,
         "invalid_sql"),
        (tool_turns("error: no call", None), [(None, "error: ValueError: no tool call found")], True, "invalid_sql"),
        (user + [{"source": "assistant", "content": "Ada Smith works as a nurse."}], [], True, "no_tool_call"),
        (user + [{"source": "assistant", "content": "Ada Smith works as a nurse."}], [], False, "wrong_value"),
        (user + [{"source": "assistant", "content": "A teacher."}], [], False, "no_template"),
        (user + [{"source": "assistant", "content": "Ada Smith works as a teacher."}], [], False, None),
    ]
    for dialog, calls, live, want in cases:
        assert judge(q, _result(dialog, calls), tool_live=live)["miss"] == want, (dialog[-1], want)
    # stopped by max_new_tokens: right after writing the value once, the budget cut it (cut_off); anything else
    # that ran out (a loop, a value cut in half, the value written twice) stays the model's miss
    for final, live, want in [("Ada Smith works as a teacher", True, "cut_off"),
                              ("Ada Smith works as a teacher", False, "cut_off"),
                              ("Ada Smith works as a tea", True, "no_template"),
                              ("Ada Smith works as a teacher teacher", True, "no_template"),
                              ("Ada Smith works as a teacher.", True, None)]:
        dialog = tool_turns("teacher", final) if live else user + [{"source": "assistant", "content": final}]
        v = judge(q, _result(dialog, [(call, "teacher")] if live else [], finish="length"), tool_live=live)
        assert v["miss"] == want, (final, want)
    metrics = recall_metrics([v, {**v, "correct": False, "miss": "cut_off"}])
    assert metrics["miss/cut_off"] == 0.5 and metrics["correct"] == 0.5


def test_load_questions_subset_and_errors(tmp_path):
    lines = [dict(QUESTION, value=f"v{i}") for i in range(50)]
    path = _q(tmp_path, lines)
    assert set_name(path) == "ood" and set_name("x/train.jsonl") == "train"
    sub = load_questions(path, max_questions=10, seed=3)
    assert len(sub) == 10 and sub == load_questions(path, max_questions=10, seed=3)
    assert [q.value for q in sub] == sorted((q.value for q in sub), key=lambda v: int(v[1:]))  # file order
    assert sub != load_questions(path, max_questions=10, seed=4)
    assert len(load_questions(path)) == 50
    for bad, match in [({"dialog": [], "value": "x"}, "missing"),
                       (dict(QUESTION, answer_regex="no group"), "no \\(\\?P<value>"),
                       (dict(QUESTION, answer_regex="(?P<value>["), "not a valid regex"),
                       (dict(QUESTION, answer_regex=[]), "non-empty list")]:
        with pytest.raises(DataError, match=match) as e:
            load_questions(_q(tmp_path, [QUESTION, bad]))
        assert "eval_ood.jsonl:2" in str(e.value)
    with pytest.raises(DataError, match="not found"):
        load_questions(tmp_path / "nope.jsonl")
