"""Storage, budget, resume and checkpoint logic of tuning campaigns, on a cheap deterministic fake evaluator."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

import usp_core  # noqa: F401  (x64)
from usp_core.config import ConfigError, PredictorConfig
from usp_core.config.schema import DEEP_TIER, FAST_TIER
from usp_core.tuning.checkpoint import IntegrityError, read_checkpoint
from usp_core.tuning.optimizer import AsyncMetaOptimizer, BayesianMetaOptimizer, TrialScore, study_name_for
from usp_core.tuning.space import SearchSpace

REPO = Path(__file__).resolve().parents[3]
PY = sys.executable


def fake_evaluator(configs):
    """Smooth deterministic loss of the fast+deep params, 4 'folds'."""
    out = []
    for c in configs:
        x = ((c["orchestration.cusum_k"] - 0.3) ** 2 + (c["orchestration.sinkhorn_alpha"] - 0.6) ** 2
             + 0.01 * c["kernels.log_sig_depth"] + 1e-4 * c["kernels.wtmm_buffer_size"]
             + 0.1 * math.log10(c["kernels.kernel_ridge_lambda"] / 1e-5) ** 2 / 10)
        folds = tuple(x * (1.0 + 0.1 * f) for f in range(4))
        out.append(TrialScore(float(np.mean(folds)), folds))
    return out


def history(study):
    return [(t.number, t.state, t.params, t.values) for t in sorted(study.trials, key=lambda t: t.number)]


# -- search space --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tier, fields", [("fast", FAST_TIER), ("deep", DEEP_TIER)])
def test_every_sampled_config_validates(tier, fields):
    base = PredictorConfig.default()
    space = SearchSpace(tier, base)
    assert set(space.names) == {f.name for f in fields}
    for f in fields:
        d = space.distributions[f.name]
        assert d.log == f.log
        assert d.low == base[f"meta_optimization.{f.name}_min"]
    # corners first (where the cross-field rules bite), then random points
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    corners = [{n: getattr(d, side) for n, d in space.distributions.items()} for side in ("low", "high")]
    corners.append({**corners[0], "stiffness_low": 500.0, "stiffness_high": 500.0,
                    "sinkhorn_epsilon_min": 0.1, "sinkhorn_epsilon_0": 0.05})
    for params in corners:
        cfg = space.config({k: v for k, v in params.items() if k in space.names})
        assert cfg["orchestration.stiffness_low"] < cfg["orchestration.stiffness_high"]
        assert cfg["orchestration.sinkhorn_epsilon_0"] >= cfg["orchestration.sinkhorn_epsilon_min"]
    for _ in range(300):
        trial = study.ask()
        cfg = space.config(space.suggest(trial))  # raises ConfigError if invalid
        study.tell(trial, 0.0)
        assert cfg["orchestration.entropy_window_floor"] <= cfg["orchestration.entropy_window"]


def test_repair_keeps_feasible_points_unchanged():
    space = SearchSpace("deep", PredictorConfig.default())
    params = {"stiffness_low": 100.0, "stiffness_high": 900.0, "sinkhorn_epsilon_min": 0.01, "sinkhorn_epsilon_0": 0.2}
    assert space.repair(params) == params
    with pytest.raises(ConfigError):
        PredictorConfig.default().replace({"orchestration.stiffness_low": 500.0, "orchestration.stiffness_high": 500.0})


# -- resume and checkpoints ----------------------------------------------------------------------------------

META = {"n_trials": 50, "batch_size": 5, "n_startup_trials": 10}


def test_base_params_only_when_every_value_is_a_point_of_its_distribution():
    base = PredictorConfig.default()
    space = SearchSpace("fast", base)
    assert space.base_params() == {p.name: base[p.field.key] for p in space.params}
    ints = [p for p in space.params if p.field.kind == "int" and space.distributions[p.name].step > 1]
    floats = [p for p in space.params if p.field.kind != "int"]
    assert ints and floats and base[floats[0].field.key] > 0
    d = space.distributions[ints[0].name]
    off_grid = {f"meta_optimization.{ints[0].name}_min": base[ints[0].field.key] - 1,
                f"meta_optimization.{ints[0].name}_max": base[ints[0].field.key] - 1 + 2 * d.step}
    beyond = {f"meta_optimization.{floats[0].name}_min": 0.25 * base[floats[0].field.key],
              f"meta_optimization.{floats[0].name}_max": 0.5 * base[floats[0].field.key]}
    for override in (off_grid, beyond):
        assert SearchSpace("fast", base.replace(override)).base_params() is None, override


def test_resume_from_checkpoint_equals_straight_run(tmp_path):
    first = BayesianMetaOptimizer(fake_evaluator, META, storage="memory:", campaign="resume")
    first.optimize(25)
    first.save_study(tmp_path / "ck.json")
    resumed = BayesianMetaOptimizer.load_study(tmp_path / "ck.json", fake_evaluator, META, storage="memory:")
    resumed.optimize(50)
    straight = BayesianMetaOptimizer(fake_evaluator, META, storage="memory:", campaign="resume")
    straight.optimize(50)
    assert len(straight.study.trials) == 50
    assert history(resumed.study) == history(straight.study)
    assert resumed.study.study_name == straight.study.study_name == study_name_for("resume", "fast")


def test_resume_from_storage_equals_straight_run(tmp_path):
    url = f"journal:///{tmp_path / 'j.log'}"
    BayesianMetaOptimizer(fake_evaluator, META, storage=url, campaign="c").optimize(20)
    again = BayesianMetaOptimizer(fake_evaluator, META, storage=url, campaign="c")
    again.optimize(30)
    again.optimize(30)  # the budget is a total: nothing more to do
    straight = BayesianMetaOptimizer(fake_evaluator, META, storage="memory:", campaign="c")
    straight.optimize(30)
    assert history(again.study) == history(straight.study)


@pytest.mark.parametrize("cap", [1, 3])
def test_a_campaign_explores_at_most_max_static_keys(cap):
    """Each static key is a compiled program: once the study holds ``max_static_keys`` of them, every batch takes
    the static params of the best complete trial so far, and each batch stays one static group."""
    opt = BayesianMetaOptimizer(fake_evaluator, {**META, "max_static_keys": cap}, storage="memory:", campaign="cap")
    opt.optimize(40)
    trials = sorted(opt.study.trials, key=lambda t: t.number)
    names = opt.space.static_names
    key = lambda t: tuple(t.params[n] for n in names)  # noqa: E731
    assert len({key(t) for t in trials}) == cap
    assert opt.evaluation_calls == -(-40 // META["batch_size"])  # one evaluator call (program) per batch
    for start in range(0, 40, META["batch_size"]):
        before = [t for t in trials[:start] if t.state == TrialState.COMPLETE]
        if len({key(t) for t in trials[:start]}) >= cap and before:
            assert key(trials[start]) == key(min(before, key=lambda t: (t.value, t.number)))
    unbounded = BayesianMetaOptimizer(fake_evaluator, {**META, "max_static_keys": None}, storage="memory:", campaign="cap")
    unbounded.optimize(40)
    assert len({key(t) for t in unbounded.study.trials}) > 3


def test_checkpoint_integrity(tmp_path):
    opt = BayesianMetaOptimizer(fake_evaluator, {"n_trials": 6, "batch_size": 3}, storage="memory:")
    opt.optimize()
    path = tmp_path / "ck.json"
    digest = opt.save_study(path)
    doc = read_checkpoint(path)
    assert doc["study_name"] == opt.study_name and len(doc["trials"]) == 6
    assert "distributions" in doc["trials"][0] and (tmp_path / "ck.json.sha256").read_text().startswith(digest)
    with pytest.raises(ValueError, match="holds study"):
        BayesianMetaOptimizer.load_study(path, fake_evaluator, storage="memory:", study_name="other")
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(IntegrityError):
        BayesianMetaOptimizer.load_study(path, fake_evaluator, storage="memory:")
    opt.save_study(path)
    (tmp_path / "ck.json.sha256").unlink()  # the digest is embedded: the sidecar only serves external tools
    assert len(BayesianMetaOptimizer.load_study(path, fake_evaluator, storage="memory:").study.trials) == 6
    path.unlink()
    with pytest.raises(FileNotFoundError):
        BayesianMetaOptimizer.load_study(path, fake_evaluator, storage="memory:")
    assert not list(tmp_path.glob(".*.tmp"))


def test_async_save_never_blocks_the_loop(tmp_path, monkeypatch):
    import usp_core.tuning.checkpoint as ckpt

    real_save, delay = ckpt.save_study, 0.3

    def slow_save(*a, **k):
        time.sleep(delay)  # a slow disk
        return real_save(*a, **k)

    monkeypatch.setattr(ckpt, "save_study", slow_save)
    path = tmp_path / "ck.json"
    t0 = time.perf_counter()
    AsyncMetaOptimizer(fake_evaluator, {"n_trials": 40, "batch_size": 4}, storage="memory:").optimize()
    baseline = time.perf_counter() - t0
    with AsyncMetaOptimizer(fake_evaluator, {"n_trials": 40, "batch_size": 4}, storage="memory:") as opt:
        t0 = time.perf_counter()
        submit = []
        orig = opt.save_study_async

        def timed(p):
            s = time.perf_counter()
            f = orig(p)
            submit.append(time.perf_counter() - s)
            return f

        opt.save_study_async = timed
        opt.optimize(checkpoint_path=path)
        loop = time.perf_counter() - t0
    # 10 batches -> 10 saves of 0.3 s each: a blocking loop would take >= baseline + 3 s
    assert len(submit) == 10 and max(submit) < 0.05, submit
    assert loop < baseline + 10 * delay / 2, (loop, baseline)
    assert len(read_checkpoint(path)["trials"]) == 40  # the last save holds the final study


# -- budget as a total, crashes, several workers ---------------------------------------------------------------

WORKER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    from test_campaigns import fake_evaluator
    from usp_core.tuning.optimizer import BayesianMetaOptimizer

    def slow(configs):
        time.sleep({sleep})
        return fake_evaluator(configs)

    opt = BayesianMetaOptimizer(slow, {{"n_trials": {n}, "batch_size": {batch}, "n_startup_trials": 4}},
                                storage={url!r}, campaign="workers", parallel=True, poll_interval_s=0.05)
    opt.optimize()
""")


