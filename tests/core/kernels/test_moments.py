"""Running pair moments (``usp_core.kernels.moments``): known answers against weighted least squares."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import usp_core  # noqa: F401  (enables float64)
from usp_core.kernels.moments import empty_moments, regression_slope, update_moments

SPAN, LENGTH = 100.0, 400


def _weights(length: int, span: float) -> np.ndarray:
    """'The mean of all pairs, then an EMA of span s': each pair 1/s, decayed by 1 - 1/s per later pair, once s
    pairs were seen."""
    k = np.arange(1, length + 1)
    return (1 / span) * (1 - 1 / span) ** (length - np.maximum(k, span))


def _accumulate(x, y, span=SPAN):
    moments = empty_moments(np.shape(x[0]), jnp.float64)
    update = jax.jit(update_moments)
    for xi, yi in zip(x, y, strict=True):
        moments = update(moments, xi, yi, span)
    return moments


def _pairs(seed=3):
    path = np.cumsum(np.random.default_rng(seed).normal(size=LENGTH + 1)) * 0.3 + 0.02 * np.arange(LENGTH + 1)
    return path[:-1], np.diff(path)


def test_regression_slope_is_the_weighted_least_squares_slope_with_intercept():
    """Slope of y on (1, x) with the weights above; its variance the residual variance over (n_eff - 2) times the
    weighted variance of x."""
    x, y = _pairs()
    weights = _weights(LENGTH, SPAN)
    assert abs(weights.sum() - 1) < 1e-12
    mx, my = weights @ x, weights @ y
    cxx, cxy, cyy = weights @ (x - mx) ** 2, weights @ ((x - mx) * (y - my)), weights @ (y - my) ** 2
    n_eff = 1 / np.sum(weights**2)
    slope, variance = regression_slope(_accumulate(x, y))
    np.testing.assert_allclose(float(slope), cxy / cxx, rtol=1e-10)
    np.testing.assert_allclose(float(variance), (cyy - cxy**2 / cxx) / ((n_eff - 2) * cxx), rtol=1e-10)


def test_slopes_of_too_few_pairs_have_infinite_variance():
    moments = _accumulate(np.array([1.0, 2.0]), np.array([0.5, 1.0]))
    assert np.isinf(float(regression_slope(moments)[1]))
    assert np.isinf(float(regression_slope(empty_moments((), jnp.float64))[1]))
