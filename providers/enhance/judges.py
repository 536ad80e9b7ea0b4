"""Judges: rules against the reference answer (exact, normalized, regex, numeric), or a model."""

from __future__ import annotations

import math
import re
import string
from fractions import Fraction

from .config import RuleJudgeConfig
from .patterns import check_text, compile_pattern

_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?(?:\s*/\s*\d+)?")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def normalize(text: str) -> str:
    """Case-folded, punctuation and articles removed, whitespace collapsed."""
    text = text.casefold().translate(str.maketrans("", "", string.punctuation))
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def extract_answer(text: str, pattern: str | None) -> str:
    """The part of a response that is its answer: group 1 of `pattern` (RE2, last match), else a \\boxed{}
    value, else all. ValueError when the pattern does not compile or the text is too long to match."""
    if pattern:
        check_text(text, "the answer")
        m = None
        for m in compile_pattern(pattern).finditer(text):
            pass
        if m is not None:
            return ((m.group(1) if m.groups() else m.group(0)) or "").strip()
    boxed = _BOXED.findall(text)
    return boxed[-1].strip() if boxed else text.strip()


def parse_number(text: str) -> float | None:
    """The last number in the text (1,234.5, -3, 2/3, 1e-3), or None."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    s = found[-1].replace(",", "").replace(" ", "")
    try:
        return float(Fraction(s)) if "/" in s else float(s)
    except (ValueError, ZeroDivisionError):
        return None


def rule_verdict(cfg: RuleJudgeConfig, answer: str, reference: str) -> tuple[bool, str]:
    """(correct, why) of `answer` against `reference` under the rule. Patterns run under RE2; a reference
    used as the pattern that RE2 refuses, or an answer too long to match, is judged incorrect, saying why."""
    try:
        got = extract_answer(answer, cfg.extract)
    except ValueError as e:
        return False, f"extract: {e}"
    if cfg.mode == "exact":
        ok = got == reference.strip()
        return ok, "exact match" if ok else "differs from the reference"
    if cfg.mode == "normalized":
        ok = normalize(got) == normalize(reference)
        return ok, "normalized match" if ok else "differs from the reference after normalization"
    if cfg.mode == "regex":
        pattern = cfg.pattern or reference
        source = "pattern" if cfg.pattern else "the reference as a pattern"
        try:
            check_text(got, "the answer")
            ok = compile_pattern(pattern).fullmatch(got) is not None
        except ValueError as e:
            return False, f"{source}: {e}"
        return ok, f"matches {pattern!r}" if ok else f"does not match {pattern!r}"
    want, have = parse_number(reference), parse_number(got)
    if want is None:
        return False, f"the reference {reference!r} holds no number"
    if have is None:
        return False, "the answer holds no number"
    ok = math.isclose(have, want, rel_tol=cfg.rel_tol, abs_tol=cfg.abs_tol)
    return ok, f"{have:g} {'==' if ok else '!='} {want:g}"


def parse_model_verdict(text: str) -> bool | None:
    """A model judge's reply: True for CORRECT, False for INCORRECT, None if it said neither."""
    words = re.findall(r"[A-Za-z]+", text.upper())
    for w in words:
        if w in ("INCORRECT", "WRONG", "NO"):
            return False
        if w in ("CORRECT", "RIGHT", "YES"):
            return True
    return None