def _spawn(url, n, *, batch=2, sleep=0.0):
    code = WORKER.format(tests=str(Path(__file__).parent), url=url, n=n, batch=batch, sleep=sleep)
    return subprocess.Popen([PY, "-c", code], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _assert_exact_budget(url, n):
    study = optuna.load_study(study_name=study_name_for("workers", "fast"),
                              storage=BayesianMetaOptimizer(fake_evaluator, storage=url, campaign="workers").storage)
    finished = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)]
    assert sorted(t.number for t in finished) == list(range(n))  # none lost, none duplicated, no overshoot
    assert all(t.state != TrialState.RUNNING for t in study.trials)
    assert all(t.number >= n for t in study.trials if t.state == TrialState.WAITING)
    assert len({json.dumps(t.params, sort_keys=True) for t in finished}) == n
    return study


@pytest.mark.slow
def test_killed_campaign_restarts_and_completes_exactly_the_budget(tmp_path):
    url = f"journal:///{tmp_path / 'j.log'}"
    n = 16
    proc = _spawn(url, n, sleep=0.4)
    storage = BayesianMetaOptimizer(fake_evaluator, storage=url, campaign="workers").storage
    deadline = time.time() + 60
    while time.time() < deadline:
        time.sleep(0.2)
        try:
            trials = optuna.load_study(study_name=study_name_for("workers", "fast"), storage=storage).trials
        except KeyError:
            continue
        if sum(t.state == TrialState.COMPLETE for t in trials) >= 4 and any(t.state == TrialState.RUNNING for t in trials):
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    trials = optuna.load_study(study_name=study_name_for("workers", "fast"), storage=storage).trials
    assert any(t.state == TrialState.RUNNING for t in trials) and len(trials) < n
    restart = _spawn(url, n)
    # a kill inside the journal's append leaves its lock file, which Optuna forcibly releases after ~20 s; a kill
    # between `ask` and the owner attribute leaves an ownerless trial, re-queued after the 60 s claim grace
    out, err = restart.communicate(timeout=300)
    assert restart.returncode == 0, err.decode()[-2000:]
    study = _assert_exact_budget(url, n)
    assert not any(t.state == TrialState.FAIL for t in study.trials)  # the killed trials were re-run


