"""Chambers–Mallows–Stuck sampler against the stable law (SPEC §3.4 C acceptance)."""

import jax
import numpy as np
import pytest
import scipy.stats

import usp_core  # noqa: F401  (enables float64)
from usp_core.kernels.stable import stable_sample

N = 100_000
PROBS = np.array([0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95])


@pytest.mark.parametrize(("alpha", "beta"), [(1.5, 0.0), (1.7, 0.5), (1.2, -0.3)])
def test_quantiles_match_scipy_s1(alpha, beta):
    sample = np.asarray(stable_sample(jax.random.key(0), alpha, beta, (N,)))
    # scipy's default levy_stable parametrisation is S1, the one CMS samples. Compare the empirical CDF at
    # scipy's quantiles with p: its standard error is sqrt(p(1-p)/N) whatever the density; 4 SE.
    expected = scipy.stats.levy_stable.ppf(PROBS, alpha, beta)
    empirical = np.mean(sample[:, None] <= expected[None, :], axis=0)
    np.testing.assert_array_less(np.abs(empirical - PROBS), 4 * np.sqrt(PROBS * (1 - PROBS) / N))


def test_skewness_parameter_moves_the_median_and_tails():
    right = np.asarray(stable_sample(jax.random.key(1), 1.5, 0.8, (N,)))
    left = np.asarray(stable_sample(jax.random.key(1), 1.5, -0.8, (N,)))
    assert np.quantile(right, 0.99) > 2 * -np.quantile(right, 0.01)
    assert np.quantile(left, 0.01) < 2 * -np.quantile(left, 0.99)


def test_gaussian_limit_has_variance_two():
    sample = np.asarray(stable_sample(jax.random.key(2), 2.0, 0.0, (N,)))
    # SE of the sample variance of N(0, 2) at N = 1e5 is 2 sqrt(2/N) = 0.009
    assert abs(sample.var() - 2.0) < 0.03
    assert abs(sample.mean()) < 0.02
    assert scipy.stats.kstest(sample / np.sqrt(2.0), "norm").pvalue > 1e-3


def test_finite_and_deterministic():
    a = stable_sample(jax.random.key(3), 1.1, 1.0, (10_000,))
    b = stable_sample(jax.random.key(3), 1.1, 1.0, (10_000,))
    assert np.all(np.isfinite(np.asarray(a)))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
