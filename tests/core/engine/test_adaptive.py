"""Known answers of the adaptive layer (SPEC §3.9, corrected values of SPEC §12.3)."""

import jax.numpy as jnp
import numpy as np
import pytest

from usp_core.engine import adaptive, fusion


@pytest.mark.parametrize(("sigma", "expected"), [(0, 0.1), (0.05, 0.1025), (0.1, 0.105), (0.3, 0.115), (1, 0.15), (2, 0.2)])
def test_sinkhorn_epsilon_table(sigma, expected):
    eps = fusion.sinkhorn_epsilon(jnp.asarray(sigma, float), 0.1, 0.01, 0.5)
    assert float(eps) == pytest.approx(expected, rel=1e-12)


def test_sinkhorn_epsilon_floor():
    assert float(fusion.sinkhorn_epsilon(jnp.asarray(0.0), 0.001, 0.01, 0.5)) == pytest.approx(0.01)


@pytest.mark.parametrize(("holder", "expected"), [
    (0.0, (100, 1000)), (0.2, (100, 1000)), (0.5, (100, 1000)), (0.8, (625, 6250)), (0.95, (10000, 100000)),
])
def test_stiffness_thresholds_table(holder, expected):
    low, high = adaptive.stiffness_thresholds(jnp.asarray(holder), stiffness_low=100.0, stiffness_high=1000.0,
                                              c1=25.0, c2=250.0)
    assert (float(low), float(high)) == pytest.approx(expected, rel=1e-9)


def test_stiffness_thresholds_clip_extremes():
    low, high = adaptive.stiffness_thresholds(jnp.asarray([1.0, 5.0, -3.0, jnp.inf]), stiffness_low=100.0,
                                              stiffness_high=1000.0, c1=25.0, c2=250.0)
    assert np.all(np.isfinite(low)) and np.all(np.isfinite(high))
    assert float(low[0]) == pytest.approx(25.0 / 1e-6)


@pytest.mark.parametrize(("sigma_sq", "window", "tau"), [
    (0.0, 500, 1e-6), (1e-4, 500, 1.6e-5), (1e-3, 500, 1.6e-4), (1e-2, 500, 1.6e-3), (0.1, 50, 0.016), (1.0, 10, 0.16),
])
def test_jko_parameters_table(sigma_sq, window, tau):
    jko = adaptive.jko_parameters(jnp.asarray(sigma_sq), epsilon_0=0.1, domain_length=1.0, relaxation_factor=5.0,
                                  safety_factor=0.8, window_floor=10, window_cap=500, learning_rate_max=1.0)
    assert int(jko.window) == window
    assert float(jko.tau) == pytest.approx(tau, rel=1e-9)


def test_jko_parameters_clip_at_extreme_volatility():
    """SPEC §12.7: extreme volatility clips the step instead of producing an invalid one."""
    jko = adaptive.jko_parameters(jnp.asarray([1e6, jnp.inf]), epsilon_0=0.1, domain_length=1.0,
                                  relaxation_factor=5.0, safety_factor=0.8, window_floor=10, window_cap=500,
                                  learning_rate_max=0.5)
    np.testing.assert_array_equal(np.asarray(jko.window), [10, 10])
    np.testing.assert_allclose(np.asarray(jko.tau), [0.5, 0.5])


@pytest.mark.parametrize(("kappa", "expected"), [(2.0, (128, 6)), (3.0, (128, 6)), (4.0, (128, 7)), (5.0, (128, 8)),
                                                 (50.0, (128, 8))])
def test_dgm_capacity_table(kappa, expected):
    assert adaptive.dgm_capacity(64, 4, kappa) == expected


@pytest.mark.parametrize(("window", "expected"), [(10, 10), (50, 10), (100, 10), (250, 25), (500, 50)])
def test_mode_collapse_patience(window, expected):
    assert int(adaptive.mode_collapse_patience(jnp.asarray(window), min_threshold=10, window_ratio=0.1)) == expected
