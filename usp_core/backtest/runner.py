"""Walk-forward backtest over a panel of series (SPEC §4).

The predictor is causal and online, so ONE compiled ``Predictor.run`` over the full panel serves every fold:
the forecast of value t is ``out.prediction[t - 1]`` whatever fold t belongs to, and fold k's metrics are
computed on its test segment only. Series of unequal length are padded with NaN at the end (the gate
rejects those steps) and masked in every metric.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from jaxtyping import Float

from usp_core.backtest import baselines as bl
from usp_core.backtest import metrics as mx
from usp_core.backtest.splits import Fold, select_folds, walk_forward_split
from usp_core.config import PredictorConfig
from usp_core.engine.gate import MODE_NAMES
from usp_core.kernels import KERNEL_NAMES

USP = "usp"
NAIVE = "naive"
EWMA = "ewma"
GARCH = "garch"
KERNEL_MODELS = tuple(f"kernel_{name}" for name in KERNEL_NAMES)
MODELS = (USP, NAIVE, EWMA, GARCH, *KERNEL_MODELS)
DEFAULT_EWMA_ALPHA = 0.2


@dataclass
class Panel:
    series_ids: list[str]
    values: Float[np.ndarray, "B T"]
    timestamps_ns: np.ndarray | None
    lengths: np.ndarray


@dataclass
class BacktestResult:
    """Metrics of one configuration on one panel; ``per_series`` is indexed by (model, series_id) and
    ``aggregate`` by model (means over series of the scale-free metrics)."""

    config_version: str
    objective_name: str
    objective: float
    fold_objectives: np.ndarray
    per_series: pd.DataFrame
    aggregate: pd.DataFrame
    include: str
    series_ids: list[str]
    folds: list[list[Fold]]
    values: np.ndarray
    output: Any
    holdout_losses: np.ndarray | None = None
    holdout_targets: np.ndarray | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def metrics(self) -> pd.DataFrame:
        """USP metrics per series."""
        return self.per_series.loc[USP]

    @property
    def aggregate_metrics(self) -> dict[str, float]:
        return self.aggregate.loc[USP].to_dict()

    @property
    def kernel_metrics(self) -> dict[str, pd.DataFrame]:
        return {name: self.per_series.loc[model] for name, model in zip(KERNEL_NAMES, KERNEL_MODELS, strict=True)}

    @property
    def baselines(self) -> dict[str, pd.DataFrame]:
        return {model: self.per_series.loc[model] for model in MODELS if model != USP}


def as_panel(panel, *, min_history: int = 0, series_ids: Sequence[str] | None = None) -> Panel:
    """(T,) / (B, T) array or long DataFrame(series_id, ts, value) -> Panel. A DataFrame is validated first
    and any bad row is an error here (the pipeline quarantines them before a backtest)."""
    if isinstance(panel, Panel):
        return panel
    if isinstance(panel, pd.DataFrame):
        from usp_core.data.schema import panel_from_observations, validate_observations

        clean, quarantine = validate_observations(panel, min_history)
        if len(quarantine):
            counts = quarantine["reason"].value_counts().to_dict()
            raise ValueError(f"panel has {len(quarantine)} invalid observations {counts}; validate and quarantine them first")
        ids, values, stamps = panel_from_observations(clean)
        lengths = clean.groupby("series_id", sort=False).size().reindex(ids).to_numpy()
        return Panel(ids, values, stamps, lengths)
    values = np.atleast_2d(np.asarray(panel, dtype=np.float64))
    if values.ndim != 2:
        raise ValueError(f"panel must be (T,), (B, T) or a long DataFrame, got shape {values.shape}")
    finite = np.isfinite(values)
    lengths = np.where(finite.any(axis=1), values.shape[1] - np.argmax(finite[:, ::-1], axis=1), 0)
    ids = list(series_ids) if series_ids is not None else [str(i) for i in range(values.shape[0])]
    if len(ids) != values.shape[0]:
        raise ValueError(f"{len(ids)} series ids for {values.shape[0]} series")
    return Panel(ids, values, None, lengths)


def folds_for_panel(
    cfg: PredictorConfig,
    panel: Panel,
    min_history: int,
    *,
    train_ratio: float | None = None,
    n_folds: int | None = None,
) -> list[list[Fold]]:
    """Each series' walk-forward folds from the ``[backtest]`` and ``[meta_optimization]`` settings."""
    out = []
    for series_id, length in zip(panel.series_ids, panel.lengths, strict=True):
        try:
            out.append(
                walk_forward_split(
                    int(length),
                    cfg["meta_optimization.train_ratio"] if train_ratio is None else train_ratio,
                    cfg["meta_optimization.n_folds"] if n_folds is None else n_folds,
                    window=cfg["backtest.window"],
                    max_memory=cfg["backtest.max_memory"] or None,
                    embargo=cfg["backtest.embargo"],
                    min_train=min_history,
                )
            )
        except ValueError as exc:
            raise ValueError(f"series {series_id!r}: {exc}") from exc
    return out


