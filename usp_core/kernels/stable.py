"""Chambers–Mallows–Stuck sampler of alpha-stable laws (Kernel C's Levy noise, SPEC §3.4 C).

Hand-written because neither jax.random nor the listed libraries provide stable variates; the formula is
Chambers, Mallows & Stuck (1976) in the form of Weron (1996), which samples S_alpha(1, beta, 0) in the
standard (Samorodnitsky–Taqqu "S1") parametrisation, scipy's default ``levy_stable`` parametrisation. At
alpha = 2 the law is N(0, 2).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray


def cms_transform(
    angle: Float[Array, "*s"], exponential: Float[Array, "*s"], alpha: Float[Array, ""], beta: Float[Array, ""]
) -> Float[Array, "*s"]:
    """Map V ~ U(-pi/2, pi/2) and W ~ Exp(1) to S_alpha(1, beta, 0) (S1). alpha in (0, 2]."""
    half_pi = jnp.pi / 2
    alpha_safe = jnp.where(jnp.abs(alpha - 1.0) < 1e-9, 1.0 + 1e-9, alpha)
    tan_term = beta * jnp.tan(half_pi * alpha_safe)
    shift = jnp.arctan(tan_term) / alpha_safe
    scale = (1.0 + tan_term**2) ** (1.0 / (2.0 * alpha_safe))
    shifted = alpha_safe * (angle + shift)
    general = (
        scale
        * jnp.sin(shifted)
        / jnp.cos(angle) ** (1.0 / alpha_safe)
        * (jnp.cos(angle - shifted) / exponential) ** ((1.0 - alpha_safe) / alpha_safe)
    )
    skew_angle = half_pi + beta * angle
    cauchy_like = (2.0 / jnp.pi) * (
        skew_angle * jnp.tan(angle) - beta * jnp.log(half_pi * exponential * jnp.cos(angle) / skew_angle)
    )
    return jnp.where(jnp.abs(alpha - 1.0) < 1e-9, cauchy_like, general)


def stable_sample(
    key: PRNGKeyArray, alpha: Float[Array, ""], beta: Float[Array, ""], shape: tuple[int, ...],
    dtype: Any = None,
) -> Float[Array, "*shape"]:
    """i.i.d. S_alpha(1, beta, 0) variates (S1 parametrisation; N(0, 2) at alpha = 2), in ``dtype`` (default:
    the default float dtype). The uniforms are drawn in float32 (half the PRNG words of float64; this is the hot loop of
    Kernel C), which only coarsens quantiles beyond ~1 - 1e-7."""
    angle_key, exp_key = jax.random.split(key)
    dtype = jnp.result_type(float) if dtype is None else jnp.dtype(dtype)
    # open interval: the endpoints +-pi/2 make cos(V) = 0
    margin = float(jnp.finfo(jnp.float32).eps)
    angle = jax.random.uniform(angle_key, shape, jnp.float32, -jnp.pi / 2 + margin, jnp.pi / 2 - margin)
    exponential = jax.random.exponential(exp_key, shape, jnp.float32).astype(dtype)
    exponential = exponential + jnp.finfo(dtype).tiny
    return cms_transform(angle.astype(dtype), exponential, jnp.asarray(alpha, dtype), jnp.asarray(beta, dtype))
