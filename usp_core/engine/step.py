"""The causal step (SPEC §3.3) and its scan/vmap drivers. Everything here is pure and jitted by the caller.

Order of operations in one step: ingestion gate, residual against the forecast made before the observation,
EMA volatility, kurtosis-adaptive CUSUM, fusion weights (Sinkhorn + JKO under the precedence table of SPEC
§3.8), window update and kernel forecasts, calibrated mixture, adaptive layer for the next step.

The step is the composition of a *kernel step* (gate, window, kernel forecasts: reads only kernel-side
parameters, ``KERNEL_SIDE_PARAMS``) and a *fusion step* (everything else). The kernel side never depends on the
fusion side, which lets ``run_trials_shared`` run the expensive kernels once for many fusion trials.
"""

from __future__ import annotations

from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.scipy.special import ndtri
from jaxtyping import Array, Bool, Float, Int

from usp_core.config.schema import FIELDS
from usp_core.engine import adaptive, cusum, fusion, gate, shrinkage
from usp_core.engine.state import (
    NUM_EXPERTS,
    FusionState,
    KernelState,
    KernelTrack,
    PredictorState,
    StepOutput,
    Telemetry,
)
from usp_core.kernels import EXPERTS, KERNELS, SIGNATURE_INDEX, wtmm

NUM_KERNELS = len(KERNELS)
_CALIBRATION_Z2_CAP = 9.0  # a residual beyond 3 sigma counts as 3 sigma: one spike must not triple the next interval
_LOG_INTERVAL_SCALE_BOUND = 3.0  # the coverage tracker may scale the interval by e^-3 .. e^3, not run away
CADENCE_RATE = 0.1  # EMA rate of a series' typical interval (staleness relative to its own cadence)
EXPERT_ENVELOPE = 100.0
"""An expert output further than this many window scales from the window mean (or sigma above it) is a failure."""

KERNEL_SIDE_PARAMS: frozenset[str] = frozenset(
    f.name for f in FIELDS if f.dynamic and (f.section in ("kernels", "gate") or f.name in (
        "numerical_epsilon", "stiffness_low", "stiffness_high", "stiffness_c1", "stiffness_c2")))


def kernel_side(params: dict) -> dict:
    """The parameters the kernel step may read; anything else raises a KeyError at trace time."""
    return {k: v for k, v in params.items() if k in KERNEL_SIDE_PARAMS}


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


def _forecast_all(window, carries, key, static, params, accept=True):
    """Every expert's forecast of the next value. An expert whose prediction or sigma is not finite (SPEC §3.13), or
    outside ``EXPERT_ENVELOPE``, keeps its previous carry, and its output is replaced by the last value with the
    window's scale (so nothing non-finite reaches the fusion state) and flagged in ``ok``. Where ``accept`` is
    False (a rejected observation) every expert keeps its carry: one select per carry serves both cases (the DGM's
    network and optimiser state are most of a step's memory traffic)."""
    keys = jax.random.split(key, NUM_EXPERTS)
    results = [k.forecast(window, c, kk, static, params) for k, c, kk in zip(EXPERTS, carries, keys, strict=True)]
    raw_preds = jnp.stack([r.prediction for r in results])
    raw_sigmas = jnp.stack([r.sigma for r in results])
    scale = _window_scale(window, params)
    # finite but absurd outputs (a diverged integration) are failures too: they would swamp the mixture variance
    envelope = EXPERT_ENVELOPE * scale
    ok = (jnp.isfinite(raw_preds) & jnp.isfinite(raw_sigmas) & (raw_sigmas > 0)
          & (jnp.abs(raw_preds - jnp.mean(window)) <= envelope) & (raw_sigmas <= envelope))
    preds = jnp.where(ok, raw_preds, window[-1])
    sigmas = jnp.where(ok, raw_sigmas, scale)
    keep = ok & accept
    new_carries = tuple(jax.tree.map(lambda new, old, good=good: jnp.where(good, new, old), r.carry, c)
                        for r, c, good in zip(results, carries, keep, strict=True))
    meta: dict[str, Array] = {}
    for r in results:
        meta.update(r.metadata)
    return preds, sigmas, ok, meta, new_carries


def _mixture(weights, preds, sigmas) -> tuple[Float[Array, ""], Float[Array, ""]]:
    """Mean and std of the weighted Gaussian mixture; the variance is summed in centred form
    (sum w (s^2 + (p - mean)^2)) to avoid cancellation at large levels."""
    mean = jnp.sum(weights * preds)
    var = jnp.sum(weights * (sigmas**2 + (preds - mean) ** 2))
    return mean, jnp.sqrt(jnp.maximum(var, jnp.min(sigmas) ** 2))


def _mixture_weights(weights, expert_ok) -> Float[Array, " k"]:
    """The weights with failed experts left out and the rest renormalised (uniform over the sound ones if no
    weight is left)."""
    dtype = weights.dtype
    kept = jnp.where(expert_ok, weights, 0.0)
    total = jnp.sum(kept)
    return jnp.where(total > 0, kept / jnp.where(total > 0, total, 1.0),
                     expert_ok.astype(dtype) / jnp.maximum(jnp.sum(expert_ok), 1).astype(dtype))


def _scale_weights(scale_loss, loss_mass, rate, params, expert_ok) -> Float[Array, " k1"]:
    """Gibbs weights of the candidate sigmas (experts', then the mixture's) from their bias-corrected mean CRPS; a
    failed expert's sigma is left out."""
    target = fusion.gibbs_target(scale_loss / jnp.maximum(loss_mass, rate), params["scale_temperature"])
    return _mixture_weights(target, jnp.append(expert_ok, True))


