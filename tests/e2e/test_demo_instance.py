"""The demo runs as production does: through the instance's daemon, so the Dagster UI attaches its runs, the
sensor's ticks and the materialisations to the code location (asked over GraphQL, as the UI asks)."""

import json
import os
import subprocess
import time
import urllib.request

import pytest

from tests.e2e.test_ui_servers import BIN, REPO, _free_port, _stop, _wait_http

pytestmark = pytest.mark.slow

LOCATION = "usp_pipeline.definitions"
QUERY = """
query ($job: PipelineSelector!, $sensor: SensorSelector!) {
  pipelineOrError(params: $job) { __typename ... on Pipeline { runs { runId status } } }
  sensorOrError(sensorSelector: $sensor) {
    __typename ... on Sensor { sensorState { status ticks(limit: 50) { status runIds } } }
  }
  assetNodes { assetKey { path } assetMaterializations(limit: 1) { runId metadataEntries { label __typename } } }
}
"""


def _graphql(port: int, query: str, variables: dict) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/graphql",
                                     data=json.dumps({"query": query, "variables": variables}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as resp:
        body = json.loads(resp.read())
    assert "errors" not in body, body["errors"]
    return body["data"]


def test_demo_runs_are_attached_to_the_code_location(pipeline_home, monkeypatch):
    from usp_pipeline.demo import run_demo

    monkeypatch.setenv("USP_INCOMING_DIR", str(pipeline_home / "incoming"))
    summary = run_demo(series=1, length=120, trials=2, timeout=600)
    assert len(summary["inference_runs"]) == 1 and summary["predictions_rows"] > 0

    port = _free_port()
    proc = subprocess.Popen(
        [str(BIN / "dagster-webserver"), "-h", "127.0.0.1", "-p", str(port), "-m", LOCATION],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)
    try:
        _wait_http(f"http://127.0.0.1:{port}/server_info", proc)
        repo = {"repositoryLocationName": LOCATION, "repositoryName": "__repository__"}
        variables = {"job": {**repo, "pipelineName": "daily_pipeline"},
                     "sensor": {**repo, "sensorName": "incoming_files_sensor"}}
        data = {}
        for _ in range(60):  # the code location loads asynchronously
            data = _graphql(port, QUERY, variables)
            if data["pipelineOrError"]["__typename"] == "Pipeline":
                break
            time.sleep(2)
        # the job page lists the demo's daily run
        runs = data["pipelineOrError"]["runs"]
        assert [(r["runId"], r["status"]) for r in runs] == [(summary["daily_run"], "SUCCESS")]
        # the sensor's history holds the tick that launched the inference run
        sensor = data["sensorOrError"]["sensorState"]
        assert sensor["status"] == "RUNNING"
        launched = [run_id for tick in sensor["ticks"] for run_id in tick["runIds"]]
        assert launched == summary["inference_runs"]
        # each asset's latest materialisation comes from those runs, its plots rendered as markdown
        latest = {"/".join(n["assetKey"]["path"]): n["assetMaterializations"] for n in data["assetNodes"]}
        assert latest["champion_backtest"][0]["runId"] == summary["daily_run"]
        assert latest["predictions"][0]["runId"] == summary["inference_runs"][0]
        entries = {e["label"]: e["__typename"] for e in latest["champion_backtest"][0]["metadataEntries"]}
        assert entries["fan_chart_plot"] == entries["weights_plot"] == "MarkdownMetadataEntry"
    finally:
        _stop(proc)
