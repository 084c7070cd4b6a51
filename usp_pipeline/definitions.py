"""The one ``dg.Definitions`` of the USP pipeline (``dagster dev -m usp_pipeline.definitions``)."""

from __future__ import annotations

import dagster as dg

from usp_pipeline.defs.backtest.assets import champion_backtest
from usp_pipeline.defs.common.io_manager import ParquetJsonIOManager
from usp_pipeline.defs.common.jobs import (
    champion_refresh_job,
    daily_pipeline,
    daily_schedule,
    deep_tuning_job,
    inference_job,
    weekly_deep_schedule,
)
from usp_pipeline.defs.common.resources import (
    ConfigStoreResource,
    DuckDBResource,
    MLflowTrackerResource,
    OptunaStorageResource,
    WorkloadResource,
)
from usp_pipeline.defs.common.sensors import run_failure_recorder
from usp_pipeline.defs.data.assets import (
    raw_observations,
    validated_observations,
    validated_observations_schema,
)
from usp_pipeline.defs.inference.assets import predictions
from usp_pipeline.defs.inference.sensors import incoming_files_sensor
from usp_pipeline.defs.promotion.assets import challenger_config, champion_config, promotion_decision
from usp_pipeline.defs.promotion.sensors import promoted_config_sensor
from usp_pipeline.defs.tuning.assets import deep_tuning_campaign, fast_tuning_campaign, optimization_report

ASSETS = [
    raw_observations, validated_observations, champion_backtest, fast_tuning_campaign, deep_tuning_campaign,
    challenger_config, promotion_decision, champion_config, optimization_report, predictions,
]


def default_resources() -> dict:
    """Embedded defaults; each resource reads its env switch (see usp_pipeline.defs.common.resources)."""
    return {
        "io_manager": ParquetJsonIOManager(),
        "config_store": ConfigStoreResource(),
        "mlflow": MLflowTrackerResource(),
        "optuna_storage": OptunaStorageResource(),
        "duckdb": DuckDBResource(),
        "workload": WorkloadResource(),
    }


defs = dg.Definitions(
    assets=ASSETS,
    asset_checks=[validated_observations_schema],
    jobs=[daily_pipeline, deep_tuning_job, inference_job, champion_refresh_job],
    schedules=[daily_schedule, weekly_deep_schedule],
    sensors=[incoming_files_sensor, promoted_config_sensor, run_failure_recorder],
    resources=default_resources(),
)
