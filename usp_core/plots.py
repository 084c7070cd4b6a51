"""The pictures a user looks at, one function per plot, each writing a PNG that the Dagster metadata and the
MLflow artifacts both show (so the two UIs display the same file, drawn from the same numbers).

Object-oriented matplotlib (``Figure`` without ``pyplot``): no global backend or state is touched.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

_DPI = 80
_MODE_COLOURS = ("#ffffff", "#f2c14e", "#d1495b")  # inference, degraded, emergency


@dataclass(frozen=True)
class ForecastTrace:
    """One series' one-step forecasts aligned with the values they forecast (entry t: the forecast OF t)."""

    series_id: str
    times: np.ndarray  # datetime64 or step index
    observed: np.ndarray
    prediction: np.ndarray
    lower: np.ndarray
    upper: np.ndarray

    def tail(self, n: int) -> ForecastTrace:
        return ForecastTrace(self.series_id, *(np.asarray(a)[-n:] for a in
                                               (self.times, self.observed, self.prediction, self.lower, self.upper)))


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)
    return path


def fan_chart(traces: Sequence[ForecastTrace], path: str | Path, *, level: float, title: str = "") -> Path:
    """Observed values against the one-step forecast and its central ``level`` interval, one panel per series;
    points outside the interval are marked."""
    fig = Figure(figsize=(10, 2.6 * max(len(traces), 1)))
    axes = fig.subplots(max(len(traces), 1), 1, squeeze=False)[:, 0]
    for ax, tr in zip(axes, traces, strict=False):
        ax.fill_between(tr.times, tr.lower, tr.upper, color="#4c72b0", alpha=0.25, lw=0,
                        label=f"{100 * level:.0f} % interval")
        ax.plot(tr.times, tr.prediction, color="#4c72b0", lw=1.2, label="forecast")
        ax.plot(tr.times, tr.observed, color="black", lw=0.9, label="observed")
        outside = (tr.observed < tr.lower) | (tr.observed > tr.upper)
        covered = np.mean(~outside[np.isfinite(tr.lower)]) if np.isfinite(tr.lower).any() else np.nan
        ax.scatter(np.asarray(tr.times)[outside], tr.observed[outside], s=12, color="#d1495b", zorder=3,
                   label="outside")
        ax.set_title(f"{tr.series_id}: last {len(tr.observed)} one-step forecasts, coverage {covered:.2f} "
                     f"(nominal {level:.2f})", fontsize=10, loc="left")
        ax.grid(alpha=0.3)
    axes[0].legend(loc="upper left", fontsize=8, ncol=4)
    if title:
        fig.suptitle(title, fontsize=11)
    return _save(fig, path)


def weights_chart(times: np.ndarray, weights: np.ndarray, mode: np.ndarray, expert_names: Sequence[str],
                  mode_names: Sequence[str], path: str | Path, *, series_id: str) -> Path:
    """The fusion's expert weights over time (stacked, they sum to one) above the operating-mode timeline."""
    fig = Figure(figsize=(10, 3.6))
    ax, strip = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [5, 1]})
    w = np.nan_to_num(np.asarray(weights, dtype=float))
    ax.stackplot(times, w.T, labels=list(expert_names), alpha=0.85)
    ax.set_ylim(0, 1)
    ax.set_ylabel("weight")
    ax.set_title(f"{series_id}: expert weights and operating mode", fontsize=10, loc="left")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    mode = np.asarray(mode)
    for value, name in enumerate(mode_names):
        on = mode == value
        if value and on.any():
            strip.fill_between(times, 0, 1, where=on, color=_MODE_COLOURS[value % len(_MODE_COLOURS)], step="mid",
                               label=f"{name} ({np.mean(on):.0%})")
    strip.set_yticks([])
    strip.set_ylabel("mode", rotation=0, ha="right", va="center")
    if strip.get_legend_handles_labels()[0]:
        strip.legend(loc="upper left", bbox_to_anchor=(1.0, 1.2), fontsize=8)
    else:
        strip.text(0.01, 0.5, f"{mode_names[0]} at every step", transform=strip.transAxes, va="center", fontsize=8)
    return _save(fig, path)


def skill_chart(skill: Mapping[str, Mapping[str, float]], path: str | Path, *, metric: str = "CRPS skill vs naive",
                highlight: str = "usp", floor: float = -1.0) -> Path:
    """Grouped bars of ``skill[model][series]`` (higher is better), the fused model first and highlighted; bars
    below ``floor`` are cut there and labelled with their value."""
    models = sorted(skill, key=lambda m: (m != highlight, m))
    series = sorted({s for m in models for s in skill[m]})
    fig = Figure(figsize=(max(6.0, 0.9 * len(series) * max(len(models), 1) / 3 + 3), 3.8))
    ax = fig.subplots()
    width = 0.8 / max(len(models), 1)
    x = np.arange(len(series))
    for i, model in enumerate(models):
        values = np.array([skill[model].get(s, np.nan) for s in series], dtype=float)
        at = x + (i - (len(models) - 1) / 2) * width
        ax.bar(at, np.maximum(values, floor), width, label=model,
               edgecolor="black" if model == highlight else "none", linewidth=1.2 if model == highlight else 0)
        for xi, v in zip(at, values, strict=True):
            if v < floor:  # a baseline far off the scale (GARCH on a level series) would flatten every other bar
                ax.text(xi, floor, f"{v:.1f}", rotation=90, ha="center", va="bottom", fontsize=7)
    ax.set_ylim(bottom=floor)
    ax.axhline(0.0, color="black", lw=0.8)
    ax.set_xticks(x, series, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(f"{metric}\n(higher is better; 0 = naive)", fontsize=9)
    ax.legend(fontsize=8, ncol=min(len(models), 4))
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def campaign_chart(numbers: Sequence[int], values: Sequence[float | None], best_so_far: Sequence[float],
                   importances: Mapping[str, float], path: str | Path, *, objective: str, importance_method: str,
                   baseline_value: float | None = None) -> Path:
    """A tuning campaign: each trial's objective and the best so far (lower is better), next to the parameter
    importances, from the numbers the report holds."""
    fig = Figure(figsize=(11, 3.8))
    ax, bars = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    vals = np.array([np.nan if v is None else v for v in values], dtype=float)
    ax.scatter(numbers, vals, s=14, color="#4c72b0", label="trial")
    ax.step(range(len(best_so_far)), best_so_far, where="post", color="#d1495b", lw=1.5, label="best so far")
    if baseline_value is not None:
        ax.axhline(baseline_value, color="grey", ls="--", lw=1, label="base config (trial 0)")
    ax.set_xlabel("trial")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(f"{objective} (lower is better)", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    if importances:
        items = sorted(importances.items(), key=lambda kv: kv[1])
        bars.barh([k for k, _ in items], [v for _, v in items], color="#55a868")
        bars.set_xlabel(f"importance ({importance_method})", fontsize=9)
        bars.tick_params(axis="y", labelsize=8)
        for i, (_, v) in enumerate(items):
            bars.text(v, i, f" {v:.2f}", va="center", fontsize=8)
    else:
        bars.axis("off")
        bars.text(0.5, 0.5, f"no importances: {importance_method}", ha="center", va="center", fontsize=9)
    return _save(fig, path)