def _two_workers(url, n):
    procs = [_spawn(url, n, sleep=0.05) for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=180)
        assert p.returncode == 0, err.decode()[-2000:]
    study = _assert_exact_budget(url, n)
    owners = {t.user_attrs["usp_worker"]["pid"] for t in study.trials if t.number < n}
    assert len(owners) == 2  # both workers did trials


@pytest.mark.slow
def test_two_workers_on_one_journal_finish_the_budget(tmp_path):
    _two_workers(f"journal:///{tmp_path / 'j.log'}", 24)


def _postgres_url() -> str | None:
    try:
        import psycopg2
    except ImportError:
        return None
    for user in ("postgres", "root"):
        try:
            psycopg2.connect(host="127.0.0.1", port=5432, dbname="test", user=user, connect_timeout=2).close()
            return f"postgresql://{user}@127.0.0.1:5432/test"
        except psycopg2.OperationalError:
            continue
    return None


@pytest.mark.slow
@pytest.mark.postgres
def test_two_workers_on_postgresql_finish_the_budget():
    url = _postgres_url()
    if url is None:
        pytest.skip("PostgreSQL not reachable at 127.0.0.1:5432 (database test, user postgres/root, trust auth)")
    name = study_name_for("workers", "fast")
    from usp_core.tuning.optimizer import make_storage

    def drop():
        try:
            optuna.delete_study(study_name=name, storage=make_storage(url))
        except KeyError:
            pass

    drop()
    try:
        _two_workers(url, 20)
    finally:
        drop()


