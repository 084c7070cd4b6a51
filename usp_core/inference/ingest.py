"""``usp ingest``: append observation files to the store, the system of record (SPEC §4.4).

Each file is validated against what the store already holds; bad rows are quarantined with a reason, good
rows appended, and a replayed file adds nothing (exact repeats of stored observations are skipped, not
quarantined). Files are read in name order, each in its own transaction.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from usp_core.inference.runner import (
    file_sha256,
    quarantine_records,
    read_observation_file,
    validate_against_history,
)
from usp_core.inference.store import PredictionStore

OBSERVATION_SUFFIXES = (".csv", ".parquet")


@dataclass
class IngestResult:
    source: str
    sha256: str
    rows: int
    appended: int
    skipped: int
    quarantined: int
    quarantine_reasons: dict[str, int] = field(default_factory=dict)


def observation_files(paths: Iterable[str | Path]) -> list[Path]:
    """Files named directly plus the CSV/Parquet files of named directories (name order)."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.iterdir() if f.is_file() and f.suffix in OBSERVATION_SUFFIXES)
        elif p.exists():
            files.append(p)
        else:
            raise FileNotFoundError(f"observation file {p} does not exist")
    return files


def ingest_file(path: str | Path, store: PredictionStore, *, run_id: str = "ingest",
                log: Callable[[str], None] | None = None) -> IngestResult:
    """Validate one file against the stored history and append its good rows (one transaction)."""
    path = Path(path)
    raw = read_observation_file(path)
    sha = file_sha256(path)
    ids = sorted(set(raw["series_id"].dropna().astype(str).str.strip()) - {""})
    good, quarantine, skipped = validate_against_history(raw, store.load_history(ids))
    observations = good.loc[:, ["series_id", "ts", "value"]].assign(source_sha256=sha)
    counts = store.commit_observations(
        observations, quarantine_records(quarantine, source=str(path), run_id=run_id, source_sha256=sha))
    reasons = {str(k): int(v) for k, v in quarantine["reason"].value_counts().items()} if len(quarantine) else {}
    result = IngestResult(str(path), sha, len(raw), counts.observations, skipped, len(quarantine), reasons)
    if log:
        log(f"{path.name}: {result.rows} rows, {result.appended} appended, {result.skipped} already stored, "
            f"{result.quarantined} quarantined {reasons or ''}".rstrip())
    return result


def ingest_frame(frame: pd.DataFrame, store: PredictionStore, *, source: str, run_id: str = "ingest") -> IngestResult:
    """Ingest an in-memory long frame (series_id, ts, value) through the same path as a file."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{Path(source).stem or 'frame'}.parquet"
        frame.loc[:, ["series_id", "ts", "value"]].to_parquet(path, index=False)
        result = ingest_file(path, store, run_id=run_id)
    result.source = source
    return result
