"""Hash-chained audit log: append, verify, tamper detection (edit, truncation, rewrite, forgery without the
HMAC key), crash window between append and anchor, rate-limit counting."""

import datetime as dt
import hashlib
import json

import pytest

from usp_core.config import audit
from usp_core.config.audit import (
    GENESIS_SHA256,
    HMAC_KEY_ENV,
    anchor_path,
    append_audit_record,
    count_recent,
    read_audit_records,
    reanchor_audit_log,
    verify_audit_log,
)

T0 = dt.datetime(2025, 1, 1, 12, 0, tzinfo=dt.UTC)


def _write_log(path, n=4):
    for i in range(n):
        append_audit_record(path, event="MUTATION_APPLIED", trigger="promotion" if i % 2 else "manual",
                            delta={"orchestration.cusum_k": (0.5 + i, 0.6 + i)}, objective={"champion": 1.0 + i},
                            config_version_before=f"v{i}", config_version_after=f"v{i + 1}",
                            now=T0 + dt.timedelta(minutes=10 * i))
    return path.read_bytes().splitlines(keepends=True)


def test_chain_verifies_and_records_every_field(tmp_path):
    log = tmp_path / "audit" / "mutations.jsonl"
    lines = _write_log(log)
    assert verify_audit_log(log) == (True, [])
    recs = read_audit_records(log)
    assert [r["seq"] for r in recs] == [0, 1, 2, 3]
    assert recs[0]["prev_sha256"] == GENESIS_SHA256
    assert recs[2]["delta"] == {"orchestration.cusum_k": [2.5, 2.6]}
    assert recs[1]["config_version_after"] == "v2" and recs[1]["timestamp"].startswith("2025-01-01T12:10")
    assert len(lines) == 4 and all(line.endswith(b"\n") for line in lines)
    assert (log.stat().st_mode & 0o777) == 0o600


def test_edited_line_is_detected(tmp_path):
    log = tmp_path / "m.jsonl"
    lines = _write_log(log)
    rec = json.loads(lines[1])
    rec["delta"]["orchestration.cusum_k"][1] = 9.9
    lines[1] = json.dumps(rec, sort_keys=True, separators=(",", ":")).encode() + b"\n"
    log.write_bytes(b"".join(lines))
    ok, problems = verify_audit_log(log)
    assert not ok
    assert any("line 2" in p for p in problems) and any("line 3" in p for p in problems)


def test_edited_last_line_is_detected(tmp_path):
    log = tmp_path / "m.jsonl"
    lines = _write_log(log)
    lines[-1] = lines[-1].replace(b'"trigger":"promotion"', b'"trigger":"manual"')
    log.write_bytes(b"".join(lines))
    ok, problems = verify_audit_log(log)
    assert not ok and any("line 4" in p and "digest" in p for p in problems)


def test_removed_and_reordered_lines_are_detected(tmp_path):
    log = tmp_path / "m.jsonl"
    lines = _write_log(log)
    log.write_bytes(b"".join(lines[:1] + lines[2:]))
    assert not verify_audit_log(log)[0]
    log.write_bytes(b"".join([lines[0], lines[2], lines[1], lines[3]]))
    assert not verify_audit_log(log)[0]
    log.write_bytes(b"".join(lines[:3]) + lines[3][:-10])
    ok, problems = verify_audit_log(log)
    assert not ok and any("incomplete" in p for p in problems)


def test_count_recent_counts_only_promotions_in_the_window(tmp_path):
    log = tmp_path / "m.jsonl"
    _write_log(log, n=6)  # promotions at +10, +30, +50 minutes
    assert count_recent(log, now=T0 + dt.timedelta(minutes=55)) == 3
    assert count_recent(log, now=T0 + dt.timedelta(minutes=75)) == 2  # +10 is more than an hour before
    assert count_recent(log, trigger="manual", now=T0 + dt.timedelta(minutes=55)) == 3
    assert count_recent(tmp_path / "missing.jsonl") == 0


@pytest.fixture(autouse=True)
def _no_hmac_key(monkeypatch):
    monkeypatch.delenv(HMAC_KEY_ENV, raising=False)


def _problems(log):
    ok, problems = verify_audit_log(log)
    assert not ok
    return problems


