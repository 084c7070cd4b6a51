"""The observation store as the system of record (SPEC §4.4, §7): ingest, catch-up, rebuild after a config
switch, cold start from a corrupt state, the lock wait."""

import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

from tests.core.inference.conftest import observations, online_predictions
from usp_core.backtest.metrics import gaussian_crps
from usp_core.inference import PredictionStore, StoreBusyError, ingest_file, observation_files, run_inference


def _csv(df: pd.DataFrame, path):
    df.to_csv(path, index=False)
    return path


def test_ingest_quarantines_bad_rows_keeps_good_ones_and_replay_adds_nothing(tmp_path):
    df = observations({"a": 10, "b": 5})
    df.loc[3, "value"] = "abc"
    df = pd.concat([df, pd.DataFrame({"series_id": ["a"], "ts": ["2023-12-31T00:00:00Z"], "value": [1.0]})],
                   ignore_index=True)  # older than a's rows: out of order in input order
    store = PredictionStore(tmp_path / "usp.duckdb")
    r = ingest_file(_csv(df, tmp_path / "obs.csv"), store)
    assert (r.rows, r.appended, r.quarantined) == (16, 14, 2)
    assert r.quarantine_reasons == {"non_numeric": 1, "out_of_order": 1}
    again = ingest_file(tmp_path / "obs.csv", store)
    assert (again.appended, again.skipped, again.quarantined) == (0, 14, 2)
    assert store.count("observations") == 14 and store.count("quarantine") == 2  # same rows, same keys
    panel = store.load_observations(max_length=3)
    assert panel.groupby("series_id").size().to_dict() == {"a": 3, "b": 3}
    assert str(panel["ts"].dt.tz) == "UTC" and panel.groupby("series_id")["ts"].is_monotonic_increasing.all()


def test_ingest_reads_csv_and_parquet_from_a_directory(tmp_path):
    df = observations({"a": 6}, seed=1)
    (tmp_path / "in").mkdir()
    df.iloc[:3].to_csv(tmp_path / "in" / "1.csv", index=False)
    later = df.iloc[3:].assign(ts=pd.to_datetime(df["ts"].iloc[3:], utc=True), value=df["value"].iloc[3:].astype(float))
    later.to_parquet(tmp_path / "in" / "2.parquet", index=False)
    (tmp_path / "in" / "notes.txt").write_text("not observations")
    store = PredictionStore(tmp_path / "usp.duckdb")
    files = observation_files([tmp_path / "in"])
    assert [f.name for f in files] == ["1.csv", "2.parquet"]
    assert sum(ingest_file(f, store).appended for f in files) == 6
    with pytest.raises(FileNotFoundError, match="does not exist"):
        observation_files([tmp_path / "missing.csv"])


