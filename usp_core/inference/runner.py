"""Inference on one observation file: validate, step every series' state, store predictions + states atomically.

Rows of a series are stepped in time order; all series advance together through ``Predictor.advance_batch`` (one
compiled scan per chunk of up to 256 time indices; the batch is padded as ``Predictor.run`` pads it
(``batch_bucket``) and chunks to 1, 8, 64 or 256 steps, so that panel and file sizes reuse compilations), and a
series without a row at that index keeps its state. A series without a usable stored state is primed on its history
(``Predictor.prime_batch``) and makes its first forecasts in the first step of that scan, so a cold start compiles
no program of its own beyond the priming.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from usp_core.config import PredictorConfig
from usp_core.engine import step as step_mod
from usp_core.engine.predictor import Predictor, batch_bucket
from usp_core.inference.codec import StateDecodeError, decode_state, encode_state
from usp_core.inference.store import PredictionStore

HORIZON = 1
MAX_CHUNK = 256  # time indices per compiled scan of the inference job

REBUILD_STEPS = 2000  # stored values a state rebuilt from history steps through (bounds a config switch's cost)
FLAG_FIELDS = ("regime_change", "degraded", "emergency", "rejected", "outlier", "stale", "gap", "frozen",
               "mode_collapse_warning")


def chunk_length(length: int) -> int:
    """Time indices per compiled scan for ``length`` rows: 1 (the daily row), 8, 64 or ``MAX_CHUNK``. A program per
    class: a catch-up of a few rows computes a few masked steps more instead of compiling (~20-30 s) again."""
    chunk = 1
    while chunk < min(length, MAX_CHUNK):
        chunk *= 8
    return min(chunk, MAX_CHUNK)


@dataclass
class InferenceResult:
    source: str
    sha256: str
    config_version: str
    rows: int
    good_rows: int
    quarantined: int
    skipped: int
    predictions_written: int
    states_written: int
    series: int
    new_series: int
    caught_up: int = 0
    cold_starts: dict[str, str] = field(default_factory=dict)
    quarantine_reasons: dict[str, int] = field(default_factory=dict)
    sample: pd.DataFrame | None = None


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_observation_file(path: str | Path) -> pd.DataFrame:
    """A CSV or Parquet file of observations, values kept as read so that bad ones reach the quarantine."""
    from usp_core.data.schema import ObservationError, _require_columns, read_observations_csv

    path = Path(path)
    if path.suffix == ".parquet":
        if not path.is_file():
            raise ObservationError(f"observation file {path} does not exist")
        df = pd.read_parquet(path)
        _require_columns(df)
        return df
    return read_observations_csv(path)


def quarantine_records(quarantine: pd.DataFrame, *, source: str, run_id: str, source_sha256: str | None = None,
                       created_at: dt.datetime | None = None) -> pd.DataFrame:
    """The validator's quarantine frame (series_id, ts, value, row, reason) as rows of the DuckDB table."""
    if source_sha256 is None:
        source_sha256 = hashlib.sha256(pd.util.hash_pandas_object(quarantine, index=False).to_numpy().tobytes()).hexdigest()
    return pd.DataFrame({
        "source_sha256": source_sha256,
        "row_number": quarantine["row"].astype("int64").to_numpy() if len(quarantine) else np.zeros(0, np.int64),
        "reason": quarantine["reason"].astype(str).to_numpy(),
        "source": source,
        "series_id": quarantine["series_id"].astype(str).to_numpy(),
        "ts": quarantine["ts"].astype(str).to_numpy(),
        "value": quarantine["value"].astype(str).to_numpy(),
        "dagster_run_id": run_id,
        "created_at": pd.Timestamp(created_at or _utcnow()),
    })


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


def _naive_utc(ts: pd.Series) -> pd.Series:
    return ts.dt.tz_convert("UTC").dt.tz_localize(None) if ts.dt.tz is not None else ts


def _ns(ts: pd.Series) -> np.ndarray:
    return _naive_utc(ts).astype("datetime64[ns]").astype("int64").to_numpy()


def _pad_batch(x: np.ndarray, size: int) -> np.ndarray:
    return np.concatenate([x, np.repeat(x[:1], size - len(x), axis=0)]) if len(x) < size else x


