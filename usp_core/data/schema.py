"""Observation schema and quarantine (SPEC §4.4, §10).

``validate_observations`` never drops a row silently: every input row ends up either in the clean frame or in
the quarantine frame with a reason. Reasons, in the order they are checked: ``null``, ``empty_series_id``,
``non_numeric``, ``non_finite``, ``too_large``, ``bad_timestamp``, ``unknown_series``, ``duplicate`` (same
(series_id, ts) as an earlier row that passed the checks above), ``out_of_order`` (ts earlier than one already
accepted for the series, in input order), ``short_series`` (fewer than ``min_history`` clean rows).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import pandera.pandas as pa

COLUMNS = ("series_id", "ts", "value")
REASONS = (
    "null",
    "empty_series_id",
    "non_numeric",
    "non_finite",
    "too_large",
    "bad_timestamp",
    "unknown_series",
    "duplicate",
    "out_of_order",
    "short_series",
)


class ObservationError(ValueError):
    """The input cannot be read as observations at all (missing columns, empty or unreadable file)."""


def _strictly_increasing_per_series(df: pd.DataFrame) -> bool:
    return all(s.is_monotonic_increasing and s.is_unique for _, s in df.groupby("series_id", sort=False)["ts"])


OBSERVATION_SCHEMA = pa.DataFrameSchema(
    {
        "series_id": pa.Column(str, pa.Check.str_length(min_value=1), nullable=False),
        "ts": pa.Column(pd.DatetimeTZDtype("ns", "UTC"), nullable=False),
        "value": pa.Column("float64", pa.Check(lambda v: np.isfinite(v), element_wise=False, name="finite"), nullable=False),
    },
    checks=[
        pa.Check(lambda df: ~df.duplicated(["series_id", "ts"]), name="unique_series_ts"),
        pa.Check(_strictly_increasing_per_series, name="strictly_increasing_ts"),
    ],
    strict=True,
    ordered=False,
)


def _require_columns(df: pd.DataFrame) -> None:
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ObservationError(f"observations need columns {list(COLUMNS)}; missing {missing}, found {list(df.columns)}")


def _parse_timestamps(raw: pd.Series) -> pd.Series:
    if pd.api.types.is_datetime64_any_dtype(raw):
        ts = raw
    else:
        ts = pd.to_datetime(raw, errors="coerce", utc=True, format="mixed")
    if ts.dt.tz is None:
        ts = ts.dt.tz_localize("UTC")
    return ts.dt.tz_convert("UTC").astype(pd.DatetimeTZDtype("ns", "UTC"))


def _repeated_among_valid(candidates: pd.DataFrame, valid: pd.Series) -> pd.Series:
    """Valid rows whose (series_id, ts) an earlier valid row already has; invalid rows are already quarantined
    for their own reason, so they must not take the key from a later valid row."""
    repeated = candidates[valid].duplicated(["series_id", "ts"])
    return repeated.reindex(candidates.index, fill_value=False)


def validate_observations(
    df: pd.DataFrame,
    min_history: int = 0,
    *,
    known_series: Collection[str] | None = None,
    last_ts: Mapping[str, pd.Timestamp] | None = None,
    max_abs_value: float = 1e15,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split observations into (clean, quarantine).

    clean: columns series_id (str), ts (UTC, ns), value (float64), sorted by (series_id, ts), validated by
    OBSERVATION_SCHEMA. quarantine: the offending input rows as given (values kept as strings), with ``row``
    (position in the input) and ``reason``. ``known_series`` quarantines other ids as ``unknown_series``;
    ``last_ts`` (series_id -> last stored timestamp) makes rows at or before it ``duplicate`` / ``out_of_order``
    and exempts those series from the ``min_history`` check (they already have history).
    """
    _require_columns(df)
    raw = df.loc[:, list(COLUMNS)].reset_index(drop=True)
    reason = pd.Series(pd.NA, index=raw.index, dtype="object")

    def mark(condition, name: str) -> None:
        reason.loc[reason.isna() & np.asarray(condition, dtype=bool)] = name

    mark(raw.isna().any(axis=1), "null")
    series_id = raw["series_id"].astype(str).str.strip()
    mark(series_id == "", "empty_series_id")
    value = pd.to_numeric(raw["value"], errors="coerce").astype("float64")
    mark(value.isna(), "non_numeric")
    mark(~np.isfinite(value.fillna(0.0)), "non_finite")
    mark(np.abs(value.fillna(0.0)) > max_abs_value, "too_large")
    ts = _parse_timestamps(raw["ts"])
    mark(ts.isna(), "bad_timestamp")
    if known_series is not None:
        mark(~series_id.isin(set(known_series)), "unknown_series")

    candidates = pd.DataFrame({"series_id": series_id, "ts": ts, "value": value})
    mark(_repeated_among_valid(candidates, reason.isna()), "duplicate")
    previous = pd.Series(pd.NaT, index=raw.index, dtype=ts.dtype)
    if last_ts:
        stored = series_id.map({k: pd.Timestamp(v).tz_convert("UTC") if pd.Timestamp(v).tzinfo else pd.Timestamp(v, tz="UTC") for k, v in last_ts.items()})
        stored = pd.to_datetime(stored, utc=True)
        mark(reason.isna() & (ts == stored), "duplicate")
        previous = stored.astype(ts.dtype)
    ok = reason.isna()
    # Running maximum of accepted timestamps per series, in input order: a row before it arrived out of order.
    running = candidates["ts"].where(ok).groupby(series_id).cummax()
    earlier_max = running.groupby(series_id).shift(1)
    earlier_max = earlier_max.groupby(series_id).ffill()
    bound = pd.concat([earlier_max.astype(ts.dtype), previous], axis=1).max(axis=1)
    mark(ok & bound.notna() & (ts <= bound), "out_of_order")

    if min_history > 0:
        ok = reason.isna()
        counts = series_id[ok].value_counts()
        exempt = set(last_ts or ())
        short = ok & series_id.map(counts).fillna(0).lt(min_history) & ~series_id.isin(exempt)
        mark(short, "short_series")

    ok = reason.isna()
    clean = candidates[ok].sort_values(["series_id", "ts"], kind="stable").reset_index(drop=True)
    clean = OBSERVATION_SCHEMA.validate(clean)
    quarantine = raw[~ok].astype(str).assign(row=np.flatnonzero(~ok), reason=reason[~ok].astype(str).to_numpy())
    return clean, quarantine.reset_index(drop=True)


