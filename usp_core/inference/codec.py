"""Predictor state <-> bytes for the DuckDB state table: the snapshot format of ``usp_core.engine.snapshot``
(typed leaves + SHA-256, never pickle); the digest is also kept in its own column."""

from __future__ import annotations

import hashlib
from typing import Any

from usp_core.engine.snapshot import SnapshotError
from usp_core.engine.snapshot import decode_state as _decode
from usp_core.engine.snapshot import encode_state as _encode


class StateDecodeError(SnapshotError):
    """A stored state does not match its digest or the predictor's state structure."""


def encode_state(state: Any) -> tuple[bytes, str]:
    """Serialise one (unbatched) state; returns (payload, sha256 hex)."""
    payload = _encode(state, config_version="", static_key="")
    return payload, hashlib.sha256(payload).hexdigest()


def decode_state(payload: bytes, sha256: str, template: Any) -> Any:
    """Rebuild a state shaped like ``template`` (a state or ``jax.eval_shape`` of one) after checking the digest."""
    if hashlib.sha256(payload).hexdigest() != sha256:
        raise StateDecodeError("stored predictor state does not match its SHA-256")
    try:
        state, _ = _decode(payload, template)
    except SnapshotError as exc:
        raise StateDecodeError(str(exc)) from None
    return state