def _selection_weights(score, params, ok, force_fused) -> Float[Array, " k1"]:
    """softmax(-eta S) over the fused forecast and the experts whole; a failed expert is left out. Where
    ``force_fused`` (the circuit breaker forcing Kernel D, SPEC §3.8) the output is the fused forecast alone."""
    weights = _mixture_weights(fusion.gibbs_target(score, 1.0 / params["selection_rate"]), ok)
    return jnp.where(force_fused, jnp.zeros_like(weights).at[0].set(1.0), weights)


def _crps_scale_step(log_scale, z, rate) -> Float[Array, ""]:
    """A stochastic gradient step of the CRPS on log sigma (:func:`fusion.crps_log_sigma_gradient`). Under Gaussian z
    its standard deviation is 0.222 rate, the coverage tracker's 0.218 rate at 95 %, so the same rates serve both."""
    step = -rate * fusion.crps_log_sigma_gradient(z)
    return jnp.clip(log_scale + step, -_LOG_INTERVAL_SCALE_BOUND, _LOG_INTERVAL_SCALE_BOUND)


def _coverage_step(log_scale, missed, rate, params) -> Float[Array, ""]:
    """Interval scale c by coverage tracking (adaptive conformal inference, Gibbs & Candes 2021): log c rises by
    rate (1 - level) when the interval missed and falls by rate level otherwise, so the long-run miss rate is
    1 - level whatever the tails; an RMS calibration would over-widen heavy-tailed series."""
    step = rate * (missed - (1 - params["interval_level"]))
    return jnp.clip(log_scale + step, -_LOG_INTERVAL_SCALE_BOUND, _LOG_INTERVAL_SCALE_BOUND)


def _zero_telemetry() -> Telemetry:
    return Telemetry(*([jnp.zeros((), jnp.int64)] * len(Telemetry._fields)))


def _entropy_metadata(meta, dtype):
    entropy = meta.get("dgm_entropy", jnp.zeros((), dtype))
    collapsed = meta.get("mode_collapse", jnp.zeros((), dtype)) > 0.5
    return entropy, collapsed


def _branch(first, primed, stepped):
    """``primed()`` where ``first``, else ``stepped()``. A Python bool picks at trace time (``init_state``); a traced
    flag is a ``lax.cond``: a branch where the flag is the same for every series (the run programs' scans, ``p.init``
    through the step program), a select of both where it is per series (``advance_batch``)."""
    if isinstance(first, bool):
        return primed() if first else stepped()
    return jax.lax.cond(first, primed, stepped)


def kernel_prime(history: Float[Array, " m"], timestamp_ns: Int[Array, ""], key, static, params) -> KernelState:
    """Kernel state ready for its first forecast: the carries trained on ``history[:-1]``, the window and analysis
    buffer of ``history`` (m >= n values, the last observed at ``timestamp_ns``), clocks at -1. ``kernel_step(...,
    first=True)`` then makes the kernels' first forecasts, so a run program compiles the forecast code once, in its
    scan, instead of once for the initial state and once for the step."""
    params = kernel_side(params)
    n = static.base_min_signal_length
    dtype = history.dtype
    history = fill_missing(history)
    window = history[-n:]
    _, init_key, _ = jax.random.split(key, 3)  # the third key is the first forecast's (kernel_step)
    aug = _with_adaptive(params, jnp.asarray(0.5, dtype))
    init_keys = jax.random.split(init_key, NUM_EXPERTS)
    carries = tuple(k.init_carry(history[:-1], static, aug, kk) for k, kk in zip(EXPERTS, init_keys, strict=True))
    buffer, count = wtmm.initial_buffer(history, static)
    zero_i, false = jnp.zeros((), jnp.int64), jnp.asarray(False)
    return KernelState(
        window=window, kernel_carries=carries, kernel_predictions=jnp.zeros((NUM_EXPERTS,), dtype),
        kernel_sigmas=jnp.ones((NUM_EXPERTS,), dtype), expert_ok=jnp.ones((NUM_EXPERTS,), bool),
        raw_increments=jnp.zeros((NUM_KERNELS,), dtype),
        increment_moments=shrinkage.initial_moments(NUM_KERNELS, dtype), analysis_buffer=buffer, analysis_count=count,
        holder_exponent=jnp.asarray(0.5, dtype), dgm_entropy=jnp.zeros((), dtype),
        mode_collapse=false, degraded=false, clean_streak=zero_i, frozen=false, reference_variance=jnp.var(window),
        last_timestamp_ns=jnp.asarray(timestamp_ns, jnp.int64), cadence_ns=jnp.zeros((), dtype),
        consecutive_outliers=zero_i, steps=zero_i - 1, clock=zero_i - 1, key=key)


def fusion_init(predictions: Float[Array, " k"], sigmas: Float[Array, " k"], increment_variance: Float[Array, ""],
                window_scale: Float[Array, ""], dgm_entropy: Float[Array, ""], static, params) -> FusionState:
    """Fusion state before any step: uniform weights over the experts' first forecasts, the volatility of the
    window's increments."""
    dtype = predictions.dtype
    weights = jnp.full((NUM_EXPERTS,), 1.0 / NUM_EXPERTS, dtype)
    forecast, mixture_sigma = _mixture(weights, predictions, sigmas)
    ema_variance = increment_variance
    volatility = jnp.sqrt(ema_variance) / window_scale
    zero_f = jnp.zeros((), dtype)
    zero_i = jnp.zeros((), jnp.int64)
    return FusionState(
        forecast=forecast, forecast_sigma=mixture_sigma, mixture_sigma=mixture_sigma, weights=weights,
        potentials=jnp.zeros((2, NUM_EXPERTS), dtype), kernel_loss=jnp.zeros((NUM_EXPERTS,), dtype), loss_mass=zero_f,
        ema_variance=ema_variance, scale_loss=jnp.zeros((NUM_EXPERTS + 1,), dtype), pooled_sigma=mixture_sigma,
        log_interval_scale=zero_f, garch_variance=jnp.ones((), dtype),
        selection_score=jnp.zeros((NUM_EXPERTS + 1,), dtype), log_selection_scale=zero_f, log_interval_width=zero_f,
        output_forecast=forecast,
        output_sigma=mixture_sigma,
        cusum_g_plus=zero_f, cusum_g_minus=zero_f,
        cusum_h=cusum.cusum_threshold(params["kurtosis_reference"], params["cusum_h"], params["kurtosis_reference"]),
        grace=zero_i, z_window=jnp.zeros((static.residual_window_size,), dtype), z_count=zero_i,
        kurtosis=params["kurtosis_reference"].astype(dtype), volatility=volatility,
        epsilon=fusion.sinkhorn_epsilon(volatility, params["sinkhorn_epsilon_0"], params["sinkhorn_epsilon_min"],
                                        params["sinkhorn_alpha"]),
        emergency=jnp.asarray(False), collapse_streak=zero_i, dgm_entropy_baseline=dgm_entropy,
        telemetry=_zero_telemetry())


