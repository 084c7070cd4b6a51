"""Resources: config store, MLflow tracker, Optuna storage, DuckDB, workload sizes.

Every store defaults to an embedded file under ``$DAGSTER_HOME`` and switches to a server by environment
(``USP_CONFIG_PATH``, ``MLFLOW_TRACKING_URI``, ``USP_OPTUNA_STORAGE``, ``USP_DUCKDB_PATH``); the file sensor
watches ``USP_INCOMING_DIR`` (default ``data/incoming``).
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from usp_core.paths import config_path, duckdb_path, incoming_dir


class ConfigStoreResource(dg.ConfigurableResource):
    """The operative ``config.toml`` (source of truth of the champion) and its audit log."""

    config_path: str = ""
    audit_log: str = ""

    def path(self) -> Path:
        return config_path(self.config_path or None)

    def load(self):
        from usp_core.config import load_config

        return load_config(self.path())

    def audit_path(self) -> Path:
        from usp_core.config.mutation import resolve_audit_log

        return resolve_audit_log(self.path(), self.load(), self.audit_log or None)


class MLflowTrackerResource(dg.ConfigurableResource):
    """Where MLflow runs go (own thin resource: a URI, an experiment and UI links; not dagster-mlflow)."""

    tracking_uri: str = ""
    experiment: str = "usp-tuning"
    backtest_experiment: str = "usp-backtests"

    def uri(self) -> str:
        """``tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else SQLite under ``$DAGSTER_HOME/mlflow/``."""
        from usp_core.tuning.tracking import default_tracking_uri

        return self.tracking_uri or default_tracking_uri()


class OptunaStorageResource(dg.ConfigurableResource):
    """Optuna storage URL: a JournalStorage file by default, ``sqlite:///`` or ``postgresql://`` by env."""

    url: str = ""

    def storage_url(self) -> str:
        from usp_core.tuning.optimizer import default_storage_url

        return self.url or default_storage_url()


class DuckDBResource(dg.ConfigurableResource):
    """The DuckDB file of observations, predictions, predictor states and quarantine."""

    path: str = ""

    def database_path(self) -> Path:
        return duckdb_path(self.path or None)

    def store(self):
        from usp_core.inference import PredictionStore

        return PredictionStore(self.database_path())


class WorkloadResource(dg.ConfigurableResource):
    """What a pipeline run works on and its sizes; 0 or empty means "all" / "the config's value". The demo sets
    small ones. ``series``: the series of the observation store to use (empty: every stored series, the first
    ``max_series`` by id when > 0); ``max_length``: the newest points per series."""

    series: list[str] = []
    max_series: int = 0
    max_length: int = 0
    fast_trials: int = 0
    deep_trials: int = 0
    workers: int = 1
    incoming_dir: str = ""

    def incoming_path(self) -> Path:
        """The folder the file sensor watches: ``incoming_dir``, else ``$USP_INCOMING_DIR``, else data/incoming."""
        return incoming_dir(self.incoming_dir or None)
