"""The grader request shapes, as OpenAI's fine-tuning API names them (method.reinforcement.grader)."""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Field

from ..training.keys import KnownKeys

TEMPLATE_MAX_CHARS = 4096


class GraderBase(KnownKeys):
    model_config = {"extra": "forbid"}
    name: str = Field(..., min_length=1, max_length=64, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")


class StringCheckGrader(GraderBase):
    """1.0 when `input` compared with `reference` by `operation` holds, else 0.0 (both are templates)."""

    type: Literal["string_check"] = "string_check"
    input: str = Field(..., max_length=TEMPLATE_MAX_CHARS)
    reference: str = Field(..., max_length=TEMPLATE_MAX_CHARS)
    operation: Literal["eq", "ne", "like", "ilike"] = "eq"


Grader = Annotated[Union[StringCheckGrader], Field(discriminator="type")]
GraderList = Annotated[list[Grader], Field(min_length=1, max_length=16)]
