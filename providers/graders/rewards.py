"""Graders as TRL reward functions.

`reward_functions(graders)` gives one reward function per grader; a sample the grader cannot grade (a row
missing a field, a grader model that answers no number, a formula that divides by zero) scores 0.0 and is
counted (`reward.errors`, and the `graders/<name>/error_rate` metric when TRL passes `log_metric`): one
bad sample never stops training. `check_graders` renders every template on a dataset row before a job
starts, so a template naming a missing field is an error naming the grader's path instead.
"""

from __future__ import annotations

import ast
import json
import logging
import math
import operator
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from pydantic import TypeAdapter, ValidationError
from simpleeval import SimpleEval

from . import scorer
from .models import (FORMULA_FUNCTIONS, SIMILARITY_MAX_TOKENS, Grader, GraderList, MultiGrader, ScoreModelGrader,
                     StringCheckGrader, TextSimilarityGrader, check_formula)
from .templates import RENDERED_MAX_CHARS, render

log = logging.getLogger(__name__)

# Keyword arguments TRL's GRPOTrainer passes that are not dataset columns.
TRL_KWARGS = frozenset({"completion_ids", "trainer_state", "log_extra", "log_metric", "environments"})


def completion_text(completion: Any) -> str:
    """TRL passes a completion as text, or (conversational prompts) as a list of messages."""
    if isinstance(completion, str):
        return completion
    return "".join(str(m.get("content", "")) for m in completion if isinstance(m, dict))


def make_sample(text: str) -> dict[str, Any]:
    """The template's `sample`: `output_text`, and `output_json` when the answer is a JSON object or list."""
    sample: dict[str, Any] = {"output_text": text}
    stripped = text.strip()
    if stripped[:1] in ("{", "[") and len(stripped) <= RENDERED_MAX_CHARS:
        try:
            sample["output_json"] = json.loads(stripped)
        except ValueError:
            pass
    return sample


class _AnyKeys(dict):
    """`sample.output_json.<anything>` while checking templates: the answer's JSON is not known yet."""

    def __missing__(self, key: Any) -> "_AnyKeys":
        return _AnyKeys()

    def __str__(self) -> str:
        return ""


CHECK_SAMPLE = {"output_text": "", "output_json": _AnyKeys()}


# ---- one grader, one sample -------------------------------------------------------------------------

def string_check(grader: StringCheckGrader, item: dict, sample: dict) -> float:
    got, want = render(grader.input, item, sample), render(grader.reference, item, sample)
    if grader.operation == "eq":
        return float(got == want)
    if grader.operation == "ne":
        return float(got != want)
    if grader.operation == "like":
        return float(want in got)
    return float(want.casefold() in got.casefold())


_rouge_scorers: dict[str, Any] = {}


class _FirstTokens:
    """rouge-score's own tokens of a text, the first SIMILARITY_MAX_TOKENS of them."""

    def __init__(self):
        from rouge_score.tokenizers import DefaultTokenizer

        self._tokenizer = DefaultTokenizer()

    def tokenize(self, text: str) -> list[str]:
        return self._tokenizer.tokenize(text)[:SIMILARITY_MAX_TOKENS]


def similarity(metric: str, got: str, want: str) -> float:
    """`metric` of `got` against `want`, in [0, 1]."""
    if metric == "fuzzy_match":
        from rapidfuzz import fuzz

        return fuzz.ratio(got, want) / 100.0
    if metric == "bleu":
        import sacrebleu

        return min(1.0, sacrebleu.sentence_bleu(got, [want]).score / 100.0)
    if metric == "gleu":
        from nltk.translate.gleu_score import sentence_gleu

        return float(sentence_gleu([want.split()], got.split())) if got.split() and want.split() else float(got == want)
    key = "rougeL" if metric == "rouge_l" else "rouge" + metric[-1]
    if key not in _rouge_scorers:
        from rouge_score import rouge_scorer

        _rouge_scorers[key] = rouge_scorer.RougeScorer([key], tokenizer=_FirstTokens())
    return float(_rouge_scorers[key].score(want, got)[key].fmeasure)


def text_similarity(grader: TextSimilarityGrader, item: dict, sample: dict) -> float:
    got, want = render(grader.input, item, sample), render(grader.reference, item, sample)
    return similarity(grader.evaluation_metric, got, want)


def _pow(a: float, b: float) -> float:
    return math.pow(float(a), float(b))  # floats: 10**10**10 overflows at once instead of building an int


def _binary(op: Callable[[float, float], float]) -> Callable[[Any, Any], float]:
    return lambda a, b: op(float(a), float(b))


_OPERATORS = {ast.Add: _binary(operator.add), ast.Sub: _binary(operator.sub), ast.Mult: _binary(operator.mul),
              ast.Div: _binary(operator.truediv), ast.Pow: _pow, ast.BitXor: _pow,  # OpenAI writes a^b
              ast.USub: lambda a: -float(a), ast.UAdd: lambda a: float(a)}
