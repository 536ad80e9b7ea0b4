"""Client-supplied patterns and templates of data enhancement cannot freeze the service or blow up its memory.

Review findings: a rule judge `{"mode": "regex", "pattern": "(a+)+"}` and an answer 'a'*40 + '!' made
Python's `re` backtrack for hours holding the GIL (no /health, no SIGTERM, and again after each restart as
the task resumed); the `extract` pattern and a row's reference used as the pattern were two more ways in.
`hint_template` `{answer:>200000000}` (27 bytes) took the service from 497 MB to 1,824 MB. Patterns now run
under RE2 (linear time) and templates only substitute `{question}`, `{reference}`, `{answer}`, `{hint}`.

The matching payloads run in a child process: if a regression brings backtracking back, the child is
killed at its timeout and the test fails instead of hanging the test run."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import requests
from pydantic import ValidationError
from test_security import API_TOKEN, Authed

from providers.enhance import EnhanceConfig, ModelJudgeConfig, RuleJudgeConfig
from providers.enhance.loop import Enhancer
from providers.enhance.templates import MAX_RENDERED_CHARS, TemplateTooLarge, render

REPO_ROOT = Path(__file__).resolve().parent.parent
EVIL = "(a+)+"
ATTACK = "a" * 40 + "!"
# Hours of backtracking for `re`; microseconds for RE2. Generous, for a busy machine: it is not a speed test.
CHILD_TIMEOUT_S = 60


def judged_in_child(judge: dict, answer: str, reference: str) -> list:
    """rule_verdict(judge, answer, reference) in a fresh interpreter, killed after CHILD_TIMEOUT_S."""
    code = ("import json, sys\n"
            "from providers.enhance.config import RuleJudgeConfig\n"
            "from providers.enhance.judges import rule_verdict\n"
            "judge, answer, reference = json.loads(sys.stdin.read())\n"
            "print(json.dumps(rule_verdict(RuleJudgeConfig(**judge), answer, reference)))\n")
    try:
        out = subprocess.run([sys.executable, "-c", code], input=json.dumps([judge, answer, reference]),
                             cwd=REPO_ROOT, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"judging {answer!r} with {judge} took over {CHILD_TIMEOUT_S} s (catastrophic backtracking)")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.slow  # a fresh interpreter per payload
@pytest.mark.parametrize("judge,reference", [
    ({"mode": "regex", "pattern": EVIL}, "a"),  # the judge's pattern
    ({"mode": "exact", "extract": EVIL + "$"}, "a"),  # the extract pattern (a search: '$' makes it fail)
    ({"mode": "regex"}, EVIL),  # a dataset row's reference used as the pattern
], ids=["pattern", "extract", "reference-as-pattern"])
def test_redos_payloads_are_judged_without_backtracking(judge, reference):
    correct, why = judged_in_child(judge, ATTACK, reference)
    assert correct is False and why


def test_patterns_re2_refuses_are_400s_naming_the_reason():
    with pytest.raises(ValidationError) as e:
        RuleJudgeConfig(mode="regex", pattern=r"(a)\1")  # backreference: needs backtracking
    assert e.value.errors()[0]["loc"] == ("pattern",) and "RE2" in str(e.value) and r"\1" in str(e.value)
    with pytest.raises(ValidationError, match="lookarounds"):
        RuleJudgeConfig(extract=r"(?=a)a")
    with pytest.raises(ValidationError):
        RuleJudgeConfig(mode="regex", pattern="a" * 2001)
    # what RE2 accepts still works: group 1 is the answer, '.' spans lines as before
    cfg = RuleJudgeConfig(mode="numeric", extract=r"####\s*(.+)")
    assert cfg.extract and RuleJudgeConfig(mode="regex", pattern="a.b").pattern == "a.b"


def test_bad_references_and_long_answers_fail_the_row_not_the_service():
    from providers.enhance.judges import rule_verdict
    from providers.enhance.patterns import MAX_MATCH_CHARS

    ok, why = rule_verdict(RuleJudgeConfig(mode="regex"), "aa", r"(a)\1")
    assert ok is False and "reference as a pattern" in why and "RE2" in why
    ok, why = rule_verdict(RuleJudgeConfig(mode="regex", pattern="a+"), "a" * (MAX_MATCH_CHARS + 1), "")
    assert ok is False and str(MAX_MATCH_CHARS) in why
    ok, why = rule_verdict(RuleJudgeConfig(mode="exact", extract="(a+)"), "b" + "a" * (MAX_MATCH_CHARS + 1), "a")
    assert ok is False and why.startswith("extract:")


ROLES = {"student": {"model": "s"}, "teacher": {"model": "t"}}
BAD_TEMPLATES = {
    "{answer:>200000000}": "format specs",
    "{answer.__class__}": "not a placeholder",
    "{answer[0]}": "not a placeholder",
    "{answer!r}": "conversions",
    "{0}": "not a placeholder",
    "{}": "not a placeholder",
    "{secret}": "not a placeholder",
    "{answer:{hint}}": "format specs",
    "unbalanced {": "Single '{'",
}


@pytest.mark.parametrize("template", list(BAD_TEMPLATES))
def test_bad_templates_are_refused_naming_the_field(template):
    reason = BAD_TEMPLATES[template]
    for field, own in (("hint_template", "answer"), ("retry_template", "hint")):
        with pytest.raises(ValidationError, match=reason) as e:
            EnhanceConfig(**ROLES, **{field: template.replace("{answer", "{" + own)})
        assert e.value.errors()[0]["loc"] == (field,)
    with pytest.raises(ValidationError, match=reason) as e:
        EnhanceConfig(**ROLES, judge={"type": "model", "role": {"model": "j"}, "template": template})
    assert e.value.errors()[0]["loc"][0] == "judge" and e.value.errors()[0]["loc"][-1] == "template"


def test_each_template_takes_only_its_own_placeholders():
    with pytest.raises(ValidationError, match=r"\{reference\} is not a placeholder: use \{hint\}"):
        EnhanceConfig(**ROLES, retry_template="the answer is {reference}")  # the student must not see it
    with pytest.raises(ValidationError, match="hint"):
        EnhanceConfig(**ROLES, hint_template="{hint}")


def test_templates_render_as_str_format_did():
    cfg = EnhanceConfig(**ROLES, judge={"type": "model", "role": {"model": "j"}})
    values = {"question": "What is {x}?", "reference": "{answer.__class__}", "answer": "4 {{"}
    for template in (cfg.hint_template, cfg.judge.template, "{{literal}} {question}{answer}"):
        assert render(template, values, "t") == template.format(**values)
    assert render(cfg.retry_template, {"hint": "h"}, "t") == cfg.retry_template.format(hint="h")
    assert isinstance(cfg.judge, ModelJudgeConfig)


class CannedRole:
    """A role that answers with fixed text: the loop's prompt building is under test, not a model."""

    def __init__(self, answer: str):
        self.answer, self.prompts = answer, []

    async def chat(self, messages):
        self.prompts.append(messages)
        return self.answer

    async def reply(self, messages):  # (answer, reasoning), as ChatRole.reply
        return await self.chat(messages), None


