from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from usp_core.data.schema import (
    OBSERVATION_SCHEMA,
    ObservationError,
    panel_from_observations,
    read_observations_csv,
    validate_observations,
)


def _frame(n: int = 5, series: str = "a", start: str = "2024-01-01") -> pd.DataFrame:
    ts = pd.date_range(start, periods=n, freq="D", tz="UTC")
    return pd.DataFrame({"series_id": series, "ts": ts, "value": np.arange(n, dtype=float)})


def _reasons(df, min_history=0, **kwargs):
    clean, quarantine = validate_observations(df, min_history, **kwargs)
    assert len(clean) + len(quarantine) == len(df)  # nothing silently dropped
    return clean, dict(zip(quarantine["row"], quarantine["reason"], strict=True))


def test_clean_frame_passes_and_is_sorted():
    df = pd.concat([_frame(4, "b"), _frame(3, "a")], ignore_index=True)
    clean, reasons = _reasons(df)
    assert reasons == {}
    assert clean["series_id"].tolist() == ["a"] * 3 + ["b"] * 4
    assert str(clean["ts"].dtype) == "datetime64[ns, UTC]" and clean["value"].dtype == np.float64
    OBSERVATION_SCHEMA.validate(clean)


@pytest.mark.parametrize(
    "row, field, bad, reason",
    [
        (2, "value", None, "null"),
        (2, "ts", None, "null"),
        (2, "series_id", None, "null"),
        (2, "series_id", "  ", "empty_series_id"),
        (2, "value", "abc", "non_numeric"),
        (2, "value", np.inf, "non_finite"),
        (2, "value", "nan", "non_numeric"),
        (2, "value", 1e300, "too_large"),
        (2, "ts", "not a date", "bad_timestamp"),
    ],
)
def test_row_level_failure_reasons(row, field, bad, reason):
    df = _frame(6).astype({"value": object, "ts": object})
    df.loc[row, field] = bad
    clean, reasons = _reasons(df)
    assert reasons == {row: reason}
    assert len(clean) == 5


def test_duplicate_keeps_first_and_quarantines_repeat():
    df = _frame(5)
    df = pd.concat([df, df.iloc[[1]].assign(value=99.0)], ignore_index=True)
    clean, reasons = _reasons(df)
    assert reasons == {5: "duplicate"}
    assert 99.0 not in clean["value"].tolist()


@pytest.mark.parametrize("bad", ["abc", None, "inf"])
@pytest.mark.parametrize("invalid_first", [True, False])
def test_invalid_row_does_not_make_a_valid_one_duplicate(bad, invalid_first):
    t = pd.Timestamp("2024-01-01", tz="UTC")
    rows = [("a", t, bad), ("a", t, "1.0")]
    if not invalid_first:
        rows.reverse()
    df = pd.DataFrame(rows, columns=["series_id", "ts", "value"])
    clean, reasons = _reasons(df)
    assert clean["value"].tolist() == [1.0]
    invalid_row = 0 if invalid_first else 1
    assert list(reasons) == [invalid_row] and reasons[invalid_row] != "duplicate"


def test_two_valid_rows_with_same_key_still_duplicate_after_an_invalid_one():
    t = pd.Timestamp("2024-01-01", tz="UTC")
    df = pd.DataFrame([("a", t, "abc"), ("a", t, "1.0"), ("a", t, "2.0")], columns=["series_id", "ts", "value"])
    clean, reasons = _reasons(df)
    assert reasons == {0: "non_numeric", 2: "duplicate"} and clean["value"].tolist() == [1.0]


def test_out_of_order_timestamp():
    df = _frame(5)
    late = pd.DataFrame({"series_id": ["a"], "ts": [pd.Timestamp("2023-12-31", tz="UTC")], "value": [7.0]})
    df = pd.concat([df, late], ignore_index=True)
    _, reasons = _reasons(df)
    assert reasons == {5: "out_of_order"}


def test_short_series_and_unknown_series():
    df = pd.concat([_frame(6, "long"), _frame(2, "short")], ignore_index=True)
    _, reasons = _reasons(df, min_history=5)
    assert reasons == {6: "short_series", 7: "short_series"}
    _, reasons = _reasons(df, known_series={"long"})
    assert reasons == {6: "unknown_series", 7: "unknown_series"}


def test_last_ts_makes_stale_rows_duplicate_or_out_of_order_and_exempts_history():
    df = _frame(3, "a", start="2024-01-05")
    stored = {"a": pd.Timestamp("2024-01-06", tz="UTC")}
    _, reasons = _reasons(df, min_history=10, last_ts=stored)
    assert reasons == {0: "out_of_order", 1: "duplicate"}


def test_missing_columns_raise():
    with pytest.raises(ObservationError, match="missing \\['value'\\]"):
        validate_observations(pd.DataFrame({"series_id": ["a"], "ts": ["2024-01-01"]}))


def test_csv_reader_handles_strings_empty_and_wrong_columns(tmp_path):
    good = tmp_path / "obs.csv"
    good.write_text("series_id,ts,value\na,2024-01-01,1.5\na,2024-01-02,oops\na,2024-01-03,inf\n")
    clean, reasons = _reasons(read_observations_csv(good))
    assert reasons == {1: "non_numeric", 2: "non_finite"} and clean["value"].tolist() == [1.5]
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(ObservationError, match="empty"):
        read_observations_csv(empty)
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("id,time,val\na,2024-01-01,1\n")
    with pytest.raises(ObservationError, match="missing"):
        read_observations_csv(wrong)
    with pytest.raises(ObservationError, match="does not exist"):
        read_observations_csv(tmp_path / "nope.csv")


def test_panel_pads_unequal_series_with_nan():
    df = pd.concat([_frame(4, "a"), _frame(2, "b")], ignore_index=True)
    clean, _ = validate_observations(df)
    ids, values, stamps = panel_from_observations(clean)
    assert ids == ["a", "b"]
    assert np.isnan(values[1, 2:]).all() and values[0].tolist() == [0, 1, 2, 3]
    assert (np.diff(stamps, axis=1) > 0).all()
