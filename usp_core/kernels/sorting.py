"""Sorting and medians of short vectors by a bitonic network.

Hand-written: XLA:CPU lowers ``jnp.sort`` (and so ``jnp.median``) to a comparator sort that costs about four times a
bitonic network of elementwise min/max on the 63-128 values the gate and Kernels A and C take medians of, batched
over series. The network's stages run as one ``lax.scan`` (each stage compares every entry with its partner
``i ^ j``), so a median adds one small loop to a program rather than a few hundred unrolled operations to compile.
The network's output is the sorted input, so the results equal ``jnp.sort`` / ``jnp.median``.
"""

from __future__ import annotations

from functools import lru_cache

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float


@lru_cache(maxsize=16)
def _stages(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per stage of the network on ``size`` (a power of two) entries: each entry's partner, and whether it keeps
    the smaller of the pair."""
    position = np.arange(size)
    partners, keeps_min = [], []
    block = 2
    while block <= size:
        stride = block // 2
        while stride >= 1:
            partner = position ^ stride
            ascending = (position & block) == 0
            partners.append(partner)
            keeps_min.append((position < partner) == ascending)
            stride //= 2
        block *= 2
    if not partners:  # a single entry is sorted
        return np.zeros((0, size), np.int32), np.zeros((0, size), bool)
    return np.stack(partners).astype(np.int32), np.stack(keeps_min)


def bitonic_sort(x: Float[Array, "*b n"]) -> Float[Array, "*b n"]:
    """Ascending sort along the last axis (padded with +inf to a power of two, which sorts last)."""
    n = x.shape[-1]
    size = 1 << max(n - 1, 0).bit_length()
    lead = x.shape[:-1]
    if size != n:
        x = jnp.concatenate([x, jnp.full(lead + (size - n,), jnp.inf, x.dtype)], axis=-1)
    partners, keeps_min = _stages(size)

    def stage(values, network):
        partner, keep_min = network
        other = jnp.take(values, partner, axis=-1)
        return jnp.where(keep_min, jnp.minimum(values, other), jnp.maximum(values, other)), None

    x, _ = jax.lax.scan(stage, x, (partners, keeps_min))
    return x[..., :n]


def median(x: Float[Array, "*b n"]) -> Float[Array, "*b"]:
    """Median along the last axis, as ``jnp.median`` computes it (the mean of the two middle values for even n;
    NaN if any entry is NaN)."""
    n = x.shape[-1]
    ordered = bitonic_sort(x)
    middle = ordered[..., n // 2] if n % 2 else ordered[..., n // 2 - 1] * 0.5 + ordered[..., n // 2] * 0.5
    return jnp.where(jnp.isnan(x).any(axis=-1), jnp.nan, middle)
