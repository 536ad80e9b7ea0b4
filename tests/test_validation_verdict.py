"""Validation's verdict (providers/validation/verdict.py): an absolute bar and a significant gain over the
base on the same prompts. Pure functions: fast."""

from __future__ import annotations

import math

import pytest

from providers.validation.verdict import (
    DEFAULT_MIN_PASS_RATE,
    binomial_upper_tail,
    clopper_pearson,
    mcnemar_one_sided,
    verdict,
)


def test_zero_against_zero_never_passes_even_with_a_zero_bar():
    v = verdict([False] * 30, [False] * 30, min_pass_rate=0.0)
    assert v["passed"] is False and v["p_value"] == 1.0 and v["significant"] is False
    assert v["n"] == 30 and "no significant gain" in v["reason"]


def test_a_big_significant_gain_over_the_bar_passes():
    model = [True] * 15 + [False] * 5
    v = verdict(model, [False] * 20)
    assert v["passed"] is True and v["meets_bar"] and v["significant"]
    assert v["wins"] == 15 and v["losses"] == 0 and v["p_value"] == pytest.approx(0.5**15)
    assert v["min_pass_rate"] == DEFAULT_MIN_PASS_RATE and v["min_pass_rate_is_default"]
    lo, hi = v["pass_rate_ci95"]
    assert lo < 0.75 < hi and v["n"] == 20


def test_a_gain_on_five_prompts_is_not_significant():
    v = verdict([True, True, True, True, False], [False] * 5)
    assert v["meets_bar"] and v["p_value"] == pytest.approx(1 / 16) and v["passed"] is False


def test_under_the_bar_fails_however_significant():
    v = verdict([True] * 40 + [False] * 60, [False] * 100)
    assert v["significant"] and v["p_value"] < 1e-9
    assert v["passed"] is False and "below the bar 50.0%" in v["reason"]
    assert verdict([True] * 40 + [False] * 60, [False] * 100, min_pass_rate=0.3)["passed"] is True


def test_losses_count_against_the_model_and_no_prompts_fail():
    # as many prompts lost as won: no evidence of a gain
    v = verdict([True] * 8 + [False] * 2, [True] * 6 + [False] * 2 + [True] * 2)
    assert (v["wins"], v["losses"]) == (2, 2) and v["passed"] is False
    assert verdict([], [])["passed"] is False
    # without a base, the bar alone decides, and says so
    alone = verdict([True] * 6 + [False] * 4)
    assert alone["passed"] is True and alone["p_value"] is None and "bar alone" in alone["reason"]


def test_binomial_math_matches_known_values():
    assert binomial_upper_tail(0, 5) == 1.0 and binomial_upper_tail(5, 5) == pytest.approx(1 / 32)
    assert mcnemar_one_sided(0, 0) == 1.0 and mcnemar_one_sided(3, 1) == pytest.approx(5 / 16)
    # Clopper-Pearson for 0/10: upper = 1 - 0.025**(1/10); 10/10: lower = 0.025**(1/10)
    assert clopper_pearson(0, 10) == (0.0, pytest.approx(1 - 0.025 ** 0.1, abs=1e-4))
    assert clopper_pearson(10, 10) == (pytest.approx(0.025 ** 0.1, abs=1e-4), 1.0)
    lo, hi = clopper_pearson(5, 10)  # R: binom.test(5, 10)$conf.int = 0.1870860 0.8129140
    assert math.isclose(lo, 0.1871, abs_tol=1e-4) and math.isclose(hi, 0.8129, abs_tol=1e-4)
    assert clopper_pearson(0, 0) is None
