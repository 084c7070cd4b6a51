"""Campaign entry points: the backtest evaluator of trials and ``run_campaign`` (used by ``usp tune`` and
the Dagster assets)."""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from usp_core.config.loader import PredictorConfig
from usp_core.engine.workers import available_cores, host_cores
from usp_core.tuning.optimizer import (
    AsyncMetaOptimizer,
    BayesianMetaOptimizer,
    MetaOptimizationConfig,
    TrialScore,
    default_storage_url,
    study_name_for,
)
from usp_core.tuning.report import OptimizationReport
from usp_core.tuning.tracking import CampaignTracker


class BacktestEvaluator:
    """Walk-forward loss of trial configs on the tuning data (never the holdout, SPEC §4.1).

    Without explicit ``folds`` the panel is cut once to :func:`~usp_core.backtest.runner.tuning_panel` (the
    newest ``meta_optimization.tuning_max_length`` observations before each series' holdout) and every fold
    of it is scored; with ``folds`` the full panel's non-holdout folds are scored. Each call receives configs
    sharing one static key; the group is padded (with copies of its last config) to ``pad_to`` so every call
    for a static key has the same shape: one compilation per static key.
    """

    def __init__(self, panel: Any, *, pad_to: int = 1, folds: Any = None):
        self.panel = panel
        self.pad_to = max(int(pad_to), 1)
        self.folds = folds
        self._tuning_panel = None

    def data(self, cfg: PredictorConfig) -> Any:
        """The panel trials are scored on (cut on first use; fold settings are locked, so any trial's do)."""
        if self.folds is not None:
            return self.panel
        if self._tuning_panel is None:
            from usp_core.backtest.runner import tuning_panel

            self._tuning_panel = tuning_panel(cfg, self.panel, cfg.static.base_min_signal_length,
                                              cfg["meta_optimization.tuning_max_length"])
        return self._tuning_panel

    def __call__(self, configs: Sequence[PredictorConfig]) -> list[TrialScore]:
        from usp_core.backtest.runner import evaluate_trials

        configs = list(configs)
        padded = configs + [configs[-1]] * max(0, self.pad_to - len(configs)) if self.pad_to > 1 else configs
        include = "tuning" if self.folds is not None else "all"
        results = evaluate_trials(padded, self.data(configs[0]), folds=self.folds, include=include)
        return [TrialScore(float(r.objective), tuple(float(v) for v in r.fold_objectives)) for r in results[:len(configs)]]


@dataclass(frozen=True)
class CampaignResult:
    study_name: str
    storage: str
    tier: str
    n_finished: int
    best_value: float | None
    best_params: dict[str, Any]
    best_config: PredictorConfig
    report: OptimizationReport
    mlflow_run_id: str | None
    mlflow_run_url: str | None


def worker_cores(workers: int) -> list[set[int]] | None:
    """One core per worker process (the campaign's own process first), or None where the workers outnumber
    the cores. XLA:CPU runs one process's small batched ops about as fast on two cores as on one (measured:
    p.run 5 200 series-steps/s on both cores, 6 100 pinned to one), so two processes pinned to a core each
    give twice one's trial throughput where two unpinned ones would fight over both."""
    cores = available_cores()
    if workers < 2 or len(cores) < workers:
        return None
    return [{core} for core in cores[:workers]]


def _worker(cfg_values: dict[str, Any], panel: Any, tier: str, n_trials: int, storage: str, campaign: str,
            tracking_uri: str | None = None, parent_run_id: str | None = None, evaluator: Any = None,
            cores: set[int] | None = None) -> int:
    """A spawned extra worker: same study, same budget, same evaluator. With ``parent_run_id`` its trials are
    logged as child runs of the campaign's parent run (it never starts, re-opens or finishes a parent). With
    ``cores`` it runs on those cores only (set before JAX starts, which sizes its thread pool by them)."""
    if cores:
        os.sched_setaffinity(0, cores)
    cfg = PredictorConfig(cfg_values)
    meta = MetaOptimizationConfig.from_config(cfg, {"enable_deep_tuning": tier == "deep"})
    tracker = CampaignTracker.attach(tracking_uri, parent_run_id) if parent_run_id and tracking_uri else None
    opt = BayesianMetaOptimizer(evaluator or BacktestEvaluator(panel, pad_to=meta.batch_size), meta, cfg,
                                storage=storage, campaign=campaign, tracker=tracker, parallel=True)
    opt.optimize(n_trials)
    return opt.n_finished()


