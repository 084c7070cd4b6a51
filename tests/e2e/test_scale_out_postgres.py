"""Scale-out profile: Optuna storage, MLflow backend store and Dagster run storage on PostgreSQL.

Skipped with a reason when PostgreSQL is not reachable at 127.0.0.1:5432 (database ``test``, trust auth).
"""

import socket
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PG = "postgresql://postgres@127.0.0.1:5432/test"
# SQLAlchemy 2.1 defaults postgresql:// to psycopg 3; the project ships psycopg2-binary
PG_SQLALCHEMY = PG.replace("postgresql://", "postgresql+psycopg2://")

pytestmark = [pytest.mark.slow, pytest.mark.postgres]


def _postgres_available() -> str | None:
    try:
        with socket.create_connection(("127.0.0.1", 5432), timeout=2):
            pass
        import psycopg2

        psycopg2.connect(PG, connect_timeout=3).close()
    except Exception as exc:  # any failure means: no usable server here
        return f"PostgreSQL not usable at {PG}: {exc}"
    return None


@pytest.fixture
def pg_schema():
    reason = _postgres_available()
    if reason:
        pytest.skip(reason)
    import psycopg2

    # one schema per store: Optuna and MLflow both keep an alembic_version table
    tag = uuid.uuid4().hex[:10]
    schemas = {store: f"usp_{store}_{tag}" for store in ("optuna", "mlflow", "dagster")}
    con = psycopg2.connect(PG)
    con.autocommit = True
    for schema in schemas.values():
        con.cursor().execute(f"CREATE SCHEMA {schema}")
    yield {store: f"{PG_SQLALCHEMY}?options=-csearch_path%3D{schema}" for store, schema in schemas.items()}
    for schema in schemas.values():
        con.cursor().execute(f"DROP SCHEMA {schema} CASCADE")
    con.close()


def test_daily_pipeline_on_postgres_stores(pipeline_home, pg_schema, monkeypatch):
    import dagster as dg
    import yaml

    urls = pg_schema
    monkeypatch.setenv("USP_OPTUNA_STORAGE", urls["optuna"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", urls["mlflow"])
    monkeypatch.setenv("DAGSTER_PG_URL", urls["dagster"])
    home = pipeline_home / "dagster_home"
    profile = yaml.safe_load((REPO / "usp_pipeline" / "profiles" / "dagster.postgres.yaml").read_text())
    (home / "dagster.yaml").write_text(yaml.safe_dump(profile))

    from usp_core.data.real import load_dev_panel
    from usp_core.inference import ingest_frame
    from usp_pipeline.definitions import ASSETS, default_resources
    from usp_pipeline.defs.common.jobs import DAILY_ASSETS
    from usp_pipeline.defs.common.resources import WorkloadResource
    from usp_pipeline.defs.data.assets import validated_observations_schema

    resources = {**default_resources(), "workload": WorkloadResource(max_series=1, max_length=160, fast_trials=2)}
    panel, _ = load_dev_panel(("sp500_return",), max_length=160)
    ingest_frame(panel, resources["duckdb"].store(), source="test")
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        result = dg.materialize([*ASSETS, validated_observations_schema], selection=dg.AssetSelection.assets(*DAILY_ASSETS),
                                resources=resources, instance=instance)
        assert result.success
        assert instance.get_run_by_id(result.run_id) is not None

    import optuna

    studies = optuna.get_all_study_summaries(storage=urls["optuna"])
    assert [s.n_trials for s in studies if s.study_name.startswith("usp-fast")] == [2]
    from mlflow import MlflowClient

    assert MlflowClient(tracking_uri=urls["mlflow"]).get_experiment_by_name("usp-tuning") is not None
