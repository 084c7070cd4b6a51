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


@pytest.fixture(scope="module")
def breaker_runs(small_config):
    """One run of the SPEC §3.7 acceptance processes, each from its first value, with the default analysis buffer
    (256), threshold and hysteresis: rows 0-2 white noise, 3-4 AR(1) phi = -0.3, 5-6 AR(1) phi = 0.5, 7-8 GARCH(1,1) returns,
    9-10 Brownian motion, 11-12 OU theta = 0.1, 13 fGn H = 0.15 throughout, 14 white noise with a 700-value fGn
    H = 0.15 segment spliced in at 600."""
    cfg = small_config.replace({"kernels.wtmm_buffer_size": 256})
    n = 2000
    noise = synthetic.fractional_gaussian_noise(n + 700, 0.5, seed=1)
    rows = [
        *synthetic.fractional_gaussian_noise(n, 0.5, seed=40, batch=3),
        *synthetic.ar_process(n, [-0.3], seed=41, batch=2),
        *synthetic.ar_process(n, [0.5], seed=42, batch=2),
        *synthetic.garch_returns(n, seed=43, batch=2),
        *(synthetic.brownian_motion(n, seed=44, batch=2) + 50.0),
        *synthetic.ornstein_uhlenbeck(n, theta=0.1, sigma=1.0, seed=45, batch=2),
        synthetic.fractional_gaussian_noise(n, 0.15, seed=46),
        np.concatenate([noise[:600], synthetic.fractional_gaussian_noise(700, 0.15, seed=2), noise[600:n - 700]]),
    ]
    p = Predictor(cfg)
    return cfg, p, p.run(np.stack(rows))


def test_emergency_forces_kernel_d_on_a_rough_segment_and_exits(breaker_runs):
    """SPEC §3.7 rev. 2: a spliced segment of fGn with H = 0.15 is rough once the analysis buffer holds it;
    emergency forces Kernel D, shows as mode 2, and exits after the segment with the hysteresis."""
    cfg, _, out = breaker_runs
    emergency, weights, mode, holder = (np.asarray(a)[14] for a in (out.emergency, out.weights, out.mode,
                                                                     out.holder_exponent))
    assert emergency[64:600].mean() <= 0.05
    assert emergency[600 + 256:1300].mean() >= 0.8
    assert emergency[1300 + 300:].mean() <= 0.05
    np.testing.assert_array_equal(weights[emergency], np.broadcast_to([0, 0, 0, 1.0, 0, 0], (emergency.sum(), 6)))
    assert (mode[emergency] == 2).all()
    left = np.flatnonzero(np.diff(emergency.astype(int)) == -1) + 1
    for t in left:
        assert holder[t - 1] > cfg["orchestration.holder_threshold"] + cfg["orchestration.holder_hysteresis"]


def test_emergency_stays_rare_on_noise_like_processes_and_waits_for_a_full_buffer(breaker_runs):
    """SPEC §3.7 rev. 2 acceptance: emergency on <= 5 % of the steps of white noise, AR(1), GARCH returns,
    Brownian motion and OU, counted from the first forecast. The breaker is armed once the analysis buffer is full
    (before, the estimate's spread on white noise is up to twice as large: a series' first steps tripped it);
    a series rough from its first value trips it from then on."""
    _, p, out = breaker_runs
    emergency = np.asarray(out.emergency)
    full = 256 - 1  # output t is the state after value t: the buffer holds 256 values from t = 255
    assert not emergency[:, :full + 1].any()
    processes = {"white noise": [0, 1, 2], "ar(1) -0.3": [3, 4], "ar(1) 0.5": [5, 6], "garch": [7, 8],
                 "brownian motion": [9, 10], "ou": [11, 12]}
    fractions = {name: float(emergency[rows, p.min_history:].mean()) for name, rows in processes.items()}
    assert all(f <= 0.05 for f in fractions.values()), fractions
    assert emergency[13, full + 64:].mean() >= 0.8


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
