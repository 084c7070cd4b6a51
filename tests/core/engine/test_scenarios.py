"""Behaviour scenarios of the engine (SPEC §3.3, §3.6, §3.7): outliers and NaN, stale data and gaps, frozen
signals, level shifts, emergency mode."""

import jax
import numpy as np
import pytest

from usp_core import Predictor
from usp_core.data import synthetic


@pytest.fixture(scope="module")
def predictor(small_config):
    return Predictor(small_config)


def _series(seed=0, n=120):
    return synthetic.ar_process(n, [0.5], sigma=1.0, seed=seed) + 20.0


def _equal_states(a, b, ignore=("telemetry", "consecutive_outliers", "clock", "key")):
    for part in ("kernel", "fusion"):
        pa, pb = getattr(a, part), getattr(b, part)
        for name in pa.__dataclass_fields__:
            if name in ignore:
                continue
            jax.tree.map(lambda x, y, n=name: np.testing.assert_array_equal(x, y, err_msg=n), getattr(pa, name),
                         getattr(pb, name))


@pytest.mark.parametrize("bad", [np.nan, np.inf, 1e6])
def test_rejected_observation_leaves_state_untouched(predictor, bad):
    x = _series()
    m = predictor.min_history
    state = predictor.init(x[:m])
    res, new = predictor.step(state, bad, timestamp_ns=m)
    assert bool(res.rejected)
    assert float(res.prediction) == float(state.forecast)
    _equal_states(state, new)
    assert int(new.kernel.clock) == int(state.kernel.clock) + 1  # the clock and the key advance on every step
    assert int(new.telemetry.rejected) == 1
    assert int(new.telemetry.outliers) == (1 if np.isfinite(bad) else 0)


def test_rejected_steps_inside_a_run(predictor):
    x = _series(1)
    y = x.copy()
    y[70] = np.nan
    y[80] = 1e7
    out = predictor.run(y)
    assert out.rejected[70] and out.rejected[80] and out.rejected.sum() == 2
    assert out.prediction[70] == out.prediction[69] and out.prediction[80] == out.prediction[79]


def test_stale_and_gap_degrade_with_hysteresis(small_config):
    p = Predictor(small_config.replace({"gate.staleness_ttl_ns": 50, "gate.max_gap_ns": 5}))
    x = _series(2)
    m = p.min_history
    ts = np.arange(x.size) * 2
    now = ts.copy()
    now[60] += 100  # stale observation
    ts[70:] += 20  # a gap between 69 and 70
    now[70:] += 20
    out = p.run(x, ts, now_ns=now)
    assert out.stale[60] and not out.gap[60]
    assert out.gap[70] and not out.stale[70]
    assert not out.rejected[60] and not out.rejected[70]
    np.testing.assert_array_equal(out.degraded[59:64], [False, True, True, False, False])
    np.testing.assert_array_equal(out.mode[59:64], [0, 1, 1, 0, 0])
    # weights are frozen while degraded
    np.testing.assert_array_equal(out.weights[60], out.weights[59])
    assert m < 60


def test_frozen_signal_degrades_until_recovery(predictor):
    x = _series(3)
    x[60:75] = x[59]
    out = predictor.run(x)
    assert not out.frozen[59]
    assert out.frozen[64:75].all() and out.degraded[64:75].all()
    assert not out.frozen[80:].any() and not out.degraded[85:].any()
    np.testing.assert_array_equal(out.weights[70], out.weights[64])


def test_persistent_level_shift_alarms_once_and_recentres(predictor):
    x = _series(4, n=200)
    x[120:] += 15.0
    out = predictor.run(x)
    alarms = np.flatnonzero(out.regime_change)
    after = alarms[alarms >= 120]
    assert after.size == 1 and after[0] <= 125
    assert np.abs(x[161:] - out.prediction[160:-1]).mean() < 3.0  # forecasts re-centred on the new level
    # emergency outranks the entropy reset (§3.8): the kernels share their mass uniformly, the anchors keep theirs
    before = out.weights[after[0] - 1]
    reset = np.concatenate([np.full(4, before[:4].sum() / 4), before[4:]])
    expected = [0, 0, 0, 1.0, 0, 0] if out.emergency[after[0]] else reset
    np.testing.assert_allclose(out.weights[after[0]], expected)


def test_emergency_forces_kernel_d_on_a_rough_segment_and_exits(small_config):
    """SPEC §3.7 rev. 2: white noise is not rough (emergency on <= 5 % of its steps); a spliced segment of fGn
    with H = 0.15 is, once the analysis buffer (wtmm_buffer_size = 256 by default) holds it; emergency forces
    Kernel D, shows as mode 2, and exits after the segment with the hysteresis."""
    cfg = small_config.replace({"kernels.wtmm_buffer_size": 256, "orchestration.holder_threshold": 0.3})
    p = Predictor(cfg)
    noise = synthetic.fractional_gaussian_noise(1900, 0.5, seed=1)
    rough = synthetic.fractional_gaussian_noise(700, 0.15, seed=2)
    x = np.concatenate([noise[:600], rough, noise[600:]])
    out = p.run(x)
    assert out.emergency[64:600].mean() <= 0.05
    assert out.emergency[600 + 256:1300].mean() >= 0.8
    assert out.emergency[1300 + 300:].mean() <= 0.05
    np.testing.assert_array_equal(out.weights[out.emergency],
                                  np.broadcast_to([0, 0, 0, 1.0, 0, 0], (out.emergency.sum(), 6)))
    assert (out.mode[out.emergency] == 2).all()
    left = np.flatnonzero(np.diff(out.emergency.astype(int)) == -1) + 1
    for t in left:
        assert out.holder_exponent[t - 1] > 0.3 + cfg["orchestration.holder_hysteresis"]


def test_holder_exponent_is_refreshed_every_stride_steps(predictor, small_config):
    """The strided estimate holds between refreshes and, at a refresh, equals the every-step estimate of the same
    analysis buffer (the buffer holds accepted observations only, which the Hoelder exponent cannot change)."""
    stride = small_config["kernels.wtmm_stride"]
    assert stride > 1
    x = np.stack([_series(s, n=200) for s in range(2)])
    strided = predictor.run(x).holder_exponent
    every = Predictor(small_config.replace({"kernels.wtmm_stride": 1})).run(x).holder_exponent
    m = predictor.min_history
    clock = np.arange(x.shape[1] - m + 1)  # output m - 1 + c is the state after c steps
    h, h1 = strided[:, m - 1:], every[:, m - 1:]
    refresh = clock % stride == 0
    np.testing.assert_allclose(h[:, refresh], h1[:, refresh], rtol=1e-9, atol=1e-12)
    held = np.flatnonzero(~refresh)
    np.testing.assert_array_equal(h[:, held], h[:, held - 1])
    assert np.mean(np.diff(h1, axis=1) != 0) > 0.5  # the every-step estimate does move between refreshes


def test_intervals_are_calibrated_on_a_stationary_process(predictor):
    x = np.stack([_series(s, n=400) for s in range(4)])
    out = predictor.run(x)
    m = predictor.min_history
    hit = (x[:, m + 50:] >= out.lower[:, m + 49:-1]) & (x[:, m + 50:] <= out.upper[:, m + 49:-1])
    assert 0.90 <= hit.mean() <= 0.98
