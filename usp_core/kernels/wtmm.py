"""Wavelet-transform modulus-maxima (WTMM) estimate of the Hoelder exponent (SPEC §3.4 A).

Hand-written: no maintained JAX library offers a jittable CWT + modulus-maxima chaining with static shapes.

Pipeline on a right-aligned history buffer of static length L whose last ``n_valid`` entries are data:

1. continuous wavelet transform with the Mexican hat psi(t) = (1 - t^2) exp(-t^2 / 2) (two vanishing
   moments: blind to the level and to linear trends, enough for Hoelder exponents h < 2), L1-normalised
   psi_s(t) = psi(t / s) / s so that |W(s, b)| ~ s^h at a Hoelder-h point, at ``num_scales`` log-spaced
   scales s in [1, s_max]; the filter is truncated at |t| <= SUPPORT_WIDTH * s and a coefficient is kept only
   if that whole support lies on valid (filled) buffer positions;
2. modulus maxima in b at each scale, chained from scale to scale: a maximum at scale s_j continues the line of
   the nearest maximum at s_{j-1} if it lies inside the cone |db| <= c * s_j, and carries the supremum of |W|
   along its line (this keeps Z(q, s) stable for q < 0);
3. partition function Z(q, s) = sum over maxima of sup|W|^q, tau(q) = slope of log Z(q, s) on log s;
4. Legendre spectrum D(h) = min_q (q h - tau(q)) and H = argmax_h D(h) (the middle of the argmax set).
"""

from __future__ import annotations

import math
from functools import lru_cache

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from usp_core.kernels.contract import tiny_floor

SUPPORT_WIDTH = 4.0
"""Mexican-hat truncation |t| <= 4 s: the neglected tail holds < 0.1% of the wavelet's L1 mass."""

MIN_SCALE = 1.0
MIN_MAXIMA_PER_SCALE = 2
"""A scale enters the tau(q) regression only with at least this many valid modulus maxima."""

UNDEFINED_HOLDER = 0.5
"""Reported when fewer than two scales carry maxima (e.g. a constant buffer): neutral, Brownian-like."""


def analysis_length(static) -> int:
    """Length of the history buffer the Hoelder exponent reads: the window, or ``wtmm_buffer_size`` if longer."""
    return max(static.base_min_signal_length, static.wtmm_buffer_size)


def initial_buffer(history: Float[Array, " m"], static) -> tuple[Float[Array, " L"], Int[Array, ""]]:
    """The right-aligned analysis buffer holding the last (up to L) values of ``history``, and its fill count."""
    length = analysis_length(static)
    tail = history[-length:]
    return jnp.zeros(length, history.dtype).at[length - tail.shape[0]:].set(tail), jnp.asarray(tail.shape[0], jnp.int32)


def append(buffer: Float[Array, " L"], count: Int[Array, ""], value: Float[Array, ""]) -> tuple[Float[Array, " L"], Int[Array, ""]]:
    return jnp.roll(buffer, -1).at[-1].set(value), jnp.minimum(count + 1, buffer.shape[0])


def max_scale(analysis_length: int, buffer_size: int) -> float:
    """Largest scale: the wavelet's half support SUPPORT_WIDTH * s spans at most min(buffer_size, L / 4)."""
    return max(min(buffer_size, analysis_length / 4.0) / SUPPORT_WIDTH, MIN_SCALE * 1.5)


def wavelet_scales(analysis_length: int, buffer_size: int, num_scales: int) -> np.ndarray:
    return np.geomspace(MIN_SCALE, max_scale(analysis_length, buffer_size), num_scales)


