"""SIGKILL during the promotion write (SPEC §6, §10; issue 12).

tests/core/config/test_mutation_faults.py kills ``atomic_write_config`` (trigger ``manual``, no guards, no
compare-and-swap). This covers the promotion path on top: ``promote()`` with a gate decision that carries the
champion version it judged (compare-and-swap), trigger ``promotion`` with the rate-limit and relative-change
guards on, and then a rerun of the SAME decision, as a retried pipeline step would do. No MLflow registry
(``registry=None``): the config file and the audit log are the stores under test.

One driver subprocess imports the package once and forks a promoter per iteration; half are killed at a named
point of the write protocol, half from outside after a seeded random delay spread over a promotion's measured
duration.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from usp_core.config.audit import read_audit_records, verify_audit_log
from usp_core.config.loader import load_config
from usp_core.config.mutation import FAULT_POINTS
from usp_core.config.render import render_toml

REPO_ROOT = Path(__file__).resolve().parents[3]

DRIVER = r"""
import datetime as dt, json, os, random, shutil, signal, sys, time
from pathlib import Path
from usp_core.config.audit import read_audit_records, verify_audit_log
from usp_core.config.mutation import FAULT_ENV, FAULT_POINTS, parse_config_text, render_changes
from usp_core.promotion import promote
from usp_core.promotion.gate import PromotionDecision

path, n = Path(sys.argv[1]), int(sys.argv[2])
audit = path.parent.parent / "audit" / "mutations.jsonl"
rng = random.Random(4321)
t0 = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)

def decision(version):
    return PromotionDecision(True, "promote: sigkill test", champion_score=1.0, challenger_score=0.9,
                             improvement=0.1, dm_stat=-3.0, p_value=0.001, champion_version=version)

def attempt(target, changes, version, now, point=None, delay=None):
    # fork a promoter; kill it at ``point`` (from inside) or after ``delay`` s (from outside)
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            if point:
                os.environ[FAULT_ENV] = point
            out = promote(target, changes, decision(version), now=now, lock_timeout=10)
            code = 0 if out.promoted else 4
        except BaseException:
            code = 3
        os._exit(code)
    if delay is not None:
        time.sleep(delay)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    _, status = os.waitpid(pid, 0)
    return status, time.monotonic() - start

# measure one unkilled promotion on a scratch copy of the repository
scratch = path.parent.parent.parent / "scratch"
shutil.copytree(path.parent, scratch / "config")
v0 = parse_config_text((scratch / "config" / "config.toml").read_text(), source="scratch").version
status, duration = attempt(scratch / "config" / "config.toml", {"orchestration.cusum_k": 0.45}, v0, t0)
assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
print(json.dumps({"measured_s": duration}), flush=True)

