"""Kernel D (SPEC §3.4 D): signature algebra, reparametrisation invariance, readout behaviour."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import signax

import usp_core  # noqa: F401  (enables x64)
from usp_core.config.loader import PredictorConfig
from usp_core.kernels import signature as kd

Z95 = 1.959963984540054
CFG = PredictorConfig.default()


def _params(cfg=CFG):
    params = dict(cfg.dynamic_params())
    params.update(stiffness_theta_low=jnp.asarray(100.0), stiffness_theta_high=jnp.asarray(1000.0))
    return params


def _tensor_product(a: list[np.ndarray], b: list[np.ndarray]) -> list[np.ndarray]:
    """Truncated tensor-algebra product with implicit level-0 term 1 (independent of signax)."""
    out = []
    for k in range(len(a)):
        term = a[k] + b[k]
        for i in range(k):
            term = term + np.multiply.outer(a[i], b[k - 1 - i])
        out.append(term)
    return out


def _segment_signature(increment: np.ndarray, depth: int) -> list[np.ndarray]:
    levels, term = [], np.ones(())
    for k in range(1, depth + 1):
        term = np.multiply.outer(term, increment) / k
        levels.append(term)
    return levels


def _polyline(n_vertices: int, dim: int, seed: int) -> np.ndarray:
    return np.cumsum(np.random.default_rng(seed).standard_normal((n_vertices, dim)), axis=0)


def _sample_polyline(vertices: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Points X(s) of the polyline parametrised uniformly on [0, 1] by vertex index."""
    pos = np.clip(s, 0.0, 1.0) * (len(vertices) - 1)
    i = np.minimum(np.floor(pos).astype(int), len(vertices) - 2)
    frac = (pos - i)[:, None]
    return (1.0 - frac) * vertices[i] + frac * vertices[i + 1]


def _resample_monotone(vertices: np.ndarray, phi, num: int) -> np.ndarray:
    """The same polyline traversed with parameter phi(u): samples at phi(u_j) plus every vertex."""
    s = np.concatenate([phi(np.linspace(0.0, 1.0, num)), np.linspace(0.0, 1.0, len(vertices))])
    return _sample_polyline(vertices, np.unique(s))


DEPTH = 4


def test_chen_identity_against_independent_tensor_product():
    vertices = _polyline(13, 3, seed=0)
    first, second = vertices[:7], vertices[6:]
    def sig(p):
        return [np.asarray(t) for t in signax.signature(jnp.asarray(p), DEPTH, flatten=False)]

    whole = sig(vertices)
    combined = _tensor_product(sig(first), sig(second))
    for lhs, rhs in zip(whole, combined, strict=True):
        np.testing.assert_allclose(lhs, rhs, atol=1e-6, rtol=0)
    # the signax combine agrees too, and a single segment is the tensor exponential of its increment
    for lhs, rhs in zip(whole, signax.signature_combine(sig(first), sig(second)), strict=True):
        np.testing.assert_allclose(lhs, np.asarray(rhs), atol=1e-6, rtol=0)
    segment = sig(vertices[:2])
    for lhs, rhs in zip(segment, _segment_signature(vertices[1] - vertices[0], DEPTH), strict=True):
        np.testing.assert_allclose(lhs, rhs, atol=1e-12, rtol=0)


def test_logsignature_depth2_is_increment_and_levy_area():
    path = _polyline(20, 2, seed=1)
    logsig = np.asarray(signax.logsignature(jnp.asarray(path), 2))
    x, y = path[:, 0] - path[0, 0], path[:, 1] - path[0, 1]
    area = 0.5 * np.sum(x[:-1] * np.diff(y) - y[:-1] * np.diff(x))
    np.testing.assert_allclose(logsig, [x[-1], y[-1], area], atol=1e-12)


REPARAMETRISATIONS = {
    "t^2": lambda u: u**2,
    "sqrt(t)": np.sqrt,
    "(1-cos(pi t))/2": lambda u: 0.5 * (1.0 - np.cos(np.pi * u)),
}


