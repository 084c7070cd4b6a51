"""The bitonic network sorts exactly as ``jnp.sort`` and takes medians exactly as ``jnp.median``."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from usp_core.kernels.sorting import bitonic_sort, median

# XLA:CPU flushes subnormals to zero in compiled elementwise ops (jnp.median's own arithmetic included)
_VALUES = st.lists(st.one_of(st.floats(-1e6, 1e6, allow_subnormal=False), st.sampled_from([0.0, -0.0, 1.0, 1.0, -2.5])),
                   min_size=1, max_size=130)


@settings(max_examples=60, deadline=None)
@given(values=_VALUES)
def test_sort_and_median_equal_jax_on_any_length(values):
    x = jnp.asarray(values, jnp.float64)
    np.testing.assert_array_equal(np.asarray(bitonic_sort(x)), np.asarray(jnp.sort(x)))
    assert float(median(x)) == float(jnp.median(x))


def test_batched_rows_float32_infinities_and_nan():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 5, 63)).astype(np.float32)
    x[0, 0, :4] = [np.inf, -np.inf, np.inf, 0.0]
    np.testing.assert_array_equal(np.asarray(bitonic_sort(jnp.asarray(x))), np.sort(x, axis=-1))
    x[1, 2, 7] = np.nan
    got, want = np.asarray(median(jnp.asarray(x))), np.asarray(jnp.median(jnp.asarray(x), axis=-1))
    assert got.dtype == np.float32 and np.isnan(got[1, 2])
    np.testing.assert_array_equal(got, want)
