"""React to a promoted champion config: refresh the champion's backtest (SPEC §7)."""

import dagster as dg

from usp_pipeline.defs.common.jobs import champion_refresh_job


@dg.asset_sensor(asset_key=dg.AssetKey("champion_config"), job=champion_refresh_job,
                 default_status=dg.DefaultSensorStatus.RUNNING,
                 description="When champion_config is materialised with promoted=True, re-backtest the new champion.")
def promoted_config_sensor(context: dg.SensorEvaluationContext, asset_event: dg.EventLogEntry):
    materialization = asset_event.asset_materialization
    metadata = materialization.metadata if materialization else {}
    promoted = metadata.get("promoted")
    if promoted is None or not promoted.value:
        return dg.SkipReason("champion_config materialised without a promotion")
    version = metadata["config_version"].value
    return dg.RunRequest(run_key=f"champion-{version}", tags={"usp/config_version": str(version)})
