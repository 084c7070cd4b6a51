"""Sorting and medians of short vectors by a bitonic network.

Hand-written: XLA:CPU lowers ``jnp.sort`` (and so ``jnp.median``) to a comparator sort that costs about five times a
bitonic network of elementwise min/max on the 63-128 values the gate and Kernels A and C take medians of, batched
over series. The network's output is the sorted input, so the results equal ``jnp.sort`` / ``jnp.median``.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float


def bitonic_sort(x: Float[Array, "*b n"]) -> Float[Array, "*b n"]:
    """Ascending sort along the last axis (padded with +inf to a power of two, which sorts last)."""
    n = x.shape[-1]
    size = 1 << max(n - 1, 0).bit_length()
    lead = x.shape[:-1]
    if size != n:
        x = jnp.concatenate([x, jnp.full(lead + (size - n,), jnp.inf, x.dtype)], axis=-1)
    position = np.arange(size)
    block = 2
    while block <= size:
        stride = block // 2
        while stride >= 1:
            pairs = x.reshape(lead + (size // (2 * stride), 2, stride))
            a, b = pairs[..., 0, :], pairs[..., 1, :]
            low, high = jnp.minimum(a, b), jnp.maximum(a, b)
            ascending = (position.reshape(size // (2 * stride), 2, stride)[:, 0, :] & block) == 0
            x = jnp.stack([jnp.where(ascending, low, high), jnp.where(ascending, high, low)], axis=-2).reshape(
                lead + (size,))
            stride //= 2
        block *= 2
    return x[..., :n]


def median(x: Float[Array, "*b n"]) -> Float[Array, "*b"]:
    """Median along the last axis, as ``jnp.median`` computes it (the mean of the two middle values for even n;
    NaN if any entry is NaN)."""
    n = x.shape[-1]
    ordered = bitonic_sort(x)
    middle = ordered[..., n // 2] if n % 2 else ordered[..., n // 2 - 1] * 0.5 + ordered[..., n // 2] * 0.5
    return jnp.where(jnp.isnan(x).any(axis=-1), jnp.nan, middle)
