"""File sensor on data/incoming/: one inference run per distinct file content (SPEC §7)."""

import hashlib
import json
import os
from pathlib import Path

import dagster as dg

from usp_pipeline.defs.common.jobs import inference_job
from usp_pipeline.defs.common.resources import WorkloadResource

INCOMING_SUFFIXES = (".csv", ".parquet")
POLL_SECONDS_ENV = "USP_INCOMING_POLL_SECONDS"


def incoming_poll_seconds() -> int:
    """How often the sensor looks into the incoming folder: ``$USP_INCOMING_POLL_SECONDS``, default 30."""
    seconds = int(os.environ.get(POLL_SECONDS_ENV, "30"))
    if seconds < 1:
        raise ValueError(f"{POLL_SECONDS_ENV} must be a whole number of seconds >= 1, got {seconds}")
    return seconds


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def scan_incoming(directory: Path, cursor: str | None) -> tuple[list[tuple[Path, str]], str]:
    """Files whose content hash is not yet in ``cursor`` (JSON {path: sha256}), and the updated cursor.

    Hidden and partial files (``.name``, ``*.tmp``) are skipped: writers should drop files atomically.
    """
    seen: dict[str, str] = json.loads(cursor) if cursor else {}
    new: list[tuple[Path, str]] = []
    if directory.is_dir():
        for path in sorted(directory.iterdir()):
            if path.name.startswith(".") or path.suffix not in INCOMING_SUFFIXES or not path.is_file():
                continue
            sha = file_sha256(path)
            if seen.get(str(path)) != sha:
                new.append((path, sha))
                seen[str(path)] = sha
    return new, json.dumps(seen, sort_keys=True)


@dg.sensor(job=inference_job, minimum_interval_seconds=incoming_poll_seconds(),
           default_status=dg.DefaultSensorStatus.RUNNING,
           description="Runs inference_job once per new or modified file in data/incoming/ (run_key = sha256).")
def incoming_files_sensor(context: dg.SensorEvaluationContext, workload: WorkloadResource) -> dg.SensorResult:
    directory = workload.incoming_path()
    new, cursor = scan_incoming(directory, context.cursor)
    requests = [
        dg.RunRequest(
            run_key=sha,
            run_config=dg.RunConfig(ops={"predictions": {"config": {"path": str(path), "sha256": sha}}}),
            tags={"usp/source_file": path.name, "usp/source_sha256": sha},
        )
        for path, sha in new
    ]
    if not requests:
        return dg.SensorResult(skip_reason=dg.SkipReason(f"no new files in {directory}"), cursor=cursor)
    return dg.SensorResult(run_requests=requests, cursor=cursor)
