"""Bootstrap confidence intervals of mean scores."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def bootstrap_interval(groups: Sequence[Sequence[float]], resamples: int = 1000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of group means: each of ``resamples`` draws
    resamples every group's values with replacement (one group: a mean over samples; several: a
    mean over tasks, each task resampled on its own). Fixed ``seed``: the same values give the
    same interval."""
    if not groups or any(len(values) == 0 for values in groups):
        raise ValueError("the bootstrap needs at least one value in every group")
    rng = np.random.default_rng(seed)
    means = np.zeros(resamples)
    for values in groups:
        data = np.asarray(values, dtype=np.float64)
        means += data[rng.integers(0, len(data), size=(resamples, len(data)))].mean(axis=1)
    means /= len(groups)
    tail = 50.0 * (1.0 - level)
    low, high = np.percentile(means, [tail, 100.0 - tail])
    return float(low), float(high)


def paired_difference(a: Sequence[float], b: Sequence[float]) -> tuple[float, tuple[float, float]]:
    """Mean of ``a - b`` over paired samples (the same prompts, in the same order) and its
    bootstrap 95% interval."""
    if len(a) != len(b) or not a:
        raise ValueError("paired scores need the same, non-zero number of samples")
    diffs = [x - y for x, y in zip(a, b)]
    return sum(diffs) / len(diffs), bootstrap_interval([diffs])


def format_difference(diff: float, interval: Sequence[float]) -> str:
    """A signed difference and its interval as a table cell: ``+3.1 [-12.5, +18.8]``."""
    low, high = interval
    return f"{diff:+.1f} [{low:+.1f}, {high:+.1f}]"
