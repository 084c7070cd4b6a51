"""atomic_write_config(expected_version=...): a compare-and-swap on the config version under the lock."""


from tests.conftest import audit_log_of as _audit
from usp_core.config.audit import read_audit_records, verify_audit_log
from usp_core.config.loader import load_config
from usp_core.config.mutation import STALE_PREFIX, atomic_write_config


def test_write_applies_when_the_version_is_the_expected_one(repo):
    a = load_config(repo, environ={}).version
    res = atomic_write_config(repo, {"cusum_k": 0.7}, "promotion", expected_version=a)
    assert res.applied and res.version_before == a
    assert load_config(repo, environ={})["orchestration.cusum_k"] == 0.7


def test_write_against_a_changed_version_is_rejected_and_audited_as_stale(repo):
    a = load_config(repo, environ={}).version
    b = atomic_write_config(repo, {"cusum_k": 0.6}, "manual").version_after
    holding_b = repo.read_bytes()

    res = atomic_write_config(repo, {"cusum_k": 0.7}, "promotion", expected_version=a)

    assert not res.applied and res.event == "MUTATION_REJECTED" and res.reason.startswith(STALE_PREFIX)
    assert res.version_before == res.version_after == b
    assert repo.read_bytes() == holding_b
    rec = read_audit_records(_audit(repo))[-1]
    assert rec["event"] == "MUTATION_REJECTED" and rec["trigger"] == "promotion"
    assert rec["expected_version"] == a and rec["found_version"] == b
    assert a in rec["reason"] and b in rec["reason"]
    assert rec["delta"] == {"orchestration.cusum_k": [0.6, 0.7]}
    assert verify_audit_log(_audit(repo)) == (True, [])
