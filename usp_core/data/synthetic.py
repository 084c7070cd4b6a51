"""Seeded synthetic processes for tests, demos and benchmarks (SPEC §4.4).

Every generator is plain numpy (float64), takes ``seed`` (an int or a ``numpy.random.Generator``) and returns
``n`` points. Paths start at their initial value (``x[0] == x0``); with ``batch=k`` the result has shape
``(k, n)`` and every row is an independent path. Exact discretisations are used wherever one exists (OU, GBM,
fBm), so moment tests hold at any ``dt``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from jaxtyping import Float, Int
from numpy.typing import ArrayLike
from scipy import signal

SeedLike = int | np.random.Generator | None

__all__ = [
    "ar_process",
    "garch_returns",
    "brownian_motion",
    "fractional_brownian_motion",
    "fractional_gaussian_noise",
    "fgn_autocovariance",
    "geometric_brownian_motion",
    "inject_frozen",
    "inject_outliers",
    "merton_jump_diffusion",
    "noisy_sine",
    "ornstein_uhlenbeck",
    "regime_switching",
    "student_t_noise",
    "student_t_series",
]


def _rng(seed: SeedLike) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def _shape(n: int, batch: int | None) -> tuple[int, ...]:
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return (n,) if batch is None else (batch, n)


def _path_from_increments(x0: float, increments: np.ndarray) -> np.ndarray:
    """x[0] = x0, x[t] = x0 + sum of the first t increments (increments has n - 1 entries on the last axis)."""
    start = np.full(increments.shape[:-1] + (1,), x0, dtype=np.float64)
    return np.concatenate([start, x0 + np.cumsum(increments, axis=-1)], axis=-1)


def brownian_motion(
    n: int, *, sigma: float = 1.0, x0: float = 0.0, seed: SeedLike, batch: int | None = None
) -> Float[np.ndarray, "*batch n"]:
    """Random walk with N(0, sigma^2) increments (Brownian motion sampled at unit steps)."""
    shape = _shape(n, batch)
    steps = sigma * _rng(seed).standard_normal(shape[:-1] + (n - 1,))
    return _path_from_increments(x0, steps)


def ornstein_uhlenbeck(
    n: int,
    *,
    theta: float,
    mu: float = 0.0,
    sigma: float = 1.0,
    dt: float = 1.0,
    x0: float | None = None,
    seed: SeedLike,
    batch: int | None = None,
) -> Float[np.ndarray, "*batch n"]:
    """dX = theta (mu - X) dt + sigma dW, exact AR(1) discretisation.

    ``x0=None`` draws the start from the stationary law N(mu, sigma^2 / (2 theta)), so the path is stationary.
    """
    if theta <= 0:
        raise ValueError(f"theta must be > 0, got {theta}")
    shape = _shape(n, batch)
    rng = _rng(seed)
    decay = np.exp(-theta * dt)
    step_std = sigma * np.sqrt((1.0 - decay**2) / (2.0 * theta))
    stationary_std = sigma / np.sqrt(2.0 * theta)
    start = rng.standard_normal(shape[:-1]) * stationary_std if x0 is None else np.full(shape[:-1], x0 - mu)
    shocks = step_std * rng.standard_normal(shape)
    shocks[..., 0] = start
    # y_t = decay * y_{t-1} + shock_t with y_0 = start: a first-order IIR filter.
    return mu + signal.lfilter([1.0], [1.0, -decay], shocks, axis=-1)


def geometric_brownian_motion(
    n: int,
    *,
    mu: float,
    sigma: float,
    dt: float = 1.0,
    x0: float = 1.0,
    seed: SeedLike,
    batch: int | None = None,
) -> Float[np.ndarray, "*batch n"]:
    """dS = mu S dt + sigma S dW, exact: log-increments N((mu - sigma^2/2) dt, sigma^2 dt)."""
    shape = _shape(n, batch)
    z = _rng(seed).standard_normal(shape[:-1] + (n - 1,))
    log_steps = (mu - 0.5 * sigma**2) * dt + sigma * np.sqrt(dt) * z
    return x0 * np.exp(_path_from_increments(0.0, log_steps))


def fgn_autocovariance(lags: ArrayLike, hurst: float) -> np.ndarray:
    """Autocovariance of unit-variance fractional Gaussian noise: (|k+1|^2H - 2|k|^2H + |k-1|^2H) / 2."""
    k = np.abs(np.asarray(lags, dtype=np.float64))
    h2 = 2.0 * hurst
    return 0.5 * (np.abs(k + 1.0) ** h2 - 2.0 * k**h2 + np.abs(k - 1.0) ** h2)


def fractional_gaussian_noise(
    n: int, hurst: float, *, seed: SeedLike, batch: int | None = None
) -> Float[np.ndarray, "*batch n"]:
    """Exact unit-variance fGn by circulant embedding (Davies–Harte).

    The 2n circulant embedding of the fGn covariance is non-negative definite for every H in (0, 1), so the
    sample has exactly the fGn covariance (up to float rounding of eigenvalues clipped at 0).
    """
    if not 0.0 < hurst < 1.0:
        raise ValueError(f"hurst must be in (0, 1), got {hurst}")
    shape = _shape(n, batch)
    gamma = fgn_autocovariance(np.arange(n + 1), hurst)
    circulant_row = np.concatenate([gamma, gamma[-2:0:-1]])  # length 2n
    m = circulant_row.size
    eigenvalues = np.clip(np.fft.fft(circulant_row).real, 0.0, None)
    rng = _rng(seed)
    noise = rng.standard_normal(shape[:-1] + (m,)) + 1j * rng.standard_normal(shape[:-1] + (m,))
    # Re(F diag(sqrt(lambda)) xi) / sqrt(m) has covariance exactly C when xi has iid complex N(0, 2) entries.
    sample = np.fft.fft(np.sqrt(eigenvalues) * noise, axis=-1).real / np.sqrt(m)
    return sample[..., :n]


def fractional_brownian_motion(
    n: int, hurst: float, *, seed: SeedLike, batch: int | None = None
) -> Float[np.ndarray, "*batch n"]:
    """fBm at unit steps: B[0] = 0 and B[t] = sum of the first t unit-variance fGn increments,
    so Cov(B_s, B_t) = (s^2H + t^2H - |t - s|^2H) / 2."""
    shape = _shape(n, batch)
    if n == 1:
        return np.zeros(shape)
    increments = fractional_gaussian_noise(n - 1, hurst, seed=seed, batch=batch)
    return _path_from_increments(0.0, increments)


def merton_jump_diffusion(
    n: int,
    *,
    mu: float = 0.0,
    sigma: float = 0.2,
    jump_intensity: float = 0.1,
    jump_mean: float = 0.0,
    jump_std: float = 0.1,
    dt: float = 1.0 / 252.0,
    x0: float = 1.0,
    seed: SeedLike,
    batch: int | None = None,
    return_jumps: bool = False,
):
    """Merton jump diffusion price path: GBM times compound-Poisson lognormal jumps.

    Per step, log S gains (mu - sigma^2/2 - lambda kappa) dt + sigma sqrt(dt) Z + sum of N ~ Poisson(lambda dt)
    jumps J ~ N(jump_mean, jump_std^2), with kappa = E[e^J] - 1 so that E[S_t] = x0 e^{mu t}.
    With ``return_jumps=True`` also returns the per-step jump counts (length n, first entry 0).
    """
    shape = _shape(n, batch)
    rng = _rng(seed)
    inc_shape = shape[:-1] + (n - 1,)
    kappa = np.exp(jump_mean + 0.5 * jump_std**2) - 1.0
    drift = (mu - 0.5 * sigma**2 - jump_intensity * kappa) * dt
    counts = rng.poisson(jump_intensity * dt, size=inc_shape)
    # Sum of k iid N(m, s^2) is N(k m, k s^2).
    jumps = counts * jump_mean + np.sqrt(counts) * jump_std * rng.standard_normal(inc_shape)
    log_steps = drift + sigma * np.sqrt(dt) * rng.standard_normal(inc_shape) + jumps
    path = x0 * np.exp(_path_from_increments(0.0, log_steps))
    if return_jumps:
        zero = np.zeros(shape[:-1] + (1,), dtype=np.int64)
        return path, np.concatenate([zero, counts], axis=-1)
    return path


def regime_switching(
    n: int,
    *,
    means: Sequence[float] = (0.0, 3.0),
    vols: Sequence[float] = (1.0, 2.0),
    p_stay: float = 0.99,
    transition: ArrayLike | None = None,
    change_points: Sequence[int] | None = None,
    integrate: bool = False,
    seed: SeedLike,
) -> tuple[Float[np.ndarray, " n"], Int[np.ndarray, " n"]]:
    """Mean/volatility regime-switching series; returns (values, regime labels).

    x_t = means[s_t] + vols[s_t] * eps_t with s_t a Markov chain (``transition`` matrix, or ``p_stay`` on the
    diagonal and the rest spread evenly), started in regime 0. ``change_points`` replaces the chain by a
    deterministic schedule: the regime advances (cyclically) at each listed index. ``integrate=True`` returns
    the cumulative sum instead (regimes in the drift and volatility of the increments).
    """
    means_arr = np.asarray(means, dtype=np.float64)
    vols_arr = np.asarray(vols, dtype=np.float64)
    k = means_arr.size
    if vols_arr.size != k:
        raise ValueError(f"means and vols must have the same length, got {k} and {vols_arr.size}")
    _shape(n, None)
    rng = _rng(seed)
    if change_points is not None:
        labels = np.zeros(n, dtype=np.int64)
        for point in sorted(change_points):
            labels[point:] += 1
        labels %= k
    else:
        if transition is None:
            off = (1.0 - p_stay) / max(k - 1, 1)
            matrix = np.full((k, k), off) + np.eye(k) * (p_stay - off)
        else:
            matrix = np.asarray(transition, dtype=np.float64)
        if matrix.shape != (k, k) or not np.allclose(matrix.sum(axis=1), 1.0) or (matrix < 0).any():
            raise ValueError("transition must be a row-stochastic (k, k) matrix")
        uniforms = rng.random(n)
        cumulative = np.cumsum(matrix, axis=1)
        labels = np.empty(n, dtype=np.int64)
        state = 0
        for t in range(n):  # a Markov chain is inherently sequential; n is small in tests and demos
            labels[t] = state
            state = min(int(np.searchsorted(cumulative[state], uniforms[t], side="right")), k - 1)
    values = means_arr[labels] + vols_arr[labels] * rng.standard_normal(n)
    if integrate:
        values = np.cumsum(values)
    return values, labels


def student_t_noise(
    n: int, df: float, *, scale: float = 1.0, standardize: bool = True, seed: SeedLike, batch: int | None = None
) -> Float[np.ndarray, "*batch n"]:
    """iid Student-t draws; ``standardize=True`` (needs df > 2) rescales to standard deviation ``scale``."""
    draws = _rng(seed).standard_t(df, size=_shape(n, batch))
    if standardize:
        if df <= 2:
            raise ValueError(f"standardize needs df > 2 (finite variance), got df={df}")
        draws = draws * np.sqrt((df - 2.0) / df)
    return scale * draws


def student_t_series(
    n: int, df: float, *, sigma: float = 1.0, x0: float = 0.0, seed: SeedLike, batch: int | None = None
) -> Float[np.ndarray, "*batch n"]:
    """Random walk with standardized Student-t increments of standard deviation ``sigma`` (heavy tails)."""
    shape = _shape(n, batch)
    steps = student_t_noise(n - 1, df, scale=sigma, seed=seed, batch=batch) if n > 1 else np.zeros(shape[:-1] + (0,))
    return _path_from_increments(x0, steps)


def garch_returns(
    n: int, *, omega: float = 0.05, alpha: float = 0.1, beta: float = 0.85, seed: SeedLike, batch: int | None = None,
    burn_in: int = 500,
) -> Float[np.ndarray, "*batch n"]:
    """GARCH(1,1) returns r_t = sqrt(h_t) e_t, h_t = omega + alpha r_{t-1}^2 + beta h_{t-1}, e_t iid N(0, 1),
    started at the stationary variance omega / (1 - alpha - beta) and run ``burn_in`` steps before the sample."""
    if not alpha + beta < 1.0:
        raise ValueError(f"alpha + beta must be < 1 for a stationary GARCH(1,1), got {alpha + beta}")
    shape = _shape(n, batch)
    shocks = _rng(seed).standard_normal(shape[:-1] + (n + burn_in,))
    h = np.full(shape[:-1], omega / (1.0 - alpha - beta))
    out = np.empty_like(shocks)
    for t in range(n + burn_in):
        out[..., t] = np.sqrt(h) * shocks[..., t]
        h = omega + alpha * out[..., t] ** 2 + beta * h
    return out[..., burn_in:]


def ar_process(
    n: int,
    coeffs: Sequence[float],
    *,
    sigma: float = 1.0,
    mean: float = 0.0,
    burn_in: int = 500,
    seed: SeedLike,
    batch: int | None = None,
) -> Float[np.ndarray, "*batch n"]:
    """AR(p): x_t - mean = sum_i coeffs[i] (x_{t-1-i} - mean) + sigma eps_t, after ``burn_in`` discarded steps
    (so a stationary process starts close to its stationary law)."""
    shape = _shape(n, batch)
    total = shape[:-1] + (n + burn_in,)
    shocks = sigma * _rng(seed).standard_normal(total)
    denominator = np.concatenate([[1.0], -np.asarray(coeffs, dtype=np.float64)])
    return mean + signal.lfilter([1.0], denominator, shocks, axis=-1)[..., burn_in:]


def noisy_sine(
    n: int,
    *,
    period: float = 50.0,
    amplitude: float = 1.0,
    noise: float = 0.1,
    phase: float = 0.0,
    offset: float = 0.0,
    seed: SeedLike,
    batch: int | None = None,
) -> Float[np.ndarray, "*batch n"]:
    """offset + amplitude sin(2 pi t / period + phase) + N(0, noise^2)."""
    shape = _shape(n, batch)
    t = np.arange(n, dtype=np.float64)
    clean = offset + amplitude * np.sin(2.0 * np.pi * t / period + phase)
    return clean + noise * _rng(seed).standard_normal(shape)


def inject_frozen(x: ArrayLike, start: int, length: int) -> np.ndarray:
    """Copy of x whose values at [start, start + length) repeat the last value before ``start`` (a stuck
    sensor; x[0] when start == 0). Works along the last axis."""
    out = np.array(x, dtype=np.float64, copy=True)
    if start < 0 or length < 0 or start >= out.shape[-1]:
        raise ValueError(f"frozen segment [{start}, {start + length}) is outside a series of length {out.shape[-1]}")
    held = out[..., max(start - 1, 0)]
    out[..., start : start + length] = held[..., None]
    return out


def inject_outliers(x: ArrayLike, idx: ArrayLike, size: ArrayLike) -> np.ndarray:
    """Copy of x with ``size`` added at positions ``idx`` of the last axis (size broadcasts against idx)."""
    out = np.array(x, dtype=np.float64, copy=True)
    positions = np.atleast_1d(np.asarray(idx, dtype=np.int64))
    out[..., positions] += np.broadcast_to(np.asarray(size, dtype=np.float64), positions.shape)
    return out
