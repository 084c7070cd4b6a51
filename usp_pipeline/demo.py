"""``usp demo`` / ``make demo``: the daily pipeline, a file drop, the sensor and the inference job, end to end.

Runs against the Dagster instance at ``$DAGSTER_HOME`` (default ``<repo>/dagster_home``) so that the runs,
the asset lineage and their metadata are what ``dagster dev`` then shows. Sizes are the demo's own (a few
series, a few trials), passed as resource config; the defaults of the pipeline are untouched.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

DEMO_SERIES = 2
DEMO_LENGTH = 240
DEMO_TRIALS = 3
INCOMING_ROWS = 80


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


def run_demo(series: int = DEMO_SERIES, length: int = DEMO_LENGTH, trials: int = DEMO_TRIALS) -> dict:
    import dagster as dg

    from usp_core.paths import dagster_home
    from usp_pipeline.definitions import defs
    from usp_pipeline.defs.common.resources import WorkloadResource

    os.environ.setdefault("DAGSTER_HOME", str(Path("dagster_home").absolute()))
    home = dagster_home()
    home.mkdir(parents=True, exist_ok=True)
    instance = dg.DagsterInstance.get()
    incoming = Path("data/incoming").absolute()
    run_config = {"resources": _resources_config(series, length, trials, incoming)}
    started = time.monotonic()

    from usp_core.inference import PredictionStore

    store = PredictionStore(defs.resources["duckdb"].database_path())
    print(f"[0/3] ingesting {series} bundled series into the observation store {store.path} ...", flush=True)
    appended = seed_store(store, series)
    print(f"      {appended} observations appended ({'first run' if appended else 'already stored'})", flush=True)
    print(f"[1/3] daily_pipeline on the store's {series} series x newest {length} points, {trials} fast trials ...",
          flush=True)
    daily = defs.resolve_job_def("daily_pipeline").execute_in_process(instance=instance, run_config=run_config)
    values = {name: _materialized_metadata(daily, name) for name in
              ("champion_backtest", "fast_tuning_campaign", "promotion_decision", "champion_config")}

    print("[2/3] dropping a sample file into data/incoming/ and evaluating incoming_files_sensor ...", flush=True)
    sample = write_sample_file(incoming, series)
    sensor = defs.resolve_sensor_def("incoming_files_sensor")
    ctx = dg.build_sensor_context(instance=instance,
                                  resources={"workload": WorkloadResource(incoming_dir=str(incoming))})
    tick = sensor.evaluate_tick(ctx)
    inference_job = defs.resolve_job_def("inference_job")
    launched = 0
    for request in tick.run_requests:
        if instance.get_runs(filters=dg.RunsFilter(tags={"dagster/run_key": request.run_key}), limit=1):
            continue  # the daemon would skip a run_key it has already launched
        inference_job.execute_in_process(instance=instance, run_config=request.run_config,
                                         tags={**request.tags, "dagster/run_key": request.run_key})
        launched += 1

    print("[3/3] summary", flush=True)
    summary = {
        "seconds": round(time.monotonic() - started, 1),
        **values,
        "sample_file": str(sample),
        "inference_runs": launched,
        "observations_rows": store.count("observations"),
        "predictions_rows": store.count("predictions"),
        "quarantine_rows": store.count("quarantine"),
        "duckdb": str(store.path),
    }
    _print_summary(summary, home)
    return summary


def _materialized_metadata(result, asset: str) -> dict:
    import dagster as dg

    for event in result.get_asset_materialization_events():
        if event.asset_key == dg.AssetKey(asset):
            return {k: v.value for k, v in event.materialization.metadata.items()
                    if isinstance(v.value, int | float | str | bool) and len(str(v.value)) < 200}
    return {}


def _print_summary(summary: dict, home: Path) -> None:
    bt, tune, gate, champ = (summary[k] for k in ("champion_backtest", "fast_tuning_campaign",
                                                  "promotion_decision", "champion_config"))
    from usp_core.tuning.tracking import default_tracking_uri

    uri = default_tracking_uri()
    lines = [
        "",
        f"USP demo finished in {summary['seconds']} s",
        f"  champion backtest   config {bt.get('config_version')}: objective {bt.get('objective')}, "
        f"coverage {bt.get('coverage')}",
        f"  fast tuning         {tune.get('trials_complete')} trials, best value {tune.get('best_value')}"
        f"  (MLflow: {tune.get('mlflow_run', 'n/a')})",
        f"  promotion gate      {gate.get('reason')}",
        f"  champion config     {champ.get('config_version')} (promoted: {champ.get('promoted')})",
        f"  observation store   {summary['observations_rows']} rows (`usp ingest FILE|DIR` adds yours)",
        f"  predictions         {summary['predictions_rows']} rows in {summary['duckdb']} "
        f"({summary['quarantine_rows']} quarantined rows, {summary['inference_runs']} inference run(s))",
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
