"""Typed pytrees of the predictor: per-series state and per-step output (SPEC §3.1, §3.3)."""

from __future__ import annotations

from typing import Any, NamedTuple

import equinox as eqx
from jaxtyping import Array, Bool, Float, Int, Key

from usp_core.kernels import EXPERTS

NUM_EXPERTS = len(EXPERTS)
"""Size of the expert pool: the four kernels, then the anchors (``usp_core.kernels.EXPERT_NAMES``)."""


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
    expert_failures: Int[Array, ""]  # steps with at least one non-finite expert output (SPEC §3.13)


class KernelState(eqx.Module):
    """What the kernels and the ingestion gate carry. It never depends on fusion parameters, so trials that
    differ only in fusion parameters can share one kernel pass (``run_trials``)."""

    window: Float[Array, " n"]  # last n accepted observations, newest last
    kernel_carries: tuple[Any, ...]  # one per expert
    kernel_predictions: Float[Array, " k"]  # the experts' forecasts of the next value (finite, SPEC §3.13)
    kernel_sigmas: Float[Array, " k"]
    expert_ok: Bool[Array, " k"]  # False where an expert's raw output was not finite (replaced by the last value)
    raw_increments: Float[Array, " j"]  # each kernel's unshrunk forecast minus the last value, over the window scale
    increment_moments: Float[Array, "4 j"]  # evidence for each kernel's increments (usp_core.engine.shrinkage)
    analysis_buffer: Float[Array, " L"]  # last L accepted observations (the Hoelder estimate's), right-aligned
    analysis_count: Int[Array, ""]  # filled entries of analysis_buffer
    holder_exponent: Float[Array, ""]  # of analysis_buffer, refreshed every wtmm_stride steps
    dgm_entropy: Float[Array, ""]
    mode_collapse: Bool[Array, ""]
    degraded: Bool[Array, ""]
    clean_streak: Int[Array, ""]
    frozen: Bool[Array, ""]
    reference_variance: Float[Array, ""]  # window variance while not frozen (frozen-signal recovery)
    last_timestamp_ns: Int[Array, ""]
    cadence_ns: Float[Array, ""]  # EMA of the intervals between accepted timestamps; 0 until one is seen
    consecutive_outliers: Int[Array, ""]  # gate counter: moves even when the observation is rejected
    steps: Int[Array, ""]  # accepted observations
    clock: Int[Array, ""]  # steps since init, rejected ones included (it never depends on the data: see kernel_step)
    key: Key[Array, ""]


class FusionState(eqx.Module):
    """What the fusion, CUSUM and calibration carry."""

    forecast: Float[Array, ""]  # fused y_hat_{t+1|t} (its residual drives CUSUM and the fusion's calibration)
    forecast_sigma: Float[Array, ""]  # calibrated predictive sigma of the fused forecast
    mixture_sigma: Float[Array, ""]  # std of the weighted mixture (one of the candidate sigmas)
    weights: Float[Array, " k"]
    potentials: Float[Array, "2 k"]  # JKO dual potentials (f, g), warm start of the next step
    kernel_loss: Float[Array, " k"]  # EMA of per-expert losses since the last regime change
    loss_mass: Float[Array, ""]  # the EMA's total weight: L in SPEC 3.5 is kernel_loss / loss_mass
    ema_variance: Float[Array, ""]  # v_t
    scale_loss: Float[Array, " k1"]  # EMA of the candidate sigmas' CRPS (experts, then the mixture), same mass
    pooled_sigma: Float[Array, ""]  # scale-weighted candidate sigma, before the interval scale and GARCH factor
    log_interval_scale: Float[Array, ""]  # log c of the fused sigma's coverage tracker
    garch_variance: Float[Array, ""]  # GARCH(1,1) factor g on (e / (pooled_sigma c))^2 (SPEC §3.12)
    selection_score: Float[Array, " k1"]  # discounted CRPS sums: the fused forecast, then each expert whole
    log_selection_scale: Float[Array, ""]  # log of the CRPS tracker's scale of the selected sigma
    log_interval_width: Float[Array, ""]  # log of the output interval's half-width over z output_sigma
    output_forecast: Float[Array, ""]  # the selected forecast: the prediction the step outputs
    output_sigma: Float[Array, ""]
    cusum_g_plus: Float[Array, ""]
    cusum_g_minus: Float[Array, ""]
    cusum_h: Float[Array, ""]
    grace: Int[Array, ""]
    z_window: Float[Array, " r"]  # ring buffer of standardised residuals
    z_count: Int[Array, ""]
    kurtosis: Float[Array, ""]
    volatility: Float[Array, ""]  # scale-free sigma_t
    epsilon: Float[Array, ""]
    emergency: Bool[Array, ""]
    collapse_streak: Int[Array, ""]
    dgm_entropy_baseline: Float[Array, ""]
    telemetry: Telemetry


