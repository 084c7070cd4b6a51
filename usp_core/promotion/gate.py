"""The statistical promotion gate: relative improvement AND a one-sided Diebold–Mariano test (SPEC §6).

The DM statistic is hand-written (a dozen lines of numpy): neither scipy nor statsmodels ship it, and the
HAC variance is the plain Newey–West (Bartlett) estimator.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
from jaxtyping import Float
from scipy import stats

Alternative = Literal["less", "greater", "two-sided"]


def newey_west_lag(n: int) -> int:
    """Newey & West (1994) automatic bandwidth floor(4 (n / 100)^(2/9))."""
    return int(math.floor(4.0 * (n / 100.0) ** (2.0 / 9.0))) if n > 0 else 0


def hac_variance(d: Float[np.ndarray, " T"], max_lag: int) -> float:
    """Newey–West long-run variance of ``d``: gamma_0 + 2 sum_{k=1}^{L} (1 - k/(L+1)) gamma_k (1/T autocovariances)."""
    n = d.shape[0]
    e = d - d.mean()
    var = float(e @ e) / n
    for k in range(1, min(max_lag, n - 1) + 1):
        var += 2.0 * (1.0 - k / (max_lag + 1.0)) * float(e[k:] @ e[:-k]) / n
    return var


def loss_differential(loss_challenger: Any, loss_champion: Any) -> Float[np.ndarray, " T"]:
    """Per-step ``challenger - champion`` loss; a (B, T) panel is averaged over series per step; NaN steps dropped."""
    a = np.asarray(loss_challenger, dtype=np.float64)
    b = np.asarray(loss_champion, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"loss series differ in shape: challenger {a.shape} vs champion {b.shape}")
    if a.ndim not in (1, 2):
        raise ValueError(f"losses must be (T,) or (B, T), got shape {a.shape}")
    d = a - b
    if d.ndim == 2:
        with np.errstate(invalid="ignore"):
            counts = np.isfinite(d).sum(axis=0)
            d = np.where(counts > 0, np.nansum(np.where(np.isfinite(d), d, 0.0), axis=0) / np.maximum(counts, 1), np.nan)
    return d[np.isfinite(d)]


def diebold_mariano(
    loss_challenger: Any,
    loss_champion: Any,
    *,
    h: int = 1,
    alternative: Alternative = "less",
    max_lag: int | None = None,
) -> tuple[float, float]:
    """Diebold–Mariano test of equal predictive accuracy on ``d_t = L_challenger,t - L_champion,t``.

    ``DM = mean(d) / sqrt(V / T)`` with ``V`` the Newey–West HAC variance of ``d`` at lag ``max_lag``
    (default ``h - 1``, DM 1995: an h-step forecast error is MA(h-1)); p-value from the standard normal.
    ``alternative="less"``: H1 is that the challenger's expected loss is lower (small p favours it).
    Returns ``(statistic, p_value)``; a constant differential gives +-inf (or 0) with p in {0, 1}.
    """
    if h < 1:
        raise ValueError(f"h must be >= 1, got {h}")
    d = loss_differential(loss_challenger, loss_champion)
    n = d.shape[0]
    if n < 2:
        raise ValueError(f"Diebold–Mariano needs at least 2 finite loss differences, got {n}")
    lag = h - 1 if max_lag is None else int(max_lag)
    mean = float(d.mean())
    var = hac_variance(d, lag)
    if var <= 1e-300 * max(1.0, mean * mean):
        stat = 0.0 if mean == 0.0 else math.copysign(math.inf, mean)
    else:
        stat = mean / math.sqrt(var / n)
    if alternative == "less":
        p = float(stats.norm.cdf(stat))
    elif alternative == "greater":
        p = float(stats.norm.sf(stat))
    elif alternative == "two-sided":
        p = float(2.0 * stats.norm.sf(abs(stat)))
    else:
        raise ValueError(f"alternative must be 'less', 'greater' or 'two-sided', got {alternative!r}")
    if stat == 0.0 and mean == 0.0:
        p = 1.0  # identical losses: no evidence either way
    return float(stat), min(1.0, p)


@dataclasses.dataclass(frozen=True)
class PromotionDecision:
    promote: bool
    reason: str
    champion_score: float
    challenger_score: float
    improvement: float
    dm_stat: float
    p_value: float
    n_steps: int = 0
    dm_lag: int = 0
    # The version of the champion config file the gate judged: promotion applies the decision only while the
    # file still holds it (None: no check, for decisions made outside a config file).
    champion_version: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def relative_improvement(champion_objective: float, challenger_objective: float) -> float:
    """``(champion - challenger) / |champion|`` for a lower-is-better objective."""
    if champion_objective == 0.0:
        return 0.0 if challenger_objective == 0.0 else math.copysign(math.inf, -challenger_objective)
    return (champion_objective - challenger_objective) / abs(champion_objective)


def promotion_decision(
    champion_objective: float,
    challenger_objective: float,
    champion_losses: Any,
    challenger_losses: Any,
    *,
    min_improvement: float,
    alpha: float,
    h: int = 1,
    max_lag: int | None = None,
) -> PromotionDecision:
    """Promote only if the relative improvement >= ``min_improvement`` AND the one-sided DM p < ``alpha``.

    The DM variance uses the Newey–West automatic bandwidth (``max_lag=None``): per-step losses of one-step
    forecasts are autocorrelated (volatility clustering), so lag 0 would overstate significance.
    """
    champ, chal = float(champion_objective), float(challenger_objective)
    improvement = relative_improvement(champ, chal)
    d = loss_differential(challenger_losses, champion_losses)
    lag = newey_west_lag(d.shape[0]) if max_lag is None else int(max_lag)
    lag = max(lag, h - 1)
    if not (math.isfinite(champ) and math.isfinite(chal)):
        return PromotionDecision(False, f"reject: non-finite objective (champion {champ}, challenger {chal})",
                                 champ, chal, improvement, math.nan, 1.0, int(d.shape[0]), lag)
    if d.shape[0] < 2:
        return PromotionDecision(False, f"reject: only {d.shape[0]} comparable holdout steps",
                                 champ, chal, improvement, math.nan, 1.0, int(d.shape[0]), lag)
    stat, p = diebold_mariano(challenger_losses, champion_losses, h=h, alternative="less", max_lag=lag)
    scores = f"champion {champ:.6g}, challenger {chal:.6g}, improvement {improvement:.3%}, DM {stat:.3f}, p {p:.4g}"
    if improvement <= 1e-12:  # an exact tie up to float rounding is not an improvement
        reason = f"reject: challenger not better ({scores})"
    elif improvement < min_improvement:
        reason = f"reject: improvement below min_improvement={min_improvement:g} ({scores})"
    elif not p < alpha:
        reason = f"reject: not significant, p >= promotion_alpha={alpha:g} ({scores})"
    else:
        reason = f"promote: {scores}"
    return PromotionDecision(reason.startswith("promote"), reason, champ, chal, improvement, stat, p,
                             int(d.shape[0]), lag)


def decide_from_config(cfg: Mapping[str, Any], champion_objective: float, challenger_objective: float,
                       champion_losses: Any, challenger_losses: Any) -> PromotionDecision:
    """:func:`promotion_decision` with ``min_improvement`` and ``alpha`` from ``[promotion]`` of ``cfg``."""
    return promotion_decision(champion_objective, challenger_objective, champion_losses, challenger_losses,
                              min_improvement=cfg["promotion.min_improvement"], alpha=cfg["promotion.promotion_alpha"])


def _holdout_losses(result: Any) -> tuple[float, np.ndarray]:
    """(objective, per-step losses) from a backtest result (attribute or mapping access)."""
    def get(name: str) -> Any:
        if isinstance(result, Mapping):
            return result[name]
        return getattr(result, name)

    for obj_name in ("objective", "holdout_objective"):
        try:
            objective = float(get(obj_name))
            break
        except (KeyError, AttributeError):
            continue
    else:
        raise KeyError("backtest result has no 'objective'")
    for loss_name in ("holdout_losses", "step_losses", "losses"):
        try:
            return objective, np.asarray(get(loss_name), dtype=np.float64)
        except (KeyError, AttributeError):
            continue
    raise KeyError("backtest result has no per-step holdout losses ('holdout_losses' / 'step_losses' / 'losses')")


def evaluate_promotion(
    champion_cfg: Mapping[str, Any],
    challenger_cfg: Mapping[str, Any],
    panel: Any,
    *,
    backtest: Any = None,
    min_improvement: float | None = None,
    alpha: float | None = None,
) -> PromotionDecision:
    """Backtest champion and challenger on the same holdout folds of ``panel`` and apply the gate.

    ``backtest(cfg, panel, folds=None)`` defaults to ``usp_core.backtest.runner.run_backtest(...,
    include="holdout")``; the challenger is run on the champion's folds (``result.folds``) so both are scored
    on the same steps. Thresholds default to the champion's ``[promotion]`` section.
    """
    if backtest is None:
        from usp_core.backtest.runner import run_backtest

        def backtest(cfg: Any, data: Any, folds: Any = None) -> Any:
            return run_backtest(cfg, data, include="holdout", folds=folds)

    champ_result = backtest(champion_cfg, panel)
    chal_result = backtest(challenger_cfg, panel, folds=_get(champ_result, "folds"))
    champ_targets, chal_targets = _get(champ_result, "holdout_targets"), _get(chal_result, "holdout_targets")
    if champ_targets is not None and chal_targets is not None and not np.array_equal(champ_targets, chal_targets):
        raise ValueError("champion and challenger holdout steps differ; the gate needs losses on the same steps")
    champ_obj, champ_losses = _holdout_losses(champ_result)
    chal_obj, chal_losses = _holdout_losses(chal_result)
    return promotion_decision(
        champ_obj, chal_obj, champ_losses, chal_losses,
        min_improvement=champion_cfg["promotion.min_improvement"] if min_improvement is None else min_improvement,
        alpha=champion_cfg["promotion.promotion_alpha"] if alpha is None else alpha,
    )


def _get(result: Any, name: str) -> Any:
    return result.get(name) if isinstance(result, Mapping) else getattr(result, name, None)


__all__: Sequence[str] = (
    "PromotionDecision", "decide_from_config", "diebold_mariano", "evaluate_promotion", "hac_variance",
    "loss_differential", "newey_west_lag", "promotion_decision", "relative_improvement",
)
