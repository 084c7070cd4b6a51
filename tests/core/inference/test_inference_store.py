"""Inference into DuckDB: idempotent replays, quarantine with reasons, atomic predictions + states (SPEC §7, §10)."""

import numpy as np
import pandas as pd
import pytest

from tests.core.inference.conftest import observations, online_predictions
from usp_core.inference import PredictionStore, decode_state, run_inference
from usp_core.inference import store as store_mod
from usp_core.kernels import EXPERT_NAMES

pytestmark = pytest.mark.slow  # first call compiles init_batch/step_batch


def test_bad_rows_quarantined_good_rows_predicted_and_replay_adds_nothing(tmp_path, small_cfg):
    m = 64
    df = observations({"a": m + 6, "b": m + 3, "short": 5})
    df.loc[2, "value"] = "abc"  # non_numeric, in a's init window
    df.loc[m + 2, "value"] = "inf"  # non_finite in a's stepped rows
    dup = df.iloc[[m + 4]]  # duplicate (series_id, ts) of a
    df = pd.concat([df, dup], ignore_index=True)
    f = tmp_path / "batch.csv"
    df.to_csv(f, index=False)
    store = PredictionStore(tmp_path / "usp.duckdb")

    r = run_inference(f, small_cfg, store, run_id="run-1")
    assert r.rows == len(df)
    assert r.quarantine_reasons == {"non_numeric": 1, "non_finite": 1, "duplicate": 1, "insufficient_history": 5}
    q = store.table("quarantine")
    assert len(q) == 8 and set(q.loc[q.reason == "insufficient_history", "series_id"]) == {"short"}
    preds = store.table("predictions")
    # a: m + 6 rows, 2 bad -> 64 init + 4 stepped (+1 init forecast); b: 64 init + 3 stepped (+1)
    assert preds.groupby("series_id").size().to_dict() == {"a": 5, "b": 4}
    assert (preds.config_version == small_cfg.version).all() and (preds.dagster_run_id == "run-1").all()
    assert np.isfinite(preds[["prediction", "lower", "upper", "sigma"]].to_numpy()).all()
    assert (preds.lower <= preds.prediction).all() and (preds.prediction <= preds.upper).all()
    assert all(len(w) == len(EXPERT_NAMES) and abs(sum(w) - 1) < 1e-9 for w in preds.weights)
    states = store.table("predictor_states").set_index("series_id")
    assert set(states.index) == {"a", "b"}
    assert pd.Timestamp(states.loc["b", "last_ts"]) == pd.Timestamp("2024-01-01") + pd.Timedelta(hours=m + 2)

    counts = {t: store.count(t) for t in ("predictions", "predictor_states", "observations", "quarantine")}
    again = run_inference(f, small_cfg, store, run_id="run-2")
    assert again.predictions_written == 0
    assert {t: store.count(t) for t in counts} == counts


def test_continuation_steps_from_the_stored_state(tmp_path, small_cfg):
    m = 64
    full = observations({"a": m + 8}, seed=3)
    first, second = tmp_path / "1.csv", tmp_path / "2.csv"
    full.iloc[: m + 3].to_csv(first, index=False)
    full.iloc[m + 3:].to_csv(second, index=False)
    store = PredictionStore(tmp_path / "usp.duckdb")
    run_inference(first, small_cfg, store)
    r = run_inference(second, small_cfg, store)
    assert r.predictions_written == 5 and r.new_series == 0
    preds = store.table("predictions").sort_values("ts")

    # the same numbers as one uninterrupted online run, to the float32 DGM's rounding: the stored-state run is the
    # batched program, the online run the single-series one, and the DGM's float32 sums follow the batch shape
    # (usp_core/kernels/dgm.py; 2.6e-8 relative here). A state lost or restored wrongly moves them by the data's noise.
    expected, state = online_predictions(small_cfg, full)
    np.testing.assert_allclose(preds["prediction"].to_numpy(), expected, rtol=1e-7)
    stored = store.load_states(small_cfg.version, ["a"])["a"]
    restored = decode_state(stored.state, stored.state_sha256, state)
    np.testing.assert_array_equal(np.asarray(restored.window), np.asarray(state.window))


def test_crash_between_predictions_and_states_writes_neither(tmp_path, small_cfg, monkeypatch):
    df = observations({"a": 70})
    f = tmp_path / "batch.csv"
    df.to_csv(f, index=False)
    store = PredictionStore(tmp_path / "usp.duckdb")

    def crash(con, states):
        raise OSError("injected crash after the predictions insert")

    monkeypatch.setattr(store_mod, "_upsert_states", crash)
    with pytest.raises(OSError, match="injected"):
        run_inference(f, small_cfg, store)
    assert {t: store.count(t) for t in ("predictions", "predictor_states", "observations", "quarantine")} == {
        "predictions": 0, "predictor_states": 0, "observations": 0, "quarantine": 0}

    monkeypatch.undo()
    r = run_inference(f, small_cfg, store)  # the rerun completes exactly once
    assert r.predictions_written == 7 and store.count("predictor_states") == 1


def test_wrong_columns_is_a_clear_error_and_stores_nothing(tmp_path, small_cfg):
    from usp_core.data.schema import ObservationError

    f = tmp_path / "bad.csv"
    f.write_text("id,time,val\na,2024-01-01,1\n")
    store = PredictionStore(tmp_path / "usp.duckdb")
    with pytest.raises(ObservationError, match="series_id"):
        run_inference(f, small_cfg, store)
    assert store.count("quarantine") == 0


def test_chunks_fall_in_four_length_classes():
    from usp_core.inference.runner import MAX_CHUNK, chunk_length

    assert [chunk_length(n) for n in (1, 2, 8, 9, 64, 65, 256, 1000)] == [1, 8, 8, 64, 64, MAX_CHUNK, MAX_CHUNK, MAX_CHUNK]
