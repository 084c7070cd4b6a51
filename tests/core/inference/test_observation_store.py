"""The observation store as the system of record (SPEC §4.4, §7): ingest, catch-up, rebuild after a config
switch, cold start from a corrupt state, the lock wait."""

import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

from tests.core.inference.conftest import observations
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
    from usp_core.engine.predictor import Predictor

    m = 64
    full = observations({"a": m + 12}, seed=5)
    store = PredictionStore(tmp_path / "usp.duckdb")
    run_inference(_csv(full.iloc[: m + 2], tmp_path / "1.csv"), small_cfg, store)
    ingest_file(_csv(full.iloc[m + 2: m + 8], tmp_path / "2.csv"), store)  # stored, not predicted
    r = run_inference(_csv(full.iloc[m + 8:], tmp_path / "3.csv"), small_cfg, store)
    assert r.caught_up == 6 and r.predictions_written == 10

    preds = store.table("predictions").sort_values("ts")
    p = Predictor(small_cfg)
    values = full["value"].astype(float).to_numpy()
    stamps = pd.to_datetime(full["ts"], utc=True).astype("int64").to_numpy()
    state, out0 = p.init_output(values[:m], timestamp_ns=int(stamps[m - 1]))
    expected = [float(out0.prediction)]
    for v, t in zip(values[m:], stamps[m:], strict=True):
        res, state = p.step(state, v, timestamp_ns=int(t), now_ns=int(t))
        expected.append(float(res.prediction))
    np.testing.assert_allclose(preds["prediction"].to_numpy(), expected, rtol=1e-9)


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
    holder = _hold(store.path, 1.5)
    try:
        start = time.monotonic()
        assert PredictionStore(store.path, lock_timeout_s=30).count("observations") == 0  # waited, then went through
        assert time.monotonic() - start > 0.5
    finally:
        holder.wait()
    holder = _hold(store.path, 5)
    try:
        with pytest.raises(StoreBusyError, match="held by another process"):
            PredictionStore(store.path, lock_timeout_s=0.5).count("observations")
    finally:
        holder.kill()
        holder.wait()
