"""Validation's verdict: an absolute bar AND a significant improvement over the base model.

The evidence is per prompt: did the model's answer pass (under the chosen `match`), and did the base's?
`passed` needs both
- the bar: the model's pass rate >= `min_pass_rate` (default DEFAULT_MIN_PASS_RATE), and
- the improvement (when a base model was compared): the model beats the base on the same prompts in a
  one-sided exact McNemar test (a sign test on the prompts where exactly one of the two passed) with
  p < `alpha` (default DEFAULT_ALPHA).
So 0% against 0% never passes (no prompt tells them apart: p = 1), and neither does a gain that a handful
of prompts cannot show. Without a base the verdict rests on the bar alone, and the verdict says so.
Pure Python (no scipy): the binomial tails are summed exactly.
"""

from __future__ import annotations

import math
from typing import Any

DEFAULT_MIN_PASS_RATE = 0.5
DEFAULT_ALPHA = 0.05
RULE = ("pass rate >= min_pass_rate (default {bar:g}) and, against a base model, a significant gain on the "
        "same prompts (one-sided exact McNemar test, p < alpha, default {alpha:g})")


def binomial_upper_tail(k: int, n: int, p: float = 0.5) -> float:
    """P(X >= k) for X ~ Binomial(n, p)."""
    if k <= 0:
        return 1.0
    return min(1.0, sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1)))


def _binomial_cdf(k: int, n: int, p: float) -> float:
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(0, k + 1))


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float] | None:
    """Exact (Clopper-Pearson) confidence interval of a proportion k/n; None when n is 0."""
    if n == 0:
        return None
    tail = (1 - level) / 2

    def solve(f, lo=0.0, hi=1.0) -> float:  # f is increasing in p on [lo, hi]: bisection
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if f(mid) < 0 else (lo, mid)
        return (lo + hi) / 2

    lower = 0.0 if k == 0 else solve(lambda p: binomial_upper_tail(k, n, p) - tail)
    upper = 1.0 if k == n else solve(lambda p: tail - _binomial_cdf(k, n, p))
    return round(lower, 4), round(upper, 4)


def mcnemar_one_sided(wins: int, losses: int) -> float:
    """p-value of 'the model passes more often than the base', from the discordant prompts only:
    `wins` where only the model passed, `losses` where only the base did (exact, one-sided)."""
    return binomial_upper_tail(wins, wins + losses, 0.5)


def verdict(passed: list[bool], base_passed: list[bool] | None = None, min_pass_rate: float | None = None,
            alpha: float | None = None) -> dict[str, Any]:
    """The pass/fail decision over per-prompt outcomes (`base_passed` paired with `passed`, or None when
    no base was compared), with the figures that justify it."""
    bar = DEFAULT_MIN_PASS_RATE if min_pass_rate is None else min_pass_rate
    alpha = DEFAULT_ALPHA if alpha is None else alpha
    n, k = len(passed), sum(bool(x) for x in passed)
    out: dict[str, Any] = {
        "rule": RULE.format(bar=DEFAULT_MIN_PASS_RATE, alpha=DEFAULT_ALPHA), "n": n,
        "pass_rate": k / n if n else None, "pass_rate_ci95": clopper_pearson(k, n),
        "min_pass_rate": bar, "min_pass_rate_is_default": min_pass_rate is None, "alpha": alpha,
        "meets_bar": bool(n) and k / n >= bar,
    }
    reasons = []
    if not n:
        reasons.append("no prompt states an expected answer, so nothing measures the model")
    elif not out["meets_bar"]:
        reasons.append(f"pass rate {k}/{n} = {k / n:.1%} is below the bar {bar:.1%}")
    if base_passed is None:
        out.update(base_pass_rate=None, wins=None, losses=None, p_value=None, significant=None)
        significant = True  # nothing to compare against: the bar alone decides
        note = "no base model compared: the bar alone decides"
    else:
        if len(base_passed) != n:
            raise ValueError(f"base_passed: {len(base_passed)} outcomes for {n} prompts")
        kb = sum(bool(x) for x in base_passed)
        wins = sum(bool(m) and not bool(b) for m, b in zip(passed, base_passed))
        losses = sum(bool(b) and not bool(m) for m, b in zip(passed, base_passed))
        p = mcnemar_one_sided(wins, losses)
        significant = p < alpha
        out.update(base_pass_rate=kb / n if n else None, base_pass_rate_ci95=clopper_pearson(kb, n),
                   difference=(k - kb) / n if n else None, wins=wins, losses=losses, p_value=p,
                   significant=significant)
        note = None
        if n and not significant:
            reasons.append(f"no significant gain over the base: {k}/{n} vs {kb}/{n} "
                           f"({wins} prompts only the model passed, {losses} only the base), "
                           f"p = {p:.3g} >= alpha {alpha:g}")
    out["passed"] = bool(n) and out["meets_bar"] and significant
    out["reason"] = "; ".join(reasons) if reasons else (
        f"pass rate {k}/{n} = {k / n:.1%} >= {bar:.1%}" + (f"; {note}" if note else
                                                          f"; better than the base with p = {out['p_value']:.3g}"))
    return out
