"""The Definitions load, validate with the Dagster CLI, and show the lineage of SPEC §7."""

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg

from usp_pipeline.definitions import defs

REPO = Path(__file__).resolve().parents[2]

EXPECTED_LINEAGE = {
    "raw_observations": set(),
    "validated_observations": {"raw_observations"},
    "quarantined_observations": {"raw_observations"},
    "champion_backtest": {"validated_observations"},
    "fast_tuning_campaign": {"validated_observations"},
    "deep_tuning_campaign": {"validated_observations"},
    "challenger_config": {"fast_tuning_campaign", "deep_tuning_campaign"},
    "promotion_decision": {"challenger_config", "validated_observations"},
    "champion_config": {"promotion_decision"},
    "optimization_report": {"fast_tuning_campaign", "deep_tuning_campaign", "champion_config"},
    "predictions": {"champion_config"},
}


def test_asset_keys_and_dependencies_snapshot():
    graph = defs.resolve_asset_graph()
    lineage = {
        key.to_user_string(): {p.to_user_string() for p in graph.get(key).parent_keys}
        for key in graph.get_all_asset_keys()
    }
    assert lineage == EXPECTED_LINEAGE


def test_assets_have_groups_descriptions_and_pools():
    graph = defs.resolve_asset_graph()
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        assert node.group_name in {"data", "backtest", "tuning", "promotion", "inference"}, key
        assert node.description and "\n" not in node.description.strip(), key
    pools = {k.to_user_string(): graph.get(k).pools for k in graph.get_all_asset_keys()}
    assert pools["champion_backtest"] == {"gpu"} and pools["fast_tuning_campaign"] == {"gpu"}
    assert pools["predictions"] == {"duckdb_writer"} and pools["champion_config"] == {"config_writer"}


def test_jobs_schedules_sensors_and_blocking_check():
    assert {j for j in ("daily_pipeline", "deep_tuning_job", "inference_job")} <= {
        j.name for j in defs.resolve_all_job_defs()
    }
    assert {s.name for s in defs.schedules} == {"daily_pipeline_schedule", "weekly_deep_tuning_schedule"}
    assert {s.name for s in defs.sensors} == {"incoming_files_sensor", "promoted_config_sensor", "run_failure_recorder"}
    checks = defs.resolve_asset_graph().asset_check_keys
    assert dg.AssetCheckKey(dg.AssetKey("validated_observations"), "validated_observations_schema") in checks
    from usp_pipeline.defs.data.assets import validated_observations_schema

    assert all(spec.blocking for spec in validated_observations_schema.check_specs)


def test_dagster_definitions_validate_passes(tmp_path):
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path), "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "dagster", "definitions", "validate", "-m", "usp_pipeline.definitions"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Validation successful" in proc.stdout + proc.stderr


def test_dagster_yaml_sets_pool_limits_and_loads():
    from dagster._core.instance.config import dagster_instance_config

    config, _ = dagster_instance_config(str(REPO / "dagster_home"))
    assert config["concurrency"]["pools"]["default_limit"] == 1
