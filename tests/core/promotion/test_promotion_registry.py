"""MLflow registry of the config: promote -> aliases, rejected decision, rollback re-points champion, reconcile."""

import pytest

from usp_core.config.audit import read_audit_records, verify_audit_log
from usp_core.config.loader import PredictorConfig
from usp_core.config.mutation import atomic_write_config, rollback
from usp_core.config.render import render_toml
from usp_core.promotion.gate import PromotionDecision
from usp_core.promotion.promote import promote
from usp_core.promotion.registry import CHALLENGER, CHAMPION, ConfigRegistry, reconcile

pytestmark = pytest.mark.slow  # the MLflow SQLite store migrates its schema on first use (~10 s)


def _decision(promote_it):
    return PromotionDecision(promote_it, "promote: test" if promote_it else "reject: not significant (test)",
                             champion_score=1.0, challenger_score=0.9, improvement=0.1, dm_stat=-3.0,
                             p_value=0.001 if promote_it else 0.3)


def test_promotion_rollback_and_reconcile(tmp_path):
    (tmp_path / "config").mkdir()
    path = tmp_path / "config" / "config.toml"
    path.write_text(render_toml(), encoding="utf-8")
    original = path.read_bytes()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    reg = ConfigRegistry.for_config(path, uri, artifact_location=str(tmp_path / "artifacts"))
    assert reg.name == "usp-predictor"

    first = reg.reconcile(path)
    assert first.changed and first.model_version == "1" and reg.alias_version(CHAMPION) == ("1", first.config_version)
    assert not reg.reconcile(path).changed

    out = promote(path, PredictorConfig.default().replace({"cusum_k": 0.7}), _decision(True), registry=reg)
    assert out.promoted and out.challenger_model_version == out.champion_model_version == "2"
    new_version = out.mutation.version_after
    assert reg.alias_version(CHAMPION) == ("2", new_version) == reg.alias_version(CHALLENGER)
    assert reg.download_config("2") == path.read_text()
    run = reg.client.get_run(out.mlflow_run_id)
    assert run.data.metrics["p_value"] == 0.001 and run.data.tags["decision"] == "promote"
    assert read_audit_records(tmp_path / "audit" / "mutations.jsonl")[-1]["mlflow_run_id"] == out.mlflow_run_id

    rejected = promote(path, {"cusum_k": 0.8}, _decision(False), registry=reg)
    assert not rejected.promoted and rejected.challenger_model_version == "3"
    assert reg.alias_version(CHAMPION)[0] == "2" and reg.alias_version(CHALLENGER)[0] == "3"
    rec = read_audit_records(tmp_path / "audit" / "mutations.jsonl")[-1]
    assert rec["event"] == "MUTATION_REJECTED" and "not significant" in rec["reason"]

    res = rollback(path, registry=reg)
    assert path.read_bytes() == original and res.version_after == first.config_version
    assert reg.alias_version(CHAMPION) == ("1", first.config_version)

    atomic_write_config(path, {"cusum_h": 6.0}, "manual")  # config.toml moves; the alias is now stale
    fixed = reconcile(path, reg.client)
    assert fixed.changed and fixed.previous_model_version == "1" and fixed.model_version == "4"
    assert reg.alias_version(CHAMPION)[1] == PredictorConfig.default().replace({"cusum_h": 6.0}).version
    assert verify_audit_log(tmp_path / "audit" / "mutations.jsonl") == (True, [])


def test_experiments_are_model_development_with_artifacts_next_to_the_store(tmp_path, monkeypatch):
    """MLflow 3 opens GenAI pages unless the experiment says otherwise; artifacts of a local store stay next to
    it (not under the working directory's mlruns/)."""
    from usp_core.tuning.tracking import EXPERIMENT_KIND_TAG, MODEL_DEVELOPMENT, CampaignTracker

    monkeypatch.chdir(tmp_path)
    (tmp_path / "config").mkdir()
    path = tmp_path / "config" / "config.toml"
    path.write_text(render_toml(), encoding="utf-8")
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    (tmp_path / "store").mkdir()
    reg = ConfigRegistry.for_config(path, uri)
    tracker = CampaignTracker(uri, experiment="usp-tuning")
    for exp_id in (reg.experiment_id, tracker.experiment_id):
        exp = tracker.client.get_experiment(exp_id)
        assert exp.tags[EXPERIMENT_KIND_TAG] == MODEL_DEVELOPMENT
        assert exp.artifact_location.startswith((tmp_path / "store" / "artifacts").as_uri())
    tracker.client.set_experiment_tag(tracker.experiment_id, EXPERIMENT_KIND_TAG, "genai_development")
    again = CampaignTracker(uri, experiment="usp-tuning")  # an experiment made before the tag is re-tagged
    assert again.client.get_experiment(again.experiment_id).tags[EXPERIMENT_KIND_TAG] == MODEL_DEVELOPMENT
    assert not (tmp_path / "mlruns").exists()


def test_a_rejected_first_decision_still_names_the_champion(tmp_path):
    """A fresh registry whose first decision is a rejection: the champion alias names the file's config, the
    challenger alias the rejected candidate (the demo showed only @challenger and champion_model_version None)."""
    (tmp_path / "config").mkdir()
    path = tmp_path / "config" / "config.toml"
    path.write_text(render_toml(), encoding="utf-8")
    reg = ConfigRegistry.for_config(path, f"sqlite:///{tmp_path / 'mlflow.db'}", artifact_location=str(tmp_path / "a"))
    out = promote(path, {"cusum_k": 0.8}, _decision(False), registry=reg)
    assert not out.promoted and out.champion_model_version is not None
    assert reg.alias_version(CHAMPION) == (out.champion_model_version, PredictorConfig.default().version)
    assert reg.alias_version(CHALLENGER)[0] == out.challenger_model_version != out.champion_model_version
