"""Optuna tuning campaigns tracked in MLflow, and their optimisation report (SPEC §5)."""

import dagster as dg
import pandas as pd

from usp_pipeline.defs.common.io_manager import ALLOW_MISSING
from usp_pipeline.defs.common.metadata import md_table, png_markdown, rounded
from usp_pipeline.defs.common.pools import GPU_POOL
from usp_pipeline.defs.common.resources import (
    ConfigStoreResource,
    MLflowTrackerResource,
    OptunaStorageResource,
    WorkloadResource,
)

GROUP = "tuning"


def _campaign(
    context: dg.AssetExecutionContext,
    tier: str,
    panel: pd.DataFrame,
    config_store: ConfigStoreResource,
    mlflow: MLflowTrackerResource,
    optuna_storage: OptunaStorageResource,
    n_trials: int,
    workers: int,
) -> dg.MaterializeResult:
    from usp_pipeline.defs.common.core_adapters import tuning_summary

    cfg = config_store.load()
    summary = tuning_summary(
        cfg, panel, tier=tier, n_trials=n_trials, workers=workers,
        storage=optuna_storage.storage_url(), tracking_uri=mlflow.uri(), experiment=mlflow.experiment,
        artifact_root=None, run_id=context.run.run_id, log=context.log.info,
    )
    from usp_core.backtest.metrics import OBJECTIVE_DESCRIPTIONS

    trials = pd.DataFrame(summary.get("trials", []))
    objective = cfg["backtest.objective"]
    plot = summary["report"]["plots"].get("campaign")
    return dg.MaterializeResult(
        value=summary,
        metadata={
            "config_version": cfg.version,
            "tier": tier,
            "study": summary["study_name"],
            "storage": optuna_storage.storage_url().split("@")[-1],
            "objective": f"{objective}: {OBJECTIVE_DESCRIPTIONS[objective]}; tuning folds of the pre-holdout data",
            "trials_complete": summary["n_complete"],
            "trials_pruned": summary["n_pruned"],
            "trials_failed": summary["n_failed"],
            "best_value": rounded(summary["best_value"], 5),
            "base_config_value": rounded(summary.get("baseline_value"), 5),
            "improvement_pct": rounded(None if summary.get("improvement") is None else 100 * summary["improvement"], 2),
            **({"campaign_plot": png_markdown(plot, f"{summary['study_name']}: trials and best so far")} if plot else {}),
            "best_params": dg.MetadataValue.json(summary["best_params"]),
            "mlflow_run": dg.MetadataValue.url(summary["mlflow_run_url"]) if summary.get("mlflow_run_url") else "not tracked",
            "trials": md_table(trials, max_rows=30) if not trials.empty else "no trials",
        },
    )


@dg.asset(group_name=GROUP, kinds={"optuna", "mlflow", "jax"}, pool=GPU_POOL)
def fast_tuning_campaign(
    context: dg.AssetExecutionContext,
    validated_observations: pd.DataFrame,
    config_store: ConfigStoreResource,
    mlflow: MLflowTrackerResource,
    optuna_storage: OptunaStorageResource,
    workload: WorkloadResource,
) -> dg.MaterializeResult:
    """Fast Optuna campaign over the 6 sensitivity parameters on the pre-holdout tuning data."""
    return _campaign(context, "fast", validated_observations, config_store, mlflow, optuna_storage,
                     workload.fast_trials, workload.workers)


@dg.asset(group_name=GROUP, kinds={"optuna", "mlflow", "jax"}, pool=GPU_POOL)
def deep_tuning_campaign(
    context: dg.AssetExecutionContext,
    validated_observations: pd.DataFrame,
    config_store: ConfigStoreResource,
    mlflow: MLflowTrackerResource,
    optuna_storage: OptunaStorageResource,
    workload: WorkloadResource,
) -> dg.MaterializeResult:
    """Deep, resumable Optuna campaign over the deep tier (trial budget is a total)."""
    return _campaign(context, "deep", validated_observations, config_store, mlflow, optuna_storage,
                     workload.deep_trials, workload.workers)


@dg.asset(
    group_name=GROUP,
    kinds={"optuna", "mlflow", "matplotlib"},
    ins={
        "fast_tuning_campaign": dg.AssetIn(),
        "deep_tuning_campaign": dg.AssetIn(metadata={ALLOW_MISSING: True}),
        "champion_config": dg.AssetIn(),
    },
)
def optimization_report(
    fast_tuning_campaign: dict,
    deep_tuning_campaign: dict | None,
    champion_config: dict,
) -> dg.MaterializeResult:
    """Optimisation report of each campaign (trials, best so far, importances) with its plots, as logged to MLflow."""
    from pathlib import Path

    from usp_pipeline.defs.common.core_adapters import optimization_reports

    reports = optimization_reports([c for c in (fast_tuning_campaign, deep_tuning_campaign) if c])
    metadata: dict = {"champion_version": champion_config["version"]}
    for rep in reports:
        tier = rep["tier"]
        metadata[f"{tier}_best_objective"] = dg.MetadataValue.float(round(rep["best_value"], 5)) \
            if rep.get("best_value") is not None else "no complete trial"
        if rep.get("mlflow_run_url"):
            metadata[f"{tier}_mlflow_run"] = dg.MetadataValue.url(rep["mlflow_run_url"])
        for name in ("campaign", "parallel_coordinates"):
            path = rep.get("plots", {}).get(name)
            if path and Path(path).exists():
                metadata[f"{tier}_{name}_plot"] = png_markdown(path, CAPTIONS[name].format(**rep))
        metadata[f"{tier}_importances"] = importance_table(rep)
        metadata[f"{tier}_report"] = dg.MetadataValue.md(f"```\n{rep['text']}\n```")
    return dg.MaterializeResult(value={"reports": reports, "champion_version": champion_config["version"]},
                                metadata=metadata)


CAPTIONS = {
    "campaign": "{study}: each trial's objective (lower is better) and the best so far; importances ({importance_method})",
    "parallel_coordinates": "{study}: parameter values of every complete trial, coloured by objective",
}
FEW_TRIALS_FOR_IMPORTANCE = 20


def importance_table(rep: dict) -> dg.MetadataValue:
    """Importances as a table, with a caveat when the campaign is too small for them to mean much."""
    importances = rep.get("importances") or {}
    if not importances:
        return dg.MetadataValue.md(f"no importances: {rep.get('importance_method')}")
    rows = [f"| {k} | {v:.2f} |" for k, v in sorted(importances.items(), key=lambda kv: -kv[1])]
    caveat = (f"\n\n_Only {rep['n_complete']} complete trials: importances are indicative at best._"
              if rep.get("n_complete", 0) < FEW_TRIALS_FOR_IMPORTANCE else "")
    return dg.MetadataValue.md(f"| parameter | importance ({rep.get('importance_method')}) |\n|---|---|\n"
                               + "\n".join(rows) + caveat)
