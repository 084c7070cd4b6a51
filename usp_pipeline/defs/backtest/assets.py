"""Walk-forward backtest of the champion configuration (SPEC §4)."""

import dagster as dg
import pandas as pd

from usp_pipeline.defs.common.metadata import md_table, scalar_metadata
from usp_pipeline.defs.common.pools import GPU_POOL
from usp_pipeline.defs.common.resources import ConfigStoreResource

GROUP = "backtest"


@dg.asset(group_name=GROUP, kinds={"python", "jax"}, pool=GPU_POOL)
def champion_backtest(
    context: dg.AssetExecutionContext, validated_observations: pd.DataFrame, config_store: ConfigStoreResource
) -> dg.MaterializeResult:
    """Walk-forward metrics of the current champion config over every validated series."""
    from usp_pipeline.defs.common.core_adapters import backtest_summary

    cfg = config_store.load()
    context.log.info(f"backtesting config {cfg.version} on {validated_observations['series_id'].nunique()} series")
    summary = backtest_summary(cfg, validated_observations)
    return dg.MaterializeResult(
        value=summary,
        metadata={
            "config_version": cfg.version,
            **scalar_metadata(summary["aggregate"]),
            "metrics": md_table(pd.DataFrame(summary["table"])),
        },
    )
