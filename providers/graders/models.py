"""The grader request shapes, field by field as OpenAI's fine-tuning API names them
(`method.reinforcement.grader`; openai-python `types/graders/`).

Supported: `string_check`, `text_similarity` (the metrics a local library computes), `score_model` (a local
model the operator allows) and `multi` (a formula over named graders). `python` graders run client code and
are refused; `label_model` is not served. Every template is checked here (syntax, namespaces, no statements),
so a bad one is a validation error naming its field before any job exists.
"""

from __future__ import annotations

import ast
import math
import re
from typing import Annotated, Any, Literal, Union

from pydantic import AfterValidator, BeforeValidator, Field, field_validator, model_validator

from ..keys import KnownKeys
from .templates import TEMPLATE_MAX_CHARS, check_template

FORMULA_MAX_CHARS = 1024
FORMULA_MAX_NODES = 256
MAX_GRADERS = 32  # all graders of a request, those inside `multi` included
# The text of all graders of a request (templates, names, formulas): each template is parsed as the request is
# read, about 7 ms a KiB, so this bounds that work at about half a second.
GRADERS_MAX_CHARS = 64 * 1024
MULTI_MAX_GRADERS = 16
SCORE_MODEL_MAX_MESSAGES = 16
SCORE_MODEL_MAX_NEW_TOKENS = 512
NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"  # a name a formula can use
# A grader's own name (OpenAI's examples say "Example string check grader"); it names a reward metric, so no '/'
GRADER_NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9 _.\-]*$"

Template = Annotated[str, Field(max_length=TEMPLATE_MAX_CHARS), AfterValidator(check_template)]


class GraderBase(KnownKeys):
    model_config = {"extra": "forbid"}
    name: str = Field(..., min_length=1, max_length=64, pattern=GRADER_NAME_PATTERN)


class StringCheckGrader(GraderBase):
    """1.0 when `input` compared with `reference` by `operation` holds, else 0.0 (both are templates).
    `like` holds when `input` contains `reference`, `ilike` the same ignoring case."""

    type: Literal["string_check"] = "string_check"
    input: Template
    reference: Template
    operation: Literal["eq", "ne", "like", "ilike"] = "eq"


SIMILARITY_METRICS = ("fuzzy_match", "bleu", "gleu", "rouge_1", "rouge_2", "rouge_3", "rouge_4", "rouge_5", "rouge_l")
# rouge metrics compare the first this many tokens of each side: rouge_l's LCS table is the product of the two
# counts (1024 x 1024: at most about 30 MB and 0.2 s a sample). The other metrics are linear in the rendered text.
SIMILARITY_MAX_TOKENS = 1024
UNSERVED_METRICS = {
    "cosine": "needs an embedding model, which this service does not run",
    "meteor": "needs the WordNet corpus, which this service does not install",
}


class TextSimilarityGrader(GraderBase):
    """The similarity of `input` to `reference` in [0, 1]: fuzzy_match (rapidfuzz's normalized ratio),
    bleu (sacrebleu's sentence BLEU), gleu (nltk's sentence GLEU), rouge_1..rouge_5 and rouge_l
    (rouge-score's F-measure over the first SIMILARITY_MAX_TOKENS tokens of each side)."""

    type: Literal["text_similarity"] = "text_similarity"
    input: Template
    reference: Template
    evaluation_metric: str

    @field_validator("evaluation_metric")
    @classmethod
    def _metric(cls, v: str) -> str:
        if v in SIMILARITY_METRICS:
            return v
        why = UNSERVED_METRICS.get(v, "is not a metric")
        raise ValueError(f"{v[:40]!r} {why}; supported: {', '.join(SIMILARITY_METRICS)}")


class TextContent(KnownKeys):
    model_config = {"extra": "forbid"}
    type: Literal["input_text", "output_text"] = "input_text"
    text: Template


def _text_parts(value: Any) -> Any:
    """Content as a list of text parts: a string is one `input_text` part; images and audio are refused."""
    parts = value if isinstance(value, list) else [value]
    for part in parts:
        if isinstance(part, dict) and part.get("type") not in (None, "input_text", "output_text"):
            raise ValueError(f"content of type {str(part.get('type'))[:40]!r} is not supported: a score_model "
                             "grader here reads text (a string, or input_text / output_text parts)")
    return [{"type": "input_text", "text": p} if isinstance(p, str) else p for p in parts]


