"""dg.materialize of the daily pipeline and the inference job on an ephemeral instance (small data)."""

import dagster as dg
import pandas as pd
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


def _observations(n: int, start: int, seed: int):
    import numpy as np
    import pandas as pd

    from usp_core.data import synthetic

    series = {"plant_a": synthetic.ar_process(n, [0.6], seed=seed) + 20.0,
              "plant_b": synthetic.brownian_motion(n, seed=seed + 1) + 50.0}
    ts = pd.date_range("2025-01-01", periods=n, freq="h", tz="UTC")
    frame = pd.concat([pd.DataFrame({"series_id": sid, "ts": ts, "value": np.asarray(v)}) for sid, v in series.items()])
    return frame[frame["ts"] >= ts[start]].reset_index(drop=True)


def test_closed_loop_on_the_users_series(pipeline_home):
    """SPEC §7: two series that are not bundled are ingested, the daily pipeline backtests and tunes on them
    (the campaign's study carries their data fingerprint) and promotes, then the sensor's inference job predicts
    every row of a new file of those series with the champion's version; replaying the file adds nothing."""
    from usp_core.inference import PredictionStore, ingest_frame
    from usp_core.tuning.campaign import data_fingerprint

    resources = {**default_resources(), "workload": WorkloadResource(max_length=160, fast_trials=2,
                                                                      incoming_dir=str(pipeline_home / "incoming"))}
    store = PredictionStore(resources["duckdb"].database_path())
    history = _observations(220, 0, seed=11)
    newest = history.groupby("series_id").cumcount(ascending=False) < 20
    assert ingest_frame(history[~newest], store, source="test").appended == 400

    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize([*ASSETS, validated_observations_schema], selection=dg.AssetSelection.assets(*DAILY_ASSETS),
                            resources=resources, instance=instance)
    assert result.success
    checks = result.get_asset_check_evaluations()
    assert [c.passed for c in checks] == [True]
    raw = _metadata(result, "raw_observations")
    assert raw["series"] == 2 and raw["dagster/row_count"] == 320
    assert _metadata(result, "validated_observations")["dagster/row_count"] == 320
    panel = store.load_observations(max_length=160)
    backtest = _metadata(result, "champion_backtest")
    assert "![" in backtest["fan_chart_plot"] and "data:image/png;base64," in backtest["weights_plot"]
    # the PNGs shown in Dagster are the files logged to the MLflow backtest run
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=resources["mlflow"].uri())
    run_id = backtest["mlflow_run"].split("/runs/")[1].split("?")[0]
    logged = {a.path for a in client.list_artifacts(run_id, "plots")}
    assert logged == {"plots/fan_chart.png", "plots/weights.png", "plots/skill.png"}
    assert client.get_run(run_id).data.tags["usp.dagster_run_id"] == result.run_id
    assert client.get_run(run_id).data.metrics["crps_skill"] == pytest.approx(backtest["crps_skill_vs_naive"], abs=5e-4)

    tuned = _metadata(result, "fast_tuning_campaign")
    assert tuned["trials_complete"] == 2 and "best_value" in tuned
    assert tuned["study"].endswith(f"{data_fingerprint(panel)}-fast")
    decision = _metadata(result, "promotion_decision")
    assert decision["decision"] in {"promote", "keep champion"} and 0.0 <= decision["p_value"] <= 1.0
    champion = _metadata(result, "champion_config")
    assert champion["promoted"] == (decision["decision"] == "promote")
    assert (pipeline_home / "dagster_home" / "optuna" / "journal.log").exists()
    assert (pipeline_home / "dagster_home" / "mlflow" / "mlflow.db").exists()

    from usp_pipeline.defs.inference.sensors import incoming_files_sensor

    incoming = pipeline_home / "incoming"
    incoming.mkdir()
    new_rows = history[newest].assign(ts=lambda d: d["ts"].dt.strftime("%Y-%m-%dT%H:%M:%SZ"))
    bad = pd.DataFrame({"series_id": ["plant_a", ""], "ts": ["2100-01-01T00:00:00Z"] * 2, "value": ["nan?", "1"]})
    pd.concat([new_rows, bad]).to_csv(incoming / "batch.csv", index=False)
    tick = incoming_files_sensor(dg.build_sensor_context(resources={"workload": resources["workload"]}))
    assert len(tick.run_requests) == 1
    inference = dg.materialize(ASSETS, selection=["predictions"], resources=resources, instance=instance,
                               run_config=tick.run_requests[0].run_config)
    meta = _metadata(inference, "predictions")
    assert meta["quarantined_rows"] == 2 and meta["config_version"] == champion["config_version"]
    assert "relative_mae" in meta["live_accuracy"] and meta["live_relative_mae"] > 0
    preds = store.table("predictions")
    preds = preds[preds["config_version"] == champion["config_version"]]
    keys = set(zip(preds["series_id"], preds["ts"], strict=True))
    wanted = set(zip(new_rows["series_id"], pd.to_datetime(new_rows["ts"]).dt.tz_localize(None), strict=True))
    assert wanted <= keys  # every row of the file, none skipped
    assert store.count("observations") == 440

    counts = {t: store.count(t) for t in ("predictions", "observations", "quarantine")}
    again = dg.materialize(ASSETS, selection=["predictions"], resources=resources, instance=instance,
                           run_config=tick.run_requests[0].run_config)
    assert _metadata(again, "predictions")["predictions_written"] == 0
    assert {t: store.count(t) for t in counts} == counts

    # A -> B -> A: a config change, a file under B, a rollback, a file under A again; no observation is skipped
    from usp_core.config.mutation import atomic_write_config, rollback

    config_path = resources["config_store"].path()
    version_a = champion["config_version"]
    assert atomic_write_config(config_path, {"orchestration.cusum_k": 0.55}, "manual").applied
    more = _observations(260, 220, seed=11)
    early = more.groupby("series_id").cumcount() < 20
    for name, part, expected_version in (("b.csv", more[early], None), ("a_again.csv", more[~early], version_a)):
        if expected_version is not None:
            rollback(config_path)
        part.assign(ts=part["ts"].dt.strftime("%Y-%m-%dT%H:%M:%SZ")).to_csv(incoming / name, index=False)
        config = {"path": str(incoming / name)}
        run = dg.materialize(ASSETS, selection=["predictions"], resources=resources, instance=instance,
                             run_config={"ops": {"predictions": {"config": config}}})
        meta = _metadata(run, "predictions")
        assert expected_version is None or meta["config_version"] == expected_version
    preds = store.table("predictions")
    a_keys = set(zip(*(preds.loc[preds["config_version"] == version_a, c] for c in ("series_id", "ts")), strict=True))
    stored = store.table("observations")
    after = stored[stored["ts"] > pd.Timestamp(history["ts"].max()).tz_localize(None) - pd.Timedelta(hours=20)]
    assert set(zip(after["series_id"], after["ts"], strict=True)) <= a_keys  # A caught up with B's rows
    assert store.count("observations") == 440 + 80
