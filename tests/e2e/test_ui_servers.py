"""The Dagster webserver serves the asset lineage over GraphQL; the MLflow UI starts on the same store."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}: {proc.stdout.read()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            time.sleep(1.0)
    raise AssertionError(f"{url} did not answer within {timeout}s")


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


ASSET_QUERY = """
{ assetNodes { assetKey { path } groupName dependencyKeys { path } } }
"""


def test_dagster_webserver_graphql_lists_assets_with_lineage(tmp_path):
    port = _free_port()
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path), "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [str(BIN / "dagster-webserver"), "-h", "127.0.0.1", "-p", str(port), "-m", "usp_pipeline.definitions"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        _wait_http(f"http://127.0.0.1:{port}/server_info", proc)
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/graphql", data=json.dumps({"query": ASSET_QUERY}).encode(),
            headers={"Content-Type": "application/json"},
        )
        nodes = []
        for _ in range(60):  # the code location loads asynchronously
            with urllib.request.urlopen(request, timeout=30) as resp:
                nodes = json.loads(resp.read())["data"]["assetNodes"]
            if nodes:
                break
            time.sleep(2)
        lineage = {"/".join(n["assetKey"]["path"]): {"/".join(d["path"]) for d in n["dependencyKeys"]} for n in nodes}
        assert lineage["champion_config"] == {"promotion_decision"}
        assert lineage["predictions"] == {"champion_config"}
        assert lineage["validated_observations"] == {"raw_observations"}
        assert {n["groupName"] for n in nodes} == {"data", "backtest", "tuning", "promotion", "inference"}
    finally:
        _stop(proc)


def test_mlflow_ui_starts_on_the_pipeline_store(tmp_path, monkeypatch):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from usp_core.tuning.tracking import CampaignTracker, default_tracking_uri

    uri = default_tracking_uri()
    tracker = CampaignTracker(tracking_uri=uri)  # creates the store and the experiment the pipeline uses
    port = _free_port()
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        _wait_http(f"http://127.0.0.1:{port}/health", proc)
        url = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/get-by-name?experiment_name={tracker.experiment_name}"
        with urllib.request.urlopen(url, timeout=30) as resp:
            assert json.loads(resp.read())["experiment"]["name"] == tracker.experiment_name
    finally:
        _stop(proc)
