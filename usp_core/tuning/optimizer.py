"""Bayesian meta-optimisation campaigns (SPEC §5): batched ask/tell TPE over the fast or deep tier,
persistent storage with a TOTAL trial budget, portable checkpoints, MLflow tracking and reports.

Invariants that make campaigns resumable and multi-worker safe:
- Only trials numbered ``0 .. budget-1`` are evaluated. Optuna assigns numbers atomically in every
  storage, so concurrent workers can never overshoot; a trial asked past the budget is handed back
  (WAITING) untouched. Finished (COMPLETE/PRUNED/FAIL) trials count towards the budget.
- A RUNNING trial whose worker died (same host and dead pid, or a heartbeat older than ``stale_after_s``)
  is re-queued in place (RUNNING -> WAITING, same number, same params): nothing lost or duplicated. So is a
  RUNNING trial with no owner older than ``claim_grace_s``: ``ask`` and the owner attribute are two
  storage writes, and a worker killed between them leaves a trial nobody's heartbeat will ever refresh.
- The sampler is re-seeded from (core seed, trial number) before each trial, so a campaign's params depend
  only on the study history: resuming from storage or a checkpoint reproduces an uninterrupted campaign
  (given batch boundaries at multiples of ``batch_size``).
- Trials of a batch share the static params of the batch's first trial (enqueued as fixed params), so a
  batch is one static group and is evaluated in one vmapped call; TPE samples the dynamic params.
- The study's creator enqueues the base config as trial 0 (user attr ``usp_baseline``): the campaign's best
  is never worse than where it started, and the report states the improvement.
- No pruning: one causal ``Predictor.run`` scores every fold of a trial at once (usp_core.backtest.runner),
  so a pruner could only discard an objective already computed. Per-fold values are reported as the trial's
  intermediate values (step = fold index) for Optuna's and MLflow's views.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import socket
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.samplers import TPESampler
from optuna.trial import FrozenTrial, TrialState

from usp_core.config.loader import ConfigError, PredictorConfig
from usp_core.durable import pid_alive
from usp_core.paths import dagster_home
from usp_core.tuning import checkpoint as ckpt
from usp_core.tuning.report import BASELINE_ATTR, OptimizationReport, build_report, convergence_curve
from usp_core.tuning.space import SearchSpace, TierName
from usp_core.tuning.tracking import CampaignTracker, git_sha

IntegrityError = ckpt.IntegrityError
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


@dataclass(frozen=True)
class TrialScore:
    """What an evaluator returns per config: the objective (lower is better) and per-fold values."""

    objective: float
    fold_objectives: tuple[float, ...]


BatchEvaluator = Callable[[Sequence[PredictorConfig]], Sequence[Any]]


def as_score(result: Any) -> TrialScore:
    """Accept a TrialScore, a backtest result (``objective`` + ``fold_objectives``) or a float."""
    if isinstance(result, TrialScore):
        return result
    if isinstance(result, int | float | np.floating):
        return TrialScore(float(result), (float(result),))
    folds = None
    for name in ("fold_objectives", "per_fold_objective", "fold_objective", "folds_objective"):
        folds = getattr(result, name, None)
        if folds is not None:
            break
    objective = float(result.objective)
    folds_t = tuple(float(v) for v in np.asarray(folds, dtype=float).ravel()) if folds is not None else (objective,)
    return TrialScore(objective, folds_t)


@dataclass(frozen=True)
class MetaOptimizationConfig:
    n_trials: int = 50
    n_startup_trials: int = 10
    multivariate: bool = True
    enable_deep_tuning: bool = False
    batch_size: int = 8
    seed: int = 42
    max_static_keys: int | None = None  # None: unbounded

    @classmethod
    def from_config(cls, cfg: PredictorConfig, overrides: Mapping[str, Any] | None = None) -> MetaOptimizationConfig:
        m = cfg.section("meta_optimization")
        values = dict(n_trials=m["n_trials"], n_startup_trials=m["n_startup_trials"], multivariate=m["multivariate"],
                      enable_deep_tuning=m["enable_deep_tuning"], batch_size=m["batch_size"], seed=cfg["core.seed"])
        values.update(overrides or {})
        if "max_static_keys" not in values:
            values["max_static_keys"] = m["deep_max_static_keys" if values["enable_deep_tuning"] else "fast_max_static_keys"]
        return cls(**values)

    @property
    def tier(self) -> TierName:
        return "deep" if self.enable_deep_tuning else "fast"


def trial_seed(seed: int, number: int) -> int:
    return int(np.random.SeedSequence([seed, number]).generate_state(1)[0])


class ReseededTPESampler(optuna.samplers.BaseSampler):
    """TPE seeded from (seed, trial number) at each trial: sampling depends only on the study history, never on
    how many trials this process has sampled before (resume = straight run). Each trial gets its own
    ``TPESampler(seed=trial_seed(seed, number))``: Optuna's public API has no way to re-seed a sampler's RNG."""

    def __init__(self, *, seed: int, **tpe_kwargs: Any):
        self._base_seed = seed
        self._tpe_kwargs = tpe_kwargs
        self._by_trial: dict[int, TPESampler] = {}

    def _fresh(self, trial: FrozenTrial) -> TPESampler:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            sampler = TPESampler(seed=trial_seed(self._base_seed, trial.number), **self._tpe_kwargs)
        self._by_trial[trial.number] = sampler
        return sampler

    def _for(self, trial: FrozenTrial) -> TPESampler:
        return self._by_trial.get(trial.number) or self._fresh(trial)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, Any]:
        return self._for(trial).infer_relative_search_space(study, trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, Any]) -> dict[str, Any]:
        return self._for(trial).sample_relative(study, trial, search_space)

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str, param_distribution: Any) -> Any:
        return self._for(trial).sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        # a fresh sampler each time a trial starts (also a requeued one), as re-seeding would
        self._fresh(trial).before_trial(study, trial)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values: Sequence[float] | None) -> None:
        self._for(trial).after_trial(study, trial, state, values)
        self._by_trial.pop(trial.number, None)

    def reseed_rng(self) -> None:
        """Nothing to re-seed: every trial's seed is fixed by its number."""


