"""The final selection over the fused forecast and each expert whole (SPEC §3.5 rev. 2): an exponentially
weighted average forecaster on discounted CRPS sums."""

import equinox as eqx
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import softmax
from scipy.stats import norm

from usp_core import Predictor
from usp_core.engine import fusion
from usp_core.kernels import EXPERT_NAMES


def _crps(y, mean, sigma):
    z = (y - mean) / sigma
    return sigma * (z * (2 * norm.cdf(z) - 1) + 2 * norm.pdf(z) - 1 / np.sqrt(np.pi))


def test_selection_weights_follow_the_discounted_crps_sums(small_config):
    """One step from a prepared score S: S' = (1 - 1 / memory) S + CRPS / increment scale of each candidate's
    forecast of y (the fused one, then each expert's mean with its own sigma), weights softmax(-eta S'), and the
    output is the weighted mean and geometric sigma of the candidates' next forecasts."""
    cfg = small_config.replace({"orchestration.selection_rate": 2.0, "orchestration.selection_memory": 50.0})
    p = Predictor(cfg)
    x = np.cumsum(np.random.default_rng(4).normal(size=p.min_history)) + 5.0
    state = p.init(x)
    score = np.linspace(0.0, 0.6, len(EXPERT_NAMES) + 1)
    state = eqx.tree_at(lambda s: s.fusion.selection_score, state, jnp.asarray(score))
    f, k = state.fusion, state.kernel
    y = float(k.window[-1]) + 0.3
    out, new = p.step(state, y, timestamp_ns=int(state.last_timestamp_ns) + 1)
    assert not bool(out.rejected) and not bool(out.regime_change)

    means = np.append(float(f.forecast), np.asarray(k.kernel_predictions))
    sigmas = np.append(float(f.forecast_sigma), np.asarray(k.kernel_sigmas))
    increment_scale = np.std(np.diff(np.asarray(k.window)))
    expected_score = (1 - 1 / 50.0) * score + _crps(y, means, sigmas) / increment_scale
    np.testing.assert_allclose(np.asarray(new.fusion.selection_score), expected_score, rtol=1e-9)
    weights = softmax(-2.0 * expected_score)
    np.testing.assert_allclose(np.asarray(out.selection_weights), weights, rtol=1e-9)

    next_means = np.append(float(new.fusion.forecast), np.asarray(out.kernel_predictions))
    next_sigmas = np.append(float(new.fusion.forecast_sigma), np.asarray(out.kernel_sigmas))
    np.testing.assert_allclose(float(out.prediction), weights @ next_means, rtol=1e-12)
    scale = np.exp(float(new.fusion.log_selection_scale))
    np.testing.assert_allclose(float(out.sigma), scale * np.exp(weights @ np.log(next_sigmas)), rtol=1e-9)
    assert float(out.prediction) == float(new.forecast)


def test_selection_settles_on_the_long_mean_for_white_noise(small_config):
    """iid N(3, 0.5^2): the long mean with its variance-targeted sigma is the optimal forecast; after 1500
    steps the selection holds most of its weight there (outside emergency mode) and the output interval covers
    93-97 %."""
    x = 3.0 + 0.5 * np.random.default_rng(8).standard_normal(1600)
    p = Predictor(small_config)
    out = p.run(x)
    weights, emergency = np.asarray(out.selection_weights)[-300:], np.asarray(out.emergency)[-300:]
    np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-12)
    long_mean = 1 + EXPERT_NAMES.index("long_mean")
    # the small config's short WTMM buffer trips the circuit breaker now and then: those steps output the fused
    # forecast (Kernel D), the others the selection
    assert emergency.mean() < 0.5
    assert weights[~emergency, long_mean].mean() > 0.9, weights.mean(0)
    np.testing.assert_array_equal(weights[emergency, 0], 1.0)
    live = slice(p.min_history - 1, len(x) - 1)  # entry t forecasts x[t + 1]
    covered = (out.lower[live] <= x[p.min_history:]) & (x[p.min_history:] <= out.upper[live])
    assert 0.93 <= covered.mean() <= 0.97, covered.mean()


def test_crps_log_sigma_gradient_known_answers():
    """2 phi(z) - 1/sqrt(pi): the derivative of gaussian_crps in log sigma over sigma, zero in expectation under
    N(0, 1) errors, and its zero for Student-t(3) errors is the sigma that minimises their mean CRPS."""
    assert float(fusion.crps_log_sigma_gradient(0.0)) == pytest.approx(2 / np.sqrt(2 * np.pi) - 1 / np.sqrt(np.pi))
    assert float(fusion.crps_log_sigma_gradient(40.0)) == pytest.approx(-1 / np.sqrt(np.pi))
    y, sigma, h = 0.7, 1.3, 1e-6
    numeric = (float(fusion.gaussian_crps(y, 0.0, sigma * np.exp(h))) - float(fusion.gaussian_crps(y, 0.0, sigma * np.exp(-h)))) / (2 * h)
    assert numeric == pytest.approx(sigma * float(fusion.crps_log_sigma_gradient(y / sigma)), rel=1e-6)
    nodes, weights = np.polynomial.hermite_e.hermegauss(80)
    assert float(np.sum(weights * np.asarray(fusion.crps_log_sigma_gradient(nodes)))) / np.sqrt(2 * np.pi) == pytest.approx(0.0, abs=1e-12)

    errors = np.random.default_rng(6).standard_t(3, size=20000)
    grid = np.exp(np.linspace(-1.0, 1.0, 401))
    mean_crps = [float(np.mean(fusion.gaussian_crps(errors, 0.0, s))) for s in grid]
    zero = grid[np.argmin(np.abs([float(np.mean(fusion.crps_log_sigma_gradient(errors / s))) for s in grid]))]
    assert zero == pytest.approx(grid[int(np.argmin(mean_crps))], rel=0.01)
    assert zero < np.quantile(np.abs(errors), 0.95) / 1.96  # narrower than the 95 %-coverage sigma
