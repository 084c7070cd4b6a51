"""Moments and covariances of the synthetic generators (fixed seeds; tolerances are ~4 Monte Carlo standard
errors for the sample sizes used)."""

from __future__ import annotations

import numpy as np
import pytest

from usp_core.data import synthetic as syn


def test_brownian_motion_starts_at_x0_with_gaussian_increments():
    paths = syn.brownian_motion(101, sigma=2.0, x0=5.0, seed=0, batch=4000)
    assert paths.shape == (4000, 101) and paths.dtype == np.float64
    assert np.all(paths[:, 0] == 5.0)
    # Var(X_100) = 100 sigma^2 = 400; the sample variance of 4000 draws has relative std ~ sqrt(2/4000) = 2.2%.
    assert paths[:, -1].var() == pytest.approx(400.0, rel=0.09)
    assert np.diff(paths, axis=1).std() == pytest.approx(2.0, rel=0.01)


def test_same_seed_same_path_and_different_seed_differs():
    a = syn.ornstein_uhlenbeck(50, theta=0.3, seed=11)
    assert np.array_equal(a, syn.ornstein_uhlenbeck(50, theta=0.3, seed=11))
    assert not np.array_equal(a, syn.ornstein_uhlenbeck(50, theta=0.3, seed=12))


def test_ou_is_stationary_with_exact_autocorrelation():
    theta, sigma, dt = 0.5, 1.5, 0.5
    paths = syn.ornstein_uhlenbeck(40, theta=theta, mu=2.0, sigma=sigma, dt=dt, seed=1, batch=20000)
    stationary_var = sigma**2 / (2 * theta)
    assert paths.mean() == pytest.approx(2.0, abs=0.05)
    np.testing.assert_allclose(paths[:, [0, 20, 39]].var(axis=0), stationary_var, rtol=0.05)
    lag = 3
    corr = np.corrcoef(paths[:, 10], paths[:, 10 + lag])[0, 1]
    assert corr == pytest.approx(np.exp(-theta * dt * lag), abs=0.03)


def test_ou_from_fixed_start_decays_to_mu():
    paths = syn.ornstein_uhlenbeck(30, theta=1.0, mu=1.0, sigma=0.5, x0=10.0, seed=2, batch=5000)
    assert np.all(paths[:, 0] == 10.0)
    expected_mean = 1.0 + 9.0 * np.exp(-1.0 * np.arange(30))
    np.testing.assert_allclose(paths.mean(axis=0), expected_mean, atol=0.03)


def test_gbm_mean_is_exponential_in_mu():
    paths = syn.geometric_brownian_motion(11, mu=0.05, sigma=0.2, x0=3.0, seed=3, batch=100000)
    assert np.all(paths > 0)
    # E[S_t] = x0 exp(mu t); t = 10.
    assert paths[:, -1].mean() == pytest.approx(3.0 * np.exp(0.5), rel=0.02)
    log_steps = np.diff(np.log(paths), axis=1)
    assert log_steps.mean() == pytest.approx(0.05 - 0.02, abs=0.002)
    assert log_steps.std() == pytest.approx(0.2, rel=0.01)


@pytest.mark.parametrize("hurst", [0.25, 0.5, 0.75])
def test_fgn_has_exact_autocovariance(hurst):
    noise = syn.fractional_gaussian_noise(64, hurst, seed=4, batch=20000)
    lags = np.arange(4)
    empirical = [np.mean(noise[:, 20] * noise[:, 20 + k]) for k in lags]
    np.testing.assert_allclose(empirical, syn.fgn_autocovariance(lags, hurst), atol=0.04)
    assert noise.var() == pytest.approx(1.0, abs=0.01)


def test_fbm_covariance_matches_formula():
    hurst = 0.7
    paths = syn.fractional_brownian_motion(129, hurst, seed=5, batch=8000)
    assert np.all(paths[:, 0] == 0.0)
    s, t = np.array([8, 32, 64, 128]), np.array([16, 64, 128, 128])
    expected = 0.5 * (s ** (2 * hurst) + t ** (2 * hurst) - np.abs(t - s) ** (2 * hurst))
    empirical = np.mean(paths[:, s] * paths[:, t], axis=0)
    np.testing.assert_allclose(empirical, expected, rtol=0.06)


def test_fbm_self_similarity_distinguishes_hurst():
    rough = syn.fractional_brownian_motion(257, 0.3, seed=6, batch=2000)
    smooth = syn.fractional_brownian_motion(257, 0.8, seed=6, batch=2000)
    # Var(B_256) = 256^(2H).
    assert rough[:, -1].var() == pytest.approx(256**0.6, rel=0.1)
    assert smooth[:, -1].var() == pytest.approx(256**1.6, rel=0.1)


