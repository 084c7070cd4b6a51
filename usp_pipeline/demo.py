"""``usp demo`` / ``make demo``: the daily pipeline, a file drop, the sensor and the inference job, end to end.

Runs against the Dagster instance at ``$DAGSTER_HOME`` (default ``<repo>/dagster_home``) so that the runs,
the asset lineage and their metadata are what ``dagster dev`` then shows. Sizes are the demo's own (a few
series, a few trials), passed as resource config; the defaults of the pipeline are untouched.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

DEMO_SERIES = 2
DEMO_LENGTH = 240
DEMO_TRIALS = 3
INCOMING_ROWS = 80
DEFINITIONS_MODULE = "usp_pipeline.definitions"
POLL_SECONDS = 1.0


def _resources_config(series: int, length: int, trials: int, incoming: Path) -> dict:
    from usp_core.data.real import DEV_SERIES

    return {"workload": {"config": {"series": list(DEV_SERIES[:series]), "max_length": length, "fast_trials": trials,
                                    "deep_trials": trials, "incoming_dir": str(incoming)}}}


def _bundled(series: int):
    from usp_core.data.real import DEV_SERIES, load_dev_panel

    panel, _ = load_dev_panel(DEV_SERIES[:series])
    newest = panel.groupby("series_id", sort=False).cumcount(ascending=False) < INCOMING_ROWS
    return panel[~newest], panel[newest]


def seed_store(store, series: int) -> int:
    """Ingest the bundled series into the observation store, all but their newest ``INCOMING_ROWS`` points (they
    arrive later as the sample file); a rerun adds nothing. Returns the rows appended."""
    from usp_core.inference import ingest_frame

    history, _ = _bundled(series)
    return ingest_frame(history, store, source="bundled dev series (demo)").appended


def write_sample_file(incoming: Path, series: int) -> Path:
    """Newest observations of the bundled series plus two bad rows, dropped atomically into ``incoming``."""
    import pandas as pd

    from usp_core.data.real import DEV_SERIES

    _, newest = _bundled(series)
    sample = newest.assign(ts=newest["ts"].dt.strftime("%Y-%m-%dT%H:%M:%SZ")).astype({"value": object})
    bad = pd.DataFrame({"series_id": [DEV_SERIES[0], ""], "ts": ["2100-01-01T00:00:00Z", "2100-01-01T00:00:00Z"],
                        "value": ["not-a-number", "1.0"]})
    sample = pd.concat([sample, bad], ignore_index=True)
    incoming.mkdir(parents=True, exist_ok=True)
    target = incoming / "demo_observations.csv"
    tmp = incoming / ".demo_observations.csv.tmp"
    sample.to_csv(tmp, index=False)
    os.replace(tmp, target)
    return target


def run_demo(series: int = DEMO_SERIES, length: int = DEMO_LENGTH, trials: int = DEMO_TRIALS,
             timeout: float = 900.0) -> dict:
    """The demo as production runs it: a Dagster daemon on the instance, ``daily_pipeline`` launched through the
    instance's run coordinator and launcher (the job's multiprocess executor), then a file dropped into the
    incoming folder for ``incoming_files_sensor`` to pick up. Job pages, the sensor's tick history and the
    Overview timeline of ``dagster dev`` show these runs."""
    import dagster as dg

    from usp_core.inference import PredictionStore
    from usp_core.paths import dagster_home, duckdb_path, project_root
    from usp_pipeline.defs.inference.sensors import file_sha256

    os.environ.setdefault("DAGSTER_HOME", str(Path("dagster_home").absolute()))
    home = dagster_home()
    home.mkdir(parents=True, exist_ok=True)
    incoming = Path(os.environ.setdefault("USP_INCOMING_DIR", str(project_root() / "data" / "incoming"))).absolute()
    run_config = {"resources": _resources_config(series, length, trials, incoming)}
    started = time.monotonic()

    store = PredictionStore(duckdb_path())
    print(f"[0/3] ingesting {series} bundled series into the observation store {store.path} ...", flush=True)
    appended = seed_store(store, series)
    print(f"      {appended} observations appended ({'first run' if appended else 'already stored'})", flush=True)

    instance = dg.DagsterInstance.get()
    log_path = home / "demo" / "daemon.log"  # not logs/: Dagster manages that folder
    with _daemon(log_path):
        print(f"[1/3] daily_pipeline on the store's {series} series x newest {length} points, {trials} fast trials, "
              f"launched through the instance (daemon log: {log_path}) ...", flush=True)
        daily_id = _launch("daily_pipeline", run_config)
        _wait_for_run(instance, daily_id, timeout, log_path)

        print(f"[2/3] dropping a sample file into {incoming} for incoming_files_sensor ...", flush=True)
        sample = write_sample_file(incoming, series)
        sha = file_sha256(sample)
        inference_ids = _wait_for_sensor_runs(instance, sha, timeout, log_path)
        _wait_until_idle(instance, timeout)

    print("[3/3] summary", flush=True)
    summary = {
        "seconds": round(time.monotonic() - started, 1),
        **{name: _latest_metadata(instance, name) for name in
           ("champion_backtest", "fast_tuning_campaign", "promotion_decision", "champion_config")},
        "daily_run": daily_id,
        "inference_runs": inference_ids,
        "sample_file": str(sample),
        "observations_rows": store.count("observations"),
        "predictions_rows": store.count("predictions"),
        "quarantine_rows": store.count("quarantine"),
        "duckdb": str(store.path),
    }
    _print_summary(summary, home)
    return summary


@contextlib.contextmanager
def _daemon(log_path: Path):
    """``dagster-daemon run`` on the instance for the duration of the block (run queue, sensors, monitoring)."""
    from usp_pipeline.defs.inference.sensors import POLL_SECONDS_ENV

    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        # the demo's own daemon looks for the sample file every 5 s (30 s by default)
        env = {**os.environ, POLL_SECONDS_ENV: os.environ.get(POLL_SECONDS_ENV, "5")}
        proc = subprocess.Popen([_bin("dagster-daemon"), "run", "-m", DEFINITIONS_MODULE], stdout=log,
                                stderr=subprocess.STDOUT, env=env)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def _launch(job: str, run_config: dict) -> str:
    """Submit ``job`` through the instance's run coordinator, as the UI's Launch button does; returns the run id."""
    run_id = str(uuid.uuid4())
    subprocess.run([_bin("dagster"), "job", "launch", "-m", DEFINITIONS_MODULE, "-j", job, "--run-id", run_id,
                    "--config-json", json.dumps(run_config)], check=True, capture_output=True, text=True)
    return run_id


def _poll(check, timeout: float, failure: str):
    """``check()``'s first non-None value. The runs live in the daemon's processes and the instance API has no
    blocking wait, so this polls the instance's storage every POLL_SECONDS up to ``timeout``."""
    deadline = time.monotonic() + timeout
    while (found := check()) is None:
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{failure} within {timeout:.0f} s")
        time.sleep(POLL_SECONDS)
    return found


