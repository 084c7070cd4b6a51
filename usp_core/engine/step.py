"""The causal step (SPEC §3.3) and its scan/vmap drivers. Everything here is pure and jitted by the caller.

Order of operations in one step: ingestion gate, residual against the forecast made before the observation,
EMA volatility, kurtosis-adaptive CUSUM, fusion weights (Sinkhorn + JKO under the precedence table of SPEC
§3.8), window update and kernel forecasts, calibrated mixture, adaptive layer for the next step.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.scipy.special import ndtri
from jaxtyping import Array, Float, Int

from usp_core.engine import adaptive, cusum, fusion, gate
from usp_core.engine.state import NUM_KERNELS, PredictorState, StepOutput, Telemetry
from usp_core.kernels import KERNELS

_CALIBRATION_Z2_CAP = 100.0  # one wild residual may widen the interval, not blow it up


def fill_missing(x: Float[Array, " m"]) -> Float[Array, " m"]:
    """Forward-fill non-finite entries (leading ones take the first finite value; all missing gives 0)."""
    m = x.shape[0]
    finite = jnp.isfinite(x)
    idx = jax.lax.cummax(jnp.where(finite, jnp.arange(m), -1))
    first = jnp.argmax(finite)
    filled = x[jnp.where(idx < 0, first, idx)]
    return jnp.where(finite.any(), filled, jnp.zeros_like(x))


def _with_adaptive(params: dict, holder) -> dict:
    theta_low, theta_high = adaptive.stiffness_thresholds(
        holder, stiffness_low=params["stiffness_low"], stiffness_high=params["stiffness_high"],
        c1=params["stiffness_c1"], c2=params["stiffness_c2"])
    return {**params, "stiffness_theta_low": theta_low, "stiffness_theta_high": theta_high}


def _window_scale(window, params) -> Float[Array, ""]:
    return jnp.sqrt(jnp.var(window) + (params["numerical_epsilon"] * jnp.maximum(jnp.abs(jnp.mean(window)), 1.0)) ** 2)


def _interval_z(params) -> Float[Array, ""]:
    return ndtri(0.5 + 0.5 * params["interval_level"])


def _forecast_all(window, carries, key, static, params):
    keys = jax.random.split(key, NUM_KERNELS)
    results = [k.forecast(window, c, kk, static, params) for k, c, kk in zip(KERNELS, carries, keys, strict=True)]
    preds = jnp.stack([r.prediction for r in results])
    sigmas = jnp.stack([r.sigma for r in results])
    meta: dict[str, Array] = {}
    for r in results:
        meta.update(r.metadata)
    return preds, sigmas, meta, tuple(r.carry for r in results)


def _mixture(weights, preds, sigmas) -> tuple[Float[Array, ""], Float[Array, ""]]:
    """Mean and std of the weighted Gaussian mixture; the variance is summed in centred form
    (sum w (s^2 + (p - mean)^2)) to avoid cancellation at large levels."""
    mean = jnp.sum(weights * preds)
    var = jnp.sum(weights * (sigmas**2 + (preds - mean) ** 2))
    return mean, jnp.sqrt(jnp.maximum(var, jnp.min(sigmas) ** 2))


def _zero_telemetry() -> Telemetry:
    return Telemetry(*([jnp.zeros((), jnp.int64)] * len(Telemetry._fields)))


def _entropy_metadata(meta, dtype):
    entropy = meta.get("dgm_entropy", jnp.zeros((), dtype))
    collapsed = meta.get("mode_collapse", jnp.zeros((), dtype)) > 0.5
    return entropy, collapsed


def init_state(history: Float[Array, " m"], timestamp_ns: Int[Array, ""], key, static, params) -> tuple[PredictorState, StepOutput]:
    """State after consuming ``history`` (m >= n values, the last one observed at ``timestamp_ns``) and the
    output of that moment: the forecast of the value after the last history entry."""
    n = static.base_min_signal_length
    dtype = history.dtype
    history = fill_missing(history)
    window = history[-n:]
    key, init_key, forecast_key = jax.random.split(key, 3)
    holder0 = jnp.asarray(0.5, dtype)
    aug = _with_adaptive(params, holder0)
    init_keys = jax.random.split(init_key, NUM_KERNELS)
    carries = tuple(k.init_carry(history[:-1], static, aug, kk) for k, kk in zip(KERNELS, init_keys, strict=True))
    preds, sigmas, meta, carries = _forecast_all(window, carries, forecast_key, static, aug)
    weights = jnp.full((NUM_KERNELS,), 1.0 / NUM_KERNELS, dtype)
    forecast, mixture_sigma = _mixture(weights, preds, sigmas)
    scale = _window_scale(window, params)
    ema_variance = jnp.var(jnp.diff(window))
    volatility = jnp.sqrt(ema_variance) / scale
    holder = meta.get("holder_exponent", holder0)
    entropy, _ = _entropy_metadata(meta, dtype)
    epsilon = fusion.sinkhorn_epsilon(volatility, params["sinkhorn_epsilon_0"], params["sinkhorn_epsilon_min"],
                                      params["sinkhorn_alpha"])
    zero_f = jnp.zeros((), dtype)
    zero_i = jnp.zeros((), jnp.int64)
    false = jnp.asarray(False)
    state = PredictorState(
        forecast=forecast, forecast_sigma=mixture_sigma, mixture_sigma=mixture_sigma,
        kernel_predictions=preds, kernel_sigmas=sigmas, weights=weights,
        kernel_loss=jnp.zeros((NUM_KERNELS,), dtype), window=window, ema_variance=ema_variance,
        calibration_z2=jnp.ones((), dtype), cusum_g_plus=zero_f, cusum_g_minus=zero_f,
        cusum_h=cusum.cusum_threshold(params["kurtosis_reference"], params["cusum_h"], params["kurtosis_reference"]),
        grace=zero_i, z_window=jnp.zeros((static.residual_window_size,), dtype), z_count=zero_i,
        kurtosis=params["kurtosis_reference"].astype(dtype), volatility=volatility, epsilon=epsilon,
        holder_exponent=holder, dgm_entropy=entropy, dgm_entropy_baseline=entropy,
        degraded=false, clean_streak=zero_i, frozen=false, reference_variance=jnp.var(window),
        emergency=jnp.asarray(False), collapse_streak=zero_i,
        last_timestamp_ns=jnp.asarray(timestamp_ns, jnp.int64), consecutive_outliers=zero_i,
        steps=zero_i, key=key, kernel_carries=carries, telemetry=_zero_telemetry(),
    )
    return state, _output_of(state, params, rejected=false, regime_change=false, outlier=false, stale=false,
                             gap=false, free_energy=zero_f, converged=jnp.asarray(True), sinkhorn_error=zero_f,
                             residual=jnp.full((), jnp.nan, dtype), z_score=jnp.full((), jnp.nan, dtype),
                             collapse_warning=false)


def _output_of(state: PredictorState, params, *, rejected, regime_change, outlier, stale, gap, free_energy,
               converged, sinkhorn_error, residual, z_score, collapse_warning) -> StepOutput:
    half_width = _interval_z(params) * state.forecast_sigma
    return StepOutput(
        prediction=state.forecast, lower=state.forecast - half_width, upper=state.forecast + half_width,
        sigma=state.forecast_sigma, mode=gate.operating_mode(state.emergency, state.degraded),
        regime_change=regime_change, degraded=state.degraded, emergency=state.emergency, rejected=rejected,
        outlier=outlier, stale=stale, gap=gap, frozen=state.frozen, weights=state.weights,
        kernel_predictions=state.kernel_predictions, kernel_sigmas=state.kernel_sigmas, epsilon=state.epsilon,
        cusum_h=state.cusum_h, cusum_g_plus=state.cusum_g_plus, cusum_g_minus=state.cusum_g_minus,
        kurtosis=state.kurtosis, holder_exponent=state.holder_exponent, dgm_entropy=state.dgm_entropy,
        free_energy=free_energy, sinkhorn_converged=converged, sinkhorn_error=sinkhorn_error, residual=residual,
        z_score=z_score, volatility=state.volatility, mode_collapse_warning=collapse_warning,
    )


def step(state: PredictorState, y: Float[Array, ""], timestamp_ns: Int[Array, ""], now_ns: Int[Array, ""],
         static, params) -> tuple[PredictorState, StepOutput]:
    """Consume one observation; return the new state and the forecast of the next value."""
    dtype = state.window.dtype
    y = jnp.asarray(y, dtype)
    n = static.base_min_signal_length

    # 1. ingestion gate
    decision = gate.gate_observation(
        y, timestamp_ns, now_ns, state.last_timestamp_ns, state.window, state.consecutive_outliers,
        outlier_z_threshold=params["outlier_z_threshold"],
        outlier_max_consecutive=params["outlier_max_consecutive"], staleness_ttl_ns=params["staleness_ttl_ns"],
        max_gap_ns=params["max_gap_ns"])
    rejected = decision.rejected
    y_ok = jnp.where(rejected, state.window[-1], y)

    # 2. residual against the forecast made before y was seen (SPEC §12.5)
    residual = y_ok - state.forecast
    z = residual / state.forecast_sigma
    z_raw = residual / state.mixture_sigma

    # 3. volatility
    alpha = params["volatility_alpha"]
    ema_variance = alpha * residual**2 + (1 - alpha) * state.ema_variance
    scale = _window_scale(state.window, params)
    volatility = jax.lax.stop_gradient(jnp.sqrt(ema_variance) / scale)

    # 4. CUSUM with the kurtosis-adaptive threshold. h_t comes from the residuals before z_t: the value under
    # test must not raise its own threshold (one 10-sigma jump would otherwise lift h_t above its statistic).
    r = static.residual_window_size
    kurtosis = cusum.window_kurtosis(state.z_window, state.z_count, min_samples=params["kurtosis_min_samples"],
                                     reference=params["kurtosis_reference"], low=params["kurtosis_min"],
                                     high=params["kurtosis_max"])
    cusum_h = cusum.cusum_threshold(kurtosis, params["cusum_h"], params["kurtosis_reference"])
    z_window = state.z_window.at[state.z_count % r].set(z)
    z_count = state.z_count + 1
    cu = cusum.cusum_update(state.cusum_g_plus, state.cusum_g_minus, state.grace, z, k=params["cusum_k"], h=cusum_h,
                            grace_period=params["grace_period_steps"])

    # frozen signal, staleness and gaps -> degraded (with hysteresis)
    window = jnp.concatenate([state.window[1:], y_ok[None]])
    frozen = gate.is_frozen(window, params["frozen_signal_min_steps"]) | (
        state.frozen & ~gate.has_recovered(window, params["frozen_signal_recovery_steps"], state.reference_variance,
                                           params["frozen_signal_recovery_ratio"]))
    reference_variance = jnp.where(frozen, state.reference_variance, jnp.var(window))
    degraded, clean_streak = gate.degraded_hysteresis(decision.stale | decision.gap | frozen, state.degraded,
                                                      state.clean_streak, params["frozen_signal_recovery_steps"])

    # emergency from the Hoelder exponent of the previous step's window (known before y_t arrives)
    emergency = gate.emergency_update(state.emergency, state.holder_exponent,
                                      holder_threshold=params["holder_threshold"],
                                      holder_hysteresis=params["holder_hysteresis"],
                                      dimension_threshold=params["robustness_dimension_threshold"])

    # 5. weights: loss-based Gibbs target, Sinkhorn transport, JKO step, precedence table (SPEC §3.8)
    epsilon = fusion.sinkhorn_epsilon(volatility, params["sinkhorn_epsilon_0"], params["sinkhorn_epsilon_min"],
                                      params["sinkhorn_alpha"])
    jko = adaptive.jko_parameters(volatility**2, epsilon_0=params["sinkhorn_epsilon_0"],
                                  domain_length=params["jko_domain_length"],
                                  relaxation_factor=params["jko_relaxation_factor"],
                                  safety_factor=params["jko_safety_factor"],
                                  window_floor=params["entropy_window_floor"], window_cap=params["entropy_window"],
                                  learning_rate_max=params["learning_rate_max"])
    step_losses = fusion.kernel_losses(y_ok, state.kernel_predictions, state.kernel_sigmas, scale, kind=static.fusion_loss)
    rate = 2.0 / (jko.window.astype(dtype) + 1.0)
    kernel_loss = jnp.where(cu.regime_change, 0.0, (1 - rate) * state.kernel_loss + rate * step_losses)
    target = fusion.gibbs_target(kernel_loss, params["fusion_temperature"])
    use_huber = emergency | (static.sinkhorn_cost_type == "huber")
    cost = fusion.transport_cost((state.kernel_predictions - jnp.mean(state.window)) / scale, use_huber,
                                 params["sinkhorn_huber_delta"])
    transport = fusion.sinkhorn(state.weights, target, cost, epsilon, num_iters=static.sinkhorn_max_iter,
                                atol=params["validation_simplex_atol"])
    jko_weights = fusion.jko_update(state.weights, transport.plan, jko.tau)
    emergency_weights = jnp.zeros((NUM_KERNELS,), dtype).at[-1].set(1.0)
    uniform = jnp.full((NUM_KERNELS,), 1.0 / NUM_KERNELS, dtype)
    force_d = emergency & static.robustness_force_kernel_d
    frozen_weights = (state.grace > 0) | degraded
    weights = jnp.where(force_d, emergency_weights,
                        jnp.where(cu.regime_change, uniform, jnp.where(frozen_weights, state.weights, jko_weights)))

    # 6. window update, kernel forecasts of y_{t+1}, calibrated mixture
    key, forecast_key = jax.random.split(state.key)
    aug = _with_adaptive(params, state.holder_exponent)
    preds, sigmas, meta, carries = _forecast_all(window, state.kernel_carries, forecast_key, static, aug)
    forecast, mixture_sigma = _mixture(weights, preds, sigmas)
    beta = params["calibration_alpha"]
    calibration_z2 = (1 - beta) * state.calibration_z2 + beta * jnp.minimum(z_raw**2, _CALIBRATION_Z2_CAP)
    forecast_sigma = mixture_sigma * jnp.sqrt(calibration_z2)

    # 7. adaptive layer for the next step
    holder = meta.get("holder_exponent", state.holder_exponent)
    entropy, collapsed = _entropy_metadata(meta, dtype)
    collapse_streak = jnp.where(collapsed, state.collapse_streak + 1, 0)
    patience = adaptive.mode_collapse_patience(jko.window, min_threshold=params["mode_collapse_min_threshold"],
                                               window_ratio=params["mode_collapse_window_ratio"])
    collapse_warning = collapse_streak >= patience
    # Differential entropies can be negative, so capacity scaling compares entropy powers exp(H - H0).
    capacity_request = jnp.exp(entropy - state.dgm_entropy_baseline) > params["entropy_scaling_trigger"]

    accepted = PredictorState(
        forecast=forecast, forecast_sigma=forecast_sigma, mixture_sigma=mixture_sigma, kernel_predictions=preds,
        kernel_sigmas=sigmas, weights=weights, kernel_loss=kernel_loss, window=window, ema_variance=ema_variance,
        calibration_z2=calibration_z2, cusum_g_plus=cu.g_plus, cusum_g_minus=cu.g_minus, cusum_h=cusum_h,
        grace=cu.grace, z_window=z_window, z_count=z_count, kurtosis=kurtosis, volatility=volatility,
        epsilon=epsilon, holder_exponent=holder, dgm_entropy=entropy,
        dgm_entropy_baseline=state.dgm_entropy_baseline, degraded=degraded, clean_streak=clean_streak,
        frozen=frozen, reference_variance=reference_variance, emergency=emergency,
        collapse_streak=collapse_streak.astype(jnp.int64), last_timestamp_ns=jnp.asarray(timestamp_ns, jnp.int64),
        consecutive_outliers=decision.consecutive_outliers, steps=state.steps + 1, key=key, kernel_carries=carries,
        telemetry=state.telemetry,
    )
    # A rejected observation changes nothing but the gate counters (SPEC §3.3 step 1).
    new_state = jax.tree.map(lambda old, new: jnp.where(rejected, old, new), state, accepted)
    regime_change = cu.regime_change & ~rejected
    t = state.telemetry
    one = jnp.ones((), jnp.int64)
    telemetry = Telemetry(
        rejected=t.rejected + rejected * one, non_finite=t.non_finite + decision.non_finite * one,
        outliers=t.outliers + decision.outlier * one, out_of_order=t.out_of_order + decision.out_of_order * one,
        stale=t.stale + decision.stale * one, gaps=t.gaps + decision.gap * one,
        frozen=t.frozen + (frozen & ~rejected) * one, regime_changes=t.regime_changes + regime_change * one,
        emergency_steps=t.emergency_steps + (new_state.emergency & ~rejected) * one,
        sinkhorn_unconverged=t.sinkhorn_unconverged + (~transport.converged & ~rejected) * one,
        dgm_capacity_requests=t.dgm_capacity_requests + (capacity_request & ~rejected) * one,
    )
    new_state = eqx.tree_at(lambda s: (s.telemetry, s.consecutive_outliers), new_state,
                            (telemetry, decision.consecutive_outliers))
    out = _output_of(new_state, params, rejected=rejected, regime_change=regime_change,
                     outlier=decision.outlier, stale=decision.stale, gap=decision.gap,
                     free_energy=transport.free_energy, converged=transport.converged,
                     sinkhorn_error=transport.marginal_error, residual=jnp.where(rejected, jnp.nan, residual),
                     z_score=jnp.where(rejected, jnp.nan, z), collapse_warning=collapse_warning & ~rejected)
    return new_state, out


def _nan_output_like(out: StepOutput, length: int) -> StepOutput:
    """Placeholder outputs before the first forecast: NaN floats, False flags, mode -1 (SPEC §3.1)."""

    def blank(x):
        shape = (length, *x.shape)
        if jnp.issubdtype(x.dtype, jnp.floating):
            return jnp.full(shape, jnp.nan, x.dtype)
        if x.dtype == jnp.bool_:
            return jnp.zeros(shape, bool)
        return jnp.full(shape, -1, x.dtype)

    return jax.tree.map(blank, out)


def run_series(values: Float[Array, " T"], timestamps_ns: Int[Array, " T"], now_ns: Int[Array, " T"], key,
               static, params) -> StepOutput:
    """Init on the first n values, then ``lax.scan`` the step over the rest; outputs aligned with ``values``."""
    m = static.base_min_signal_length
    state, first = init_state(values[:m], timestamps_ns[m - 1], key, static, params)

    def body(carry, xs):
        y, ts, now = xs
        return step(carry, y, ts, now, static, params)

    _, outs = jax.lax.scan(body, state, (values[m:], timestamps_ns[m:], now_ns[m:]))
    head = _nan_output_like(first, m - 1)
    return jax.tree.map(lambda a, b, c: jnp.concatenate([a, b[None], c]), head, first, outs)


def run_panel(values: Float[Array, "B T"], timestamps_ns: Int[Array, "B T"], now_ns: Int[Array, "B T"], key,
              static, params) -> StepOutput:
    """``vmap`` over series of :func:`run_series`; every series uses the same root key, so a series' forecasts
    do not depend on which other series share the panel (vmap parity)."""
    return jax.vmap(run_series, in_axes=(0, 0, 0, None, None, None))(values, timestamps_ns, now_ns, key, static, params)


def run_trials(values, timestamps_ns, now_ns, key, static, params_batch) -> StepOutput:
    """``vmap`` over trials (dynamic parameters with a leading K axis) of :func:`run_panel`."""
    return jax.vmap(run_panel, in_axes=(None, None, None, None, None, 0))(values, timestamps_ns, now_ns, key, static,
                                                                           params_batch)