def fusion_start(tr: KernelTrack, static, params) -> tuple[FusionState, StepOutput]:
    """The fusion state after the priming step and the output of that moment: the forecast of the next value."""
    fused = fusion_init(tr.predictions, tr.sigmas, tr.increment_variance, tr.scale, tr.dgm_entropy, static, params)
    dtype = tr.value.dtype
    zero_f, false, nan = jnp.zeros((), dtype), jnp.asarray(False), jnp.full((), jnp.nan, dtype)
    out = _output(fused, params, predictions=tr.predictions, sigmas=tr.sigmas,
                  expert_ok=tr.expert_ok, weights=_mixture_weights(fused.weights, tr.expert_ok),
                  scale_weights=_mixture_weights(jnp.ones((NUM_EXPERTS + 1,), dtype), jnp.append(tr.expert_ok, True)),
                  selection_weights=_mixture_weights(jnp.ones((NUM_EXPERTS + 1,), dtype), jnp.append(True, tr.expert_ok)),
                  holder=tr.holder_exponent, entropy=tr.dgm_entropy, collapsed=tr.mode_collapse,
                  degraded=tr.degraded,
                  frozen=tr.frozen, rejected=false, regime_change=false, outlier=false, stale=false, gap=false,
                  free_energy=zero_f, converged=jnp.asarray(True), sinkhorn_error=zero_f, residual=nan, z_score=nan,
                  collapse_warning=false)
    return fused, out


def _fusion_placeholder(kernel: KernelState, static, params) -> FusionState:
    """A scan carry's fusion state before its priming step replaces it (from the primed kernel's placeholders)."""
    return fusion_init(kernel.kernel_predictions, kernel.kernel_sigmas, jnp.var(jnp.diff(kernel.window)),
                       _window_scale(kernel.window, params), kernel.dgm_entropy, static, params)


def prime_state(history: Float[Array, " m"], timestamp_ns: Int[Array, ""], key, static, params) -> PredictorState:
    """A state ready for its priming step (:func:`step` with ``first``): the kernels primed on ``history``, a
    placeholder fusion state that the priming step replaces."""
    kernel = kernel_prime(history, timestamp_ns, key, static, params)
    return PredictorState(kernel, _fusion_placeholder(kernel, static, params))


def init_state(history: Float[Array, " m"], timestamp_ns: Int[Array, ""], key, static, params) -> tuple[PredictorState, StepOutput]:
    """State after consuming ``history`` and the output of that moment: the forecast of the next value."""
    primed = prime_state(history, timestamp_ns, key, static, params)
    return step(primed, history[-1], timestamp_ns, timestamp_ns, static, params, first=True)


def _output(f: FusionState, params, *, predictions, sigmas, expert_ok, weights, scale_weights, selection_weights, holder, entropy, collapsed, degraded, frozen, rejected,
            regime_change, outlier, stale, gap, free_energy, converged, sinkhorn_error, residual, z_score,
            collapse_warning) -> StepOutput:
    half_width = _interval_z(params) * f.output_sigma * jnp.exp(f.log_interval_width)
    return StepOutput(
        prediction=f.output_forecast, lower=f.output_forecast - half_width, upper=f.output_forecast + half_width,
        sigma=f.output_sigma,
        mode=gate.operating_mode(f.emergency, degraded), regime_change=regime_change, degraded=degraded,
        emergency=f.emergency, rejected=rejected, outlier=outlier, stale=stale, gap=gap, frozen=frozen,
        weights=weights, scale_weights=scale_weights, selection_weights=selection_weights, kernel_predictions=predictions, kernel_sigmas=sigmas, expert_failed=~expert_ok,
        epsilon=f.epsilon,
        cusum_h=f.cusum_h, cusum_g_plus=f.cusum_g_plus, cusum_g_minus=f.cusum_g_minus, kurtosis=f.kurtosis,
        holder_exponent=holder, dgm_entropy=entropy, free_energy=free_energy, sinkhorn_converged=converged,
        sinkhorn_error=sinkhorn_error, residual=residual, z_score=z_score, volatility=f.volatility,
        mode_collapse=collapsed, mode_collapse_warning=collapse_warning,
    )


def _cadence(k: KernelState, timestamp_ns) -> Float[Array, ""]:
    interval = (timestamp_ns - k.last_timestamp_ns).astype(k.cadence_ns.dtype)
    return jnp.where(k.cadence_ns > 0, (1 - CADENCE_RATE) * k.cadence_ns + CADENCE_RATE * interval, interval)


def _refreshed_holder(previous, buffer, count, clock, static, params) -> Float[Array, ""]:
    """The Hoelder exponent of the analysis buffer, recomputed every ``wtmm_stride`` steps (the WTMM is the costliest
    part of a step, and a 256-point roughness estimate barely moves in a few steps). ``clock`` starts at a constant
    and counts every step, so inside a run (``run_chunk``: vmap of a scan) it is the same for all series and the
    ``lax.cond`` really skips the WTMM; where states arrive batched (``step_batch``) it becomes a select. A refresh
    that falls on a rejected step is dropped with the rest of that step (the next one is a stride later)."""
    def fresh():
        return wtmm.holder_exponent(buffer, count, static, params)

    if static.wtmm_stride == 1:
        return fresh()
    return jax.lax.cond(clock % static.wtmm_stride == 0, fresh, lambda: previous)


