"""Run-failure sensor: every failed run is appended to $DAGSTER_HOME/run_failures.jsonl and logged."""

import datetime as dt
import json

import dagster as dg

from usp_core.paths import dagster_home


def record_failure(run_id: str, job_name: str, message: str) -> dict:
    record = {
        "recorded_at": dt.datetime.now(dt.UTC).isoformat(),
        "run_id": run_id,
        "job": job_name,
        "error": message,
    }
    path = dagster_home() / "run_failures.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(record, sort_keys=True) + "\n")
    return record


@dg.run_failure_sensor(default_status=dg.DefaultSensorStatus.RUNNING, description="Records failed runs.")
def run_failure_recorder(context: dg.RunFailureSensorContext) -> None:
    message = context.failure_event.message or "run failed"
    record_failure(context.dagster_run.run_id, context.dagster_run.job_name, message)
    context.log.error(f"run {context.dagster_run.run_id} of {context.dagster_run.job_name} failed: {message}")
