"""Properties of the whole predictor (SPEC §3.3): causality, equivariance, determinism, vmap parity,
step == run, simplex, no recompilation on dynamic changes, snapshot/restore."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from usp_core import Predictor
from usp_core.engine import predictor as predictor_module
from usp_core.engine import snapshot
from usp_core.engine.fusion import simplex_violation
from usp_core.engine.predictor import count_compilations
from usp_core.engine.state import NUM_EXPERTS

T, B = 96, 3
FLOAT_FIELDS = ("prediction", "lower", "upper", "sigma")
EXACT_FIELDS = ("mode", "regime_change", "degraded", "emergency", "rejected")

@pytest.fixture(scope="module")
def predictor(small_config):
    return Predictor(small_config)


def _panel(seed, b=B, t=T):
    rng = np.random.default_rng(seed)
    return np.cumsum(rng.normal(size=(b, t)), axis=1) + 10.0


def _assert_same(a, b, upto=None):
    for name in a._fields:
        x, y = getattr(a, name), getattr(b, name)
        if upto is not None:  # single-series outputs: time is the first axis
            x, y = x[:upto], y[:upto]
        np.testing.assert_array_equal(x, y, err_msg=name)


def test_alignment_and_shapes(predictor):
    out = predictor.run(_panel(0))
    m = predictor.min_history
    assert out.prediction.shape == (B, T) and out.weights.shape == (B, T, NUM_EXPERTS)
    assert np.isnan(out.prediction[:, : m - 1]).all() and np.isfinite(out.prediction[:, m - 1:]).all()
    assert (out.mode[:, : m - 1] == -1).all() and not out.regime_change[:, : m - 1].any()
    forecasts = np.isfinite(out.prediction)
    assert (forecasts[:, m - 1:]).all() and (out.lower[forecasts] <= out.prediction[forecasts]).all()
    assert (out.prediction[forecasts] <= out.upper[forecasts]).all()


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10_000), cut=st.integers(40, T - 2), bad=st.sampled_from([np.nan, 1e6, -3.0, 0.0]))
def test_causality_future_values_never_change_the_past(predictor, seed, cut, bad):
    x = _panel(seed, b=1)[0]
    y = x.copy()
    y[cut + 1:] = bad if not np.isfinite(bad) or abs(bad) > 1 else y[cut + 1:] * bad
    _assert_same(predictor.run(x), predictor.run(y), upto=cut + 1)


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10_000), a=st.floats(1e-2, 1e3), b=st.floats(-1e3, 1e3))
def test_scale_and_shift_equivariance(predictor, seed, a, b):
    x = _panel(seed, b=1)[0]
    base, moved = predictor.run(x), predictor.run(a * x + b)
    for name in FLOAT_FIELDS:
        np.testing.assert_allclose(getattr(moved, name), a * getattr(base, name) + (0 if name == "sigma" else b),
                                   rtol=1e-6, atol=1e-6 * (abs(b) + a), err_msg=name)
    for name in EXACT_FIELDS:
        np.testing.assert_array_equal(getattr(moved, name), getattr(base, name), err_msg=name)
    np.testing.assert_allclose(moved.weights, base.weights, atol=1e-6)


def test_determinism(predictor):
    x = _panel(5)
    _assert_same(predictor.run(x), predictor.run(x))


def _with_dtype(config, dtype: str):
    """The config with the DGM and Kernel A in ``dtype`` (both float32 in the defaults)."""
    return config.replace({"kernels.dgm_dtype": dtype, "kernels.kernel_a_dtype": dtype})


@pytest.mark.parametrize(("dtype", "tolerance"), [("float64", 1e-12), ("float32", 1e-5)])
def test_vmap_parity(small_config, dtype, tolerance):
    """A series' outputs do not depend on the panel it runs in. In float64 to rounding; a float32 DGM (the
    default) sums in a batch-shape-dependent order (~1e-8 relative, measured 9e-9 here), which its online Adam
    steps and the increment shrinkage's t statistic (usp_core.engine.shrinkage) amplify over a run (3.7e-6 relative
    in one weight of 576 here), so the float32 bound is looser."""
    predictor = Predictor(_with_dtype(small_config, dtype))
    x = _panel(6)
    together = predictor.run(x)
    for i in range(B):
        alone = predictor.run(x[i])
        for name in FLOAT_FIELDS + ("weights", "kernel_predictions"):
            np.testing.assert_allclose(getattr(together, name)[i], getattr(alone, name), rtol=tolerance,
                                       atol=tolerance, err_msg=name)
        for name in EXACT_FIELDS:
            np.testing.assert_array_equal(getattr(together, name)[i], getattr(alone, name), err_msg=name)


@pytest.mark.parametrize(("dtype", "tolerance"), [("float64", 1e-9), ("float32", 1e-3)])
def test_step_loop_equals_run(small_config, dtype, tolerance):
    """p.step one observation at a time gives p.run's outputs. A float32 DGM (the default) rounds differently in
    the two programs (XLA fuses the step and the scan body apart): 3e-6 relative in sigma at the first step, and
    its Adam steps amplify that to ~1e-4 in the weights within 40 steps here."""
    predictor = Predictor(_with_dtype(small_config, dtype))
    x = _panel(7, b=1)[0][:70]
    out = predictor.run(x, bucket=False)
    m = predictor.min_history
    state = predictor.init(x[:m])
    for t in range(m, x.size):
        res, state = predictor.step(state, x[t], timestamp_ns=t)
        for name in FLOAT_FIELDS:
            np.testing.assert_allclose(getattr(res, name), getattr(out, name)[t], rtol=tolerance,
                                       err_msg=f"{name}@{t}")
        np.testing.assert_allclose(res.weights, out.weights[t], rtol=tolerance, atol=1e-3 * tolerance)


def test_weights_stay_on_the_simplex(predictor):
    out = predictor.run(_panel(8))
    w = out.weights[:, predictor.min_history - 1:]
    assert float(np.max(simplex_violation(jnp.asarray(w)))) <= 1e-10


def test_dynamic_parameter_changes_do_not_recompile(predictor, small_config):
    x = _panel(9)
    with count_compilations() as first:
        predictor.run(x)
    with count_compilations() as counts:
        changed = Predictor(small_config.replace({"orchestration.cusum_k": 0.8, "kernels.kernel_ridge_lambda": 1e-3,
                                                  "orchestration.sinkhorn_alpha": 0.9}))
        out = changed.run(x)
    assert sum(counts.values()) == 0, counts
    assert first["run"] <= 1  # the counter sees compilations (0 when an earlier test compiled this shape)
    assert not np.array_equal(out.prediction, predictor.run(x).prediction, equal_nan=True)


def test_snapshot_restore_mid_run_is_exact(predictor, small_config, tmp_path):
    x = _panel(10, b=1)[0][:70]
    m = predictor.min_history
    state = predictor.init(x[:m])
    straight = []
    for t in range(m, x.size):
        res, state = predictor.step(state, x[t], timestamp_ns=t)
        straight.append(res)
    store = snapshot.SnapshotStore(tmp_path, keep=2)
    state = predictor.init(x[:m])
    for t in range(m, m + 10):
        _, state = predictor.step(state, x[t], timestamp_ns=t)
    key = snapshot.static_key_of(small_config)
    path = store.save(state, config_version=small_config.version, static_key=key)
    restored, header = store.load_latest(predictor.init(x[:m]), static_key=key)
    assert header["config_version"] == small_config.version
    for t in range(m + 10, x.size):
        res, restored = predictor.step(restored, x[t], timestamp_ns=t)
        for name in res._fields:
            np.testing.assert_array_equal(getattr(res, name), getattr(straight[t - m], name), err_msg=name)
    blob = bytearray(path.read_bytes())
    blob[-3] ^= 0x01
    with pytest.raises(snapshot.SnapshotError, match="digest"):
        snapshot.decode_state(bytes(blob), state)


def test_snapshot_store_falls_back_and_keeps_the_newest(predictor, small_config, tmp_path):
    x = _panel(11, b=1)[0]
    state = predictor.init(x[: predictor.min_history])
    store = snapshot.SnapshotStore(tmp_path, keep=2)
    paths = [store.save(state, config_version=small_config.version, static_key="k") for _ in range(3)]
    assert len(store.paths()) == 2 and not paths[0].exists()
    paths[-1].write_bytes(paths[-1].read_bytes()[:-5])  # newest corrupted -> the previous one is used
    loaded, _ = store.load_latest(state, static_key="k")
    np.testing.assert_array_equal(loaded.window, state.window)
    for p in store.paths():
        p.write_bytes(b"garbage")
    assert store.load_latest(state) is None


def test_snapshot_hmac(predictor, small_config, monkeypatch):
    state = predictor.init(_panel(12, b=1)[0][: predictor.min_history])
    monkeypatch.setenv(snapshot.HMAC_ENV, "secret-a")
    blob = snapshot.encode_state(state, config_version="v", static_key="k")
    snapshot.decode_state(blob, state)
    monkeypatch.setenv(snapshot.HMAC_ENV, "secret-b")
    with pytest.raises(snapshot.SnapshotError, match="HMAC"):
        snapshot.decode_state(blob, state)


def test_run_trials_matches_individual_runs(predictor, small_config):
    from usp_core.engine.predictor import stack_params

    x = _panel(13, b=2)
    cfgs = [small_config, small_config.replace({"orchestration.volatility_alpha": 0.2})]
    out = predictor.run_trials(x, stack_params(cfgs))
    for k, c in enumerate(cfgs):
        single = Predictor(c).run(x)
        np.testing.assert_allclose(out.prediction[k], single.prediction, rtol=1e-12, atol=1e-12)


def test_too_short_input_is_a_clear_error(predictor):
    with pytest.raises(ValueError, match="min_history"):
        predictor.run(np.zeros(predictor.min_history - 1))
    with pytest.raises(ValueError, match="at least"):
        predictor.init(np.zeros(3))


def test_run_trials_shares_the_kernel_pass_only_when_kernel_parameters_agree(predictor, small_config):
    from usp_core.engine.predictor import stack_params

    x = _panel(14, b=2)
    fusion_only = [small_config, small_config.replace({"orchestration.cusum_k": 0.9, "orchestration.sinkhorn_alpha": 0.1})]
    mixed = [small_config, small_config.replace({"kernels.kernel_ridge_lambda": 1e-3})]
    with count_compilations() as first:
        shared = predictor.run_trials(x, stack_params(fusion_only))
    with count_compilations() as second:
        full = predictor.run_trials(x, stack_params(mixed))
    assert first["run_trials_shared"] <= 1 and first["run_trials"] == 0, first
    assert second["run_trials_shared"] == 0 and second["run_trials"] <= 1, second
    with count_compilations() as again:
        predictor.run_trials(x, stack_params(mixed))
    assert sum(again.values()) == 0, again
    assert 2 <= len(predictor_module._trial_programs) <= predictor_module.TRIAL_PROGRAMS_KEPT  # held until released
    predictor_module.release_compiled_programs()
    assert len(predictor_module._trial_programs) == 0
    for out, cfgs in ((shared, fusion_only), (full, mixed)):
        for k, c in enumerate(cfgs):
            np.testing.assert_allclose(out.prediction[k], Predictor(c).run(x).prediction, rtol=1e-12, atol=1e-12)


def test_compiled_programs_keep_the_most_recently_used():
    from usp_core.engine.workers import CompiledPrograms

    programs, compiled = CompiledPrograms(2), []

    def compile_(key):
        compiled.append(key)
        return f"program {key}"

    for key in ("a", "b", "a", "c", "b", "a"):
        assert programs.get(key, lambda key=key: compile_(key))[0] == f"program {key}"
        assert len(programs) <= 2
    assert compiled == ["a", "b", "c", "b", "a"]  # "b" dropped for "c" (least recently used), then "a" for "b"
    programs.clear()
    assert len(programs) == 0


def test_compile_run_ahead_of_time_equals_run(predictor):
    x = _panel(15, b=2)
    compiled = predictor.compile_run(x)
    assert compiled.compile_seconds >= 0.0
    with count_compilations() as counts:
        out = compiled(x + 1.0)  # any values of the compiled shape, no tracing, no compilation
    assert sum(counts.values()) == 0
    np.testing.assert_array_equal(out.prediction, predictor.run(x + 1.0).prediction)


def test_batches_pad_to_a_power_of_two_then_to_multiples_of_eight():
    from usp_core.engine.predictor import batch_bucket

    assert [batch_bucket(b) for b in (1, 2, 3, 5, 8, 9, 17, 130, 256)] == [1, 2, 4, 8, 8, 16, 24, 136, 256]


def test_runs_scan_whole_chunks_from_the_first_forecast():
    """A run scans from index m - 1 in chunks of ``RUN_CHUNK`` steps (padding steps are NaN and sliced off: step ==
    run and causality hold for padded lengths), so one program serves every series length."""
    from usp_core.engine.predictor import RUN_CHUNK, run_steps

    for m in (2, 32, 64):
        for t in range(m, m + 4 * RUN_CHUNK):
            steps = run_steps(t, m)
            assert steps % RUN_CHUNK == 0 and t - m + 1 <= steps < t - m + 1 + RUN_CHUNK, (m, t, steps)


def test_one_run_program_serves_every_length(predictor):
    x = _panel(16, b=2)
    predictor.run(x)
    with count_compilations() as counts:
        short, longer = predictor.run(x[:, :40]), predictor.run(np.concatenate([x, x + 3.0], axis=1))
    assert sum(counts.values()) == 0, counts
    np.testing.assert_array_equal(short.prediction, predictor.run(x).prediction[:, :40])
    assert longer.prediction.shape == (2, 2 * x.shape[1])


@pytest.mark.parametrize("program", ["run", "run_trials_shared"])
def test_a_run_program_traces_each_expert_forecast_once(small_config, monkeypatch, program):
    """A run primes the kernels (``step.kernel_prime``) and makes their first forecasts in the first step of its
    chunk program: the forecast code, most of a program's compile time, is traced once for the run's two programs,
    not once for the initial state and again for the step."""
    from collections import Counter

    import jax

    from usp_core.engine import step as step_mod

    traced = Counter()

    def counting(kernel):
        def forecast(*args):
            traced[kernel.name] += 1
            return kernel.forecast(*args)

        return kernel._replace(forecast=forecast)

    monkeypatch.setattr(step_mod, "EXPERTS", tuple(counting(k) for k in step_mod.EXPERTS))
    p = Predictor(small_config)
    m, c = p.min_history, 8
    heads, last = jax.ShapeDtypeStruct((2, m), p.dtype), jax.ShapeDtypeStruct((2,), jnp.int64)
    values, stamps = jax.ShapeDtypeStruct((2, c), p.dtype), jax.ShapeDtypeStruct((2, c), jnp.int64)
    first = jax.ShapeDtypeStruct((c,), bool)
    if program == "run":
        states = jax.eval_shape(lambda h, t: step_mod.prime_batch(h, t, p.key, p.static, p.params), heads, last)
        jax.eval_shape(lambda s, v, t, f: step_mod.run_chunk(s, v, t, t, f, p.static, p.params), states, values, stamps,
                       first)
    else:
        trials = {k: jnp.stack([v, v]) for k, v in p.params.items()}
        kernel_side = step_mod.kernel_side(p.params)
        states = jax.eval_shape(lambda h, t: step_mod.prime_trials_shared(h, t, p.key, p.static, kernel_side, trials),
                                heads, last)
        jax.eval_shape(lambda s, v, t, f: step_mod.run_trials_shared_chunk(s, v, t, t, f, p.static, kernel_side, trials),
                       states, values, stamps, first)
    assert traced == {k.name: 1 for k in step_mod.EXPERTS}