class Ingested(NamedTuple):
    """What the gate makes of one observation (or the priming step of a primed state)."""

    decision: gate.GateDecision
    value: Float[Array, ""]  # the observation, or the last accepted value when rejected
    window: Float[Array, " n"]
    buffer: Float[Array, " L"]
    count: Int[Array, ""]
    frozen: Bool[Array, ""]
    degraded: Bool[Array, ""]
    clean_streak: Int[Array, ""]
    cadence_ns: Float[Array, ""]
    key: Array
    forecast_key: Array


def _ingest(k: KernelState, y, timestamp_ns, now_ns, params) -> Ingested:
    """The ingestion gate, the window and analysis buffer with the observation, and degraded mode."""
    # the cadence estimate includes this interval, so the first step after init has one
    cadence = _cadence(k, timestamp_ns)
    decision = gate.gate_observation(
        y, timestamp_ns, now_ns, k.last_timestamp_ns, k.window, k.consecutive_outliers,
        outlier_z_threshold=params["outlier_z_threshold"],
        outlier_max_consecutive=params["outlier_max_consecutive"], staleness_ttl_ns=params["staleness_ttl_ns"],
        max_gap_ns=params["max_gap_ns"], cadence_ns=cadence,
        staleness_cadence_multiple=params["staleness_cadence_multiple"])
    y_ok = jnp.where(decision.rejected, k.window[-1], y)

    # frozen signal, staleness and gaps -> degraded (with hysteresis)
    window = jnp.concatenate([k.window[1:], y_ok[None]])
    frozen = gate.is_frozen(window, params["frozen_signal_min_steps"]) | (
        k.frozen & ~gate.has_recovered(window, params["frozen_signal_recovery_steps"], k.reference_variance,
                                       params["frozen_signal_recovery_ratio"]))
    degraded, clean_streak = gate.degraded_hysteresis(decision.stale | decision.gap | frozen, k.degraded,
                                                      k.clean_streak, params["frozen_signal_recovery_steps"])
    buffer, count = wtmm.append(k.analysis_buffer, k.analysis_count, y_ok)
    key, forecast_key = jax.random.split(k.key)
    return Ingested(decision, y_ok, window, buffer, count, frozen, degraded, clean_streak, cadence, key, forecast_key)


def _primed(k: KernelState) -> Ingested:
    """What :func:`_ingest` gives on the priming step: the primed window and buffer unchanged, nothing flagged,
    and the keys :func:`kernel_prime` left for the first forecast."""
    false, zero_i = jnp.asarray(False), jnp.zeros((), jnp.int64)
    decision = gate.GateDecision(false, false, false, false, false, false, zero_i)
    key, _, forecast_key = jax.random.split(k.key, 3)
    return Ingested(decision, k.window[-1], k.window, k.analysis_buffer, k.analysis_count, false, false, zero_i,
                    k.cadence_ns, key, forecast_key)


def kernel_step(k: KernelState, y: Float[Array, ""], timestamp_ns: Int[Array, ""], now_ns: Int[Array, ""],
                static, params, first: bool | Bool[Array, ""] = False) -> tuple[KernelState, KernelTrack]:
    """Gate the observation, update the window and degraded mode, and let the kernels forecast the next value.
    Where ``first``, ``k`` comes from :func:`kernel_prime` and ``y`` is ignored: the kernels make their first
    forecasts from the primed window."""
    params = kernel_side(params)
    dtype = k.window.dtype
    y = jnp.asarray(y, dtype)

    # 1. ingestion gate
    decision, y_ok, window, buffer, count, frozen, degraded, clean_streak, cadence, key, forecast_key = _branch(
        first, lambda: _primed(k), lambda: _ingest(k, y, timestamp_ns, now_ns, params))
    rejected = decision.rejected

    # 6. the kernels' forecasts of y_{t+1} (thresholds from the previous Hoelder exponent)
    aug = _with_adaptive(params, k.holder_exponent)
    preds, sigmas, ok, meta, carries = _forecast_all(window, k.kernel_carries, forecast_key, static, aug,
                                                     accept=~rejected)
    previous_scale, scale = _window_scale(k.window, params), _window_scale(window, params)
    moments = shrinkage.updated_moments(k.increment_moments, k.raw_increments, (y_ok - k.window[-1]) / previous_scale,
                                        k.expert_ok[:NUM_KERNELS] & ~jnp.asarray(first))
    raw_increments = (preds[:NUM_KERNELS] - y_ok) / scale
    preds = preds.at[:NUM_KERNELS].set(y_ok + shrinkage.shrinkage_factor(moments) * (preds[:NUM_KERNELS] - y_ok))
    entropy, collapsed = _entropy_metadata(meta, dtype)
    clock = k.clock + 1
    accepted = KernelState(
        window=window, kernel_carries=k.kernel_carries, kernel_predictions=preds, kernel_sigmas=sigmas, expert_ok=ok,
        raw_increments=raw_increments, increment_moments=moments, analysis_buffer=buffer, analysis_count=count,
        holder_exponent=_refreshed_holder(k.holder_exponent, buffer, count, clock, static, params), dgm_entropy=entropy,
        mode_collapse=collapsed,
        degraded=degraded, clean_streak=clean_streak, frozen=frozen,
        reference_variance=jnp.where(frozen, k.reference_variance, jnp.var(window)),
        last_timestamp_ns=jnp.asarray(timestamp_ns, jnp.int64), cadence_ns=cadence,
        consecutive_outliers=decision.consecutive_outliers,
        steps=k.steps + 1, clock=clock, key=key)
    # A rejected observation changes nothing but the gate counters, the clock and the key (SPEC §3.3 step 1); the
    # carries were kept by _forecast_all already. Clock and key advance outside the select so that they stay
    # data-independent: inside a run every series then shares them, and the random numbers of a step are
    # drawn once for the whole panel instead of once per series (a fifth of the kernels' cost at B = 64).
    new = jax.tree.map(lambda old, fresh: jnp.where(rejected, old, fresh), k, accepted)
    new = eqx.tree_at(lambda s: (s.kernel_carries, s.consecutive_outliers, s.clock, s.key), new,
                      (carries, decision.consecutive_outliers, clock, key))
    track = KernelTrack(
        rejected=rejected, non_finite=decision.non_finite, outlier=decision.outlier,
        out_of_order=decision.out_of_order, stale=decision.stale, gap=decision.gap, frozen=new.frozen,
        degraded=new.degraded, value=y_ok, center=jnp.mean(k.window), scale=previous_scale,
        increment_scale=_window_scale(jnp.diff(k.window), params), increment_variance=jnp.var(jnp.diff(new.window)),
        prev_predictions=k.kernel_predictions, prev_sigmas=k.kernel_sigmas,
        prev_holder_exponent=k.holder_exponent, analysis_full=k.analysis_count >= k.analysis_buffer.shape[-1],
        predictions=new.kernel_predictions, sigmas=new.kernel_sigmas,
        expert_ok=new.expert_ok,
        holder_exponent=new.holder_exponent, dgm_entropy=new.dgm_entropy, mode_collapse=new.mode_collapse)
    return new, track


