"""Grader templates (`{{ item.answer }}`, `{{ sample.output_text }}`) in a sandboxed Jinja environment.

A template substitutes values, as OpenAI's graders do: text, `{{ namespace.path }}` and a few filters
(`{{ item.answer | lower }}`). Statements (`{% for %}`, `{% if %}`, macros), calls and names other than
`item` and `sample` are refused when the template is checked, so rendering is one pass over at most
`TEMPLATE_MAX_CHARS` of template with no loop, and the output stops at `RENDERED_MAX_CHARS`. The environment
holds only the filters of `FILTER_ARGS` (an allow-list: no tests, no globals), each linear in its input, with
its constant arguments bounded, and a filter's text result stops at `RENDERED_MAX_CHARS` too, so a chain of
filters cannot grow a value. The sandbox (ImmutableSandboxedEnvironment) stays underneath as a second wall.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from functools import lru_cache
from typing import Any

from jinja2 import StrictUndefined, TemplateError, TemplateSyntaxError, nodes
from jinja2.exceptions import SecurityError, UndefinedError
from jinja2.filters import FILTERS as JINJA_FILTERS
from jinja2.sandbox import ImmutableSandboxedEnvironment

TEMPLATE_MAX_CHARS = 4096
RENDERED_MAX_CHARS = 64 * 1024
NAMESPACES = ("item", "sample")
ROUND_MAX_DIGITS = 17  # a float's significant digits; Jinja's round(p, 'floor') builds the int 10**p
TRIM_MAX_CHARS = 16


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# The filters a template may use, each with the constant positional arguments it takes ((what it is, check)):
# the only filters the environment holds. Each one's work is linear in its input with these bounds (not
# `join`: a long separator between the characters of a long field multiplies the two; not tojson's indent: an
# indent string per line of a deeply nested value does the same).
FILTER_ARGS: dict[str, tuple[tuple[str, Callable[[Any], bool]], ...]] = {
    "lower": (), "upper": (), "capitalize": (), "title": (), "string": (), "tojson": (),
    "length": (), "first": (), "last": (), "abs": (),
    "trim": ((f"chars: text of at most {TRIM_MAX_CHARS} characters",
              lambda v: isinstance(v, str) and len(v) <= TRIM_MAX_CHARS),),
    "default": (("default_value: a constant", lambda v: True), ("boolean: true or false", lambda v: isinstance(v, bool))),
    "int": (("default: a number", _is_number), ("base: 0 or 2 to 36", lambda v: type(v) is int and (v == 0 or 2 <= v <= 36))),
    "float": (("default: a number", _is_number),),
    "round": ((f"precision: an integer from 0 to {ROUND_MAX_DIGITS}", lambda v: type(v) is int and 0 <= v <= ROUND_MAX_DIGITS),
              ("method: 'common', 'ceil' or 'floor'", lambda v: v in ("common", "ceil", "floor"))),
}
FILTERS = frozenset(FILTER_ARGS)
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


def _text_bounded(f: Callable) -> Callable:
    """`f` whose text result stops at RENDERED_MAX_CHARS (tojson doubles each backslash: chained, it would
    double a value each time). functools.wraps keeps Jinja's pass_environment marks."""
    @functools.wraps(f)
    def bounded(*args: Any, **kwargs: Any) -> Any:
        out = f(*args, **kwargs)
        return out[:RENDERED_MAX_CHARS] if isinstance(out, str) else out

    return bounded


_ENV = _GraderEnvironment(undefined=StrictUndefined, autoescape=False)
_ENV.filters = {name: _text_bounded(JINJA_FILTERS[name]) for name in FILTER_ARGS}
_ENV.tests = {}  # templates have no `is` tests
_ENV.globals = {}  # and no names but item and sample


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
        _check_filter_args(node.name, [a.value for a in node.args])
    for child in node.iter_child_nodes():
        _check_node(child)


def _check_filter_args(name: str, args: list[Any]) -> None:
    expected = FILTER_ARGS[name]
    takes = ", ".join(what for what, _ in expected) or "no arguments"
    if len(args) > len(expected):
        raise ValueError(f"filter {name!r} takes {takes} (given {len(args)})")
    for value, (what, ok) in zip(args, expected):
        if not ok(value):
            raise ValueError(f"filter {name!r}: {repr(value)[:40]} is not accepted as {what}")


@lru_cache(maxsize=256)
def check_template(source: str) -> str:
    """`source` when it is an acceptable template (a pydantic validator's body); ValueError for a template
    that is too long, does not parse, or does more than substitute values (the message says what). Parsing
    only: a request's templates are compiled where they are rendered."""
    if len(source) > TEMPLATE_MAX_CHARS:
        raise ValueError(f"a template is at most {TEMPLATE_MAX_CHARS} characters (this one has {len(source)})")
    try:
        _check_node(_ENV.parse(source))
    except TemplateSyntaxError as e:
        raise ValueError(f"template syntax error: {e.message} (line {e.lineno})") from None
    return source


@lru_cache(maxsize=256)
def compile_template(source: str):
    """The compiled template, once `check_template` accepts it."""
    return _ENV.from_string(check_template(source))


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
    except (TypeError, ArithmeticError, ValueError, RecursionError, TemplateError) as e:  # round of a text field
        raise ValueError(f"a filter cannot take the row's value: {type(e).__name__}: {str(e)[:200]}") from None
    return "".join(parts)[:RENDERED_MAX_CHARS]