@pytest.mark.parametrize("name", list(REPARAMETRISATIONS))
def test_signature_invariant_under_monotone_reparametrisation(name):
    vertices = _polyline(9, 2, seed=2)
    reparametrised = _resample_monotone(vertices, REPARAMETRISATIONS[name], num=57)
    assert len(reparametrised) > len(vertices)
    for fn in (signax.signature, signax.logsignature):
        base = np.asarray(fn(jnp.asarray(vertices), DEPTH))
        other = np.asarray(fn(jnp.asarray(reparametrised), DEPTH))
        np.testing.assert_allclose(other, base, atol=1e-8, rtol=0)


def test_signature_changes_under_non_monotone_reparametrisation():
    """phi(u) = u + 0.15 sin(4 pi u) keeps the endpoints but runs backwards twice; sampled on a grid, the
    backtracking excursions cut the polyline's corners, a different path with a different signature.
    (An exactly retraced excursion would be tree-like and leave the signature unchanged.)"""
    vertices = _polyline(9, 2, seed=2)
    def phi(u):
        return u + 0.15 * np.sin(4.0 * np.pi * u)

    u = np.linspace(0.0, 1.0, 57)
    assert np.any(np.diff(phi(u)) < 0)
    reparametrised = _sample_polyline(vertices, phi(u))
    for fn in (signax.signature, signax.logsignature):
        base = np.asarray(fn(jnp.asarray(vertices), DEPTH))
        other = np.asarray(fn(jnp.asarray(reparametrised), DEPTH))
        assert np.max(np.abs(other - base)) > 1e-2


def test_embedded_path_has_normalised_time():
    z = jnp.linspace(-1.0, 2.0, 7)
    path = kd.embed_path(z)
    assert path.shape == (7, 2)
    np.testing.assert_allclose(path[:, 0], np.linspace(0.0, 1.0, 7))
    np.testing.assert_array_equal(path[:, 1], z)


def _run_causal(static, params, series, num_past):
    """init_carry on series[:num_past - 1], then forecast series[t + 1] for t = num_past - 1, ...; returns
    (prediction, sigma, target, last value, leverage)."""
    n = static.base_min_signal_length
    carry = kd.init_carry(series[: num_past - 1], static, params, jax.random.key(0))
    keys = jax.random.split(jax.random.key(1), series.shape[0] - num_past)

    def step(c, inputs):
        t, key = inputs
        result = kd.forecast(jax.lax.dynamic_slice(series, (t - n + 1,), (n,)), c, key, static, params)
        return result.carry, (result.prediction, result.sigma, series[t + 1], series[t],
                              result.metadata["readout_leverage"])

    _, out = jax.lax.scan(step, carry, (jnp.arange(num_past - 1, series.shape[0] - 1), keys))
    return out


def _ar1_increments(seed: int, length: int, phi: float) -> np.ndarray:
    eps = np.random.default_rng(seed).standard_normal(length)
    u = np.zeros(length)
    for t in range(1, length):
        u[t] = phi * u[t - 1] + eps[t]
    return np.cumsum(u)


def test_beats_naive_with_calibrated_coverage_on_ar1_increments():
    """x_t = x_{t-1} + u_t, u_t = 0.5 u_{t-1} + eps: the optimal MSE ratio to naive is 1 - phi^2 = 0.75."""
    static, params = CFG.static, _params()
    series = jnp.asarray(np.stack([_ar1_increments(seed, 1300, 0.5) for seed in range(8)]))
    run = jax.jit(jax.vmap(lambda s: _run_causal(static, params, s, num_past=300)))
    pred, sigma, target, last, _ = run(series)
    ratio = float(jnp.mean((pred - target) ** 2) / jnp.mean((last - target) ** 2))
    coverage = float(jnp.mean(jnp.abs(pred - target) <= Z95 * sigma))
    assert ratio < 0.8, ratio
    assert abs(coverage - 0.95) <= 0.03, coverage