def default_storage_url() -> str:
    """``$USP_OPTUNA_STORAGE`` or a Journal file under ``dagster_home/optuna/`` (multi-process safe on a host)."""
    env = os.environ.get("USP_OPTUNA_STORAGE")
    if env:
        return env
    return f"journal://{dagster_home() / 'optuna' / 'journal.log'}"  # journal:// + an absolute path


def make_storage(url: str | optuna.storages.BaseStorage | None) -> optuna.storages.BaseStorage | str:
    """A storage from a URL: ``journal:///abs/path.log`` (or a bare ``*.log`` path) -> JournalStorage with a
    JournalFileBackend; ``sqlite:///``, ``postgresql://`` ... -> RDBStorage (via Optuna); ``memory:`` ->
    in-memory (single process only)."""
    if isinstance(url, optuna.storages.BaseStorage):
        return url
    url = url or default_storage_url()
    if url in ("memory", "memory:", ":memory:"):
        return optuna.storages.InMemoryStorage()
    if url.startswith("journal://") or (("://" not in url) and url.endswith(".log")):
        path = Path(url.removeprefix("journal://")) if url.startswith("journal://") else Path(url)
        path.parent.mkdir(parents=True, exist_ok=True)
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        return JournalStorage(JournalFileBackend(str(path)))
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}})
    return optuna.storages.RDBStorage(_with_installed_pg_driver(url), engine_kwargs={"pool_pre_ping": True})


def _with_installed_pg_driver(url: str) -> str:
    """SQLAlchemy 2.1 maps ``postgresql://`` to psycopg 3; fall back to psycopg2 (a project dependency)."""
    if not url.startswith(("postgresql://", "postgres://")):
        return url
    try:
        import psycopg  # noqa: F401

        return url
    except ImportError:
        return "postgresql+psycopg2://" + url.split("://", 1)[1]