def tuning_panel(cfg: PredictorConfig, panel, min_history: int, max_length: int = 0) -> Panel:
    """Each series cut to the observations before its promotion holdout (the last walk-forward fold of the
    full series), keeping the newest ``max_length`` of them (0: all). A tuning campaign scores every fold of
    this panel (``include="all"``): it never sees the holdout the promotion gate judges it on."""
    data = as_panel(panel, min_history=min_history)
    folds = folds_for_panel(cfg, data, min_history)
    ends = np.array([f[-1].test.start for f in folds])
    starts = np.maximum(ends - max_length, 0) if max_length > 0 else np.zeros_like(ends)
    width = int((ends - starts).max())
    values = np.full((len(ends), width), np.nan)
    stamps = None if data.timestamps_ns is None else np.zeros((len(ends), width), np.int64)
    for b, (start, end) in enumerate(zip(starts, ends, strict=True)):
        n = end - start
        values[b, :n] = data.values[b, start:end]
        if stamps is not None:
            row = data.timestamps_ns[b]
            step = int(row[end - 1] - row[end - 2]) if n > 1 else 1
            stamps[b, :n] = row[start:end]
            stamps[b, n:] = row[end - 1] + step * np.arange(1, width - n + 1)
    return Panel(list(data.series_ids), values, stamps, ends - starts)


def target_aligned(x: np.ndarray) -> np.ndarray:
    """Entry t forecasts t + 1 -> entry t holds the forecast OF t (NaN at t = 0)."""
    shifted = np.full(x.shape, np.nan)
    shifted[..., 1:] = x[..., :-1]
    return shifted


def _mask(shape: tuple[int, int], folds: list[list[Fold]], which: Sequence[int] | None) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    for b, series_folds in enumerate(folds):
        for k in which if which is not None else range(len(series_folds)):
            test = series_folds[k].test
            mask[b, test.start : test.stop] = True
    return mask


def _model_forecasts(out, values: np.ndarray, level: float, naive_window: int, ewma_alpha: float,
                     first_origins: np.ndarray) -> dict[str, bl.BaselineForecast]:
    forecasts = {
        USP: bl.BaselineForecast(*(np.asarray(getattr(out, k), dtype=np.float64) for k in ("prediction", "sigma", "lower", "upper"))),
        NAIVE: bl.naive_forecast(values, window=naive_window, level=level),
        EWMA: bl.ewma_forecast(values, alpha=ewma_alpha, level=level),
        GARCH: bl.garch_forecast(values, level=level, first_origins=first_origins),
    }
    for k, model in enumerate(KERNEL_MODELS):
        forecasts[model] = bl.kernel_forecast(out.kernel_predictions, out.kernel_sigmas, k, level=level)
    return {name: bl.BaselineForecast(*(target_aligned(a) for a in f)) for name, f in forecasts.items()}


def _metrics_on(mask, values, forecasts, mase_scale, level) -> dict[str, dict[str, np.ndarray]]:
    actual = np.where(mask, values, np.nan)
    table = {name: mx.forecast_metrics(actual, *f, mase_scale=mase_scale, level=level) for name, f in forecasts.items()}
    for name in table:
        table[name].update(mx.relative_to(table[name], table[NAIVE]))
    return table