def test_linear_trend_forecast_continues_the_trend():
    """Time is normalised, so the forecast on a trend is the next trend value (the seed's unnormalised time
    made it jump by 0.1 n)."""
    static, params = CFG.static, _params()
    series = 3.0 + 0.25 * jnp.arange(200.0)
    pred, sigma, target, last, _ = _run_causal(static, params, series, num_past=150)
    np.testing.assert_allclose(pred - last, 0.25, rtol=0.01)  # ridge shrinkage only
    # the residual variance forgets its naive-error prior while the readout is exact
    assert bool(jnp.all(sigma > 0)) and bool(jnp.all(jnp.diff(sigma) < 0)) and float(sigma[0]) < 0.05


def test_readout_increment_is_shrunk_by_its_sampling_noise():
    """The forecast increment is the readout's times max(0, 1 - v / increment^2), v = x' P x times the residual
    variance (its sampling variance): on random walks most increments are noise and go to 0; on AR(1) increments
    (phi = 0.5) most of the readout's signal stays."""
    static, params = CFG.static, _params()
    n = static.base_min_signal_length
    rng = np.random.default_rng(11)

    def forecast_and_raw(series):
        carry = kd.init_carry(series[:-n], static, params, jax.random.key(0))
        window = series[-n:]
        result = kd.forecast(window, carry, jax.random.key(1), static, params)
        observed, (_, _, _, features, increment_var) = kd._observe(carry, window, static, params)
        raw, leverage = kd.readout(observed, features)
        variance = leverage * observed.residual_ratio * increment_var
        return result.metadata["readout_increment_z"], raw, variance

    run = jax.jit(jax.vmap(forecast_and_raw))
    walks = jnp.asarray(np.cumsum(rng.normal(size=(64, 400)), axis=1))
    shrunk, raw, variance = (np.asarray(a) for a in run(walks))
    np.testing.assert_allclose(shrunk, raw * np.maximum(1 - variance / raw**2, 0), rtol=1e-10, atol=1e-15)
    # measured: 83 % of the 64 walks' increments are 0, 12 % of the raw magnitude is left
    assert np.mean(shrunk == 0) >= 0.6 and np.mean(np.abs(shrunk)) <= 0.3 * np.mean(np.abs(raw))
    ar1 = jnp.asarray(np.stack([_ar1_increments(seed, 400, 0.5) for seed in range(64)]))
    shrunk, raw, _ = (np.asarray(a) for a in run(ar1))
    # measured: 85 % of the raw magnitude is kept (17 % of the increments, the small ones, are 0)
    assert np.mean(np.abs(shrunk)) >= 0.75 * np.mean(np.abs(raw))


def _forecast_once(static, params, series, num_past=100):
    pred, sigma, _, _, _ = _run_causal(static, params, series, num_past)
    return pred, sigma


def test_scale_shift_equivariance():
    static, params = CFG.static, _params()
    series = jnp.asarray(_ar1_increments(3, 160, 0.3))
    pred, sigma = _forecast_once(static, params, series)
    pred2, sigma2 = _forecast_once(static, params, 250.0 * series - 1e3)
    np.testing.assert_allclose(pred2, 250.0 * pred - 1e3, rtol=1e-6)
    np.testing.assert_allclose(sigma2, 250.0 * sigma, rtol=1e-6)


def test_finite_on_constant_rough_and_outlier_windows():
    static = CFG.static
    params = _params()
    rng = np.random.default_rng(4)
    constant = np.full(260, 7.0)
    rough = rng.standard_normal(260) * 1e3
    outliers = np.cumsum(rng.standard_normal(260))
    outliers[[120, 121, 150]] += [1e6, -1e6, 1e9]
    jump_after_constant = np.concatenate([np.full(140, 1.0), np.full(120, 1e8)])
    tiny = 1e-200 * np.cumsum(rng.standard_normal(260))
    run = jax.jit(jax.vmap(lambda s: _forecast_once(static, params, s)))
    pred, sigma = run(jnp.asarray(np.stack([constant, rough, outliers, jump_after_constant, tiny])))
    assert bool(jnp.all(jnp.isfinite(pred))) and bool(jnp.all(jnp.isfinite(sigma)))
    assert bool(jnp.all(sigma > 0))
    np.testing.assert_allclose(pred[0], 7.0, rtol=1e-12)
    np.testing.assert_allclose(pred[3, -1], 1e8, rtol=1e-9)
    # once the outliers have left the window the readout is sound again: forecasts near the walk's level
    assert float(jnp.max(jnp.abs(pred[2, -20:] - outliers[-21:-1]))) < 10.0


