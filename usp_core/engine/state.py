"""Typed pytrees of the predictor: per-series state and per-step output (SPEC §3.1, §3.3)."""

from __future__ import annotations

from typing import Any, NamedTuple

import equinox as eqx
from jaxtyping import Array, Bool, Float, Int, Key

NUM_KERNELS = 4


class Telemetry(NamedTuple):
    """Counters of gate and adaptive-layer events since init."""

    rejected: Int[Array, ""]
    non_finite: Int[Array, ""]
    outliers: Int[Array, ""]
    out_of_order: Int[Array, ""]
    stale: Int[Array, ""]
    gaps: Int[Array, ""]
    frozen: Int[Array, ""]
    regime_changes: Int[Array, ""]
    emergency_steps: Int[Array, ""]
    sinkhorn_unconverged: Int[Array, ""]
    dgm_capacity_requests: Int[Array, ""]


class PredictorState(eqx.Module):
    """Everything one series carries from step to step. All leaves are arrays: vmap adds a series axis."""

    forecast: Float[Array, ""]  # y_hat_{t+1|t}
    forecast_sigma: Float[Array, ""]  # calibrated predictive sigma of the fused forecast
    mixture_sigma: Float[Array, ""]  # uncalibrated mixture std (the calibration factor scales it)
    kernel_predictions: Float[Array, " 4"]
    kernel_sigmas: Float[Array, " 4"]
    weights: Float[Array, " 4"]
    kernel_loss: Float[Array, " 4"]  # EMA of per-kernel losses (L in SPEC 3.5)
    window: Float[Array, " n"]  # last n accepted observations, newest last
    ema_variance: Float[Array, ""]  # v_t
    calibration_z2: Float[Array, ""]  # EMA of (e / mixture_sigma)^2
    cusum_g_plus: Float[Array, ""]
    cusum_g_minus: Float[Array, ""]
    cusum_h: Float[Array, ""]
    grace: Int[Array, ""]
    z_window: Float[Array, " r"]  # ring buffer of standardised residuals
    z_count: Int[Array, ""]
    kurtosis: Float[Array, ""]
    volatility: Float[Array, ""]  # scale-free sigma_t
    epsilon: Float[Array, ""]
    holder_exponent: Float[Array, ""]
    dgm_entropy: Float[Array, ""]
    dgm_entropy_baseline: Float[Array, ""]
    degraded: Bool[Array, ""]
    clean_streak: Int[Array, ""]
    frozen: Bool[Array, ""]
    reference_variance: Float[Array, ""]  # window variance while not frozen (frozen-signal recovery)
    emergency: Bool[Array, ""]
    collapse_streak: Int[Array, ""]
    last_timestamp_ns: Int[Array, ""]
    consecutive_outliers: Int[Array, ""]  # gate counter: moves even when the observation is rejected
    steps: Int[Array, ""]
    key: Key[Array, ""]
    kernel_carries: tuple[Any, Any, Any, Any]
    telemetry: Telemetry


class StepOutput(NamedTuple):
    """Result of one step (SPEC §3.1). With leading (B, T) axes it is the ``PredictorOutput`` of ``run``."""

    prediction: Float[Array, ""]
    lower: Float[Array, ""]
    upper: Float[Array, ""]
    sigma: Float[Array, ""]
    mode: Int[Array, ""]
    regime_change: Bool[Array, ""]
    degraded: Bool[Array, ""]
    emergency: Bool[Array, ""]
    rejected: Bool[Array, ""]
    outlier: Bool[Array, ""]
    stale: Bool[Array, ""]
    gap: Bool[Array, ""]
    frozen: Bool[Array, ""]
    weights: Float[Array, " 4"]
    kernel_predictions: Float[Array, " 4"]
    kernel_sigmas: Float[Array, " 4"]
    epsilon: Float[Array, ""]
    cusum_h: Float[Array, ""]
    cusum_g_plus: Float[Array, ""]
    cusum_g_minus: Float[Array, ""]
    kurtosis: Float[Array, ""]
    holder_exponent: Float[Array, ""]
    dgm_entropy: Float[Array, ""]
    free_energy: Float[Array, ""]
    sinkhorn_converged: Bool[Array, ""]
    sinkhorn_error: Float[Array, ""]
    residual: Float[Array, ""]
    z_score: Float[Array, ""]
    volatility: Float[Array, ""]
    mode_collapse_warning: Bool[Array, ""]


PredictorOutput = StepOutput