def fusion_step(f: FusionState, tr: KernelTrack, static, params) -> tuple[FusionState, StepOutput]:
    """Residual, volatility, CUSUM, weights and the calibrated mixture of one step, given the kernel track."""
    dtype = f.weights.dtype
    rejected = tr.rejected

    # 2. residual against the forecast made before y was seen (SPEC §12.5)
    residual = tr.value - f.forecast
    z = residual / f.forecast_sigma

    # 3. volatility
    alpha = params["volatility_alpha"]
    ema_variance = alpha * residual**2 + (1 - alpha) * f.ema_variance
    volatility = jax.lax.stop_gradient(jnp.sqrt(ema_variance) / tr.scale)

    # 4. CUSUM with the kurtosis-adaptive threshold. h_t comes from the residuals before z_t: the value under
    # test must not raise its own threshold (one 10-sigma jump would otherwise lift h_t above its statistic).
    r = static.residual_window_size
    kurtosis = cusum.window_kurtosis(f.z_window, f.z_count, min_samples=params["kurtosis_min_samples"],
                                     reference=params["kurtosis_reference"], low=params["kurtosis_min"],
                                     high=params["kurtosis_max"])
    cusum_h = cusum.cusum_threshold(kurtosis, params["cusum_h"], params["kurtosis_reference"])
    cu = cusum.cusum_update(f.cusum_g_plus, f.cusum_g_minus, f.grace, z, k=params["cusum_k"], h=cusum_h,
                            grace_period=params["grace_period_steps"])

    # emergency from the Hoelder exponent of the previous step's window (known before y_t arrives)
    emergency = gate.emergency_update(f.emergency, tr.prev_holder_exponent, tr.analysis_full,
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
    # losses in units of the window's increments: on a level series they separate the experts, the level scale would not
    step_losses = fusion.kernel_losses(tr.value, tr.prev_predictions, tr.prev_sigmas, tr.increment_scale,
                                       kind=static.fusion_loss)
    # EMA of the losses since the last regime change, bias-corrected by the EMA's mass (an Adam-style correction:
    # right after a reset the few losses seen are averaged, not shrunk toward 0)
    rate = 2.0 / (jko.window.astype(dtype) + 1.0)
    kernel_loss = jnp.where(cu.regime_change, 0.0, (1 - rate) * f.kernel_loss + rate * step_losses)
    loss_mass = jnp.where(cu.regime_change, 0.0, (1 - rate) * f.loss_mass + rate)
    mean_loss = kernel_loss / jnp.maximum(loss_mass, rate)
    use_huber = emergency | (static.sinkhorn_cost_type == "huber")
    cost = fusion.transport_cost((tr.prev_predictions - tr.center) / tr.scale, use_huber, params["sinkhorn_huber_delta"])
    # the seed's volatility-adaptive rate (SPEC §3.9) adds to the base rate: faster moves in turbulent periods
    tau = jnp.clip(params["jko_learning_rate"] + jko.tau, 1e-6, params["learning_rate_max"])
    jko_result = fusion.jko_step(f.weights, mean_loss, cost, epsilon, tau, params["fusion_temperature"],
                                 f.potentials, num_iters=static.sinkhorn_max_iter, atol=params["validation_simplex_atol"])
    emergency_weights = jnp.zeros((NUM_EXPERTS,), dtype).at[SIGNATURE_INDEX].set(1.0)
    # entropy reset: the kernels share their mass uniformly, the anchors keep theirs (an anchor's weight is its
    # standing as the user's fallback: on returns, zeroing the long mean at a reset handed ~45 steps per alarm
    # to the kernels' means and cost 2-3 % CRPS; uniform over all experts gives the long mean 1/6 on levels)
    is_kernel = jnp.arange(NUM_EXPERTS) < NUM_KERNELS
    kernel_mass = jnp.sum(jnp.where(is_kernel, f.weights, 0.0))
    uniform = jnp.where(is_kernel, kernel_mass / NUM_KERNELS, f.weights).astype(dtype)
    force_d = emergency & static.robustness_force_kernel_d
    frozen_weights = (f.grace > 0) | tr.degraded
    weights = jnp.where(force_d, emergency_weights,
                        jnp.where(cu.regime_change, uniform, jnp.where(frozen_weights, f.weights, jko_result.weights)))

    # 6. calibrated mixture of the experts' forecasts of y_{t+1}; a failed expert is left out (SPEC §3.13)
    mixture_weights = _mixture_weights(weights, tr.expert_ok)
    forecast, mixture_sigma = _mixture(mixture_weights, tr.predictions, tr.sigmas)
    # The sigma is pooled separately from the mean (SPEC §3.12): the candidates are the experts' sigmas and the
    # mixture's, each scored by the CRPS it would have given the fused forecast, so an expert with a poor mean
    # but a good volatility model lends its sigma without moving the mean. The pool is geometric (a weighted mean
    # of log sigmas): a candidate that overstates the scale inflates the interval less than in an arithmetic pool, and it stays scale-
    # equivariant. On the dev set it beat the arithmetic pool on both stretches (vix's sigma most).
    prev_scales = jnp.append(tr.prev_sigmas, f.mixture_sigma)
    scale_step_losses = fusion.gaussian_crps(tr.value, f.forecast, prev_scales) / tr.increment_scale
    scale_loss = jnp.where(cu.regime_change, 0.0, (1 - rate) * f.scale_loss + rate * scale_step_losses)
    scale_weights = _scale_weights(scale_loss, loss_mass, rate, params, tr.expert_ok)
    candidate_ok = jnp.append(tr.expert_ok, True)
    log_candidates = jnp.log(jnp.where(candidate_ok, jnp.append(tr.sigmas, mixture_sigma), 1.0))
    pooled_sigma = jnp.exp(jnp.sum(scale_weights * log_candidates))
    missed = (jnp.abs(residual) > _interval_z(params) * f.forecast_sigma).astype(dtype)
    log_interval_scale = _coverage_step(f.log_interval_scale, missed, params["calibration_alpha"], params)
    # GARCH(1,1) factor g on u = e / (pooled sigma c) with long-run level 1 (SPEC §3.12):
    # g' = (1 - p) + a u^2 + (p - a) g with a = reaction * p, stationary for any p < 1.
    u2 = jnp.minimum((residual / (f.pooled_sigma * jnp.exp(f.log_interval_scale))) ** 2, _CALIBRATION_Z2_CAP)
    persistence = params["calibration_persistence"]
    reaction = params["calibration_reaction"] * persistence
    garch_variance = (1 - persistence) + reaction * u2 + (persistence - reaction) * f.garch_variance
    forecast_sigma = pooled_sigma * jnp.exp(log_interval_scale) * jnp.sqrt(garch_variance)

    # Final selection, after the fusion of SPEC §3.5: an exponentially weighted average forecaster (Cesa-Bianchi &
    # Lugosi 2006, ch. 2) over the fused forecast and each expert whole (its mean with its own sigma), on discounted CRPS
    # sums. The fusion's softmax over mean losses cannot resolve the 1-2 % CRPS differences that separate a
    # GARCH-like expert from the fused forecast on returns; sums over a long memory can, without a temperature
    # small enough to chase noise. Its sigma has a scale of its own (the experts' sigmas are raw), tracked on the
    # CRPS gradient rather than on coverage: on heavy-tailed increments a coverage-tracked sigma settles wider than
    # the CRPS-optimal one, which on random-walk levels lost the output the CRPS against the best expert.
    selection_ok = jnp.append(True, tr.expert_ok)
    selection_losses = fusion.gaussian_crps(tr.value, jnp.append(f.forecast, tr.prev_predictions),
                                            jnp.append(f.forecast_sigma, tr.prev_sigmas)) / tr.increment_scale
    selection_score = (1 - 1 / params["selection_memory"]) * f.selection_score + selection_losses
    selection_weights = _selection_weights(selection_score, params, selection_ok, force_d)
    output_error = tr.value - f.output_forecast
    log_selection_scale = _crps_scale_step(f.log_selection_scale, output_error / f.output_sigma,
                                           params["calibration_alpha"])
    # The interval lower/upper has a faster tracker of its own on its width over z output_sigma: a sigma that
    # meets the nominal coverage on heavy-tailed data is wider than the CRPS-optimal one, so the sigma stays on
    # the slow trackers and the interval carries the coverage.
    z_output_sigma = _interval_z(params) * f.output_sigma
    interval_missed = (jnp.abs(output_error) > z_output_sigma * jnp.exp(f.log_interval_width)).astype(dtype)
    log_interval_width = _coverage_step(f.log_interval_width, interval_missed, params["interval_alpha"], params)
    output_forecast = jnp.sum(selection_weights * jnp.append(forecast, tr.predictions))
    output_sigma = jnp.exp(log_selection_scale + jnp.sum(
        selection_weights * jnp.log(jnp.where(selection_ok, jnp.append(forecast_sigma, tr.sigmas), 1.0))))

    # 7. adaptive layer for the next step
    collapse_streak = jnp.where(tr.mode_collapse, f.collapse_streak + 1, 0).astype(jnp.int64)
    patience = adaptive.mode_collapse_patience(jko.window, min_threshold=params["mode_collapse_min_threshold"],
                                               window_ratio=params["mode_collapse_window_ratio"])
    collapse_warning = collapse_streak >= patience
    # Differential entropies can be negative, so capacity scaling compares entropy powers exp(H - H0).
    capacity_request = jnp.exp(tr.dgm_entropy - f.dgm_entropy_baseline) > params["entropy_scaling_trigger"]

    accepted = FusionState(
        forecast=forecast, forecast_sigma=forecast_sigma, mixture_sigma=mixture_sigma, weights=weights,
        potentials=jko_result.potentials, kernel_loss=kernel_loss, loss_mass=loss_mass, ema_variance=ema_variance,
        scale_loss=scale_loss, pooled_sigma=pooled_sigma, log_interval_scale=log_interval_scale,
        garch_variance=garch_variance, selection_score=selection_score, log_selection_scale=log_selection_scale,
        log_interval_width=log_interval_width, output_forecast=output_forecast, output_sigma=output_sigma, cusum_g_plus=cu.g_plus,
        cusum_g_minus=cu.g_minus, cusum_h=cusum_h, grace=cu.grace,
        z_window=f.z_window.at[f.z_count % r].set(z), z_count=f.z_count + 1, kurtosis=kurtosis,
        volatility=volatility, epsilon=epsilon, emergency=emergency, collapse_streak=collapse_streak,
        dgm_entropy_baseline=f.dgm_entropy_baseline, telemetry=f.telemetry)
    new = jax.tree.map(lambda old, fresh: jnp.where(rejected, old, fresh), f, accepted)
    regime_change = cu.regime_change & ~rejected
    t = f.telemetry
    one = jnp.ones((), jnp.int64)
    telemetry = Telemetry(
        rejected=t.rejected + rejected * one, non_finite=t.non_finite + tr.non_finite * one,
        outliers=t.outliers + tr.outlier * one, out_of_order=t.out_of_order + tr.out_of_order * one,
        stale=t.stale + tr.stale * one, gaps=t.gaps + tr.gap * one,
        frozen=t.frozen + (tr.frozen & ~rejected) * one, regime_changes=t.regime_changes + regime_change * one,
        emergency_steps=t.emergency_steps + (new.emergency & ~rejected) * one,
        sinkhorn_unconverged=t.sinkhorn_unconverged + (~jko_result.converged & ~rejected) * one,
        dgm_capacity_requests=t.dgm_capacity_requests + (capacity_request & ~rejected) * one,
        expert_failures=t.expert_failures + (~jnp.all(tr.expert_ok) & ~rejected) * one,
    )
    new = eqx.tree_at(lambda s: s.telemetry, new, telemetry)
    out = _output(new, params, predictions=tr.predictions, sigmas=tr.sigmas, expert_ok=tr.expert_ok,
                  weights=jnp.where(rejected, new.weights, mixture_weights),
                  scale_weights=_scale_weights(new.scale_loss, new.loss_mass, rate, params, tr.expert_ok),
                  selection_weights=_selection_weights(new.selection_score, params, selection_ok,
                                                       new.emergency & static.robustness_force_kernel_d),
                  holder=tr.holder_exponent,
                  entropy=tr.dgm_entropy, collapsed=tr.mode_collapse, degraded=tr.degraded, frozen=tr.frozen, rejected=rejected,
                  regime_change=regime_change, outlier=tr.outlier, stale=tr.stale, gap=tr.gap,
                  free_energy=jko_result.free_energy, converged=jko_result.converged,
                  sinkhorn_error=jko_result.marginal_error, residual=jnp.where(rejected, jnp.nan, residual),
                  z_score=jnp.where(rejected, jnp.nan, z), collapse_warning=collapse_warning & ~rejected)
    return new, out


def step(state: PredictorState, y: Float[Array, ""], timestamp_ns: Int[Array, ""], now_ns: Int[Array, ""],
         static, params, first: bool | Bool[Array, ""] = False) -> tuple[PredictorState, StepOutput]:
    """Consume one observation; return the new state and the forecast of the next value. Where ``first``, the
    priming step of a state from :func:`kernel_prime` (its fusion state is not read)."""
    kernel, track = kernel_step(state.kernel, y, timestamp_ns, now_ns, static, params, first)
    fused, out = _branch(first, lambda: fusion_start(track, static, params),
                         lambda: fusion_step(state.fusion, track, static, params))
    return PredictorState(kernel, fused), out


def step_batch(states: PredictorState, values, timestamps_ns, now_ns, static, params,
               first: bool | Bool[Array, ""] | Bool[Array, " B"] = False) -> tuple[PredictorState, StepOutput]:
    """One step of many series (states stacked along a leading axis). ``first``: the priming step of all of them
    (a scalar: one branch) or of some (one flag per series: both branches and a select)."""
    per_series = not isinstance(first, bool) and jnp.ndim(first) == 1
    return jax.vmap(lambda s, y, ts, now, f: step(s, y, ts, now, static, params, f),
                    in_axes=(0, 0, 0, 0, 0 if per_series else None))(states, values, timestamps_ns, now_ns, first)


def advance_batch(states: PredictorState, values: Float[Array, "B L"], timestamps_ns: Int[Array, "B L"],
                  now_ns: Int[Array, "B L"], mask: Bool[Array, "B L"], first: Bool[Array, "B L"], static,
                  params) -> tuple[PredictorState, StepOutput]:
    """``lax.scan`` of :func:`step_batch` over L time indices of B series; where ``mask`` is False a series keeps its
    state (rows of different lengths, padding), where ``first`` the step is the priming step of a state from
    :func:`prime_state` (a cold start inside the same program). Outputs have leading axes (B, L)."""

    def body(carry, xs):
        y, ts, now, live, primes = xs
        stepped, out = step_batch(carry, y, ts, now, static, params, primes)
        merged = jax.tree.map(lambda new, old: jnp.where(live.reshape(live.shape + (1,) * (new.ndim - 1)), new, old),
                              stepped, carry)
        return merged, out

    final, outs = jax.lax.scan(body, states, (values.T, timestamps_ns.T, now_ns.T, mask.T, first.T))
    return final, jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), outs)


