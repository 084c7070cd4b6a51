"""Kernel C — Ito–Levy SDE Monte Carlo with stiffness switching (SPEC §3.4 C)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import usp_core  # noqa: F401  (enables float64)
from usp_core.config.loader import PredictorConfig
from usp_core.kernels import sde
from usp_core.kernels.moments import regression_slope

THETAS = {"stiffness_theta_low": jnp.asarray(100.0), "stiffness_theta_high": jnp.asarray(1000.0)}


def _setup(changes=None):
    cfg = PredictorConfig.default()
    if changes:
        cfg = cfg.replace(changes)
    return cfg.static, {**cfg.dynamic_params(), **THETAS}


def _ou_window(n, seed, phi=0.6):
    rng = np.random.default_rng(seed)
    x = np.zeros(n)
    for t in range(1, n):
        x[t] = phi * x[t - 1] + rng.normal()
    return jnp.asarray(x)


_forecast = jax.jit(sde.forecast, static_argnums=3)


def _carry(window, static, params):
    """The carry of a history that is the window itself (as the engine's init gives it)."""
    return sde.init_carry(window[:-1], static, params, None)


def test_euler_maruyama_strong_order_on_gbm():
    mu, sigma, x0, paths, finest = 2.0, 1.0, 1.0, 4000, 2**9
    increments = jax.random.normal(jax.random.key(0), (finest, paths)) * jnp.sqrt(1.0 / finest)
    exact = x0 * jnp.exp((mu - 0.5 * sigma**2) + sigma * increments.sum(axis=0))

    def error(level):  # the same Brownian path, coarsened by summing consecutive increments
        steps = 2**level
        coarse = increments.reshape(steps, finest // steps, paths).sum(axis=1)
        approx = sde.integrate_sde(lambda x: mu * x, lambda x: sigma * x, jnp.full(paths, x0), 1.0 / steps, coarse)
        return jnp.mean(jnp.abs(approx - exact))

    levels = np.arange(3, 9)
    errors = np.array([float(error(int(k))) for k in levels])
    slope = np.polyfit(np.log(2.0**-levels), np.log(errors), 1)[0]
    assert abs(slope - 0.5) <= 0.1, (slope, errors)


@pytest.mark.parametrize("implicit_weight", [0.0, 0.5, 1.0])
def test_monte_carlo_mean_matches_ou_conditional_mean(implicit_weight):
    kappa, level, vol, x0, steps, paths = 1.0, 0.5, 1.0, 1.5, 100, 20_000
    intensity, jump_mean, jump_scale = 0.5, 0.4, 0.3
    noise_key, jump_key = jax.random.split(jax.random.key(1))
    noise = sde.levy_increments(noise_key, 2.0, 0.0, 1.0 / steps, (steps, paths))
    jumps = sde.jump_increments(jump_key, intensity, jump_mean, jump_scale, steps, paths, 8)
    terminal = sde.integrate_sde(lambda x: kappa * (level - x), lambda x: vol + 0.0 * x, jnp.full(paths, x0),
                                 1.0 / steps, noise, jumps, implicit_weight, tamed=True)
    decay = np.exp(-kappa)
    # jumps arrive uniformly in time and then mean-revert: E = lambda m_J (1 - e^-kappa) / kappa
    expected = level + (x0 - level) * decay + intensity * jump_mean * (1 - decay) / kappa
    standard_error = float(jnp.std(terminal)) / np.sqrt(paths)
    assert abs(float(jnp.mean(terminal)) - expected) < 3 * standard_error


def test_jump_counts_are_poisson_truncated_at_max_events():
    steps, paths = 50, 20_000
    jumps = sde.jump_increments(jax.random.key(2), 1.5, 1.0, 0.0, steps, paths, 3)
    counts = np.asarray(jnp.sum(jumps, axis=0))  # sizes are exactly 1 (scale 0)
    assert counts.max() == 3
    from scipy.stats import poisson
    expected = [poisson.pmf(0, 1.5), poisson.pmf(1, 1.5), poisson.pmf(2, 1.5), poisson.sf(2, 1.5)]
    observed = [np.mean(np.isclose(counts, k)) for k in range(4)]
    np.testing.assert_allclose(observed, expected, atol=0.015)


def test_stiffness_regime_switches_with_state_dependent_diffusion():
    states = jnp.linspace(-2.0, 2.0, 33)
    drift = lambda x: -x  # noqa: E731
    regimes = []
    for diffusion in (lambda x: 1.0 + 0.0 * x, lambda x: 6.0 * x**2, lambda x: 20.0 * x**2):
        stiffness = sde.stiffness_metric(drift, diffusion, states, 1.0)
        regimes.append(float(sde.stiffness_regime(stiffness, 100.0, 1000.0)[1]))
    assert regimes == [0.0, 1.0, 2.0]


def test_kernel_reports_explicit_for_persistent_and_implicit_for_anti_persistent_windows():
    static, params = _setup()
    persistent = _ou_window(64, 0, phi=0.9)
    smooth = _forecast(persistent, _carry(persistent, static, params), jax.random.key(0), static, params)
    rng = np.random.default_rng(1)
    alternating = jnp.asarray((-1.0) ** np.arange(64) + 0.1 * rng.normal(size=64))
    rough = _forecast(alternating, _carry(alternating, static, params), jax.random.key(0), static, params)
    assert float(smooth.metadata["stiffness_regime"]) == 0.0
    assert float(rough.metadata["stiffness_regime"]) == 2.0
    assert np.isfinite(float(rough.prediction)) and float(rough.sigma) > 0
    # the drift-implicit solution of the very stiff OU sits at the level, with the window's spread
    assert abs(float(rough.prediction) - float(jnp.mean(alternating))) < 0.3
    # a smaller model-time step makes the same dynamics faster in model time: blended regime
    fast_static, fast_params = _setup({"kernels.sde_dt": 1e-4})
    quick = _ou_window(64, 0, phi=0.3)
    fast = _forecast(quick, _carry(quick, fast_static, fast_params), jax.random.key(0), fast_static, fast_params)
    assert float(fast.metadata["stiffness"]) > float(
        _forecast(quick, _carry(quick, static, params), jax.random.key(0), static, params).metadata["stiffness"])


@pytest.mark.slow
def test_outputs_finite_for_constant_and_extreme_windows():
    static, params = _setup()
    windows = jnp.stack([jnp.full(64, 3.0), jnp.zeros(64), jnp.full(64, -1e8),
                         jnp.arange(64.0) * 1e6, _ou_window(64, 3) * 1e-9, jnp.where(jnp.arange(64) == 40, 50.0, 0.0)])
    run = jax.vmap(sde.forecast, in_axes=(0, 0, 0, None, None))
    keys = jax.random.split(jax.random.key(0), windows.shape[0])
    carries = jax.vmap(lambda w: _carry(w, static, params))(windows)
    result = jax.jit(run, static_argnums=3)(windows, carries, keys, static, params)
    assert np.all(np.isfinite(np.asarray(result.prediction)))
    assert np.all(np.isfinite(np.asarray(result.sigma))) and np.all(np.asarray(result.sigma) > 0)
    np.testing.assert_allclose(np.asarray(result.prediction[:3]), [3.0, 0.0, -1e8], rtol=1e-9, atol=1e-9)


def test_scale_shift_equivariance_and_determinism():
    static, params = _setup()
    window, key = _ou_window(64, 4), jax.random.key(5)
    base = _forecast(window, _carry(window, static, params), key, static, params)
    moved = _forecast(3.7 * window - 12.0, _carry(3.7 * window - 12.0, static, params), key, static, params)
    np.testing.assert_allclose(float(moved.prediction), 3.7 * float(base.prediction) - 12.0, rtol=1e-6)
    np.testing.assert_allclose(float(moved.sigma), 3.7 * float(base.sigma), rtol=1e-6)
    again = _forecast(window, _carry(window, static, params), key, static, params)
    assert float(again.prediction) == float(base.prediction)
    other = _forecast(window, _carry(window, static, params), jax.random.key(6), static, params)
    assert float(other.prediction) != float(base.prediction)
    assert set(base.metadata) == set(sde.METADATA_KEYS)


@pytest.mark.parametrize(("field", "value", "base"), [
    ("kernels.sde_dt", 0.03, {}),
    ("kernels.sde_diffusion_sigma", 1.0, {}),
    ("kernels.kernel_c_prior_strength", 40.0, {}),
    ("kernels.kernel_c_drift_memory", 20.0, {}),
    ("kernels.kernel_c_alpha", 1.5, {}),
    ("kernels.kernel_c_beta", 0.7, {"kernels.kernel_c_alpha": 1.5}),
    ("kernels.kernel_c_jump_intensity", 1.0, {}),
    # the jump sizes matter only on paths with a jump: make them arrive
    ("kernels.kernel_c_jump_mean", 0.5, {"kernels.kernel_c_jump_intensity": 1.0}),
    ("kernels.kernel_c_jump_scale", 2.0, {"kernels.kernel_c_jump_intensity": 1.0}),
    ("kernels.sde_numel_integrations", 50, {}),
    ("kernels.kernel_c_num_paths", 48, {}),
    ("kernels.kernel_c_max_events", 1, {"kernels.kernel_c_jump_intensity": 3.0}),
])
def test_every_field_changes_the_output(field, value, base):
    window, key = _ou_window(64, 7), jax.random.key(8)
    static, params = _setup(base)
    new_static, new_params = _setup({**base, field: value})
    before = _forecast(window, _carry(window, static, params), key, static, params)
    after = _forecast(window, _carry(window, new_static, new_params), key, new_static, new_params)
    assert (float(before.prediction), float(before.sigma)) != (float(after.prediction), float(after.sigma))


def test_a_constant_history_offers_the_window_no_slope():
    """Infinite variance from the drift memory of a constant history, so the window's fit stands alone."""
    flat = sde.init_carry(jnp.full(50, 2.0), None, {"kernel_c_drift_memory": jnp.asarray(100.0)}, None)
    assert np.isinf(float(regression_slope(flat)[1]))


def _causal_run(series, keys, static, params):
    n = static.base_min_signal_length

    def step(carry, t):
        window = jax.lax.dynamic_slice(series, (t - n + 1,), (n,))
        result = sde.forecast(window, carry, keys[t], static, params)
        return result.carry, (result.prediction, result.sigma)

    start = n - 1
    _, (pred, sigma) = jax.lax.scan(step, sde.init_carry(series[: n - 1], static, params, keys[0]),
                                    jnp.arange(start, series.shape[0] - 1))
    return pred, sigma, series[start + 1:], series[start:-1]


@pytest.mark.slow
def test_beats_naive_with_calibrated_intervals_on_mean_reverting_jump_process():
    """OU (phi = 0.6) with compound-Poisson jumps (rate 0.05, N(0, 2^2) sizes): MSE below the last value's
    and 95% interval coverage within 3 points, over 4 seeds x 1000 causal steps."""
    static, params = _setup()
    num_series, length = 4, 1064
    rng = np.random.default_rng(11)
    series = np.zeros((num_series, length))
    for t in range(1, length):
        jump = (rng.random(num_series) < 0.05) * rng.normal(0.0, 2.0, num_series)
        series[:, t] = 0.6 * series[:, t - 1] + rng.normal(size=num_series) + jump
    keys = jax.random.split(jax.random.key(12), num_series * length).reshape(num_series, length)
    run = jax.jit(jax.vmap(_causal_run, in_axes=(0, 0, None, None)), static_argnums=2)
    pred, sigma, target, last = (np.asarray(a) for a in run(jnp.asarray(series), keys, static, params))
    mse_ratio = np.mean((pred - target) ** 2) / np.mean((last - target) ** 2)
    coverage = np.mean(np.abs(target - pred) <= 1.959964 * sigma)
    print(f"mse_ratio={mse_ratio:.3f} coverage={coverage:.3f}")
    assert mse_ratio < 0.9
    assert abs(coverage - 0.95) <= 0.03
