"""A gate decision is applied only to the config version it judged (compare-and-swap, SPEC §7 rev. 2)."""

import dataclasses

import numpy as np

from tests.conftest import audit_log_of as _audit
from usp_core.config.audit import read_audit_records, verify_audit_log
from usp_core.config.loader import load_config
from usp_core.config.mutation import atomic_write_config, rollback
from usp_core.promotion import evaluate_and_promote, promote
from usp_core.promotion.gate import PromotionDecision
from usp_core.promotion.promote import is_stale_reason


def _version(path):
    return load_config(path, environ={}).version


def _decision(champion_version, promote_it=True):
    return PromotionDecision(promote_it, "promote: test" if promote_it else "reject: not significant (test)",
                             champion_score=1.0, challenger_score=0.9, improvement=0.1, dm_stat=-3.0,
                             p_value=0.001 if promote_it else 0.3, champion_version=champion_version)


def _assert_stale_record(path, expected, found):
    rec = read_audit_records(_audit(path))[-1]
    assert rec["event"] == "MUTATION_REJECTED" and rec["trigger"] == "promotion"
    assert is_stale_reason(rec["reason"])
    assert rec["expected_version"] == expected and rec["found_version"] == found
    assert rec["config_version_before"] == rec["config_version_after"] == found
    assert verify_audit_log(_audit(path)) == (True, [])


def test_decision_on_the_current_version_promotes(repo):
    a = _version(repo)
    out = promote(repo, {"cusum_k": 0.7}, _decision(a))
    assert out.promoted and not out.stale and out.mutation.version_before == a
    assert load_config(repo, environ={})["orchestration.cusum_k"] == 0.7


def test_decision_made_before_a_rollback_is_rejected_as_stale(repo):
    a = _version(repo)
    b = promote(repo, {"cusum_k": 0.7}, _decision(a)).mutation.version_after
    judged_b = _decision(b)
    assert rollback(repo).version_after == a  # e.g. an operator rolls back while the gate runs
    holding_a = repo.read_bytes()

    out = promote(repo, {"cusum_h": 6.0}, judged_b)

    assert not out.promoted and out.stale and is_stale_reason(out.reason)
    assert repo.read_bytes() == holding_a
    _assert_stale_record(repo, expected=b, found=a)


def test_second_of_two_decisions_on_the_same_champion_is_stale(repo):
    a = _version(repo)
    first, second = _decision(a), _decision(a)
    b = promote(repo, {"cusum_k": 0.7}, first).mutation.version_after
    holding_b = repo.read_bytes()

    out = promote(repo, {"cusum_k": 0.8}, second)

    assert not out.promoted and out.stale and repo.read_bytes() == holding_b
    _assert_stale_record(repo, expected=a, found=b)


def test_keep_champion_decision_on_a_changed_config_is_recorded_as_stale(repo):
    a = _version(repo)
    b = atomic_write_config(repo, {"cusum_k": 0.6}, "manual").version_after
    out = promote(repo, {"cusum_k": 0.7}, _decision(a, promote_it=False))
    assert not out.promoted and out.stale
    _assert_stale_record(repo, expected=a, found=b)


class _RegistryThatRaces:
    """Changes the config while the decision is being logged: after promote's first read, before the lock."""

    def __init__(self, path):
        self.path, self.logged = path, 0

    def log_decision(self, decision, candidate_text, *, champion_version):
        self.logged += 1
        atomic_write_config(self.path, {"cusum_k": 0.6}, "manual")
        return "run-1", "7"

    def reconcile(self, path):
        raise AssertionError("a stale decision must not move the champion alias")


def test_change_between_first_read_and_lock_is_caught_under_the_lock(repo):
    a = _version(repo)
    registry = _RegistryThatRaces(repo)

    out = promote(repo, {"cusum_k": 0.7}, _decision(a), registry=registry)

    b = _version(repo)
    assert registry.logged == 1 and b != a
    assert not out.promoted and out.stale and out.champion_model_version is None
    assert load_config(repo, environ={})["orchestration.cusum_k"] == 0.6
    _assert_stale_record(repo, expected=a, found=b)


def test_stale_decision_is_not_logged_to_the_registry(repo):
    a = _version(repo)
    atomic_write_config(repo, {"cusum_k": 0.6}, "manual")
    registry = _RegistryThatRaces(repo)
    out = promote(repo, {"cusum_k": 0.7}, _decision(a), registry=registry)
    assert out.stale and registry.logged == 0 and out.mlflow_run_id is None


def test_decision_without_a_champion_version_is_applied_as_before(repo):
    atomic_write_config(repo, {"cusum_k": 0.6}, "manual")
    out = promote(repo, {"cusum_k": 0.7}, dataclasses.replace(_decision("x"), champion_version=None))
    assert out.promoted and not out.stale


def test_evaluate_and_promote_records_the_file_version_it_judged(repo):
    a = _version(repo)

    def backtest(cfg, panel, folds=None):
        rng = np.random.default_rng(0)
        losses = 1.0 + 0.3 * np.abs(rng.standard_normal((3, 300)))
        if cfg["orchestration.cusum_k"] != 0.5:
            losses = losses - 0.05
        return {"objective": float(losses.mean()), "holdout_losses": losses, "folds": "F"}

    out = evaluate_and_promote(repo, {"cusum_k": 0.7}, panel=None, backtest=backtest)
    assert out.decision.champion_version == a and out.promoted
