"""Two-sided CUSUM on standardised residuals with a kurtosis-adaptive threshold (SPEC §3.6)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int


class CusumUpdate(NamedTuple):
    g_plus: Float[Array, ""]
    g_minus: Float[Array, ""]
    grace: Int[Array, ""]
    alarm: Bool[Array, ""]
    regime_change: Bool[Array, ""]


def window_kurtosis(z_window: Float[Array, " r"], count: Int[Array, ""], *, min_samples, reference, low, high) -> Float[Array, ""]:
    """Sample kurtosis m4 / m2^2 of the valid (most recent ``count``) entries of a ring buffer.

    Before ``min_samples`` valid values the reference kurtosis is returned; the result is clipped to
    [low, high].
    """
    r = z_window.shape[0]
    valid = jnp.arange(r) < jnp.minimum(count, r)
    n = jnp.maximum(valid.sum(), 1)
    mean = jnp.where(valid, z_window, 0.0).sum() / n
    dev = jnp.where(valid, z_window - mean, 0.0)
    m2 = (dev**2).sum() / n
    m4 = (dev**4).sum() / n
    kurt = jnp.where(m2 > 0, m4 / jnp.where(m2 > 0, m2, 1.0) ** 2, reference)
    kurt = jnp.where(count >= min_samples, kurt, reference)
    return jnp.clip(kurt, low, high)


def cusum_threshold(kurtosis, base_h, reference) -> Float[Array, ""]:
    """h_t = h (1 + ln(max(kappa, kappa_ref) / kappa_ref)); heavier tails raise the threshold."""
    return jax.lax.stop_gradient(base_h * (1.0 + jnp.log(jnp.maximum(kurtosis, reference) / reference)))


def cusum_update(g_plus, g_minus, grace, z, *, k, h, grace_period) -> CusumUpdate:
    """One CUSUM step. An alarm during the grace period is suppressed but still restarts the statistics, so
    the decision after the grace period uses post-alarm evidence only; the grace counter is decremented
    exactly once per step (SPEC §12.2)."""
    g_plus = jnp.maximum(0.0, g_plus + z - k)
    g_minus = jnp.maximum(0.0, g_minus - z - k)
    alarm = (g_plus > h) | (g_minus > h)
    regime_change = alarm & (grace == 0)
    g_plus = jnp.where(alarm, 0.0, g_plus)
    g_minus = jnp.where(alarm, 0.0, g_minus)
    grace = jnp.where(regime_change, grace_period, jnp.maximum(grace - 1, 0))
    return CusumUpdate(g_plus, g_minus, grace.astype(jnp.int64), alarm, regime_change)