class PredictorState(eqx.Module):
    """Everything one series carries from step to step. All leaves are arrays: vmap adds a series axis."""

    kernel: KernelState
    fusion: FusionState

    @property
    def forecast(self) -> Float[Array, ""]:
        """The prediction of the next value the step output (the selected forecast)."""
        return self.fusion.output_forecast

    @property
    def weights(self) -> Float[Array, " k"]:
        return self.fusion.weights

    @property
    def window(self) -> Float[Array, " n"]:
        return self.kernel.window

    @property
    def last_timestamp_ns(self) -> Int[Array, ""]:
        return self.kernel.last_timestamp_ns

    @property
    def telemetry(self) -> Telemetry:
        return self.fusion.telemetry


class KernelTrack(NamedTuple):
    """What one kernel step hands to the fusion step (one entry per time step in a shared kernel pass)."""

    rejected: Bool[Array, ""]
    non_finite: Bool[Array, ""]
    outlier: Bool[Array, ""]
    out_of_order: Bool[Array, ""]
    stale: Bool[Array, ""]
    gap: Bool[Array, ""]
    frozen: Bool[Array, ""]
    degraded: Bool[Array, ""]
    value: Float[Array, ""]  # the observation, or the last accepted one when rejected
    center: Float[Array, ""]  # mean and scale of the window before this observation
    scale: Float[Array, ""]
    increment_scale: Float[Array, ""]  # std of the window's increments (units of the fusion losses)
    increment_variance: Float[Array, ""]  # variance of the increments of the window after this observation
    prev_predictions: Float[Array, " k"]  # expert forecasts of this observation
    prev_sigmas: Float[Array, " k"]
    prev_holder_exponent: Float[Array, ""]
    # the analysis buffer was full before this observation (arms the circuit breaker; the strided reading in force
    # may date from up to wtmm_stride - 1 steps earlier, when the buffer held that many fewer values)
    analysis_full: Bool[Array, ""]
    predictions: Float[Array, " k"]  # expert forecasts of the next observation
    sigmas: Float[Array, " k"]
    expert_ok: Bool[Array, " k"]
    holder_exponent: Float[Array, ""]
    dgm_entropy: Float[Array, ""]
    mode_collapse: Bool[Array, ""]


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
    weights: Float[Array, " k"]  # expert order: usp_core.kernels.EXPERT_NAMES
    scale_weights: Float[Array, " k1"]  # weights of the candidate sigmas: the experts', then the mixture's
    selection_weights: Float[Array, " k1"]  # final selection: the fused forecast, then each expert whole
    kernel_predictions: Float[Array, " k"]
    kernel_sigmas: Float[Array, " k"]
    expert_failed: Bool[Array, " k"]  # non-finite output, excluded from this step's mixture (SPEC §3.13)
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
    mode_collapse: Bool[Array, ""]  # DGM entropy ratio below kernels.entropy_threshold at this step
    mode_collapse_warning: Bool[Array, ""]


PredictorOutput = StepOutput
