"""Kernel A: RKHS kernel ridge forecast with a WTMM Hoelder diagnostic (SPEC §3.4 A).

Forecast: the z-scored window is delay-embedded (x_i = z[i : i + d]) and a Gaussian kernel with the
median-heuristic bandwidth times ``kernel_a_bandwidth`` gives a kernel ridge / GP regression of the next
increment (or level, ``kernel_a_target``). Its noise-to-signal ratio r is estimated from the data by the fixed
point r = sigma_n^2 / sigma_f^2 of the fit with s = lambda + r, where sigma_n^2 = RSS / (m - tr H) is the
degrees-of-freedom-corrected in-sample residual variance and sigma_f^2 = mean(y^2) - sigma_n^2, so a tiny
``kernel_ridge_lambda`` cannot interpolate the noise. The iteration runs across time: each step fits once with
the ratio of the previous step's fit (carried), plus ``kernel_a_noise_iterations`` refits; the initial window
iterates ``INITIAL_NOISE_FITS`` times from r = 1. Consecutive windows share all but one point, so the carried
ratio is the converged one to within a step's change, at one Cholesky per step.
sigma^2 = GP posterior variance sigma_f^2 (1 - k*' (K + s I)^-1 k*) + sigma_n^2.

The Gram matrix, its factorisation and the solves run in ``kernel_a_dtype`` (float32 by default; the window is
z-scored in core.dtype, and the forecast and the carried ratio return in it). A factorisation that fails in float32
(a near-noiseless window with a tiny lambda) falls back to the last value like any failed fit.

The Hoelder diagnostic of SPEC §3.4 A (usp_core.kernels.wtmm) reads a longer history than the window; the
engine keeps that buffer and refreshes the estimate every ``wtmm_stride`` steps (usp_core.engine.step).
"""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

import jax.lax.linalg as lax_linalg
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from usp_core.kernels.contract import ForecastKernel, KernelResult, tiny_floor, to_data_units, zscore
from usp_core.kernels.sorting import median

METADATA_KEYS: tuple[str, ...] = ()

INITIAL_NOISE_RATIO = 1.0
"""Noise-to-signal ratio of the first fit: z-scored data have unit variance, so noise cannot exceed ~1."""

INITIAL_NOISE_FITS = 4
"""Fixed-point fits of the noise ratio on the initial window (once, at init)."""


class RidgeCarry(NamedTuple):
    noise_ratio: Float[Array, ""]
    """sigma_n^2 / sigma_f^2 of the last fit: where the next step's fit starts."""


def delay_embed(z: Float[Array, " n"], dim: int) -> tuple[Float[Array, "m d"], Float[Array, " m"], Float[Array, " d"]]:
    """Training inputs z[i : i + dim], targets z[i + dim] (m = n - dim pairs) and the query z[n - dim :]."""
    n = z.shape[0]
    m = n - dim
    idx = jnp.arange(m)[:, None] + jnp.arange(dim)[None, :]
    return z[idx], z[dim:], z[m:]


MEDIAN_PAIRS = 128
"""Pairs sampled for the median heuristic: a sort of all m(m-1)/2 pairs would cost more than the fit."""


@lru_cache(maxsize=16)
def _median_pairs(m: int) -> tuple[np.ndarray, np.ndarray]:
    rows, cols = np.triu_indices(m, k=1)
    if rows.size > MEDIAN_PAIRS:
        pick = np.sort(np.random.default_rng(0).choice(rows.size, MEDIAN_PAIRS, replace=False))
        rows, cols = rows[pick], cols[pick]
    return rows, cols


def median_bandwidth(sq_dists: Float[Array, "m m"], eps: Float[Array, ""]) -> Float[Array, ""]:
    """Median heuristic: the median distance between distinct training inputs, over a fixed sample of
    MEDIAN_PAIRS pairs (floored so that a constant window still has a positive bandwidth)."""
    rows, cols = _median_pairs(sq_dists.shape[0])
    return jnp.sqrt(jnp.maximum(median(sq_dists[rows, cols]), jnp.maximum(eps, 1e-12)))


def gaussian_gram(a: Float[Array, "p d"], b: Float[Array, "r d"]) -> Float[Array, "p r"]:
    return jnp.maximum(jnp.sum(a**2, -1)[:, None] + jnp.sum(b**2, -1)[None, :] - 2.0 * a @ b.T, 0.0)


class RidgeFit(NamedTuple):
    chol_inv: Float[Array, "m m"]
    alpha: Float[Array, " m"]
    noise_var: Float[Array, ""]
    signal_var: Float[Array, ""]


