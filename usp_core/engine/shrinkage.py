"""Shrinkage of each kernel's predicted increment toward the last value, by its out-of-sample evidence.

A kernel forecasts y_{t+1} = y_t + d_t. Where the series is a random walk no d_t helps, and a kernel that estimates
anything from a 64-point window adds its estimation noise to the naive forecast's error (0.6-1.3 % MSE, SPEC §3.4:
every kernel must be no worse than the last value there). The MSE-optimal multiple of d_t is the regression
coefficient c = E[d e] / E[d^2] of the realised increments e_{t+1} on the predicted ones; it is estimated from
discounted sums of past pairs (each pair is complete one step after its forecast, so this is causal), shrunk toward
0 by its own t statistic (positive-part James-Stein, :func:`usp_core.kernels.contract.shrink_toward`) and clipped to
[0, 1]: a kernel is moved toward the last value by what its track record does not support, never amplified. On a
random walk c is ~0, on a series a kernel predicts c is ~1. Increments are in units of the scale of the window the
forecast was made from, so c is scale free (SPEC §3.3 equivariance).
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from usp_core.kernels.contract import shrink_toward

SHRINKAGE_DISCOUNT = 0.999
"""Per-step discount of the evidence sums, a memory of ~1 000 pairs: the coefficient's sampling variance (~1 / memory
of the increments' variance) is what a random walk still pays."""

MIN_EVIDENCE = 10.0
"""Discounted pairs before a kernel's increments count at all: a slope from a handful of pairs fits them almost
exactly, and its t statistic says nothing."""

SHRINKAGE_STRENGTH = 2.0
"""James-Stein strength: a coefficient within sqrt(2) standard errors of 0 gives the last value."""


def initial_moments(num_kernels: int, dtype) -> Float[Array, "4 k"]:
    return jnp.zeros((4, num_kernels), dtype)


def updated_moments(moments: Float[Array, "4 k"], predicted: Float[Array, " k"], realised: Float[Array, ""],
                    weight: Bool[Array, " k"]) -> Float[Array, "4 k"]:
    """The discounted sums of d^2, d e, e^2 and the pairs' mass, with one more pair where ``weight``."""
    pair = jnp.stack([predicted**2, predicted * realised, jnp.broadcast_to(realised**2, predicted.shape),
                      jnp.ones_like(predicted)])
    return SHRINKAGE_DISCOUNT * moments + jnp.where(weight, pair, 0.0)


def shrinkage_factor(moments: Float[Array, "4 k"]) -> Float[Array, " k"]:
    """The multiple c in [0, 1] of each kernel's predicted increment (0 until there is evidence)."""
    dd, de, ee, mass = moments
    # a negative coefficient ends at 0 anyway; selecting it out first keeps every division away from 0 / tiny, which
    # XLA may reassociate into an underflowing product (a NaN that reached the fusion when the strength was 1)
    evidence = (mass >= MIN_EVIDENCE) & (dd > 0) & (de > 0)
    dd = jnp.where(evidence, dd, 1.0)
    coefficient = jnp.where(evidence, de / dd, 0.0)
    residual_variance = jnp.maximum(ee - de * coefficient, 0.0) / jnp.maximum(mass - 1.0, 1.0)  # one slope fitted
    factor = jnp.clip(shrink_toward(coefficient, residual_variance / dd, 0.0, SHRINKAGE_STRENGTH), 0.0, 1.0)
    return jnp.where(jnp.isfinite(factor), factor, 0.0)
