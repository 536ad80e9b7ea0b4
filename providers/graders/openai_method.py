"""OpenAI's fine-tuning `method: {"type": "reinforcement", "reinforcement": {"grader", "hyperparameters"}}`
as this project's graders and GRPO hyperparameters."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError

from ..keys import UNKNOWN_KEY, KnownKeys, error_loc, unknown_key_message
from .models import Grader
from .rewards import field_path, parse_graders

Auto = Literal["auto"]


class ReinforcementHyperparameters(KnownKeys):
    """OpenAI's `ReinforcementHyperparameters`; "auto" or absent: the recipe's default."""

    model_config = {"extra": "forbid"}
    n_epochs: Annotated[int, Field(ge=1, le=1000)] | Auto | None = None
    batch_size: Annotated[int, Field(ge=1, le=65536)] | Auto | None = None
    learning_rate_multiplier: Annotated[float, Field(gt=0, le=1000)] | Auto | None = None
    compute_multiplier: Annotated[float, Field(gt=0, le=1000)] | Auto | None = None
    eval_interval: Annotated[int, Field(ge=1, le=10**6)] | Auto | None = None
    eval_samples: Annotated[int, Field(ge=1, le=10**6)] | Auto | None = None
    reasoning_effort: Literal["default", "low", "medium", "high"] | None = None


HYPERPARAMETERS = tuple(ReinforcementHyperparameters.model_fields)


def _fail(prefix: str, e: ValidationError) -> ValueError:
    first = e.errors()[0]
    path = field_path(prefix, error_loc(first)[:1])  # the field; what follows names a branch of `int | "auto"`
    if first["type"] == UNKNOWN_KEY:
        return ValueError(f"{path}: {first['msg']}")
    hint = "" if path.endswith("reasoning_effort") else " (or 'auto')"
    return ValueError(f"{path}: {repr(first['input'])[:40]}: {first['msg']}{hint}")


def openai_method_to_graders(method: dict) -> tuple[list[Grader], dict[str, Any]]:
    """(graders, hyperparameters) of an OpenAI fine-tuning `method` of type "reinforcement".

    The graders are a one-element list (OpenAI's single `grader`; a `multi` grader combines several). The
    hyperparameters dict has every key of OpenAI's ReinforcementHyperparameters (n_epochs, batch_size,
    learning_rate_multiplier, compute_multiplier, eval_interval, eval_samples, reasoning_effort), None where
    the client said "auto" or nothing. `reasoning_effort` has no effect on these models: the caller reports it
    as not applied when set. ValueError names the field (`method.reinforcement.grader.graders.b.reference`)."""
    if not isinstance(method, dict):
        raise ValueError(f"method: an object with type 'reinforcement', not {type(method).__name__}")
    if method.get("type") != "reinforcement":
        raise ValueError(f"method.type: {str(method.get('type'))[:40]!r} is not 'reinforcement'")
    for key in method:
        if key not in ("type", "reinforcement", "supervised", "dpo"):
            raise ValueError(f"method.{str(key)[:64]}: {unknown_key_message(key, ['type', 'reinforcement'])}")
    for other in ("supervised", "dpo"):
        if method.get(other) is not None:
            raise ValueError(f"method.{other}: set for a 'reinforcement' method; send method.reinforcement only")
    rl = method.get("reinforcement")
    if not isinstance(rl, dict):
        raise ValueError("method.reinforcement: required, an object with a `grader`")
    for key in rl:
        if key not in ("grader", "hyperparameters"):
            raise ValueError(f"method.reinforcement.{str(key)[:64]}: "
                             f"{unknown_key_message(key, ['grader', 'hyperparameters'])}")
    if "grader" not in rl or rl["grader"] is None:
        raise ValueError("method.reinforcement.grader: required (a string_check, text_similarity, score_model or "
                         "multi grader)")
    try:
        graders = parse_graders([rl["grader"]], "grader")
    except ValueError as e:  # `grader[0].x: ...` -> `method.reinforcement.grader.x: ...`
        raise ValueError("method.reinforcement." + str(e).replace("grader[0]", "grader", 1)) from None
    try:
        hp = ReinforcementHyperparameters.model_validate(rl.get("hyperparameters") or {})
    except ValidationError as e:
        raise _fail("method.reinforcement.hyperparameters", e) from None
    return graders, {k: (None if v == "auto" else v) for k, v in hp.model_dump().items()}
