"""Hash-chained audit log: append, verify, tamper detection, rate-limit counting."""

import datetime as dt
import json

from usp_core.config.audit import (
    GENESIS_SHA256,
    append_audit_record,
    count_recent,
    read_audit_records,
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
