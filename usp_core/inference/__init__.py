"""Inference store and runner: predictions and predictor states in DuckDB (SPEC §7). No Dagster import."""

from usp_core.inference.codec import StateDecodeError, decode_state, encode_state
from usp_core.inference.ingest import IngestResult, ingest_file, ingest_frame, observation_files
from usp_core.inference.runner import (
    InferenceResult,
    file_sha256,
    quarantine_records,
    read_observation_file,
    run_inference,
)
from usp_core.inference.store import PredictionStore, StoreBusyError, WriteCounts

__all__ = [
    "InferenceResult", "IngestResult", "PredictionStore", "StateDecodeError", "StoreBusyError", "WriteCounts",
    "decode_state", "encode_state", "file_sha256", "ingest_file", "ingest_frame", "observation_files",
    "quarantine_records", "read_observation_file", "run_inference",
]
