"""Grader templates (`{{ item.answer }}`, `{{ sample.output_text }}`) in a sandboxed Jinja environment.

A template substitutes values, as OpenAI's graders do: text, `{{ namespace.path }}` and a few filters
(`{{ item.answer | lower }}`). Statements (`{% for %}`, `{% if %}`, macros), calls and names other than
`item` and `sample` are refused when the template is checked, so rendering is one pass over at most
`TEMPLATE_MAX_CHARS` of template with no loop, and the output stops at `RENDERED_MAX_CHARS`. The sandbox
(ImmutableSandboxedEnvironment) stays underneath as a second wall.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from jinja2 import StrictUndefined, TemplateSyntaxError, nodes
from jinja2.exceptions import SecurityError, UndefinedError
from jinja2.sandbox import ImmutableSandboxedEnvironment

TEMPLATE_MAX_CHARS = 4096
RENDERED_MAX_CHARS = 64 * 1024
NAMESPACES = ("item", "sample")
# Filters whose work is linear in their input and whose output is at most a small multiple of it (not `join`:
# a long separator between the characters of a long field multiplies the two).
FILTERS = frozenset({"lower", "upper", "trim", "string", "tojson", "length", "first", "last", "default",
                     "int", "float", "abs", "round", "capitalize", "title"})
_ALLOWED = (nodes.Template, nodes.Output, nodes.TemplateData, nodes.Name, nodes.Getattr, nodes.Getitem,
            nodes.Const, nodes.Filter)


class _GraderEnvironment(ImmutableSandboxedEnvironment):
    """`item.values` is the row's `values` column, not the dict method: a dict's keys come first."""

    def getattr(self, obj: Any, attribute: str) -> Any:
        if isinstance(obj, dict):
            try:
                return obj[attribute]
            except KeyError:
                return self.undefined(obj=obj, name=attribute)
        return super().getattr(obj, attribute)


_NAMES = {"For": "{% for %}", "If": "{% if %}", "Call": "a call", "Macro": "{% macro %}", "Assign": "{% set %}",
          "CondExpr": "an if-expression", "Include": "{% include %}", "Import": "{% import %}",
          "FromImport": "{% from %}", "Extends": "{% extends %}", "Block": "{% block %}"}
_ENV = _GraderEnvironment(undefined=StrictUndefined, autoescape=False)


def _check_node(node: nodes.Node) -> None:
    if not isinstance(node, _ALLOWED):
        what = _NAMES.get(type(node).__name__, type(node).__name__)
        raise ValueError(f"templates substitute values only ({{{{ item.field }}}}, {{{{ sample.output_text }}}}, "
                         f"filters {', '.join(sorted(FILTERS))}); {what!r} is not supported")
    if isinstance(node, nodes.Name) and node.name not in NAMESPACES:
        raise ValueError(f"templates name 'item' (the dataset row) or 'sample' (the model's answer), not {node.name!r}")
    if isinstance(node, nodes.Getattr) and node.attr.startswith("_"):
        raise ValueError(f"attribute {node.attr!r} is not allowed in a template (names starting with '_')")
    if isinstance(node, nodes.Getitem):
        if not isinstance(node.arg, nodes.Const):
            raise ValueError("a template indexes with a constant ([0], ['key']), not an expression")
        if isinstance(node.arg.value, str) and node.arg.value.startswith("_"):
            raise ValueError(f"key {node.arg.value!r} is not allowed in a template (names starting with '_')")
    if isinstance(node, nodes.Filter):
        if node.name not in FILTERS:
            raise ValueError(f"filter {node.name!r} is not allowed in a template; allowed: {', '.join(sorted(FILTERS))}")
        if node.kwargs or node.dyn_args or node.dyn_kwargs or not all(isinstance(a, nodes.Const) for a in node.args):
            raise ValueError(f"filter {node.name!r} takes constant positional arguments only")
    for child in node.iter_child_nodes():
        _check_node(child)


@lru_cache(maxsize=256)
def compile_template(source: str):
    """The compiled template; ValueError for a template that is too long, does not parse, or does more than
    substitute values (the message says what)."""
    if len(source) > TEMPLATE_MAX_CHARS:
        raise ValueError(f"a template is at most {TEMPLATE_MAX_CHARS} characters (this one has {len(source)})")
    try:
        _check_node(_ENV.parse(source))
        return _ENV.from_string(source)
    except TemplateSyntaxError as e:
        raise ValueError(f"template syntax error: {e.message} (line {e.lineno})") from None


def check_template(source: str) -> str:
    """`source` when it is an acceptable template (a pydantic validator's body), else ValueError."""
    compile_template(source)
    return source


def render(source: str, item: dict[str, Any], sample: dict[str, Any]) -> str:
    """`source` rendered with `item` (the dataset row) and `sample` (`output_text`, `output_json`); at most
    RENDERED_MAX_CHARS. ValueError naming what is missing (`item has no field 'answer'`) or refused."""
    template = compile_template(source)
    parts, size = [], 0
    try:
        for chunk in template.generate(item=item, sample=sample):  # stops early: no huge string is built
            parts.append(chunk)
            size += len(chunk)
            if size >= RENDERED_MAX_CHARS:
                break
    except UndefinedError as e:
        fields = ", ".join(sorted(map(str, item)))[:300]
        what = (e.message or "undefined").replace("'dict object' has no attribute", "no field")
        raise ValueError(f"{what} (the row's fields: {fields}; the sample's: "
                         f"{', '.join(sorted(map(str, sample)))})") from None
    except SecurityError as e:
        raise ValueError(f"template refused by the sandbox: {e}") from None
    return "".join(parts)[:RENDERED_MAX_CHARS]
