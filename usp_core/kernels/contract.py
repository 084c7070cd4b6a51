"""The kernel contract of SPEC §3.4.

A forecasting kernel is a pair of pure, jittable, vmappable functions::

    carry  = init_carry(past, static, params, key)
    result = forecast(window, carry, key, static, params)   # -> KernelResult

- ``past`` is the history *before* the newest value of the first window (any length m >= n - 1); the
  carry summarises it (e.g. a long buffer, trained network weights, a recursive least-squares readout).
- ``window`` holds the last n = ``static.base_min_signal_length`` observations in data units, the newest
  last. ``forecast`` is called once per accepted observation, after that observation entered the window; it
  forecasts the next value and returns the carry updated with ``window[-1]``.
- Computations are done on the z-scored window and mapped back with :func:`zscore` / :func:`to_data_units`
  so the predictor is scale/shift equivariant; ``sigma`` is a predictive standard deviation of the next
  value in data units (positive and finite for any finite window, constant windows included).
- ``params`` is the dict of dynamic parameters (traced 0-d arrays, see ``PredictorConfig.dynamic_params``)
  plus the adaptive quantities the engine injects each step (``ADAPTIVE_PARAM_KEYS``).
- ``metadata`` has a fixed set of scalar entries per kernel (``metadata_keys``), for telemetry and the
  engine (``dgm_entropy_ratio`` drives mode collapse and capacity scaling). The Hoelder exponent, which drives
  emergency mode and the stiffness thresholds, is the engine's own estimate (``usp_core.kernels.wtmm``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

ADAPTIVE_PARAM_KEYS = ("stiffness_theta_low", "stiffness_theta_high")


class KernelResult(NamedTuple):
    prediction: Float[Array, ""]
    sigma: Float[Array, ""]
    metadata: dict[str, Float[Array, ""]]
    carry: Any


class ForecastKernel(NamedTuple):
    name: str
    init_carry: Callable[..., Any]
    forecast: Callable[..., KernelResult]
    metadata_keys: tuple[str, ...]


def zscore(window: Float[Array, " n"], eps: Float[Array, ""]) -> tuple[Float[Array, " n"], Float[Array, ""], Float[Array, ""]]:
    """Standardise a window; returns (z, loc, scale). The scale floor is relative to the level so that a
    constant window gives z = 0 and a tiny positive scale instead of a division by zero."""
    loc = jnp.mean(window)
    var = jnp.mean((window - loc) ** 2)
    floor = eps * jnp.maximum(jnp.abs(loc), 1.0)
    scale = jnp.sqrt(var + floor**2)
    return (window - loc) / scale, loc, scale


def to_data_units(pred_z: Float[Array, ""], sigma_z: Float[Array, ""], loc, scale, eps) -> tuple[Float[Array, ""], Float[Array, ""]]:
    """Map a z-scale forecast back to data units; sigma stays positive and finite."""
    sigma = jnp.abs(sigma_z) * scale
    sigma = jnp.maximum(jnp.nan_to_num(sigma, nan=scale, posinf=scale), eps * scale)
    return loc + scale * pred_z, sigma


def tiny_floor(dtype) -> float:
    """1e-300 as a positive floor, or the smallest normal number of ``dtype`` where 1e-300 would round to 0
    (float32)."""
    return max(1e-300, float(jnp.finfo(dtype).tiny))


KeyArray = PRNGKeyArray


def shrink_toward(estimate: Float[Array, "*s"], variance: Float[Array, "*s"], target, strength: float = 2.0) -> Float[Array, "*s"]:
    """Positive-part James-Stein shrinkage of ``estimate`` (sampling ``variance``) toward ``target``: the gap is
    scaled by max(0, 1 - strength / t^2), t = gap / sqrt(variance), so a gap within its noise goes to the target."""
    gap = estimate - target
    return target + gap * jnp.maximum(1.0 - strength * variance / jnp.maximum(gap**2, tiny_floor(gap.dtype)), 0.0)
