"""Metrics, baselines and the fold bookkeeping of the runner against hand-computed values (no engine needed:
a fake predictor output with known forecasts is evaluated)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pytest
from scipy import integrate, stats

from usp_core import PredictorConfig
from usp_core.backtest import baselines as bl
from usp_core.backtest import metrics as mx
from usp_core.backtest.runner import as_panel, evaluate_output
from usp_core.backtest.splits import Fold


@pytest.mark.parametrize("y, mu, sigma", [(0.3, 0.0, 1.0), (-2.5, 1.0, 0.5), (10.0, 9.0, 3.0)])
def test_gaussian_crps_matches_numerical_integral(y, mu, sigma):
    integrand = lambda x: (stats.norm.cdf(x, mu, sigma) - (x >= y)) ** 2  # noqa: E731
    numeric = sum(integrate.quad(integrand, a, b, limit=200)[0] for a, b in ((-np.inf, y), (y, np.inf)))
    assert mx.gaussian_crps(y, mu, sigma) == pytest.approx(numeric, rel=1e-7)


def test_interval_score_and_smape_by_hand():
    # alpha = 0.1: width 2, plus 2/0.1 * 0.5 below the interval.
    assert mx.interval_score(-1.5, -1.0, 1.0, 0.9) == pytest.approx(2.0 + 20.0 * 0.5)
    assert mx.interval_score(0.0, -1.0, 1.0, 0.9) == pytest.approx(2.0)
    np.testing.assert_allclose(mx.symmetric_ape(np.array([1.0, 0.0]), np.array([3.0, 0.0])), [100.0, 0.0])


def test_forecast_metrics_by_hand_with_mask():
    actual = np.array([[1.0, 2.0, 4.0, np.nan]])
    prediction = np.array([[1.0, 1.0, 1.0, 5.0]])
    sigma = np.ones((1, 4))
    lower, upper = prediction - 2.0, prediction + 2.0
    m = mx.forecast_metrics(actual, prediction, sigma, lower, upper, mase_scale=np.array([2.0]), level=0.9)
    assert m["n_points"][0] == 3
    assert m["mae"][0] == pytest.approx(4.0 / 3.0)
    assert m["mse"][0] == pytest.approx(10.0 / 3.0)
    assert m["rmse"][0] == pytest.approx(np.sqrt(10.0 / 3.0))
    assert m["mase"][0] == pytest.approx(2.0 / 3.0)
    assert m["coverage"][0] == pytest.approx(2.0 / 3.0)
    assert m["width"][0] == pytest.approx(4.0)
    assert m["interval_score"][0] == pytest.approx((4.0 * 3 + 20.0 * 1.0) / 3.0)
    expected_crps = np.mean([mx.gaussian_crps(a, 1.0, 1.0) for a in (1.0, 2.0, 4.0)])
    assert m["crps"][0] == pytest.approx(expected_crps)


def test_naive_scale_is_in_sample_mean_abs_difference():
    values = np.array([[0.0, 1.0, 3.0, 6.0, 100.0]])
    assert mx.naive_scale(values, [[range(0, 4)]])[0] == pytest.approx((1 + 2 + 3) / 3)


def test_naive_baseline_exact_on_toy_series():
    values = np.array([[0.0, 1.0, 3.0, 6.0, 10.0]])
    f = bl.naive_forecast(values, window=3, level=0.95)
    np.testing.assert_array_equal(f.prediction, values)
    assert np.isnan(f.sigma[0, :2]).all()  # two differences are needed for a std
    assert f.sigma[0, 2] == pytest.approx(np.std([1.0, 2.0], ddof=1))
    assert f.sigma[0, 4] == pytest.approx(np.std([2.0, 3.0, 4.0], ddof=1))
    z = stats.norm.ppf(0.975)
    assert f.upper[0, 4] - f.lower[0, 4] == pytest.approx(2 * z * f.sigma[0, 4])


def test_naive_baseline_carries_last_value_over_nan():
    f = bl.naive_forecast(np.array([[1.0, 2.0, np.nan, 4.0]]), window=5, level=0.9)
    np.testing.assert_array_equal(f.prediction, [[1.0, 2.0, 2.0, 4.0]])


def test_ewma_baseline_exact_on_toy_series():
    alpha = 0.5
    values = np.array([[2.0, 4.0, 0.0]])
    f = bl.ewma_forecast(values, alpha=alpha, level=0.9)
    np.testing.assert_allclose(f.prediction, [[2.0, 3.0, 1.5]])
    # errors: e1 = 4 - 2 = 2, e2 = 0 - 3 = -3; bias-corrected EWMA of squares.
    assert np.isnan(f.sigma[0, 0])
    assert f.sigma[0, 1] == pytest.approx(2.0)
    assert f.sigma[0, 2] ** 2 == pytest.approx((0.5 * 4.0 * 0.5 + 0.5 * 9.0) / (1 - 0.25))


def test_constant_series_gets_finite_positive_sigma():
    f = bl.naive_forecast(np.full((1, 10), 3.0), window=4, level=0.95)
    assert np.all(f.sigma[0, 2:] > 0) and np.all(np.isfinite(f.sigma[0, 2:]))


class FakeOutput(NamedTuple):
    prediction: np.ndarray
    sigma: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    kernel_predictions: np.ndarray
    kernel_sigmas: np.ndarray
    mode: np.ndarray
    regime_change: np.ndarray
    rejected: np.ndarray


def _fake_output(values: np.ndarray, offset: float) -> FakeOutput:
    """Forecast = last value + offset, sigma 1; kernel k forecasts last value + k."""
    prediction = values + offset
    sigma = np.ones_like(values)
    kernels = np.stack([values + k for k in range(4)], axis=-1)
    mode = np.zeros(values.shape, dtype=np.int32)
    mode[:, ::2] = 2
    regime = np.zeros(values.shape, dtype=bool)
    regime[:, 5] = True
    return FakeOutput(prediction, sigma, prediction - 1.96, prediction + 1.96, kernels, np.ones_like(kernels), mode, regime,
                      np.zeros(values.shape, dtype=bool))


def test_evaluate_output_on_known_panel():
    rng = np.random.default_rng(0)
    values = np.cumsum(rng.standard_normal((2, 40)), axis=1)
    values[1, 30:] = np.nan  # a shorter series, padded
    panel = as_panel(values, series_ids=["a", "b"])
    assert panel.lengths.tolist() == [40, 30]
    folds = [
        [Fold(range(0, 20), range(20, 30)), Fold(range(0, 30), range(30, 40), holdout=True)],
        [Fold(range(0, 20), range(20, 25)), Fold(range(0, 25), range(25, 30), holdout=True)],
    ]
    cfg = PredictorConfig.default().replace({"backtest.objective": "relative_mse"})  # hand-computed below
    result = evaluate_output(cfg, panel, _fake_output(values, 0.5), folds, include="all")

    # Hand computation for series "a": forecasts of t are values[t-1] + 0.5 over t in 20..39.
    t = np.arange(20, 40)
    errors = values[0, t] - (values[0, t - 1] + 0.5)
    naive_errors = values[0, t] - values[0, t - 1]
    scale = np.mean(np.abs(np.diff(values[0, :20])))
    row = result.per_series.loc[("usp", "a")]
    assert row["n_points"] == 20
    assert row["mae"] == pytest.approx(np.mean(np.abs(errors)))
    assert row["mase"] == pytest.approx(np.mean(np.abs(errors)) / scale)
    assert row["relative_mse"] == pytest.approx(np.mean(errors**2) / np.mean(naive_errors**2))
    assert row["crps"] == pytest.approx(np.mean(mx.gaussian_crps(values[0, t], values[0, t - 1] + 0.5, 1.0)))
    assert row["regime_changes"] == 0  # the only regime change (t = 5) is outside the test folds
    assert row["mode_emergency"] == pytest.approx(0.5)
    assert result.per_series.loc[("usp", "b"), "n_points"] == 10
    # Kernel 0 (ridge) forecasts the last value: identical to the naive point forecast.
    assert result.per_series.loc[("kernel_ridge", "a"), "relative_mse"] == pytest.approx(1.0)
    assert result.per_series.loc[("naive", "a"), "crps_skill"] == pytest.approx(0.0)

    # Per-fold objectives and their mean.
    assert result.fold_objectives.shape == (2,)
    assert result.objective == pytest.approx(result.fold_objectives.mean())
    tuning = evaluate_output(cfg, panel, _fake_output(values, 0.5), folds, include="tuning")
    assert tuning.fold_objectives[0] == pytest.approx(result.fold_objectives[0])
    assert tuning.holdout_losses is None

    # Holdout losses: squared errors scaled by the naive holdout MSE of each series.
    hold = np.arange(30, 40)
    expected = (values[0, hold] - values[0, hold - 1] - 0.5) ** 2 / np.mean((values[0, hold] - values[0, hold - 1]) ** 2)
    np.testing.assert_allclose(result.holdout_losses[0], expected)
    assert np.isnan(result.holdout_losses[1, 5:]).all() and result.holdout_targets[1, :5].tolist() == [25, 26, 27, 28, 29]
    assert result.aggregate.loc["usp", "mase"] == pytest.approx(result.per_series.loc["usp"]["mase"].mean())


@pytest.mark.parametrize("objective, column", [("relative_mse", "relative_mse"), ("relative_crps", "crps_ratio"), ("mase", "mase")])
def test_objective_choice(objective, column):
    rng = np.random.default_rng(1)
    values = np.cumsum(rng.standard_normal((3, 30)), axis=1)
    folds = [Fold(range(0, 10), range(10, 20)), Fold(range(0, 20), range(20, 30), holdout=True)]
    cfg = PredictorConfig.default().replace({"backtest.objective": objective})
    result = evaluate_output(cfg, as_panel(values), _fake_output(values, 0.3), [folds] * 3, include="holdout")
    assert result.objective == pytest.approx(result.per_series.loc["usp"][column].mean())
