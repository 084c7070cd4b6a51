"""Baselines of SPEC §4.3, aligned like ``Predictor.run``: entry t forecasts values[..., t+1] from values[..., :t+1].

Missing values (NaN) are carried forward as the last observation, the same way the predictor's gate holds
its state on a rejected value.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pandas as pd
from jaxtyping import Float
from scipy import signal, stats


class BaselineForecast(NamedTuple):
    prediction: np.ndarray
    sigma: np.ndarray
    lower: np.ndarray
    upper: np.ndarray


def _forward_fill(values: Float[np.ndarray, "B T"]) -> np.ndarray:
    return pd.DataFrame(values.T).ffill().to_numpy().T


def _sigma_floor(level: np.ndarray) -> np.ndarray:
    """A constant series has zero spread; the floor keeps the Gaussian well defined (CRPS -> |error|)."""
    return 1e-12 * np.maximum(np.abs(level), 1.0)


def gaussian_interval(prediction, sigma, level: float) -> tuple[np.ndarray, np.ndarray]:
    half = stats.norm.ppf(0.5 + level / 2.0) * sigma
    return prediction - half, prediction + half


def naive_forecast(values: Float[np.ndarray, "B T"], *, window: int, level: float) -> BaselineForecast:
    """Last value; sigma = sample std of the last ``window`` first differences (ddof 1), NaN until two exist."""
    filled = _forward_fill(np.atleast_2d(np.asarray(values, dtype=np.float64)))
    diffs = np.diff(filled, axis=1, prepend=np.nan)
    rolling_std = pd.DataFrame(diffs.T).rolling(window, min_periods=2).std(ddof=1).to_numpy().T
    sigma = np.maximum(rolling_std, _sigma_floor(filled))
    sigma = np.where(np.isfinite(rolling_std), sigma, np.nan)
    lower, upper = gaussian_interval(filled, sigma, level)
    return BaselineForecast(filled, sigma, lower, upper)


def _ewma(x: np.ndarray, alpha: float, initial: np.ndarray) -> np.ndarray:
    """s_t = alpha x_t + (1 - alpha) s_{t-1}, s_{-1} = initial, along the last axis."""
    zi = ((1.0 - alpha) * initial)[..., None]
    return signal.lfilter([alpha], [1.0, -(1.0 - alpha)], x, axis=-1, zi=zi)[0]


def ewma_forecast(values: Float[np.ndarray, "B T"], *, alpha: float, level: float) -> BaselineForecast:
    """EWMA level l_t = alpha y_t + (1 - alpha) l_{t-1} (l_0 = y_0) as the forecast; sigma^2 is the
    bias-corrected EWMA (same alpha) of the squared one-step errors y_t - l_{t-1}."""
    filled = _forward_fill(np.atleast_2d(np.asarray(values, dtype=np.float64)))
    first = filled[:, 0]
    level_path = _ewma(filled, alpha, first)
    errors = np.zeros_like(filled)
    errors[:, 1:] = filled[:, 1:] - level_path[:, :-1]
    raw_var = _ewma(errors**2, alpha, np.zeros_like(first))
    steps = np.arange(filled.shape[1])
    # Step 0 has no error yet (weight 0); the bias correction divides by the weight mass of steps 1..t.
    mass = 1.0 - (1.0 - alpha) ** steps
    with np.errstate(invalid="ignore", divide="ignore"):
        variance = np.where(steps > 0, raw_var / np.where(mass > 0, mass, 1.0), np.nan)
    sigma = np.maximum(np.sqrt(variance), _sigma_floor(level_path))
    sigma = np.where(np.isfinite(variance), sigma, np.nan)
    lower, upper = gaussian_interval(level_path, sigma, level)
    return BaselineForecast(level_path, sigma, lower, upper)


def kernel_forecast(kernel_predictions, kernel_sigmas, k: int, *, level: float) -> BaselineForecast:
    """Kernel k alone: its own prediction with a Gaussian interval from its own sigma."""
    prediction = np.asarray(kernel_predictions[..., k], dtype=np.float64)
    sigma = np.asarray(kernel_sigmas[..., k], dtype=np.float64)
    lower, upper = gaussian_interval(prediction, sigma, level)
    return BaselineForecast(prediction, sigma, lower, upper)


GARCH_REFIT_EVERY = 50
GARCH_MIN_FIT = 100
_GARCH_CACHE: dict[tuple, BaselineForecast] = {}


def _garch_series(y: np.ndarray, first_origin: int, refit_every: int, min_fit: int) -> tuple[np.ndarray, np.ndarray]:
    """Constant-mean normal GARCH(1,1) forecasts of y[t + 1] at every origin t >= first_origin (NaN before).

    Parameters are refitted every ``refit_every`` origins on y[: origin + 1] standardised by that segment's
    std (arch's optimiser is scale sensitive; the model is scale equivariant), and the conditional variance
    h[t + 1] of the fixed-parameter filter depends on y[: t + 1] only."""
    from arch import arch_model

    length = y.shape[0]
    mean, sigma = np.full(length, np.nan), np.full(length, np.nan)
    for origin in range(max(first_origin, min_fit - 1), length, refit_every):
        train = y[: origin + 1]
        scale = float(np.std(train))
        if not np.isfinite(scale) or scale <= 0:
            continue
        fitted = arch_model(train / scale, mean="Constant", vol="GARCH", p=1, q=1, dist="normal", rescale=False)
        params = fitted.fit(disp="off", show_warning=False).params
        stop = min(origin + refit_every, length)
        # h[stop] depends on y[: stop] only, so a placeholder stands in for y[stop] (unseen when stop == length)
        extended = np.append(y[:stop], 0.0) / scale
        filtered = arch_model(extended, mean="Constant", vol="GARCH", p=1, q=1, dist="normal", rescale=False).fix(params)
        volatility = np.asarray(filtered.conditional_volatility)
        mean[origin:stop] = float(params["mu"]) * scale
        sigma[origin:stop] = volatility[origin + 1 : stop + 1] * scale
    return mean, sigma


def garch_forecast(values: Float[np.ndarray, "B T"], *, level: float, first_origins: np.ndarray | None = None,
                   refit_every: int = GARCH_REFIT_EVERY, min_fit: int = GARCH_MIN_FIT) -> BaselineForecast:
    """GARCH(1,1) with constant mean and normal innovations (``arch``), refitted every ``refit_every`` steps on
    the data before the origin (SPEC §4.3). Trailing NaN padding is ignored; interior NaNs are carried forward.
    Origins before ``first_origins`` (per series; default: from the first fit) stay NaN, which saves fits that
    no metric reads. Results are cached on the data, so tuning trials do not refit."""
    filled = _forward_fill(np.atleast_2d(np.asarray(values, dtype=np.float64)))
    batch, length = filled.shape
    origins = np.zeros(batch, dtype=np.int64) if first_origins is None else np.asarray(first_origins, dtype=np.int64)
    key = (filled.tobytes(), origins.tobytes(), level, refit_every, min_fit)
    if key not in _GARCH_CACHE:
        mean, sigma = np.full(filled.shape, np.nan), np.full(filled.shape, np.nan)
        for b in range(batch):
            finite = np.isfinite(np.atleast_2d(values)[b])
            n = int(np.flatnonzero(finite)[-1]) + 1 if finite.any() else 0
            mean[b, :n], sigma[b, :n] = _garch_series(filled[b, :n], int(origins[b]), refit_every, min_fit)
        lower, upper = gaussian_interval(mean, sigma, level)
        if len(_GARCH_CACHE) >= 8:
            _GARCH_CACHE.clear()
        _GARCH_CACHE[key] = BaselineForecast(mean, sigma, lower, upper)
    return _GARCH_CACHE[key]
