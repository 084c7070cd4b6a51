"""Anchor experts of the pool (SPEC §3.1 rev. 2): the forecasts a user would otherwise pick, so the fusion can
fall back on them where no kernel beats them (a persistent level: the last value; a noise around a level: its
long-run mean). They follow the contract of ``usp_core.kernels.contract``; the last value carries nothing, the
long mean its running mean, variance and count.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
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


class MeanCarry(NamedTuple):
    mean: Float[Array, ""]
    variance: Float[Array, ""]  # of the values around the running mean, same span as the mean
    local_variance: Float[Array, ""]  # EWMA of the squared deviations at rate anchor_volatility_rate
    count: Float[Array, ""]


def _mean_init(past: Float[Array, " m"], static, params, key) -> MeanCarry:
    variance = jnp.var(past)
    return MeanCarry(jnp.mean(past), variance, variance, jnp.asarray(past.shape[0], past.dtype))


def long_mean(window: Float[Array, " n"], carry: MeanCarry, key, static, params) -> KernelResult:
    """Stationary-noise forecast: the mean of all past values, then an EMA of span ``anchor_mean_window`` once
    that many were seen (a long-run level, as the constant mean of a GARCH). Sigma is conditional: an EWMA of
    the squared deviations at ``anchor_volatility_rate`` (RiskMetrics' 0.06 by default), plus the mean's
    estimation error. With the unconditional variance instead, kernels with a noisy mean but a local sigma
    out-scored it on returns and carried their mean into the fusion."""
    y = window[-1]
    count = carry.count + 1.0
    rate = jnp.maximum(1.0 / count, 1.0 / params["anchor_mean_window"])
    local_rate = jnp.maximum(1.0 / count, params["anchor_volatility_rate"])
    delta = y - carry.mean
    mean = carry.mean + rate * delta
    variance = (1.0 - rate) * (carry.variance + rate * delta**2)
    local_variance = (1.0 - local_rate) * carry.local_variance + local_rate * delta**2
    _, _, scale = zscore(window, params["numerical_epsilon"])
    sigma = jnp.maximum(jnp.sqrt(local_variance + rate * variance), params["numerical_epsilon"] * scale)
    return KernelResult(mean, sigma, {}, MeanCarry(mean, variance, local_variance, count))


LAST_VALUE = ForecastKernel("last_value", _empty_carry, last_value, ())
LONG_MEAN = ForecastKernel("long_mean", _mean_init, long_mean, ())
