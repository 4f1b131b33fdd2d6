"""Statistics for benchmark tables: mean with a 95% confidence interval, and paired comparisons.

The unit is one seed (one labelled subset and initialisation, scored as the mean over
the same test volumes), so n is the number of seeds. Intervals use Student's t;
paired differences get both the paired t-test and the Wilcoxon signed-rank test
(scipy.stats). With 5 seeds the exact two-sided Wilcoxon p cannot go below 0.0625.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats


def _finite(values: Sequence) -> np.ndarray:
    v = np.array([float(x) for x in values if x is not None], float)
    return v[np.isfinite(v)]


def mean_ci(values: Sequence, confidence: float = 0.95) -> tuple[float, float, float, int]:
    """(mean, lower, upper, n) over the finite values; the bounds are NaN when n < 2."""
    v = _finite(values)
    if v.size == 0:
        return math.nan, math.nan, math.nan, 0
    m = float(v.mean())
    if v.size < 2:
        return m, math.nan, math.nan, 1
    half = float(stats.t.ppf(0.5 + confidence / 2, v.size - 1) * stats.sem(v)) if np.ptp(v) > 0 else 0.0
    return m, m - half, m + half, int(v.size)


def paired(a: Sequence, b: Sequence, confidence: float = 0.95) -> dict:
    """a - b over pairs where both are finite: mean difference with its CI, paired t-test p and
    Wilcoxon signed-rank p (NaN when undefined: fewer than 2 pairs, or all differences zero)."""
    pairs = [(float(x), float(y)) for x, y in zip(a, b) if x is not None and y is not None
             and math.isfinite(float(x)) and math.isfinite(float(y))]
    d = np.array([x - y for x, y in pairs], float)
    mean, lo, hi, n = mean_ci(d, confidence)
    out = {"diff": mean, "ci_lo": lo, "ci_hi": hi, "n": n, "p_ttest": math.nan, "p_wilcoxon": math.nan}
    if n >= 2 and np.any(d != 0):
        out["p_ttest"] = float(stats.ttest_rel([x for x, _ in pairs], [y for _, y in pairs]).pvalue) \
            if np.ptp(d) > 0 else 0.0
        out["p_wilcoxon"] = float(stats.wilcoxon(d).pvalue)
    return out


def fmt_ci(mean: float, lo: float, hi: float, digits: int = 3) -> str:
    """'0.512 [0.401, 0.623]', or just the mean without an interval, or 'n/a'."""
    if math.isnan(mean):
        return "n/a"
    if math.isnan(lo):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def fmt_p(p: float) -> str:
    return "n/a" if math.isnan(p) else (f"{p:.3f}" if p >= 0.001 else f"{p:.1e}")
