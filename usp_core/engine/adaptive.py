"""Adaptive layer (SPEC §3.9): values recomputed each step from the observed volatility and roughness.

Every value passes through ``stop_gradient``: the adaptive layer steers the step, it is not optimised.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


class JkoParameters(NamedTuple):
    window: Int[Array, ""]
    tau: Float[Array, ""]


def stiffness_thresholds(holder, *, stiffness_low, stiffness_high, c1, c2) -> tuple[Float[Array, ""], Float[Array, ""]]:
    """theta_L = max(low, c1 / den^2), theta_H = max(high, c2 / den^2), den = max(1 - clip(H, 0, 0.999), 1e-3)."""
    den = jnp.maximum(1.0 - jnp.clip(holder, 0.0, 0.999), 1e-3)
    theta_low = jnp.maximum(stiffness_low, c1 / den**2)
    theta_high = jnp.maximum(stiffness_high, c2 / den**2)
    return jax.lax.stop_gradient(theta_low), jax.lax.stop_gradient(theta_high)


def jko_parameters(sigma_sq, *, epsilon_0, domain_length, relaxation_factor, safety_factor, window_floor,
                   window_cap, learning_rate_max) -> JkoParameters:
    """Relaxation time T = L^2 / max(sigma^2, 1e-10); window = clip(int(factor T), floor, cap);
    tau = clip(safety 2 eps_0 sigma^2, 1e-6, learning_rate_max). Values are clipped, never raised."""
    t_relax = domain_length**2 / jnp.maximum(sigma_sq, 1e-10)
    raw_window = jnp.floor(jnp.minimum(relaxation_factor * t_relax, 1e9))
    window = jnp.clip(raw_window, window_floor, window_cap).astype(jnp.int64)
    tau = jnp.clip(safety_factor * 2.0 * epsilon_0 * sigma_sq, 1e-6, learning_rate_max)
    return JkoParameters(jax.lax.stop_gradient(window), jax.lax.stop_gradient(tau))


def mode_collapse_patience(window, *, min_threshold, window_ratio) -> Int[Array, ""]:
    """Consecutive collapsed steps before a warning: max(min_threshold, int(window * ratio)) (seed GAP-6.1)."""
    return jnp.maximum(min_threshold, jnp.floor(window * window_ratio).astype(jnp.int64))


def dgm_capacity(width0: int, depth0: int, entropy_ratio: float, *, beta: float = 0.7, cap: float = 4.0) -> tuple[int, int]:
    """DGM size after capacity scaling (V-MAJ-1): capacity = W0 D0 min(kappa^beta, cap) at the aspect W0/D0,
    D = max(ceil(sqrt(capacity / aspect)), D0 + 1), W = next power of two >= ceil(D aspect).

    Host-level (shapes change): the caller picks the new network size between compiled segments.
    """
    aspect = width0 / depth0
    capacity = width0 * depth0 * min(max(entropy_ratio, 1.0) ** beta, cap)
    depth = max(math.ceil(math.sqrt(capacity / aspect)), depth0 + 1)
    width = 1 << max(math.ceil(depth * aspect) - 1, 0).bit_length()
    return width, depth
