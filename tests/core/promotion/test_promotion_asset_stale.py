"""The champion_config asset applies a promotion_decision only to the config version it judged."""

import dagster as dg
import pytest

from usp_core.config.audit import read_audit_records
from usp_core.config.loader import load_config
from usp_core.config.mutation import atomic_write_config
from usp_core.config.render import render_toml
from usp_pipeline.defs.common.resources import ConfigStoreResource, MLflowTrackerResource
from usp_pipeline.defs.promotion.assets import champion_config

pytestmark = pytest.mark.slow  # the MLflow SQLite store migrates its schema on first use (~10 s)


def _decision(champion_version):
    return {"promote": True, "reason": "promote: test", "champion_score": 1.0, "challenger_score": 0.9,
            "improvement": 0.1, "dm_stat": -3.0, "p_value": 0.001, "n_steps": 300, "dm_lag": 4,
            "challenger_params": {"orchestration.cusum_k": 0.7}, "challenger_version": "c",
            "champion_version": champion_version, "campaign_mlflow_run_url": None}


def _materialise(tmp_path, path, decision):
    @dg.asset(name="promotion_decision")
    def judged() -> dict:
        return decision

    resources = {"config_store": ConfigStoreResource(config_path=str(path)),
                 "mlflow": MLflowTrackerResource(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")}
    result = dg.materialize([judged, champion_config], resources=resources, instance=dg.DagsterInstance.ephemeral())
    (event,) = [e for e in result.get_asset_materialization_events() if e.asset_key == dg.AssetKey("champion_config")]
    return {k: v.value for k, v in event.materialization.metadata.items()}


def test_stale_decision_materialises_unpromoted_and_is_audited(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root is ./mlruns
    (tmp_path / "config").mkdir()
    path = tmp_path / "config" / "config.toml"
    path.write_text(render_toml(), encoding="utf-8")
    a = load_config(path, environ={}).version
    b = atomic_write_config(path, {"cusum_k": 0.6}, "rollback").version_after
    holding_b = path.read_bytes()

    meta = _materialise(tmp_path, path, _decision(a))

    assert meta["promoted"] is False and meta["stale"] is True and meta["reason"].startswith("stale:")
    assert meta["config_version"] == b and meta["judged_version"] == a
    assert path.read_bytes() == holding_b
    rec = read_audit_records(tmp_path / "audit" / "mutations.jsonl")[-1]
    assert rec["expected_version"] == a and rec["found_version"] == b

    fresh = _materialise(tmp_path, path, _decision(b))
    assert fresh["promoted"] is True and fresh["stale"] is False and fresh["previous_version"] == b
    assert load_config(path, environ={})["orchestration.cusum_k"] == 0.7
