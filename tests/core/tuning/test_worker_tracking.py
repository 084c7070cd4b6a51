"""MLflow tracking of multi-worker campaigns (issue 12): every trial of every worker process is a nested child
run of the campaign's one parent run, and the parent's summary accounts for all workers' trials."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState
from test_campaigns import fake_evaluator

import usp_core  # noqa: F401  (x64)
from usp_core.tuning.optimizer import make_storage
from usp_core.tuning.tracking import CampaignTracker


class BarrierEvaluator:
    """The fake evaluator, but each process's first call waits until two processes have called it, so both
    the main process and the extra worker evaluate trials (whatever their start-up times). Picklable: it is
    handed to the spawned worker."""

    def __init__(self, directory: str, parties: int = 2, timeout_s: float = 90.0):
        self.directory, self.parties, self.timeout_s = directory, parties, timeout_s

    def __call__(self, configs):
        d = Path(self.directory)
        (d / str(os.getpid())).write_text(" ".join(map(str, sorted(os.sched_getaffinity(0)))))
        deadline = time.monotonic() + self.timeout_s
        while len(list(d.iterdir())) < self.parties and time.monotonic() < deadline:
            time.sleep(0.05)
        return fake_evaluator(configs)


@pytest.mark.slow  # spawns a worker process (imports, MLflow store) and builds the report: ~15-25 s
def test_every_workers_trials_are_children_of_the_one_parent_run(tmp_path, monkeypatch, small_config):
    from usp_core.tuning import run_campaign

    uri = f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    (tmp_path / "mlflow").mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    monkeypatch.delenv("USP_OPTUNA_STORAGE", raising=False)
    (tmp_path / "barrier").mkdir()
    cfg = small_config.replace({"meta_optimization.batch_size": 2, "meta_optimization.n_startup_trials": 2})
    storage = f"journal://{tmp_path / 'optuna' / 'journal.log'}"

    own_cores = os.sched_getaffinity(0)
    result = run_campaign(cfg, np.zeros((1, 10)), tier="fast", n_trials=4, storage=storage, workers=2,
                          progress=False, campaign="workers-mlflow", evaluator=BarrierEvaluator(str(tmp_path / "barrier")),
                          report_dir=tmp_path / "report")
    assert os.sched_getaffinity(0) == own_cores  # restored after the campaign
    worker_cores = [set(map(int, f.read_text().split())) for f in (tmp_path / "barrier").iterdir()]
    if len(own_cores) >= 2:  # each process on a core of its own
        assert len(worker_cores) == 2 and all(len(c) == 1 for c in worker_cores)
        assert worker_cores[0] != worker_cores[1]

    study = optuna.load_study(study_name=result.study_name, storage=make_storage(storage))
    finished = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()]
    assert sorted(t.number for t in finished) == [0, 1, 2, 3]
    assert len({t.user_attrs["usp_worker"]["pid"] for t in finished}) == 2  # both processes did trials

    tracker = CampaignTracker(uri)
    client, parent_id = tracker.client, result.mlflow_run_id
    assert parent_id is not None
    parents = client.search_runs([tracker.experiment_id], "tags.`usp.kind` = 'campaign'")
    assert [r.info.run_id for r in parents] == [parent_id]  # the workers made no parents of their own
    children = client.search_runs([tracker.experiment_id], "tags.`usp.kind` = 'trial'")
    assert len(children) == len(finished)
    assert all(r.data.tags["mlflow.parentRunId"] == parent_id for r in children)
    numbers = sorted(int(r.data.tags["usp.trial"]) for r in children)
    assert numbers == sorted(t.number for t in finished)  # unique, one child per finished trial

    by_number = {t.number: t for t in finished}
    space_names = set(next(iter(by_number.values())).params)
    tag_keys = {frozenset(k for k in r.data.tags if k.startswith("usp.")) for r in children}
    assert len(tag_keys) == 1  # main's and worker's trials carry the same tags
    for r in children:
        t = by_number[int(r.data.tags["usp.trial"])]
        assert set(r.data.params) == space_names
        assert r.data.tags["usp.state"] == t.state.name
        if t.state == TrialState.COMPLETE:
            assert r.data.metrics["objective"] == pytest.approx(t.value)
            folds = client.get_metric_history(r.info.run_id, "fold_objective")
            assert [m.step for m in folds] == [0, 1, 2, 3]

    best = min(t.value for t in finished if t.state == TrialState.COMPLETE)
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    assert result.best_value == pytest.approx(best)
    assert parent.data.metrics["objective"] == pytest.approx(best)  # the column the trials' objective is in
    # the latest progress point covers all workers' trials
    assert parent.data.metrics["objective_best_so_far"] == pytest.approx(best)
    assert parent.data.metrics["n_finished_trials"] == len(finished)
    assert parent.data.metrics["n_complete"] == sum(t.state == TrialState.COMPLETE for t in finished)