def _wait_for_run(instance, run_id: str, timeout: float, log_path: Path):
    import dagster as dg

    def finished():
        run = instance.get_run_by_id(run_id)
        return run if run is not None and run.is_finished else None

    run = _poll(finished, timeout, f"run {run_id} did not finish (see {log_path})")
    if run.status != dg.DagsterRunStatus.SUCCESS:
        raise RuntimeError(f"run {run_id} of {run.job_name} ended {run.status.value}; see the Dagster UI or {log_path}")
    return run


def _wait_for_sensor_runs(instance, sha: str, timeout: float, log_path: Path) -> list[str]:
    """Waits for the sensor's run of the file with content ``sha`` (its run key) and for that run to finish."""
    import dagster as dg

    runs = _poll(lambda: instance.get_runs(filters=dg.RunsFilter(tags={"dagster/run_key": sha})) or None, timeout,
                 f"incoming_files_sensor launched no run (see {log_path})")
    for run in runs:
        _wait_for_run(instance, run.run_id, timeout, log_path)
    return [run.run_id for run in runs]


def _wait_until_idle(instance, timeout: float) -> None:
    """Lets runs requested by other sensors (e.g. the champion refresh after a promotion) finish before the daemon
    that launched them stops."""
    import dagster as dg

    active = [dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING,
              dg.DagsterRunStatus.STARTED]
    _poll(lambda: None if instance.get_runs(filters=dg.RunsFilter(statuses=active), limit=1) else True, timeout,
          "runs were still active")