def read_observations_csv(path: str | Path) -> pd.DataFrame:
    """Read a CSV of observations as strings (so that bad values reach the quarantine instead of failing the
    parse); raises ObservationError for a missing, empty or column-less file."""
    path = Path(path)
    if not path.is_file():
        raise ObservationError(f"observation file {path} does not exist")
    if path.stat().st_size == 0:
        raise ObservationError(f"observation file {path} is empty")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=True, skipinitialspace=True)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise ObservationError(f"observation file {path} cannot be parsed as CSV: {exc}") from exc
    df.columns = [str(c).strip() for c in df.columns]
    _require_columns(df)
    return df


def panel_from_observations(df: pd.DataFrame) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Clean long observations -> (series ids, values (B, T) padded with NaN at the end, timestamps (B, T) int64
    ns, padding continues each series' last spacing so that timestamps stay strictly increasing)."""
    ids = list(dict.fromkeys(df["series_id"]))
    groups = {k: g for k, g in df.groupby("series_id", sort=False)}
    length = max(len(g) for g in groups.values())
    values = np.full((len(ids), length), np.nan)
    stamps = np.zeros((len(ids), length), dtype=np.int64)
    for b, key in enumerate(ids):
        g = groups[key].sort_values("ts")
        n = len(g)
        values[b, :n] = g["value"].to_numpy(np.float64)
        ns = g["ts"].astype("int64").to_numpy() if g["ts"].dt.tz is None else g["ts"].dt.tz_convert("UTC").astype("int64").to_numpy()
        stamps[b, :n] = ns
        step = int(ns[-1] - ns[-2]) if n > 1 else 1
        stamps[b, n:] = ns[-1] + step * np.arange(1, length - n + 1)
    return ids, values, stamps
