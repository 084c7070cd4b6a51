"""Optimisation report of a campaign (SPEC §5, seed V-MIN-2): text, a JSON-able summary for Dagster
metadata, and PNG plots: the campaign (each trial's objective, best so far, importances, drawn from the report's
own numbers so every UI shows the same ones) and optuna's parallel coordinates."""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from usp_core.plots import campaign_chart

BASELINE_ATTR = "usp_baseline"
"""User attribute marking the trial that evaluates the campaign's base config."""


@dataclass(frozen=True)
class OptimizationReport:
    study: str
    tier: str
    n_trials: int
    n_complete: int
    n_pruned: int
    n_failed: int
    best_value: float | None
    best_trial: int | None
    best_params: dict[str, Any]
    importances: dict[str, float]
    importance_method: str
    convergence: list[float]
    wall_time_s: float
    text: str
    plots: dict[str, str] = field(default_factory=dict)
    baseline_value: float | None = None
    """Objective of the base config (the enqueued trial 0), None when it was not evaluated."""

    @property
    def improvement(self) -> float | None:
        """Relative improvement of the best trial over the baseline (positive: better)."""
        if self.best_value is None or self.baseline_value is None or self.baseline_value == 0:
            return None
        return (self.baseline_value - self.best_value) / abs(self.baseline_value)

    def to_metadata(self) -> dict[str, Any]:
        """JSON-able summary (what a Dagster asset puts in its metadata)."""
        return {
            "study": self.study, "tier": self.tier, "n_trials": self.n_trials, "n_complete": self.n_complete,
            "n_pruned": self.n_pruned, "n_failed": self.n_failed, "best_value": self.best_value,
            "best_trial": self.best_trial, "best_params": self.best_params, "importances": self.importances,
            "importance_method": self.importance_method, "convergence": self.convergence,
            "wall_time_s": self.wall_time_s, "plots": self.plots, "baseline_value": self.baseline_value,
            "improvement": self.improvement,
        }


def convergence_curve(study: optuna.Study) -> list[float]:
    """Best objective so far after each trial (NaN before the first complete trial), by trial number."""
    best, out = math.inf, []
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        if t.state == TrialState.COMPLETE and t.value is not None:
            best = min(best, t.value)
        out.append(best if math.isfinite(best) else math.nan)
    return out


def param_importances(study: optuna.Study, *, seed: int = 0) -> tuple[dict[str, float], str]:
    """fANOVA importances (needs scikit-learn), PED-ANOVA otherwise; empty when too few trials."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < 2:
        return {}, "none (fewer than 2 complete trials)"
    from optuna.importance import (
        FanovaImportanceEvaluator,
        PedAnovaImportanceEvaluator,
        get_param_importances,
    )

    attempts = [("fanova", lambda: FanovaImportanceEvaluator(seed=seed)), ("ped-anova", PedAnovaImportanceEvaluator)]
    for name, make in attempts:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                imp = get_param_importances(study, evaluator=make())
            return {k: float(v) for k, v in imp.items()}, name
        except (ImportError, RuntimeError, ValueError):
            continue
    return {}, "none (importance evaluators failed)"


def _parallel_coordinates(study: optuna.Study, path: Path) -> bool:
    from optuna.visualization import matplotlib as ovm

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optuna.visualization.matplotlib is marked experimental
        try:
            ax = ovm.plot_parallel_coordinate(study)
        except (ValueError, RuntimeError, ImportError):
            return False
    import matplotlib.pyplot as plt

    fig = ax.figure
    fig.set_size_inches(10, 5)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)  # optuna draws on a pyplot figure
    return True


def render_text(r: OptimizationReport) -> str:
    lines = [
        "USP meta-optimisation report",
        f"study: {r.study}",
        f"tier: {r.tier}",
        f"trials: {r.n_trials} (complete {r.n_complete}, pruned {r.n_pruned}, failed {r.n_failed})",
        f"best value: {r.best_value!r} (trial {r.best_trial})",
        f"base config value: {r.baseline_value!r}"
        + ("" if r.improvement is None else f" (best improves on it by {100 * r.improvement:.2f}%)"),
        f"wall time: {r.wall_time_s:.1f} s",
        "",
        "best params:",
        *(f"  {k:32s} = {v!r}" for k, v in sorted(r.best_params.items())),
        "",
        f"parameter importances ({r.importance_method}):",
        *(f"  {k:32s} {v:.4f}" for k, v in sorted(r.importances.items(), key=lambda kv: -kv[1])),
        "",
        "convergence (best value after trial n):",
        *(f"  {n:5d} {v:.6g}" for n, v in enumerate(r.convergence) if n % max(1, len(r.convergence) // 20) == 0
          or n == len(r.convergence) - 1),
    ]
    return "\n".join(lines) + "\n"


def build_report(study: optuna.Study, *, tier: str, wall_time_s: float, out_dir: str | Path | None = None,
                 seed: int = 0) -> OptimizationReport:
    """The report; with ``out_dir``, also ``report.txt``, ``report.json`` and the PNG plots there."""
    trials = study.get_trials(deepcopy=False)
    count = lambda s: sum(t.state == s for t in trials)  # noqa: E731
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = min(complete, key=lambda t: t.value) if complete else None
    baseline = next((t for t in complete if t.user_attrs.get(BASELINE_ATTR)), None)
    importances, method = param_importances(study, seed=seed)
    fields = dict(
        study=study.study_name, tier=tier, n_trials=len(trials), n_complete=count(TrialState.COMPLETE),
        n_pruned=count(TrialState.PRUNED), n_failed=count(TrialState.FAIL),
        best_value=None if best is None else float(best.value), best_trial=None if best is None else best.number,
        best_params={} if best is None else dict(best.user_attrs.get("config_params", best.params)),
        importances=importances, importance_method=method, convergence=convergence_curve(study),
        wall_time_s=float(wall_time_s), baseline_value=None if baseline is None else float(baseline.value),
    )
    report = OptimizationReport(**fields, text="")
    plots: dict[str, str] = {}
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if complete:
            ordered = sorted(trials, key=lambda t: t.number)
            plots["campaign"] = str(campaign_chart(
                [t.number for t in ordered], [t.value if t.state == TrialState.COMPLETE else None for t in ordered],
                fields["convergence"], importances, out / "campaign.png",
                objective=study.user_attrs.get("usp_objective", "objective"), importance_method=method,
                baseline_value=fields["baseline_value"]))
            if len(complete) > 1 and _parallel_coordinates(study, out / "parallel_coordinates.png"):
                plots["parallel_coordinates"] = str(out / "parallel_coordinates.png")
    report = OptimizationReport(**fields, text="", plots=plots)
    report = OptimizationReport(**fields, text=render_text(report), plots=plots)
    if out_dir is not None:
        (Path(out_dir) / "report.txt").write_text(report.text)
        (Path(out_dir) / "report.json").write_text(json.dumps(report.to_metadata(), indent=1, default=str))
    return report