def run_campaign(
    cfg: PredictorConfig,
    panel: Any,
    *,
    tier: str = "fast",
    n_trials: int | None = None,
    storage: str | None = None,
    workers: int = 1,
    progress: bool = True,
    campaign: str | None = None,
    tracking: bool | CampaignTracker = True,
    checkpoint_path: str | os.PathLike[str] | None = None,
    tags: dict[str, Any] | None = None,
    evaluator: Any = None,
    report_dir: str | os.PathLike[str] | None = None,
) -> CampaignResult:
    """Run (or resume) a tuning campaign until the study holds ``n_trials`` finished trials in total.

    ``workers = 0`` means one per core (one where the storage is in memory). ``workers > 1`` spawns extra
    processes on the same storage (needs a Journal/SQLite/PostgreSQL URL); they score trials with the same ``evaluator`` (which must then be picklable) and log their trials as child runs
    of this campaign's one MLflow parent run. Where there are enough cores each process runs on its own core
    (:func:`worker_cores`; this process's affinity is restored afterwards).
    ``tracking`` True logs to the default MLflow store; a CampaignTracker logs there; False disables it.
    """
    if tier not in ("fast", "deep"):
        raise ValueError(f"tier must be 'fast' or 'deep', got {tier!r}")
    meta = MetaOptimizationConfig.from_config(cfg, {"enable_deep_tuning": tier == "deep"})
    budget = int(n_trials if n_trials is not None else meta.n_trials)
    storage_url = storage or default_storage_url()
    campaign = campaign or f"{tier}-tuning"
    if workers == 0:
        workers = 1 if storage_url.startswith("memory") else host_cores()
    if workers > 1 and storage_url.startswith("memory"):
        raise ValueError("several workers need a shared storage (journal://, sqlite:///, postgresql://)")
    if workers > 1 and evaluator is not None:
        try:  # the extra workers must score trials with the same evaluator as this process
            pickle.dumps(evaluator)
        except Exception as exc:
            raise ValueError(f"several workers need a picklable evaluator ({type(exc).__name__}: {exc})") from exc
    tracker = tracking if isinstance(tracking, CampaignTracker) else (CampaignTracker() if tracking else None)
    worker_evaluator = evaluator
    evaluator = evaluator or BacktestEvaluator(panel, pad_to=meta.batch_size)
    with AsyncMetaOptimizer(evaluator, meta, cfg, storage=storage_url, campaign=campaign, tracker=tracker,
                            parallel=workers > 1, tags={"data_fingerprint": data_fingerprint(panel), **(tags or {})}) as opt:
        extra = []
        cores = worker_cores(workers)
        own_cores = os.sched_getaffinity(0) if cores else None
        if workers > 1:
            # the parent run exists before the workers start: they log their trials as its children
            parent_run_id = opt.start_tracking()
            tracking_uri = tracker.tracking_uri if tracker is not None else None
            ctx = mp.get_context("spawn")
            args = (dict(cfg), panel if worker_evaluator is None else None, tier, budget, storage_url, campaign,
                    tracking_uri, parent_run_id, worker_evaluator)
            extra = [ctx.Process(target=_worker, args=(*args, cores[i + 1] if cores else None), daemon=False)
                     for i in range(workers - 1)]
            for p in extra:
                p.start()
            if cores:
                os.sched_setaffinity(0, cores[0])
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=budget, initial=opt.n_finished(), desc=f"{tier} tuning", unit="trial")
        try:
            opt.optimize(budget, checkpoint_path=checkpoint_path, progress=bar)
        finally:
            for p in extra:
                p.join()
                if p.exitcode != 0:
                    warnings.warn(f"tuning worker process {p.pid} exited with code {p.exitcode}", stacklevel=2)
            if own_cores:
                os.sched_setaffinity(0, own_cores)
            if bar is not None:
                bar.update(opt.n_finished() - bar.n)
                bar.close()
        opt.wait_all_saves()
        report = opt.generate_optimization_report(report_dir)
        return CampaignResult(
            study_name=opt.study_name, storage=storage_url, tier=tier, n_finished=opt.n_finished(),
            best_value=opt.best_value(), best_params=opt.best_params(), best_config=opt.best_config(), report=report,
            mlflow_run_id=tracker.parent_run_id if tracker else None, mlflow_run_url=tracker.run_url() if tracker else None)


def data_fingerprint(panel: Any) -> str:
    """12 hex digits identifying a panel's content (long DataFrame or array)."""
    import hashlib

    import numpy as np
    import pandas as pd

    h = hashlib.sha256()
    if isinstance(panel, pd.DataFrame):
        h.update(pd.util.hash_pandas_object(panel, index=False).to_numpy().tobytes())
    else:
        values = getattr(panel, "values", panel)
        h.update(np.ascontiguousarray(np.asarray(values, dtype=float)).tobytes())
    return h.hexdigest()[:12]


__all__ = ["BacktestEvaluator", "CampaignResult", "data_fingerprint", "run_campaign", "study_name_for"]