@pytest.mark.slow
def test_inference_catches_up_with_ingested_observations(tmp_path, small_cfg):
    m = 64
    full = observations({"a": m + 12}, seed=5)
    store = PredictionStore(tmp_path / "usp.duckdb")
    run_inference(_csv(full.iloc[: m + 2], tmp_path / "1.csv"), small_cfg, store)
    ingest_file(_csv(full.iloc[m + 2: m + 8], tmp_path / "2.csv"), store)  # stored, not predicted
    r = run_inference(_csv(full.iloc[m + 8:], tmp_path / "3.csv"), small_cfg, store)
    assert r.caught_up == 6 and r.predictions_written == 10

    preds = store.table("predictions").sort_values("ts")
    expected, _ = online_predictions(small_cfg, full)
    np.testing.assert_allclose(preds["prediction"].to_numpy(), expected, rtol=1e-9)

    # what a user reads: each forecast with the time it is for and, once stored, the value that came
    scored = store.table("scored_predictions").sort_values("origin_ts")
    values = full["value"].astype(float).to_numpy()
    np.testing.assert_array_equal(scored["realised"].to_numpy()[:-1], values[m:])
    assert np.isnan(scored["realised"].iloc[-1]) and pd.isna(scored["target_ts"].iloc[-1])  # not yet observed
    assert (scored["target_ts"].iloc[:-1].to_numpy() > scored["origin_ts"].iloc[:-1].to_numpy()).all()
    lived = scored.iloc[:-1]
    assert (lived["covered"] == ((lived["realised"] >= lived["lower"]) & (lived["realised"] <= lived["upper"]))).all()
    assert set(scored["mode_name"]) <= {"inference", "degraded", "emergency"}
    assert all(len(e) == len(w) for e, w in zip(scored["experts"], scored["weights"], strict=True))
    np.testing.assert_allclose(lived["naive_error"].to_numpy(), values[m:] - values[m - 1:-1])

    live = store.live_accuracy()
    assert list(live["series_id"]) == ["a"] and int(live["scored"].iloc[0]) == len(lived)
    np.testing.assert_allclose(live["mae"], np.abs(lived["error"]).mean())
    np.testing.assert_allclose(live["relative_mae"], np.abs(lived["error"]).mean() / np.abs(lived["naive_error"]).mean())
    np.testing.assert_allclose(live["coverage"], lived["covered"].mean())
    np.testing.assert_allclose(lived["crps"], gaussian_crps(lived["realised"], lived["prediction"], lived["sigma"]),
                               rtol=1e-5, atol=1e-9)  # the view's erf approximation: |error| < 1.5e-7
    np.testing.assert_allclose(live["crps"], lived["crps"].mean())


@pytest.mark.slow
def test_config_switch_and_rollback_lose_no_observation(tmp_path, small_cfg):
    """A -> B -> A: every row gets a prediction under the config that was champion when it arrived, and A's
    state, back in charge, steps through the rows stored while B was champion."""
    m = 64
    cfg_a, cfg_b = small_cfg, small_cfg.replace({"orchestration.cusum_k": 0.7})
    full = observations({"a": m + 30, "b": m + 30}, seed=7)
    parts = [full[full.groupby("series_id").cumcount().between(lo, hi - 1)] for lo, hi in
             ((0, m + 10), (m + 10, m + 20), (m + 20, m + 30))]
    store = PredictionStore(tmp_path / "usp.duckdb")
    run_inference(_csv(parts[0], tmp_path / "1.csv"), cfg_a, store)
    rb = run_inference(_csv(parts[1], tmp_path / "2.csv"), cfg_b, store)
    assert rb.new_series == 2  # B rebuilt from the stored history
    ra = run_inference(_csv(parts[2], tmp_path / "3.csv"), cfg_a, store)
    assert ra.caught_up == 20 and ra.new_series == 0

    preds = store.table("predictions")
    assert store.count("observations") == 2 * (m + 30)
    a_rows = preds[preds.config_version == cfg_a.version].groupby("series_id").size().to_dict()
    assert a_rows == {"a": 31, "b": 31}  # init forecast + every row after the initial window
    b_rows = preds[preds.config_version == cfg_b.version]
    # B was rebuilt on the stored history (init forecast + 10 stored rows) before its file's 10 rows
    assert b_rows.groupby("series_id").size().to_dict() == {"a": 21, "b": 21}
    states = store.table("predictor_states")
    assert (states.groupby("config_version")["last_ts"].max().nunique()) == 2  # B stopped where A took over


@pytest.mark.slow
def test_corrupt_state_cold_starts_from_history(tmp_path, small_cfg):
    m = 64
    full = observations({"a": m + 10}, seed=9)
    store = PredictionStore(tmp_path / "usp.duckdb")
    run_inference(_csv(full.iloc[: m + 5], tmp_path / "1.csv"), small_cfg, store)
    with store.connect() as con:
        con.execute("UPDATE predictor_states SET state = 'garbage'::BLOB").fetchall()
    messages: list[str] = []
    r = run_inference(_csv(full.iloc[m + 5:], tmp_path / "2.csv"), small_cfg, store, log=messages.append)
    assert list(r.cold_starts) == ["a"] and "SHA-256" in r.cold_starts["a"]
    assert any("rebuilding it from history" in msg for msg in messages)
    assert r.predictions_written == 5  # the file's rows; the rebuilt history's predictions already exist
    stored = store.load_states(small_cfg.version, ["a"])["a"]
    assert stored.last_ts == pd.Timestamp(full["ts"].iloc[-1]).tz_localize(None)


