"""Optuna tuning campaigns tracked in MLflow, and their optimisation report (SPEC §5)."""

import dagster as dg
import pandas as pd

from usp_pipeline.defs.common.io_manager import ALLOW_MISSING
from usp_pipeline.defs.common.metadata import md_table
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
    trials = pd.DataFrame(summary.get("trials", []))
    return dg.MaterializeResult(
        value=summary,
        metadata={
            "config_version": cfg.version,
            "tier": tier,
            "study": summary["study_name"],
            "storage": optuna_storage.storage_url().split("@")[-1],
            "trials_complete": summary["n_complete"],
            "trials_pruned": summary["n_pruned"],
            "trials_failed": summary["n_failed"],
            "best_value": dg.MetadataValue.float(float(summary["best_value"])),
            "base_config_value": summary.get("baseline_value"),
            "improvement_pct": None if summary.get("improvement") is None else 100 * summary["improvement"],
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
    context: dg.AssetExecutionContext,
    fast_tuning_campaign: dict,
    deep_tuning_campaign: dict | None,
    champion_config: dict,
    optuna_storage: OptunaStorageResource,
) -> dg.MaterializeResult:
    """Optimisation report (trials, best value, importances, convergence) with plots, per campaign."""
    from usp_core.paths import dagster_home
    from usp_pipeline.defs.common.core_adapters import optimization_reports

    campaigns = [c for c in (fast_tuning_campaign, deep_tuning_campaign) if c]
    out_dir = dagster_home() / "reports" / context.run.run_id
    reports = optimization_reports(campaigns, storage=optuna_storage.storage_url(), out_dir=out_dir)
    metadata: dict = {"champion_version": champion_config["version"], "report_dir": dg.MetadataValue.path(str(out_dir))}
    for rep in reports:
        metadata[f"{rep['tier']}_report"] = dg.MetadataValue.md(f"```\n{rep['text']}\n```")
        if rep.get("mlflow_run_url"):
            metadata[f"{rep['tier']}_mlflow_run"] = dg.MetadataValue.url(rep["mlflow_run_url"])
        for name, path in rep.get("plots", {}).items():
            metadata[f"{rep['tier']}_{name}_plot"] = dg.MetadataValue.path(path)
    return dg.MaterializeResult(value={"reports": reports, "champion_version": champion_config["version"]},
                                metadata=metadata)
