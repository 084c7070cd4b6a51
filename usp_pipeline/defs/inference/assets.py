"""Predictions in DuckDB, produced by the inference job whenever a file lands in data/incoming/ (SPEC §7)."""

import time

import dagster as dg

from usp_pipeline.defs.common.metadata import md_table, rounded
from usp_pipeline.defs.common.pools import DUCKDB_WRITER_POOL
from usp_pipeline.defs.common.resources import ConfigStoreResource, DuckDBResource

GROUP = "inference"


class IncomingFileConfig(dg.Config):
    """The observation file (CSV or Parquet with series_id, ts, value) to predict from."""

    path: str
    sha256: str = ""
    replay: bool = False  # rows observed at their own timestamps (a historical file), never stale


@dg.asset(group_name=GROUP, kinds={"duckdb", "jax"}, pool=DUCKDB_WRITER_POOL, deps=["champion_config"])
def predictions(
    context: dg.AssetExecutionContext,
    config: IncomingFileConfig,
    config_store: ConfigStoreResource,
    duckdb: DuckDBResource,
) -> dg.MaterializeResult:
    """One-step-ahead forecasts per (series_id, ts, horizon, config_version), written with predictor states."""
    # the file's rows go into the observation store in the same transaction (SPEC §4.4)
    from usp_core.inference import run_inference

    cfg = config_store.load()
    store = duckdb.store()
    result = run_inference(config.path, cfg, store, run_id=context.run.run_id,
                           now_ns=None if config.replay else time.time_ns(), log=context.log.info)
    if result.cold_starts:
        context.log.warning(f"rebuilt from history (stored state unusable): {result.cold_starts}")
    if result.sha256 and config.sha256 and result.sha256 != config.sha256:
        context.log.warning(f"{config.path} changed since the sensor saw it ({config.sha256[:12]} -> {result.sha256[:12]})")
    reasons = result.quarantine_reasons
    live = store.live_accuracy()
    live = live[live["config_version"] == cfg.version].drop(columns="config_version")
    return dg.MaterializeResult(
        metadata={
            "source": dg.MetadataValue.path(config.path),
            "source_sha256": result.sha256,
            "config_version": cfg.version,
            "rows": result.rows,
            "quarantined_rows": result.quarantined,
            "skipped_already_processed": result.skipped,
            "predictions_written": result.predictions_written,
            "states_written": result.states_written,
            "new_series": result.new_series,
            "caught_up_observations": result.caught_up,
            "cold_starts": dg.MetadataValue.json(result.cold_starts),
            "series": result.series,
            "predictions_total": store.count("predictions"),
            "quarantine_reasons": dg.MetadataValue.json(reasons),
            "database": dg.MetadataValue.path(str(store.path)),
            "sample": md_table(result.sample, max_rows=10) if result.sample is not None else "none",
            "live_accuracy": md_table(live, max_rows=50, floatfmt=".3f") if len(live) else
            "no forecast of this config has been observed yet",
            "live_relative_mae": rounded(float(live["mae"].sum() / live["naive_mae"].sum()), 3) if len(live) else None,
        },
    )
