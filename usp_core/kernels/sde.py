"""Kernel C: Ito–Levy SDE Monte Carlo with stiffness switching (SPEC §3.4 C).

Model, on the z-scored window z (observation interval = 1 time unit of the estimator):

- Drift: robust least squares of the increments dz_i on z_i (points whose residual exceeds
  ``_JUMP_THRESHOLD`` robust standard deviations are treated as jumps and left out — Mancini's threshold
  estimator), i.e. an AR(1) map z' = z + a + b z with phi = 1 + b clipped to [0, 1). It is converted to the
  Ornstein–Uhlenbeck drift mu(x) = g a - kappa x with kappa = -log phi (capped at ``_MAX_RATE``) and
  g = kappa / (1 - phi), so that integrating mu over one interval reproduces the fitted one-step map.
  The window's slope is pooled by precision with the slope of the whole history (the carry: running moments of
  the (value, increment) pairs, an EMA of span ``kernel_c_drift_memory`` once that many were seen), then shrunk
  toward the random walk (positive-part James-Stein on its sampling variance).
- Diffusion: state dependent, sigma^2(x) = c0 + c2 x^2, by least squares of all squared residuals on
  [1, x^2] (jumps seen in the window widen it rather than being trusted to the generic jump prior: this is
  what keeps the intervals calibrated on jump processes), blended with the prior as a conjugate
  (inverse-gamma style) average  v(x) = (m v_hat(x) + nu sde_diffusion_sigma^2 T) / (m + nu), m = n - 1,
  nu = ``kernel_c_prior_strength``; converted to continuous time with q = 2 kappa / (1 - phi^2) (exact for OU).
- Noise: alpha-stable (Chambers–Mallows–Stuck, Gaussian when alpha >= 1.99), scaled so that alpha = 2 is a
  standard Brownian increment, truncated at ``_LEVY_CLIP`` (a truncated Levy flight, so that the Monte Carlo
  mean and std exist), plus compound-Poisson jumps with ``kernel_c_max_events`` candidate arrival times
  per path (exponential inter-arrival times; those beyond the interval are masked).
- Time: ``sde_dt`` is the integration step in model time, so one observation interval lasts
  T = sde_numel_integrations * sde_dt model-time units. The prior diffusion is a rate per unit model time
  (it contributes sde_diffusion_sigma^2 T per interval), and the stiffness metric is a rate per unit model
  time: S = max over the window's states of (|d mu/dx| + (d sigma/dx)^2) / T, the fastest local
  (mean-square) relaxation rate of the linearised SDE. With the defaults (T = 1, dt = 0.01) the engine's
  thresholds theta_L = 100 and theta_H = 1000 are a per-step stiffness index r h of 1 and 10.
- Scheme: explicit tamed Euler–Maruyama (Hutzenthaler–Jentzen–Kloeden; equals EM up to O(h^2) when
  h |mu| << 1 and cannot overflow when adaptive thresholds keep an explicit step past its stability limit)
  when S < theta_L, drift-implicit trapezoidal rule with ``_NEWTON_ITERATIONS`` Newton steps when
  S > theta_H, and the convex blend with weight (S - theta_L) / (theta_H - theta_L) in between.
- Forecast: Monte Carlo mean over ``kernel_c_num_paths`` paths whose noise comes from the step key
  (common random numbers); sigma^2 = variance of the paths + the drift-estimation variance at the current
  state, times (1 + 1/paths) for the Monte Carlo error of the mean.

A hand-written fixed-step scheme instead of diffrax: the paths need per-forecast random Levy increments,
masked jumps and a traced explicit/implicit blend with static shapes, which is a few lines of lax.scan.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from usp_core.kernels.contract import (
    ForecastKernel,
    KernelResult,
    shrink_toward,
    tiny_floor,
    to_data_units,
    zscore,
)
from usp_core.kernels.moments import PairMoments, empty_moments, regression_slope, update_moments
from usp_core.kernels.sorting import median
from usp_core.kernels.stable import stable_sample

METADATA_KEYS: tuple[str, ...] = ("stiffness", "stiffness_regime")

_JUMP_THRESHOLD = 3.0
_MAX_RATE = 1e4
_PHI_MAX = 1.0 - 1e-6
_GAUSSIAN_ALPHA = 1.99
_LEVY_CLIP = 10.0
_NEWTON_ITERATIONS = 2
_DRIFT_SHRINKAGE = 2.0  # c of max(0, 1 - c / t^2) on the slope and the mean increment: random walk 1.008x naive MSE, OU theta = 0.1 0.963x

ScalarFn = Callable[[Float[Array, "*s"]], Float[Array, "*s"]]


class SDECoefficients(NamedTuple):
    """mu(x) = drift_intercept + drift_slope x and sigma^2(x) = var_intercept + var_quadratic x^2 (rates
    per observation interval, z units); estimation_var = variance of the fitted one-step mean at x_t."""

    drift_intercept: Float[Array, ""]
    drift_slope: Float[Array, ""]
    var_intercept: Float[Array, ""]
    var_quadratic: Float[Array, ""]
    estimation_var: Float[Array, ""]

    def drift(self, x: Float[Array, "*s"]) -> Float[Array, "*s"]:
        return self.drift_intercept + self.drift_slope * x

    def diffusion(self, x: Float[Array, "*s"]) -> Float[Array, "*s"]:
        return jnp.sqrt(jnp.maximum(self.var_intercept + self.var_quadratic * x**2, 0.0))


def _weighted_lstsq(design: Float[Array, "m k"], target: Float[Array, " m"], weights: Float[Array, " m"]):
    gram = design.T @ (weights[:, None] * design) + 1e-10 * jnp.eye(design.shape[1], dtype=design.dtype)
    return jnp.linalg.solve(gram, design.T @ (weights * target)), gram


def estimate_coefficients(
    z: Float[Array, " n"], prior_sigma: Float[Array, ""], prior_strength: Float[Array, ""],
    interval: Float[Array, ""], memory_slope: tuple[Float[Array, ""], Float[Array, ""]] | None = None,
) -> SDECoefficients:
    """Robust OU drift and quadratic diffusion from a z-scored window (see the module docstring);
    ``interval`` = T, the observation interval in model time (it scales the prior diffusion rate)."""
    x, dz = z[:-1], jnp.diff(z)
    design = jnp.stack([jnp.ones_like(x), x], axis=1)
    (a0, b0), _ = _weighted_lstsq(design, dz, jnp.ones_like(x))
    resid = dz - a0 - b0 * x
    centred = jnp.abs(resid - median(resid))
    # around the median so that at least half the increments are kept even when the MAD is 0
    kept = (centred <= _JUMP_THRESHOLD * 1.4826 * median(centred)).astype(z.dtype)
    n_kept = jnp.sum(kept)
    (a1, b1), gram = _weighted_lstsq(design, dz, kept)
    # Positive-part James-Stein shrinkage of the mean-reversion slope toward the random walk: on a window of
    # n ~ 64 the least-squares slope of a unit-root series is biased toward reversion (Dickey-Fuller), and its
    # noise alone made Kernel C worse than the last value on random walks and weak OU processes.
    resid_var = jnp.sum(kept * (dz - a1 - b1 * x) ** 2) / jnp.maximum(n_kept - 2.0, 1.0)
    slope_var = resid_var * jnp.linalg.inv(gram)[1, 1]
    if memory_slope is not None:
        # the window's slope pooled with the whole history's by precision (the window is part of that history, so
        # the pooled variance is optimistic; the shrinkage below still acts on it): an OU process with theta = 0.1
        # needs ~500 pairs for a slope the shrinkage keeps, 64 gave the last value's MSE
        tiny = tiny_floor(z.dtype)
        window_precision = 1.0 / jnp.maximum(slope_var, tiny)
        memory_precision = 1.0 / jnp.maximum(memory_slope[1], tiny)
        slope_var = 1.0 / (window_precision + memory_precision)
        b1 = (b1 * window_precision + memory_slope[0] * memory_precision) * slope_var
    b1 = shrink_toward(b1, slope_var, 0.0, _DRIFT_SHRINKAGE)
    phi = jnp.clip(1.0 + b1, 0.0, _PHI_MAX)
    slope = phi - 1.0
    intercept = jnp.sum(kept * (dz - slope * x)) / n_kept
    resid = dz - intercept - slope * x
    # the window's mean increment (a drift) shrunk alike: estimated from n ~ 63 increments it adds ~1/n to the MSE
    # of a driftless walk
    intercept = shrink_toward(intercept, resid_var / n_kept, 0.0, _DRIFT_SHRINKAGE)

    sq_design = jnp.stack([jnp.ones_like(x), x**2], axis=1)
    (c0, c2), _ = _weighted_lstsq(sq_design, resid**2, jnp.ones_like(x))
    mean_sq = jnp.mean(resid**2)
    c0, c2 = jnp.where(c2 < 0.0, mean_sq, jnp.maximum(c0, 0.0)), jnp.maximum(c2, 0.0)
    shrink = x.shape[0] / (x.shape[0] + prior_strength)
    var0 = shrink * c0 + (1.0 - shrink) * prior_sigma**2 * interval
    var2 = shrink * c2

    gap = 1.0 - phi
    kappa = jnp.minimum(-jnp.log1p(-gap), _MAX_RATE)
    drift_scale = kappa / gap
    var_scale = 2.0 * kappa / (gap * (2.0 - gap))

    x_t = z[-1]
    leverage = jnp.array([1.0, x_t], z.dtype) @ jnp.linalg.solve(gram, jnp.array([1.0, x_t], z.dtype))
    estimation_var = leverage * (var0 + var2 * x_t**2)
    return SDECoefficients(drift_scale * intercept, -kappa, var_scale * var0, var_scale * var2, estimation_var)


def _elementwise_derivative(fn: ScalarFn, x: Float[Array, "*s"]) -> Float[Array, "*s"]:
    return jax.jvp(fn, (x,), (jnp.ones_like(x),))[1]


def stiffness_metric(
    drift: ScalarFn, diffusion: ScalarFn, states: Float[Array, " m"], interval: Float[Array, ""]
) -> Float[Array, ""]:
    """max over ``states`` of (|mu'(x)| + sigma'(x)^2) / interval: the fastest local mean-square relaxation
    rate per unit model time (rates per observation interval divided by its model-time length)."""
    rate = jnp.abs(_elementwise_derivative(drift, states)) + _elementwise_derivative(diffusion, states) ** 2
    return jnp.max(rate) / interval


def stiffness_regime(
    stiffness: Float[Array, ""], theta_low: Float[Array, ""], theta_high: Float[Array, ""]
) -> tuple[Float[Array, ""], Float[Array, ""]]:
    """(implicit weight in [0, 1], regime 0 explicit / 1 blended / 2 implicit)."""
    weight = jnp.clip((stiffness - theta_low) / jnp.maximum(theta_high - theta_low, 1e-12), 0.0, 1.0)
    regime = jnp.where(stiffness < theta_low, 0.0, jnp.where(stiffness > theta_high, 2.0, 1.0))
    return weight, regime.astype(stiffness.dtype)


def euler_maruyama_step(
    drift: ScalarFn, diffusion: ScalarFn, x: Float[Array, "*s"], step: Float[Array, ""],
    noise: Float[Array, "*s"], jump: Float[Array, "*s"], tamed: bool = False,
) -> Float[Array, "*s"]:
    """x + mu(x) h + sigma(x) dL + J; ``tamed`` divides the drift increment by 1 + h |mu(x)|."""
    drift_step = drift(x) * step
    if tamed:
        drift_step = drift_step / (1.0 + jnp.abs(drift_step))
    return x + drift_step + diffusion(x) * noise + jump


def trapezoid_step(
    drift: ScalarFn, diffusion: ScalarFn, x: Float[Array, "*s"], step: Float[Array, ""],
    noise: Float[Array, "*s"], jump: Float[Array, "*s"], newton_iterations: int = _NEWTON_ITERATIONS,
) -> Float[Array, "*s"]:
    """Drift-implicit trapezoidal step y = x + h/2 (mu(x) + mu(y)) + sigma(x) dL + J, solved by a fixed
    number of Newton iterations from the explicit predictor (exact after one for a linear drift)."""
    explicit_part = x + 0.5 * step * drift(x) + diffusion(x) * noise + jump

    y = explicit_part + 0.5 * step * drift(x)
    for _ in range(newton_iterations):  # unrolled: a nested loop per integration step costs more than its body
        residual = y - 0.5 * step * drift(y) - explicit_part
        slope = 1.0 - 0.5 * step * _elementwise_derivative(drift, y)
        y = y - residual / slope
    return y


def integrate_sde(
    drift: ScalarFn, diffusion: ScalarFn, x0: Float[Array, " p"], step: Float[Array, ""],
    noise: Float[Array, "k p"], jumps: Float[Array, "k p"] | None = None,
    implicit_weight: Float[Array, ""] | float = 0.0, tamed: bool = False,
) -> Float[Array, " p"]:
    """Terminal states after k fixed steps of (1 - w) explicit EM + w drift-implicit trapezoid.
    With implicit_weight = 0 and tamed = False this is plain Euler–Maruyama."""
    jumps = jnp.zeros_like(noise) if jumps is None else jumps
    weight = jnp.asarray(implicit_weight, x0.dtype)

    def body(x, inputs):
        dl, jump = inputs
        explicit = euler_maruyama_step(drift, diffusion, x, step, dl, jump, tamed)
        implicit = trapezoid_step(drift, diffusion, x, step, dl, jump)
        # where() rather than the bare blend so that a diverged branch with weight 0 cannot leak a NaN
        blended = jnp.where(weight >= 1.0, implicit,
                            jnp.where(weight <= 0.0, explicit, (1.0 - weight) * explicit + weight * implicit))
        return blended, None

    x_final, _ = jax.lax.scan(body, x0, (noise, jumps))
    return x_final


def _antithetic(draw: Callable[[tuple[int, ...]], Array], shape: tuple[int, ...], axis: int = -1) -> Array:
    """Symmetric draws of ``shape`` as antithetic pairs along ``axis`` (paths): half drawn, half their negation.
    Each path keeps its distribution; the Monte Carlo mean of a linear SDE becomes exact, so the noise of 32 paths
    no longer makes Kernel C's point forecast worse than the last value on a random walk."""
    axis = axis % len(shape)
    half = list(shape)
    half[axis] = (shape[axis] + 1) // 2
    x = draw(tuple(half))
    return jax.lax.slice_in_dim(jnp.concatenate([x, -x], axis=axis), 0, shape[axis], axis=axis)


