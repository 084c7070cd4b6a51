"""DuckDB store of observations, predictions, predictor states and quarantined rows (SPEC §4.4, §7, §10).

The ``observations`` table is the system of record: ``usp ingest`` and every inference run append their
validated rows, and backtests, tuning and promotion read it. Predictions and the predictor states that produced
them are written in ONE transaction with their observations, so a crash leaves either all or nothing. Every
insert is ``ON CONFLICT DO NOTHING`` on a natural key: replaying a file adds nothing.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import duckdb
import pandas as pd
import pyarrow as pa

from usp_core.engine.gate import MODE_NAMES
from usp_core.paths import duckdb_path

LOCK_TIMEOUT_S = 60.0

SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS observations (
    series_id VARCHAR NOT NULL,
    ts TIMESTAMP NOT NULL,
    value DOUBLE NOT NULL,
    source_sha256 VARCHAR,
    PRIMARY KEY (series_id, ts)
);
CREATE TABLE IF NOT EXISTS predictions (
    series_id VARCHAR NOT NULL,
    ts TIMESTAMP NOT NULL,
    horizon INTEGER NOT NULL,
    config_version VARCHAR NOT NULL,
    prediction DOUBLE,
    lower DOUBLE,
    upper DOUBLE,
    sigma DOUBLE,
    mode INTEGER,
    regime_change BOOLEAN,
    degraded BOOLEAN,
    emergency BOOLEAN,
    rejected BOOLEAN,
    flags VARCHAR[],
    weights DOUBLE[],
    dagster_run_id VARCHAR,
    created_at TIMESTAMP NOT NULL,
    PRIMARY KEY (series_id, ts, horizon, config_version)
);
CREATE TABLE IF NOT EXISTS predictor_states (
    series_id VARCHAR NOT NULL,
    config_version VARCHAR NOT NULL,
    state BLOB NOT NULL,
    state_sha256 VARCHAR NOT NULL,
    last_ts TIMESTAMP NOT NULL,
    n_steps BIGINT NOT NULL,
    dagster_run_id VARCHAR,
    updated_at TIMESTAMP NOT NULL,
    PRIMARY KEY (series_id, config_version)
);
CREATE TABLE IF NOT EXISTS quarantine (
    source_sha256 VARCHAR NOT NULL,
    row_number BIGINT NOT NULL,
    reason VARCHAR NOT NULL,
    source VARCHAR,
    series_id VARCHAR,
    ts VARCHAR,
    value VARCHAR,
    dagster_run_id VARCHAR,
    created_at TIMESTAMP NOT NULL,
    PRIMARY KEY (source_sha256, row_number, reason)
);
CREATE TABLE IF NOT EXISTS processed_files (
    source_sha256 VARCHAR NOT NULL,
    source VARCHAR,
    config_version VARCHAR NOT NULL,
    rows BIGINT,
    predictions BIGINT,
    quarantined BIGINT,
    dagster_run_id VARCHAR,
    processed_at TIMESTAMP NOT NULL,
    PRIMARY KEY (source_sha256, config_version)
);
"""

def scored_predictions_sql(expert_names: Sequence[str]) -> str:
    """A view of ``predictions`` with what a user reads: the time each forecast is for and its realised value
    (the next stored observation of the series, once it arrives), the error and the naive forecast's (the value
    at the origin), whether the interval covered it, the row's CRPS, the mode by name and the experts the
    weights belong to."""
    modes = " ".join(f"WHEN {i} THEN '{name}'" for i, name in enumerate(MODE_NAMES))
    experts = ", ".join(f"'{name}'" for name in expert_names)
    return f"""
-- DuckDB has no erf: Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7), for the Gaussian CRPS of each row
CREATE OR REPLACE MACRO usp_erf(x) AS sign(x) * (1 - (((((1.061405429 * (1 / (1 + 0.3275911 * abs(x)))
    - 1.453152027) * (1 / (1 + 0.3275911 * abs(x))) + 1.421413741) * (1 / (1 + 0.3275911 * abs(x)))
    - 0.284496736) * (1 / (1 + 0.3275911 * abs(x))) + 0.254829592) * (1 / (1 + 0.3275911 * abs(x))))
    * exp(-x * x));
CREATE OR REPLACE MACRO usp_gaussian_crps(y, mu, sigma) AS sigma * (((y - mu) / sigma) * usp_erf((y - mu) / sigma / sqrt(2))
    + 2 * exp(-0.5 * ((y - mu) / sigma) ^ 2) / sqrt(2 * pi()) - 1 / sqrt(pi()));
CREATE OR REPLACE VIEW scored_predictions AS
SELECT p.series_id, p.ts AS origin_ts, o.ts AS target_ts, p.horizon, p.config_version,
       p.prediction, p.lower, p.upper, p.sigma, o.value AS realised, o.value - p.prediction AS error,
       o.value - origin.value AS naive_error, o.value BETWEEN p.lower AND p.upper AS covered,
       usp_gaussian_crps(o.value, p.prediction, p.sigma) AS crps,
       CASE p.mode {modes} END AS mode_name, p.flags, [{experts}] AS experts, p.weights,
       p.dagster_run_id, p.created_at
FROM predictions p ASOF LEFT JOIN observations o ON p.series_id = o.series_id AND o.ts > p.ts
LEFT JOIN observations origin ON origin.series_id = p.series_id AND origin.ts = p.ts
"""


