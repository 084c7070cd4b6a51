"""Observations: the store's panel and its validated / quarantined split (SPEC §4.4, §7)."""

import dagster as dg
import pandas as pd

from usp_pipeline.defs.common.metadata import md_table
from usp_pipeline.defs.common.pools import DUCKDB_WRITER_POOL
from usp_pipeline.defs.common.resources import ConfigStoreResource, DuckDBResource, WorkloadResource

GROUP = "data"


@dg.asset(group_name=GROUP, kinds={"duckdb", "pandas"})
def raw_observations(
    context: dg.AssetExecutionContext, workload: WorkloadResource, duckdb: DuckDBResource
) -> dg.Output[pd.DataFrame]:
    """Observations from the store (system of record: `usp ingest` and every inference run append to it)."""
    store = duckdb.store()
    summary = store.series_summary()
    if summary.empty:
        raise dg.Failure(
            description=f"The observation store {store.path} holds no observations.",
            metadata={"fix": "run `usp ingest FILE|DIR` (or `usp ingest --bundled`), or drop a file into the "
                             "incoming folder and let the sensor's inference job store it"},
        )
    ids = list(workload.series) or summary["series_id"].tolist()
    missing = sorted(set(ids) - set(summary["series_id"]))
    if missing:
        raise dg.Failure(description=f"Series not in the observation store: {', '.join(missing)}")
    if workload.max_series > 0:
        ids = ids[: workload.max_series]
    panel = store.load_observations(ids, max_length=workload.max_length)
    context.log.info(f"loaded {len(panel)} rows of {len(ids)} series from {store.path}")
    used = summary[summary["series_id"].isin(ids)]
    return dg.Output(
        panel,
        metadata={
            "dagster/row_count": len(panel),
            "series": len(ids),
            "store": dg.MetadataValue.path(str(store.path)),
            "stored_series": len(summary),
            "max_length": workload.max_length or "all",
            "series_in_store": md_table(used.astype({"first_ts": str, "last_ts": str}), max_rows=50),
        },
    )


@dg.multi_asset(
    group_name=GROUP,
    outs={
        "validated_observations": dg.AssetOut(
            description="Observations that pass the pandera schema: one row per (series_id, ts), finite values.",
            kinds={"pandas", "pandera"},
        ),
        "quarantined_observations": dg.AssetOut(
            description="Rows rejected by validation, each with its reason (also in DuckDB's quarantine table).",
            kinds={"pandas", "duckdb"},
        ),
    },
    pool=DUCKDB_WRITER_POOL,
)
def validated_observations(
    context: dg.AssetExecutionContext,
    raw_observations: pd.DataFrame,
    config_store: ConfigStoreResource,
    duckdb: DuckDBResource,
):
    """Validate the raw panel; quarantine bad rows with a reason instead of dropping them."""
    from usp_core.data.schema import validate_observations
    from usp_core.engine.predictor import Predictor
    from usp_core.inference import quarantine_records

    min_history = Predictor(config_store.load()).min_history
    good, quarantine = validate_observations(raw_observations, min_history)
    stored = duckdb.store().write_quarantine(
        quarantine_records(quarantine, source="raw_observations", run_id=context.run.run_id)
    ) if len(quarantine) else 0
    reasons = quarantine["reason"].value_counts().rename_axis("reason").rename("rows").reset_index()
    context.log.info(f"{len(good)} valid rows, {len(quarantine)} quarantined ({stored} new in DuckDB)")
    yield dg.Output(
        good,
        output_name="validated_observations",
        metadata={
            "dagster/row_count": len(good),
            "series": int(good["series_id"].nunique()),
            "quarantined_rows": len(quarantine),
            "min_history": min_history,
        },
    )
    yield dg.Output(
        quarantine,
        output_name="quarantined_observations",
        metadata={
            "dagster/row_count": len(quarantine),
            "reasons": md_table(reasons),
            "sample": md_table(quarantine.astype(str), max_rows=10) if len(quarantine) else "none",
        },
    )


@dg.asset_check(asset="validated_observations", blocking=True, description="The pandera observation schema holds.")
def validated_observations_schema(
    validated_observations: pd.DataFrame, config_store: ConfigStoreResource
) -> dg.AssetCheckResult:
    import pandera.errors as pa_errors

    from usp_core.data.schema import OBSERVATION_SCHEMA
    from usp_core.engine.predictor import Predictor

    min_history = Predictor(config_store.load(), compile_cache=False).min_history
    try:
        OBSERVATION_SCHEMA.validate(validated_observations, lazy=True)
        failures = pd.DataFrame(columns=["check", "column", "failure_case"])
    except pa_errors.SchemaErrors as exc:
        failures = exc.failure_cases.loc[:, ["check", "column", "failure_case"]]
    counts = validated_observations.groupby("series_id").size()
    short = counts[counts < min_history]
    return dg.AssetCheckResult(
        passed=failures.empty and short.empty,
        metadata={
            "schema_failures": len(failures),
            "series_below_min_history": len(short),
            "sample": md_table(failures.astype(str), max_rows=10) if len(failures) else "none",
        },
    )