def _usp_diagnostics(out, mask: np.ndarray) -> dict[str, np.ndarray]:
    count = np.maximum(mask.sum(axis=1), 1)
    mode = np.asarray(out.mode)
    diagnostics = {"regime_changes": np.where(mask, np.asarray(out.regime_change, dtype=bool), False).sum(axis=1).astype(np.float64)}
    for value, name in enumerate(MODE_NAMES):
        diagnostics[f"mode_{name}"] = np.where(mask, mode == value, False).sum(axis=1) / count
    diagnostics["rejected_fraction"] = np.where(mask, np.asarray(out.rejected, dtype=bool), False).sum(axis=1) / count
    return diagnostics


def evaluate_output(
    cfg: PredictorConfig,
    panel: Panel,
    out,
    folds: list[list[Fold]],
    *,
    include: str = "tuning",
    naive_window: int | None = None,
    ewma_alpha: float = DEFAULT_EWMA_ALPHA,
) -> BacktestResult:
    """Metrics of a predictor output (leading axes (B, T)) on the selected folds of a panel."""
    values = panel.values
    level = float(cfg["core.interval_level"])
    objective_name = cfg["backtest.objective"]
    naive_window = cfg.static.base_min_signal_length if naive_window is None else naive_window
    n_folds = len(folds[0])
    selected = [i for i, f in enumerate(folds[0]) if f in select_folds(folds[0], include)]
    if not selected:
        raise ValueError(f"no fold selected by include={include!r} (n_folds={n_folds})")
    # the GARCH baseline is fitted only where a selected fold reads it (its first forecast origin)
    first_origins = np.asarray([min(f[k].test.start for k in selected) - 1 for f in folds])
    forecasts = _model_forecasts(out, values, level, naive_window, ewma_alpha, first_origins)
    # MASE scale: in-sample naive MAE of the first fold's train segment, common to all folds and includes.
    mase_scale = mx.naive_scale(values, [[f[0].train] for f in folds])

    fold_objectives = []
    for k in selected:
        fold_table = _metrics_on(_mask(values.shape, folds, [k]), values, forecasts, mase_scale, level)
        fold_objectives.append(mx.objective_value(objective_name, fold_table[USP]))
    mask = _mask(values.shape, folds, selected)
    table = _metrics_on(mask, values, forecasts, mase_scale, level)
    table[USP].update(_usp_diagnostics(out, mask))

    frames = {name: pd.DataFrame(cols, index=pd.Index(panel.series_ids, name="series_id")) for name, cols in table.items()}
    per_series = pd.concat(frames, names=["model"])
    scale_free = [c for c in per_series.columns if c in mx.SCALE_FREE_METRICS or c.startswith("mode_") or c in ("regime_changes", "rejected_fraction")]
    aggregate = per_series[scale_free].groupby(level="model", sort=False).mean()
    result = BacktestResult(
        config_version=cfg.version,
        objective_name=objective_name,
        objective=float(np.mean(fold_objectives)),
        fold_objectives=np.asarray(fold_objectives),
        per_series=per_series,
        aggregate=aggregate,
        include=include,
        series_ids=list(panel.series_ids),
        folds=folds,
        values=values,
        output=out,
    )
    if folds[0][-1].holdout and (n_folds - 1) in selected:
        result.holdout_losses, result.holdout_targets = _holdout_losses(objective_name, values, forecasts, folds, mase_scale)
    return result


def _holdout_losses(objective_name, values, forecasts, folds, mase_scale) -> tuple[np.ndarray, np.ndarray]:
    """Per-step objective losses on each series' holdout (B, L) NaN-padded, with their target indices; scaled
    per series by the naive reference so that champion and challenger losses pool across series."""
    length = max(len(f[-1].test) for f in folds)
    targets = np.full((len(folds), length), -1, dtype=np.int64)
    for b, series_folds in enumerate(folds):
        test = series_folds[-1].test
        targets[b, : len(test)] = np.arange(test.start, test.stop)
    gather = lambda a: np.where(targets >= 0, np.take_along_axis(a, np.maximum(targets, 0), axis=1), np.nan)  # noqa: E731
    actual = gather(values)
    usp, naive = forecasts[USP], forecasts[NAIVE]
    naive_raw = mx.step_losses(objective_name, actual, gather(naive.prediction), gather(naive.sigma), np.ones(len(folds)))
    if objective_name == "mase":
        reference = mase_scale
    else:
        reference = np.nanmean(naive_raw, axis=1)
    losses = mx.step_losses(objective_name, actual, gather(usp.prediction), gather(usp.sigma), reference)
    return losses, targets


