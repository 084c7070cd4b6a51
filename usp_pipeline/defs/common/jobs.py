"""Jobs and schedules (SPEC §7)."""

from __future__ import annotations

import dagster as dg

DAILY_ASSETS = (
    "raw_observations", "validated_observations", "quarantined_observations", "champion_backtest",
    "fast_tuning_campaign", "challenger_config", "promotion_decision", "champion_config", "optimization_report",
)
DEEP_ASSETS = ("deep_tuning_campaign", "challenger_config", "promotion_decision", "champion_config",
               "optimization_report")

daily_pipeline = dg.define_asset_job(
    "daily_pipeline",
    selection=dg.AssetSelection.assets(*DAILY_ASSETS),
    description="validate -> backtest -> fast tuning -> promotion gate -> champion config -> report",
    tags={"usp/campaign": "fast"},
)

deep_tuning_job = dg.define_asset_job(
    "deep_tuning_job",
    selection=dg.AssetSelection.assets(*DEEP_ASSETS),
    description="Deep-tier resumable campaign, then the promotion gate on its best trial.",
    tags={"usp/campaign": "deep"},
)

inference_job = dg.define_asset_job(
    "inference_job",
    selection=dg.AssetSelection.assets("predictions"),
    description="Validate one incoming file and write its predictions and predictor states to DuckDB.",
)

champion_refresh_job = dg.define_asset_job(
    "champion_refresh_job",
    selection=dg.AssetSelection.assets("champion_backtest"),
    description="Re-backtest after a promotion so the UI shows the new champion's metrics.",
)

daily_schedule = dg.ScheduleDefinition(
    name="daily_pipeline_schedule", job=daily_pipeline, cron_schedule="0 2 * * *", execution_timezone="UTC",
    description="Every day at 02:00 UTC.",
)

weekly_deep_schedule = dg.ScheduleDefinition(
    name="weekly_deep_tuning_schedule", job=deep_tuning_job, cron_schedule="0 3 * * 0", execution_timezone="UTC",
    description="Every Sunday at 03:00 UTC; the campaign resumes its study and finishes the remaining budget.",
)
