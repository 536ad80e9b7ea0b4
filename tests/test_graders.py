"""Graders as reward functions: OpenAI's grader shapes scored on real values, every bad input refused with
the field it is about, templates that cannot escape their sandbox or run unbounded work."""

from __future__ import annotations

import json
import pickle
import re
import time

import pytest

from providers.graders import (check_graders, grade, make_sample, openai_method_to_graders, parse_graders,
                               resolve_models, reward_functions, score_models)
from providers.graders.templates import RENDERED_MAX_CHARS, render

OUT = "{{ sample.output_text }}"


@pytest.fixture(scope="module", autouse=True)
def _metric_libraries():
    """Import the metric libraries once (rouge-score pulls in nltk) so each test stays fast."""
    import rapidfuzz.fuzz  # noqa: F401
    import sacrebleu  # noqa: F401
    from nltk.translate import gleu_score  # noqa: F401
    from rouge_score import rouge_scorer  # noqa: F401


def one(grader: dict):
    return parse_graders([grader])[0]


def score(grader: dict, output: str, **item) -> float:
    return grade(one(grader), item, make_sample(output))


def refused(graders, match: str, item: dict | None = None) -> str:
    with pytest.raises(ValueError, match=match) as e:
        check_graders(graders, item or {"answer": "4"})
    return str(e.value)


# ---- string_check -------------------------------------------------------------------------------

@pytest.mark.parametrize("operation,output,want", [
    ("eq", "4", 1.0), ("eq", "4 ", 0.0), ("ne", "5", 1.0), ("ne", "4", 0.0),
    ("like", "the answer is 4.", 1.0), ("like", "the answer is four", 0.0),
    ("ilike", "ANSWER: 4", 1.0), ("like", "ANSWER: 4", 0.0),
])
def test_string_check_operations(operation, output, want):
    g = {"type": "string_check", "name": "exact", "input": OUT, "reference": "{{ item.answer }}",
         "operation": operation}
    reference = "answer: 4" if output.startswith("ANSWER") else "4"
    assert score(g, output, answer=reference) == want


def test_like_is_containment_not_a_pattern():
    g = {"type": "string_check", "name": "c", "input": OUT, "reference": "{{ item.answer }}", "operation": "like"}
    assert score(g, "a?c", answer="a?c") == 1.0
    assert score(g, "abc", answer="a?c") == 0.0  # '?' is a character, not a wildcard
    assert score(g, "abc", answer="a*") == 0.0


# ---- text_similarity ----------------------------------------------------------------------------

def sim(metric: str, output: str, reference: str) -> float:
    g = {"type": "text_similarity", "name": "s", "input": OUT, "reference": "{{ item.ref }}",
         "evaluation_metric": metric}
    return score(g, output, ref=reference)


def test_bleu_of_identical_text_is_one_and_of_a_changed_word_less():
    assert sim("bleu", "the cat sat on the mat", "the cat sat on the mat") == 1.0
    assert 0.3 < sim("bleu", "the cat sat on a mat", "the cat sat on the mat") < 0.7  # sacrebleu: 53.7
    assert sim("bleu", "dog", "the cat sat on the mat") == 0.0


def test_fuzzy_match_gives_partial_credit():
    assert sim("fuzzy_match", "hello world", "hello world") == 1.0
    assert sim("fuzzy_match", "hello word", "hello world") == pytest.approx(20 / 21)  # one deletion in 21 chars
    assert sim("fuzzy_match", "xyz", "hello") == 0.0


def test_rouge_and_gleu():
    out, ref = "the cat sat on a mat", "the cat sat on the mat"
    assert sim("rouge_1", out, ref) == pytest.approx(5 / 6)
    assert sim("rouge_2", out, ref) == pytest.approx(3 / 5)
    assert sim("rouge_5", out, ref) == 0.0
    assert sim("rouge_l", out, ref) == pytest.approx(5 / 6)
    assert sim("gleu", ref, ref) == 1.0
    assert 0 < sim("gleu", out, ref) < 1


