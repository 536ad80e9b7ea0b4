"""Client-supplied regular expressions, run with RE2: matching takes time linear in the text.

Python's `re` backtracks: `(a+)+` against 'a'*40 + '!' runs for hours holding the GIL, which froze the
whole service (and again after each restart, since the task resumes). RE2 refuses the features that need
backtracking (backreferences, lookarounds) and releases the GIL while it matches; patterns and the texts
they are matched against are also bounded in length.
"""

from __future__ import annotations

import functools

import re2
from ..errors import BadRequest

MAX_PATTERN_CHARS = 2000
MAX_MATCH_CHARS = 32 * 1024  # an answer longer than this is not matched (judged incorrect, with the reason)


def _options() -> re2.Options:
    opts = re2.Options()
    opts.log_errors = False  # the reason goes into the error, not to stderr
    opts.dot_nl = True  # '.' matches newlines, as re.DOTALL did for the judge's patterns
    return opts


@functools.lru_cache(maxsize=256)
def compile_pattern(pattern: str):
    """The RE2 program of `pattern`; ValueError (saying why) when it is too long or RE2 cannot compile it."""
    if len(pattern) > MAX_PATTERN_CHARS:
        raise BadRequest(f"the pattern is {len(pattern)} characters, over the limit of {MAX_PATTERN_CHARS}")
    try:
        return re2.compile(pattern, _options())
    except re2.error as e:
        reason = e.args[0].decode(errors="replace") if e.args and isinstance(e.args[0], bytes) else str(e)
        raise BadRequest(f"not a regular expression RE2 accepts ({reason}); RE2 has no backreferences or "
                         "lookarounds (see https://github.com/google/re2/wiki/Syntax)") from None


def check_text(text: str, what: str) -> None:
    """ValueError when `text` is too long to match a pattern against."""
    if len(text) > MAX_MATCH_CHARS:
        raise BadRequest(f"{what} is {len(text)} characters; patterns are matched against at most {MAX_MATCH_CHARS}")
