"""WTMM Hoelder exponent of Kernel A (SPEC §3.4 A): known answers and the fBm acceptance test."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from usp_core.config.loader import PredictorConfig
from usp_core.data.synthetic import brownian_motion, fractional_brownian_motion
from usp_core.kernels import wtmm


def _holder_batch(static, params):
    return jax.jit(jax.vmap(lambda b, k: wtmm.holder_exponent(b, k, static, params)))


def test_legendre_spectrum_takes_the_min_over_q():
    # monofractal tau(q) = q H - 1: D(H) = 1 and D < 1 elsewhere; a max over q would be convex in h
    q = jnp.linspace(-3.0, 3.0, 13)
    tau = 0.37 * q - 1.0
    h = jnp.linspace(-0.5, 1.5, 201)
    d = wtmm.legendre_spectrum(q, tau, h)
    assert float(h[jnp.argmax(d)]) == pytest.approx(0.37, abs=0.01)
    assert float(jnp.max(d)) == pytest.approx(1.0, abs=0.03)
    assert float(d[0]) < 0.0 and float(d[-1]) < 0.0
    assert float(wtmm.spectrum_argmax(q, tau)) == pytest.approx(0.37, abs=1e-12)


def test_spectrum_of_a_lognormal_cascade():
    # tau(q) = c1 q - c2 q^2 / 2 - 1  =>  D(h) = 1 - (h - c1)^2 / (2 c2) and argmax D = tau'(0) = c1
    c1, c2 = 0.6, 0.05
    q = jnp.linspace(-3.0, 3.0, 601)
    tau = c1 * q - 0.5 * c2 * q**2 - 1.0
    h = jnp.linspace(0.5, 0.7, 21)
    np.testing.assert_allclose(wtmm.legendre_spectrum(q, tau, h), 1.0 - (h - c1) ** 2 / (2 * c2), atol=1e-4)
    # asymmetric q range: the argmax still sits at tau'(0) (to the q-grid spacing)
    q = jnp.linspace(-1.0, 3.0, 9)
    assert float(wtmm.spectrum_argmax(q, c1 * q - 0.5 * c2 * q**2 - 1.0)) == pytest.approx(c1, abs=c2 * 0.5)


def test_cwt_annihilates_linear_trends_and_masks_the_unfilled_part():
    length, n_valid = 128, 80
    scales = tuple(float(s) for s in wtmm.wavelet_scales(length, 128, 6))
    t = jnp.arange(length, dtype=jnp.float64)
    buffer = jnp.where(t >= length - n_valid, 3.0 + 0.5 * t, jnp.nan)
    coeffs, valid = wtmm.cwt(buffer, jnp.asarray(n_valid), scales)
    assert bool(jnp.all(jnp.isfinite(coeffs)))
    assert float(jnp.max(jnp.abs(coeffs))) < 1e-10
    assert not bool(jnp.any(valid[:, : length - n_valid]))
    assert bool(jnp.all(jnp.sum(valid, axis=1)[:-1] >= jnp.sum(valid, axis=1)[1:]))  # wider support, fewer


@pytest.mark.parametrize("hurst", [0.3, 0.5, 0.7])
def test_fbm_acceptance(hurst):
    n, seeds = 512, 20
    cfg = PredictorConfig.default().replace({"core.base_min_signal_length": n, "kernels.wtmm_buffer_size": n})
    paths = fractional_brownian_motion(n, hurst, seed=1000 + int(100 * hurst), batch=seeds)
    h = np.asarray(_holder_batch(cfg.static, cfg.dynamic_params())(jnp.asarray(paths), jnp.full(seeds, n)))
    assert np.all(np.isfinite(h))
    assert np.mean(np.abs(h - hurst)) <= 0.1
    assert abs(np.mean(h) - hurst) <= 0.06


def test_holder_orders_roughness_and_is_not_stuck():
    cfg = PredictorConfig.default()
    static, params = cfg.static, cfg.dynamic_params()
    length = max(static.base_min_signal_length, static.wtmm_buffer_size)
    rough = fractional_brownian_motion(length, 0.2, seed=5, batch=16)
    brownian = brownian_motion(length, seed=6, batch=16)
    smooth = np.cumsum(brownian, axis=-1)  # integrated Brownian motion: H = 1.5
    hs = [np.asarray(_holder_batch(static, params)(jnp.asarray(x), jnp.full(16, length))) for x in (rough, brownian, smooth)]
    means = [float(np.mean(h)) for h in hs]
    assert means[0] < means[1] < means[2]
    assert 0.35 <= means[1] <= 0.7
    assert means[2] > 1.1
    assert all(len(np.unique(np.round(h, 6))) > 8 for h in hs)
    assert not np.any(np.isin(np.concatenate(hs), [0.0, 1.0]))


def test_partially_filled_buffer_ignores_unfilled_entries_and_is_invariant():
    cfg = PredictorConfig.default()
    static, params = cfg.static, cfg.dynamic_params()
    length, n_valid = 128, 64
    path = fractional_brownian_motion(length, 0.5, seed=11)
    holder = jax.jit(lambda b, k: wtmm.holder_exponent(b, k, static, params))
    junk = np.where(np.arange(length) >= length - n_valid, path, np.nan)
    zero = np.where(np.arange(length) >= length - n_valid, path, 0.0)
    h = float(holder(jnp.asarray(junk), jnp.asarray(n_valid)))
    assert np.isfinite(h) and -0.5 < h < 1.5
    assert float(holder(jnp.asarray(zero), jnp.asarray(n_valid))) == h
    assert float(holder(jnp.asarray(3e4 * zero - 7e5), jnp.asarray(n_valid))) == pytest.approx(h, rel=1e-6, abs=1e-9)
    assert float(holder(jnp.asarray(path), jnp.asarray(length))) != h
    # constant and almost empty buffers give the documented neutral value, finitely
    assert float(holder(jnp.full(length, 5.0), jnp.asarray(length))) == wtmm.UNDEFINED_HOLDER
    assert float(holder(jnp.asarray(zero), jnp.asarray(3))) == wtmm.UNDEFINED_HOLDER


WTMM_PERTURBATIONS = {
    "kernels.wtmm_buffer_size": 192,
    "kernels.wtmm_num_scales": 6,
    "kernels.wtmm_q_min": -2.0,
    "kernels.wtmm_q_max": 2.0,
    "kernels.wtmm_num_q": 9,
    "kernels.besov_cone_c": 0.5,
}


@pytest.mark.parametrize("key", sorted(WTMM_PERTURBATIONS))
def test_every_wtmm_field_is_live(key):
    cfg = PredictorConfig.default()
    history = jnp.asarray(fractional_brownian_motion(400, 0.3, seed=5))
    estimates = []
    for c in (cfg, cfg.replace({key: WTMM_PERTURBATIONS[key]})):
        buffer, count = wtmm.initial_buffer(history, c.static)
        estimates.append(float(wtmm.holder_exponent(buffer, count, c.static, c.dynamic_params())))
    assert estimates[0] != pytest.approx(estimates[1], rel=1e-9, abs=0.0)


def test_analysis_buffer_keeps_the_newest_values_right_aligned():
    static = PredictorConfig.default().static
    length = wtmm.analysis_length(static)
    buffer, count = wtmm.initial_buffer(jnp.arange(10.0), static)
    assert buffer.shape == (length,) and int(count) == 10
    np.testing.assert_array_equal(buffer[-10:], np.arange(10.0))
    buffer, count = wtmm.append(buffer, count, jnp.asarray(10.0))
    assert int(count) == 11
    np.testing.assert_array_equal(buffer[-11:], np.arange(11.0))
    full, full_count = wtmm.initial_buffer(jnp.arange(length + 5.0), static)
    full, full_count = wtmm.append(full, full_count, jnp.asarray(-1.0))
    assert int(full_count) == length and float(full[-1]) == -1.0 and float(full[0]) == 6.0