@pytest.mark.parametrize("metric,why", [("cosine", "embedding model"), ("meteor", "WordNet"),
                                        ("rouge_9", "not a metric")])
def test_metrics_this_service_does_not_compute_are_refused_saying_what_is(metric, why):
    message = refused([{"type": "text_similarity", "name": "s", "input": OUT, "reference": "x",
                        "evaluation_metric": metric}], "graders\\[0\\].evaluation_metric")
    assert why in message and "supported: fuzzy_match, bleu, gleu, rouge_1" in message


# ---- multi --------------------------------------------------------------------------------------

def multi(formula: str, **extra) -> dict:
    return {"type": "multi", "name": "total", "calculate_output": formula, **extra, "graders": {
        "exact": {"type": "string_check", "input": OUT, "reference": "{{ item.answer }}", "operation": "eq"},
        "close": {"type": "text_similarity", "input": OUT, "reference": "{{ item.answer }}",
                  "evaluation_metric": "fuzzy_match"}}}


@pytest.mark.parametrize("formula,want", [
    ("0.5 * exact + 0.5 * close", 0.5 * 0 + 0.5 * 0.8), ("close ^ 2", 0.64), ("close ** 2", 0.64),
    ("max(exact, close) - min(exact, close)", 0.8), ("abs(exact - close) / 2", 0.4), ("-(exact - 1)", 1.0),
])
def test_multi_formula_combines_the_named_graders(formula, want):
    assert score(multi(formula), "abcd", answer="abcdef") == pytest.approx(want)  # exact 0, close 8/10


def test_multi_sub_grader_named_by_its_key_and_openai_example_names_accepted():
    g = one(multi("exact"))
    assert g.graders["exact"].name == "exact" and g.graders["close"].name == "close"
    g = one({**multi("exact"), "name": "Example multi grader"})
    assert reward_functions([g])[0].__name__ == "Example multi grader"


@pytest.mark.parametrize("formula,match", [
    ("exact + wrong", "'wrong' is not a grader of this multi grader \\(its graders: exact, close\\)"),
    ("exact.__class__", "is not arithmetic"),
    ("__import__('os').system('true')", "is not arithmetic|only the functions"),
    ("exact if close > 0 else 1", "is not arithmetic"),
    ("exact < close", "is not arithmetic"),
    ("'a' * 100", "is not a number"),
    ("[exact, close]", "is not arithmetic"),
    ("(lambda: 1)()", "is not arithmetic|only the functions"),
    ("round(exact)", "only the functions min, max, abs"),
    ("exact +", "does not parse"),
    ("+".join(["exact"] * 300), "at most 1024 characters"),
])
def test_multi_formula_other_than_arithmetic_is_refused_naming_the_field(formula, match):
    message = refused([{"type": "string_check", "name": "first", "input": OUT, "reference": "x"}, multi(formula)],
                      "graders\\[1\\].calculate_output")
    assert re.search(match, message), message


def test_multi_formula_error_at_training_time_scores_zero_and_is_counted():
    reward = reward_functions(parse_graders([multi("1 / exact")]))[0]
    assert reward(["p", "p"], ["4", "5"], answer=["4", "4"]) == [1.0, 0.0]
    assert reward.errors == 1 and "ZeroDivisionError" in reward.last_error


def test_multi_inside_multi_is_refused():
    inner = multi("exact")
    refused([{"type": "multi", "name": "outer", "graders": {"inner": inner}, "calculate_output": "inner"}],
            "graders\\[0\\].graders: .*no multi inside a multi")


# ---- refused grader types and bounds ------------------------------------------------------------

def test_python_grader_is_refused():
    message = refused([{"type": "python", "name": "p", "source": "def grade(sample, item):\n    return 1.0"}],
                      "python graders run client code; not supported")
    assert message.startswith("graders[0]: ")


def test_python_grader_inside_multi_is_refused_with_its_path():
    refused([{"type": "multi", "name": "m", "calculate_output": "p",
              "graders": {"p": {"type": "python", "source": "import os"}}}],
            "^graders\\[0\\].graders.p: python graders run client code")