for i in range(n):
    now = t0 + dt.timedelta(hours=2 * (i + 1))  # spaced out: the rate limit counts only this iteration
    old = path.read_bytes()
    version = parse_config_text(old.decode(), source=str(path)).version
    new_value = round(0.30 + 0.01 * (i % 40), 4)
    changes = {"orchestration.cusum_k": new_value}
    new = render_changes(old.decode(), changes).encode()
    new_version = parse_config_text(new.decode(), source="new").version
    n_records = len(read_audit_records(audit))
    point = delay = None
    if i % 2 == 0:
        point = FAULT_POINTS[(i // 2) % len(FAULT_POINTS)]
    else:
        delay = rng.uniform(0.0, 1.2 * duration)
    status, _ = attempt(path, changes, version, now, point, delay)
    after = path.read_bytes()
    state = "old" if after == old else "new" if after == new else "torn"
    verified_after_kill = verify_audit_log(audit)
    applied_by_kill = [r for r in read_audit_records(audit)[n_records:] if r["event"] == "MUTATION_APPLIED"]

    out = promote(path, changes, decision(version), now=now, lock_timeout=10)  # the retried step
    records = read_audit_records(audit)[n_records:]
    print(json.dumps({
        "i": i, "point": point, "delay": delay, "killed": os.WIFSIGNALED(status),
        "exit": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
        "state_after_kill": state, "verified_after_kill": verified_after_kill,
        "applied_by_kill": len(applied_by_kill),
        "rerun": {"promoted": out.promoted, "stale": out.stale, "reason": out.reason},
        "final_is_new": path.read_bytes() == new, "version": version, "new_version": new_version,
        "new_value": new_value, "records": records, "verified": verify_audit_log(audit),
    }), flush=True)
"""


def _run_driver(code, *args):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    for var in ("USP_MUTATION_FAULT", "USP_MUTATION_PAUSE", "USP_AUDIT_HMAC_KEY", "USP_CONFIG_PATH"):
        env.pop(var, None)
    proc = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=env, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


@pytest.fixture
def repo(tmp_path):
    (tmp_path / "repo" / "config").mkdir(parents=True)
    path = tmp_path / "repo" / "config" / "config.toml"
    path.write_text(render_toml(), encoding="utf-8")
    return path


def _applied(records, row):
    return [r for r in records if r["event"] == "MUTATION_APPLIED"
            and (r["config_version_before"], r["config_version_after"]) == (row["version"], row["new_version"])]


@pytest.mark.slow  # ~10 s on 2 idle cores: 24 forked promoters (plus 24 reruns), each fsyncing 5-6 files
def test_sigkill_during_promotion_leaves_old_or_new_config_and_a_rerun_promotes_once(repo):
    n = 24
    measured, *rows = _run_driver(DRIVER, repo, n)
    assert measured["measured_s"] > 0 and len(rows) == n
    assert {r["point"] for r in rows if r["point"]} == set(FAULT_POINTS)
    for row in rows:
        # the kill left the old or the new file, never a mix, and an audit log that verifies
        assert row["state_after_kill"] in ("old", "new"), row
        assert row["verified_after_kill"] == [True, []], row
        if row["point"] is not None:
            assert row["killed"], row  # every named point is reached by a valid promotion
        # the retried decision completes the promotion: the file holds exactly the challenger
        assert row["final_is_new"] and row["verified"] == [True, []], row
        applied = _applied(row["records"], row)
        assert len(applied) <= 1, row  # never promoted twice
        assert all(r["trigger"] == "promotion" and r["delta"] == {"orchestration.cusum_k": [r["delta"]
                   ["orchestration.cusum_k"][0], row["new_value"]]} for r in applied), row
        # whether or not the kill came after the replace, the rerun completes the promotion exactly once: a file
        # that already holds this decision's write is audited as applied (if it was not) instead of "stale"
        assert row["rerun"]["promoted"] and not row["rerun"]["stale"] and len(applied) == 1, row
        assert (applied[0]["config_version_before"], applied[0]["config_version_after"]) == (
            row["version"], row["new_version"]), row
    outcomes = {(r["state_after_kill"], bool(_applied(r["records"], r))) for r in rows}
    assert ("old", True) in outcomes and ("new", True) in outcomes  # both sides of the replace were hit

    cfg = load_config(repo, environ={})
    assert cfg["orchestration.cusum_k"] == rows[-1]["new_value"] and cfg.version == rows[-1]["new_version"]
    audit = repo.parent.parent / "audit" / "mutations.jsonl"
    assert verify_audit_log(audit) == (True, [])
    records = read_audit_records(audit)
    assert [r["seq"] for r in records] == list(range(len(records)))
    assert sum(r["event"] == "MUTATION_APPLIED" for r in records) <= n
    for tmp_dir in (repo.parent, repo.parent / "backups"):
        assert not list(tmp_dir.glob(".*.tmp")), list(tmp_dir.iterdir())


PARTIAL_DRIVER = r"""
import datetime as dt, json, os, sys
from pathlib import Path
from usp_core.config.audit import read_audit_records
from usp_core.config.mutation import FAULT_ENV, parse_config_text
from usp_core.promotion import promote
from usp_core.promotion.gate import PromotionDecision

path = Path(sys.argv[1])
audit = path.parent.parent / "audit" / "mutations.jsonl"
now = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
version = parse_config_text(path.read_text(), source=str(path)).version
decision = PromotionDecision(True, "promote: sigkill test", champion_score=1.0, challenger_score=0.9,
                             improvement=0.1, dm_stat=-3.0, p_value=0.001, champion_version=version)
pid = os.fork()
if pid == 0:
    os.environ[FAULT_ENV] = "replaced"  # after os.replace, before the directory fsync and the audit append
    promote(path, {"orchestration.cusum_k": 0.7}, decision, now=now)
    os._exit(0)
os.waitpid(pid, 0)
out = promote(path, {"orchestration.cusum_k": 0.7}, decision, now=now)
print(json.dumps({"promoted": out.promoted, "stale": out.stale, "records": read_audit_records(audit),
                  "version": version, "new_version": parse_config_text(path.read_text(), source="x").version}))
"""


def test_rerun_after_a_kill_between_replace_and_audit_records_the_promotion_once(repo):
    (row,) = _run_driver(PARTIAL_DRIVER, repo)
    assert load_config(repo, environ={})["orchestration.cusum_k"] == 0.7
    applied = [r for r in row["records"] if r["event"] == "MUTATION_APPLIED"]
    assert len(applied) == 1, row["records"]
    assert (applied[0]["config_version_before"], applied[0]["config_version_after"]) == (
        row["version"], row["new_version"])


REGISTRY_DRIVER = r"""
import datetime as dt, json, os, sys
from pathlib import Path
from usp_core.config.mutation import FAULT_ENV, parse_config_text
from usp_core.promotion import promote
from usp_core.promotion.gate import PromotionDecision

path, uri, artifacts = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
now = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
version = parse_config_text(path.read_text(), source=str(path)).version
decision = PromotionDecision(True, "promote: sigkill test", champion_score=1.0, challenger_score=0.9,
                             improvement=0.1, dm_stat=-3.0, p_value=0.001, champion_version=version)

def registry():
    from usp_core.promotion.registry import ConfigRegistry
    return ConfigRegistry.for_config(path, uri, artifact_location=artifacts)

def in_child(fn):  # MLflow is first touched in forked children, so the parent forks with no open engine
    pid = os.fork()
    if pid == 0:
        code = 3
        try:
            fn()
            code = 0
        finally:
            os._exit(code)
    return os.waitpid(pid, 0)[1]

assert in_child(lambda: registry().reconcile(path)) == 0  # champion alias -> the current config

def killed_promotion():
    os.environ[FAULT_ENV] = "audited"  # the file is replaced and audited; the alias is not moved yet
    promote(path, {"orchestration.cusum_k": 0.7}, decision, registry=registry(), now=now)

in_child(killed_promotion)
reg = registry()
out = promote(path, {"orchestration.cusum_k": 0.7}, decision, registry=reg, now=now)  # the retried step
print(json.dumps({"stale": out.stale, "promoted": out.promoted,
                  "file_version": parse_config_text(path.read_text(), source="x").version,
                  "champion_alias": reg.alias_version("champion")}))
"""


@pytest.mark.slow  # the MLflow SQLite store migrates its schema on first use (~10 s)
def test_rerun_after_a_kill_before_the_alias_moves_realigns_the_champion_alias(repo, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (row,) = _run_driver(REGISTRY_DRIVER, repo, uri, tmp_path / "artifacts")
    assert load_config(repo, environ={})["orchestration.cusum_k"] == 0.7  # the file was promoted
    assert row["promoted"] and not row["stale"]
    assert row["champion_alias"][1] == row["file_version"], row
