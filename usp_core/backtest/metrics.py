"""Forecast metrics of SPEC §4.2 on NaN-masked (B, L) arrays (numpy; evaluation is not on the hot path).

An entry takes part in a series' metrics only where the actual, the forecast and its sigma/interval are all
finite; a series with no such entry gets NaN metrics.
"""

from __future__ import annotations

import numpy as np
from jaxtyping import Float
from scipy import special, stats

POINT_METRICS = ("mae", "rmse", "mse", "mase", "smape")
PROBABILISTIC_METRICS = ("crps", "coverage", "width", "interval_score")
SCALE_FREE_METRICS = ("mase", "smape", "coverage", "relative_mse", "relative_mae", "crps_ratio", "crps_skill")

_INV_SQRT_PI = 1.0 / np.sqrt(np.pi)


def gaussian_crps(actual, mean, sigma) -> np.ndarray:
    """CRPS of N(mean, sigma^2) at ``actual``: sigma [z (2 Phi(z) - 1) + 2 phi(z) - 1/sqrt(pi)] (Gneiting &
    Raftery 2007, eq. 21), z = (actual - mean) / sigma."""
    sigma = np.asarray(sigma, dtype=np.float64)
    z = (np.asarray(actual, dtype=np.float64) - mean) / sigma
    return sigma * (z * special.erf(z / np.sqrt(2.0)) + 2.0 * stats.norm.pdf(z) - _INV_SQRT_PI)


def interval_score(actual, lower, upper, level: float) -> np.ndarray:
    """Winkler / interval score of the central (level) interval: width + (2/alpha) * distance outside."""
    alpha = 1.0 - level
    below = np.maximum(lower - actual, 0.0)
    above = np.maximum(actual - upper, 0.0)
    return (upper - lower) + (2.0 / alpha) * (below + above)


def symmetric_ape(actual, forecast) -> np.ndarray:
    """sMAPE term in percent, 200 |a - f| / (|a| + |f|), defined as 0 when both are 0."""
    denominator = np.abs(actual) + np.abs(forecast)
    with np.errstate(invalid="ignore", divide="ignore"):
        term = 200.0 * np.abs(actual - forecast) / denominator
    return np.where(denominator == 0.0, 0.0, term)


def naive_scale(values: Float[np.ndarray, "B T"], segments: list[list[range]]) -> Float[np.ndarray, " B"]:
    """In-sample naive MAE per series: mean |y_t - y_{t-1}| over each series' train range (the MASE scale)."""
    scales = np.full(values.shape[0], np.nan)
    for b, train_ranges in enumerate(segments):
        idx = np.unique(np.concatenate([np.arange(max(r.start, 1), r.stop) for r in train_ranges] or [np.arange(0)]))
        if idx.size:
            diffs = np.abs(values[b, idx] - values[b, idx - 1])
            scales[b] = np.nanmean(diffs) if np.isfinite(diffs).any() else np.nan
    return scales


def _masked_mean(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    count = mask.sum(axis=-1)
    total = np.where(mask, x, 0.0).sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def forecast_metrics(
    actual: Float[np.ndarray, "B L"],
    prediction: Float[np.ndarray, "B L"],
    sigma: Float[np.ndarray, "B L"],
    lower: Float[np.ndarray, "B L"],
    upper: Float[np.ndarray, "B L"],
    *,
    mase_scale: Float[np.ndarray, " B"],
    level: float,
) -> dict[str, Float[np.ndarray, " B"]]:
    """Per-series MAE, RMSE, MSE, MASE, sMAPE, Gaussian CRPS, coverage, mean width and interval score."""
    mask = np.isfinite(actual) & np.isfinite(prediction) & np.isfinite(sigma) & (sigma > 0)
    mask &= np.isfinite(lower) & np.isfinite(upper)
    safe = lambda a: np.where(mask, a, 0.0)  # noqa: E731 -- keeps NaN out of the arithmetic below
    y, f, s, lo, hi = safe(actual), safe(prediction), np.where(mask, sigma, 1.0), safe(lower), safe(upper)
    error = y - f
    mae = _masked_mean(np.abs(error), mask)
    mse = _masked_mean(error**2, mask)
    with np.errstate(invalid="ignore", divide="ignore"):
        mase = mae / np.where(mase_scale > 0, mase_scale, np.nan)
    return {
        "mae": mae,
        "rmse": np.sqrt(mse),
        "mse": mse,
        "mase": mase,
        "smape": _masked_mean(symmetric_ape(y, f), mask),
        "crps": _masked_mean(gaussian_crps(y, f, s), mask),
        "coverage": _masked_mean(((y >= lo) & (y <= hi)).astype(np.float64), mask),
        "width": _masked_mean(hi - lo, mask),
        "interval_score": _masked_mean(interval_score(y, lo, hi, level), mask),
        "n_points": mask.sum(axis=-1).astype(np.float64),
    }


def relative_to(metrics: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Scale-free ratios against a reference model (the naive baseline): relative MSE/MAE, CRPS ratio and
    CRPS skill = 1 - CRPS / CRPS_reference."""
    with np.errstate(invalid="ignore", divide="ignore"):
        crps_ratio = metrics["crps"] / reference["crps"]
        return {
            "relative_mse": metrics["mse"] / reference["mse"],
            "relative_mae": metrics["mae"] / reference["mae"],
            "crps_ratio": crps_ratio,
            "crps_skill": 1.0 - crps_ratio,
        }


OBJECTIVE_DESCRIPTIONS = {
    "relative_crps": "mean over series of CRPS / CRPS of the naive forecast (1 - CRPS skill); lower is better, 1 = naive",
    "relative_mse": "mean over series of MSE / MSE of the naive forecast; lower is better, 1 = naive",
    "mase": "mean over series of MAE / in-sample naive MAE (MASE); lower is better",
}


def objective_value(name: str, per_series: dict[str, np.ndarray]) -> float:
    """Tuning/promotion objective, lower is better: mean over series of CRPS/CRPS_naive (``relative_crps``, one
    minus the CRPS skill), of MSE/MSE_naive (``relative_mse``) or of MASE (``mase``)."""
    column = {"relative_crps": "crps_ratio", "relative_mse": "relative_mse", "mase": "mase"}.get(name)
    if column is None:
        raise ValueError(f"unknown objective {name!r}; expected relative_crps, relative_mse or mase")
    values = per_series[column]
    finite = np.isfinite(values)
    return float(values[finite].mean()) if finite.any() else float("nan")


def step_losses(name: str, actual, prediction, sigma, reference_loss: Float[np.ndarray, " B"]) -> np.ndarray:
    """Per-step losses matching the objective, scaled per series by the reference (naive) mean loss so that
    losses of different series are comparable (input of the Diebold–Mariano promotion test)."""
    if name == "relative_mse":
        raw = (actual - prediction) ** 2
    elif name == "relative_crps":
        raw = gaussian_crps(actual, prediction, sigma)
    elif name == "mase":
        raw = np.abs(actual - prediction)
    else:
        raise ValueError(f"unknown objective {name!r}")
    with np.errstate(invalid="ignore", divide="ignore"):
        return raw / reference_loss[:, None]
