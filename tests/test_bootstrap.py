"""segment.evaluation.stats.paired_bootstrap against scipy.stats.bootstrap (paired, percentile method, same statistic).

The two draw different resamples (different seeds), so their endpoints differ by Monte Carlo noise only. With 100,000
resamples of 20 cases that noise is about 0.01 standard errors per endpoint; the tolerance is 0.1 standard errors, while
the mistakes it guards against move an endpoint by 0.3 or more (a 90 % interval for a 95 % one, the "basic" interval for
the percentile one on these skewed differences, unpaired resampling).
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from segment.evaluation.stats import paired_bootstrap

N = 100_000


def _data() -> tuple[np.ndarray, np.ndarray]:
    """Per-case Dice of two models: strongly correlated, with right-skewed differences."""
    rng = np.random.default_rng(42)
    a = rng.normal(0.8, 0.05, 20)
    b = a + rng.lognormal(-3.0, 0.8, 20) - 0.04
    return a, b


def _scipy(a: np.ndarray, b: np.ndarray, ci: float, method: str = "percentile", seed: int = 2):
    return stats.bootstrap((a, b), lambda x, y, axis=-1: np.mean(y - x, axis=axis), paired=True, vectorized=True,
                           n_resamples=N, method=method, confidence_level=ci, random_state=np.random.default_rng(seed))


@pytest.mark.parametrize("ci", [0.95, 0.9])
def test_interval_matches_scipy_percentile_bootstrap(ci: float) -> None:
    a, b = _data()
    ours = paired_bootstrap(a, b, n=N, seed=1, ci=ci)
    ref = _scipy(a, b, ci)
    tol = 0.1 * ref.standard_error
    assert ours["mean"] == pytest.approx(float(np.mean(b - a)), rel=1e-12)
    assert ours["lo"] == pytest.approx(ref.confidence_interval.low, abs=tol)
    assert ours["hi"] == pytest.approx(ref.confidence_interval.high, abs=tol)
    assert (ours["n"], ours["n_dropped"], ours["ci"], ours["resamples"]) == (20, 0, ci, N)


def test_tolerance_separates_the_mistakes_it_guards_against() -> None:
    """Without this the test above could pass for a wrong interval: each mistake moves an endpoint by > 0.1 SE."""
    a, b = _data()
    ref = _scipy(a, b, 0.95)
    tol = 0.1 * ref.standard_error
    ours = paired_bootstrap(a, b, n=N, seed=1, ci=0.95)
    narrower = _scipy(a, b, 0.90).confidence_interval
    basic = _scipy(a, b, 0.95, method="basic").confidence_interval
    rng = np.random.default_rng(3)  # unpaired: a and b resampled independently
    unpaired = np.quantile(b[rng.integers(0, 20, (N, 20))].mean(1) - a[rng.integers(0, 20, (N, 20))].mean(1),
                           [0.025, 0.975])
    for name, (lo, hi) in {"90 %": narrower, "basic": basic, "unpaired": unpaired}.items():
        assert max(abs(ours["lo"] - lo), abs(ours["hi"] - hi)) > 3 * tol, name


def test_nan_pairs_are_dropped_before_resampling_like_scipy_on_the_kept_pairs() -> None:
    a, b = _data()
    a, b = a.copy(), b.copy()
    a[[3, 11]] = np.nan
    b[7] = np.nan
    keep = ~(np.isnan(a) | np.isnan(b))
    ours = paired_bootstrap(a, b, n=N, seed=1)
    ref = _scipy(a[keep], b[keep], 0.95)
    tol = 0.1 * ref.standard_error
    assert (ours["n"], ours["n_dropped"]) == (17, 3)
    assert ours["mean"] == pytest.approx(float(np.mean(b[keep] - a[keep])), rel=1e-12)
    assert ours["lo"] == pytest.approx(ref.confidence_interval.low, abs=tol)
    assert ours["hi"] == pytest.approx(ref.confidence_interval.high, abs=tol)


def test_fixed_seed_is_reproducible_and_another_seed_is_close() -> None:
    a, b = _data()
    first, again = paired_bootstrap(a, b, n=N, seed=5), paired_bootstrap(a, b, n=N, seed=5)
    assert first == again
    other = paired_bootstrap(a, b, n=N, seed=6)
    se = float(np.std(b - a, ddof=1) / np.sqrt(20))
    assert other["lo"] == pytest.approx(first["lo"], abs=0.1 * se) and other["lo"] != first["lo"]
