"""Graders as TRL reward functions."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from typing import Any

from .models import Grader, StringCheckGrader
from .templates import render


def completion_text(completion: Any) -> str:
    """TRL passes a completion as text, or (conversational prompts) as a list of messages."""
    if isinstance(completion, str):
        return completion
    return "".join(str(m.get("content", "")) for m in completion if isinstance(m, dict))


def string_check(grader: StringCheckGrader, item: dict, sample: dict) -> float:
    got, want = render(grader.input, item, sample), render(grader.reference, item, sample)
    if grader.operation == "eq":
        return float(got == want)
    if grader.operation == "ne":
        return float(got != want)
    if grader.operation == "like":
        return float(fnmatch.fnmatchcase(got, f"*{want}*"))
    return float(fnmatch.fnmatchcase(got.lower(), f"*{want.lower()}*"))


def grade(grader: Grader, item: dict, sample: dict) -> float:
    """One grader's score of one sample."""
    if isinstance(grader, StringCheckGrader):
        return string_check(grader, item, sample)
    raise ValueError(f"grader type {grader.type!r} is not supported")


def check_graders(graders: Sequence[Grader], item: dict, field: str = "graders") -> None:
    """Render every grader once on a dataset row: a template naming a missing column raises ValueError
    naming the grader (`graders[0].reference: 'item' has no attribute 'answer'`)."""
    for i, g in enumerate(graders):
        try:
            grade(g, item, {"output_text": ""})
        except Exception as e:  # jinja's UndefinedError, SecurityError, TemplateSyntaxError
            raise ValueError(f"{field}[{i}] ({g.name}): {e}") from e


def reward_functions(graders: Sequence[Grader]) -> list[Callable[..., list[float]]]:
    """One TRL reward function per grader, named after it (TRL logs `rewards/<name>/mean`). The dataset's
    columns other than `prompt` reach the function as keyword lists: they are the template's `item`."""
    funcs = []
    for g in graders:
        def reward(prompts, completions, _g=g, **columns) -> list[float]:
            cols = {k: v for k, v in columns.items() if isinstance(v, list) and len(v) == len(completions)}
            scores = []
            for i, c in enumerate(completions):
                item = {k: v[i] for k, v in cols.items()}
                scores.append(grade(_g, item, {"output_text": completion_text(c)}))
            return scores
        reward.__name__ = g.name
        funcs.append(reward)
    return funcs
