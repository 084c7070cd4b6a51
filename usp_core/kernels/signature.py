"""PLACEHOLDER: replaced by the real kernel (issue 3). Last-value forecast with increment-std sigma."""

from __future__ import annotations

import jax.numpy as jnp

from usp_core.kernels.contract import ForecastKernel, KernelResult, to_data_units, zscore

METADATA_KEYS: tuple[str, ...] = ()


def init_carry(past, static, params, key):
    return jnp.zeros(())


def forecast(window, carry, key, static, params) -> KernelResult:
    z, loc, scale = zscore(window, params["numerical_epsilon"])
    pred, sigma = to_data_units(z[-1], jnp.std(jnp.diff(z)) + 1e-3, loc, scale, params["numerical_epsilon"])
    return KernelResult(pred, sigma, {k: jnp.zeros(()) for k in METADATA_KEYS}, carry)


KERNEL = ForecastKernel("signature", init_carry, forecast, METADATA_KEYS)
