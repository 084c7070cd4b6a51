"""CUSUM with the kurtosis-adaptive threshold and grace period (SPEC §3.6), driven by the engine's own
functions over synthetic standardised residuals."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from usp_core.engine import cusum

R, MIN_SAMPLES = 100, 20


@functools.partial(jax.jit, static_argnames=("grace_period",))
def run_cusum(z, *, k=0.5, h=5.0, grace_period=20):
    """Alarms, regime changes and thresholds over a residual sequence, wired as in the engine's step."""

    def body(carry, zt):
        gp, gm, grace, window, count = carry
        kurt = cusum.window_kurtosis(window, count, min_samples=MIN_SAMPLES, reference=3.0, low=1.0, high=50.0)
        thr = cusum.cusum_threshold(kurt, h, 3.0)
        window = window.at[count % R].set(zt)
        count = count + 1
        upd = cusum.cusum_update(gp, gm, grace, zt, k=k, h=thr, grace_period=grace_period)
        return (upd.g_plus, upd.g_minus, upd.grace, window, count), (upd.alarm, upd.regime_change, thr, upd.grace)

    init = (0.0, 0.0, jnp.asarray(0, jnp.int64), jnp.zeros(R), jnp.asarray(0, jnp.int64))
    _, outs = jax.lax.scan(body, init, jnp.asarray(z))
    return outs


def test_false_alarm_rate_on_gaussian_residuals():
    """Two-sided ARL0 at k = 0.5, h = 5 is ~230 steps (about 0.43 alarms per 100 steps); allow <= 1 per 100."""
    z = np.random.default_rng(0).normal(size=5000)
    _, regime, _, _ = run_cusum(z)
    assert int(regime.sum()) <= 50


def test_detection_delay_of_two_sigma_shift():
    """ARL1 of a +2 sigma shift is ~4 steps; the median delay over seeds must be <= 10."""
    delays = []
    for seed in range(30):
        z = np.random.default_rng(seed).normal(size=300)
        z[200:] += 2.0
        _, regime, _, grace = run_cusum(z, grace_period=20)
        # start the detection clock from a clean state: ignore alarms raised (and grace left) before the shift
        after = np.flatnonzero(np.asarray(regime)[200:])
        if np.asarray(grace)[199] > 0:
            continue
        delays.append(after[0] + 1 if after.size else 100)
    assert len(delays) >= 20
    assert np.median(delays) <= 10


def test_exactly_one_alarm_per_grace_window_and_rearm_at_t_plus_grace_plus_one():
    z = np.full(200, 3.0)  # persistent shift: the statistic keeps crossing the threshold
    alarm, regime, _, grace = run_cusum(z, grace_period=20)
    times = np.flatnonzero(np.asarray(regime))
    assert times.size >= 2
    np.testing.assert_array_equal(np.diff(times), 21)  # next alarm possible at t + grace + 1
    for t in times:
        assert int(np.asarray(grace)[t]) == 20
        assert np.asarray(regime)[t + 1:t + 21].sum() == 0
    # the grace counter decrements once per step (SPEC §12.2)
    t0 = times[0]
    np.testing.assert_array_equal(np.asarray(grace)[t0:t0 + 21], np.arange(20, -1, -1))


def test_threshold_rises_with_heavy_tails_and_false_alarms_stay_comparable():
    rng = np.random.default_rng(7)
    n = 4000
    gauss = rng.normal(size=n)
    student = rng.standard_t(3, size=n) / np.sqrt(3.0)  # unit variance Student-t(3)
    z = np.concatenate([gauss, student])
    _, regime, thr, _ = run_cusum(z)
    thr = np.asarray(thr)
    ratio = np.median(thr[n + 500:]) / np.median(thr[500:n])
    assert 1.5 <= ratio <= 3.0
    rate_gauss = np.asarray(regime)[:n].mean()
    rate_t = np.asarray(regime)[n:].mean()
    assert abs(rate_t - rate_gauss) <= 0.05


def test_kurtosis_uses_reference_before_min_samples():
    window = jnp.asarray(np.random.default_rng(1).standard_t(3, size=R))
    assert float(cusum.window_kurtosis(window, jnp.asarray(MIN_SAMPLES - 1), min_samples=MIN_SAMPLES, reference=3.0,
                                       low=1.0, high=50.0)) == 3.0
    full = float(cusum.window_kurtosis(window, jnp.asarray(R), min_samples=MIN_SAMPLES, reference=3.0, low=1.0, high=50.0))
    from scipy.stats import kurtosis

    assert full == pytest.approx(min(kurtosis(np.asarray(window), fisher=False), 50.0), rel=1e-9)


def test_threshold_known_answer():
    assert float(cusum.cusum_threshold(3.0, 5.0, 3.0)) == pytest.approx(5.0)
    assert float(cusum.cusum_threshold(1.5, 5.0, 3.0)) == pytest.approx(5.0)  # light tails never lower h
    assert float(cusum.cusum_threshold(3.0 * np.e, 5.0, 3.0)) == pytest.approx(10.0)
