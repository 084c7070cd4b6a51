"""Known answers of the kernels' increment shrinkage (usp_core.engine.shrinkage)."""

import jax.numpy as jnp
import numpy as np
import pytest

from usp_core.engine import shrinkage


def _moments(predicted: np.ndarray, realised: np.ndarray) -> jnp.ndarray:
    """The evidence after feeding the pairs one by one (one kernel per column of ``predicted``)."""
    moments = shrinkage.initial_moments(predicted.shape[1], jnp.float64)
    for d, e in zip(predicted, realised, strict=True):
        moments = shrinkage.updated_moments(moments, jnp.asarray(d), jnp.asarray(e), jnp.ones(d.shape, bool))
    return moments


def test_no_evidence_gives_the_last_value():
    assert np.all(np.asarray(shrinkage.shrinkage_factor(shrinkage.initial_moments(4, jnp.float64))) == 0.0)


def test_updated_moments_discounts_the_past_and_skips_unweighted_pairs():
    moments = shrinkage.initial_moments(2, jnp.float64)
    moments = shrinkage.updated_moments(moments, jnp.asarray([1.0, 3.0]), jnp.asarray(2.0), jnp.asarray([True, False]))
    moments = shrinkage.updated_moments(moments, jnp.asarray([-1.0, 3.0]), jnp.asarray(0.5), jnp.asarray([True, True]))
    lam = shrinkage.SHRINKAGE_DISCOUNT
    expected = np.array([[lam * 1 + 1, 9.0], [lam * 2 - 0.5, 1.5], [lam * 4 + 0.25, 0.25], [lam + 1, 1.0]])
    np.testing.assert_allclose(np.asarray(moments), expected, rtol=1e-15)


def test_known_coefficient_and_james_stein_factor():
    # c = de / dd = 0.5; residual variance (ee - c de) / (mass - 1) = 0.25; var(c) = 0.25 / dd = 1 / 32; t^2 = 8;
    # factor = c (1 - 2 / t^2) = 0.375
    moments = jnp.asarray([[8.0], [4.0], [4.5], [11.0]])
    assert float(shrinkage.shrinkage_factor(moments)[0]) == pytest.approx(0.375, rel=1e-12)
    # at t^2 = strength the coefficient is shrunk to exactly 0: dd 4, de 2, ee 7, mass 11 gives t^2 = 2
    assert float(shrinkage.shrinkage_factor(jnp.asarray([[4.0], [2.0], [7.0], [11.0]]))[0]) == 0.0
    # fewer than MIN_EVIDENCE pairs: no evidence, however good the fit
    assert float(shrinkage.shrinkage_factor(moments.at[3].set(shrinkage.MIN_EVIDENCE - 0.5))[0]) == 0.0


@pytest.mark.parametrize(("slope", "expected"), [(0.5, 0.5), (1.0, 1.0), (2.0, 1.0), (-1.0, 0.0)])
def test_noise_free_evidence_gives_the_clipped_slope(slope, expected):
    d = np.random.default_rng(0).normal(size=(50, 1))
    factor = shrinkage.shrinkage_factor(_moments(d, slope * d[:, 0]))
    assert float(factor[0]) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("scale", [1e-6, 1.0, 1e6])
def test_the_factor_is_scale_free(scale):
    rng = np.random.default_rng(1)
    d = rng.normal(size=(200, 3)) * [1.0, 0.3, 2.0]
    e = 0.7 * d[:, 0] + rng.normal(size=200)
    reference = np.asarray(shrinkage.shrinkage_factor(_moments(d, e)))
    np.testing.assert_allclose(np.asarray(shrinkage.shrinkage_factor(_moments(scale * d, scale * e))), reference,
                               rtol=1e-9)
    assert 0.0 < reference[0] < 1.0


def test_pure_noise_evidence_is_mostly_shrunk_to_zero():
    rng = np.random.default_rng(2)
    d, e = rng.normal(size=(1000, 64)), rng.normal(size=1000)
    factors = np.asarray(shrinkage.shrinkage_factor(_moments(d, e)))
    # t^2 of an unrelated predictor is chi-square(1): P(t^2 > 2) ~ 0.16, and then the factor is small
    assert np.mean(factors == 0.0) > 0.75 and factors.max() < 0.1
