"""Running moments of (x, y) pairs for online least-squares slopes: the mean over all pairs seen, then an EMA of a
given span (the long-mean anchor's rate rule). Kernel C regresses each increment on the value before it."""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
from jaxtyping import Array, Float

from usp_core.kernels.contract import tiny_floor


class PairMoments(NamedTuple):
    """Weighted Welford moments; in the pairs' units (slopes, ratios of them, are what callers read)."""

    mean_x: Float[Array, "*s"]
    mean_y: Float[Array, "*s"]
    cov_xx: Float[Array, "*s"]
    cov_xy: Float[Array, "*s"]
    cov_yy: Float[Array, "*s"]
    weight_sq: Float[Array, "*s"]
    """Sum of the squared normalised weights: 1 / effective number of pairs."""
    count: Float[Array, "*s"]


def empty_moments(shape: tuple[int, ...], dtype) -> PairMoments:
    zero = jnp.zeros(shape, dtype)
    return PairMoments(*([zero] * len(PairMoments._fields)))


def update_moments(moments: PairMoments, x: Float[Array, "*s"], y: Float[Array, "*s"],
                   span: Float[Array, ""]) -> PairMoments:
    """One pair in: weighted Welford updates (the new pair's weight fraction is max(1/count, 1/span))."""
    count = moments.count + 1.0
    rate = jnp.maximum(1.0 / count, 1.0 / span)
    dx, dy = x - moments.mean_x, y - moments.mean_y
    keep = 1.0 - rate
    return PairMoments(moments.mean_x + rate * dx, moments.mean_y + rate * dy,
                       keep * (moments.cov_xx + rate * dx * dx), keep * (moments.cov_xy + rate * dx * dy),
                       keep * (moments.cov_yy + rate * dy * dy), keep**2 * moments.weight_sq + rate**2, count)


def regression_slope(moments: PairMoments) -> tuple[Float[Array, "*s"], Float[Array, "*s"]]:
    """(least-squares slope of y on x with an intercept, its sampling variance); variance inf until the moments
    hold a few pairs with x not constant."""
    n_eff = 1.0 / jnp.maximum(moments.weight_sq, tiny_floor(moments.weight_sq.dtype))
    usable = (moments.cov_xx > 0) & (n_eff > 3.0)
    cov_xx = jnp.where(usable, moments.cov_xx, 1.0)
    slope = moments.cov_xy / cov_xx
    resid_var = jnp.maximum(moments.cov_yy - slope * moments.cov_xy, 0.0)
    return jnp.where(usable, slope, 0.0), jnp.where(usable, resid_var / ((n_eff - 2.0) * cov_xx), jnp.inf)