def test_budget_is_a_total_and_requeues_dead_workers_trials(tmp_path):
    url = f"journal:///{tmp_path / 'j.log'}"
    opt = BayesianMetaOptimizer(fake_evaluator, {"n_trials": 10, "batch_size": 3}, storage=url)
    opt.optimize(4)
    assert opt.n_finished() == 4
    # a trial left RUNNING by a dead process
    ghost = opt.study.ask()
    opt.storage.set_trial_user_attr(opt._trial_id(ghost.number), "usp_worker",
                                    {"host": opt.worker["host"], "pid": 2**22 + 7})
    opt.optimize(10)
    study = opt.study
    assert sorted(t.number for t in study.trials if t.state.is_finished()) == list(range(10))
    assert study.trials[ghost.number].state == TrialState.COMPLETE


def test_a_trial_asked_but_never_claimed_is_requeued_after_the_claim_grace(tmp_path):
    url = f"journal:///{tmp_path / 'j.log'}"
    # a worker killed between ``ask`` and writing its owner attribute leaves an ownerless RUNNING trial
    orphan = BayesianMetaOptimizer(fake_evaluator, {"n_trials": 6, "batch_size": 2}, storage=url).study.ask()
    patient = BayesianMetaOptimizer(fake_evaluator, {"n_trials": 6, "batch_size": 2}, storage=url)
    assert patient.requeue_stale_trials() == []  # within the grace a live worker may still be claiming it
    opt = BayesianMetaOptimizer(fake_evaluator, {"n_trials": 6, "batch_size": 2}, storage=url, claim_grace_s=0.0,
                                poll_interval_s=0.01)
    opt.optimize()
    trials = sorted(opt.study.trials, key=lambda t: t.number)
    assert [t.number for t in trials if t.state.is_finished()] == list(range(6))
    assert trials[orphan.number].state == TrialState.COMPLETE
    assert trials[orphan.number].user_attrs["usp_worker"] == opt.worker