@lru_cache(maxsize=32)
def _cwt_matrix(length: int, scales: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Static (S, L, L) convolution operator and each filter's half support in samples.

    A dense operator turns the whole CWT into one matmul; at L <= 1024 it is cheaper on CPU than FFTs and
    keeps every shape static."""
    offsets = np.arange(length)[None, :] - np.arange(length)[:, None]
    ops, half = [], []
    for s in scales:
        w = int(math.ceil(SUPPORT_WIDTH * s))
        t = np.arange(-w, w + 1) / s
        psi = (1.0 - t**2) * np.exp(-(t**2) / 2.0)
        psi -= psi.mean()  # exact zero mean after truncation: the level cancels
        psi /= s
        op = np.where(np.abs(offsets) <= w, psi[np.clip(offsets + w, 0, 2 * w)], 0.0)
        ops.append(op)
        half.append(w)
    return np.stack(ops), np.asarray(half)


def cwt(buffer: Float[Array, " L"], n_valid: Int[Array, ""], scales: tuple[float, ...]) -> tuple[Float[Array, "S L"], Bool[Array, "S L"]]:
    """Mexican-hat CWT of a right-aligned buffer; returns the coefficients and their validity mask."""
    length = buffer.shape[-1]
    ops, half = _cwt_matrix(length, scales)
    position = jnp.arange(length)
    filled = position >= length - n_valid
    x = jnp.where(filled, buffer, 0.0)
    coeffs = jnp.einsum("sbt,t->sb", jnp.asarray(ops, buffer.dtype), x)
    first_valid = length - n_valid
    half = jnp.asarray(half)[:, None]
    valid = (position[None, :] - half >= first_valid) & (position[None, :] + half <= length - 1)
    return jnp.where(valid, coeffs, 0.0), valid


def modulus_maxima(coeffs: Float[Array, "S L"], valid: Bool[Array, "S L"], tiny: Float[Array, ""]) -> Bool[Array, "S L"]:
    """Local maxima of |W| in b (>= left neighbour, > right neighbour), away from invalid positions."""
    mod = jnp.abs(coeffs)
    left = jnp.pad(mod[:, :-1], ((0, 0), (1, 0)), constant_values=jnp.inf)
    right = jnp.pad(mod[:, 1:], ((0, 0), (0, 1)), constant_values=jnp.inf)
    valid_left = jnp.pad(valid[:, :-1], ((0, 0), (1, 0)))
    valid_right = jnp.pad(valid[:, 1:], ((0, 0), (0, 1)))
    return valid & valid_left & valid_right & (mod >= left) & (mod > right) & (mod > tiny)


def _nearest_previous_maximum(is_max: Bool[Array, " L"]) -> tuple[Int[Array, " L"], Int[Array, " L"]]:
    """For every position, the index of the nearest maximum (in the previous scale) and its distance."""
    length = is_max.shape[0]
    idx = jnp.arange(length)
    left = jax.lax.cummax(jnp.where(is_max, idx, -(10 * length)))
    right = jax.lax.cummin(jnp.where(is_max, idx, 10 * length), reverse=True)
    take_left = (idx - left) <= (right - idx)
    nearest = jnp.where(take_left, left, right)
    return jnp.clip(nearest, 0, length - 1), jnp.abs(nearest - idx)


def chained_suprema(coeffs: Float[Array, "S L"], is_max: Bool[Array, "S L"], scales: Float[Array, " S"],
                    cone_c: Float[Array, ""]) -> Float[Array, "S L"]:
    """sup |W| along each maxima line, lines chained across scales inside the cone |db| <= cone_c * s."""
    mod = jnp.abs(coeffs)

    def link(prev_sup, inputs):
        mod_j, max_j, prev_max, s_j = inputs
        nearest, dist = _nearest_previous_maximum(prev_max)
        linked = max_j & jnp.any(prev_max) & (dist <= cone_c * s_j)
        sup_j = jnp.where(max_j, jnp.maximum(mod_j, jnp.where(linked, prev_sup[nearest], 0.0)), 0.0)
        return sup_j, sup_j

    first = jnp.where(is_max[0], mod[0], 0.0)
    prev_max = jnp.concatenate([is_max[:1], is_max[:-1]])
    _, rest = jax.lax.scan(link, first, (mod[1:], is_max[1:], prev_max[1:], scales[1:]))
    return jnp.concatenate([first[None], rest])


def partition_exponents(suprema: Float[Array, "S L"], is_max: Bool[Array, "S L"], scales: Float[Array, " S"],
                        q: Float[Array, " Q"]) -> tuple[Float[Array, " Q"], Bool[Array, ""]]:
    """tau(q): least-squares slope of log Z(q, s) on log s over the scales with enough maxima."""
    # float32 throughout the (Q, S, L) terms: each is <= 1 and only their log-sum enters tau, which float32 carries
    # to ~1e-6; XLA:CPU's float32 exp and log are ~4x faster than float64 ones (the bulk of the WTMM)
    log_sup = jnp.log(jnp.where(is_max, suprema, 1.0).astype(jnp.float32))
    counts = jnp.sum(is_max, axis=-1)
    usable = counts >= MIN_MAXIMA_PER_SCALE
    # log-sum-exp over the maxima with the largest term q * (max or min of log sup) taken out: that needs
    # two reductions over L per scale instead of one per (q, scale)
    top = jnp.max(jnp.where(is_max, log_sup, -jnp.inf), axis=-1)
    bottom = jnp.min(jnp.where(is_max, log_sup, jnp.inf), axis=-1)
    q32 = q.astype(jnp.float32)
    shift = jnp.where(usable[None], q32[:, None] * jnp.where(q32[:, None] > 0, top[None], bottom[None]), 0.0)  # (Q, S)
    terms = jnp.where(is_max[None], jnp.exp(q32[:, None, None] * log_sup[None] - shift[..., None]), 0.0)  # (Q, S, L)
    total = jnp.sum(terms, axis=-1)
    log_z = jnp.where(usable[None], jnp.log(jnp.maximum(total, tiny_floor(jnp.float32))) + shift, 0.0).astype(
        suprema.dtype)
    weight = usable.astype(suprema.dtype)
    n_used = jnp.sum(weight)
    log_s = jnp.log(scales)
    mean_log_s = jnp.sum(weight * log_s) / jnp.maximum(n_used, 1.0)
    centred = weight * (log_s - mean_log_s)
    denom = jnp.maximum(jnp.sum(centred * (log_s - mean_log_s)), 1e-300)
    mean_log_z = jnp.sum(weight[None] * log_z, axis=-1, keepdims=True) / jnp.maximum(n_used, 1.0)
    tau = jnp.sum(centred[None] * (log_z - mean_log_z), axis=-1) / denom
    return tau, n_used >= 2


def legendre_spectrum(q: Float[Array, " Q"], tau: Float[Array, " Q"], h: Float[Array, " H"]) -> Float[Array, " H"]:
    """D(h) = min_q (q h - tau(q)) (the seed took the max: then D is convex and its argmax an endpoint)."""
    return jnp.min(q[None, :] * h[:, None] - tau[None, :], axis=-1)


def spectrum_argmax(q: Float[Array, " Q"], tau: Float[Array, " Q"]) -> Float[Array, ""]:
    """argmax_h D(h), exactly: D is concave piecewise linear, so its maximum sits on intersections of two of
    its lines; the middle of the maximising set is returned (it is an interval when q = 0 is on the grid).
    Needs q_min < 0 < q_max so that D is bounded; then H equals tau'(0) to within the q-grid spacing."""
    dq = q[:, None] - q[None, :]
    distinct = jnp.abs(dq) > 0
    h_cross = jnp.where(distinct, (tau[:, None] - tau[None, :]) / jnp.where(distinct, dq, 1.0), jnp.nan).ravel()
    d_cross = legendre_spectrum(q, tau, jnp.nan_to_num(h_cross))
    d_cross = jnp.where(jnp.isnan(h_cross), -jnp.inf, d_cross)
    d_max = jnp.max(d_cross)
    at_max = d_cross >= d_max - 1e-9 * (1.0 + jnp.abs(d_max))
    lo = jnp.min(jnp.where(at_max, h_cross, jnp.inf))
    hi = jnp.max(jnp.where(at_max, h_cross, -jnp.inf))
    return 0.5 * (lo + hi)


def q_grid(q_min: Float[Array, ""], q_max: Float[Array, ""], num_q: int) -> Float[Array, " Q"]:
    return jnp.linspace(q_min, q_max, num_q)


def wtmm_exponent(buffer: Float[Array, " L"], n_valid: Int[Array, ""], static, params) -> Float[Array, ""]:
    """WTMM exponent of the last ``n_valid`` entries of a right-aligned buffer, read as a path.

    Uses static.wtmm_buffer_size, static.wtmm_num_scales, static.wtmm_num_q and params wtmm_q_min,
    wtmm_q_max, besov_cone_c, numerical_epsilon. Invariant under a * buffer + b (a > 0)."""
    length = buffer.shape[-1]
    scales = tuple(float(s) for s in wavelet_scales(length, static.wtmm_buffer_size, static.wtmm_num_scales))
    filled = jnp.arange(length) >= length - n_valid
    count = jnp.maximum(jnp.sum(filled), 1)
    loc = jnp.sum(jnp.where(filled, buffer, 0.0)) / count
    spread = jnp.sqrt(jnp.sum(jnp.where(filled, (buffer - loc) ** 2, 0.0)) / count)
    eps = params["numerical_epsilon"]
    floor = eps * jnp.maximum(jnp.abs(loc), 1.0)
    x = (buffer - loc) / jnp.maximum(spread, floor)
    coeffs, valid = cwt(x, n_valid, scales)
    # coefficients of an exactly constant signal are rounding noise ~1e-16: not maxima
    is_max = modulus_maxima(coeffs, valid, jnp.maximum(1e-10, eps) * jnp.where(spread > floor, 1.0, jnp.inf))
    scale_arr = jnp.asarray(scales, buffer.dtype)
    suprema = chained_suprema(coeffs, is_max, scale_arr, params["besov_cone_c"])
    q = q_grid(params["wtmm_q_min"], params["wtmm_q_max"], static.wtmm_num_q)
    tau, defined = partition_exponents(suprema, is_max, scale_arr, q)
    h = spectrum_argmax(q, tau)
    return jnp.where(defined & jnp.isfinite(h), h, UNDEFINED_HOLDER)


def profile(buffer: Float[Array, " L"], n_valid: Int[Array, ""]) -> Float[Array, " L"]:
    """Cumulative sum of the demeaned valid entries (zeros where the buffer is unfilled)."""
    length = buffer.shape[-1]
    filled = jnp.arange(length) >= length - n_valid
    loc = jnp.sum(jnp.where(filled, buffer, 0.0)) / jnp.maximum(jnp.sum(filled), 1)
    return jnp.cumsum(jnp.where(filled, buffer - loc, 0.0))


def fold_profile_exponent(h_profile: Float[Array, ""]) -> Float[Array, ""]:
    """The profile of a level path of Hurst H has exponent H + 1, the profile of its increments H: folding
    maps both to H, so a noise-like series (returns, a stationary level) reads as H ~ 0.5, not as rough."""
    return jnp.where(h_profile > 1.0, h_profile - 1.0, h_profile)


def holder_exponent(buffer: Float[Array, " L"], n_valid: Int[Array, ""], static, params) -> Float[Array, ""]:
    """Hoelder exponent H of the last ``n_valid`` entries of a right-aligned buffer (SPEC §3.4 A, §3.7 rev. 2).

    Two readings of the buffer: as a level path (its own WTMM exponent, ~H for a path of Hurst H, ~0 for a
    noise) and as increments (the folded exponent of its profile, ~H for both a path and a noise of Hurst H).
    H is the larger one, so a series is rough only if both readings say so: a noise (returns, a stationary
    level) reads as its own Hurst exponent, and a mean-reverting level whose profile crosses over from
    exponent 1.5 at small scales to 0.5 at large ones (a folded slope near 1 would read ~0) keeps the level
    reading ~0.5. Invariant under a * buffer + b (a > 0)."""
    as_level = wtmm_exponent(buffer, n_valid, static, params)
    as_increments = fold_profile_exponent(wtmm_exponent(profile(buffer, n_valid), n_valid, static, params))
    return jnp.maximum(as_level, as_increments)
