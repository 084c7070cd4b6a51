"""Observations: the bundled panel and its validated / quarantined split (SPEC §4.4, §7)."""

import dagster as dg
import pandas as pd

from usp_pipeline.defs.common.metadata import md_table
from usp_pipeline.defs.common.pools import DUCKDB_WRITER_POOL
from usp_pipeline.defs.common.resources import ConfigStoreResource, DuckDBResource, WorkloadResource

GROUP = "data"


@dg.asset(group_name=GROUP, kinds={"python", "pandas"})
def raw_observations(context: dg.AssetExecutionContext, workload: WorkloadResource) -> dg.Output[pd.DataFrame]:
    """Bundled real series (statsmodels/arch datasets) as a long table series_id, ts, value."""
    from usp_core.data.real import DEV_SERIES, load_dev_panel

    series = DEV_SERIES[: workload.max_series] if workload.max_series > 0 else None
    panel, provenance = load_dev_panel(series, max_length=workload.max_length or None)
    context.log.info(f"loaded {len(panel)} rows of {panel['series_id'].nunique()} series")
    counts = panel.groupby("series_id", sort=False).size().rename("rows").reset_index()
    return dg.Output(
        panel,
        metadata={
            "dagster/row_count": len(panel),
            "series": int(panel["series_id"].nunique()),
            "rows_per_series": md_table(counts, max_rows=50),
            "provenance": md_table(provenance, max_rows=50),
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