class ScoreModelMessage(KnownKeys):
    """One message of the grader's prompt; `content` (a string or text parts) holds templates."""

    model_config = {"extra": "forbid"}
    role: Literal["user", "assistant", "system", "developer"]
    content: list[TextContent] = Field(..., max_length=16)
    type: Literal["message"] | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, v: Any) -> Any:
        return _text_parts(v)

    def text(self) -> str:
        return "".join(p.text for p in self.content)


class SamplingParams(KnownKeys):
    """How the grader model generates. `temperature` 0 or unset: greedy. `reasoning_effort` is accepted
    and has no effect on a local model."""

    model_config = {"extra": "forbid"}
    max_completions_tokens: int | None = Field(None, ge=1, le=SCORE_MODEL_MAX_NEW_TOKENS)
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = None
    seed: int | None = Field(None, ge=0, le=2**32 - 1)
    temperature: float | None = Field(None, ge=0, le=10)
    top_p: float | None = Field(None, gt=0, le=1)


class ScoreModelGrader(GraderBase):
    """A local model reads the rendered messages and answers with a score: the first number of its answer,
    clipped to `range` (default [0, 1]). `model` is a model directory under the operator's allowed roots,
    or a name the operator declared; the service never calls a URL a client names."""

    type: Literal["score_model"] = "score_model"
    input: list[ScoreModelMessage] = Field(..., min_length=1, max_length=SCORE_MODEL_MAX_MESSAGES)
    model: str = Field(..., min_length=1, max_length=4096)
    range: list[float] = Field(default_factory=lambda: [0.0, 1.0])
    sampling_params: SamplingParams | None = None

    @field_validator("model")
    @classmethod
    def _model(cls, v: str) -> str:
        if "://" in v or "\x00" in v:
            raise ValueError(f"{v[:100]!r} is not a local model: name a model directory under the operator's "
                             "allowed model roots, or a model name the operator declared (URLs are not called)")
        return v

    @field_validator("range")
    @classmethod
    def _range(cls, v: list[float]) -> list[float]:
        if len(v) != 2 or not all(math.isfinite(x) for x in v) or not v[0] < v[1]:
            raise ValueError(f"{v!r} must be [low, high] with finite low < high")
        return v


class PythonGrader(GraderBase):
    """Refused: a python grader runs client code, and this service builds no sandbox for it."""

    type: Literal["python"] = "python"
    source: str = ""
    image_tag: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _refuse(cls, data: Any) -> Any:
        raise ValueError("python graders run client code; not supported (use string_check, text_similarity, "
                         "score_model or multi)")


class LabelModelGrader(GraderBase):
    """Refused: OpenAI's evals-only label grader."""

    type: Literal["label_model"] = "label_model"

    @model_validator(mode="before")
    @classmethod
    def _refuse(cls, data: Any) -> Any:
        raise ValueError("label_model graders are not supported (use score_model with a rubric that answers a number)")


SubGrader = Annotated[Union[StringCheckGrader, TextSimilarityGrader, ScoreModelGrader, PythonGrader,
                            LabelModelGrader], Field(discriminator="type")]

FORMULA_FUNCTIONS = ("min", "max", "abs", "floor", "ceil", "exp", "sqrt", "log")
_FORMULA_NODES = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Call, ast.Name, ast.Load, ast.Constant,
                  ast.Add, ast.Sub, ast.Mult, ast.Div, ast.Pow, ast.BitXor, ast.USub, ast.UAdd)