@pytest.mark.parametrize("grader,match", [
    ({"type": "label_model", "name": "l"}, "label_model graders are not supported"),
    ({"type": "regex", "name": "r"}, "'regex' .*'string_check', 'text_similarity', 'score_model', 'multi'"),
    ({"type": "string_check", "name": "s", "input": "x", "refrence": "y"},
     "graders\\[0\\].refrence: unknown key 'refrence'; did you mean 'reference'"),
    ({"type": "string_check", "name": "s", "input": "x"}, "graders\\[0\\].reference: Field required"),
    ({"type": "string_check", "name": "s", "input": "x" * 4097, "reference": "y"},
     "graders\\[0\\].input: String should have at most 4096 characters"),
    ({"type": "string_check", "name": "rewards/x", "input": "x", "reference": "y"}, "graders\\[0\\].name"),
    ({"type": "score_model", "name": "j", "model": "https://example.invalid/v1", "input": [
        {"role": "user", "content": "x"}]}, "graders\\[0\\].model: .*URLs are not called"),
    ({"type": "score_model", "name": "j", "model": "/m", "range": [1, 1], "input": [
        {"role": "user", "content": "x"}]}, "graders\\[0\\].range: .*low < high"),
    ({"type": "score_model", "name": "j", "model": "/m", "input": [
        {"role": "user", "content": [{"type": "input_image", "image_url": "https://example.invalid/x.png"}]}]},
     "graders\\[0\\].input\\[0\\].content: content of type 'input_image' is not supported"),
    ({"type": "score_model", "name": "j", "model": "/m", "input": [{"role": "user", "content": "x"}],
      "sampling_params": {"max_completions_tokens": 100000}}, "graders\\[0\\].sampling_params.max_completions_tokens"),
])
def test_bad_graders_are_refused_naming_the_field(grader, match):
    refused([grader], match)


def test_grader_count_and_names_are_bounded():
    sc = {"type": "string_check", "input": "x", "reference": "y"}
    refused([{**sc, "name": f"g{i}"} for i in range(17)], "graders: List should have at most 16 items")
    many = [{"type": "multi", "name": f"m{i}", "calculate_output": "a",
             "graders": {f"a{j}" if j else "a": sc for j in range(12)}} for i in range(3)]
    refused(many, "39 graders in all .* at most 32")
    refused([{**sc, "name": "same"}, {**sc, "name": "same"}], "grader names must differ .* same repeats")


# ---- templates ----------------------------------------------------------------------------------

@pytest.mark.parametrize("template", [
    "{{ item.__class__.__mro__ }}",
    "{{ item['__class__'] }}",
    "{{ item|attr('__class__') }}",
    "{{ sample.output_text.__class__.__base__.__subclasses__() }}",
    "{{ lipsum.__globals__ }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{{ self._TemplateReference__context }}",
    "{% set x = item %}{{ x }}",
    "{% include 'x' %}",
    "{{ item.answer.upper() }}",
    "{{ item.answer | join('-' * 4000) }}",
])
def test_template_escapes_are_refused(template):
    refused([{"type": "string_check", "name": "s", "input": template, "reference": "y"}], "^graders\\[0\\].input: ")


def test_the_sandbox_under_the_template_check_refuses_escapes_too():
    """A second wall: were the node check bypassed, the immutable sandbox still refuses unsafe attributes."""
    from jinja2.exceptions import SecurityError

    from providers.graders.templates import _ENV

    with pytest.raises(SecurityError):
        _ENV.from_string("{{ ''.__class__.__mro__[1].__subclasses__() }}").render()
    with pytest.raises(SecurityError):
        _ENV.from_string("{% set l = [] %}{{ l.append(1) }}").render()


@pytest.mark.parametrize("template", [
    "{% for i in range(10**9) %}x{% endfor %}",
    "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}",
    "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}",
])
def test_templates_with_loops_are_refused_before_any_rendering(template):
    start = time.monotonic()
    refused([{"type": "string_check", "name": "s", "input": template, "reference": "y"}],
            "templates substitute values only")
    assert time.monotonic() - start < 30  # refused, not run: 10**10 iterations would take hours