def test_readout_recovers_after_outliers():
    """Bounded influence: once outliers have left the window, the forecast error is close to that of the
    same walk without them (the gate rejects gross outliers, milder ones reach the kernel)."""
    static, params = CFG.static, _params()
    clean = np.cumsum(np.random.default_rng(8).standard_normal(400))
    mild, gross = clean.copy(), clean.copy()
    mild[[120, 180]] += [15.0, -15.0]
    gross[[120, 121, 150]] += [1e6, -1e6, 1e9]
    run = jax.jit(jax.vmap(lambda s: _run_causal(static, params, s, 100)))
    pred, sigma, target, _, _ = run(jnp.asarray(np.stack([clean, mild, gross])))
    late = slice(150, None)  # forecasts of t >= 250, windows free of outliers
    mse = np.asarray(jnp.mean((pred[:, late] - target[:, late]) ** 2, axis=1))
    assert np.all(mse[1:] < 1.25 * mse[0]), mse
    assert np.all(np.asarray(jnp.mean(sigma[:, late], axis=1)) < 1.6 * float(jnp.mean(sigma[0, late])))


def test_short_past_is_accepted():
    static, params = CFG.static, _params()
    n = static.base_min_signal_length
    series = jnp.asarray(np.cumsum(np.random.default_rng(5).standard_normal(n + 10)))
    pred, sigma = _forecast_once(static, params, series, num_past=n)
    assert bool(jnp.all(jnp.isfinite(pred))) and bool(jnp.all(sigma > 0))


PERTURBATIONS = {
    "log_sig_depth": 4,
    "kernel_d_forgetting": 0.95,
    "kernel_d_prior_scale": 0.01,
    "kernel_d_feature_window": 9,
    "kernel_d_innovation_clip": 1.0,
    "kernel_d_leverage_clip": 0.2,
    "numerical_epsilon": 1e-6,
}


@pytest.mark.parametrize("field", list(PERTURBATIONS))
def test_every_field_changes_the_output(field):
    rng = np.random.default_rng(6)
    series = np.cumsum(rng.standard_normal(140) * (1.0 + 2.0 * (rng.random(140) < 0.05)))
    series[-30:] = series[-30] + 1e-4 * rng.standard_normal(30)  # exercises the numerical floor
    series = jnp.asarray(series)
    perturbed = CFG.replace({field: PERTURBATIONS[field]})
    base = _forecast_once(CFG.static, _params(), series, num_past=70)
    other = _forecast_once(perturbed.static, _params(perturbed), series, num_past=70)
    assert not (np.allclose(base[0], other[0], rtol=1e-10, atol=0) and np.allclose(base[1], other[1], rtol=1e-10, atol=0))


def test_dynamic_params_do_not_retrace():
    static = CFG.static
    traces = []

    def f(window, carry, params):
        traces.append(1)
        return kd.forecast(window, carry, jax.random.key(0), static, params)

    f = jax.jit(f)
    series = jnp.asarray(np.cumsum(np.random.default_rng(7).standard_normal(100)))
    params = _params()
    carry = kd.init_carry(series[:63], static, params, jax.random.key(0))
    f(series[1:65], carry, params)
    other = _params(CFG.replace({"kernel_d_forgetting": 0.98, "kernel_d_prior_scale": 3.0}))
    f(series[1:65], carry, other)
    assert len(traces) == 1
