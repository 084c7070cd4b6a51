"""Append-only, hash-chained audit trail of config mutations (SPEC §6).

One JSON object per line. Each record carries ``prev_sha256`` (SHA-256 of the previous line's bytes, or 64
zeros on the first line) and ``sha256`` (SHA-256 of its own canonical JSON without that field), so an edited,
removed, inserted or reordered line breaks the chain. Appends hold an exclusive ``flock`` on the log itself so
that concurrent writers never interleave or fork the chain.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

from usp_core.durable import fsync_directory

Event = Literal["MUTATION_APPLIED", "MUTATION_REJECTED", "ROLLBACK"]
EVENTS: tuple[str, ...] = ("MUTATION_APPLIED", "MUTATION_REJECTED", "ROLLBACK")
GENESIS_SHA256 = "0" * 64
RECORD_FIELDS: tuple[str, ...] = (
    "seq", "timestamp", "event", "trigger", "delta", "objective", "config_version_before",
    "config_version_after", "backup_path", "mlflow_run_id", "reason", "pid", "prev_sha256",
)


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _json_safe(value: Any) -> Any:
    """Plain JSON: tuples become lists, non-finite floats become strings (JSON has no NaN)."""
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if hasattr(value, "item") and not isinstance(value, str | bytes):  # numpy / jax scalars
        return _json_safe(value.item())
    return value


def _canonical(record: Mapping[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _record_digest(record: Mapping[str, Any]) -> str:
    return hashlib.sha256(_canonical({k: v for k, v in record.items() if k != "sha256"})).hexdigest()


def _last_line(fd: int) -> bytes | None:
    """The last complete line of the file open at ``fd`` (without its newline), or None if empty."""
    size = os.fstat(fd).st_size
    if size == 0:
        return None
    block = 4096
    end = size
    buf = b""
    while end > 0:
        start = max(0, end - block)
        buf = os.pread(fd, end - start, start) + buf
        end = start
        stripped = buf.rstrip(b"\n")
        if b"\n" in stripped or end == 0:
            return stripped.rsplit(b"\n", 1)[-1]
    return None


@contextlib.contextmanager
def _locked_append_fd(path: Path) -> Iterator[int]:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    created = not path.exists()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)  # closing releases the flock
    if created:
        fsync_directory(path.parent)


def append_audit_record(
    path: str | os.PathLike[str],
    *,
    event: Event,
    trigger: str,
    delta: Mapping[str, tuple[Any, Any]] | None = None,
    objective: Mapping[str, Any] | None = None,
    config_version_before: str | None = None,
    config_version_after: str | None = None,
    backup_path: str | None = None,
    mlflow_run_id: str | None = None,
    reason: str = "",
    now: dt.datetime | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Append one hash-chained record (fsynced before returning) and return it."""
    if event not in EVENTS:
        raise ValueError(f"unknown audit event {event!r}; one of {EVENTS}")
    path = Path(path)
    timestamp = (now or utc_now()).astimezone(dt.UTC).isoformat()
    with _locked_append_fd(path) as fd:
        prev = _last_line(fd)
        prev_sha = GENESIS_SHA256 if prev is None else hashlib.sha256(prev).hexdigest()
        seq = 0
        if prev is not None:
            with contextlib.suppress(ValueError, TypeError, KeyError):
                seq = int(json.loads(prev)["seq"]) + 1
        record: dict[str, Any] = _json_safe({
            "seq": seq,
            "timestamp": timestamp,
            "event": event,
            "trigger": trigger,
            "delta": {k: [old, new] for k, (old, new) in (delta or {}).items()},
            "objective": dict(objective or {}),
            "config_version_before": config_version_before,
            "config_version_after": config_version_after,
            "backup_path": backup_path,
            "mlflow_run_id": mlflow_run_id,
            "reason": reason,
            "pid": os.getpid(),
            "prev_sha256": prev_sha,
            **dict(extra or {}),
        })
        record["sha256"] = _record_digest(record)
        line = _canonical(record) + b"\n"
        written = os.write(fd, line)
        if written != len(line):
            raise OSError(f"short write to audit log {path}: {written} of {len(line)} bytes")
        os.fsync(fd)
    return record


def read_audit_records(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every parseable record of the log, in file order (a missing log is empty)."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for raw in path.read_bytes().splitlines():
        try:
            rec = json.loads(raw)
        except ValueError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def verify_audit_log(path: str | os.PathLike[str]) -> tuple[bool, list[str]]:
    """Check the hash chain; ``(ok, problems)`` with one message per broken line (1-based line numbers)."""
    path = Path(path)
    if not path.exists():
        return True, []
    data = path.read_bytes()
    problems: list[str] = []
    if data and not data.endswith(b"\n"):
        problems.append("last line is incomplete (torn write or truncation)")
    prev_sha = GENESIS_SHA256
    for lineno, raw in enumerate(data.splitlines(), start=1):
        try:
            rec = json.loads(raw)
            if not isinstance(rec, dict):
                raise ValueError("not an object")
        except ValueError as exc:
            problems.append(f"line {lineno}: not a JSON object ({exc})")
            prev_sha = hashlib.sha256(raw).hexdigest()
            continue
        if rec.get("prev_sha256") != prev_sha:
            problems.append(f"line {lineno}: prev_sha256 does not match line {lineno - 1} "
                            "(a line was edited, removed, inserted or reordered)")
        if rec.get("sha256") != _record_digest(rec):
            problems.append(f"line {lineno}: record digest mismatch (the line was edited)")
        if rec.get("seq") != lineno - 1:
            problems.append(f"line {lineno}: seq={rec.get('seq')!r}, expected {lineno - 1}")
        if rec.get("event") not in EVENTS:
            problems.append(f"line {lineno}: unknown event {rec.get('event')!r}")
        prev_sha = hashlib.sha256(raw).hexdigest()
    return not problems, problems


def count_recent(
    path: str | os.PathLike[str],
    *,
    event: str = "MUTATION_APPLIED",
    trigger: str = "promotion",
    window: dt.timedelta = dt.timedelta(hours=1),
    now: dt.datetime | None = None,
) -> int:
    """Records of ``event`` by ``trigger`` within ``window`` before ``now`` (the rate limiter's count)."""
    now = (now or utc_now()).astimezone(dt.UTC)
    since = now - window
    n = 0
    for rec in read_audit_records(path):
        if rec.get("event") != event or rec.get("trigger") != trigger:
            continue
        try:
            ts = dt.datetime.fromisoformat(rec["timestamp"])
        except (KeyError, TypeError, ValueError):
            continue
        if since < ts <= now:
            n += 1
    return n
