"""Prompt templates of the enhancement loop: `{question}`, `{reference}`, `{answer}`, `{hint}` and nothing else.

Templates come from clients. `str.format` would let one read attributes (`{answer.__class__}`) or pad a
value to any width (`{answer:>200000000}`, 27 bytes that allocate 200 MB), so templates are checked when
a request arrives and rendered here by plain substitution: `{{` and `}}` stay literal braces, as in
`str.format`, so existing templates render the same.
"""

from __future__ import annotations

import string
from ..errors import BadRequest

MAX_RENDERED_CHARS = 64 * 1024  # a prompt longer than this fails its row, never the service


class TemplateTooLarge(ValueError):
    """A rendered prompt would exceed MAX_RENDERED_CHARS."""


def _parts(template: str) -> list[tuple[str, str | None, str | None, str | None]]:
    return list(string.Formatter().parse(template))


def check_template(template: str, allowed: tuple[str, ...]) -> str:
    """`template` if its only fields are bare names from `allowed`; else ValueError saying what is wrong."""
    accepted = ", ".join("{" + name + "}" for name in allowed)
    try:
        parts = _parts(template)
    except ValueError as e:  # a lone '{' or '}'
        raise BadRequest(f"{e}; placeholders are {accepted}, and {{{{ / }}}} write literal braces") from None
    for _, field, spec, conversion in parts:
        if field is None:
            continue
        if field not in allowed:
            raise BadRequest(f"{{{field}}} is not a placeholder: use {accepted} (no attribute or index access, "
                             "no positional fields); write {{ and }} for literal braces")
        if conversion:
            raise BadRequest(f"{{{field}!{conversion}}}: conversions are not supported; write {{{field}}}")
        if spec:
            raise BadRequest(f"{{{field}:{spec}}}: format specs are not supported; write {{{field}}}")
    return template


def render(template: str, values: dict[str, str], name: str, max_chars: int = MAX_RENDERED_CHARS) -> str:
    """`template` with each placeholder replaced by its value; TemplateTooLarge past `max_chars` (checked
    before the text is built). `template` must have passed check_template for these names."""
    parts = _parts(template)
    size = sum(len(literal) + (len(values[field]) if field is not None else 0) for literal, field, _, _ in parts)
    if size > max_chars:
        raise TemplateTooLarge(f"{name}: the rendered prompt would be {size} characters, over the limit of {max_chars}")
    return "".join(literal + (values[field] if field is not None else "") for literal, field, _, _ in parts)