def check_formula(formula: str, names: list[str]) -> ast.Expression:
    """`formula` parsed, when it is arithmetic (+ - * / ^ ** and parentheses on numbers) over `names` and
    the functions min, max, abs, floor, ceil, exp, sqrt, log; else ValueError saying what is not."""
    if len(formula) > FORMULA_MAX_CHARS:
        raise ValueError(f"at most {FORMULA_MAX_CHARS} characters (this one has {len(formula)})")
    try:
        tree = ast.parse(formula.strip(), mode="eval")
    except SyntaxError as e:
        raise ValueError(f"{formula[:100]!r} does not parse: {e.msg}") from None
    count = 0
    for node in ast.walk(tree):
        count += 1
        if count > FORMULA_MAX_NODES:
            raise ValueError(f"more than {FORMULA_MAX_NODES} terms")
        if not isinstance(node, _FORMULA_NODES):
            raise ValueError(f"{ast.get_source_segment(formula.strip(), node) or type(node).__name__!r} is not "
                             f"arithmetic; a formula uses + - * / ^, numbers, the graders' names and "
                             f"{', '.join(FORMULA_FUNCTIONS)}")
        if isinstance(node, ast.Constant) and (isinstance(node.value, bool) or not isinstance(node.value, (int, float))):
            raise ValueError(f"{node.value!r} is not a number")
        if isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name) or node.func.id not in FORMULA_FUNCTIONS:
                raise ValueError(f"only the functions {', '.join(FORMULA_FUNCTIONS)} may be called")
            if node.keywords or not node.args:
                raise ValueError(f"{node.func.id}() takes positional arguments")
        if isinstance(node, ast.Name) and node.id not in names and node.id not in FORMULA_FUNCTIONS:
            raise ValueError(f"{node.id!r} is not a grader of this multi grader (its graders: {', '.join(names)})")
    return tree


class MultiGrader(GraderBase):
    """`calculate_output` (arithmetic over the graders' names, e.g. `0.7 * exact + 0.3 * close`) combines the
    scores of `graders` (a map name -> grader; OpenAI nests one level: no multi inside a multi)."""

    type: Literal["multi"] = "multi"
    graders: dict[str, SubGrader] = Field(..., min_length=1, max_length=MULTI_MAX_GRADERS)
    calculate_output: str = Field(..., min_length=1)

    @field_validator("graders", mode="before")
    @classmethod
    def _names(cls, v: Any) -> Any:
        if isinstance(v, dict) and isinstance(v.get("type"), str):  # openai-python's shape: one grader
            v = {str(v.get("name", "grader")): v}
        if isinstance(v, dict):
            for key, g in v.items():
                if not isinstance(key, str) or not _is_name(key) or key in FORMULA_FUNCTIONS:
                    raise ValueError(f"{str(key)[:64]!r} cannot name a grader in a formula: use letters, digits and "
                                     f"'_' (not starting with a digit), not one of {', '.join(FORMULA_FUNCTIONS)}")
                if isinstance(g, dict) and g.get("type") == "multi":
                    raise ValueError(f"{key}: a multi grader's graders are string_check, text_similarity or "
                                     "score_model (no multi inside a multi)")
            # OpenAI's examples often leave a sub-grader's name out: the key names it
            v = {k: ({**g, "name": g.get("name", k)} if isinstance(g, dict) else g) for k, g in v.items()}
        return v

    @field_validator("calculate_output")
    @classmethod
    def _formula(cls, v: str, info) -> str:
        names = list((info.data.get("graders") or {}).keys())
        if not names:  # the graders failed validation: that error is reported
            return v
        check_formula(v, names)
        return v


def _is_name(key: str) -> bool:
    return bool(re.fullmatch(NAME_PATTERN, key)) and len(key) <= 64


def _text_chars(data: Any) -> int:
    """The characters of every string (keys included) in request JSON."""
    total, stack = 0, [data]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            total += len(value)
        elif isinstance(value, dict):
            stack += [*value.keys(), *value.values()]
        elif isinstance(value, (list, tuple)):
            stack += value
    return total


def _bound_text(graders: Any) -> Any:
    """Before any template is parsed: the graders' text in all is at most GRADERS_MAX_CHARS."""
    total = _text_chars(graders)
    if total > GRADERS_MAX_CHARS:
        raise ValueError(f"the graders hold {total} characters of text (templates, names, formulas); at most "
                         f"{GRADERS_MAX_CHARS} in all")
    return graders


def _count_graders(graders: list) -> list:
    total = sum(len(g.graders) + 1 if isinstance(g, MultiGrader) else 1 for g in graders)
    if total > MAX_GRADERS:
        raise ValueError(f"{total} graders in all (multi graders' graders included); at most {MAX_GRADERS}")
    names = [g.name for g in graders]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"grader names must differ (each is a reward's name): {', '.join(dupes)} repeats")
    return graders


Grader = Annotated[Union[StringCheckGrader, TextSimilarityGrader, ScoreModelGrader, MultiGrader, PythonGrader,
                         LabelModelGrader], Field(discriminator="type")]
GraderList = Annotated[list[Grader], Field(min_length=1, max_length=16), BeforeValidator(_bound_text),
                       AfterValidator(_count_graders)]
