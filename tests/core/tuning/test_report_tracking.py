"""Optimisation report, plots and MLflow tracking of a small campaign (fake evaluator)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_campaigns import fake_evaluator  # noqa: E402

import usp_core  # noqa: F401
from usp_core.tuning.optimizer import BayesianMetaOptimizer
from usp_core.tuning.tracking import CampaignTracker


@pytest.mark.slow
def test_report_and_plots_are_mlflow_artifacts(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = CampaignTracker(uri, experiment="usp-tuning-test",
                              artifact_location=(tmp_path / "artifacts").as_uri())
    opt = BayesianMetaOptimizer(fake_evaluator, {"n_trials": 12, "batch_size": 4, "n_startup_trials": 4},
                                storage="memory:", campaign="report", tracker=tracker)
    opt.optimize()
    report = opt.generate_optimization_report(tmp_path / "report")
    assert report.n_trials == 12 and report.n_complete + report.n_pruned + report.n_failed == 12
    assert report.best_value == opt.best_value() and report.best_params == opt.best_params()
    assert set(report.importances) == set(opt.space.names) and report.importance_method in ("fanova", "ped-anova")
    assert len(report.convergence) == 12 and report.convergence[-1] == report.best_value
    assert "parameter importances" in report.text and "cusum_k" in report.text
    assert set(report.plots) == {"campaign", "parallel_coordinates"}
    meta = report.to_metadata()
    assert meta["best_value"] == report.best_value

    artifacts = set(tracker.list_artifacts("report"))
    assert {"report/report.txt", "report/report.json", "report/campaign.png",
            "report/parallel_coordinates.png"} <= artifacts
    text = Path(tracker.client.download_artifacts(tracker.parent_run_id, "report/report.txt", str(tmp_path))).read_text()
    assert all(name in text for name in report.importances)

    client = tracker.client
    parent = client.get_run(tracker.parent_run_id)
    assert parent.data.tags["usp.tier"] == "fast" and parent.data.tags["usp.study"] == opt.study_name
    assert parent.info.status == "FINISHED"
    children = client.search_runs([tracker.experiment_id], f"tags.mlflow.parentRunId = '{tracker.parent_run_id}'")
    assert len(children) == 12
    child = children[0]
    assert set(child.data.params) == set(opt.space.names)
    folds = client.get_metric_history(child.info.run_id, "fold_objective")
    assert [m.step for m in folds] == [0, 1, 2, 3]
    assert child.info.end_time >= child.info.start_time

    # one number everywhere: the stored report, the parent's metrics and the best-so-far curve agree exactly
    stored = json.loads(Path(tracker.client.download_artifacts(tracker.parent_run_id, "report/report.json",
                                                               str(tmp_path / "dl"))).read_text())
    metrics = parent.data.metrics
    assert metrics["objective"] == stored["best_value"] == report.best_value
    assert {k.removeprefix("importance."): v for k, v in metrics.items() if k.startswith("importance.")} == pytest.approx(
        stored["importances"], rel=1e-12)
    assert metrics["wall_time_s"] == pytest.approx(stored["wall_time_s"], rel=1e-12)
    curve = client.get_metric_history(tracker.parent_run_id, "objective_best_so_far")
    latest = {}
    for m in sorted(curve, key=lambda m: m.timestamp):
        latest[m.step] = m.value
    assert latest == {n: pytest.approx(v) for n, v in enumerate(report.convergence) if v == v}
    steps = [latest[n] for n in sorted(latest)]
    assert all(b <= a for a, b in zip(steps, steps[1:], strict=False))


def test_parent_run_is_reopened_by_the_same_study_only(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    meta = {"n_trials": 4, "batch_size": 2, "n_startup_trials": 2}

    def campaign(storage, n):
        tracker = CampaignTracker(uri, experiment="usp-tuning-test", artifact_location=(tmp_path / "a").as_uri())
        opt = BayesianMetaOptimizer(fake_evaluator, meta, storage=storage, campaign="same-name", tracker=tracker)
        opt.optimize(n)  # leaves the parent open, like a killed campaign
        return tracker.parent_run_id

    first = campaign(f"sqlite:///{tmp_path / 'a.db'}", 2)
    assert campaign(f"sqlite:///{tmp_path / 'a.db'}", 4) == first  # resumed: same parent
    other = campaign(f"sqlite:///{tmp_path / 'b.db'}", 2)  # same study name, another storage
    assert other != first
    client = CampaignTracker(uri, experiment="usp-tuning-test").client
    for parent, n in ((first, 4), (other, 2)):
        assert len(client.search_runs([client.get_run(parent).info.experiment_id],
                                      f"tags.mlflow.parentRunId = '{parent}'")) == n


@pytest.mark.parametrize(("uri", "expected"), [
    ("sqlite:///{home}/store/mlflow.db", "{home}/store/artifacts"),
    ("postgresql+psycopg2://postgres@127.0.0.1:5432/test", "{home}/dagster_home/mlflow/artifacts"),
    ("mysql://u@db/mlflow", "{home}/dagster_home/mlflow/artifacts"),
    ("http://127.0.0.1:5000", None),
    ("file:///{home}/mlruns", None),
])
def test_artifacts_never_land_in_the_working_directory(tmp_path, monkeypatch, uri, expected):
    from usp_core.tuning.tracking import default_artifact_root

    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    root = default_artifact_root(uri.format(home=tmp_path))
    assert root == (None if expected is None else Path(expected.format(home=tmp_path)).resolve().as_uri())
