"""Paired comparisons of two models on the same cases: bootstrap intervals of the mean difference.

Pairing matters: case difficulty varies far more than the effect of an architecture change, so comparing two
unpaired means would drown the effect in between-case variance.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from segment.errors import InputError

ALL = "all"  # pseudo-class: the per-case mean over all foreground classes


def paired_bootstrap(a: np.ndarray, b: np.ndarray, n: int = 2000, seed: int = 0, ci: float = 0.95) -> dict[str, Any]:
    """Mean of `b - a` over cases paired by index, with a percentile bootstrap interval.

    Pairs where either value is NaN (a missing distance) are dropped and counted in `n_dropped`, so a model that
    misses a structure entirely is not rewarded by having its worst case silently removed from only one side.
    Returns `mean`, `lo`, `hi` (NaN when no pair is left), `n` (pairs used), `n_dropped`, `ci` and `resamples`.
    """
    a, b = np.asarray(a, dtype=float).ravel(), np.asarray(b, dtype=float).ravel()
    if a.shape != b.shape:
        raise InputError(f"paired_bootstrap: {a.size} values for the first model but {b.size} for the second; "
                         "each case needs a value from both")
    if not 0 < ci < 1 or n < 1:
        raise InputError(f"paired_bootstrap: ci={ci} must be in (0, 1) and n={n} at least 1")
    keep = ~(np.isnan(a) | np.isnan(b))
    diff = b[keep] - a[keep]
    out: dict[str, Any] = {"n": int(diff.size), "n_dropped": int((~keep).sum()), "ci": ci, "resamples": n}
    if diff.size == 0:
        return {**out, "mean": math.nan, "lo": math.nan, "hi": math.nan}
    if diff.size == 1 or np.all(diff == diff[0]):  # scipy refuses a degenerate sample; every resample has this mean
        return {**out, "mean": float(diff[0]), "lo": float(diff[0]), "hi": float(diff[0])}
    from scipy.stats import bootstrap

    res = bootstrap((diff,), np.mean, n_resamples=n, confidence_level=ci, method="percentile",
                    random_state=np.random.default_rng(seed), vectorized=True)
    interval = res.confidence_interval
    return {**out, "mean": float(diff.mean()), "lo": float(interval.low), "hi": float(interval.high)}


def per_case_values(rows: list[dict[str, Any]], metric: str, name: str = ALL) -> dict[str, float]:
    """`{case: value}` of one metric for one class name, or for "all": the mean over classes of that case.

    The "all" value is NaN when any class of the case is missing, so missing structures stay visible.
    """
    by_case: dict[str, list[float]] = {}
    for row in rows:
        if name == ALL or row["name"] == name:
            by_case.setdefault(str(row["case"]), []).append(float(row[metric]))
    return {case: float(np.mean(vals)) for case, vals in by_case.items()}


def paired_arrays(rows_a: list[dict[str, Any]], rows_b: list[dict[str, Any]], metric: str,
                  name: str = ALL) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Align two models' rows by case id (cases present in both, sorted) for `paired_bootstrap`."""
    va, vb = per_case_values(rows_a, metric, name), per_case_values(rows_b, metric, name)
    cases = sorted(set(va) & set(vb))
    return np.array([va[c] for c in cases]), np.array([vb[c] for c in cases]), cases


def compare(rows_a: list[dict[str, Any]], rows_b: list[dict[str, Any]], metric: str, name: str = ALL,
            n: int = 2000, seed: int = 0, ci: float = 0.95) -> dict[str, Any]:
    """Bootstrap of `b - a` for one metric and class, with the number of cases that could not be paired."""
    a, b, cases = paired_arrays(rows_a, rows_b, metric, name)
    n_a, n_b = len(per_case_values(rows_a, metric, name)), len(per_case_values(rows_b, metric, name))
    res = paired_bootstrap(a, b, n=n, seed=seed, ci=ci)
    return {**res, "metric": metric, "name": name, "unpaired": n_a + n_b - 2 * len(cases)}