_PREDICTORS: dict[Any, Any] = {}


def _predictor(cfg: PredictorConfig):
    """One Predictor per static key: compiled functions are shared across configs that differ only in
    dynamic parameters."""
    from usp_core.engine.predictor import Predictor

    if cfg.static not in _PREDICTORS:
        if len(_PREDICTORS) > 32:
            _PREDICTORS.clear()
        _PREDICTORS[cfg.static] = Predictor(cfg)
    return _PREDICTORS[cfg.static]


def run_backtest(
    cfg: PredictorConfig,
    panel,
    *,
    folds: list[Fold] | list[list[Fold]] | None = None,
    include: str = "tuning",
    series_ids: Sequence[str] | None = None,
    train_ratio: float | None = None,
    n_folds: int | None = None,
    naive_window: int | None = None,
    ewma_alpha: float = DEFAULT_EWMA_ALPHA,
) -> BacktestResult:
    """Walk-forward backtest of one configuration over a panel in one compiled ``Predictor.run``.

    ``folds``: None (each series' own folds from the config), one list applied to every series, or one list
    per series. ``include``: ``tuning`` (all folds but the holdout), ``holdout`` (the last) or ``all``.
    """
    return evaluate_trials([cfg], panel, folds=folds, include=include, series_ids=series_ids, train_ratio=train_ratio,
                           n_folds=n_folds, naive_window=naive_window, ewma_alpha=ewma_alpha)[0]


def _resolve_folds(cfg, data: Panel, folds, min_history: int, train_ratio, n_folds) -> list[list[Fold]]:
    if folds is None:
        return folds_for_panel(cfg, data, min_history, train_ratio=train_ratio, n_folds=n_folds)
    if folds and isinstance(folds[0], Fold):
        return [list(folds)] * len(data.series_ids)
    if len(folds) != len(data.series_ids):
        raise ValueError(f"{len(folds)} fold lists for {len(data.series_ids)} series")
    return [list(f) for f in folds]


def evaluate_trials(
    configs: Sequence[PredictorConfig],
    panel,
    *,
    folds: list[Fold] | list[list[Fold]] | None = None,
    include: str = "tuning",
    series_ids: Sequence[str] | None = None,
    train_ratio: float | None = None,
    n_folds: int | None = None,
    naive_window: int | None = None,
    ewma_alpha: float = DEFAULT_EWMA_ALPHA,
) -> list[BacktestResult]:
    """Backtest many configurations: configs sharing a static key run in ONE ``Predictor.run_trials`` call
    (vmapped over their dynamic parameters); results come back in the order of ``configs``."""
    from usp_core.engine.predictor import stack_params

    if not configs:
        return []
    groups: dict[Any, list[int]] = {}
    for i, cfg in enumerate(configs):
        groups.setdefault(cfg.static, []).append(i)
    results: list[BacktestResult | None] = [None] * len(configs)
    data = None
    for indices in groups.values():
        group = [configs[i] for i in indices]
        predictor = _predictor(group[0])
        data = data or as_panel(panel, min_history=predictor.min_history, series_ids=series_ids)
        per_series_folds = _resolve_folds(group[0], data, folds, predictor.min_history, train_ratio, n_folds)
        if len(group) == 1:
            outputs = [type(predictor)(group[0]).run(data.values, data.timestamps_ns)]
        else:
            stacked = predictor.run_trials(data.values, stack_params(group), data.timestamps_ns)
            outputs = [type(stacked)(*(np.asarray(a)[k] for a in stacked)) for k in range(len(group))]
        for i, cfg, out in zip(indices, group, outputs, strict=True):
            results[i] = evaluate_output(
                cfg, data, out, per_series_folds, include=include, naive_window=naive_window, ewma_alpha=ewma_alpha
            )
    return results  # type: ignore[return-value]