def test_rendered_output_is_bounded():
    template = "{{ item.big }}" * 100
    out = render(template, {"big": "x" * 100_000}, {"output_text": ""})
    assert len(out) == RENDERED_MAX_CHARS


@pytest.mark.parametrize("template,match", [
    ("{{ item.x | round(100000000, 'floor') }}", "'round': 100000000 is not accepted as precision: an integer from 0"),
    ("{{ item.x | round(2, 'up') }}", "method: 'common', 'ceil' or 'floor'"),
    ("{{ item.x | tojson(100000000) }}", "'tojson' takes no arguments"),
    ("{{ item.x | trim('" + "ab" * 20 + "') }}", "chars: text of at most 16"),
    ("{{ item.x | int(0, 99) }}", "base: 0 or 2 to 36"),
    ("{{ item.x | lower(1) }}", "'lower' takes no arguments"),
    ("{{ item.x | default(1, 2, 3) }}", "'default' takes default_value"),
])
def test_filter_arguments_are_bounded_when_the_template_is_checked(template, match):
    start = time.monotonic()
    refused([{"type": "string_check", "name": "s", "input": template, "reference": "y"}], match)
    assert time.monotonic() - start < 1  # refused before 10**100000000 is computed (minutes, holding the GIL)


def test_the_environment_holds_only_the_allowed_filters_and_no_tests_or_globals():
    from providers.graders.templates import _ENV, FILTER_ARGS

    assert set(_ENV.filters) == set(FILTER_ARGS) and "join" not in _ENV.filters
    assert _ENV.tests == {} and _ENV.globals == {}


def test_a_chain_of_filters_cannot_grow_a_value():
    """tojson doubles every backslash: 40 of them chained would be 2**40 times the field."""
    start = time.monotonic()
    out = render("{{ item.x" + " | tojson" * 40 + " | length }}", {"x": "\\" * 1000}, {"output_text": ""})
    assert int(out) <= RENDERED_MAX_CHARS and time.monotonic() - start < 5


def test_a_filter_that_cannot_take_the_rows_value_is_a_field_error():
    message = refused([{"type": "string_check", "name": "s", "input": "{{ item.answer | round }}", "reference": "y"}],
                      "^graders\\[0\\].input: a filter cannot take the row's value", item={"answer": "four"})
    assert "__round__" in message


