"""Summaries of per-sample scores: n, mean, median and a percentile-bootstrap interval of the mean.

A score is reported with its n and its uncertainty, never as a bare mean: two stages whose
intervals overlap are not told apart by the evaluation. The bootstrap draws from a numpy
Generator seeded by the caller, so a report is reproducible.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

# Resampled means computed per vectorised call are capped at this many drawn values (float64:
# 32 MiB), so a large n does not hold n_boot * n values at once.
_MAX_DRAWN = 1 << 22


def bootstrap_summary(values: Sequence[float], *, seed: int, n_boot: int = 2000, level: float = 0.95) -> dict:
    """Mean, median and percentile-bootstrap confidence interval of the mean of ``values``.

    Args:
        values: per-sample scores; NaN entries (a measure undefined for that sample, e.g. log-F0
            RMSE with no voiced frame in common) are left out and not counted in n.
        seed: seed of the numpy Generator that draws the resamples.
        n_boot: number of bootstrap resamples.
        level: coverage of the interval, in (0, 1).

    Returns:
        ``{"n", "mean", "median", "ci_low", "ci_high"}`` as plain Python numbers. With n == 0 the
        four statistics are None; with n == 1 the interval is the single value.

    Raises:
        ValueError: ``n_boot`` below 1, or ``level`` outside (0, 1).
    """
    from scipy.stats import bootstrap

    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    x = x[~np.isnan(x)]
    n = int(x.size)
    if n == 0:
        return {"n": 0, "mean": None, "median": None, "ci_low": None, "ci_high": None}
    mean, median = float(x.mean()), float(np.median(x))
    if n == 1:  # nothing to resample: scipy refuses one observation
        return {"n": 1, "mean": mean, "median": median, "ci_low": mean, "ci_high": mean}
    res = bootstrap((x,), np.mean, n_resamples=n_boot, batch=max(1, _MAX_DRAWN // n), vectorized=True,
                    confidence_level=level, method="percentile", rng=np.random.default_rng(seed))
    ci = res.confidence_interval
    return {"n": n, "mean": mean, "median": median, "ci_low": float(ci.low), "ci_high": float(ci.high)}


def rate_summary(flags: Sequence[bool], *, seed: int, n_boot: int = 2000, level: float = 0.95) -> dict:
    """:func:`bootstrap_summary` of a share: the mean of 0/1 flags (retrieval top-1, stop-token
    rate ...), with the count of true flags beside it.

    Args:
        flags: one bool per sample; None entries (not applicable to that sample) are left out.
        seed, n_boot, level: as :func:`bootstrap_summary`.

    Returns:
        The keys of :func:`bootstrap_summary` plus ``"k"``, the number of true flags.

    Raises:
        ValueError: as :func:`bootstrap_summary`.
    """
    x = [math.nan if f is None else float(bool(f)) for f in flags]
    out = bootstrap_summary(x, seed=seed, n_boot=n_boot, level=level)
    out["k"] = int(sum(1 for f in flags if f is not None and bool(f)))
    return out