def fit_ridge(gram: Float[Array, "m m"], y: Float[Array, " m"], ratio: Float[Array, ""]) -> RidgeFit:
    """Solve (K + s I) alpha = y through the inverse Cholesky factor L^-1 (all later solves are matvecs).
    Noise variance RSS / (m - tr H) with H = K (K + s I)^-1; signal variance = mean(y^2) - noise variance
    (floored at 1% of mean(y^2))."""
    m = y.shape[0]
    # The Gram matrix is symmetric (up to the matmul's rounding; the factorisation reads one triangle), so its
    # transpose serves, and XLA hands that to LAPACK's column-major layout as a bitcast; jnp.linalg.cholesky
    # would symmetrise (a copy) and lay it out (another).
    chol = lax_linalg.cholesky(gram.T + ratio * jnp.eye(m, dtype=gram.dtype), symmetrize_input=False)
    # L^-1 from X L = I: XLA's right-sided triangular solve is ~3x cheaper on CPU than L X = I under vmap
    chol_inv = lax_linalg.triangular_solve(chol, jnp.eye(m, dtype=gram.dtype), left_side=False, lower=True)
    alpha = chol_inv.T @ (chol_inv @ y)
    trace_inv = jnp.sum(chol_inv**2)  # tr (K + sI)^-1, and m - tr H = s tr (K + sI)^-1
    tiny = tiny_floor(y.dtype)
    noise_var = ratio * jnp.sum(alpha**2) / jnp.maximum(trace_inv, tiny)  # residual y - K alpha = s alpha
    power = jnp.mean(y**2)
    signal_var = jnp.maximum(power - noise_var, 0.01 * power) + tiny
    return RidgeFit(chol_inv, alpha, noise_var, signal_var)


def krr_forecast(z: Float[Array, " n"], static, params, noise_ratio: Float[Array, ""] | float = INITIAL_NOISE_RATIO,
                 refits: int | None = None) -> tuple[Float[Array, ""], Float[Array, ""], Float[Array, ""]]:
    """One-step forecast, predictive std on the z scale and the fit's noise ratio, from a fit with
    s = lambda + ``noise_ratio`` and ``refits`` more (default ``kernel_a_noise_iterations``). With
    ``kernel_a_target = "increment"`` the regression target is the next increment, so far from the training
    inputs (trends, random walks) the forecast falls back to the last value; with "level" it is the next value
    (better on stationary oscillations, worse on persistent series)."""
    dtype = jnp.dtype(static.kernel_a_dtype)
    x, target, query = delay_embed(z.astype(dtype), static.kernel_a_embedding_dim)
    persistence = 1.0 if static.kernel_a_target == "increment" else 0.0
    y = target - persistence * x[:, -1]
    sq = gaussian_gram(x, x)
    bandwidth = (params["kernel_a_bandwidth"] * median_bandwidth(sq, params["numerical_epsilon"])).astype(dtype)
    gram = jnp.exp(-sq / (2.0 * bandwidth**2))
    k_star = jnp.exp(-gaussian_gram(x, query[None, :])[:, 0] / (2.0 * bandwidth**2))
    lam = params["kernel_ridge_lambda"].astype(dtype)
    start = jnp.asarray(noise_ratio, dtype)

    fit = fit_ridge(gram, y, lam + start)
    for _ in range(static.kernel_a_noise_iterations if refits is None else refits):
        fit = fit_ridge(gram, y, lam + fit.noise_var / fit.signal_var)

    mean = k_star @ fit.alpha
    v = fit.chol_inv @ k_star
    sigma = jnp.sqrt(fit.signal_var * jnp.maximum(1.0 - v @ v, 0.0) + fit.noise_var)
    # a numerically failed Cholesky (NaN) falls back to the last value with unit z-scale uncertainty
    ok = jnp.isfinite(mean) & jnp.isfinite(sigma)
    ratio = fit.noise_var / fit.signal_var
    next_ratio = jnp.where(jnp.isfinite(ratio), ratio, start).astype(z.dtype)
    mean, sigma = mean.astype(z.dtype), sigma.astype(z.dtype)
    return persistence * z[-1] + jnp.where(ok, mean, 0.0), jnp.where(ok, sigma, 1.0), next_ratio


def init_carry(past: Float[Array, " m"], static, params, key) -> RidgeCarry:
    z, _, _ = zscore(past[-static.base_min_signal_length:], params["numerical_epsilon"])
    *_, ratio = krr_forecast(z, static, params, refits=INITIAL_NOISE_FITS - 1)
    return RidgeCarry(ratio)


def forecast(window: Float[Array, " n"], carry: RidgeCarry, key, static, params) -> KernelResult:
    eps = params["numerical_epsilon"]
    z, loc, scale = zscore(window, eps)
    pred_z, sigma_z, ratio = krr_forecast(z, static, params, carry.noise_ratio)
    pred, sigma = to_data_units(pred_z, sigma_z, loc, scale, eps)
    return KernelResult(pred, sigma, {}, RidgeCarry(ratio))


KERNEL = ForecastKernel("ridge", init_carry, forecast, METADATA_KEYS)