def prime_batch(histories, timestamps_ns, key, static, params) -> PredictorState:
    """Primed states (:func:`prime_state`) of many series from equal-length histories."""
    return jax.vmap(lambda h, ts: prime_state(h, ts, key, static, params))(histories, timestamps_ns)


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


def _with_head(outs: StepOutput, m: int) -> StepOutput:
    """Outputs of a scan that started at index m - 1, aligned with the series (placeholders before it)."""
    head = _nan_output_like(jax.tree.map(lambda x: x[0], outs), m - 1)
    return jax.tree.map(lambda a, b: jnp.concatenate([a, b]), head, outs)


def _primed_scan_inputs(values, timestamps_ns, now_ns, m):
    """The scan's inputs from index m - 1 on, with the flag of its first (priming) step."""
    first = jnp.arange(values.shape[0] - m + 1) == 0
    return values[m - 1:], timestamps_ns[m - 1:], now_ns[m - 1:], first


def run_series(values: Float[Array, " T"], timestamps_ns: Int[Array, " T"], now_ns: Int[Array, " T"], key,
               static, params) -> StepOutput:
    """Prime on the first n values, then ``lax.scan`` the step from the n-th value on (its first step makes the
    first forecasts, as :func:`init_state` does); outputs aligned with ``values``."""
    m = static.base_min_signal_length
    state = prime_state(values[:m], timestamps_ns[m - 1], key, static, params)
    _, outs = _scan_steps(state, *_primed_scan_inputs(values, timestamps_ns, now_ns, m), static, params)
    return _with_head(outs, m)