def test_the_graders_text_is_bounded_before_any_template_is_parsed():
    from providers.graders.models import GRADERS_MAX_CHARS

    unit = "{{ item.x | lower | trim }}"
    part = unit * (4000 // len(unit))
    judge = {"type": "score_model", "name": "j", "model": "/m", "input": [{"role": "user", "content": [part] * 16}] * 16}
    start = time.monotonic()
    with pytest.raises(ValueError, match=f"at most {GRADERS_MAX_CHARS} in all"):
        parse_graders([{**judge, "name": f"j{i}"} for i in range(16)])  # 16 MB of templates
    assert time.monotonic() - start < 1


def test_rouge_compares_the_first_tokens_of_each_side():
    from providers.graders.models import SIMILARITY_MAX_TOKENS

    same = "a " * SIMILARITY_MAX_TOKENS
    assert sim("rouge_l", same + "b " * 30_000, same + "c " * 30_000) == 1.0  # what follows the bound is not read
    assert sim("rouge_l", "x " + same, same) < 1.0


@pytest.mark.slow
def test_the_row_check_runs_in_a_child_within_cpu_and_memory_limits(tmp_path):
    from providers.graders.row_check import GraderCheckOverLimit, check_rows

    rows = tmp_path / "train.jsonl"
    rows.write_text(json.dumps({"prompt": "p", "answer": "4", "x": "a " * 10_000_000}) + "\n")
    graders = parse_graders([{"type": "string_check", "name": "e", "input": OUT, "reference": "{{ item.answer }}"}])
    check_rows(graders, rows, "graders", "rows")
    with pytest.raises(ValueError, match=r"graders\[0\]\.reference: no field 'missing'.*row 0 of rows has columns"):
        check_rows(parse_graders([{**EXACT_MISSING}]), rows, "graders", "rows")
    slow = parse_graders([{"type": "string_check", "name": "e", "input": "{{ item.x | title | length }}",
                           "reference": "y"}])  # linear, and about 14 s on 10 million words
    start = time.monotonic()
    with pytest.raises(GraderCheckOverLimit, match="more than 1 CPU seconds"):
        check_rows(slow, rows, "graders", "rows", cpu_seconds=1)
    assert time.monotonic() - start < 10
    with pytest.raises(GraderCheckOverLimit, match="more than 64 MB of memory"):
        check_rows(graders, rows, "graders", "rows", memory_bytes=64 << 20)


EXACT_MISSING = {"type": "string_check", "name": "e", "input": OUT, "reference": "{{ item.missing }}"}


def test_template_reads_row_fields_json_output_and_filters():
    g = {"type": "string_check", "name": "s", "input": "{{ sample.output_json.answer | trim }}",
         "reference": "{{ item['values'][1] | lower }}"}
    assert score(g, '{"answer": " b "}', values=["A", "B"]) == 1.0  # `values` is the column, not dict.values
    reward = reward_functions([one(g)])[0]
    assert reward(["p"], ["not json"], values=[["A", "B"]]) == [0.0] and reward.errors == 1


# ---- check_graders ------------------------------------------------------------------------------

def test_check_graders_names_the_nested_field_that_reads_a_missing_column():
    graders = [{"type": "string_check", "name": "exact", "input": OUT, "reference": "{{ item.answer }}"},
               {"type": "multi", "name": "mix", "calculate_output": "a + b", "graders": {
                   "a": {"type": "string_check", "input": OUT, "reference": "{{ item.answer }}"},
                   "b": {"type": "string_check", "input": OUT, "reference": "{{ item.solution }}"}}}]
    message = refused(graders, "^graders\\[1\\].graders.b.reference: no field 'solution'", {"prompt": "2+2", "answer": "4"})
    assert "the row's fields: answer, prompt" in message
    assert len(check_graders(graders, {"prompt": "2+2", "answer": "4", "solution": "4"})) == 2


def test_check_graders_checks_score_model_messages_and_json_output():
    g = {"type": "score_model", "name": "judge", "model": "/models/judge", "input": [
        {"role": "system", "content": "Score 0 to 10."},
        {"role": "user", "content": [{"type": "input_text", "text": "{{ item.question }}"},
                                     {"type": "output_text", "text": "{{ sample.output_json.reasoning }}"}]}]}
    refused([g], "^graders\\[0\\].input\\[1\\].content\\[0\\].text: no field 'question'", {"answer": "4"})
    check_graders([g], {"question": "2+2?"}, field="method.reinforcement.grader")


def test_score_models_and_resolve_models_name_each_model_field():
    judge = {"type": "score_model", "model": "judge-small", "input": [{"role": "user", "content": OUT}]}
    graders = parse_graders([{"type": "multi", "name": "total", "graders": {"judge": judge},
                              "calculate_output": "judge"}])
    assert score_models(graders) == [("graders[0].graders.judge.model", "judge-small")]
    seen = []
    resolved = resolve_models(graders, lambda ref, field: seen.append(field) or f"/models/{ref}")
    assert seen == ["graders[0].graders.judge.model"]
    assert resolved[0].graders["judge"].model == "/models/judge-small"
    assert graders[0].graders["judge"].model == "judge-small"  # a copy: the request's graders are unchanged


# ---- reward functions ---------------------------------------------------------------------------

def test_reward_functions_take_trl_arguments_and_never_raise_on_a_bad_row():
    graders = parse_graders([
        {"type": "string_check", "name": "exact", "input": OUT, "reference": "{{ item.answer }}"},
        {"type": "string_check", "name": "asked", "input": "{{ item.prompt }}", "reference": "2+2?"}])
    exact, asked = reward_functions(graders)
    assert (exact.__name__, asked.__name__) == ("exact", "asked")
    logged = {}
    completions = [[{"role": "assistant", "content": "4"}], [{"role": "assistant", "content": "5"}]]
    kwargs = dict(completion_ids=[[1], [2]], trainer_state=object(), log_extra=lambda *a: None,
                  log_metric=lambda k, v: logged.__setitem__(k, v))
    assert exact(["2+2?", "2+2?"], completions, answer=["4", "4"], **kwargs) == [1.0, 0.0]
    assert asked(["2+2?", "3+3?"], completions, answer=["4", "6"], **kwargs) == [1.0, 0.0]
    assert exact.errors == 0 and logged["graders/exact/error_rate"] == 0.0
    assert exact(["q"], ["4"], **kwargs) == [0.0]  # the row lacks `answer`: 0.0, counted, training goes on
    assert exact.errors == 1 and "no field 'answer'" in exact.last_error
    assert logged["graders/exact/error_rate"] == 1.0
    again = pickle.loads(pickle.dumps(exact))  # TRL may ship reward functions to other processes
    assert again.__name__ == "exact" and again(["q"], ["4"], answer=["4"]) == [1.0]


def test_score_model_errors_score_zero_and_are_counted():
    judge = reward_functions(parse_graders([{"type": "score_model", "name": "judge", "model": "/nonexistent/judge",
                                             "input": [{"role": "user", "content": OUT}]}]))[0]
    assert judge(["p", "p"], ["a", "b"]) == [0.0, 0.0]
    assert judge.errors == 2 and "not a local model directory" in judge.last_error


def test_parse_score_takes_the_first_number_clipped_to_the_range():
    from providers.graders.scorer import parse_score

    assert parse_score("Score: 7/10", 0, 10) == 7.0
    assert parse_score("-3.5 points", 0, 10) == 0.0
    assert parse_score("1e9", 0, 1) == 1.0
    with pytest.raises(ValueError, match="holds no number"):
        parse_score("excellent", 0, 10)


# ---- OpenAI's reinforcement method --------------------------------------------------------------

def test_openai_reinforcement_method_maps_to_graders_and_hyperparameters():
    method = {"type": "reinforcement", "reinforcement": {"grader": multi("0.7 * exact + 0.3 * close"),
              "hyperparameters": {"n_epochs": 2, "batch_size": "auto", "learning_rate_multiplier": 0.5,
                                  "reasoning_effort": "low", "eval_interval": 5}}}
    graders, hp = openai_method_to_graders(method)
    assert [g.name for g in graders] == ["total"] and set(graders[0].graders) == {"exact", "close"}
    assert hp == {"n_epochs": 2, "batch_size": None, "learning_rate_multiplier": 0.5, "compute_multiplier": None,
                  "eval_interval": 5, "eval_samples": None, "reasoning_effort": "low"}
    _, defaults = openai_method_to_graders({"type": "reinforcement", "reinforcement": {"grader": multi("exact")}})
    assert set(defaults.values()) == {None}


@pytest.mark.parametrize("method,match", [
    ({"type": "supervised"}, "^method.type: 'supervised' is not 'reinforcement'"),
    ({"type": "reinforcement"}, "^method.reinforcement: required"),
    ({"type": "reinforcement", "reinforcement": {}}, "^method.reinforcement.grader: required"),
    ({"type": "reinforcement", "reinforcement": {"grader": multi("exact"), "hyperparams": {}}},
     "^method.reinforcement.hyperparams: unknown key 'hyperparams'; did you mean 'hyperparameters'"),
    ({"type": "reinforcement", "reinforcement": {"grader": {"type": "python", "name": "p", "source": ""}}},
     "^method.reinforcement.grader: python graders run client code; not supported"),
    ({"type": "reinforcement", "reinforcement": {"grader": {
        "type": "multi", "name": "m", "calculate_output": "a + b", "graders": {
            "a": {"type": "string_check", "input": OUT, "reference": "x"},
            "b": {"type": "string_check", "input": OUT, "reference": "{{ item.__class__ }}"}}}}},
     "^method.reinforcement.grader.graders.b.reference: attribute '__class__' is not allowed"),
    ({"type": "reinforcement", "reinforcement": {"grader": multi("exact + nope")}},
     "^method.reinforcement.grader.calculate_output: 'nope' is not a grader"),
    ({"type": "reinforcement", "reinforcement": {"grader": multi("exact"), "hyperparameters": {"n_epoch": 3}}},
     "^method.reinforcement.hyperparameters.n_epoch: unknown key 'n_epoch'; did you mean 'n_epochs'"),
    ({"type": "reinforcement", "reinforcement": {"grader": multi("exact"), "hyperparameters": {"batch_size": 0}}},
     "^method.reinforcement.hyperparameters.batch_size: 0: Input should be greater than or equal to 1 \\(or 'auto'\\)"),
])
def test_openai_method_errors_name_the_field(method, match):
    with pytest.raises(ValueError, match=match):
        openai_method_to_graders(method)


# ---- score_model on a local model ---------------------------------------------------------------

@pytest.fixture(scope="module")
def digit_judge(tiny_models, tmp_path_factory):
    """The tiny student rewired to answer '7' or '8' (the sign of one hidden unit): a grader model that
    answers numbers, which the letter-reversing tiny models never do."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = tiny_models["student"]
    tokenizer = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src)
    with torch.no_grad():
        model.model.norm.weight.zero_()
        model.model.norm.weight[0] = 1.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[tokenizer.convert_tokens_to_ids("7"), 0] = 100.0
        model.lm_head.weight[tokenizer.convert_tokens_to_ids("8"), 0] = -100.0
    out = tmp_path_factory.mktemp("digit_judge")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


@pytest.mark.slow
def test_score_model_grades_with_a_local_model(digit_judge, tiny_models):
    judge = {"type": "score_model", "name": "judge", "model": digit_judge, "range": [0, 10],
             "input": [{"role": "developer", "content": "Score the answer from 0 to 10."},
                       {"role": "user", "content": "Q: {{ item.question }}\nA: {{ sample.output_text }}"}],
             "sampling_params": {"max_completions_tokens": 1, "temperature": 0}}
    graders = parse_graders([judge, {**judge, "name": "capped", "range": [0, 5]},
                             {**judge, "name": "letters", "model": tiny_models["teacher"]}])
    check_graders(graders, {"question": "2+2?"})
    rewards = reward_functions(graders, device="cpu")
    prompts, completions = ["2+2?"] * 3, ["4", "four", "5"]
    scores = rewards[0](prompts, completions, question=["2+2?"] * 3)
    assert all(s in (7.0, 8.0) for s in scores) and rewards[0].errors == 0, scores
    assert rewards[1](prompts, completions, question=["2+2?"] * 3) == [5.0] * 3  # clipped to its range
    # The letter-reversing teacher answers letters: no number, so 0.0, counted
    assert rewards[2](prompts, completions, question=["2+2?"] * 3) == [0.0] * 3
    assert rewards[2].errors == 3 and "holds no number" in rewards[2].last_error


def test_graders_survive_the_job_spec_round_trip():
    """The request's graders are written into the job spec (JSON) and read back by the training process."""
    from pydantic import BaseModel

    from providers.graders import GraderList

    class Spec(BaseModel):
        graders: GraderList

    judge = {"type": "score_model", "name": "judge", "model": "/models/judge", "range": [1, 5],
             "input": [{"role": "user", "content": "Rate: {{ sample.output_text }}"}],
             "sampling_params": {"temperature": 0.7, "seed": 3}}
    spec = Spec(graders=[multi("0.5 * exact + 0.5 * close"), judge])
    again = Spec.model_validate_json(spec.model_dump_json())
    assert again == spec
    assert again.graders[1].input[0].content[0].text == "Rate: {{ sample.output_text }}"