_FUNCTIONS = {"min": min, "max": max, "abs": abs, "floor": math.floor, "ceil": math.ceil, "exp": math.exp,
              "sqrt": math.sqrt, "log": math.log}
assert set(_FUNCTIONS) == set(FORMULA_FUNCTIONS)


def combine(grader: MultiGrader, scores: dict[str, float]) -> float:
    """`calculate_output` over the graders' scores (arithmetic only, checked again before evaluating)."""
    check_formula(grader.calculate_output, list(grader.graders))
    try:
        value = SimpleEval(operators=_OPERATORS, functions=_FUNCTIONS, names=dict(scores)).eval(
            grader.calculate_output.strip())
    except (ArithmeticError, ValueError) as e:  # 1/0, sqrt(-1), exp(1000)
        raise ValueError(f"calculate_output: {type(e).__name__}: {e}") from None
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"calculate_output: the result is {value}")
    return value


# ---- one grader, a batch of samples ---------------------------------------------------------------

def score_model(grader: ScoreModelGrader, items: list[dict], samples: list[dict],
                device: str | None = None) -> list[float | Exception]:
    """The grader model's score of each sample (an exception in place of one it could not grade)."""
    results: list[float | Exception] = [ValueError("not graded")] * len(items)
    conversations, where = [], []
    for i, (item, sample) in enumerate(zip(items, samples)):
        try:
            conversations.append([{"role": m.role, "content": render(m.text(), item, sample)} for m in grader.input])
            where.append(i)
        except ValueError as e:
            results[i] = e
    if not conversations:
        return results
    try:
        answers = scorer.generate(grader, conversations, device)
    except Exception as e:  # noqa: BLE001 - a model that fails to load or generate fails these samples only
        for i in where:
            results[i] = e
        return results
    low, high = grader.range
    for i, answer in zip(where, answers):
        try:
            results[i] = scorer.parse_score(answer, low, high)
        except ValueError as e:
            results[i] = e
    return results


def grade_batch(grader: Grader, items: list[dict], samples: list[dict],
                device: str | None = None) -> list[float | Exception]:
    """Each sample's score under `grader`, or the exception that kept it from being graded."""
    if isinstance(grader, ScoreModelGrader):
        return score_model(grader, items, samples, device)
    if isinstance(grader, MultiGrader):
        parts = {name: grade_batch(g, items, samples, device) for name, g in grader.graders.items()}
        results: list[float | Exception] = []
        for i in range(len(items)):
            failed = next(((n, p[i]) for n, p in parts.items() if isinstance(p[i], Exception)), None)
            if failed:
                results.append(ValueError(f"graders.{failed[0]}: {failed[1]}"))
                continue
            try:
                results.append(combine(grader, {n: p[i] for n, p in parts.items()}))
            except ValueError as e:
                results.append(e)
        return results
    one = string_check if isinstance(grader, StringCheckGrader) else text_similarity
    results = []
    for item, sample in zip(items, samples):
        try:
            results.append(one(grader, item, sample))
        except Exception as e:  # noqa: BLE001 - a row the grader cannot read scores 0 and is counted
            results.append(e)
    return results


def grade(grader: Grader, item: dict, sample: dict, device: str | None = None) -> float:
    """One grader's score of one sample (`sample` from `make_sample`); ValueError when it cannot grade it."""
    result = grade_batch(grader, [item], [sample], device)[0]
    if isinstance(result, Exception):
        raise ValueError(str(result)) from result
    return result


# ---- checking and converting requests -----------------------------------------------------------

_GRADER_LIST = TypeAdapter(GraderList)


def _strip_tags(loc: tuple, data: Any) -> list:
    """A pydantic location without the union tags (`0.multi.graders.b.string_check.reference` ->
    `[0].graders.b.reference`), found by walking the data the error is about."""
    out = []
    for part in loc:
        if isinstance(data, dict) and part not in data and data.get("type") == part:
            continue
        out.append(part)
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            data = None
    return out


def field_path(prefix: str, parts: Sequence[Any]) -> str:
    """`graders[1].graders.b.reference` from the prefix and a location."""
    text = prefix
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def parse_graders(data: Any, field: str = "graders") -> list[Grader]:
    """Graders from request JSON (a list of grader objects); ValueError naming the field of the first error
    (`graders[1].graders.b.reference: ...`)."""
    from ..keys import error_loc

    try:
        return _GRADER_LIST.validate_python(data)
    except ValidationError as e:
        first = e.errors()[0]
        path = field_path(field, _strip_tags(error_loc(first), data))
        raise ValueError(f"{path}: {first['msg'].removeprefix('Value error, ')}") from None


