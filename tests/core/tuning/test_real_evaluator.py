"""A tiny fast-tier campaign on the real predictor: batched trials compile once per static key."""

from __future__ import annotations

import pytest

import usp_core  # noqa: F401
from usp_core.config import PredictorConfig
from usp_core.data.synthetic import ornstein_uhlenbeck
from usp_core.tuning.campaign import BacktestEvaluator
from usp_core.tuning.optimizer import BayesianMetaOptimizer


@pytest.mark.slow
def test_fast_campaign_compiles_once_per_static_key():
    from usp_core.engine.predictor import count_compilations

    # one static key: pin the two static fast-tier params' search ranges
    base = PredictorConfig.default().replace({
        "meta_optimization.n_folds": 3, "meta_optimization.log_sig_depth_min": 2,
        "meta_optimization.log_sig_depth_max": 2, "meta_optimization.wtmm_buffer_size_min": 64,
        "meta_optimization.wtmm_buffer_size_max": 64})
    panel = ornstein_uhlenbeck(160, theta=0.1, seed=0, batch=2)
    with count_compilations() as counts:
        opt = BayesianMetaOptimizer(BacktestEvaluator(panel, pad_to=4), {"n_trials": 8, "batch_size": 4},
                                    base, storage="memory:")
        opt.optimize()
    statics = {opt.space.config(t.user_attrs["config_params"]).static for t in opt.study.trials}
    assert len(statics) == 1 and opt.evaluation_calls == 2
    # a trial run is two programs (its start and its chunk): at most one of each per static key, nothing else
    starts, chunks = (sum(counts[f"{kind}{suffix}"] for suffix in ("", "_shared")) for kind in ("prime_trials", "run_trials"))
    assert starts <= len(statics) and chunks <= len(statics) and sum(counts.values()) == starts + chunks, counts
    values = [t.user_attrs["objective"] for t in opt.study.trials]
    assert len(set(values)) == 8  # dynamic params really change the backtest