def study_name_for(campaign: str, tier: str) -> str:
    """Deterministic study name of a campaign and tier."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", campaign).strip("-") or "campaign"
    return f"usp-{slug}-{tier}"


def _space_signature(space: SearchSpace) -> str:
    from optuna.distributions import distribution_to_json

    doc = {name: distribution_to_json(d) for name, d in sorted(space.distributions.items())}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def _finite_points(curve: list[float], numbers=None) -> dict[int, float]:
    """{trial number: best so far} of a convergence curve, at ``numbers`` (default all), NaN entries left out."""
    picks = range(len(curve)) if numbers is None else numbers
    return {n: curve[n] for n in picks if n < len(curve) and math.isfinite(curve[n])}


class BayesianMetaOptimizer:
    """Batched ask/tell TPE campaign over one tier's search space (SPEC §5)."""

    def __init__(
        self,
        evaluator: BatchEvaluator,
        meta_config: MetaOptimizationConfig | Mapping[str, Any] | None = None,
        base_config: PredictorConfig | None = None,
        *,
        storage: str | optuna.storages.BaseStorage | None = None,
        study_name: str | None = None,
        campaign: str = "default",
        tracker: CampaignTracker | None = None,
        tags: Mapping[str, Any] | None = None,
        parallel: bool = False,
        share_static_in_batch: bool = True,
        heartbeat_interval_s: float = 30.0,
        stale_after_s: float = 600.0,
        claim_grace_s: float = 60.0,
        poll_interval_s: float = 0.5,
        enqueue_baseline: bool = True,
    ):
        self.base_config = base_config if base_config is not None else PredictorConfig.default()
        if not isinstance(meta_config, MetaOptimizationConfig):
            meta_config = MetaOptimizationConfig.from_config(self.base_config, meta_config)
        self.meta_config = meta_config
        self.evaluator = evaluator
        self.tier: TierName = meta_config.tier
        self.space = SearchSpace(self.tier, self.base_config)
        self.campaign = campaign
        self.study_name = study_name or study_name_for(campaign, self.tier)
        self.storage = make_storage(storage)
        self.tracker = tracker
        self.tags = dict(tags or {})
        self.share_static_in_batch = share_static_in_batch
        self.heartbeat_interval_s = heartbeat_interval_s
        self.stale_after_s = stale_after_s
        self.claim_grace_s = claim_grace_s
        self.poll_interval_s = poll_interval_s
        self.worker = {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex[:12]}
        self.sampler = ReseededTPESampler(
            seed=meta_config.seed, multivariate=meta_config.multivariate,
            n_startup_trials=meta_config.n_startup_trials,
            constant_liar=parallel or meta_config.batch_size > 1)
        no_pruning = optuna.pruners.NopPruner()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            try:
                self.study = optuna.create_study(storage=self.storage, study_name=self.study_name,
                                                 direction="minimize", sampler=self.sampler, pruner=no_pruning)
                created = True
            except optuna.exceptions.DuplicatedStudyError:  # resumed, or another worker created it first
                self.study = optuna.load_study(study_name=self.study_name, storage=self.storage,
                                               sampler=self.sampler, pruner=no_pruning)
                created = False
        if created:
            # identifies this study across storages that share its name: a resume re-opens its MLflow parent
            self.study.set_user_attr("usp_uid", uuid.uuid4().hex)
        self._claim_study()
        if created and enqueue_baseline:
            self._enqueue_baseline()
        self.wall_time_s = 0.0
        self.evaluation_calls = 0

    def _enqueue_baseline(self) -> None:
        """Trial 0 evaluates the base config itself, so the campaign's best is never worse than the config it
        started from and the report can state the improvement. Only the study's creator enqueues it."""
        params = self.space.base_params()
        if params is None:
            warnings.warn(f"base config {self.base_config.version} lies outside the {self.tier} search space; "
                          "no baseline trial", stacklevel=3)
            return
        self.study.enqueue_trial(params, user_attrs={BASELINE_ATTR: True})

    def _claim_study(self) -> None:
        signature = _space_signature(self.space)
        attrs = self.study.user_attrs
        if "usp_space" in attrs and attrs["usp_space"] != signature:
            raise ValueError(f"study {self.study_name!r} was created with another {self.tier} search space "
                             f"(ranges changed in [meta_optimization]); use a new campaign name")
        for key, value in (("usp_space", signature), ("usp_tier", self.tier), ("usp_campaign", self.campaign),
                           ("usp_seed", self.meta_config.seed), ("usp_objective", self.base_config["backtest.objective"])):
            if attrs.get(key) != value:
                self.study.set_user_attr(key, value)

    # -- budget bookkeeping -------------------------------------------------------------------------------

    def _trials(self) -> list[FrozenTrial]:
        return self.study.get_trials(deepcopy=False)

    def n_finished(self) -> int:
        return sum(t.state in FINISHED for t in self._trials())

    def _is_stale(self, t: FrozenTrial, now: float) -> bool:
        owner = t.user_attrs.get("usp_worker")
        if owner == self.worker:
            return False
        started = t.datetime_start.timestamp() if t.datetime_start else now
        if not isinstance(owner, dict):
            return now - started > self.claim_grace_s
        if owner.get("host") == self.worker["host"] and not pid_alive(int(owner["pid"])):
            return True
        beat = t.user_attrs.get("usp_heartbeat")
        return now - (float(beat) if beat is not None else started) > self.stale_after_s

    def _trial_id(self, number: int) -> int:
        """The storage's id of trial ``number`` of this study (through the storage's public interface)."""
        return self.storage.get_trial_id_from_study_id_trial_number(
            self.storage.get_study_id_from_name(self.study_name), number)

    def requeue_stale_trials(self) -> list[int]:
        """Put RUNNING trials of dead workers back in the queue (same number and params)."""
        now, requeued = time.time(), []
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if self._is_stale(t, now):
                try:
                    self.storage.set_trial_state_values(self._trial_id(t.number), TrialState.WAITING)
                    requeued.append(t.number)
                except optuna.exceptions.UpdateFinishedTrialError:
                    pass
        return requeued

    def _give_back(self, trial: optuna.Trial) -> None:
        self.storage.set_trial_state_values(self._trial_id(trial.number), TrialState.WAITING)

    def _ask(self, budget: int) -> optuna.Trial | None:
        trial = self.study.ask()
        if trial.number >= budget:  # another worker took the last slots
            self._give_back(trial)
            return None
        trial.set_user_attr("usp_worker", self.worker)
        trial.set_user_attr("usp_heartbeat", time.time())
        return trial

    def _static_params_of_next_batch(self) -> dict[str, Any] | None:
        """The static params the next batch must take, or None to let TPE choose them: once the study holds
        ``max_static_keys`` distinct static keys, a batch takes the best complete trial's (each new key is a new
        compiled program of ~30 s, more than a batch's evaluation)."""
        names, cap = self.space.static_names, self.meta_config.max_static_keys
        if not names or cap is None:
            return None
        sampled = [t for t in self._trials() if all(n in t.params for n in names)]
        if len({tuple(t.params[n] for n in names) for t in sampled}) < cap:
            return None
        complete = [t for t in sampled if t.state == TrialState.COMPLETE and t.value is not None]
        source = min(complete, key=lambda t: (t.value, t.number)) if complete else min(sampled, key=lambda t: t.number)
        return {n: source.params[n] for n in names}

    def _ask_batch(self, k: int, budget: int) -> list[tuple[optuna.Trial, dict[str, Any]]]:
        static = self._static_params_of_next_batch() if self.share_static_in_batch else None
        if static is not None:
            self.study.enqueue_trial(static, skip_if_exists=False)
        leader = self._ask(budget)
        if leader is None:
            return []
        batch = [(leader, self.space.suggest(leader))]
        shared = self.space.shared_params(batch[0][1])
        for _ in range(k - 1):
            if self.share_static_in_batch:
                self.study.enqueue_trial(shared, skip_if_exists=False)
            trial = self._ask(budget)
            if trial is None:
                break
            batch.append((trial, self.space.suggest(trial)))
        return batch

    # -- evaluation ---------------------------------------------------------------------------------------

    def _heartbeat(self, trials: Sequence[optuna.Trial], stop: threading.Event) -> None:
        while not stop.wait(self.heartbeat_interval_s):
            for t in trials:
                try:
                    self.storage.set_trial_user_attr(self._trial_id(t.number), "usp_heartbeat", time.time())
                except optuna.exceptions.UpdateFinishedTrialError:
                    pass

    def _evaluate(self, configs: list[PredictorConfig]) -> list[TrialScore]:
        """One evaluator call per static group (configs of a group share one compiled program)."""
        groups: dict[Any, list[int]] = {}
        for i, cfg in enumerate(configs):
            groups.setdefault(cfg.static, []).append(i)
        scores: list[TrialScore | None] = [None] * len(configs)
        for idx in groups.values():
            results = self.evaluator([configs[i] for i in idx])
            self.evaluation_calls += 1
            if len(results) != len(idx):
                raise RuntimeError(f"evaluator returned {len(results)} results for {len(idx)} configs")
            for i, r in zip(idx, results, strict=True):
                scores[i] = as_score(r)
        return scores  # type: ignore[return-value]

    def _run_batch(self, batch: list[tuple[optuna.Trial, dict[str, Any]]]) -> list[FrozenTrial]:
        t0 = time.perf_counter()
        configs: list[PredictorConfig | None] = []
        for trial, params in batch:
            try:
                configs.append(self.space.config(params))
            except ConfigError as exc:  # guarded by SearchSpace.repair; kept so a bad base config fails loudly
                trial.set_user_attr("usp_fail_reason", f"invalid config: {exc}")
                configs.append(None)
        valid = [(i, c) for i, c in enumerate(configs) if c is not None]
        stop = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=([t for t, _ in batch], stop), daemon=True)
        beat.start()
        try:
            scores = dict(zip((i for i, _ in valid), self._evaluate([c for _, c in valid]), strict=True))
        except Exception as exc:
            for trial, _ in batch:
                trial.set_user_attr("usp_fail_reason", f"{type(exc).__name__}: {exc}")
                self.study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
            raise
        finally:
            stop.set()
        seconds = (time.perf_counter() - t0) / max(len(batch), 1)
        told = []
        for i, (trial, params) in enumerate(batch):
            told.append(self._tell(trial, params, configs[i], scores.get(i), seconds))
        return told

    def _tell(self, trial: optuna.Trial, params: dict[str, Any], cfg: PredictorConfig | None,
              score: TrialScore | None, seconds: float) -> FrozenTrial:
        state, value, folds = TrialState.FAIL, None, ()
        if cfg is not None and score is not None:
            folds = score.fold_objectives
            trial.set_user_attr("config_params", self.space.repair(params))
            trial.set_user_attr("config_version", cfg.version)
            trial.set_user_attr("fold_objectives", [float(v) for v in folds])
            trial.set_user_attr("objective", float(score.objective))
            if not math.isfinite(score.objective):
                trial.set_user_attr("usp_fail_reason", f"non-finite objective {score.objective}")
            else:
                state, value = TrialState.COMPLETE, float(score.objective)
                for step, v in enumerate(folds):
                    if math.isfinite(v):
                        trial.report(float(v), step)
        try:
            frozen = self.study.tell(trial, value, state=state)
        except optuna.exceptions.UpdateFinishedTrialError:  # a worker judged us dead and finished it first:
            # its result stands and that worker logs the trial's MLflow child run (one per trial number)
            return next(t for t in self.study.get_trials(deepcopy=False) if t.number == trial.number)
        if self.tracker is not None:
            self.tracker.log_trial(frozen.number, params=dict(trial.user_attrs.get("config_params", params)),
                                   state=frozen.state.name, value=frozen.value, fold_values=folds,
                                   config_version=cfg.version if cfg is not None else "invalid", seconds=seconds,
                                   started_at=frozen.datetime_start.timestamp() if frozen.datetime_start else None)
        return frozen

    # -- campaign -----------------------------------------------------------------------------------------

    def optimize(self, n_trials: int | None = None, *, progress: Any = None,
                 on_batch: Callable[[list[FrozenTrial]], None] | None = None) -> optuna.Study:
        """Run until the study holds ``n_trials`` (default ``meta_config.n_trials``) finished trials in
        TOTAL, counting those already in the storage. Returns the study."""
        budget = int(n_trials if n_trials is not None else self.meta_config.n_trials)
        t_start = time.perf_counter()
        self.start_tracking()
        try:
            while True:
                self.requeue_stale_trials()
                trials = self._trials()
                finished = sum(t.state in FINISHED for t in trials)
                running = sum(t.state == TrialState.RUNNING for t in trials)
                if progress is not None:
                    progress.update(finished - progress.n)
                if finished >= budget:
                    break
                k = min(self.meta_config.batch_size, budget - finished - running)
                batch = self._ask_batch(k, budget) if k > 0 else []
                if not batch:
                    if running == 0 and k <= 0:
                        break
                    time.sleep(self.poll_interval_s)  # other workers hold the remaining trials
                    continue
                told = self._run_batch(batch)
                if progress is not None:
                    best = self.best_value()
                    if best is not None:
                        progress.set_postfix(best=f"{best:.5g}", refresh=False)
                if self.tracker is not None:
                    curve = convergence_curve(self.study)
                    self.tracker.log_progress(best_so_far=_finite_points(curve, (t.number for t in told)),
                                              n_finished=self.n_finished(),
                                              step=max(t.number for t in told))
                if on_batch is not None:
                    on_batch(told)
        finally:
            self.wall_time_s += time.perf_counter() - t_start
        return self.study

    def start_tracking(self) -> str | None:
        """The campaign's MLflow parent run id (started, or re-opened on resume, if not yet); None without a
        tracker. Extra worker processes attach to this run (``CampaignTracker.attach``)."""
        if self.tracker is None:
            return None
        if self.tracker.parent_run_id is None:
            self.tracker.start_campaign(self.study_name, self._campaign_tags())
        return self.tracker.parent_run_id

    def _campaign_tags(self) -> dict[str, Any]:
        tags = {"campaign": self.campaign, "tier": self.tier, "study": self.study_name,
                "study_uid": self.study.user_attrs.get("usp_uid", ""),
                "config_version": self.base_config.version, "git_sha": git_sha(),
                "dagster_run_id": os.environ.get("DAGSTER_RUN_ID", "")}
        tags.update(self.tags)
        return tags

    def best_value(self) -> float | None:
        complete = self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        return min(t.value for t in complete) if complete else None

    def best_params(self) -> dict[str, Any]:
        """Best trial's params after the cross-field repair (what its config used)."""
        complete = self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if not complete:
            return {}
        best = min(complete, key=lambda t: t.value)
        return dict(best.user_attrs.get("config_params", self.space.repair(best.params)))

    def best_config(self) -> PredictorConfig:
        return self.space.config(self.best_params()) if self.best_params() else self.base_config

    # -- checkpoints ----------------------------------------------------------------------------------------

    def save_study(self, path: str | os.PathLike[str]) -> str:
        """Portable JSON checkpoint + ``path.sha256`` (atomic); returns the digest."""
        return ckpt.save_study(self.study, path, meta={"tier": self.tier, "campaign": self.campaign,
                                                       "seed": self.meta_config.seed,
                                                       "base_config_version": self.base_config.version})

    @classmethod
    def load_study(cls, path: str | os.PathLike[str], evaluator: BatchEvaluator,
                   meta_config: MetaOptimizationConfig | Mapping[str, Any] | None = None,
                   base_config: PredictorConfig | None = None, *, storage: Any = None,
                   study_name: str | None = None, **kwargs: Any) -> BayesianMetaOptimizer:
        """Verify and rebuild a checkpoint into ``storage``; continuing extends the same study."""
        doc = ckpt.read_checkpoint(path)
        if study_name is not None and study_name != doc["study_name"]:
            raise ValueError(f"checkpoint {path} holds study {doc['study_name']!r}, not {study_name!r}")
        store = make_storage(storage)
        ckpt.restore_study(doc, storage=store)
        return cls(evaluator, meta_config, base_config, storage=store, study_name=doc["study_name"],
                   campaign=doc["meta"].get("campaign", "default"), **kwargs)

    # -- report -------------------------------------------------------------------------------------------

    def generate_optimization_report(self, out_dir: str | os.PathLike[str] | None = None) -> OptimizationReport:
        """Report (text + JSON-able metadata + PNG plots); logged to the campaign's MLflow parent run."""
        if out_dir is None:
            out_dir = dagster_home() / "optuna" / "reports" / self.study_name
        report = build_report(self.study, tier=self.tier, wall_time_s=self.wall_time_s, out_dir=out_dir,
                              seed=self.meta_config.seed)
        if self.tracker is not None:
            self.start_tracking()
            # a last progress point over the whole study: other workers may have finished trials after this
            # process last logged, or logged a best computed before a lower-numbered trial of theirs finished
            finished = [t for t in self.study.get_trials(deepcopy=False) if t.state in FINISHED]
            if finished:
                self.tracker.log_progress(best_so_far=_finite_points(report.convergence), n_finished=len(finished),
                                          step=max(t.number for t in finished))
            files = [Path(out_dir) / "report.txt", Path(out_dir) / "report.json", *map(Path, report.plots.values())]
            summary = {"n_trials": report.n_trials, "n_complete": report.n_complete, "n_pruned": report.n_pruned,
                       "n_failed": report.n_failed, "wall_time_s": report.wall_time_s}
            summary.update({f"importance.{k}": v for k, v in report.importances.items()})
            if report.improvement is not None:
                summary.update(baseline_value=report.baseline_value, improvement=report.improvement)
            self.tracker.finish_campaign(best_params=report.best_params, best_value=report.best_value,
                                         summary=summary, artifacts=files)
        return report

    def __enter__(self) -> BayesianMetaOptimizer:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


