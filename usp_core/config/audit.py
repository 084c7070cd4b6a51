"""Append-only, hash-chained audit trail of config mutations (SPEC §6, §10).

One JSON object per line. Each record carries ``prev_sha256`` (SHA-256 of the previous line's bytes, or 64
zeros on the first line) and ``sha256`` (SHA-256 of its own canonical JSON without that field), so an edited,
removed, inserted or reordered line breaks the chain. With ``USP_AUDIT_HMAC_KEY`` set in the environment each
record also carries ``hmac_sha256`` (HMAC-SHA256 of its canonical JSON without that field), so a chain rebuilt
without the key fails; verifying with the key set demands a valid HMAC on every line.

A chain cannot see lines cut from its end, nor a file replaced by a fresh self-consistent chain, so the anchor
``<log>.anchor`` beside it records the line count and the SHA-256 of the last line (HMAC'd when the key is
set). It is replaced atomically after each fsynced append, under the same exclusive ``flock`` on the log that
serialises writers. A missing anchor stands for an empty log: the empty anchor is written before the first line.
Crash rule: an anchor lagging by exactly one valid line that chains onto its head is accepted (killed between
the log fsync and the anchor rename) and brought level by the next append or clean verify.

Limits: without the key, whoever can write the directory can rebuild log and anchor together; with it, they can
still put back an older log with its older anchor (only a copy of the anchor kept elsewhere catches that).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import fcntl
import hashlib
import hmac
import json
import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

from usp_core.durable import atomic_write_bytes, fsync_directory

Event = Literal["MUTATION_APPLIED", "MUTATION_REJECTED", "ROLLBACK"]
EVENTS: tuple[str, ...] = ("MUTATION_APPLIED", "MUTATION_REJECTED", "ROLLBACK")
GENESIS_SHA256 = "0" * 64
HMAC_KEY_ENV = "USP_AUDIT_HMAC_KEY"
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


def _without(record: Mapping[str, Any], *fields: str) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k not in fields}


def _record_digest(record: Mapping[str, Any]) -> str:
    return hashlib.sha256(_canonical(_without(record, "sha256", "hmac_sha256"))).hexdigest()


def _hmac_key() -> bytes | None:
    value = os.environ.get(HMAC_KEY_ENV, "")
    return value.encode() if value else None


def _mac(key: bytes, payload: bytes) -> str:
    return hmac.new(key, payload, hashlib.sha256).hexdigest()


def _mac_ok(key: bytes, payload: bytes, mac: Any) -> bool:
    return isinstance(mac, str) and hmac.compare_digest(_mac(key, payload), mac)


def _line_sha(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def _split_lines(data: bytes) -> list[bytes]:
    lines = data.split(b"\n")
    return lines[:-1] if lines[-1] == b"" else lines


def _head(lines: list[bytes], count: int) -> str:
    """The chain head after the first ``count`` lines."""
    return GENESIS_SHA256 if count == 0 else _line_sha(lines[count - 1])


def _read_all(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    chunks: list[bytes] = []
    offset = 0
    while offset < size:
        chunk = os.pread(fd, size - offset, offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


@dataclasses.dataclass(frozen=True)
class _Anchor:
    lines: int
    head_sha256: str
    hmac_sha256: Any = None


def anchor_path(path: str | os.PathLike[str]) -> Path:
    """The anchor file kept beside the log ``path``."""
    path = Path(path)
    return path.with_name(path.name + ".anchor")


def _anchor_payload(lines: int, head: str) -> dict[str, Any]:
    return {"version": 1, "lines": lines, "head_sha256": head}


def _write_anchor(path: Path, lines: int, head: str, key: bytes | None) -> None:
    doc = _anchor_payload(lines, head)
    if key is not None:
        doc["hmac_sha256"] = _mac(key, _canonical(doc))
    atomic_write_bytes(anchor_path(path), _canonical(doc) + b"\n")


def _read_anchor(path: Path) -> _Anchor | None:
    """The anchor of the log ``path``, None if there is none; ValueError or OSError if it cannot be read."""
    try:
        raw = anchor_path(path).read_bytes()
    except FileNotFoundError:
        return None
    doc = json.loads(raw)
    lines = doc.get("lines") if isinstance(doc, dict) else None
    if type(lines) is not int or lines < 0 or not isinstance(doc.get("head_sha256"), str):
        raise ValueError("not an object with a non-negative integer 'lines' and a string 'head_sha256'")
    return _Anchor(lines, doc["head_sha256"], doc.get("hmac_sha256"))


def _compare_with_anchor(lines: list[bytes], anchor: _Anchor, key: bytes | None) -> tuple[list[str], bool]:
    """Problems of the log ``lines`` against ``anchor``, and whether the anchor merely lags by one line."""
    problems = []
    if key is not None and not _mac_ok(key, _canonical(_anchor_payload(anchor.lines, anchor.head_sha256)),
                                       anchor.hmac_sha256):
        problems.append(f"anchor: HMAC missing or invalid (anchor forged or written without {HMAC_KEY_ENV})")
    n, m = len(lines), anchor.lines
    if n < m:
        problems.append(f"truncated: the log has {n} lines but its anchor records {m} "
                        "(lines were cut from the end or the file was replaced)")
    elif _head(lines, m) != anchor.head_sha256:
        problems.append(f"rewritten: the log's first {m} lines no longer end in the anchored head "
                        "(the log was rewritten or replaced)")
    elif n > m + 1:
        problems.append(f"unanchored: the log has {n - m} lines beyond the {m} its anchor records; only one "
                        "may lag (a crash between append and anchor update)")
    return problems, not problems and n == m + 1


def _anchor_problems(path: Path, lines: list[bytes], key: bytes | None) -> tuple[list[str], bool]:
    try:
        anchor = _read_anchor(path)
    except (OSError, ValueError) as exc:
        return [f"anchor unreadable: {anchor_path(path)}: {exc}"], False
    if anchor is None:
        if not lines:
            return [], False
        return [f"anchor missing: {anchor_path(path)} does not exist but the log has {len(lines)} lines "
                "(anchor deleted, or a log written before anchoring: review it, then reanchor_audit_log)"], False
    return _compare_with_anchor(lines, anchor, key)


def _line_problems(lineno: int, raw: bytes, prev_sha: str, key: bytes | None) -> list[str]:
    try:
        rec = json.loads(raw)
        if not isinstance(rec, dict):
            raise ValueError("not an object")
    except ValueError as exc:
        return [f"line {lineno}: not a JSON object ({exc})"]
    problems = []
    if rec.get("prev_sha256") != prev_sha:
        problems.append(f"line {lineno}: prev_sha256 does not match line {lineno - 1} "
                        "(a line was edited, removed, inserted or reordered)")
    if rec.get("sha256") != _record_digest(rec):
        problems.append(f"line {lineno}: record digest mismatch (the line was edited)")
    if key is not None and not _mac_ok(key, _canonical(_without(rec, "hmac_sha256")), rec.get("hmac_sha256")):
        problems.append(f"line {lineno}: HMAC missing or invalid (written without {HMAC_KEY_ENV} or forged)")
    if rec.get("seq") != lineno - 1:
        problems.append(f"line {lineno}: seq={rec.get('seq')!r}, expected {lineno - 1}")
    if rec.get("event") not in EVENTS:
        problems.append(f"line {lineno}: unknown event {rec.get('event')!r}")
    return problems


def _level_anchor_before_append(path: Path, data: bytes, lines: list[bytes], key: bytes | None) -> bool:
    """Make the anchor match the log before a new line goes in; False if the log disagrees with it.

    A disagreeing anchor is left as it is, so that verify keeps reporting the tampering instead of an append
    quietly adopting the tampered log.
    """
    problems, lagging = _anchor_problems(path, lines, key)
    if problems:
        return False
    if not lines and not anchor_path(path).exists():
        _write_anchor(path, 0, GENESIS_SHA256, key)
    if lagging:
        if not data.endswith(b"\n") or _line_problems(len(lines), lines[-1], _head(lines, len(lines) - 1), key):
            return False
        # Level first: should this append crash before its own anchor update, the lag is again only one line.
        _write_anchor(path, len(lines), _head(lines, len(lines)), key)
    return True


@contextlib.contextmanager
def _locked_read_fd(path: Path) -> Iterator[int | None]:
    """The log open read-only under the writers' exclusive lock, or None if there is no log."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        yield None
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)


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
    """Append one hash-chained record (fsynced, then anchored, before returning) and return it."""
    if event not in EVENTS:
        raise ValueError(f"unknown audit event {event!r}; one of {EVENTS}")
    path = Path(path)
    timestamp = (now or utc_now()).astimezone(dt.UTC).isoformat()
    key = _hmac_key()
    with _locked_append_fd(path) as fd:
        data = _read_all(fd)
        lines = _split_lines(data)
        anchored = _level_anchor_before_append(path, data, lines, key)
        prev = lines[-1] if lines else None
        prev_sha = _head(lines, len(lines))
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
        if key is not None:
            record["hmac_sha256"] = _mac(key, _canonical(record))
        line = _canonical(record)
        written = os.write(fd, line + b"\n")
        if written != len(line) + 1:
            raise OSError(f"short write to audit log {path}: {written} of {len(line) + 1} bytes")
        os.fsync(fd)
        if anchored:
            _write_anchor(path, len(lines) + 1, _line_sha(line), key)
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
    """Check the hash chain and the anchor; ``(ok, problems)``, one message per problem (1-based line numbers).

    Anchor problems start with ``truncated:``, ``rewritten:``, ``unanchored:``, ``anchor missing:``,
    ``anchor unreadable:`` or ``anchor:``. An anchor lagging by the one line of a crash window is no problem
    and, when nothing else is wrong, is brought level here.
    """
    path = Path(path)
    key = _hmac_key()
    with _locked_read_fd(path) as fd:
        data = b"" if fd is None else _read_all(fd)
        lines = _split_lines(data)
        problems: list[str] = []
        if data and not data.endswith(b"\n"):
            problems.append("last line is incomplete (torn write or truncation)")
        for lineno, raw in enumerate(lines, start=1):
            problems += _line_problems(lineno, raw, _head(lines, lineno - 1), key)
        anchor_problems, lagging = _anchor_problems(path, lines, key)
        problems += anchor_problems
        if lagging and not problems:
            _relevel_after_verify(path, lines, key)
    return not problems, problems


def _relevel_after_verify(path: Path, lines: list[bytes], key: bytes | None) -> None:
    anchor = _read_anchor(path)
    if key is None and anchor is not None and anchor.hmac_sha256 is not None:
        return  # rewriting it without the key would strip its HMAC; a keyed append or verify levels it
    with contextlib.suppress(OSError):  # a read-only copy still verifies; the next append levels it
        _write_anchor(path, len(lines), _head(lines, len(lines)), key)


def reanchor_audit_log(path: str | os.PathLike[str]) -> None:
    """Anchor the log as it stands, so that verify trusts every line up to here.

    For an operator, after reviewing a log reported ``anchor missing`` (one written before anchors existed) or
    after a deliberate repair; never called by the code that writes the log.
    """
    path = Path(path)
    with _locked_read_fd(path) as fd:
        lines = _split_lines(b"" if fd is None else _read_all(fd))
        _write_anchor(path, len(lines), _head(lines, len(lines)), _hmac_key())


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