def test_run_campaign_resumes_a_total_budget(tmp_path, capsys):
    from usp_core.tuning import run_campaign

    cfg = PredictorConfig.default().replace({"meta_optimization.batch_size": 4})
    url = f"journal:///{tmp_path / 'j.log'}"
    kw = dict(tier="fast", storage=url, tracking=False, evaluator=fake_evaluator, campaign="cli",
              report_dir=tmp_path / "report")
    first = run_campaign(cfg, np.zeros((1, 10)), n_trials=6, progress=True, **kw)
    assert first.n_finished == 6 and first.report.n_trials == 6
    second = run_campaign(cfg, np.zeros((1, 10)), n_trials=10, progress=False, checkpoint_path=tmp_path / "c.json", **kw)
    assert second.n_finished == 10 and second.study_name == first.study_name == study_name_for("cli", "fast")
    assert second.best_config["orchestration.cusum_k"] == second.best_params["cusum_k"]
    assert "fast tuning" in capsys.readouterr().err  # tqdm progress bar


def test_base_config_is_trial_zero_once_and_the_report_states_the_improvement(tmp_path):
    base = PredictorConfig.default()
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    meta = {"n_trials": 6, "batch_size": 3, "n_startup_trials": 2}
    opt = BayesianMetaOptimizer(fake_evaluator, meta, base, storage=storage, campaign="baseline")
    opt.optimize(3)
    # a second process on the same study (resume or extra worker) must not enqueue the baseline again
    again = BayesianMetaOptimizer(fake_evaluator, meta, base, storage=storage, campaign="baseline")
    again.optimize(6)
    trials = sorted(again.study.trials, key=lambda t: t.number)
    baselines = [t for t in trials if t.user_attrs.get("usp_baseline")]
    assert [t.number for t in baselines] == [0]
    assert trials[0].params == {f.name: base[f.key] for f in FAST_TIER}
    baseline_value = fake_evaluator([base])[0].objective
    assert trials[0].value == pytest.approx(baseline_value)
    report = again.generate_optimization_report(tmp_path / "report")
    assert report.baseline_value == pytest.approx(baseline_value)
    assert report.best_value <= baseline_value
    assert report.improvement == pytest.approx((baseline_value - report.best_value) / baseline_value)
    assert "base config value" in report.text


def test_worker_cores_gives_each_process_one_core(monkeypatch):
    from usp_core.tuning import campaign

    monkeypatch.setattr(campaign.os, "sched_getaffinity", lambda pid: {3, 1, 7})
    assert campaign.worker_cores(2) == [{1}, {3}]
    assert campaign.worker_cores(3) == [{1}, {3}, {7}]
    assert campaign.worker_cores(4) is None  # more workers than cores: left to the OS
    assert campaign.worker_cores(1) is None


def test_every_scored_trial_completes_with_its_objective_and_fold_values():
    """One run scores all folds of a trial, so nothing is pruned: a trial whose first folds trail the
    median still completes with its objective, and its folds are its intermediate values."""
    opt = BayesianMetaOptimizer(fake_evaluator, META, storage="memory:", campaign="no-pruning")
    opt.optimize(24)
    trials = opt.study.get_trials(deepcopy=False)
    assert len(trials) == 24 and all(t.state == TrialState.COMPLETE for t in trials)
    for t in trials:
        folds = t.user_attrs["fold_objectives"]
        assert t.value == pytest.approx(np.mean(folds), rel=1e-12)
        assert t.intermediate_values == {step: v for step, v in enumerate(folds)}