def test_an_oversized_prompt_fails_its_row_with_the_reason():
    big = "x" * (MAX_RENDERED_CHARS // 2 + 1)
    cfg = EnhanceConfig(**ROLES, judge={"type": "rule", "mode": "exact"}, hint_template="{answer}{answer}")
    teacher = CannedRole("hint")
    enhancer = Enhancer(cfg, CannedRole(big), teacher, None)
    with pytest.raises(TemplateTooLarge, match=f"hint_template: .* over the limit of {MAX_RENDERED_CHARS}"):
        asyncio.run(enhancer.row(0, [{"role": "user", "content": "q"}], "right", {}))
    assert teacher.prompts == []  # refused before any text was built or sent


# -- the service ---------------------------------------------------------------------------------------
def constant_model(tiny_student: str, out: Path) -> tuple[str, str]:
    """A model that answers 'a' at every step (greedy): a real model the service serves, whose answer the
    test controls. Every layer is zero, so the last hidden state is the input embedding, [1, 0, ...]; the
    LM head scores token 'a' +1 and every other token -1 on that dimension."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_student)
    config = AutoConfig.from_pretrained(tiny_student)
    config.tie_word_embeddings = False
    model = AutoModelForCausalLM.from_config(config)
    a = tok.convert_tokens_to_ids("a")
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.get_input_embeddings().weight[:, 0] = 1.0
        model.model.norm.weight[0] = 1.0
        head = model.get_output_embeddings().weight
        head[:, 0] = -1.0
        head[a, 0] = 1.0
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out), tok.decode([a])


@pytest.mark.slow  # starts the service and serves a model
def test_a_redos_judge_cannot_freeze_the_service(tmp_path, tiny_models):
    """The student answers 'a' * 40; the judge's `extract` pattern and the row's reference (used as the
    pattern) are `(a+)+!`. Under `re` the judge backtracks 2**40 times with the GIL held; now /health
    answers throughout and the task finishes with the row judged incorrect."""
    model, letter = constant_model(tiny_models["student"], tmp_path / "models" / "aaaa")
    assert letter == "a"
    (tmp_path / "token").write_text(API_TOKEN)
    svc = Authed(tmp_path / "data", extra=["--api-token-file", str(tmp_path / "token"),
                                           "--allowed-model-root", str(tmp_path / "models")])
    try:
        role = {"model": model, "max_tokens": 40}
        config = {"student": role, "teacher": role, "max_iterations": 1, "on_failure": "drop",
                  "judge": {"type": "rule", "mode": "regex", "extract": EVIL + "!"}}
        backreference = {"type": "rule", "mode": "regex", "pattern": r"(a)\1"}
        refused = {"config.judge.rule.pattern": {**config, "judge": backreference},
                   "config.hint_template": {**config, "hint_template": "{answer:>200000000}"},
                   "config.retry_template": {**config, "retry_template": "{hint.__class__}"}}
        for field, bad in refused.items():
            r = svc.post("/v1/data-enhancement", json={"enhancement_id": "refused", "config": bad,
                                                       "rows": [{"input_query": "q", "expected_answer": "a"}]})
            assert r.status_code == 400 and field in r.text, (field, r.status_code, r.text)
        assert not (svc.data_dir / "workflows/enhancements/refused").exists()
        task_id = "redos-" + uuid.uuid4().hex[:8]
        r = svc.post("/v1/data-enhancement", json={
            "enhancement_id": task_id, "config": config,
            "rows": [{"input_query": "say a", "expected_answer": EVIL + "!"}]})
        assert r.status_code == 200, r.text
        deadline, state, health_checks = time.monotonic() + 300, {}, 0
        while time.monotonic() < deadline:
            try:
                health = svc.http.get(svc.url + "/health", timeout=2)
            except requests.Timeout:
                pytest.fail(f"/health did not answer within 2 s while the task ran (after {health_checks} answers)")
            assert health.status_code == 200
            health_checks += 1
            state = svc.get(f"/v1/data-enhancement/{task_id}").json()
            if state["state"] not in ("scheduled", "in_progress"):
                break
            time.sleep(0.5)
        assert state.get("state") == "completed", state
        results = [json.loads(line) for line in
                   (svc.data_dir / "workflows/enhancements" / task_id / "results.jsonl").read_text().splitlines()]
        step = results[-1]["thinking"][0]
        assert step["attempt"] == "a" * 40 and step["correct"] is False
        assert "does not match" in step["verdict"]
    finally:
        svc.stop()