def test_anchor_is_written_next_to_the_log(tmp_path):
    log = tmp_path / "m.jsonl"
    lines = _write_log(log, n=3)
    anchor = json.loads(anchor_path(log).read_bytes())
    assert anchor_path(log).parent == log.parent
    assert anchor["lines"] == 3 and anchor["head_sha256"] == hashlib.sha256(lines[-1][:-1]).hexdigest()
    assert (anchor_path(log).stat().st_mode & 0o777) == 0o600


def test_deleted_last_line_is_detected_as_truncation(tmp_path):
    log = tmp_path / "m.jsonl"
    lines = _write_log(log)
    log.write_bytes(b"".join(lines[:-1]))
    assert any(p.startswith("truncated:") for p in _problems(log))
    log.write_bytes(b"")
    assert any(p.startswith("truncated:") for p in _problems(log))
    log.unlink()
    assert any(p.startswith("truncated:") for p in _problems(log))


def test_truncation_is_not_laundered_by_later_appends(tmp_path):
    log = tmp_path / "m.jsonl"
    lines = _write_log(log)
    log.write_bytes(b"".join(lines[:-1]))
    append_audit_record(log, event="ROLLBACK", trigger="manual")
    append_audit_record(log, event="ROLLBACK", trigger="manual")
    assert any(p.startswith("rewritten:") or p.startswith("unanchored:") for p in _problems(log))


def test_whole_file_rewritten_with_a_self_consistent_chain_is_detected(tmp_path):
    log = tmp_path / "m.jsonl"
    _write_log(log)
    forged = tmp_path / "forged.jsonl"
    for i in range(4):
        append_audit_record(forged, event="MUTATION_APPLIED", trigger="manual", delta={"core.seed": (i, i + 1)},
                            now=T0 + dt.timedelta(minutes=10 * i))
    assert verify_audit_log(forged) == (True, [])
    log.write_bytes(forged.read_bytes())
    assert any(p.startswith("rewritten:") for p in _problems(log))
    append_audit_record(forged, event="ROLLBACK", trigger="manual")
    log.write_bytes(forged.read_bytes())  # one line longer: must not pass as the crash window
    assert any(p.startswith("rewritten:") for p in _problems(log))


def test_deleted_anchor_or_lines_added_beside_it_are_detected(tmp_path):
    log = tmp_path / "m.jsonl"
    _write_log(log, n=2)
    saved = anchor_path(log).read_bytes()
    anchor_path(log).unlink()
    assert any(p.startswith("anchor missing:") for p in _problems(log))
    anchor_path(log).write_bytes(b"{not json")
    assert any(p.startswith("anchor unreadable:") for p in _problems(log))
    anchor_path(log).write_bytes(saved)
    lines = _write_log(tmp_path / "longer.jsonl")
    log.write_bytes(b"".join(lines))  # same first two lines, two more than anchored
    assert any(p.startswith("unanchored:") for p in _problems(log))


def test_reanchor_accepts_a_reviewed_log(tmp_path):
    log = tmp_path / "m.jsonl"
    _write_log(log, n=2)
    anchor_path(log).unlink()
    assert not verify_audit_log(log)[0]
    reanchor_audit_log(log)
    assert verify_audit_log(log) == (True, [])


def test_crash_between_append_and_anchor_update_is_not_tampering(tmp_path):
    log = tmp_path / "m.jsonl"
    _write_log(log, n=3)
    before = anchor_path(log).read_bytes()
    append_audit_record(log, event="ROLLBACK", trigger="manual")
    anchor_path(log).write_bytes(before)  # as if killed after the log fsync, before the anchor rename
    assert verify_audit_log(log) == (True, [])
    assert json.loads(anchor_path(log).read_bytes())["lines"] == 4  # verify re-anchored


def test_crash_window_is_repaired_by_the_next_append_even_if_that_one_crashes_too(tmp_path, monkeypatch):
    log = tmp_path / "m.jsonl"
    _write_log(log, n=2)
    before = anchor_path(log).read_bytes()
    append_audit_record(log, event="ROLLBACK", trigger="manual")
    anchor_path(log).write_bytes(before)
    real_write = audit._write_anchor
    calls = []

    def crash_after_first_anchor_write(*args, **kwargs):
        calls.append(args)
        if len(calls) > 1:
            raise KeyboardInterrupt("killed before the anchor rename")
        real_write(*args, **kwargs)

    monkeypatch.setattr(audit, "_write_anchor", crash_after_first_anchor_write)
    with pytest.raises(KeyboardInterrupt):
        append_audit_record(log, event="ROLLBACK", trigger="manual")
    monkeypatch.setattr(audit, "_write_anchor", real_write)
    assert verify_audit_log(log) == (True, [])
    append_audit_record(log, event="ROLLBACK", trigger="manual")
    assert verify_audit_log(log) == (True, [])
    assert [r["seq"] for r in read_audit_records(log)] == [0, 1, 2, 3, 4]


