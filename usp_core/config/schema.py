"""The one declarative field table of the USP configuration (SPEC §3.2).

Everything else is derived from ``FIELDS``: TOML loading and validation, the static/dynamic split, the
mutation validation schema, the Optuna search spaces (``[meta_optimization]`` ranges) and the README's
config reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Kind = Literal["float", "int", "bool", "str", "list"]
Tier = Literal["fast", "deep", "none"]


@dataclass(frozen=True)
class Field:
    section: str
    name: str
    kind: Kind
    default: Any
    doc: str
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] | None = None
    static: bool = False
    locked: bool = False
    tier: Tier = "none"
    log: bool = False
    step: int | None = None
    search_low: float | None = None
    search_high: float | None = None

    @property
    def key(self) -> str:
        return f"{self.section}.{self.name}"

    @property
    def tunable(self) -> bool:
        return self.tier != "none"

    @property
    def dynamic(self) -> bool:
        """A number the jitted step receives as a traced array (changing it never recompiles)."""
        return (not self.static and not self.locked and self.kind in ("float", "int")
                and self.section in PREDICTOR_SECTIONS)

    def describe_range(self) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        if self.kind in ("float", "int"):
            lo = "-inf" if self.low is None else f"{self.low:g}"
            hi = "inf" if self.high is None else f"{self.high:g}"
            return f"[{lo}, {hi}]"
        return self.kind


def _f(section: str, name: str, default: float, low: float | None, high: float | None, doc: str, **kw) -> Field:
    return Field(section, name, "float", float(default), doc, low, high, **kw)


def _i(section: str, name: str, default: int, low: int | None, high: int | None, doc: str, **kw) -> Field:
    return Field(section, name, "int", int(default), doc, low, high, **kw)


def _s(section: str, name: str, default: str, choices: tuple[str, ...] | None, doc: str, **kw) -> Field:
    return Field(section, name, "str", default, doc, choices=choices, **kw)


def _b(section: str, name: str, default: bool, doc: str, **kw) -> Field:
    return Field(section, name, "bool", bool(default), doc, **kw)


_NS_DAY = 86_400 * 10**9

FIELDS: tuple[Field, ...] = (
    # -- core ------------------------------------------------------------------------------------------
    _i("core", "schema_version", 1, 1, 1, "Version of this configuration schema.", locked=True),
    _i("core", "seed", 42, 0, 2**31 - 1, "Root PRNG seed of the predictor and of the Optuna sampler.", locked=True),
    _s("core", "dtype", "float64", ("float64", "float32"), "Floating dtype of the predictor.", static=True, locked=True),
    _s("core", "compile_cache_dir", "dagster_home/jax_cache", None,
       "JAX persistent compilation cache (relative to the repository root); empty disables it.", locked=True),
    _f("core", "interval_level", 0.95, 0.5, 0.999, "Central predictive interval level of lower/upper."),
    _f("core", "numerical_epsilon", 1e-12, 1e-300, 1e-6, "Relative floor for standard deviations and divisions."),
    _i("core", "base_min_signal_length", 64, 32, 512,
       "Kernel window length n; also the minimum history before the first forecast.", static=True),
    _f("core", "calibration_alpha", 0.005, 0.001, 0.5,
       "Step size of the sigma's coverage tracker: log of the sigma's scale moves by this times (missed - (1 - level))."),
    _f("core", "interval_alpha", 0.15, 0.001, 0.5,
       "Step size of the interval's coverage tracker: log of the width of lower/upper over z sigma moves by this "
       "times (missed - (1 - level)); sigma (and so the CRPS) is not affected."),
    _f("core", "calibration_persistence", 0.9, 0.0, 0.999,
       "Persistence a + b of the GARCH(1,1) calibration factor of the fused sigma (< 1: stationary by construction).",
       tier="fast", search_low=0.5, search_high=0.99),
    _f("core", "calibration_reaction", 0.1, 0.0, 1.0,
       "Share a / (a + b) of the persistence that reacts to the newest squared residual (the GARCH alpha).",
       tier="fast", search_low=0.02, search_high=0.3),
    # -- orchestration: fusion (SPEC 3.5) --------------------------------------------------------------
    _f("orchestration", "sinkhorn_epsilon_min", 0.01, 1e-4, 1.0,
       "Floor of the Sinkhorn regularisation eps_t (not tuned: eps_0 >= eps_min makes the floor inert)."),
    _f("orchestration", "sinkhorn_epsilon_0", 0.1, 1e-3, 5.0, "Base Sinkhorn regularisation eps_0.",
       tier="deep", search_low=0.05, search_high=0.5),
    _f("orchestration", "sinkhorn_alpha", 0.5, 0.0, 5.0, "Volatility coupling of eps_t = max(eps_min, eps_0 (1 + alpha sigma_t)).",
       tier="fast", search_low=0.1, search_high=1.0),
    _i("orchestration", "sinkhorn_max_iter", 30, 1, 5000,
       "Warm-started scaling iterations of the entropic JKO step (lax.scan length).", static=True),
    _s("orchestration", "sinkhorn_cost_type", "squared", ("squared", "huber"),
       "Transport cost between kernel forecasts on the z-scored scale (emergency mode forces huber).", static=True),
    _f("orchestration", "sinkhorn_huber_delta", 1.0, 1e-3, 100.0, "Huber delta of the transport cost."),
    _s("orchestration", "fusion_loss", "crps", ("crps", "gaussian_nll", "squared"),
       "Per-expert loss scored on each observation (crps: Gaussian CRPS over the window scale).", static=True),
    _f("orchestration", "fusion_temperature", 0.02, 1e-3, 100.0, "Temperature of the Gibbs target softmax(-L / T)."),
    _f("orchestration", "scale_temperature", 0.02, 1e-3, 100.0,
       "Temperature of the sigma pool's weights softmax(-L_sigma / T) over the candidate sigmas' CRPS."),
    _f("orchestration", "selection_rate", 0.5, 1e-2, 100.0,
       "Learning rate eta of the final selection: weights softmax(-eta S) over the fused forecast and each expert whole."),
    _f("orchestration", "selection_memory", 1000.0, 10.0, 1e6,
       "Span of the discounted CRPS sums S of the final selection (never reset: which method suits a series is stable)."),
    _f("orchestration", "jko_learning_rate", 10.0, 1e-4, 100.0,
       "Base rate tau of the entropic JKO step: the weights move toward softmax(-L / (T + eps / tau)).",
       tier="deep", log=True, search_low=0.05, search_high=20.0),
    _f("orchestration", "learning_rate_max", 100.0, 1e-4, 100.0, "Upper clip of the JKO rate tau."),
    _f("orchestration", "jko_safety_factor", 0.8, 0.0, 1.0,
       "Safety factor f of the volatility-adaptive rate f 2 eps_0 sigma^2 added to jko_learning_rate."),
    _f("orchestration", "jko_relaxation_factor", 200.0, 0.1, 10000.0, "Adaptive window = factor * relaxation time."),
    _f("orchestration", "jko_domain_length", 1.0, 1e-3, 100.0, "Domain length L of the relaxation time L^2 / sigma^2."),
    _i("orchestration", "entropy_window", 500, 10, 5000,
       "Upper clip of the adaptive loss-smoothing window (JKO window).",
       tier="deep", search_low=50, search_high=500),
    _i("orchestration", "entropy_window_floor", 10, 2, 1000, "Lower clip of the adaptive loss-smoothing window."),
    _f("orchestration", "volatility_alpha", 0.1, 0.001, 1.0, "EMA rate of the residual variance v_t.",
       tier="fast", search_low=0.05, search_high=0.3),
    # -- orchestration: CUSUM (SPEC 3.6) ---------------------------------------------------------------
    _f("orchestration", "cusum_h", 5.0, 0.5, 50.0, "Base CUSUM threshold h.", tier="deep", search_low=2.0, search_high=20.0),
    _f("orchestration", "cusum_k", 0.5, 0.0, 5.0, "CUSUM allowance k.", tier="fast", search_low=0.1, search_high=1.0),
    _i("orchestration", "grace_period_steps", 20, 0, 10_000, "Steps after an alarm during which no new alarm fires.",
       tier="deep", search_low=5, search_high=100),
    _i("orchestration", "residual_window_size", 100, 8, 2000, "Window of standardised residuals for kurtosis.", static=True),
    _i("orchestration", "kurtosis_min_samples", 20, 4, 2000, "Valid residuals needed before kurtosis is estimated."),
    _f("orchestration", "kurtosis_reference", 3.0, 1.0, 10.0, "Reference kurtosis (Gaussian = 3) of the adaptive h_t."),
    _f("orchestration", "kurtosis_min", 1.0, 1.0, 10.0, "Lower clip of the residual kurtosis."),
    _f("orchestration", "kurtosis_max", 50.0, 3.0, 1000.0, "Upper clip of the residual kurtosis."),
    # -- orchestration: adaptive layer, modes (SPEC 3.7, 3.9) -------------------------------------------
    _f("orchestration", "holder_threshold", 0.28, 0.0, 1.0, "Emergency when the Hoelder exponent drops below this.",
       tier="deep", search_low=0.2, search_high=0.65),
    _f("orchestration", "holder_hysteresis", 0.05, 0.0, 0.5, "Emergency exits only above holder_threshold + this."),
    _f("orchestration", "robustness_dimension_threshold", 1.9, 1.0, 2.0,
       "Emergency when the fractal dimension 2 - H exceeds this."),
    _b("orchestration", "robustness_force_kernel_d", True, "Emergency forces the weights to Kernel D.", static=True),
    _f("orchestration", "stiffness_low", 100.0, 1.0, 1e5, "Floor of the explicit/blended stiffness threshold theta_L (not tuned: no setting changed a forecast)."),
    _f("orchestration", "stiffness_high", 1000.0, 10.0, 1e6, "Floor of the blended/implicit stiffness threshold theta_H.",
       tier="deep", search_low=500.0, search_high=5000.0),
    _f("orchestration", "stiffness_c1", 25.0, 0.0, 1e4, "theta_L = max(stiffness_low, c1 / (1 - H)^2)."),
    _f("orchestration", "stiffness_c2", 250.0, 0.0, 1e5, "theta_H = max(stiffness_high, c2 / (1 - H)^2)."),
    _f("orchestration", "entropy_scaling_trigger", 2.0, 1.0, 100.0, "DGM entropy ratio above which capacity scales up."),
    _i("orchestration", "mode_collapse_min_threshold", 10, 1, 10_000, "Minimum consecutive collapsed steps before a warning."),
    _f("orchestration", "mode_collapse_window_ratio", 0.1, 0.0, 1.0, "Warning after window * ratio collapsed steps."),
    # -- ingestion gate (SPEC 3.7) ---------------------------------------------------------------------
    _f("gate", "outlier_z_threshold", 20.0, 1.0, 1e6, "Robust z (median/MAD of the window) above which a value is rejected."),
    _i("gate", "outlier_max_consecutive", 1, 0, 1000,
       "Consecutive outliers rejected before further ones are accepted as a level shift."),
    _i("gate", "staleness_ttl_ns", 0, 0, 365 * _NS_DAY, "now - timestamp above this is stale (degraded); 0 disables."),
    _f("gate", "staleness_cadence_multiple", 10.0, 0.0, 1e9,
       "now - timestamp above this many of the series' typical intervals (its own cadence) is stale; 0 disables."),
    _i("gate", "max_gap_ns", 0, 0, 365 * _NS_DAY, "timestamp - last timestamp above this is a gap (degraded); 0 disables."),
    _i("gate", "frozen_signal_min_steps", 5, 2, 1000, "This many identical last values mark a frozen signal."),
    _i("gate", "frozen_signal_recovery_steps", 2, 1, 1000, "Consecutive clean steps to leave degraded mode (N_r)."),
    _f("gate", "frozen_signal_recovery_ratio", 0.1, 0.0, 10.0,
       "Recovery needs the recent variance above ratio x the historical variance."),
    # -- kernels (SPEC 3.4) ----------------------------------------------------------------------------
    _i("kernels", "kernel_a_embedding_dim", 5, 1, 32, "Delay-embedding dimension of Kernel A.", static=True),
    _f("kernels", "kernel_a_bandwidth", 1.0, 1e-3, 100.0, "Multiplier of the median-heuristic bandwidth of Kernel A."),
    _f("kernels", "kernel_ridge_lambda", 1e-4, 1e-10, 10.0,
       "Ridge regularisation of Kernel A, added to the estimated noise-to-signal ratio of its GP view.",
       tier="deep", log=True, search_low=1e-8, search_high=1e-3),
    _i("kernels", "kernel_a_noise_iterations", 0, 0, 10,
       "Fixed-point refits of Kernel A's noise variance per step beyond the one fit warm-started from the previous "
       "step's ratio (one Cholesky each).", static=True),
    _s("kernels", "kernel_a_dtype", "float32", ("float64", "float32"),
       "Floating dtype of Kernel A's Gram matrix, factorisation and solves (the window is z-scored in core.dtype "
       "and the forecast returned in it); float32 costs ~0.6 of float64 at the same dev-set accuracy (README, "
       "Forecast quality).",
       static=True),
    _s("kernels", "kernel_a_target", "increment", ("increment", "level"),
       "Kernel A regresses the next increment (falls back to the last value off the data) or the next level.",
       static=True),
    _i("kernels", "wtmm_buffer_size", 256, 32, 1024, "History length of the WTMM Hoelder estimate.", static=True,
       tier="fast", search_low=64, search_high=512, step=64),
    _i("kernels", "wtmm_num_scales", 8, 3, 32, "Number of log-spaced CWT scales of the WTMM.", static=True),
    _f("kernels", "wtmm_q_min", -3.0, -10.0, -0.25,
       "Lowest moment order q of the WTMM partition function (< 0 so that the Legendre spectrum is bounded)."),
    _f("kernels", "wtmm_q_max", 3.0, 0.25, 10.0,
       "Highest moment order q of the WTMM partition function (> 0 so that the Legendre spectrum is bounded)."),
    _i("kernels", "wtmm_num_q", 13, 3, 101, "Number of equally spaced moment orders q in [wtmm_q_min, wtmm_q_max].",
       static=True),
    _i("kernels", "wtmm_stride", 16, 1, 64,
       "Steps between two WTMM Hoelder estimates (the circuit breaker and stiffness thresholds read the latest).",
       static=True),
    _f("kernels", "besov_cone_c", 1.5, 0.1, 10.0, "Cone |dt| <= c s chaining modulus maxima across scales.",
       tier="fast", search_low=1.0, search_high=3.0),
    _i("kernels", "dgm_width_size", 32, 4, 1024, "Width of the DGM network.", static=True,
       tier="deep", search_low=32, search_high=256, step=32),
    _i("kernels", "dgm_depth", 4, 1, 16, "Hidden layers of the DGM network.", static=True,
       tier="deep", search_low=2, search_high=6),
    _s("kernels", "dgm_activation", "tanh", ("tanh", "softplus", "sigmoid"), "Activation of the DGM network.", static=True),
    _s("kernels", "dgm_dtype", "float32", ("float64", "float32"),
       "Floating dtype of the DGM network, its optimiser state and training (inputs/outputs stay core.dtype); float32 "
       "costs ~1/2 of float64 at the same dev-set accuracy (README, Forecast quality).",
       static=True),
    _i("kernels", "dgm_train_steps", 1, 1, 100, "Warm-started optimiser steps of the DGM per observation.", static=True),
    _i("kernels", "dgm_init_train_steps", 100, 1, 10_000,
       "Optimiser steps pre-training a fresh DGM network on the initial history window.", static=True),
    _f("kernels", "dgm_bandwidth", 1.0, 0.05, 20.0,
       "Multiplier of Silverman's bandwidth of the DGM's Nadaraya-Watson drift/diffusion estimates."),
    _i("kernels", "dgm_collocation_points", 8, 4, 1024, "Collocation points per DGM optimiser step.", static=True),
    _i("kernels", "dgm_entropy_num_bins", 50, 5, 500, "Histogram bins of the DGM entropy estimate (mode-collapse warning only).", static=True),
    _f("kernels", "learning_rate", 0.01, 1e-5, 1.0, "Adam learning rate of the online-trained DGM.",
       tier="deep", log=True, search_low=0.001, search_high=0.1),
    _f("kernels", "entropy_threshold", 0.8, 0.0, 1.0,
       "Mode collapse when H[V] < threshold x H[terminal] (a diagnostic flag and warning only: not tuned)."),
    _f("kernels", "sde_dt", 0.01, 1e-4, 1.0, "Kernel C integration step in model time; one observation interval lasts numel*dt (sets the model clock of the prior diffusion rate and the stiffness rate).",
       tier="deep", log=True, search_low=0.001, search_high=0.1),
    _i("kernels", "sde_numel_integrations", 100, 10, 1000, "SDE integration steps per Monte Carlo path.", static=True,
       tier="deep", search_low=50, search_high=200),
    _f("kernels", "sde_diffusion_sigma", 0.2, 0.0, 5.0, "Prior diffusion rate of Kernel C (z units per sqrt(model time)), conjugate-blended into the estimate.",
       tier="deep", search_low=0.05, search_high=0.5),
    _i("kernels", "kernel_c_num_paths", 32, 8, 8192, "Monte Carlo paths of Kernel C.", static=True),
    _f("kernels", "kernel_c_alpha", 2.0, 1.1, 2.0,
       "Stability index of Kernel C's alpha-stable noise (Gaussian at >= 1.99; below, CMS sampling costs ~10x)."),
    _f("kernels", "kernel_c_beta", 0.0, -1.0, 1.0, "Skewness of Kernel C's alpha-stable noise."),
    _f("kernels", "kernel_c_jump_intensity", 0.05, 0.0, 10.0, "Compound-Poisson jump intensity per observation interval."),
    _f("kernels", "kernel_c_jump_mean", 0.0, -10.0, 10.0, "Mean jump size (z units)."),
    _f("kernels", "kernel_c_jump_scale", 1.0, 0.0, 10.0, "Jump size standard deviation (z units)."),
    _i("kernels", "kernel_c_max_events", 4, 1, 64, "Maximum jumps per path and observation interval.", static=True),
    _f("kernels", "kernel_c_prior_strength", 8.0, 0.0, 1000.0,
       "Pseudo-increments of the prior diffusion in Kernel C's conjugate blend with the estimated diffusion."),
    _f("kernels", "kernel_c_drift_memory", 500.0, 10.0, 1e6,
       "Span of Kernel C's whole-history AR(1) moments (the mean over all pairs, then an EMA of this span), pooled with the window's drift slope."),
    _i("kernels", "log_sig_depth", 3, 2, 5, "Log-signature truncation depth of Kernel D.", static=True,
       tier="fast", search_low=2, search_high=5),
    _f("kernels", "kernel_d_forgetting", 0.995, 0.9, 1.0, "Forgetting factor of Kernel D's recursive least squares."),
    _f("kernels", "kernel_d_prior_scale", 10.0, 1e-3, 1e6,
       "Ridge prior variance of Kernel D's readout: initial RLS covariance prior_scale I, also its steady-state bound."),
    _i("kernels", "kernel_d_feature_window", 4, 3, 512,
       "Newest points of the z-scored window whose log-signature Kernel D reads (clipped to the window length).",
       static=True),
    _f("kernels", "kernel_d_innovation_clip", 4.0, 0.5, 1e6,
       "Kernel D's RLS innovations are clipped at this many predictive stds (robust to outliers)."),
    _f("kernels", "kernel_d_leverage_clip", 4.0, 0.1, 1e6,
       "Kernel D's RLS down-weights feature vectors whose squared Mahalanobis distance exceeds this times their dimension."),
    _f("kernels", "anchor_mean_window", 500.0, 10.0, 1e6,
       "Span of the long-mean anchor expert: the mean of all past values, then an EMA of this span."),
    _f("kernels", "anchor_volatility_memory", 500.0, 10.0, 1e6,
       "Span of the discounted likelihood that weighs the long-mean anchor's GJR-GARCH variance filters."),
    # -- validation --------------------------------------------------------------------------------------
    _f("validation", "validation_simplex_atol", 1e-6, 1e-14, 1e-2, "Sinkhorn converged when max marginal error <= this."),
    # -- backtest (SPEC 4) -------------------------------------------------------------------------------
    _s("backtest", "window", "expanding", ("expanding", "rolling"), "Walk-forward training window."),
    _i("backtest", "embargo", 0, 0, 10_000, "Steps left out between the train and test segments."),
    _i("backtest", "max_memory", 0, 0, 10**7, "Longest train segment of a rolling window; 0 means unlimited."),
    _s("backtest", "objective", "relative_crps", ("relative_crps", "relative_mse", "mase"),
       "Tuning and promotion objective, lower is better: mean over series of CRPS / CRPS of the naive forecast "
       "(the proper score of a probabilistic forecast), of MSE / naive MSE, or MASE."),
    # -- promotion (SPEC 6) ------------------------------------------------------------------------------
    _f("promotion", "min_improvement", 0.005, 0.0, 1.0, "Relative objective improvement a challenger needs."),
    _f("promotion", "promotion_alpha", 0.05, 1e-6, 0.5, "Significance level of the one-sided Diebold-Mariano test."),
    _s("promotion", "registered_model_name", "usp-predictor", None, "MLflow registered model of the configuration.", locked=True),
    # -- mutation policy (SPEC 6) ------------------------------------------------------------------------
    _i("mutation_policy", "max_promotions_per_hour", 2, 0, 1000, "Rate limit of applied promotions.", locked=True),
    _f("mutation_policy", "max_relative_change", 1.0, 0.0, 100.0,
       "Largest relative change of a continuous parameter in one promotion.", locked=True),
    Field("mutation_policy", "locked_keys", "list", (), "Keys never mutated, in addition to those the schema locks.", locked=True),
    # -- audit (SPEC 6) --------------------------------------------------------------
    _s("audit", "audit_log", "audit/mutations.jsonl", None, "Append-only, hash-chained mutation audit log.", locked=True),
    # -- meta optimisation control (SPEC 5); search ranges are generated below ---------------------------
    _i("meta_optimization", "n_trials", 50, 1, 100_000, "Total trial budget of a campaign.", locked=True),
    _i("meta_optimization", "n_startup_trials", 10, 0, 10_000, "Random trials before TPE.", locked=True),
    _b("meta_optimization", "multivariate", True, "Multivariate TPE.", locked=True),
    _b("meta_optimization", "enable_deep_tuning", False, "Use the deep tier (the fast tier plus the kernels' and fusion's structural parameters).", locked=True),
    _f("meta_optimization", "train_ratio", 0.7, 0.1, 0.95, "Share of each series used before the first fold.", locked=True),
    _i("meta_optimization", "n_folds", 5, 2, 100, "Walk-forward folds; the last one is the promotion holdout.", locked=True),
    _i("meta_optimization", "batch_size", 8, 1, 256, "Trials sharing a static key evaluated in one vmapped call.", locked=True),
    _i("meta_optimization", "fast_max_static_keys", 2, 1, 10_000,
       "Most distinct static keys (compiled programs) a fast campaign explores; later batches take the static "
       "params of the best trial so far.", locked=True),
    _i("meta_optimization", "deep_max_static_keys", 8, 1, 10_000,
       "Most distinct static keys (compiled programs) a deep campaign explores; later batches take the static "
       "params of the best trial so far.", locked=True),
    _i("meta_optimization", "tuning_max_length", 1000, 0, 10_000_000,
       "Newest observations before the promotion holdout that a tuning trial backtests per series (0: all); "
       "every walk-forward fold of that segment is a tuning fold.", locked=True),
)

PREDICTOR_SECTIONS = ("core", "orchestration", "gate", "kernels", "validation")


def _search_range_fields(fields: tuple[Field, ...]) -> tuple[Field, ...]:
    out: list[Field] = []
    for f in fields:
        if not f.tunable:
            continue
        mk = _i if f.kind == "int" else _f
        out.append(mk("meta_optimization", f"{f.name}_min", f.search_low, f.low, f.high,
                      f"Lower search bound of {f.key}.", locked=True))
        out.append(mk("meta_optimization", f"{f.name}_max", f.search_high, f.low, f.high,
                      f"Upper search bound of {f.key}.", locked=True))
        if f.step is not None:
            out.append(_i("meta_optimization", f"{f.name}_step", f.step, 1, None, f"Search step of {f.key}.", locked=True))
    return tuple(out)


ALL_FIELDS: tuple[Field, ...] = FIELDS + _search_range_fields(FIELDS)
BY_KEY: dict[str, Field] = {f.key: f for f in ALL_FIELDS}
SECTIONS: tuple[str, ...] = tuple(dict.fromkeys(f.section for f in ALL_FIELDS))
TUNABLE: tuple[Field, ...] = tuple(f for f in FIELDS if f.tunable)
FAST_TIER: tuple[Field, ...] = tuple(f for f in TUNABLE if f.tier == "fast")
DEEP_TIER: tuple[Field, ...] = TUNABLE
STATIC_FIELDS: tuple[Field, ...] = tuple(f for f in FIELDS if f.static)
DYNAMIC_FIELDS: tuple[Field, ...] = tuple(f for f in FIELDS if f.dynamic)

assert len(BY_KEY) == len(ALL_FIELDS), "duplicate config keys"
assert len({f.name for f in FIELDS if f.section in PREDICTOR_SECTIONS}) == sum(
    f.section in PREDICTOR_SECTIONS for f in FIELDS), "predictor field names must be unique across sections"
assert len(FAST_TIER) == 8 and len(DEEP_TIER) == 22, (len(FAST_TIER), len(DEEP_TIER))


def cross_field_errors(values: dict[str, Any]) -> list[str]:
    """Rules that involve several fields; ``values`` maps ``section.name`` to a value."""
    v = values
    errs: list[str] = []

    def rule(ok: bool, msg: str) -> None:
        if not ok:
            errs.append(msg)

    rule(v["orchestration.stiffness_low"] < v["orchestration.stiffness_high"],
         f"orchestration.stiffness_low={v['orchestration.stiffness_low']} must be < "
         f"orchestration.stiffness_high={v['orchestration.stiffness_high']}")
    rule(v["orchestration.sinkhorn_epsilon_0"] >= v["orchestration.sinkhorn_epsilon_min"],
         f"orchestration.sinkhorn_epsilon_0={v['orchestration.sinkhorn_epsilon_0']} must be >= "
         f"orchestration.sinkhorn_epsilon_min={v['orchestration.sinkhorn_epsilon_min']}")
    rule(v["orchestration.entropy_window_floor"] <= v["orchestration.entropy_window"],
         f"orchestration.entropy_window_floor={v['orchestration.entropy_window_floor']} must be <= "
         f"orchestration.entropy_window={v['orchestration.entropy_window']}")
    rule(v["orchestration.kurtosis_min"] < v["orchestration.kurtosis_max"],
         "orchestration.kurtosis_min must be < orchestration.kurtosis_max")
    rule(v["orchestration.kurtosis_min_samples"] <= v["orchestration.residual_window_size"],
         f"orchestration.kurtosis_min_samples={v['orchestration.kurtosis_min_samples']} must be <= "
         f"orchestration.residual_window_size={v['orchestration.residual_window_size']}")
    rule(v["kernels.wtmm_q_min"] < v["kernels.wtmm_q_max"], "kernels.wtmm_q_min must be < kernels.wtmm_q_max")
    n = v["core.base_min_signal_length"]
    rule(v["kernels.kernel_a_embedding_dim"] <= n // 4,
         f"kernels.kernel_a_embedding_dim={v['kernels.kernel_a_embedding_dim']} must be <= "
         f"core.base_min_signal_length // 4 = {n // 4}")
    for f in TUNABLE:
        lo, hi = v[f"meta_optimization.{f.name}_min"], v[f"meta_optimization.{f.name}_max"]
        rule(lo <= hi, f"meta_optimization.{f.name}_min={lo} must be <= meta_optimization.{f.name}_max={hi}")
        if f.log:
            rule(lo > 0, f"meta_optimization.{f.name}_min={lo} must be > 0 (log-scale search)")
    return errs
