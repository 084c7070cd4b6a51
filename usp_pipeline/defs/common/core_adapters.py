"""Calls into usp_core, reshaped into JSON-able values for the IO manager and metadata (no model logic here)."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd


def _finite(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def backtest_summary(cfg, panel: pd.DataFrame, plot_dir: Path | None = None) -> dict[str, Any]:
    """Walk-forward backtest of ``cfg``: aggregate metrics of the USP model, a model-by-metric table and, with
    ``plot_dir``, the forecast fan chart, the weights/mode timeline and the skill-by-series chart."""
    from usp_core.backtest.runner import as_panel, run_backtest

    data = as_panel(panel)
    result = run_backtest(cfg, data)
    columns = [c for c in ("crps_skill", "crps_ratio", "mase", "relative_mse", "coverage") if c in result.aggregate]
    table = result.aggregate[columns].reset_index().rename(columns={"index": "model"})
    aggregate = {str(k): _finite(v) for k, v in result.aggregate_metrics.items()}
    return {
        "config_version": cfg.version,
        "objective_name": result.objective_name,
        "objective": _finite(result.objective),
        "fold_objectives": [_finite(v) for v in result.fold_objectives],
        "aggregate": {"objective": _finite(result.objective), **aggregate},
        "table": table.round(4).astype(object).where(table.notna(), None).to_dict(orient="records"),
        "series": len(result.series_ids),
        "plots": {} if plot_dir is None else backtest_plots(cfg, data, result, Path(plot_dir)),
    }


def backtest_plots(cfg, data, result, out_dir: Path, *, max_series: int = 3, last: int = 150) -> dict[str, str]:
    """The pictures of a backtest, one function of ``usp_core.plots`` each."""
    import numpy as np

    from usp_core.backtest.runner import EWMA, GARCH, KERNEL_MODELS, USP, target_aligned
    from usp_core.engine.gate import MODE_NAMES
    from usp_core.kernels import EXPERT_NAMES
    from usp_core.plots import ForecastTrace, fan_chart, skill_chart, weights_chart

    out = result.output
    times = (data.timestamps_ns.astype("datetime64[ns]") if data.timestamps_ns is not None
             else np.broadcast_to(np.arange(data.values.shape[1]), data.values.shape))
    forecasts = {k: target_aligned(np.asarray(getattr(out, k), dtype=np.float64)) for k in ("prediction", "lower", "upper")}
    traces = []
    for b, series_id in enumerate(result.series_ids[:max_series]):
        live = np.isfinite(data.values[b])
        traces.append(ForecastTrace(series_id, times[b][live], data.values[b][live],
                                    *(forecasts[k][b][live] for k in ("prediction", "lower", "upper"))).tail(last))
    plots = {"fan_chart": fan_chart(traces, out_dir / "fan_chart.png", level=float(cfg["core.interval_level"]),
                                    title=f"config {cfg.version}: observed vs one-step forecast")}
    live = np.isfinite(np.asarray(out.prediction)[0])
    plots["weights"] = weights_chart(times[0][live], np.asarray(out.weights)[0][live], np.asarray(out.mode)[0][live],
                                     EXPERT_NAMES, MODE_NAMES, out_dir / "weights.png", series_id=result.series_ids[0])
    skill = result.per_series["crps_skill"]
    by_model = {name: skill.loc[model].to_dict() for name, model in (("usp", USP), ("garch", GARCH), ("ewma", EWMA))}
    by_model["best single kernel"] = skill.loc[list(KERNEL_MODELS)].groupby(level="series_id").max().to_dict()
    plots["skill"] = skill_chart(by_model, out_dir / "skill.png")
    return {name: str(path) for name, path in plots.items()}


def _study_progress(storage_url: str, study_name: str) -> tuple[int, float | None]:
    import optuna
    from optuna.trial import TrialState

    from usp_core.tuning.optimizer import make_storage

    try:
        study = optuna.load_study(study_name=study_name, storage=make_storage(storage_url))
    except KeyError:
        return 0, None
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL))
    values = [t.value for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    return len(trials), (min(values) if values else None)


def tuning_summary(
    cfg,
    panel: pd.DataFrame,
    *,
    tier: str,
    n_trials: int,
    workers: int,
    storage: str,
    tracking_uri: str,
    experiment: str,
    artifact_root: str | None,
    run_id: str,
    log: Callable[[str], None],
    poll_seconds: float = 10.0,
) -> dict[str, Any]:
    """Run (or resume) a campaign in a worker thread, logging trials done/total, best so far and ETA."""
    from usp_core.tuning.campaign import data_fingerprint, run_campaign
    from usp_core.tuning.optimizer import MetaOptimizationConfig, study_name_for
    from usp_core.tuning.tracking import CampaignTracker

    budget = n_trials or MetaOptimizationConfig.from_config(cfg, {"enable_deep_tuning": tier == "deep"}).n_trials
    # One study per (champion config, data): a retried run resumes it, new data or a new champion starts afresh.
    campaign = f"{tier}-tuning-{cfg.version}-{data_fingerprint(panel)}"
    study_name = study_name_for(campaign, tier)
    tracker = CampaignTracker(tracking_uri=tracking_uri, experiment=experiment)
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            box["result"] = run_campaign(cfg, panel, tier=tier, n_trials=budget, storage=storage, workers=workers,
                                         progress=False, campaign=campaign, tracking=tracker,
                                         tags={"dagster_run_id": run_id})
        except BaseException as exc:  # re-raised in the asset's thread
            box["error"] = exc

    started = time.monotonic()
    done_before, _ = _study_progress(storage, study_name)
    log(f"{tier} campaign {study_name}: {done_before}/{budget} trials already finished; storage {storage.split('@')[-1]}")
    thread = threading.Thread(target=work, name=f"{tier}-campaign", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(poll_seconds)
        if thread.is_alive():
            done, best = _study_progress(storage, study_name)
            rate = (done - done_before) / max(time.monotonic() - started, 1e-9)
            eta = f"{(budget - done) / rate:.0f}s" if rate > 0 else "unknown"
            log(f"{tier} campaign: {done}/{budget} trials, best so far {best}, ETA {eta}")
    if "error" in box:
        raise box["error"]
    result = box["result"]
    report = result.report
    import optuna
    from optuna.trial import TrialState

    from usp_core.tuning.optimizer import make_storage

    study = optuna.load_study(study_name=result.study_name, storage=make_storage(storage))
    trials = [{"number": t.number, "state": t.state.name, "value": _finite(t.value)}
              for t in study.get_trials(deepcopy=False)]
    log(f"{tier} campaign done: {report.n_complete} complete, {report.n_pruned} pruned, best {result.best_value} "
        f"in {time.monotonic() - started:.1f}s")
    return {
        "tier": tier,
        "study_name": result.study_name,
        "storage": storage.split("@")[-1],
        "budget": budget,
        "n_finished": result.n_finished,
        "n_complete": report.n_complete,
        "n_pruned": report.n_pruned,
        "n_failed": report.n_failed,
        "best_value": _finite(result.best_value),
        "baseline_value": _finite(report.baseline_value),
        "improvement": _finite(report.improvement),
        "best_params": dict(result.best_params),
        "importances": report.importances,
        "mlflow_run_id": result.mlflow_run_id,
        "mlflow_run_url": result.mlflow_run_url,
        "experiment_id": getattr(tracker, "experiment_id", None),
        "report_text": report.text,
        "report": report.to_metadata(),
        "trials": [t for t in trials if t["state"] != "RUNNING"],
        "wall_time_s": time.monotonic() - started,
        "config_version": cfg.version,
        "completed": trials and all(t["state"] != TrialState.RUNNING.name for t in trials),
    }


def optimization_reports(campaigns: list[dict]) -> list[dict[str, Any]]:
    """Each campaign's report as the campaign computed and logged it to MLflow (numbers, text and plots are
    not recomputed here, so both UIs show the same ones)."""
    return [{"tier": c["tier"], "study": c["study_name"], "text": c["report_text"], **c["report"],
             "mlflow_run_url": c.get("mlflow_run_url")} for c in campaigns]


def promotion_gate(champion, challenger, panel: pd.DataFrame) -> dict[str, Any]:
    """Holdout backtests of both configs and the improvement + Diebold–Mariano decision."""
    from usp_core.promotion.gate import evaluate_promotion

    decision = evaluate_promotion(champion, challenger, panel).as_dict()
    return {k: (_finite(v) if isinstance(v, float) else v) for k, v in decision.items()}


def apply_promotion(config_path: Path, decision: dict[str, Any], *, changes: dict[str, Any], tracking_uri: str,
                    run_id: str, campaign_run_url: str | None = None) -> dict[str, Any]:
    """Promote (atomic audited rewrite + registry aliases) or record the rejection; returns the outcome."""
    from usp_core.config import load_config
    from usp_core.promotion.gate import PromotionDecision
    from usp_core.promotion.promote import promote
    from usp_core.promotion.registry import ConfigRegistry

    before = load_config(config_path, environ={})
    fields = {k: (math.nan if v is None else v) for k, v in decision.items() if k in PromotionDecision.__dataclass_fields__}
    from usp_core.tuning.tracking import dagster_link_tags, mlflow_ui_url

    tags = dagster_link_tags(run_id)
    if campaign_run_url:
        tags.update({"usp.campaign_run_url": campaign_run_url, "mlflow.note.content":
                     tags["mlflow.note.content"] + f" Candidate from the tuning campaign [{campaign_run_url}]({campaign_run_url})."})
    registry = ConfigRegistry.for_config(config_path, tracking_uri=tracking_uri, run_tags=tags)
    outcome = promote(config_path, changes, PromotionDecision(**fields), registry=registry)
    after = load_config(config_path, environ={})
    return {
        "version": after.version,
        "previous_version": before.version,
        "promoted": bool(outcome.promoted),
        "reason": str(outcome.reason),
        "delta": {k: [before[k], after[k]] for k in changes if k in after and before[k] != after[k]},
        "mlflow_run_id": outcome.mlflow_run_id,
        "champion_model_version": outcome.champion_model_version,
        "challenger_model_version": outcome.challenger_model_version,
        "dagster_run_id": run_id,
        "mlflow_run_url": mlflow_ui_url(tracking_uri, f"experiments/{registry.experiment_id}/runs/{outcome.mlflow_run_id}")
        if outcome.mlflow_run_id else None,
        "champion_model_url": mlflow_ui_url(tracking_uri, f"models/{registry.name}/versions/{outcome.champion_model_version}")
        if outcome.champion_model_version else None,
    }
