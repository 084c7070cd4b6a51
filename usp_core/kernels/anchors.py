"""Anchor experts of the pool (SPEC §3.1 rev. 2): the forecasts a user would otherwise pick, so the fusion can
fall back on them where no kernel beats them (a persistent level: the last value; a noise around a level: its
long-run mean). They follow the contract of ``usp_core.kernels.contract``; the last value carries nothing, the
long mean its running mean, variance and count.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from usp_core.kernels.contract import ForecastKernel, KernelResult, zscore


def _empty_carry(past, static, params, key) -> tuple[()]:
    return ()


def last_value(window: Float[Array, " n"], carry, key, static, params) -> KernelResult:
    """Random-walk forecast: the last value, sigma = std of the window's increments (the naive baseline)."""
    _, _, scale = zscore(window, params["numerical_epsilon"])
    increments = jnp.diff(window)
    sigma = jnp.sqrt(jnp.sum((increments - jnp.mean(increments)) ** 2) / (increments.shape[0] - 1))
    return KernelResult(window[-1], jnp.maximum(sigma, params["numerical_epsilon"] * scale), {}, carry)


def _garch_grid() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(reaction to a positive, to a negative deviation, persistence) of each variance filter of the long mean:
    every product of the reactions, leverages and persistences below (GJR-GARCH, Glosten et al. 1993)."""
    reaction, leverage, persistence = (a.ravel() for a in np.meshgrid(
        [0.02, 0.05, 0.1, 0.16], [-0.5, 0.0, 0.5, 0.9], [0.9, 0.96, 0.985, 0.995], indexing="ij"))
    return reaction * (1 - leverage), reaction * (1 + leverage), persistence


GARCH_UP, GARCH_DOWN, GARCH_PERSISTENCE = _garch_grid()


class MeanCarry(NamedTuple):
    mean: Float[Array, ""]
    variance: Float[Array, ""]  # of the values around the running mean, same span as the mean
    garch_variance: Float[Array, " g"]  # each filter's conditional variance of the next deviation
    garch_score: Float[Array, " g"]  # each filter's discounted Gaussian log-likelihood
    count: Float[Array, ""]


def _mean_init(past: Float[Array, " m"], static, params, key) -> MeanCarry:
    variance = jnp.var(past)
    g = GARCH_PERSISTENCE.shape[0]
    return MeanCarry(jnp.mean(past), variance, jnp.full((g,), variance), jnp.zeros((g,), past.dtype),
                     jnp.asarray(past.shape[0], past.dtype))


def long_mean(window: Float[Array, " n"], carry: MeanCarry, key, static, params) -> KernelResult:
    """Stationary-noise forecast: the mean of all past values, then an EMA of span ``anchor_mean_window`` once
    that many were seen (a long-run level, as the constant mean of a GARCH). Sigma is conditional, as a GARCH
    fitted by maximum likelihood on a rolling window would give it: a bank of GJR-GARCH(1,1) filters of the
    deviations from the mean (the grid of ``GARCH_*``, each variance-targeted to the running variance) weighted by
    their posterior, softmax of the Gaussian log-likelihood discounted at span ``anchor_volatility_memory``; plus
    the mean's estimation error. A bank instead of an online MLE: no step size to tune and no non-stationary
    iterate (every member has persistence < 1)."""
    y = window[-1]
    count = carry.count + 1.0
    rate = jnp.maximum(1.0 / count, 1.0 / params["anchor_mean_window"])
    delta = y - carry.mean
    mean = carry.mean + rate * delta
    variance = (1.0 - rate) * (carry.variance + rate * delta**2)
    _, _, scale = zscore(window, params["numerical_epsilon"])
    floor = (params["numerical_epsilon"] * scale) ** 2
    dtype = window.dtype
    h = jnp.maximum(carry.garch_variance, floor)
    loglik = -0.5 * (jnp.log(h) + delta**2 / h)
    memory = jnp.minimum(count, params["anchor_volatility_memory"])
    score = (1.0 - 1.0 / memory) * carry.garch_score + loglik
    up, down, persistence = (jnp.asarray(a, dtype) for a in (GARCH_UP, GARCH_DOWN, GARCH_PERSISTENCE))
    react = jnp.where(delta < 0, down, up)
    # variance targeting: the filters' long-run level is the running variance around the mean
    garch_variance = (1 - persistence) * variance + react * delta**2 + (persistence - 0.5 * (up + down)) * h
    posterior = jax.nn.softmax(score)
    local_variance = jnp.sum(posterior * garch_variance)
    sigma = jnp.maximum(jnp.sqrt(local_variance + rate * variance), params["numerical_epsilon"] * scale)
    return KernelResult(mean, sigma, {}, MeanCarry(mean, variance, garch_variance, score, count))


LAST_VALUE = ForecastKernel("last_value", _empty_carry, last_value, ())
LONG_MEAN = ForecastKernel("long_mean", _mean_init, long_mean, ())
