"""MLflow model registry of the configuration (SPEC §6).

Each registered-model version's artifact is a config TOML logged to an MLflow run (``config/config.toml``)
and registered with ``MlflowClient.create_model_version`` on that run's artifact URI; the version carries the
tag ``config_version``. Aliases: ``champion`` (what ``config.toml`` holds) and ``challenger`` (the last
candidate). ``config.toml`` is the source of truth; :meth:`ConfigRegistry.reconcile` re-aligns the alias.
The model registry needs a database backend, so the local default is SQLite under ``dagster_home/mlflow``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from usp_core.config.mutation import parse_config_text
from usp_core.tuning.tracking import default_tracking_uri, ensure_experiment

CHAMPION = "champion"
CHALLENGER = "challenger"
CONFIG_ARTIFACT = "config/config.toml"
EXPERIMENT = "usp-promotion"


@dataclasses.dataclass(frozen=True)
class ReconcileResult:
    changed: bool
    model_version: str
    config_version: str
    previous_model_version: str | None


class ConfigRegistry:
    """Registered model ``name`` whose versions are config files; thin wrapper over ``MlflowClient``."""

    def __init__(self, tracking_uri: str | None = None, *, name: str = "usp-predictor",
                 experiment: str = EXPERIMENT, artifact_location: str | None = None, client: Any = None,
                 run_tags: Mapping[str, str] | None = None):
        from mlflow import MlflowClient

        if client is not None:
            self.tracking_uri = tracking_uri or getattr(client, "_registry_uri", None) or client.tracking_uri
            self.client = client
        else:
            self.tracking_uri = tracking_uri or default_tracking_uri()
            self.client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
        self.name = name
        self.run_tags = dict(run_tags or {})  # on every run this registry starts (e.g. the Dagster run's link)
        self._experiment = experiment
        self._artifact_location = artifact_location
        self._experiment_id: str | None = None

    @classmethod
    def for_config(cls, config_path: str | os.PathLike[str], tracking_uri: str | None = None, **kw: Any) -> ConfigRegistry:
        """A registry named by ``promotion.registered_model_name`` of the config at ``config_path``."""
        cfg = parse_config_text(Path(config_path).read_text(encoding="utf-8"), source=str(config_path))
        uri = tracking_uri or default_tracking_uri()
        return cls(uri, name=cfg["promotion.registered_model_name"], **kw)

    @property
    def experiment_id(self) -> str:
        if self._experiment_id is None:
            self._experiment_id = ensure_experiment(self.client, self._experiment, self._artifact_location)
        return self._experiment_id

    def _ensure_model(self) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_registered_model(self.name)
        except MlflowException:
            self.client.create_registered_model(
                self.name, description="USP predictor configuration; each version's artifact is config.toml")

    def start_run(self, *, run_name: str, tags: Mapping[str, str] | None = None) -> str:
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags={**self.run_tags, **dict(tags or {})})
        return run.info.run_id

    def register_config(self, config_text: str, *, run_id: str | None = None, alias: str | None = None,
                        tags: Mapping[str, str] | None = None, run_name: str = "config") -> str:
        """Log ``config_text`` as ``config/config.toml`` of a run and register it; returns the model version."""
        cfg = parse_config_text(config_text, source="registry")
        own_run = run_id is None
        if own_run:
            run_id = self.start_run(run_name=run_name, tags={"config_version": cfg.version, **dict(tags or {})})
        self.client.log_text(run_id, config_text, CONFIG_ARTIFACT)
        artifact_uri = self.client.get_run(run_id).info.artifact_uri
        if own_run:
            self.client.set_terminated(run_id)
        self._ensure_model()
        mv = self.client.create_model_version(
            self.name, source=f"{artifact_uri}/{Path(CONFIG_ARTIFACT).parent}", run_id=run_id,
            tags={"config_version": cfg.version, **dict(tags or {})})
        if alias is not None:
            self.client.set_registered_model_alias(self.name, alias, mv.version)
        return str(mv.version)

    def alias_version(self, alias: str) -> tuple[str, str] | None:
        """``(model version, config version)`` the alias points to, or None."""
        from mlflow.exceptions import MlflowException

        try:
            mv = self.client.get_model_version_by_alias(self.name, alias)
        except MlflowException:
            return None
        return str(mv.version), mv.tags.get("config_version", "")

    def version_for(self, config_version: str) -> str | None:
        """The newest model version whose config has ``config_version``."""
        from mlflow.exceptions import MlflowException

        try:
            versions = self.client.search_model_versions(f"name='{self.name}'")
        except MlflowException:
            return None
        matches = [int(v.version) for v in versions if v.tags.get("config_version") == config_version]
        return str(max(matches)) if matches else None

    def set_alias(self, alias: str, model_version: str) -> None:
        self.client.set_registered_model_alias(self.name, alias, model_version)

    def download_config(self, model_version: str) -> str:
        mv = self.client.get_model_version(self.name, model_version)
        run = self.client.get_run(mv.run_id)
        import mlflow.artifacts

        local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path=CONFIG_ARTIFACT,
                                                    tracking_uri=self.tracking_uri)
        return Path(local).read_text(encoding="utf-8")

    def reconcile(self, config_path: str | os.PathLike[str]) -> ReconcileResult:
        """Point ``champion`` at the version holding ``config_path``'s config (registering it if absent)."""
        text = Path(config_path).read_text(encoding="utf-8")
        cfg = parse_config_text(text, source=str(config_path))
        current = self.alias_version(CHAMPION)
        if current is not None and current[1] == cfg.version:
            return ReconcileResult(False, current[0], cfg.version, current[0])
        model_version = self.version_for(cfg.version)
        if model_version is None:
            model_version = self.register_config(text, tags={"trigger": "reconcile"}, run_name="reconcile")
        self.set_alias(CHAMPION, model_version)
        return ReconcileResult(True, model_version, cfg.version, None if current is None else current[0])

    def log_decision(self, decision: Any, challenger_text: str, *, champion_version: str,
                     tags: Mapping[str, str] | None = None) -> tuple[str, str]:
        """One MLflow run per gate decision (scores, p-value, reason) whose artifact is the candidate config,
        registered with alias ``challenger``; returns ``(run_id, model version)``."""
        challenger = parse_config_text(challenger_text, source="challenger")
        run_id = self.start_run(run_name="promotion-decision", tags={
            "config_version": challenger.version, "champion_config_version": champion_version,
            "decision": "promote" if decision.promote else "reject", **dict(tags or {})})
        metrics = {k: float(getattr(decision, k)) for k in
                   ("champion_score", "challenger_score", "improvement", "dm_stat", "p_value")}
        for k, v in metrics.items():
            if v == v and abs(v) != float("inf"):
                self.client.log_metric(run_id, k, v)
        self.client.log_param(run_id, "promote", str(bool(decision.promote)))
        self.client.set_tag(run_id, "reason", decision.reason[:5000])
        version = self.register_config(challenger_text, run_id=run_id, alias=CHALLENGER,
                                       tags={"trigger": "promotion-candidate"})
        self.client.set_terminated(run_id)
        return run_id, version


def reconcile(config_path: str | os.PathLike[str], client: Any = None, *, name: str | None = None,
              tracking_uri: str | None = None) -> ReconcileResult:
    """Re-align the ``champion`` alias with ``config_path`` (``client``: an ``MlflowClient`` or None)."""
    if name is None:
        cfg = parse_config_text(Path(config_path).read_text(encoding="utf-8"), source=str(config_path))
        name = cfg["promotion.registered_model_name"]
    if client is None:
        registry = ConfigRegistry(tracking_uri or default_tracking_uri(), name=name)
    else:
        registry = ConfigRegistry(tracking_uri, name=name, client=client)
    return registry.reconcile(config_path)
