"""Rule judges and row parsing of the enhancement loop (no models, no server)."""

from __future__ import annotations

import pytest

from providers.enhance import EnhanceConfig, RuleJudgeConfig
from providers.enhance.judges import extract_answer, normalize, parse_model_verdict, parse_number, rule_verdict
from providers.enhance.loop import parse_row, sft_row


@pytest.mark.parametrize("mode,answer,reference,ok", [
    ("exact", "c b a", "c b a", True),
    ("exact", "c b a.", "c b a", False),
    ("normalized", "The Paris!", "paris", True),
    ("normalized", "Lyon", "paris", False),
    ("regex", "answer: 42", r"answer:\s*\d+", True),
    ("numeric", "So the total is 1,234.50 dollars", "1234.5", True),
    ("numeric", "x = 2/3", "0.6666666666", True),
    ("numeric", "it is 7", "8", False),
    ("numeric", "no idea", "8", False),
])
def test_rule_judges(mode, answer, reference, ok):
    got, why = rule_verdict(RuleJudgeConfig(mode=mode), answer, reference)
    assert got is ok and why


def test_answer_extraction():
    assert extract_answer("steps...\n#### 72", r"####\s*(.+)") == "72"
    assert extract_answer(r"so \boxed{3/4} it is", None) == "3/4"
    assert rule_verdict(RuleJudgeConfig(mode="numeric", extract=r"####\s*(.+)"), "3 apples, 4 pears #### 7", "7")[0]
    assert parse_number("-1e-3") == -0.001 and normalize("An  Apple.") == "apple"
    assert parse_model_verdict("INCORRECT.") is False and parse_model_verdict("Correct") is True
    assert parse_model_verdict("maybe") is None


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="regular expression"):
        RuleJudgeConfig(mode="regex", pattern="(")
    with pytest.raises(ValueError):
        EnhanceConfig(student={"model": "s"}, teacher={"model": "t", "temperature": float("nan")})
    with pytest.raises(ValueError):
        EnhanceConfig(student={"model": "s"}, teacher={"model": "t"}, max_iterations=0)


def test_rows_as_users_have_them():
    msgs = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"},
                         {"role": "assistant", "content": "4"}], "metadata": {"topic": "math"}}
    prompt, ref, meta = parse_row(msgs, 0)
    assert [m["role"] for m in prompt] == ["system", "user"] and ref == "4" and meta == {"topic": "math"}
    assert parse_row({"messages": [{"role": "user", "content": "q"}], "metadata": {"answer": 5}}, 1)[1] == "5"
    assert parse_row({"input_query": "q", "expected_answer": "a"}, 2)[1] == "a"
    assert parse_row({"prompt": "q", "completion": "a"}, 3)[1] == "a"
    assert parse_row({"messages": [{"role": "user", "content": "q"}]}, 4)[1] is None


def test_sft_rows_in_both_formats():
    result = {"prompt": [{"role": "user", "content": "q"}], "final_answer": "a", "correct": True, "source": "student",
              "iterations": 2, "metadata": {"id": 7},
              "thinking": [{"iteration": 1, "attempt": "b", "correct": False, "verdict": "differs", "hint": "h"},
                           {"iteration": 2, "attempt": "a", "correct": True, "verdict": "exact match"}]}
    row = sft_row(result, "iterative", "messages")
    assert row["messages"][-1]["content"] == ("<think>\nAttempt 1: b\nJudge: incorrect (differs)\nHint: h\n"
                                              "Attempt 2: a\nJudge: correct (exact match)\n</think>\na")
    assert row["metadata"] == {"id": 7, "enhancement": {"correct": True, "source": "student", "iterations": 2}}
    assert sft_row(result, "final-only", "instruct") == {"input_query": "q", "expected_answer": "a",
                                                         "metadata": row["metadata"]}