def test_fbm_rejects_bad_hurst():
    with pytest.raises(ValueError, match="hurst"):
        syn.fractional_brownian_motion(10, 1.0, seed=0)


def test_merton_mean_is_compensated_and_jumps_occur():
    paths, counts = syn.merton_jump_diffusion(
        253, mu=0.1, sigma=0.2, jump_intensity=5.0, jump_mean=-0.05, jump_std=0.1, seed=7, batch=20000, return_jumps=True
    )
    assert paths.shape == counts.shape == (20000, 253)
    assert paths[:, -1].mean() == pytest.approx(np.exp(0.1), rel=0.01)
    # 5 jumps per year on average over 252 steps of dt = 1/252.
    assert counts.sum(axis=1).mean() == pytest.approx(5.0, rel=0.03)


def test_regime_switching_labels_and_moments():
    values, labels = syn.regime_switching(20000, means=(0.0, 5.0), vols=(1.0, 3.0), p_stay=0.98, seed=8)
    assert set(np.unique(labels)) == {0, 1}
    assert values[labels == 0].mean() == pytest.approx(0.0, abs=0.05)
    assert values[labels == 1].std() == pytest.approx(3.0, rel=0.05)
    stays = np.mean(labels[1:] == labels[:-1])
    assert stays == pytest.approx(0.98, abs=0.005)


def test_regime_switching_deterministic_change_points():
    values, labels = syn.regime_switching(10, change_points=[3, 7], seed=0)
    assert labels.tolist() == [0, 0, 0, 1, 1, 1, 1, 0, 0, 0]
    walk, _ = syn.regime_switching(10, change_points=[3, 7], integrate=True, seed=0)
    np.testing.assert_allclose(walk, np.cumsum(values))


def test_student_t_standardized_variance_and_heavy_tails():
    draws = syn.student_t_noise(200000, 5.0, scale=2.0, seed=9)
    assert draws.std() == pytest.approx(2.0, rel=0.02)
    excess_kurtosis = np.mean((draws / draws.std()) ** 4) - 3.0
    assert excess_kurtosis > 2.0  # theoretical 6 / (df - 4) = 6
    walk = syn.student_t_series(100, 4.0, sigma=0.5, x0=1.0, seed=9)
    assert walk[0] == 1.0 and walk.shape == (100,)


def test_ar_process_matches_yule_walker_variance():
    phi1, phi2 = 0.5, -0.2
    paths = syn.ar_process(400, [phi1, phi2], sigma=1.0, mean=3.0, seed=10, batch=200)
    gamma0 = (1 - phi2) / ((1 + phi2) * ((1 - phi2) ** 2 - phi1**2))
    assert paths.mean() == pytest.approx(3.0, abs=0.03)
    assert paths.var() == pytest.approx(gamma0, rel=0.03)
    centred = paths - 3.0
    rho1 = np.mean(centred[:, 1:] * centred[:, :-1]) / np.mean(centred**2)
    assert rho1 == pytest.approx(phi1 / (1 - phi2), abs=0.02)


def test_noisy_sine_is_sine_plus_noise():
    clean = syn.noisy_sine(100, period=25.0, amplitude=2.0, noise=0.0, offset=1.0, seed=0)
    np.testing.assert_allclose(clean, 1.0 + 2.0 * np.sin(2 * np.pi * np.arange(100) / 25.0))
    noisy = syn.noisy_sine(100, period=25.0, amplitude=2.0, noise=0.3, offset=1.0, seed=0)
    assert (noisy - clean).std() == pytest.approx(0.3, rel=0.25)


def test_inject_frozen_and_outliers_do_not_mutate_input():
    x = np.arange(8.0)
    frozen = syn.inject_frozen(x, 3, 2)
    assert frozen.tolist() == [0, 1, 2, 2, 2, 5, 6, 7]
    spiked = syn.inject_outliers(x, [1, 6], [100.0, -50.0])
    assert spiked.tolist() == [0, 101, 2, 3, 4, 5, -44, 7]
    assert x.tolist() == list(range(8))
    batch = syn.inject_frozen(np.arange(12.0).reshape(2, 6), 0, 3)
    assert batch.tolist() == [[0, 0, 0, 3, 4, 5], [6, 6, 6, 9, 10, 11]]
    with pytest.raises(ValueError):
        syn.inject_frozen(x, 8, 2)