PREDICTION_COLUMNS = (
    "series_id", "ts", "horizon", "config_version", "prediction", "lower", "upper", "sigma", "mode",
    "regime_change", "degraded", "emergency", "rejected", "flags", "weights", "dagster_run_id", "created_at",
)
STATE_COLUMNS = (
    "series_id", "config_version", "state", "state_sha256", "last_ts", "n_steps", "dagster_run_id", "updated_at",
)
QUARANTINE_COLUMNS = (
    "source_sha256", "row_number", "reason", "source", "series_id", "ts", "value", "dagster_run_id", "created_at",
)


class StoreBusyError(RuntimeError):
    """Another process held the DuckDB file for longer than the lock timeout."""


@dataclass(frozen=True)
class StoredState:
    series_id: str
    state: bytes
    state_sha256: str
    last_ts: pd.Timestamp
    n_steps: int


@dataclass(frozen=True)
class WriteCounts:
    predictions: int
    states: int
    observations: int
    quarantined: int


class PredictionStore:
    """One DuckDB database file; each method opens a short-lived connection. DuckDB lets one process hold the
    file, so a second one waits for it (up to ``lock_timeout_s``, default ``$USP_DUCKDB_LOCK_TIMEOUT`` or 60 s)
    and then fails with :class:`StoreBusyError`, never with a raw lock exception."""

    def __init__(self, path: str | os.PathLike[str] | None = None, *, lock_timeout_s: float | None = None):
        self.path = duckdb_path(path)
        self.lock_timeout_s = float(lock_timeout_s if lock_timeout_s is not None
                                    else os.environ.get("USP_DUCKDB_LOCK_TIMEOUT", LOCK_TIMEOUT_S))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.connect() as con:
            for statement in SCHEMA_SQL.split(";"):
                if statement.strip():
                    con.execute(statement).fetchall()
            from usp_core.kernels import EXPERT_NAMES

            for statement in scored_predictions_sql(EXPERT_NAMES).split(";"):
                if statement.strip():
                    con.execute(statement).fetchall()

    def _open(self, read_only: bool) -> duckdb.DuckDBPyConnection:
        deadline = time.monotonic() + self.lock_timeout_s
        delay = 0.05
        while True:
            try:
                return duckdb.connect(str(self.path), read_only=read_only)
            except duckdb.IOException as exc:
                if "lock" not in str(exc).lower():
                    raise
                if time.monotonic() >= deadline:
                    raise StoreBusyError(
                        f"DuckDB file {self.path} is held by another process (waited {self.lock_timeout_s:.0f} s); "
                        "let the other writer finish (a running `usp predict`, `usp ingest` or pipeline run) or "
                        "raise $USP_DUCKDB_LOCK_TIMEOUT") from None
                time.sleep(delay)
                delay = min(delay * 2, 1.0)

    @contextmanager
    def connect(self, *, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        con = self._open(read_only)
        try:
            yield con
        finally:
            con.close()

    def load_states(self, config_version: str, series_ids: list[str]) -> dict[str, StoredState]:
        if not series_ids:
            return {}
        with self.connect() as con:
            rows = con.execute(
                "SELECT series_id, state, state_sha256, last_ts, n_steps FROM predictor_states "
                "WHERE config_version = ? AND list_contains(?, series_id)",
                [config_version, list(series_ids)],
            ).fetchall()
        return {r[0]: StoredState(r[0], bytes(r[1]), r[2], pd.Timestamp(r[3]), int(r[4])) for r in rows}

    def load_history(self, series_ids: Sequence[str]) -> pd.DataFrame:
        """Stored observations of ``series_ids`` ordered by (series_id, ts); ts naive UTC."""
        with self.connect() as con:
            return con.execute(
                "SELECT series_id, ts, value FROM observations WHERE list_contains(?, series_id) "
                "ORDER BY series_id, ts",
                [list(series_ids)],
            ).df()

    def load_observations(self, series_ids: Sequence[str] | None = None, *, max_length: int = 0) -> pd.DataFrame:
        """The observation panel (series_id, ts UTC, value) ordered by (series_id, ts): every stored series or
        ``series_ids``, the newest ``max_length`` points of each when > 0."""
        where = "WHERE list_contains(?, series_id)" if series_ids is not None else ""
        params: list = [list(series_ids)] if series_ids is not None else []
        cap = ""
        if max_length > 0:
            cap = "QUALIFY row_number() OVER (PARTITION BY series_id ORDER BY ts DESC) <= ?"
            params.append(int(max_length))
        with self.connect() as con:
            df = con.execute(f"SELECT series_id, ts, value FROM observations {where} {cap} ORDER BY series_id, ts",
                             params).df()
        df["ts"] = pd.to_datetime(df["ts"]).dt.tz_localize("UTC").dt.as_unit("ns")
        return df

    def series_summary(self) -> pd.DataFrame:
        """One row per stored series: rows, first and last ts."""
        with self.connect() as con:
            return con.execute(
                "SELECT series_id, count(*) AS rows, min(ts) AS first_ts, max(ts) AS last_ts FROM observations "
                "GROUP BY series_id ORDER BY series_id").df()

    def commit_observations(self, observations: pd.DataFrame, quarantine: pd.DataFrame) -> WriteCounts:
        """Append validated observations and quarantine rows in one transaction (``usp ingest``)."""
        with self.connect() as con:
            con.begin()
            try:
                n_obs = _insert(con, "observations", observations, ("series_id", "ts", "value", "source_sha256"))
                n_quar = _insert(con, "quarantine", quarantine, QUARANTINE_COLUMNS)
                con.commit()
            except BaseException:
                con.rollback()
                raise
        return WriteCounts(0, 0, n_obs, n_quar)

    def write_quarantine(self, quarantine: pd.DataFrame) -> int:
        """Insert quarantined rows (columns of QUARANTINE_COLUMNS); returns the rows actually added."""
        if quarantine.empty:
            return 0
        with self.connect() as con:
            return _insert(con, "quarantine", quarantine, QUARANTINE_COLUMNS)

    def commit_inference(
        self,
        *,
        predictions: pd.DataFrame,
        states: pd.DataFrame,
        observations: pd.DataFrame,
        quarantine: pd.DataFrame,
        processed_file: dict | None = None,
    ) -> WriteCounts:
        """Write observations, predictions, new states and quarantine rows atomically (one transaction)."""
        with self.connect() as con:
            con.begin()
            try:
                n_obs = _insert(con, "observations", observations, ("series_id", "ts", "value", "source_sha256"))
                n_pred = _insert(con, "predictions", predictions, PREDICTION_COLUMNS)
                n_states = _upsert_states(con, states)
                n_quar = _insert(con, "quarantine", quarantine, QUARANTINE_COLUMNS)
                if processed_file is not None:
                    _insert(con, "processed_files", pd.DataFrame([processed_file]), tuple(processed_file))
                con.commit()
            except BaseException:
                con.rollback()
                raise
        return WriteCounts(n_pred, n_states, n_obs, n_quar)

    def count(self, table: str) -> int:
        if table not in ("observations", "predictions", "predictor_states", "quarantine", "processed_files",
                         "scored_predictions"):
            raise ValueError(f"unknown table {table!r}")
        with self.connect() as con:
            return int(con.execute(f"SELECT count(*) FROM {table}").fetchone()[0])

    def live_accuracy(self) -> pd.DataFrame:
        """Per series and config version, the live forecasts whose target has been observed: how many, mean CRPS
        (Gaussian, from the stored sigma), MAE, MAE relative to the naive last value, interval coverage."""
        with self.connect() as con:
            scored = con.execute(
                "SELECT series_id, config_version, crps, error, naive_error, covered "
                "FROM scored_predictions WHERE realised IS NOT NULL").df()
        scored["abs_error"], scored["naive_abs_error"] = scored["error"].abs(), scored["naive_error"].abs()
        out = scored.groupby(["series_id", "config_version"]).agg(
            scored=("crps", "size"), crps=("crps", "mean"), mae=("abs_error", "mean"),
            naive_mae=("naive_abs_error", "mean"), coverage=("covered", "mean")).reset_index()
        out["relative_mae"] = out["mae"] / out["naive_mae"]
        return out

    def table(self, table: str) -> pd.DataFrame:
        self.count(table)  # validates the name
        with self.connect() as con:
            return con.execute(f"SELECT * FROM {table}").df()


def _insert(con: duckdb.DuckDBPyConnection, table: str, frame: pd.DataFrame, columns: tuple[str, ...]) -> int:
    if frame.empty:
        return 0
    # Arrow infers list columns from every row; DuckDB's pandas scan samples the first rows, so a column whose
    # sampled rows are all empty lists (flags) was typed NULL[] and a later non-empty row failed to cast.
    con.register("_incoming", pa.Table.from_pandas(frame.loc[:, list(columns)], preserve_index=False))
    try:
        cols = ", ".join(columns)
        inserted = con.execute(
            f"INSERT INTO {table} ({cols}) SELECT {cols} FROM _incoming ON CONFLICT DO NOTHING"
        ).fetchone()
    finally:
        con.unregister("_incoming")
    return int(inserted[0]) if inserted else 0


def _upsert_states(con: duckdb.DuckDBPyConnection, states: pd.DataFrame) -> int:
    if states.empty:
        return 0
    con.register("_states", states.loc[:, list(STATE_COLUMNS)])
    try:
        cols = ", ".join(STATE_COLUMNS)
        con.execute(
            f"INSERT INTO predictor_states ({cols}) SELECT {cols} FROM _states "
            "ON CONFLICT (series_id, config_version) DO UPDATE SET state = excluded.state, "
            "state_sha256 = excluded.state_sha256, last_ts = excluded.last_ts, n_steps = excluded.n_steps, "
            "dagster_run_id = excluded.dagster_run_id, updated_at = excluded.updated_at"
        ).fetchall()
    finally:
        con.unregister("_states")
    return len(states)
