"""evaluate_and_promote / promote without a registry: the gate decides, the audit log records the decision."""

import numpy as np

from usp_core.config.audit import read_audit_records, verify_audit_log
from usp_core.config.loader import load_config
from usp_core.config.render import render_toml
from usp_core.promotion import evaluate_and_promote


def _repo(tmp_path):
    (tmp_path / "config").mkdir()
    path = tmp_path / "config" / "config.toml"
    path.write_text(render_toml(), encoding="utf-8")
    return path


def _fake_backtest(edge, seed=0, n=300):
    rng = np.random.default_rng(seed)
    champ = 1.0 + 0.3 * np.abs(rng.standard_normal((3, n)))
    chal = champ - edge + 0.05 * rng.standard_normal((3, n))

    def backtest(cfg, panel, folds=None):
        losses = champ if cfg["orchestration.cusum_k"] == 0.5 else chal
        return {"objective": float(np.nanmean(losses)), "holdout_losses": losses, "folds": "F"}

    return backtest


def test_better_challenger_is_written_and_audited(tmp_path):
    path = _repo(tmp_path)
    out = evaluate_and_promote(path, {"cusum_k": 0.7}, panel=None, backtest=_fake_backtest(0.05))
    assert out.decision.promote and out.promoted and out.mlflow_run_id is None
    assert load_config(path, environ={})["orchestration.cusum_k"] == 0.7
    (rec,) = read_audit_records(tmp_path / "audit" / "mutations.jsonl")
    assert rec["event"] == "MUTATION_APPLIED" and rec["trigger"] == "promotion"
    assert rec["objective"]["p_value"] == out.decision.p_value < 0.05
    assert rec["reason"].startswith("promote")


def test_noise_only_challenger_is_rejected_and_audited(tmp_path):
    path = _repo(tmp_path)
    before = path.read_bytes()
    out = evaluate_and_promote(path, {"cusum_k": 0.7}, panel=None, backtest=_fake_backtest(0.0))
    assert not out.promoted and path.read_bytes() == before
    (rec,) = read_audit_records(tmp_path / "audit" / "mutations.jsonl")
    assert rec["event"] == "MUTATION_REJECTED" and rec["reason"].startswith("gate: reject")
    assert rec["delta"] == {"orchestration.cusum_k": [0.5, 0.7]}
    assert verify_audit_log(tmp_path / "audit" / "mutations.jsonl")[0]
