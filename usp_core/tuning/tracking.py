"""Thin MLflow tracking of tuning campaigns (SPEC §5): one parent run per campaign, one nested child
run per trial. Uses ``MlflowClient`` only (no global active-run state), so it is safe from threads and
from several worker processes.

One metric name across parent and trials: a trial's ``objective`` is its score, the parent's ``objective`` the
campaign's best, so one column of the runs table compares them; the parent also carries
``objective_best_so_far`` stepped by trial number (its chart is the campaign's convergence) and
``fold_objective`` is stepped by fold index. Runs carry a link to the Dagster run that launched them.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from usp_core.paths import dagster_home

REPO_ROOT = Path(__file__).resolve().parents[2]


def default_tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI`` or a SQLite store under ``dagster_home/mlflow`` (MLflow 3's robust
    local backend; the file store is deprecated)."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    root = dagster_home() / "mlflow"
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_DEVELOPMENT = "custom_model_development"  # MLflow 3's UI opens runs and metrics, not GenAI traces


def ensure_experiment(client: Any, name: str, artifact_location: str | None = None) -> str:
    """The id of experiment ``name``, created if missing (artifacts next to a local store), tagged as model
    development so that the MLflow UI opens on runs rather than on its GenAI pages."""
    found = client.get_experiment_by_name(name)
    if found is None:
        location = artifact_location or default_artifact_root(client.tracking_uri)
        try:
            return client.create_experiment(name, artifact_location=location,
                                            tags={EXPERIMENT_KIND_TAG: MODEL_DEVELOPMENT})
        except Exception:  # another worker created it first
            found = client.get_experiment_by_name(name)
            if found is None:
                raise
    if found.tags.get(EXPERIMENT_KIND_TAG) != MODEL_DEVELOPMENT:
        client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, MODEL_DEVELOPMENT)
    return found.experiment_id


DATABASE_SCHEMES = frozenset({"postgresql", "mysql", "mssql"})
"""SQLAlchemy dialects MLflow accepts as a backend store besides SQLite."""


def default_artifact_root(tracking_uri: str) -> str | None:
    """Artifacts next to a local SQLite store, under ``dagster_home/mlflow/artifacts`` for another database store
    used without a server (MLflow's own default is ``./mlruns`` of whatever directory the process runs in); a
    server or a file store chooses its own."""
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri.removeprefix("sqlite:///"))
        return (db.parent / "artifacts").resolve().as_uri()
    scheme = tracking_uri.partition(":")[0].partition("+")[0]
    if scheme in DATABASE_SCHEMES:
        return (dagster_home() / "mlflow" / "artifacts").resolve().as_uri()
    return None


def git_sha(root: Path = REPO_ROOT) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def mlflow_ui_url(tracking_uri: str, page: str) -> str:
    """A page of the MLflow UI serving ``tracking_uri`` (the server itself, or ``mlflow ui``'s local default),
    opened in the UI's model-training view (MLflow 3 remembers a GenAI/model-training switch per browser and
    starts on GenAI; the ``workflowType`` query parameter selects the view)."""
    base = tracking_uri if tracking_uri.startswith("http") else os.environ.get("USP_MLFLOW_UI_URL", "http://127.0.0.1:5000")
    return f"{base.rstrip('/')}/#/{page}?workflowType=machine_learning"


def dagster_run_url(run_id: str) -> str:
    """The Dagster UI page of run ``run_id`` (``$USP_DAGSTER_URL``, default the local ``dagster dev`` address)."""
    base = os.environ.get("USP_DAGSTER_URL", "http://127.0.0.1:3000")
    return f"{base.rstrip('/')}/runs/{run_id}"


def dagster_link_tags(run_id: str | None) -> dict[str, str]:
    """Tags linking an MLflow run to the Dagster run that made it; the description (rendered as markdown by the
    MLflow UI) holds the clickable link."""
    if not run_id:
        return {}
    url = dagster_run_url(run_id)
    return {"usp.dagster_run_id": run_id, "usp.dagster_run_url": url,
            "mlflow.note.content": f"Launched by Dagster run [{run_id}]({url})."}


def _param_value(value: Any) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def log_finished_run(tracking_uri: str, experiment: str, *, kind: str, run_name: str, metrics: Mapping[str, float],
                     params: Mapping[str, Any] = (), tags: Mapping[str, str] = (), artifacts: Sequence[Path] = (),
                     artifact_path: str = "plots") -> str:
    """One finished MLflow run (e.g. a backtest): metrics, params, tags and files; returns its UI URL."""
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    experiment_id = ensure_experiment(client, experiment)
    run = client.create_run(experiment_id, run_name=run_name, tags=dict(tags))
    now = int(time.time() * 1000)
    client.log_batch(run.info.run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
                     params=[Param(k, _param_value(v)) for k, v in dict(params).items()],
                     tags=[RunTag("usp.kind", kind)])
    for path in artifacts:
        client.log_artifact(run.info.run_id, str(path), artifact_path=artifact_path)
    client.set_terminated(run.info.run_id)
    return mlflow_ui_url(tracking_uri, f"experiments/{experiment_id}/runs/{run.info.run_id}")


class CampaignTracker:
    """MLflow runs of one campaign. ``start_campaign`` makes (or, on resume, re-opens) the parent run."""

    def __init__(self, tracking_uri: str | None = None, experiment: str = "usp-tuning",
                 artifact_location: str | None = None):
        from mlflow.tracking import MlflowClient

        self.tracking_uri = tracking_uri or default_tracking_uri()
        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        self.experiment_name = experiment
        self.experiment_id = ensure_experiment(self.client, experiment, artifact_location)
        self.parent_run_id: str | None = None

    @classmethod
    def attach(cls, tracking_uri: str, parent_run_id: str) -> CampaignTracker:
        """A tracker on the existing parent run ``parent_run_id`` (an extra worker process of a campaign): its
        trials become children of that run, in that run's experiment; it never starts a parent of its own."""
        from mlflow.tracking import MlflowClient

        self = cls.__new__(cls)
        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.experiment_id = self.client.get_run(parent_run_id).info.experiment_id
        self.experiment_name = self.client.get_experiment(self.experiment_id).name
        self.parent_run_id = parent_run_id
        return self

    def start_campaign(self, name: str, tags: Mapping[str, Any]) -> str:
        """The parent run of campaign ``name``; an open one of the same study (tag ``usp.study_uid``, else
        ``usp.study``) is reused, so a resumed or multi-worker campaign keeps one parent run while a new
        study of the same name (another storage, a fresh start) gets its own."""
        key, value = ("study_uid", tags["study_uid"]) if tags.get("study_uid") else ("study", tags.get("study", name))
        query = (f"tags.`usp.{key}` = '{value}' and attributes.status = 'RUNNING' "
                 f"and tags.`usp.kind` = 'campaign'")
        open_runs = self.client.search_runs([self.experiment_id], filter_string=query, max_results=1)
        if open_runs:
            self.parent_run_id = open_runs[0].info.run_id
        else:
            run_tags = {f"usp.{k}": str(v) for k, v in tags.items()}
            run_tags["usp.kind"] = "campaign"
            run_tags.update(dagster_link_tags(tags.get("dagster_run_id")))
            run = self.client.create_run(self.experiment_id, tags=run_tags, run_name=name)
            self.parent_run_id = run.info.run_id
        return self.parent_run_id

    def log_trial(self, number: int, *, params: Mapping[str, Any], state: str, value: float | None,
                  fold_values: Sequence[float], config_version: str, seconds: float,
                  started_at: float | None = None, user_tags: Mapping[str, Any] | None = None) -> str:
        """One nested child run per trial (already finished: logged in one batch). The run spans from
        ``started_at`` (epoch seconds, the trial's start) to now; ``trial_seconds`` is the trial's share of its
        batch's wall time (the trials of a batch are evaluated together)."""
        from mlflow.entities import Metric, Param, RunTag

        assert self.parent_run_id is not None, "start_campaign first"
        now = int(time.time() * 1000)
        tags = {"mlflow.parentRunId": self.parent_run_id, "usp.kind": "trial", "usp.trial": str(number),
                "usp.state": state, "usp.config_version": config_version}
        tags.update({f"usp.{k}": str(v) for k, v in (user_tags or {}).items()})
        start = now if started_at is None else int(started_at * 1000)
        run = self.client.create_run(self.experiment_id, start_time=start, tags=tags, run_name=f"trial-{number:05d}")
        metrics = [Metric("fold_objective", float(v), now, step) for step, v in enumerate(fold_values)]
        if value is not None:
            metrics.append(Metric("objective", float(value), now, 0))
        metrics.append(Metric("trial_seconds", float(seconds), now, 0))
        self.client.log_batch(run.info.run_id, metrics=metrics,
                              params=[Param(k, _param_value(v)) for k, v in sorted(params.items())],
                              tags=[RunTag("usp.trial_number", str(number))])
        status = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}.get(state, "FINISHED")
        self.client.set_terminated(run.info.run_id, status=status, end_time=now)
        return run.info.run_id

    def log_progress(self, *, best_so_far: Mapping[int, float], n_finished: int, step: int) -> None:
        """The campaign's best objective after each trial number in ``best_so_far`` and the finished count."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric("n_finished_trials", float(n_finished), now, step)]
        metrics += [Metric("objective_best_so_far", float(v), now, n) for n, v in sorted(best_so_far.items())]
        self.client.log_batch(self.parent_run_id, metrics=metrics)

    def finish_campaign(self, *, best_params: Mapping[str, Any] | None, best_value: float | None,
                        summary: Mapping[str, Any], artifacts: Sequence[Path] = (), status: str = "FINISHED") -> None:
        from mlflow.entities import Metric, Param, RunTag

        assert self.parent_run_id is not None
        now = int(time.time() * 1000)
        params = [Param(f"best.{k}", _param_value(v)) for k, v in sorted((best_params or {}).items())]
        existing = self.client.get_run(self.parent_run_id).data.params
        params = [p for p in params if p.key not in existing]  # MLflow params are write-once: tags follow resumes
        tags = [RunTag(f"usp.best.{k}", _param_value(v)) for k, v in sorted((best_params or {}).items())]
        metrics = [Metric(k, float(v), now, 0) for k, v in summary.items() if isinstance(v, int | float)]
        if best_value is not None:
            metrics.append(Metric("objective", float(best_value), now, 0))
        self.client.log_batch(self.parent_run_id, metrics=metrics, params=params, tags=tags)
        for path in artifacts:
            self.client.log_artifact(self.parent_run_id, str(path), artifact_path="report")
        self.client.set_terminated(self.parent_run_id, status=status)

    def run_url(self) -> str:
        return mlflow_ui_url(self.tracking_uri, f"experiments/{self.experiment_id}/runs/{self.parent_run_id}")

    def list_artifacts(self, path: str = "report") -> list[str]:
        return [a.path for a in self.client.list_artifacts(self.parent_run_id, path)]