def _stack(states: list):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *states)


def _state_at(batched, i: int):
    return jax.tree.map(lambda x: x[i], batched)


def _split_replayed(quarantine: pd.DataFrame, history: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Drop rows that repeat a stored observation exactly (same series, ts and value): a replayed or extended
    file is not bad data. A stored (series_id, ts) with a different value stays quarantined."""
    if quarantine.empty or history.empty:
        return quarantine, 0
    candidates = quarantine["reason"].isin(["duplicate", "out_of_order"])
    ts = pd.to_datetime(quarantine["ts"], utc=True, errors="coerce", format="mixed").dt.tz_localize(None)
    value = pd.to_numeric(quarantine["value"], errors="coerce")
    stored = history.set_index(["series_id", "ts"])["value"]
    key = pd.MultiIndex.from_arrays([quarantine["series_id"].astype(str).str.strip(), ts])
    stored_value = stored.reindex(key).to_numpy()
    replayed = candidates.to_numpy() & (stored_value == value.to_numpy())
    return quarantine[~replayed].reset_index(drop=True), int(replayed.sum())


def validate_against_history(raw: pd.DataFrame, history: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, int]:
    """Row-level validation of a file against the stored observations of its series: (good rows with naive-UTC
    ts, quarantine, rows skipped as exact repeats of stored observations). History length is not checked here."""
    from usp_core.data.schema import validate_observations

    last_stored = history.groupby("series_id")["ts"].max().to_dict() if len(history) else {}
    good, quarantine = validate_observations(raw.loc[:, ["series_id", "ts", "value"]].reset_index(drop=True), 0,
                                             last_ts=last_stored)
    quarantine, skipped = _split_replayed(quarantine, history)
    return good.assign(ts=_naive_utc(good["ts"])), quarantine, skipped


def run_inference(
    path: str | Path,
    cfg: PredictorConfig,
    store: PredictionStore,
    *,
    run_id: str = "",
    now_ns: int | None = None,
    rebuild_steps: int = REBUILD_STEPS,
    log: Callable[[str], None] | None = None,
) -> InferenceResult:
    """Validate ``path``, predict every good row and write observations, predictions and states in one
    transaction.

    A series' stored state for ``cfg`` is first caught up with every stored observation it has not consumed
    (rows ingested, or predicted under another config, since it was saved). A series without a usable state
    (new config, rollback without a state, a state that fails to decode) is rebuilt from its stored history:
    initialised on ``min_history`` values and stepped through at most ``rebuild_steps`` stored values before the
    file's rows. Predictions are written for every stepped row, so switching configs A -> B -> A skips nothing.

    ``now_ns`` is the wall clock when the file arrived (the pipeline and ``usp predict`` pass it): a file's rows
    are as late as its newest row per series, and the gate marks them stale beyond the configured TTL or
    multiple of the series' cadence. ``None`` treats each row as observed at its own timestamp (replays). Rows already stored are skipped, so a replayed file adds nothing.
    """
    log = log or (lambda _msg: None)
    path = Path(path)
    raw = read_observation_file(path)
    sha = file_sha256(path)
    predictor = Predictor(cfg)
    m = predictor.min_history

    file_ids = sorted(set(raw["series_id"].dropna().astype(str).str.strip()) - {""})
    history = store.load_history(file_ids)
    good, quarantine, skipped = validate_against_history(raw, history)
    states = store.load_states(cfg.version, sorted(set(good["series_id"])))
    log(f"{path.name}: {len(raw)} rows, {len(good)} valid, {len(quarantine)} quarantined; "
        f"{len(states)} series with a stored state for config {cfg.version}")

    template = jax.eval_shape(
        lambda h: step_mod.init_state(h, jnp.asarray(0, jnp.int64), predictor.key, predictor.static, predictor.params)[0],
        jax.ShapeDtypeStruct((m,), predictor.dtype),
    )
    created_at = pd.Timestamp(_utcnow())
    stored_by_series = dict(tuple(history.groupby("series_id", sort=False))) if len(history) else {}

    plans: list[tuple[str, np.ndarray, np.ndarray]] = []  # series, values to step, their ts (ns)
    file_rows = good.groupby("series_id").size()  # the last rows of each plan
    start_states: dict[str, object] = {}
    init_ids: list[str] = []
    init_hist: list[np.ndarray] = []
    init_ts: list[int] = []
    too_short: list[str] = []
    cold_starts: dict[str, str] = {}
    caught_up = 0
    for sid, rows in good.groupby("series_id", sort=True):
        past = stored_by_series.get(sid, history.iloc[:0])
        past_values, past_stamps = past["value"].to_numpy(np.float64), _ns(past["ts"])
        values, stamps = rows["value"].to_numpy(np.float64), _ns(rows["ts"])
        if sid in states:
            st = states[sid]
            try:
                start_states[sid] = decode_state(st.state, st.state_sha256, template)
            except StateDecodeError as exc:
                cold_starts[sid] = str(exc)
                log(f"{sid}: stored state for config {cfg.version} is unusable ({exc}); rebuilding it from history")
            else:
                # the consumed position is the stored last_ts (a state's own timestamp stays behind a rejected row)
                unseen = past_stamps > _ns(pd.Series([st.last_ts]))[0]
                caught_up += int(unseen.sum())
                plans.append((sid, np.concatenate([past_values[unseen], values]),
                              np.concatenate([past_stamps[unseen], stamps])))
                continue
        all_values = np.concatenate([past_values, values])
        all_stamps = np.concatenate([past_stamps, stamps])
        if len(all_values) < m:
            too_short.append(sid)
            continue
        start = max(0, len(past_values) - rebuild_steps - m)
        init_ids.append(sid)
        init_hist.append(all_values[start:start + m])
        init_ts.append(int(all_stamps[start + m - 1]))
        # from the history's last value on: the state's priming step (its first forecasts) opens the plan
        plans.append((sid, all_values[start + m - 1:], all_stamps[start + m - 1:]))
    if caught_up:
        log(f"catching up {caught_up} stored observations that the states of config {cfg.version} had not seen")

    if too_short:
        # every clean input row of a series that cannot be initialised yet; its observations are still
        # stored, so a later file can complete the history
        already = set(quarantine["row"].astype(int))
        ids = raw["series_id"].astype(str).str.strip()
        rows = [i for i in np.flatnonzero(ids.isin(too_short)) if i not in already]
        short_rows = raw.loc[rows, ["series_id", "ts", "value"]].astype(str).assign(row=rows, reason="insufficient_history")
        quarantine = pd.concat([quarantine, short_rows], ignore_index=True)

    pred_frames: list[pd.DataFrame] = []
    final_states: dict[str, object] = {}

    def emit(sids: list[str], stamps: np.ndarray, cols: dict[str, np.ndarray]) -> None:
        flags = np.stack([cols[f].astype(bool) for f in FLAG_FIELDS], axis=1)
        pred_frames.append(pd.DataFrame({
            "series_id": sids,
            "ts": pd.to_datetime(stamps, unit="ns"),
            "horizon": HORIZON,
            "config_version": cfg.version,
            "prediction": cols["prediction"], "lower": cols["lower"], "upper": cols["upper"], "sigma": cols["sigma"],
            "mode": cols["mode"].astype(np.int32),
            "regime_change": cols["regime_change"].astype(bool), "degraded": cols["degraded"].astype(bool),
            "emergency": cols["emergency"].astype(bool), "rejected": cols["rejected"].astype(bool),
            "flags": [[f for f, on in zip(FLAG_FIELDS, row, strict=True) if on] for row in flags],
            "weights": [list(map(float, w)) for w in cols["weights"]],
            "dagster_run_id": run_id,
            "created_at": created_at,
        }))

    if init_ids:
        b = batch_bucket(len(init_ids))
        primed = predictor.prime_batch(_pad_batch(np.stack(init_hist), b), _pad_batch(np.asarray(init_ts, np.int64), b))
        for i, sid in enumerate(init_ids):
            start_states[sid] = _state_at(primed, i)
        log(f"initialised {len(init_ids)} series from their stored history ({m} values each, then up to "
            f"{rebuild_steps} stored values stepped)")

    steppable = [(sid, v, t) for sid, v, t in plans if len(v)]
    for sid, _, _ in plans:
        final_states[sid] = start_states[sid]
    if steppable:
        ids = [sid for sid, _, _ in steppable]
        b = batch_bucket(len(ids))
        length = max(len(v) for _, v, _ in steppable)
        values = np.zeros((b, length))
        stamps = np.zeros((b, length), np.int64)
        mask = np.zeros((b, length), bool)
        first = np.zeros((b, length), bool)
        primed_ids = set(init_ids)
        for i, (sid, v, t) in enumerate(steppable):
            values[i, :len(v)], stamps[i, :len(t)], mask[i, :len(v)] = v, t, True
            first[i, 0] = sid in primed_ids
        now = stamps.copy()  # stored rows (catch-up, rebuild) were on time when they arrived
        if now_ns is not None:
            # the file's rows arrive as late as its newest row: a batch delivered on time is not stale
            for i, sid in enumerate(ids):
                n = len(steppable[i][1])
                newest = stamps[i, n - 1]
                # a new series' first file rows are its history (no step), so the plan may hold fewer than the file
                now[i, max(0, n - int(file_rows[sid])): n] += max(0, int(now_ns) - int(newest))
        batch = _stack([start_states[sid] for sid in ids] + [start_states[ids[0]]] * (b - len(ids)))
        chunk = chunk_length(length)
        for lo in range(0, length, chunk):
            part = slice(lo, lo + chunk)
            pad = chunk - mask[:, part].shape[1]
            padded = [np.pad(x[:, part], ((0, 0), (0, pad))) for x in (values, stamps, now, mask, first)]
            out, batch = predictor.advance_batch(batch, *padded)
            rows, steps = np.nonzero(padded[3])
            emit([ids[i] for i in rows], padded[1][rows, steps],
                 {name: np.asarray(getattr(out, name))[rows, steps] for name in out._fields})
            if length > chunk:
                log(f"stepped {min(lo + chunk, length)}/{length} time indices across {len(ids)} series")
        for i, sid in enumerate(ids):
            final_states[sid] = _state_at(batch, i)

    consumed_ns = dict(zip(init_ids, init_ts, strict=True))
    consumed_ns.update({sid: int(t[-1]) for sid, _, t in plans if len(t)})
    state_rows = []
    for sid, st in final_states.items():
        payload, digest = encode_state(st)
        state_rows.append({
            "series_id": sid, "config_version": cfg.version, "state": payload, "state_sha256": digest,
            "last_ts": pd.Timestamp(consumed_ns[sid], unit="ns"),
            "n_steps": int(np.asarray(st.kernel.steps)), "dagster_run_id": run_id, "updated_at": created_at,
        })
    predictions = pd.concat(pred_frames, ignore_index=True) if pred_frames else pd.DataFrame()
    q_rows = quarantine_records(quarantine, source=str(path), run_id=run_id, source_sha256=sha, created_at=created_at)
    observations = good.loc[:, ["series_id", "ts", "value"]].assign(source_sha256=sha)
    counts = store.commit_inference(
        predictions=predictions,
        states=pd.DataFrame(state_rows),
        observations=observations,
        quarantine=q_rows,
        processed_file={"source_sha256": sha, "source": str(path), "config_version": cfg.version, "rows": len(raw),
                        "predictions": len(predictions), "quarantined": len(quarantine), "dagster_run_id": run_id,
                        "processed_at": created_at},
    )
    log(f"wrote {counts.predictions} predictions, {counts.states} states, {counts.quarantined} quarantine rows")
    reasons = quarantine["reason"].value_counts().to_dict() if len(quarantine) else {}
    return InferenceResult(
        source=str(path), sha256=sha, config_version=cfg.version, rows=len(raw), good_rows=len(good),
        quarantined=len(quarantine), skipped=skipped,
        predictions_written=counts.predictions, states_written=counts.states, series=len(final_states),
        new_series=len(init_ids), caught_up=caught_up, cold_starts=cold_starts, quarantine_reasons={str(k): int(v) for k, v in reasons.items()},
        sample=(predictions.drop(columns=["flags", "weights"]).sort_values("ts", ascending=False).head(10)
                if len(predictions) else None),
    )
