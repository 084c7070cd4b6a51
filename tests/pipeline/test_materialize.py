"""dg.materialize of the daily pipeline and the inference job on an ephemeral instance (small data)."""

import dagster as dg
import pytest

from usp_pipeline.definitions import ASSETS, default_resources
from usp_pipeline.defs.common.jobs import DAILY_ASSETS
from usp_pipeline.defs.common.resources import WorkloadResource
from usp_pipeline.defs.data.assets import validated_observations_schema

pytestmark = pytest.mark.slow


def _metadata(result, asset):
    events = [e for e in result.get_asset_materialization_events() if e.asset_key == dg.AssetKey(asset)]
    assert len(events) == 1, asset
    return {k: v.value for k, v in events[0].materialization.metadata.items()}


def test_daily_pipeline_then_inference(pipeline_home):
    resources = {**default_resources(), "workload": WorkloadResource(max_series=2, max_length=160, fast_trials=2,
                                                                      incoming_dir=str(pipeline_home / "incoming"))}
    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize([*ASSETS, validated_observations_schema], selection=dg.AssetSelection.assets(*DAILY_ASSETS),
                            resources=resources, instance=instance)
    assert result.success
    checks = result.get_asset_check_evaluations()
    assert [c.passed for c in checks] == [True]
    assert _metadata(result, "validated_observations")["dagster/row_count"] == 320
    tuned = _metadata(result, "fast_tuning_campaign")
    assert tuned["trials_complete"] == 2 and "best_value" in tuned
    decision = _metadata(result, "promotion_decision")
    assert decision["decision"] in {"promote", "keep champion"} and 0.0 <= decision["p_value"] <= 1.0
    champion = _metadata(result, "champion_config")
    assert champion["promoted"] == (decision["decision"] == "promote")
    assert (pipeline_home / "dagster_home" / "optuna" / "journal.log").exists()
    assert (pipeline_home / "dagster_home" / "mlflow" / "mlflow.db").exists()

    from usp_pipeline.defs.inference.sensors import incoming_files_sensor
    from usp_pipeline.demo import write_sample_file

    write_sample_file(pipeline_home / "incoming", 2)
    tick = incoming_files_sensor(dg.build_sensor_context(resources={"workload": resources["workload"]}))
    assert len(tick.run_requests) == 1
    inference = dg.materialize(ASSETS, selection=["predictions"], resources=resources, instance=instance,
                               run_config=tick.run_requests[0].run_config)
    meta = _metadata(inference, "predictions")
    assert meta["predictions_written"] > 0 and meta["quarantined_rows"] == 2
    assert meta["config_version"] == champion["config_version"]
