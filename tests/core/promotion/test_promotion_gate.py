"""Diebold–Mariano test and the promotion decision on synthetic loss series (fixed seeds)."""

import math

import numpy as np
import pytest
from scipy import stats

from usp_core.config.loader import PredictorConfig
from usp_core.promotion.gate import (
    decide_from_config,
    diebold_mariano,
    evaluate_promotion,
    hac_variance,
    newey_west_lag,
    promotion_decision,
)

CHALLENGER = np.array([1.0, 2.0, 1.0, 3.0, 0.0])
CHAMPION = np.array([2.0, 2.0, 3.0, 3.0, 2.0])  # d = [-1, 0, -2, 0, -2], mean -1


def test_dm_matches_hand_computation():
    # gamma_0 = (0 + 1 + 1 + 1 + 1) / 5 = 0.8; DM = -1 / sqrt(0.8 / 5) = -2.5
    stat, p = diebold_mariano(CHALLENGER, CHAMPION)
    assert stat == pytest.approx(-2.5, abs=1e-12)
    assert p == pytest.approx(stats.norm.cdf(-2.5), abs=1e-12) and p == pytest.approx(0.0062096653, abs=1e-9)
    # h = 2: gamma_1 = (0*1 + 1*(-1) + (-1)*1 + 1*(-1)) / 5 = -0.6; V = 0.8 + 2 * 0.5 * (-0.6) = 0.2; DM = -5
    stat2, p2 = diebold_mariano(CHALLENGER, CHAMPION, h=2)
    assert stat2 == pytest.approx(-5.0, abs=1e-12) and p2 == pytest.approx(stats.norm.cdf(-5.0), rel=1e-9)
    assert hac_variance(CHALLENGER - CHAMPION, 1) == pytest.approx(0.2)
    s_g, p_g = diebold_mariano(CHALLENGER, CHAMPION, alternative="greater")
    s_t, p_t = diebold_mariano(CHALLENGER, CHAMPION, alternative="two-sided")
    assert s_g == s_t == stat and p_g == pytest.approx(1 - p) and p_t == pytest.approx(2 * p)


def test_dm_panel_averages_series_and_drops_nan_steps():
    chal = np.stack([CHALLENGER, CHAMPION + 2.0 * (CHALLENGER - CHAMPION)])  # second series: d doubled
    champ = np.stack([CHAMPION, CHAMPION])
    chal[1, 0] = np.nan
    stat, _ = diebold_mariano(chal, champ)
    d = np.array([-1.0, 0.0, -3.0, 0.0, -3.0])  # step 0 uses series 0 only
    assert stat == pytest.approx(d.mean() / math.sqrt(d.var() / 5))
    with pytest.raises(ValueError, match="shape"):
        diebold_mariano(CHALLENGER, CHAMPION[:4])


def test_identical_losses_are_not_significant():
    stat, p = diebold_mariano(CHAMPION, CHAMPION)
    assert stat == 0.0 and p == 1.0


def _losses(seed, n=400, edge=0.0, ar=0.5):
    """Champion losses with AR(1)-correlated noise; challenger = champion - edge + independent noise."""
    rng = np.random.default_rng(seed)
    base = np.empty(n)
    base[0] = 1.0
    for t in range(1, n):
        base[t] = 1.0 + ar * (base[t - 1] - 1.0) + 0.3 * rng.standard_normal()
    champ = np.abs(base)
    chal = champ - edge + 0.2 * rng.standard_normal(n)
    return champ, chal


def test_truly_better_challenger_is_promoted():
    champ, chal = _losses(0, edge=0.1)
    dec = promotion_decision(champ.mean(), chal.mean(), champ, chal, min_improvement=0.005, alpha=0.05)
    assert dec.promote and dec.reason.startswith("promote")
    assert dec.improvement > 0.05 and dec.p_value < 1e-6 and dec.dm_stat < 0
    assert dec.n_steps == 400 and dec.dm_lag == newey_west_lag(400) == 5


@pytest.mark.parametrize("edge, why", [(0.0, "not better"), (-0.1, "not better")])
def test_equal_or_worse_challenger_is_rejected(edge, why):
    champ, chal = _losses(1, edge=edge)
    chal = chal + (0.0 if edge else champ.mean() - chal.mean())  # equal: exactly equal mean loss
    dec = promotion_decision(champ.mean(), chal.mean(), champ, chal, min_improvement=0.005, alpha=0.05)
    assert not dec.promote
    assert why in dec.reason and dec.improvement == pytest.approx(0.0 if edge == 0 else -0.1 / champ.mean(), abs=0.03)


def test_better_by_noise_only_is_rejected_for_significance():
    # A small edge buried in noise: the improvement clears min_improvement but p >= alpha.
    champ, chal = _losses(2, n=60, edge=0.01)
    chal = chal + 0.6 * np.random.default_rng(3).standard_normal(60)
    chal = chal - (chal.mean() - champ.mean() * 0.98)  # exactly a 2% improvement on average
    dec = promotion_decision(champ.mean(), chal.mean(), champ, chal, min_improvement=0.005, alpha=0.05)
    assert dec.improvement == pytest.approx(0.02)
    assert not dec.promote and "not significant" in dec.reason and dec.p_value >= 0.05


def test_significant_but_too_small_improvement_is_rejected():
    champ, chal = _losses(4, edge=0.002)
    chal = champ - 0.002 + 1e-4 * np.random.default_rng(5).standard_normal(champ.shape[0])
    dec = promotion_decision(champ.mean(), chal.mean(), champ, chal, min_improvement=0.05, alpha=0.05)
    assert dec.p_value < 0.05 and not dec.promote and "min_improvement" in dec.reason


def test_decision_thresholds_come_from_config_and_evaluate_uses_the_backtest():
    cfg = PredictorConfig.default()
    champ, chal = _losses(0, edge=0.1)
    results = {cfg.version: {"objective": champ.mean(), "holdout_losses": champ}}
    challenger_cfg = cfg.replace({"cusum_k": 0.7})
    results[challenger_cfg.version] = {"objective": chal.mean(), "holdout_losses": chal}
    calls = []

    def fake_backtest(c, panel, folds=None):
        calls.append((c.version, panel))
        return results[c.version]

    dec = evaluate_promotion(cfg, challenger_cfg, "PANEL", backtest=fake_backtest)
    assert dec.promote and [v for v, _ in calls] == [cfg.version, challenger_cfg.version]
    assert all(p == "PANEL" for _, p in calls)
    strict = decide_from_config(cfg.replace({"promotion.min_improvement": 0.9}), champ.mean(), chal.mean(), champ, chal)
    assert not strict.promote
