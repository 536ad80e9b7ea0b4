"""What an enhancement run is configured with: the three roles, the judge, the loop's limits and formats."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..outbound import ENDPOINT_NAME
from .patterns import MAX_PATTERN_CHARS, compile_pattern
from .templates import check_template

DEFAULT_HINT_TEMPLATE = (
    "Question:\n{question}\n\nReference answer:\n{reference}\n\nA student answered:\n{answer}\n\n"
    "The answer is wrong. Give one short hint that helps the student find the correct answer, "
    "without stating the answer."
)
DEFAULT_RETRY_TEMPLATE = "That is not correct. Hint: {hint}\nTry again and give only the final answer."
DEFAULT_JUDGE_TEMPLATE = (
    "Question:\n{question}\n\nReference answer:\n{reference}\n\nAnswer to check:\n{answer}\n\n"
    "Is the answer to check correct? Reply with exactly one word: CORRECT or INCORRECT."
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class RoleConfig(_Strict):
    """A chat model: with `endpoint`, one of the OpenAI-compatible endpoints (vLLM, Ollama, Llama Stack, hosted
    APIs) the operator declared by name; without, a model served by the training service itself (a model
    directory, `job:<uuid>`, ...). A URL or a key's variable never comes from a request."""

    model: str = Field(min_length=1, max_length=1000)
    endpoint: str | None = Field(None, pattern=ENDPOINT_NAME)
    # Refused when set (a request may not choose a URL or a secret): kept so the answer can say what to do.
    base_url: str | None = Field(None, max_length=2000, exclude=True,
                                 description="refused: name an `endpoint` the operator declared")
    api_key_env: str | None = Field(None, max_length=200, exclude=True,
                                    description="refused: an endpoint's key is the operator's setting")
    temperature: float = Field(0.0, ge=0, le=2)
    max_tokens: int = Field(256, ge=1, le=4096)
    timeout_s: float = Field(60.0, gt=0, le=3600)
    max_retries: int = Field(4, ge=0, le=20)  # on 429, 5xx, timeouts and refused connections
    backoff_s: float = Field(0.5, ge=0, le=60)  # first wait; doubles per retry (a Retry-After header wins)
    system_prompt: str | None = Field(None, max_length=20_000)


class RuleJudgeConfig(_Strict):
    """Compare the answer with the row's reference answer, no model involved."""

    type: Literal["rule"] = "rule"
    mode: Literal["exact", "normalized", "regex", "numeric"] = "normalized"
    # Patterns are RE2 syntax (linear-time matching: no backreferences or lookarounds).
    # regex mode: `pattern` (else the row's reference is the pattern)
    pattern: str | None = Field(None, max_length=MAX_PATTERN_CHARS)
    extract: str | None = Field(None, max_length=MAX_PATTERN_CHARS)  # group 1 is the answer (e.g. '####\s*(.+)')
    rel_tol: float = Field(1e-6, ge=0, le=1)
    abs_tol: float = Field(1e-9, ge=0)

    @field_validator("pattern", "extract")
    @classmethod
    def _compiles(cls, v):
        if v is not None:
            compile_pattern(v)
        return v


class ModelJudgeConfig(_Strict):
    """A model says CORRECT or INCORRECT (the reference answer, when the row has one, is in its prompt)."""

    type: Literal["model"] = "model"
    role: RoleConfig
    template: str = Field(DEFAULT_JUDGE_TEMPLATE, max_length=20_000)

    @field_validator("template")
    @classmethod
    def _placeholders(cls, v):
        return check_template(v, ("question", "reference", "answer"))


JudgeConfig = Annotated[RuleJudgeConfig | ModelJudgeConfig, Field(discriminator="type")]


class EnhanceConfig(_Strict):
    student: RoleConfig
    teacher: RoleConfig
    judge: JudgeConfig = Field(default_factory=RuleJudgeConfig)
    max_iterations: int = Field(3, ge=1, le=16)  # student attempts per row (the first one included)
    concurrency: int = Field(4, ge=1, le=256)  # rows in flight at once
    # What a training row's answer holds: 'final' the accepted answer after its own reasoning (when the model
    # returned any); 'final-only' the answer alone; 'iterative' every attempt, verdict and hint in <think>
    # (it trains on the rejected attempts: opt-in only).
    thinking_format: Literal["final", "final-only", "iterative"] = "final"
    output_format: Literal["messages", "instruct"] = "messages"
    # A row the student never gets right: use the teacher's own answer when the judge accepts it
    # ('teacher_answer'), drop it ('drop'), or keep the student's last attempt marked incorrect ('keep').
    on_failure: Literal["teacher_answer", "drop", "keep"] = "teacher_answer"
    hint_template: str = Field(DEFAULT_HINT_TEMPLATE, max_length=20_000)
    retry_template: str = Field(DEFAULT_RETRY_TEMPLATE, max_length=20_000)
    max_rows: int | None = Field(None, ge=1)

    @field_validator("hint_template")
    @classmethod
    def _hint_placeholders(cls, v):
        return check_template(v, ("question", "reference", "answer"))

    @field_validator("retry_template")
    @classmethod
    def _retry_placeholders(cls, v):
        return check_template(v, ("hint",))