def walk(graders: Sequence[Grader], field: str = "graders") -> Iterator[tuple[str, Grader]]:
    """Every grader with its path, those inside `multi` graders included (after their multi)."""
    for i, g in enumerate(graders):
        yield f"{field}[{i}]", g
        if isinstance(g, MultiGrader):
            for name, sub in g.graders.items():
                yield f"{field}[{i}].graders.{name}", sub


def templates(grader: Grader) -> Iterator[tuple[str, str]]:
    """(field, template) of each template of one grader (not of a multi's graders)."""
    if isinstance(grader, (StringCheckGrader, TextSimilarityGrader)):
        yield "input", grader.input
        yield "reference", grader.reference
    elif isinstance(grader, ScoreModelGrader):
        for j, m in enumerate(grader.input):
            for k, part in enumerate(m.content):
                yield f"input[{j}].content[{k}].text", part.text


def check_graders(graders: Sequence[Grader] | Sequence[dict], item: dict, field: str = "graders") -> list[Grader]:
    """Check graders against a dataset row before a job starts: every template renders on `item`, every
    formula is arithmetic over its multi's graders. Raises ValueError naming the grader's field
    (`graders[1].graders.b.reference: 'dict object' has no attribute 'answer' ...`). Accepts request JSON
    (dicts, validated first) or validated graders; returns the validated graders."""
    if any(isinstance(g, dict) for g in graders):
        graders = parse_graders(list(graders), field)
    for path, g in walk(graders, field):
        for sub, source in templates(g):
            try:
                render(source, item, CHECK_SAMPLE)
            except ValueError as e:
                raise ValueError(f"{path}.{sub}: {e}") from None
        if isinstance(g, MultiGrader):
            try:
                check_formula(g.calculate_output, list(g.graders))
            except ValueError as e:
                raise ValueError(f"{path}.calculate_output: {e}") from None
    return list(graders)


def score_models(graders: Sequence[Grader], field: str = "graders") -> list[tuple[str, str]]:
    """(field, model) of every score_model grader (`graders[0].graders.judge.model`, `/models/judge`): what the
    request layer resolves and confines to the operator's model roots."""
    return [(f"{path}.model", g.model) for path, g in walk(graders, field) if isinstance(g, ScoreModelGrader)]


def resolve_models(graders: Sequence[Grader], resolve: Callable[[str, str], str],
                   field: str = "graders") -> list[Grader]:
    """A copy of `graders` whose score_model `model`s are `resolve(model, field_path)` (a local directory):
    the request layer passes its model resolver (allowed roots, operator-declared names); its errors pass on."""
    def fix(g: Grader, path: str) -> Grader:
        if isinstance(g, ScoreModelGrader):
            return g.model_copy(update={"model": resolve(g.model, f"{path}.model")})
        if isinstance(g, MultiGrader):
            return g.model_copy(update={"graders": {n: fix(s, f"{path}.graders.{n}") for n, s in g.graders.items()}})
        return g

    return [fix(g, f"{field}[{i}]") for i, g in enumerate(graders)]


# ---- TRL reward functions -----------------------------------------------------------------------

class GraderReward:
    """A TRL reward function for one grader: `reward(prompts, completions, **columns) -> list[float]`. The
    dataset's columns (and `prompt`) are the template's `item`. Picklable; `__name__` is the grader's name
    (TRL logs `rewards/<name>/mean`)."""

    def __init__(self, grader: Grader, device: str | None = None):
        self.grader = grader
        self.device = device
        self.__name__ = grader.name
        self.errors = 0  # samples that scored 0.0 because they could not be graded
        self.last_error: str | None = None

    def __call__(self, prompts: list, completions: list, **columns: Any) -> list[float]:
        n = len(completions)
        cols = {k: v for k, v in columns.items()
                if k not in TRL_KWARGS and isinstance(v, list) and len(v) == n}
        items = [{**{k: v[i] for k, v in cols.items()}, "prompt": prompts[i]} for i in range(n)]
        samples = [make_sample(completion_text(c)) for c in completions]
        results = grade_batch(self.grader, items, samples, self.device)
        failed = [r for r in results if isinstance(r, Exception)]
        if failed:
            before, self.errors = self.errors, self.errors + len(failed)
            if len(str(self.errors)) > len(str(before)) or before == 0:  # the 1st, 10th, 100th ... error: no flood
                log.warning("grader %s: %d of %d samples scored 0.0 (%d so far): %s", self.__name__, len(failed), n,
                            self.errors, failed[0])
            self.last_error = str(failed[0])
        log_metric = columns.get("log_metric")
        if callable(log_metric):
            log_metric(f"graders/{self.__name__}/error_rate", len(failed) / max(n, 1))
        return [0.0 if isinstance(r, Exception) else float(r) for r in results]


def reward_functions(graders: Sequence[Grader], *, device: str | None = None) -> list[GraderReward]:
    """One TRL reward function per grader, named after it. `device`: where score_model graders' models run
    (default: this process's accelerator, else the CPU)."""
    return [GraderReward(g, device) for g in graders]
