"""core.dtype = "float32" end to end (SPEC §3.2): float32 in, float32 out, agreement with float64, snapshots."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import SMALL_OVERRIDES
from usp_core import Predictor, load_config
from usp_core.config import PredictorConfig
from usp_core.engine import snapshot
from usp_core.engine import step as step_mod
from usp_core.kernels import sde

RTOL = 1e-4  # SPEC §3.2; the panel's levels are 10-100, so no absolute floor is needed


def _panel(length: int = 150) -> np.ndarray:
    """B = 3: a random walk around 50, an OU process around 20 and a fast OU process around 100."""
    rng = np.random.default_rng(7)
    noise = rng.standard_normal((3, length))
    walk = 50.0 + np.cumsum(noise[0])
    ou = np.zeros((2, length))
    for t in range(1, length):
        ou[:, t] = np.array([0.9, 0.5]) * ou[:, t - 1] + np.array([1.0, 3.0]) * noise[1:, t]
    return np.stack([walk, 20.0 + ou[0], 100.0 + ou[1]])


def _config(dtype: str) -> PredictorConfig:
    return load_config(None, SMALL_OVERRIDES | {"core.dtype": dtype}, environ={})


@pytest.fixture(scope="module")
def runs():
    x = _panel()
    return x, Predictor(_config("float64")).run(x), Predictor(_config("float32")).run(x)


def _float_fields(out) -> dict[str, np.ndarray]:
    return {name: v for name, v in out._asdict().items() if np.issubdtype(v.dtype, np.floating)}


@pytest.mark.slow
def test_float32_run_gives_float32_outputs(runs):
    x, out64, out32 = runs
    floats = _float_fields(out32)
    assert {"prediction", "lower", "upper", "sigma", "weights", "kernel_predictions"} <= set(floats)
    assert {name: v.dtype for name, v in floats.items()} == {name: np.dtype(np.float32) for name in floats}
    assert {name: v.dtype for name, v in _float_fields(out64).items()} == {name: np.dtype(np.float64) for name in floats}
    first = SMALL_OVERRIDES["core.base_min_signal_length"] - 1
    assert np.isfinite(out32.prediction[:, first:]).all() and (out32.sigma[:, first:] > 0).all()


@pytest.mark.slow
def test_float32_agrees_with_float64(runs):
    _, out64, out32 = runs
    first = SMALL_OVERRIDES["core.base_min_signal_length"] - 1
    for name in ("prediction", "lower", "upper"):
        a, b = getattr(out32, name)[:, first:], getattr(out64, name)[:, first:]
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=0, err_msg=name)
    # the adaptive layer takes the same discrete decisions (a flipped decision would move the forecast)
    for name in ("regime_change", "rejected", "emergency", "mode"):
        np.testing.assert_array_equal(getattr(out32, name), getattr(out64, name), err_msg=name)


@pytest.mark.slow
def test_float32_state_snapshot_roundtrip():
    cfg = _config("float32")
    predictor = Predictor(cfg)
    x = _panel(60)[1]
    n = cfg["core.base_min_signal_length"]
    state = predictor.init(x[:n])
    for value in x[n:n + 3]:
        _, state = predictor.step(state, value)
    blob = snapshot.encode_state(state, config_version=cfg.version, static_key=snapshot.static_key_of(cfg))
    restored, _ = snapshot.decode_state(blob, state, static_key=snapshot.static_key_of(cfg))
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored), strict=True):
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert state.window.dtype == jnp.float32 and state.fusion.weights.dtype == jnp.float32
    out_a, _ = predictor.step(state, x[n + 3])
    out_b, _ = predictor.step(restored, x[n + 3])
    assert out_b.prediction.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(out_a.prediction), np.asarray(out_b.prediction))
    # a float32 snapshot is refused by a float64 predictor's template (its shape only: nothing is compiled)
    template64 = jax.eval_shape(Predictor(_config("float64")).init, x[:n])
    with pytest.raises(snapshot.SnapshotError):
        snapshot.decode_state(blob, template64)


def _state_dtypes(tree) -> list[tuple[str, jnp.dtype]]:
    return [(jax.tree_util.keystr(p), leaf.dtype) for p, leaf in jax.tree_util.tree_leaves_with_path(tree)]


def test_default_config_float32_keeps_dtypes_through_a_step():
    """Trace only (no compile): with the default configuration every non-DGM float of the state and output is
    float32 and the step maps the state to the same dtypes (a scan carry would otherwise fail)."""
    cfg = PredictorConfig.default().replace({"core.dtype": "float32"})
    static, params = cfg.static, cfg.dynamic_params()
    key = jax.random.PRNGKey(0)
    history = jax.ShapeDtypeStruct((static.base_min_signal_length + 8,), jnp.float32)
    ts = jax.ShapeDtypeStruct((), jnp.int64)
    state, first = jax.eval_shape(lambda h, t: step_mod.init_state(h, t, key, static, params), history, ts)
    value = jax.ShapeDtypeStruct((), jnp.float32)
    new, out = jax.eval_shape(lambda s, y, t: step_mod.step(s, y, t, t, static, params), state, value, ts)
    assert _state_dtypes(new) == _state_dtypes(state)
    dgm_carry = jax.tree_util.keystr((jax.tree_util.GetAttrKey("kernel"), jax.tree_util.GetAttrKey("kernel_carries"),
                                      jax.tree_util.SequenceKey(1)))
    wide = [p for p, d in _state_dtypes((state, first, out)) if d == jnp.float64 and dgm_carry not in p]
    assert wide == []


def test_sde_noise_follows_the_requested_dtype():
    """Float32 Kernel C draws the same random numbers as float64, rounded (only the rounding differs)."""
    key = jax.random.PRNGKey(3)
    for alpha in (2.0, 1.5):
        n64 = sde.levy_increments(key, jnp.asarray(alpha), jnp.asarray(0.0), jnp.asarray(0.05), (20, 8))
        n32 = sde.levy_increments(key, jnp.asarray(alpha, jnp.float32), jnp.asarray(0.0, jnp.float32),
                                  jnp.asarray(0.05, jnp.float32), (20, 8))
        assert n64.dtype == jnp.float64 and n32.dtype == jnp.float32
        np.testing.assert_allclose(n32, n64, rtol=1e-5, atol=1e-6)
    j64 = sde.jump_increments(key, 3.0, 0.0, 1.0, 20, 8, 4)
    j32 = sde.jump_increments(key, jnp.float32(3.0), jnp.float32(0.0), jnp.float32(1.0), 20, 8, 4, jnp.float32)
    assert j64.dtype == jnp.float64 and j32.dtype == jnp.float32 and (j64 != 0).any()
    np.testing.assert_allclose(j32, j64, rtol=1e-5, atol=1e-6)
