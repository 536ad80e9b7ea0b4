"""Grader templates (`{{ item.answer }}`, `{{ sample.output_text }}`) in a sandboxed Jinja environment."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from jinja2 import StrictUndefined
from jinja2.sandbox import ImmutableSandboxedEnvironment

RENDERED_MAX_CHARS = 64 * 1024

_ENV = ImmutableSandboxedEnvironment(undefined=StrictUndefined, autoescape=False)


@lru_cache(maxsize=256)
def compile_template(source: str):
    return _ENV.from_string(source)


def render(source: str, item: dict[str, Any], sample: dict[str, Any]) -> str:
    """`source` rendered with `item` (the dataset row) and `sample` (`output_text`); at most 64 KiB."""
    text = compile_template(source).render(item=item, sample=sample)
    return text[:RENDERED_MAX_CHARS]
