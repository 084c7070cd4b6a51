"""atomic_write_config: validation, layout preservation, guards, backups, lock, rollback, show/diff."""

import datetime as dt
import os
import subprocess
import sys
import threading

import pytest

from tests.conftest import audit_log_of as _audit
from usp_core.config.audit import read_audit_records, verify_audit_log
from usp_core.config.loader import PredictorConfig, load_config
from usp_core.config.mutation import (
    MutationLockTimeout,
    atomic_write_config,
    config_lock,
    diff_configs,
    list_backups,
    lock_path_for,
    rollback,
    show_config,
    text_diff,
)
from usp_core.config.render import render_toml

T0 = dt.datetime(2025, 3, 1, 8, 0, tzinfo=dt.UTC)


def test_applied_mutation_changes_only_the_values(repo):
    before = repo.read_text()
    res = atomic_write_config(repo, {"orchestration.cusum_k": 0.7, "sinkhorn_alpha": 0.75}, "manual", now=T0)
    after = repo.read_text()
    assert res.applied and res.event == "MUTATION_APPLIED"
    assert res.delta == {"orchestration.cusum_k": (0.5, 0.7), "orchestration.sinkhorn_alpha": (0.5, 0.75)}
    changed = [line for line in text_diff(before, after).splitlines() if line[:1] in "+-" and line[:3] not in ("+++", "---")]
    assert changed == [
        "-sinkhorn_alpha = 0.5 # Volatility coupling of eps_t = max(eps_min, eps_0 (1 + alpha sigma_t)). [0, 5]; tier=fast",
        "+sinkhorn_alpha = 0.75 # Volatility coupling of eps_t = max(eps_min, eps_0 (1 + alpha sigma_t)). [0, 5]; tier=fast",
        "-cusum_k = 0.5 # CUSUM allowance k. [0, 5]; tier=fast",
        "+cusum_k = 0.7 # CUSUM allowance k. [0, 5]; tier=fast",
    ]
    cfg = load_config(repo, environ={})
    assert cfg["orchestration.cusum_k"] == 0.7 and cfg.version == res.version_after != res.version_before
    assert len(before.splitlines()) == len(after.splitlines())
    backups = list_backups(repo)
    assert [str(b) for b in backups] == [res.backup_path]
    assert backups[0].read_text() == before and (backups[0].stat().st_mode & 0o777) == 0o600
    assert res.version_before in backups[0].name and "20250301T080000" in backups[0].name
    (rec,) = read_audit_records(_audit(repo))
    assert rec["event"] == "MUTATION_APPLIED" and rec["delta"]["orchestration.cusum_k"] == [0.5, 0.7]
    assert rec["config_version_before"] == res.version_before and rec["backup_path"] == res.backup_path
    assert not list(repo.parent.glob(".*.tmp"))


@pytest.mark.parametrize("changes, why", [
    ({"core.seed": 7}, "locked by the schema"),
    ({"audit.audit_log": "x.jsonl"}, "locked by the schema"),
    ({"orchestration.no_such_key": 1.0}, "unknown config key"),
    ({"orchestration.cusum_k": "big"}, "expected a number"),
    ({"orchestration.cusum_k": 9.0}, "out of range"),
    ({"orchestration.grace_period_steps": 2.5}, "expected an integer"),
    ({"orchestration.stiffness_low": 190.0, "orchestration.stiffness_high": 150.0}, "must be <"),
    ({"orchestration.cusum_k": 0.5}, "no change"),
    ({"orchestration.cusum_h": 12.0}, "max_relative_change"),
])
def test_rejected_mutation_leaves_file_and_is_audited(repo, changes, why):
    before = repo.read_bytes()
    res = atomic_write_config(repo, changes, "promotion", objective={"champion": 1.0}, mlflow_run_id="r1")
    assert not res.applied and why in res.reason
    assert repo.read_bytes() == before and not list_backups(repo)
    (rec,) = read_audit_records(_audit(repo))
    assert rec["event"] == "MUTATION_REJECTED" and why in rec["reason"]
    assert rec["mlflow_run_id"] == "r1" and rec["objective"] == {"champion": 1.0}


def test_policy_locked_keys_are_rejected(tmp_path):
    values = dict(PredictorConfig.default())
    values["mutation_policy.locked_keys"] = ("orchestration.cusum_k",)
    path = tmp_path / "config.toml"
    path.write_text(render_toml(values))
    res = atomic_write_config(path, {"cusum_k": 0.6}, "manual", audit_log=tmp_path / "a.jsonl")
    assert not res.applied and "mutation_policy.locked_keys" in res.reason
    assert atomic_write_config(path, {"cusum_h": 6.0}, "manual", audit_log=tmp_path / "a.jsonl").applied