_HOLDER = "import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); print('held', flush=True); time.sleep(float(sys.argv[2]))"


def _hold(path, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(path), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_waits_for_the_lock_then_fails_clearly(tmp_path):
    store = PredictionStore(tmp_path / "usp.duckdb")
    # holds long enough that scheduling delays on a loaded machine cannot let the opener miss the lock
    holder = _hold(store.path, 4)
    try:
        start = time.monotonic()
        assert PredictionStore(store.path, lock_timeout_s=60).count("observations") == 0  # waited, then went through
        assert time.monotonic() - start > 0.5
    finally:
        holder.wait()
    holder = _hold(store.path, 60)
    try:
        with pytest.raises(StoreBusyError, match="held by another process"):
            PredictionStore(store.path, lock_timeout_s=0.5).count("observations")
    finally:
        holder.kill()
        holder.wait()


def test_list_columns_are_typed_from_every_row(tmp_path):
    """Thousands of rows without flags, then one with: DuckDB's pandas scan sampled the first rows, typed the
    column NULL[] and failed on the flagged row (seen on the demo's rebuild of two long series)."""
    from usp_core.inference.store import PREDICTION_COLUMNS

    n = 3000
    frame = pd.DataFrame({
        "series_id": "a", "ts": pd.date_range("2024-01-01", periods=n, freq="h"), "horizon": 1, "config_version": "v",
        "prediction": 0.0, "lower": -1.0, "upper": 1.0, "sigma": 0.5, "mode": np.int32(0), "regime_change": False,
        "degraded": False, "emergency": False, "rejected": False, "flags": [[] for _ in range(n)],
        "weights": [[0.5, 0.5] for _ in range(n)], "dagster_run_id": "r", "created_at": pd.Timestamp("2024-01-01"),
    }).loc[:, list(PREDICTION_COLUMNS)]
    frame.at[n - 1, "flags"] = ["regime_change"]
    store = PredictionStore(tmp_path / "usp.duckdb")
    counts = store.commit_inference(predictions=frame, states=pd.DataFrame(), observations=pd.DataFrame(),
                                    quarantine=pd.DataFrame())
    assert counts.predictions == n
    assert list(store.table("predictions").sort_values("ts")["flags"].iloc[-1]) == ["regime_change"]


@pytest.mark.slow
def test_a_late_file_is_stale_relative_to_the_series_cadence(tmp_path, small_cfg):
    """Wall clock as now: hourly rows delivered within the hour are fresh, the same rows a day later are stale
    (10 hourly intervals by default) and degrade the forecast; a replay is never stale."""
    m = 64
    full = observations({"a": m + 20}, seed=4)
    newest = pd.Timestamp(full["ts"].iloc[m + 9]).value
    runs = {}
    for name, now in (("on_time", newest + 30 * 60 * 10**9), ("late", newest + 24 * 3600 * 10**9), ("replay", None)):
        store = PredictionStore(tmp_path / f"{name}.duckdb")
        ingest_file(_csv(full.iloc[:m], tmp_path / f"{name}_history.csv"), store)
        run_inference(_csv(full.iloc[m: m + 10], tmp_path / f"{name}.csv"), small_cfg, store, now_ns=now)
        preds = store.table("predictions").sort_values("ts")
        runs[name] = preds[preds["ts"] >= pd.Timestamp(full["ts"].iloc[m]).tz_localize(None)]
    assert not any("stale" in f for f in runs["on_time"]["flags"]) and not runs["replay"]["degraded"].any()
    late = runs["late"]
    assert all("stale" in f for f in late["flags"]) and late["degraded"].all() and (late["mode"] == 1).all()
