"""File sensor: one run per distinct file content; the promoted-config and failure sensors."""

import json

import dagster as dg
import pytest

from usp_pipeline.defs.common.resources import WorkloadResource
from usp_pipeline.defs.common.sensors import record_failure
from usp_pipeline.defs.inference.sensors import POLL_SECONDS_ENV, incoming_files_sensor, incoming_poll_seconds


def _evaluate(tmp_path, cursor=None):
    ctx = dg.build_sensor_context(cursor=cursor, resources={"workload": WorkloadResource(incoming_dir=str(tmp_path))})
    result = incoming_files_sensor(ctx)
    return result.run_requests or [], result.cursor


def test_new_file_gives_one_run_same_file_none_modified_file_a_new_one(tmp_path):
    f = tmp_path / "batch.csv"
    f.write_text("series_id,ts,value\na,2024-01-01T00:00:00Z,1.0\n")
    (tmp_path / ".partial.csv").write_text("ignored")
    (tmp_path / "notes.txt").write_text("ignored")

    first, cursor = _evaluate(tmp_path)
    assert len(first) == 1
    cfg = first[0].run_config["ops"]["predictions"]["config"]
    assert cfg["path"] == str(f) and first[0].run_key == cfg["sha256"]

    again, cursor2 = _evaluate(tmp_path, cursor)
    assert again == [] and cursor2 == cursor

    f.write_text("series_id,ts,value\na,2024-01-01T00:00:00Z,1.0\na,2024-01-02T00:00:00Z,2.0\n")
    modified, cursor3 = _evaluate(tmp_path, cursor2)
    assert len(modified) == 1 and modified[0].run_key != first[0].run_key
    assert json.loads(cursor3)[str(f)] == modified[0].run_key


def test_missing_directory_skips(tmp_path):
    requests, cursor = _evaluate(tmp_path / "absent")
    assert requests == [] and json.loads(cursor) == {}


def test_run_failure_is_recorded(tmp_path, monkeypatch):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    record_failure("run-1", "inference_job", "boom")
    lines = (tmp_path / "run_failures.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["run_id"] == "run-1" and json.loads(lines[-1])["error"] == "boom"


def test_promoted_config_sensor_requests_refresh_only_on_promotion():
    from usp_pipeline.definitions import defs
    from usp_pipeline.defs.promotion.sensors import promoted_config_sensor as sensor

    instance = dg.DagsterInstance.ephemeral()

    def report(promoted: bool, version: str):
        instance.report_runless_asset_event(dg.AssetMaterialization(
            "champion_config", metadata={"promoted": promoted, "config_version": version}))

    report(False, "v1")
    ctx = dg.build_sensor_context(instance=instance, definitions=defs)
    first = sensor.evaluate_tick(ctx)
    assert first.run_requests == [] and first.skip_message
    report(True, "v2")
    ctx = dg.build_sensor_context(instance=instance, definitions=defs, cursor=first.cursor)
    result = sensor.evaluate_tick(ctx)
    assert [r.run_key for r in result.run_requests] == ["champion-v2"]


def test_the_polling_interval_follows_the_environment(monkeypatch):
    monkeypatch.delenv(POLL_SECONDS_ENV, raising=False)
    assert incoming_poll_seconds() == 30
    monkeypatch.setenv(POLL_SECONDS_ENV, "5")
    assert incoming_poll_seconds() == 5
    monkeypatch.setenv(POLL_SECONDS_ENV, "0")
    with pytest.raises(ValueError, match=POLL_SECONDS_ENV):
        incoming_poll_seconds()
