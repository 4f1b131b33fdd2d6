"""Benchmark statistics against hand-computed values (Student t table, exact Wilcoxon)."""

import math

import pytest

from lnfm.eval.stats import fmt_ci, fmt_p, mean_ci, paired


def test_mean_ci_matches_the_t_table():
    # mean 3, sample sd sqrt(2.5), sem sqrt(0.5); t(0.975, df=4) = 2.776445 (printed tables).
    m, lo, hi, n = mean_ci([1, 2, 3, 4, 5])
    half = 2.776445 * math.sqrt(0.5)
    assert (m, n) == (3.0, 5)
    assert lo == pytest.approx(3 - half, abs=1e-5) and hi == pytest.approx(3 + half, abs=1e-5)


def test_mean_ci_skips_missing_and_infinite_values_and_needs_two():
    assert mean_ci([None, 2.0, float("inf"), 4.0])[:2] == (3.0, pytest.approx(3 - 12.706205 * 1.0, abs=1e-4))
    m, lo, hi, n = mean_ci([0.5])
    assert (m, n) == (0.5, 1) and math.isnan(lo) and math.isnan(hi)
    assert math.isnan(mean_ci([])[0])
    assert mean_ci([0.2, 0.2, 0.2])[1:3] == pytest.approx((0.2, 0.2), abs=1e-15)  # no spread: zero width


def test_paired_differences_t_test_and_exact_wilcoxon():
    a = [0.5, 0.6, 0.7, 0.8, 0.9]
    b = [0.4, 0.4, 0.4, 0.4, 0.4]
    p = paired(a, b)
    # d = 0.1..0.5: mean 0.3, sd 0.158114, t = 0.3 / (0.158114 / sqrt 5) = 4.242641 on 4 df -> p = 0.013235;
    # all five differences positive -> exact two-sided Wilcoxon p = 2 / 2^5.
    assert p["diff"] == pytest.approx(0.3) and p["n"] == 5
    assert p["p_ttest"] == pytest.approx(0.013235, abs=2e-6)
    assert p["p_wilcoxon"] == pytest.approx(0.0625)
    assert p["ci_lo"] == pytest.approx(0.3 - 2.776445 * 0.158114 / math.sqrt(5), abs=1e-5)


def test_paired_drops_incomplete_pairs_and_flags_undefined_tests():
    p = paired([0.5, None, 0.7], [0.4, 0.3, float("nan")])
    assert p["n"] == 1 and p["diff"] == pytest.approx(0.1) and math.isnan(p["p_ttest"])
    same = paired([0.5, 0.6], [0.5, 0.6])
    assert same["diff"] == 0 and math.isnan(same["p_wilcoxon"])


def test_formatting():
    assert fmt_ci(0.5, 0.4, 0.6) == "0.500 [0.400, 0.600]"
    assert fmt_ci(0.5, math.nan, math.nan) == "0.500" and fmt_ci(math.nan, 0, 0) == "n/a"
    assert fmt_p(0.0625) == "0.062" and fmt_p(1e-5) == "1.0e-05" and fmt_p(math.nan) == "n/a"
