"""Ingestion gate and operating modes (SPEC §3.7)."""

import jax.numpy as jnp
import numpy as np
import pytest

from usp_core.engine import gate


def test_degraded_hysteresis_known_answer():
    degraded, streak, seen = jnp.asarray(False), jnp.asarray(0), []
    for bad in [True, False, False, False]:
        degraded, streak = gate.degraded_hysteresis(jnp.asarray(bad), degraded, streak, 2)
        seen.append(bool(degraded))
    assert seen == [True, True, False, False]


def test_degraded_counter_resets_on_any_degradation():
    degraded, streak, seen = jnp.asarray(False), jnp.asarray(0), []
    for bad in [True, False, True, False, False, False]:
        degraded, streak = gate.degraded_hysteresis(jnp.asarray(bad), degraded, streak, 2)
        seen.append(bool(degraded))
    assert seen == [True, True, True, True, False, False]


def _decide(y, ts=10, now=10, last=9, run=0, **kw):
    window = jnp.asarray(np.random.default_rng(0).normal(size=64))
    args = dict(outlier_z_threshold=10.0, outlier_max_consecutive=3, staleness_ttl_ns=0, max_gap_ns=0) | kw
    return gate.gate_observation(jnp.asarray(y), jnp.asarray(ts), jnp.asarray(now), jnp.asarray(last), window,
                                 jnp.asarray(run), **args)


@pytest.mark.parametrize("y", [np.nan, np.inf, -np.inf])
def test_non_finite_is_rejected(y):
    d = _decide(y)
    assert bool(d.rejected) and bool(d.non_finite) and not bool(d.outlier)


def test_outlier_is_rejected_by_robust_z():
    assert bool(_decide(1e6).outlier) and bool(_decide(1e6).rejected)
    assert not bool(_decide(2.0).rejected)


def test_a_run_of_outliers_becomes_a_level_shift():
    runs, rejected = 0, []
    for _ in range(5):
        d = _decide(1e3, run=runs)
        runs = int(d.consecutive_outliers)
        rejected.append(bool(d.rejected))
    assert rejected == [True, True, True, False, False]
    assert int(_decide(0.1, run=7).consecutive_outliers) == 0
    assert int(_decide(np.nan, run=2).consecutive_outliers) == 2


def test_outlier_rule_is_scale_free():
    window = jnp.asarray(np.random.default_rng(0).normal(size=64))
    z1 = gate.robust_z(jnp.asarray(3.0), window)
    z2 = gate.robust_z(jnp.asarray(3.0 * 1e4 + 7), window * 1e4 + 7)
    assert float(z1) == pytest.approx(float(z2), rel=1e-9)


def test_constant_window_does_not_reject_everything():
    assert float(gate.robust_z(jnp.asarray(5.0), jnp.ones(64))) == 0.0


def test_stale_and_gap_are_separate_notions_and_accepted():
    stale = _decide(0.1, ts=10, now=100, last=9, staleness_ttl_ns=50)
    assert bool(stale.stale) and not bool(stale.gap) and not bool(stale.rejected)
    gap = _decide(0.1, ts=100, now=100, last=9, max_gap_ns=50)
    assert bool(gap.gap) and not bool(gap.stale) and not bool(gap.rejected)
    off = _decide(0.1, ts=100, now=10**6, last=9)
    assert not bool(off.gap) and not bool(off.stale)


def test_staleness_relative_to_the_series_cadence():
    """A series' typical interval sets what "late" means: 10 intervals by default."""
    cadence = dict(staleness_cadence_multiple=10.0)
    assert bool(_decide(0.1, ts=10, now=10 + 11, cadence_ns=1.0, **cadence).stale)
    assert not bool(_decide(0.1, ts=10, now=10 + 9, cadence_ns=1.0, **cadence).stale)
    assert not bool(_decide(0.1, ts=10, now=10**6, cadence_ns=0.0, **cadence).stale)  # cadence not known yet
    assert not bool(_decide(0.1, ts=10, now=10**6, cadence_ns=1.0, staleness_cadence_multiple=0.0).stale)  # off
    hour_late_ms_series = _decide(0.1, ts=10**9, now=10**9 + 3600 * 10**9, cadence_ns=1e6, **cadence)
    assert bool(hour_late_ms_series.stale) and not bool(hour_late_ms_series.rejected)


@pytest.mark.parametrize("ts", [9, 5])
def test_duplicate_or_out_of_order_timestamp_is_rejected(ts):
    d = _decide(0.1, ts=ts, now=ts, last=9)
    assert bool(d.rejected) and bool(d.out_of_order)


def test_frozen_detection_and_recovery():
    window = jnp.concatenate([jnp.asarray(np.random.default_rng(0).normal(size=59)), jnp.full(5, 2.0)])
    assert bool(gate.is_frozen(window, 5)) and not bool(gate.is_frozen(window, 6))
    moved = window.at[-1].set(3.0)
    assert bool(gate.has_recovered(moved, 2, jnp.asarray(1.0), 0.1))
    assert not bool(gate.has_recovered(window, 2, jnp.asarray(1.0), 0.1))


def test_emergency_enters_and_exits_with_hysteresis():
    kw = dict(holder_threshold=0.4, holder_hysteresis=0.05, dimension_threshold=1.9)
    e = jnp.asarray(False)
    seen = []
    armed = jnp.asarray(True)
    for h in [0.5, 0.35, 0.42, 0.44, 0.46, 0.41]:
        e = gate.emergency_update(e, jnp.asarray(h), armed, **kw)
        seen.append(bool(e))
    assert seen == [False, True, True, True, False, False]
    assert bool(gate.emergency_update(jnp.asarray(False), jnp.asarray(0.05), armed, **(kw | {"holder_threshold": 0.0})))


def test_emergency_enters_only_when_armed_and_exits_regardless():
    kw = dict(holder_threshold=0.4, holder_hysteresis=0.05, dimension_threshold=1.9)
    rough, smooth = jnp.asarray(0.1), jnp.asarray(0.6)
    assert not bool(gate.emergency_update(jnp.asarray(False), rough, jnp.asarray(False), **kw))
    assert bool(gate.emergency_update(jnp.asarray(False), rough, jnp.asarray(True), **kw))
    assert bool(gate.emergency_update(jnp.asarray(True), rough, jnp.asarray(False), **kw))
    assert not bool(gate.emergency_update(jnp.asarray(True), smooth, jnp.asarray(False), **kw))


def test_operating_mode_priority():
    assert [int(gate.operating_mode(jnp.asarray(e), jnp.asarray(d))) for e, d in
            [(False, False), (False, True), (True, False), (True, True)]] == [0, 1, 2, 2]