def test_crash_during_the_first_append_is_not_tampering(tmp_path, monkeypatch):
    log = tmp_path / "m.jsonl"
    real_write = audit._write_anchor

    def crash_after_the_genesis_anchor(path, lines, head, key):
        if lines:
            raise KeyboardInterrupt("killed before the anchor rename")
        real_write(path, lines, head, key)

    monkeypatch.setattr(audit, "_write_anchor", crash_after_the_genesis_anchor)
    with pytest.raises(KeyboardInterrupt):
        append_audit_record(log, event="ROLLBACK", trigger="manual")
    monkeypatch.setattr(audit, "_write_anchor", real_write)
    assert verify_audit_log(log) == (True, [])


def test_anchor_lagging_by_two_lines_is_reported(tmp_path):
    log = tmp_path / "m.jsonl"
    _write_log(log, n=2)
    before = anchor_path(log).read_bytes()
    _write_log(log, n=2)
    anchor_path(log).write_bytes(before)
    assert any(p.startswith("unanchored:") for p in _problems(log))


def test_hmac_chain_verifies_with_its_key_only(tmp_path, monkeypatch):
    log = tmp_path / "m.jsonl"
    monkeypatch.setenv(HMAC_KEY_ENV, "s3cret")
    _write_log(log)
    assert verify_audit_log(log) == (True, [])
    assert all(len(r["hmac_sha256"]) == 64 for r in read_audit_records(log))
    monkeypatch.setenv(HMAC_KEY_ENV, "wrong")
    problems = _problems(log)
    assert any("line 1" in p and "HMAC" in p for p in problems) and any(p.startswith("anchor") for p in problems)
    monkeypatch.delenv(HMAC_KEY_ENV)
    assert verify_audit_log(log) == (True, [])  # without the key only the plain chain can be checked


def test_chain_forged_without_the_key_fails_when_the_key_is_set(tmp_path, monkeypatch):
    log = tmp_path / "m.jsonl"
    monkeypatch.setenv(HMAC_KEY_ENV, "s3cret")
    _write_log(log)
    monkeypatch.delenv(HMAC_KEY_ENV)
    forged = tmp_path / "forged.jsonl"
    _write_log(forged)  # a self-consistent SHA-256 chain and anchor, made without the key
    log.write_bytes(forged.read_bytes())
    anchor_path(log).write_bytes(anchor_path(forged).read_bytes())
    monkeypatch.setenv(HMAC_KEY_ENV, "s3cret")
    problems = _problems(log)
    assert sum("HMAC" in p and p.startswith("line ") for p in problems) == 4
    assert any(p.startswith("anchor") and "HMAC" in p for p in problems)


def test_truncation_with_a_forged_anchor_fails_when_the_key_is_set(tmp_path, monkeypatch):
    log = tmp_path / "m.jsonl"
    monkeypatch.setenv(HMAC_KEY_ENV, "s3cret")
    lines = _write_log(log)
    log.write_bytes(b"".join(lines[:-1]))
    head = hashlib.sha256(lines[-2][:-1]).hexdigest()
    anchor_path(log).write_text(json.dumps({"version": 1, "lines": 3, "head_sha256": head}))
    assert any(p.startswith("anchor") and "HMAC" in p for p in _problems(log))
    append_audit_record(log, event="ROLLBACK", trigger="manual")  # must not adopt the forged anchor
    assert not verify_audit_log(log)[0]


def test_verify_without_the_key_does_not_strip_the_anchor_hmac(tmp_path, monkeypatch):
    log = tmp_path / "m.jsonl"
    monkeypatch.setenv(HMAC_KEY_ENV, "s3cret")
    _write_log(log, n=2)
    before = anchor_path(log).read_bytes()
    append_audit_record(log, event="ROLLBACK", trigger="manual")
    anchor_path(log).write_bytes(before)
    monkeypatch.delenv(HMAC_KEY_ENV)
    assert verify_audit_log(log) == (True, [])
    assert anchor_path(log).read_bytes() == before
    monkeypatch.setenv(HMAC_KEY_ENV, "s3cret")
    assert verify_audit_log(log) == (True, [])
    assert json.loads(anchor_path(log).read_bytes())["lines"] == 3