def test_rate_limit_blocks_the_third_promotion_within_an_hour(repo):
    ok1 = atomic_write_config(repo, {"cusum_k": 0.6}, "promotion", now=T0)
    ok2 = atomic_write_config(repo, {"cusum_k": 0.7}, "promotion", now=T0 + dt.timedelta(minutes=20))
    manual = atomic_write_config(repo, {"cusum_k": 0.8}, "manual", now=T0 + dt.timedelta(minutes=30))
    blocked = atomic_write_config(repo, {"cusum_k": 0.9}, "promotion", now=T0 + dt.timedelta(minutes=40))
    later = atomic_write_config(repo, {"cusum_k": 0.9}, "promotion", now=T0 + dt.timedelta(minutes=61))
    assert ok1.applied and ok2.applied and manual.applied and not blocked.applied and later.applied
    assert "rate limit" in blocked.reason and "max_promotions_per_hour=2" in blocked.reason
    events = [r["event"] for r in read_audit_records(_audit(repo))]
    assert events == ["MUTATION_APPLIED"] * 3 + ["MUTATION_REJECTED", "MUTATION_APPLIED"]
    assert verify_audit_log(_audit(repo)) == (True, [])


def test_delta_old_value_is_the_file_value_and_backups_never_collide(repo):
    r1 = atomic_write_config(repo, {"cusum_k": 0.6}, "manual", now=T0)
    r2 = atomic_write_config(repo, {"cusum_k": 0.65}, "manual", now=T0)  # same timestamp
    assert r2.delta == {"orchestration.cusum_k": (0.6, 0.65)}
    assert r1.backup_path != r2.backup_path and len(list_backups(repo)) == 2
    r3 = rollback(repo, now=T0)
    r4 = rollback(repo, now=T0)
    assert len({r1.backup_path, r2.backup_path, r3.backup_path, r4.backup_path}) == 4


def test_rollback_restores_exact_previous_bytes_and_walks_back(repo):
    v0 = repo.read_bytes()
    atomic_write_config(repo, {"cusum_k": 0.6}, "manual")
    v1 = repo.read_bytes()
    atomic_write_config(repo, {"cusum_h": 6.0}, "manual")
    res = rollback(repo)
    assert repo.read_bytes() == v1 and res.event == "ROLLBACK"
    assert res.delta == {"orchestration.cusum_h": (6.0, 5.0)}
    rollback(repo)
    assert repo.read_bytes() == v0
    recs = read_audit_records(_audit(repo))
    assert [r["event"] for r in recs] == ["MUTATION_APPLIED"] * 2 + ["ROLLBACK"] * 2
    assert verify_audit_log(_audit(repo))[0]
    v1_version = PredictorConfig.default().replace({"cusum_k": 0.6}).version
    rollback(repo, to_version=v1_version)
    assert repo.read_bytes() == v1
    with pytest.raises(Exception, match="no valid backup"):
        rollback(repo, to_version="0123456789ab")


def test_stale_lock_of_a_dead_process_is_cleared(repo):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock = lock_path_for(repo)
    lock.write_text(dead.stdout)
    (repo.parent / ".config.toml.999.deadbeef.tmp").write_text("partial")
    res = atomic_write_config(repo, {"cusum_k": 0.6}, "manual")
    assert res.applied and res.stale_lock_pid == int(dead.stdout)
    assert "stale lock" in read_audit_records(_audit(repo))[-1]["reason"]
    assert not list(repo.parent.glob(".*.tmp")) and lock.read_text() == ""


def test_live_lock_holder_times_out_a_second_writer(repo):
    held, release = threading.Event(), threading.Event()

    def holder():
        with config_lock(repo):
            held.set()
            release.wait(5)

    t = threading.Thread(target=holder)
    t.start()
    held.wait(5)
    try:
        assert lock_path_for(repo).read_text().strip() == str(os.getpid())
        with pytest.raises(MutationLockTimeout, match="held by pid"):
            atomic_write_config(repo, {"cusum_k": 0.6}, "manual", lock_timeout=0.2)
    finally:
        release.set()
        t.join()
    assert atomic_write_config(repo, {"cusum_k": 0.6}, "manual", lock_timeout=1.0).applied


def test_show_and_diff(repo, tmp_path):
    other = tmp_path / "other.toml"
    other.write_text(repo.read_text())
    atomic_write_config(other, {"cusum_k": 0.6}, "manual", audit_log=tmp_path / "a.jsonl")
    assert diff_configs(repo, other) == {"orchestration.cusum_k": (0.5, 0.6)}
    assert diff_configs(repo, repo) == {}
    text = show_config(repo, section="orchestration")
    assert PredictorConfig.default().version in text and "orchestration.cusum_k = 0.5" in text
    assert "core.seed" not in text