def _with_panel_clock(kernel: KernelState, key, clock) -> KernelState:
    """``kernel`` with the panel's key and clock. Every series of a run shares them (one root key, one clock), and
    closed over as unbatched values inside ``vmap`` they keep a step's random numbers drawn once for the panel
    and the WTMM stride a branch; taken from a stacked state they would be per-series data."""
    return eqx.tree_at(lambda k: (k.key, k.clock), kernel, (key, clock))


def _panel_clock(kernel: KernelState, lead: int = 1):
    """The shared key and clock of stacked kernel states (``lead`` stacking axes)."""
    index = (0,) * lead
    return kernel.key[index], kernel.clock[index]


def _scan_steps(state: PredictorState, values, timestamps_ns, now_ns, first, static, params):
    def body(carry, xs):
        y, ts, now, is_first = xs
        return step(carry, y, ts, now, static, params, is_first)

    return jax.lax.scan(body, state, (values, timestamps_ns, now_ns, first))


def run_chunk(states: PredictorState, values: Float[Array, "B C"], timestamps_ns: Int[Array, "B C"],
              now_ns: Int[Array, "B C"], first: Bool[Array, " C"], static, params,
              panel_clock: tuple | None = None) -> tuple[PredictorState, StepOutput]:
    """C steps of a run of B series from stacked states (:func:`prime_batch`, then this function's own): one
    program serves every series length, the host calling it once per C steps. ``first`` flags the priming step
    (the first of the first chunk). Outputs have leading axes (B, C)."""
    key, now_clock = _panel_clock(states.kernel) if panel_clock is None else panel_clock

    def series(state, v, ts, now):
        state = PredictorState(_with_panel_clock(state.kernel, key, now_clock), state.fusion)
        return _scan_steps(state, v, ts, now, first, static, params)

    return jax.vmap(series)(states, values, timestamps_ns, now_ns)


