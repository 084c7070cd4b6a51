"""run_backtest / evaluate_trials with the real engine (one small panel shape; compile-bound, hence slow)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from usp_core import PredictorConfig, run_backtest
from usp_core.backtest.runner import MODELS, evaluate_trials
from usp_core.data import synthetic


def _long_panel() -> pd.DataFrame:
    frames = []
    for i, n in enumerate((300, 260, 300)):
        values = synthetic.ornstein_uhlenbeck(n, theta=0.1, sigma=1.0, mu=5.0 * i, seed=i)
        ts = pd.date_range("2020-01-01", periods=n, freq="h", tz="UTC")
        frames.append(pd.DataFrame({"series_id": f"s{i}", "ts": ts, "value": values}))
    return pd.concat(frames, ignore_index=True)


@pytest.mark.slow
def test_backtest_panel_metrics_and_trials_agree():
    cfg = PredictorConfig.default()
    panel = _long_panel()
    result = run_backtest(cfg, panel, include="all", n_folds=3)
    assert result.series_ids == ["s0", "s1", "s2"]
    assert set(result.aggregate.index) == set(MODELS)
    usp = result.metrics
    # Every test point of the shorter series is scored, none of its padding.
    assert usp.loc["s1", "n_points"] == sum(len(f.test) for f in result.folds[1])
    assert np.isfinite(usp[["mase", "crps", "coverage", "relative_mse"]].to_numpy()).all()
    assert 0.5 < result.aggregate.loc["usp", "coverage"] <= 1.0
    assert result.fold_objectives.shape == (3,) and result.holdout_losses.shape[0] == 3
    # On an OU process the predictor is not much worse than the naive forecast.
    assert result.objective < 1.5

    other = cfg.replace({"orchestration.cusum_k": 0.9})
    batched = evaluate_trials([cfg, other], panel, include="all", n_folds=3)
    np.testing.assert_allclose(batched[0].output.prediction, result.output.prediction, rtol=1e-9, equal_nan=True)
    assert batched[0].objective == pytest.approx(result.objective, rel=1e-9)
    tuning = evaluate_trials([cfg], panel, include="tuning", n_folds=3)[0]
    np.testing.assert_allclose(tuning.fold_objectives, result.fold_objectives[:2], rtol=1e-9)
    assert tuning.holdout_losses is None


def test_bad_rows_and_short_series_are_errors():
    cfg = PredictorConfig.default()
    panel = _long_panel()
    panel.loc[3, "value"] = np.inf
    with pytest.raises(ValueError, match="invalid observations"):
        run_backtest(cfg, panel)
    with pytest.raises(ValueError, match="series '0'.*needs length"):
        run_backtest(cfg, np.zeros((1, 66)))


def test_tuning_panel_ends_before_each_holdout_and_keeps_the_newest_points():
    from usp_core.backtest.runner import as_panel, folds_for_panel, tuning_panel

    cfg = PredictorConfig.default()
    panel = _long_panel()
    full = as_panel(panel, min_history=64)
    holdout_starts = [f[-1].test.start for f in folds_for_panel(cfg, full, 64)]
    cut = tuning_panel(cfg, panel, 64, max_length=150)
    assert cut.series_ids == full.series_ids
    for b, start in enumerate(holdout_starts):
        n = int(cut.lengths[b])
        assert n == min(150, start)
        np.testing.assert_array_equal(cut.values[b, :n], full.values[b, start - n:start])
        np.testing.assert_array_equal(cut.timestamps_ns[b, :n], full.timestamps_ns[b, start - n:start])
        assert np.isnan(cut.values[b, n:]).all()
        assert (np.diff(cut.timestamps_ns[b]) > 0).all()  # padding keeps timestamps increasing
    whole = tuning_panel(cfg, panel, 64)
    np.testing.assert_array_equal(whole.lengths, holdout_starts)


@pytest.mark.slow
def test_tuning_objective_never_reads_the_holdout():
    from usp_core.tuning.campaign import BacktestEvaluator

    cfg = PredictorConfig.default()
    panel = _long_panel()
    tampered = panel.copy()
    last = tampered.groupby("series_id").cumcount(ascending=False) < 10  # holdouts: last 18 (15) points
    tampered.loc[last, "value"] += 1e3
    scores = [BacktestEvaluator(p)([cfg])[0] for p in (panel, tampered)]
    assert np.isfinite(scores[0].objective)
    assert scores[0] == scores[1]