def levy_increments(
    key: PRNGKeyArray, alpha: Float[Array, ""], beta: Float[Array, ""], step: Float[Array, ""],
    shape: tuple[int, ...],
) -> Float[Array, "*shape"]:
    """Increments of a truncated alpha-stable Levy motion over ``step``: step^(1/alpha) X / sqrt(2), X ~ S1
    stable, clipped at +-_LEVY_CLIP; exactly N(0, step) when alpha >= 1.99."""
    dtype = jnp.result_type(step)

    def gaussian(k):
        # float32 draws: half the PRNG words of float64, and PRNG cost dominates this kernel
        return _antithetic(lambda half: jax.random.normal(k, half, jnp.float32), shape).astype(dtype)

    def stable(k):
        return jnp.clip(stable_sample(k, alpha, beta, shape, dtype) / jnp.sqrt(2.0), -_LEVY_CLIP, _LEVY_CLIP)

    unit = jax.lax.cond(alpha >= _GAUSSIAN_ALPHA, gaussian, stable, key)
    return step ** (1.0 / jnp.where(alpha >= _GAUSSIAN_ALPHA, 2.0, alpha)) * unit


def jump_increments(
    key: PRNGKeyArray, intensity: Float[Array, ""], mean: Float[Array, ""], scale: Float[Array, ""],
    num_steps: int, num_paths: int, max_events: int, dtype: Any = None,
) -> Float[Array, "k p"]:
    """Compound-Poisson jumps per integration step over one observation interval: ``max_events`` candidate
    arrivals per path from exponential inter-arrival times (rate ``intensity``), sizes N(mean, scale^2);
    arrivals after the interval are masked, so a path has at most ``max_events`` jumps. ``dtype`` defaults to
    the default float dtype."""
    gap_key, size_key = jax.random.split(key)
    dtype = jnp.result_type(float) if dtype is None else jnp.dtype(dtype)
    # drawn in the default float dtype and cast, so that core.dtype changes only the rounding
    draw_dtype = jnp.result_type(float)
    half = ((num_paths + 1) // 2, max_events)
    gaps = jax.random.exponential(gap_key, half, draw_dtype).astype(dtype)
    arrival = jnp.concatenate([jnp.cumsum(gaps, axis=1)] * 2)[:num_paths] / jnp.maximum(intensity, 1e-300)
    sizes = mean + scale * _antithetic(lambda h: jax.random.normal(size_key, h, draw_dtype), (num_paths, max_events),
                                       axis=0).astype(dtype)
    sizes = jnp.where(arrival < 1.0, sizes, 0.0)
    step_index = jnp.clip(jnp.floor(arrival * num_steps).astype(jnp.int32), 0, num_steps - 1)
    path_index = jnp.broadcast_to(jnp.arange(num_paths)[:, None], step_index.shape)
    return jnp.zeros((num_steps, num_paths), dtype).at[step_index, path_index].add(sizes)


def init_carry(past, static, params, key) -> PairMoments:
    """The drift memory: running moments of the history's (value, next increment) pairs, in data units (only the
    slope, a ratio, is read, so the kernel stays scale and shift equivariant)."""
    span = params["kernel_c_drift_memory"]
    return jax.lax.fori_loop(0, past.shape[0] - 1,
                             lambda i, m: update_moments(m, past[i], past[i + 1] - past[i], span),
                             empty_moments((), past.dtype))


def forecast(window, carry, key, static, params) -> KernelResult:
    eps = params["numerical_epsilon"]
    carry = update_moments(carry, window[-2], window[-1] - window[-2], params["kernel_c_drift_memory"])
    z, loc, scale = zscore(window, eps)
    num_steps, num_paths = static.sde_numel_integrations, static.kernel_c_num_paths
    interval = num_steps * params["sde_dt"]
    coef = estimate_coefficients(z, params["sde_diffusion_sigma"], params["kernel_c_prior_strength"], interval,
                                 regression_slope(carry))
    stiffness = stiffness_metric(coef.drift, coef.diffusion, z, interval)
    weight, regime = stiffness_regime(stiffness, params["stiffness_theta_low"], params["stiffness_theta_high"])

    noise_key, jump_key = jax.random.split(key)
    step = jnp.asarray(1.0 / num_steps, z.dtype)
    noise = levy_increments(noise_key, params["kernel_c_alpha"], params["kernel_c_beta"], step, (num_steps, num_paths))
    jumps = jump_increments(jump_key, params["kernel_c_jump_intensity"], params["kernel_c_jump_mean"],
                            params["kernel_c_jump_scale"], num_steps, num_paths, static.kernel_c_max_events,
                            z.dtype)
    terminal = integrate_sde(coef.drift, coef.diffusion, jnp.full((num_paths,), z[-1]), step, noise, jumps,
                             weight, tamed=True)
    variance = (jnp.var(terminal, ddof=1) + coef.estimation_var) * (1.0 + 1.0 / num_paths)
    pred, sigma = to_data_units(jnp.mean(terminal), jnp.sqrt(variance), loc, scale, eps)
    return KernelResult(pred, sigma, {"stiffness": stiffness, "stiffness_regime": regime}, carry)


KERNEL = ForecastKernel("sde", init_carry, forecast, METADATA_KEYS)