def _latest_metadata(instance, asset: str) -> dict:
    import dagster as dg

    event = instance.get_latest_materialization_event(dg.AssetKey(asset))
    if event is None or event.asset_materialization is None:
        return {}
    return {k: v.value for k, v in event.asset_materialization.metadata.items()
            if isinstance(v.value, int | float | str | bool) and len(str(v.value)) < 200}


def _print_summary(summary: dict, home: Path) -> None:
    bt, tune, gate, champ = (summary[k] for k in ("champion_backtest", "fast_tuning_campaign",
                                                  "promotion_decision", "champion_config"))
    from usp_core.tuning.tracking import default_tracking_uri

    uri = default_tracking_uri()
    lines = [
        "",
        f"USP demo finished in {summary['seconds']} s",
        f"  champion backtest   config {bt.get('config_version')}: objective {bt.get('objective')} (lower is better), "
        f"CRPS skill vs naive {bt.get('crps_skill_vs_naive')}, 95 % coverage {bt.get('coverage_of_95pct_interval')} "
        "(tuning folds)",
        f"  fast tuning         {tune.get('trials_complete')} trials, best objective {tune.get('best_value')}, "
        f"base config {tune.get('base_config_value')} (tuning folds)"
        f"  (MLflow: {tune.get('mlflow_run', 'n/a')})",
        f"  promotion gate      {gate.get('reason')}",
        f"  champion config     {champ.get('config_version')} (promoted: {champ.get('promoted')}"
        f"{', ' + champ['reason'] if champ.get('reason') else ''})",
        f"  Dagster runs        daily_pipeline {summary['daily_run']}, inference_job {', '.join(summary['inference_runs'])}",
        f"  observation store   {summary['observations_rows']} rows (`usp ingest FILE|DIR` adds yours)",
        f"  predictions         {summary['predictions_rows']} rows in {summary['duckdb']} "
        f"({summary['quarantine_rows']} quarantined rows, {len(summary['inference_runs'])} inference run(s) "
        "launched by incoming_files_sensor)",
        "",
        "Open the Dagster UI (assets, lineage, runs, metadata):",
        f"  DAGSTER_HOME={home} .venv/bin/dagster dev -m usp_pipeline.definitions   # or: dg dev",
        "Open the MLflow UI (tuning campaigns side by side, the config registry):",
        f"  .venv/bin/mlflow ui --backend-store-uri {uri} --port 5000",
        "Query the predictions:",
        f"  .venv/bin/python -c \"import duckdb; print(duckdb.connect('{summary['duckdb']}', read_only=True)"
        ".sql('select series_id, origin_ts, target_ts, prediction, lower, upper, realised, covered, mode_name "
        "from scored_predictions order by origin_ts desc limit 5'))\"",
    ]
    print("\n".join(lines), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m usp_pipeline.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--series", type=int, default=DEMO_SERIES)
    parser.add_argument("--length", type=int, default=DEMO_LENGTH)
    parser.add_argument("--trials", type=int, default=DEMO_TRIALS)
    args = parser.parse_args(argv)
    run_demo(args.series, args.length, args.trials)
    return 0


if __name__ == "__main__":
    sys.exit(main())
