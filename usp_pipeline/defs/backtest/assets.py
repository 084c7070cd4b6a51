"""Walk-forward backtest of the champion configuration (SPEC §4)."""

from pathlib import Path

import dagster as dg
import pandas as pd

from usp_pipeline.defs.common.metadata import md_table, png_markdown, rounded
from usp_pipeline.defs.common.pools import GPU_POOL
from usp_pipeline.defs.common.resources import ConfigStoreResource, MLflowTrackerResource

GROUP = "backtest"


@dg.asset(group_name=GROUP, kinds={"python", "jax", "mlflow"}, pool=GPU_POOL)
def champion_backtest(
    context: dg.AssetExecutionContext,
    validated_observations: pd.DataFrame,
    config_store: ConfigStoreResource,
    mlflow: MLflowTrackerResource,
) -> dg.MaterializeResult:
    """Walk-forward metrics of the current champion config over every validated series."""
    from usp_core.backtest.metrics import OBJECTIVE_DESCRIPTIONS
    from usp_core.paths import dagster_home
    from usp_core.tuning.tracking import dagster_link_tags, log_finished_run
    from usp_pipeline.defs.common.core_adapters import backtest_summary

    cfg = config_store.load()
    context.log.info(f"backtesting config {cfg.version} on {validated_observations['series_id'].nunique()} series")
    plot_dir = dagster_home() / "reports" / context.run.run_id / "backtest"
    summary = backtest_summary(cfg, validated_observations, plot_dir)
    level = float(cfg["core.interval_level"])
    agg = summary["aggregate"]

    run_url = log_finished_run(
        mlflow.uri(), mlflow.backtest_experiment, kind="backtest", run_name=f"backtest-{cfg.version}",
        metrics={k: v for k, v in agg.items() if v is not None}, params={"config_version": cfg.version,
                                                                        "series": summary["series"]},
        tags=dagster_link_tags(context.run.run_id), artifacts=[Path(p) for p in summary["plots"].values()])
    return dg.MaterializeResult(
        value=summary,
        metadata={
            "config_version": cfg.version,
            "data": f"{summary['series']} series, walk-forward tuning folds (the holdout fold is left to the gate)",
            "objective": dg.MetadataValue.float(round(summary["objective"], 4)) if summary["objective"] is not None
            else "n/a",
            "objective_definition": f"{summary['objective_name']}: {OBJECTIVE_DESCRIPTIONS[summary['objective_name']]}",
            "crps_skill_vs_naive": rounded(agg.get("crps_skill"), 3),
            f"coverage_of_{100 * level:.0f}pct_interval": rounded(agg.get("coverage"), 3),
            "mase": rounded(agg.get("mase"), 3),
            "metrics_by_model": md_table(pd.DataFrame(summary["table"]), max_rows=30, floatfmt=".3f"),
            "mlflow_run": dg.MetadataValue.url(run_url),
            **{f"{name}_plot": png_markdown(path, CAPTIONS[name].format(level=level))
               for name, path in summary["plots"].items()},
        },
    )


CAPTIONS = {
    "fan_chart": "observed values vs the one-step forecast and its {level:.0%} interval (newest points)",
    "weights": "fusion weights of the experts and the operating mode over time (first series)",
    "skill": "CRPS skill vs the naive forecast per series (higher is better)",
}