class AsyncMetaOptimizer:
    """BayesianMetaOptimizer whose checkpoints are written by a thread pool (seed V-CRIT-3): the
    optimisation loop only submits; ``wait_all_saves`` or leaving the context joins them."""

    def __init__(self, evaluator: BatchEvaluator, meta_config: Any = None, base_config: PredictorConfig | None = None,
                 *, max_workers: int = 2, optimizer: BayesianMetaOptimizer | None = None, **kwargs: Any):
        self.optimizer = optimizer or BayesianMetaOptimizer(evaluator, meta_config, base_config, **kwargs)
        self.executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="usp-ckpt")
        self._pending: list[Future] = []
        self._path_locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.optimizer, name)

    def _locked_save(self, path: str) -> str:
        with self._locks_guard:
            lock = self._path_locks.setdefault(path, threading.Lock())
        with lock:  # the later save reads the storage later, so the file always ends newest
            return self.optimizer.save_study(path)

    def save_study_async(self, path: str | os.PathLike[str]) -> Future:
        future = self.executor.submit(self._locked_save, os.fspath(path))
        self._pending.append(future)
        return future

    def save_study(self, path: str | os.PathLike[str]) -> str:
        return self._locked_save(os.fspath(path))

    def wait_all_saves(self, timeout: float | None = None) -> list[str]:
        pending, self._pending = self._pending, []
        return [f.result(timeout=timeout) for f in pending]

    def optimize(self, n_trials: int | None = None, *, checkpoint_path: str | os.PathLike[str] | None = None,
                 **kwargs: Any) -> optuna.Study:
        """As BayesianMetaOptimizer.optimize, checkpointing asynchronously after every batch."""
        user_cb = kwargs.pop("on_batch", None)

        def on_batch(told: list[FrozenTrial]) -> None:
            if checkpoint_path is not None:
                self.save_study_async(checkpoint_path)
            if user_cb is not None:
                user_cb(told)

        return self.optimizer.optimize(n_trials, on_batch=on_batch, **kwargs)

    @classmethod
    def load_study(cls, path: str | os.PathLike[str], evaluator: BatchEvaluator, meta_config: Any = None,
                   base_config: PredictorConfig | None = None, *, max_workers: int = 2, **kwargs: Any) -> AsyncMetaOptimizer:
        opt = BayesianMetaOptimizer.load_study(path, evaluator, meta_config, base_config, **kwargs)
        return cls(evaluator, max_workers=max_workers, optimizer=opt)

    @classmethod
    def load_study_async(cls, path: str | os.PathLike[str], evaluator: BatchEvaluator, meta_config: Any = None,
                         base_config: PredictorConfig | None = None, **kwargs: Any) -> Future:
        pool = ThreadPoolExecutor(max_workers=1)
        future = pool.submit(cls.load_study, path, evaluator, meta_config, base_config, **kwargs)
        pool.shutdown(wait=False)
        return future

    def shutdown(self, wait: bool = True) -> None:
        if wait:
            self.wait_all_saves()
        self.executor.shutdown(wait=wait)

    def __enter__(self) -> AsyncMetaOptimizer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown(wait=True)