def prime_trials(histories, timestamps_ns, key, static, params_batch) -> PredictorState:
    """Primed states of K trials x B series (leading axes K, B): :func:`prime_batch` for each trial's parameters."""
    return jax.vmap(lambda params: prime_batch(histories, timestamps_ns, key, static, params))(params_batch)


def run_trials_chunk(states: PredictorState, values, timestamps_ns, now_ns, first, static,
                     params_batch) -> tuple[PredictorState, StepOutput]:
    """:func:`run_chunk` of K trials (dynamic parameters with a leading K axis, states (K, B)); the key and clock
    stay shared by every trial and series. Outputs have leading axes (K, B, C)."""
    panel_clock = _panel_clock(states.kernel, lead=2)
    return jax.vmap(lambda s, params: run_chunk(s, values, timestamps_ns, now_ns, first, static, params, panel_clock))(
        states, params_batch)


class SharedTrialsState(NamedTuple):
    """A shared-kernel trial run's carry: one kernel state per series (B), a fusion state per series and trial
    (B, K)."""

    kernel: KernelState
    fusion: FusionState


def prime_trials_shared(histories, timestamps_ns, key, static, kernel_params, params_batch) -> SharedTrialsState:
    """Trials that agree on every kernel-side parameter: the kernels primed once per series, a placeholder fusion
    state per trial."""

    def series(history, ts):
        kernel = kernel_prime(history, ts, key, static, kernel_params)
        return kernel, jax.vmap(lambda params: _fusion_placeholder(kernel, static, params))(params_batch)

    return SharedTrialsState(*jax.vmap(series)(histories, timestamps_ns))


def run_trials_shared_chunk(states: SharedTrialsState, values, timestamps_ns, now_ns, first, static, kernel_params,
                            params_batch) -> tuple[SharedTrialsState, StepOutput]:
    """C steps of trials whose kernel-side parameters are identical: ONE kernel pass per series (scan), then
    ``vmap`` over trials of the fusion scan on the recorded kernel track. Same outputs as :func:`run_trials_chunk`,
    leading axes (K, B, C)."""
    key, clock = _panel_clock(states.kernel)

    def series(kernel, fusions, v, ts, now):
        def kernel_body(k, xs):
            y, t, n, is_first = xs
            return kernel_step(k, y, t, n, static, kernel_params, is_first)

        kernel, tracks = jax.lax.scan(kernel_body, _with_panel_clock(kernel, key, clock), (v, ts, now, first))

        def one_trial(f0, params):
            def fuse(f, inputs):
                tr, is_first = inputs
                return _branch(is_first, lambda: fusion_start(tr, static, params),
                               lambda: fusion_step(f, tr, static, params))

            return jax.lax.scan(fuse, f0, (tracks, first))

        fusions, outs = jax.vmap(one_trial)(fusions, params_batch)
        return kernel, fusions, outs

    kernels, fusions, outs = jax.vmap(series)(states.kernel, states.fusion, values, timestamps_ns, now_ns)
    return SharedTrialsState(kernels, fusions), jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), outs)
