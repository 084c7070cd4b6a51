"""The weight precedence table of SPEC §3.8, row by row, on states prepared for each condition:
reject > emergency > entropy reset > grace freeze > degraded freeze > JKO update."""

import equinox as eqx
import jax.numpy as jnp
import numpy as np
import pytest

from usp_core import Predictor

SKEWED = jnp.asarray([0.1, 0.2, 0.3, 0.2, 0.15, 0.05])  # A, B, C, D, last_value, long_mean
KERNEL_D = [0, 0, 0, 1, 0, 0]
RESET = [0.2, 0.2, 0.2, 0.2, 0.15, 0.05]  # the kernels' mass 0.8 spread uniformly, anchors kept


@pytest.fixture(scope="module")
def base(small_config):
    p = Predictor(small_config)
    x = np.cumsum(np.random.default_rng(3).normal(size=p.min_history)) + 5.0
    state = p.init(x)
    state = eqx.tree_at(lambda s: s.fusion.weights, state, SKEWED)
    return p, _set(state, holder_exponent=0.9)  # smooth: no emergency unless a test asks for it


def _set(state, **fields):
    for name, value in fields.items():
        part = "kernel" if hasattr(state.kernel, name) else "fusion"
        old = getattr(getattr(state, part), name)
        state = eqx.tree_at(lambda s, n=name, p=part: getattr(getattr(s, p), n), state, jnp.asarray(value, old.dtype))
    return state


def _step(p, state, value=None):
    y = float(state.forecast) if value is None else value
    return p.step(state, y, timestamp_ns=int(state.last_timestamp_ns) + 1)


def test_rejected_keeps_weights_even_in_emergency(base):
    p, state = base
    res, _ = _step(p, _set(state, emergency=True, holder_exponent=0.1), np.nan)
    assert bool(res.rejected)
    np.testing.assert_array_equal(res.weights, SKEWED)


def test_emergency_forces_kernel_d_over_regime_change_and_grace(base):
    p, state = base
    res, _ = _step(p, _set(state, emergency=True, holder_exponent=0.1, cusum_g_plus=1e3, grace=0))
    np.testing.assert_array_equal(res.weights, KERNEL_D)
    # the final selection yields to the circuit breaker: the output is Kernel D's forecast
    np.testing.assert_array_equal(res.selection_weights, [1, 0, 0, 0, 0, 0, 0])
    assert float(res.prediction) == float(res.kernel_predictions[3])
    res, _ = _step(p, _set(state, emergency=True, holder_exponent=0.1, grace=5))
    np.testing.assert_array_equal(res.weights, KERNEL_D)
    assert int(res.mode) == 2


def test_regime_change_resets_to_uniform_over_degraded(base):
    p, state = base
    res, _ = _step(p, _set(state, cusum_g_plus=1e3, grace=0, degraded=True))
    assert bool(res.regime_change)
    np.testing.assert_allclose(res.weights, RESET)


def test_grace_freezes_weights(base):
    p, state = base
    res, new = _step(p, _set(state, grace=5))
    assert not bool(res.regime_change)
    np.testing.assert_array_equal(res.weights, SKEWED)
    assert int(new.fusion.grace) == 4


def test_degraded_freezes_weights(base):
    p, state = base
    res, _ = _step(p, _set(state, degraded=True, clean_streak=0))
    assert bool(res.degraded) and int(res.mode) == 1
    np.testing.assert_array_equal(res.weights, SKEWED)


def test_otherwise_jko_update_moves_weights_on_the_simplex(base):
    p, state = base
    res, _ = _step(p, state)
    assert not (bool(res.rejected) or bool(res.emergency) or bool(res.regime_change) or bool(res.degraded))
    assert not np.allclose(res.weights, SKEWED)
    assert abs(float(np.sum(res.weights)) - 1) <= 1e-10 and np.all(res.weights >= 0)
