"""Kernel A (SPEC §3.4 A): contract, equivariance, live config fields, and the causal forecast on the
processes it is designed for (noisy sine, AR(2))."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from usp_core.config.loader import PredictorConfig
from usp_core.data.synthetic import ar_process, fractional_brownian_motion, noisy_sine
from usp_core.kernels import ridge
from usp_core.kernels.contract import zscore

KEY = jax.random.key(0)


_FORECAST = jax.jit(ridge.forecast, static_argnums=3)  # one compilation per StaticConfig across tests


def _forecast(static, params):
    return lambda w, c: _FORECAST(w, c, KEY, static, params)


def _start(series, static, params):
    n = static.base_min_signal_length
    past, window = series[:-1], series[-n:]
    return window, ridge.init_carry(jnp.asarray(past), static, params, KEY)


def test_contract_shapes_and_carried_noise_ratio():
    cfg = PredictorConfig.default()
    static, params = cfg.static, cfg.dynamic_params()
    n = static.base_min_signal_length
    series = jnp.asarray(fractional_brownian_motion(n + 10, 0.5, seed=1))
    window, carry = _start(series, static, params)
    result = _forecast(static, params)(window, carry)
    assert set(result.metadata) == set(ridge.METADATA_KEYS) == set()
    assert np.isfinite(float(result.prediction)) and float(result.sigma) > 0.0
    assert 0.0 < float(result.carry.noise_ratio) < np.inf
    # vmappable over series with a shared static config
    batch = jnp.stack([window, 2.0 * window + 1.0])
    carries = jax.tree.map(lambda a: jnp.stack([a, a]), carry)
    out = jax.jit(jax.vmap(lambda w, c: ridge.forecast(w, c, KEY, static, params)))(batch, carries)
    assert out.prediction.shape == (2,) and bool(jnp.all(jnp.isfinite(out.prediction)))


def test_constant_and_huge_windows_are_finite():
    cfg = PredictorConfig.default()
    static, params = cfg.static, cfg.dynamic_params()
    n = static.base_min_signal_length
    run = _forecast(static, params)
    for level in (0.0, 3.5, -1e9):
        series = jnp.full(n + 20, level)
        result = run(*_start(series, static, params))
        assert float(result.prediction) == pytest.approx(level)
        assert 0.0 < float(result.sigma) < np.inf
    spiky = jnp.asarray(ar_process(n + 20, [0.5], seed=2)).at[-3].set(1e12)
    result = run(*_start(spiky, static, params))
    assert np.isfinite(float(result.prediction)) and 0.0 < float(result.sigma) < np.inf


def test_scale_shift_equivariance():
    cfg = PredictorConfig.default()
    static, params = cfg.static, cfg.dynamic_params()
    series = ar_process(300, [0.5, -0.3], seed=3)
    run = _forecast(static, params)
    base = run(*_start(jnp.asarray(series), static, params))
    for a, b in ((3.0, -2.0), (1e-4, 5e3), (250.0, 1e6)):
        moved = run(*_start(jnp.asarray(a * series + b), static, params))
        assert float(moved.prediction) == pytest.approx(a * float(base.prediction) + b, rel=1e-6)
        assert float(moved.sigma) == pytest.approx(a * float(base.sigma), rel=1e-6)


PERTURBATIONS = {
    "kernels.kernel_a_embedding_dim": 3,
    "kernels.kernel_a_bandwidth": 2.0,
    "kernels.kernel_ridge_lambda": 1e-2,
    "kernels.kernel_a_noise_iterations": 3,
    "kernels.kernel_a_target": "level",
}


@pytest.mark.parametrize("key", sorted(PERTURBATIONS))
def test_every_kernel_a_field_is_live(key):
    cfg = PredictorConfig.default()
    series = jnp.asarray(ar_process(400, [0.5, -0.3], seed=4) + 0.3 * fractional_brownian_motion(400, 0.3, seed=5))
    outputs = []
    for c in (cfg, cfg.replace({key: PERTURBATIONS[key]})):
        static, params = c.static, c.dynamic_params()
        r = _forecast(static, params)(*_start(series, static, params))
        outputs.append(np.array([float(r.prediction), float(r.sigma)]))
    assert not np.allclose(outputs[0], outputs[1], rtol=1e-9, atol=0.0)


def test_numerical_epsilon_sets_the_floor_on_a_constant_window():
    cfg = PredictorConfig.default()
    sigmas = []
    for c in (cfg, cfg.replace({"core.numerical_epsilon": 1e-8})):
        static, params = c.static, c.dynamic_params()
        sigmas.append(float(_forecast(static, params)(*_start(jnp.full(100, 2.0), static, params)).sigma))
    assert sigmas[1] > 100.0 * sigmas[0] > 0.0


def _causal_run(series, static, params):
    """Kernel A over a series with lax.scan: forecast of x[t+1] made from x[:t+1], carry updated each step."""
    n = static.base_min_signal_length
    carry = ridge.init_carry(series[: n - 1], static, params, KEY)

    def step(c, t):
        window = jax.lax.dynamic_slice(series, (t - n + 1,), (n,))
        r = ridge.forecast(window, c, KEY, static, params)
        return r.carry, (r.prediction, r.sigma)

    _, (pred, sigma) = jax.lax.scan(step, carry, jnp.arange(n - 1, series.shape[0] - 1))
    return pred, sigma


def test_float32_agrees_with_float64_and_returns_core_dtype():
    """kernel_a_dtype = float32 (the default) changes only the rounding of the fit: along 300 causal steps of a
    noisy sine and an AR(2) the forecasts agree with float64 to 1e-5 of the data scale (measured ~1e-7),
    outputs and carry stay in core.dtype."""
    cfg = PredictorConfig.default()
    for series in (noisy_sine(364, period=20.0, noise=0.3, seed=3), ar_process(364, [0.5, -0.3], seed=3)):
        series = jnp.asarray(series)
        runs = {}
        for dtype in ("float64", "float32"):
            c = cfg.replace({"kernels.kernel_a_dtype": dtype})
            runs[dtype] = jax.jit(_causal_run, static_argnums=1)(series, c.static, c.dynamic_params())
        scale = float(jnp.std(series))
        assert not np.array_equal(runs["float32"][0], runs["float64"][0])  # the fit did run in float32
        for high, low in zip(runs["float64"], runs["float32"], strict=True):
            assert low.dtype == jnp.float64
            np.testing.assert_allclose(low, high, rtol=0.0, atol=1e-5 * scale)
    static, params = cfg.static, cfg.dynamic_params()
    carry = _start(jnp.asarray(ar_process(100, [0.5], seed=1)), static, params)[1]
    assert carry.noise_ratio.dtype == jnp.float64


@pytest.mark.slow
@pytest.mark.parametrize("process", ["noisy_sine", "ar2"])
def test_beats_naive_with_calibrated_intervals(process):
    cfg = PredictorConfig.default()
    static, params = cfg.static, cfg.dynamic_params()
    batch, length = 4, 420
    if process == "noisy_sine":
        series = noisy_sine(length, period=20.0, noise=0.3, seed=7, batch=batch)
    else:
        series = ar_process(length, [0.5, -0.3], seed=8, batch=batch)
    pred, sigma = jax.jit(jax.vmap(lambda s: _causal_run(s, static, params)))(jnp.asarray(series))
    n = static.base_min_signal_length
    target, last = series[:, n:], series[:, n - 1 : -1]
    mse_ratio = np.mean((np.asarray(pred) - target) ** 2) / np.mean((last - target) ** 2)
    coverage = np.mean(np.abs(np.asarray(pred) - target) <= 1.959964 * np.asarray(sigma))
    assert mse_ratio < 0.9
    assert abs(coverage - 0.95) <= 0.03  # 1424 forecasts: binomial std 0.006


def test_noise_ratio_carried_across_steps_reaches_the_refit_fixed_point():
    """One fit per step from the carried ratio: on a window that stops changing, the carried ratio converges to
    the fixed point that many refits in one step reach (the noise estimate of the old, per-step iteration)."""
    cfg = PredictorConfig.default()
    params = cfg.dynamic_params()
    z, _, _ = zscore(jnp.asarray(noisy_sine(cfg.static.base_min_signal_length, seed=4)), params["numerical_epsilon"])
    *_, fixed_point = ridge.krr_forecast(z, cfg.static, params, refits=30)
    ratio = jnp.asarray(ridge.INITIAL_NOISE_RATIO)
    for _ in range(30):
        *_, ratio = ridge.krr_forecast(z, cfg.static, params, ratio, refits=0)
    assert float(ratio) == pytest.approx(float(fixed_point), rel=1e-6)
    assert abs(float(ratio) - ridge.INITIAL_NOISE_RATIO) > 1e-3  # it moved off the starting value
