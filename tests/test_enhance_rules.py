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


def test_roles_name_endpoints_their_runner_declared(monkeypatch):
    """A role picks an endpoint by name; a URL or a key variable of its own is refused, naming the field."""
    from providers.enhance.roles import role_target
    from providers.outbound import Endpoint

    monkeypatch.setenv("VLLM_TEST_API_KEY", "k-123")
    endpoints = {"vllm": Endpoint(base_url="http://vllm:8000/v1/", api_key_env="VLLM_TEST_API_KEY", models=["q"])}
    cfg = EnhanceConfig(student={"model": "q", "endpoint": "vllm"}, teacher={"model": "job:t"})
    assert role_target("student", cfg.student, endpoints, "http://local/v1", "tok") == ("http://vllm:8000/v1", "k-123")
    assert role_target("teacher", cfg.teacher, endpoints, "http://local/v1/", "tok") == ("http://local/v1", "tok")
    for role, match in [({"model": "q", "base_url": "http://169.254.169.254/v1"}, r"student.base_url.*one of \['vllm'\]"),
                        ({"model": "q", "endpoint": "vllm", "api_key_env": "OPENAI_API_KEY"}, "student.api_key_env"),
                        ({"model": "q", "endpoint": "other"}, r"student.endpoint: 'other'.*one of \['vllm'\]"),
                        ({"model": "gpt", "endpoint": "vllm"}, "student.model: 'gpt' is not offered")]:
        with pytest.raises(ValueError, match=match):
            role_target("student", EnhanceConfig(student=role, teacher={"model": "t"}).student, endpoints, None, None)
    monkeypatch.delenv("VLLM_TEST_API_KEY")
    with pytest.raises(ValueError, match="VLLM_TEST_API_KEY, which is unset"):
        role_target("student", cfg.student, endpoints, None, None)
    # the refused fields never reach a stored request
    assert "base_url" not in EnhanceConfig(student={"model": "q", "base_url": "http://x"}, teacher={"model": "t"}).model_dump()["student"]


def _result(index, thinking, final, correct, source):
    return {"index": index, "prompt": [{"role": "user", "content": f"q{index}"}], "reference": "a", "metadata": {},
            "final_answer": final, "correct": correct, "source": source, "kept": correct, "thinking": thinking,
            "iterations": sum(1 for t in thinking if t["iteration"] != "teacher"),
            "dropped_reason": None if correct else "never correct"}


def test_default_rows_hold_the_accepted_answer_and_its_reasoning_never_rejected_attempts(tmp_path):
    """The default format trains on the accepted answer (after the successful attempt's reasoning, where the
    model returned one); rejected attempts, verdicts and hints stay out. The report says who solved what."""
    import json

    from providers.enhance.loop import RESULTS, build_artifacts

    bad = {"iteration": 1, "attempt": "WRONG-1", "correct": False, "verdict": "differs", "hint": "HINT-1",
           "reasoning": "REJECTED-REASONING"}
    results = [
        _result(0, [{"iteration": 1, "attempt": "a", "correct": True, "verdict": "ok"}], "a", True, "student"),
        _result(1, [bad, {"iteration": 2, "attempt": "a", "correct": True, "verdict": "ok", "reasoning": "because"}],
                "a", True, "student"),
        _result(2, [bad, {"iteration": 2, "attempt": "WRONG-2", "correct": False, "verdict": "differs"},
                    {"iteration": "teacher", "attempt": "a", "correct": True, "verdict": "ok"}], "a", True, "teacher"),
        _result(3, [bad, {"iteration": 2, "attempt": "WRONG-2", "correct": False, "verdict": "differs"},
                    {"iteration": "teacher", "attempt": "WRONG-3", "correct": False, "verdict": "differs"}],
                "WRONG-2", False, "student"),
    ]
    (tmp_path / RESULTS).write_text("".join(json.dumps(r) + "\n" for r in results))
    config = EnhanceConfig(student={"model": "s"}, teacher={"model": "t"}, max_iterations=2)
    assert config.thinking_format == "final"
    report = build_artifacts(tmp_path, config, 4)
    assert report["solved"] == {"student_alone": 1, "student_after_hint": 1, "teacher_only": 1, "unsolved": 1}
    assert [b["correct"] for b in report["accuracy_by_iteration"]] == [1, 2]
    rows = [json.loads(line) for line in (tmp_path / "enhanced_dataset.jsonl").open()]
    assert [r["messages"][-1]["content"] for r in rows] == ["a", "<think>\nbecause\n</think>\na", "a"]
    text = (tmp_path / "enhanced_dataset.jsonl").read_text()
    for rejected in ("WRONG", "HINT", "REJECTED", "Judge:", "differs"):
        assert rejected not in text
    # The old format stays available by name, and still shows the attempts.
    assert "WRONG-1" in sft_row(results[1], "iterative", "messages")["messages"][-1]["content"]
    assert sft_row(results[1], "final-only", "messages")["messages"][-1]["content"] == "a"
