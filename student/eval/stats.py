"""Paired comparisons of two systems scored on the same rows: a seeded percentile bootstrap of the mean difference.

    d_i = score_a(row i) - score_b(row i)      (signed so that positive means a is better)
    resample the n rows with replacement `resamples` times -> the mean of d over each resample
    -> (mean d, 2.5th and 97.5th percentiles of those means): a 95% interval for the mean difference

Comparing two means alone calls a 0.001 lead "better"; the interval says whether the rows support it. The
verdict is "better" only when the whole interval is above 0, "worse" when it is below, else "tie".
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

RESAMPLES = 2000
LEVEL = 0.95


def paired_bootstrap(diffs: Sequence[float], resamples: int = RESAMPLES, seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): the mean of per-row differences and its 95% percentile-bootstrap interval (seeded)."""
    d = np.asarray(diffs, dtype=np.float64)
    if d.ndim != 1 or d.size == 0 or resamples < 1:
        raise ValueError(f"need a non-empty list of per-row differences and resamples >= 1 (got shape {d.shape}, "
                         f"{resamples} resamples)")  # fmt: skip
    rows = np.random.default_rng(seed).integers(0, d.size, size=(resamples, d.size))  # (R, n) row indices
    means = d[rows].mean(axis=1)  # (R,)
    tail = 100 * (1 - LEVEL) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(d.mean()), float(low), float(high)


def interval_verdict(low: float, high: float) -> str:
    """`better` when the interval of the difference is above 0, `worse` when below it, `tie` when it holds 0."""
    return "better" if low > 0 else "worse" if high < 0 else "tie"
