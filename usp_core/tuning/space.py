"""Optuna search spaces of the fast and deep tiers, derived from the schema and ``[meta_optimization]``.

Every sampled point maps to a config that passes validation: cross-field rules between tuned fields are
enforced by a deterministic projection (``repair``) of the sampled values onto the feasible set, applied
identically when a trial is evaluated and when its params become a challenger config. The Optuna
distributions stay fixed across trials (conditional ranges would make multivariate TPE drop the params).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import optuna
from optuna.distributions import BaseDistribution, FloatDistribution, IntDistribution

from usp_core.config.loader import PredictorConfig
from usp_core.config.schema import DEEP_TIER, FAST_TIER, Field

TierName = Literal["fast", "deep"]


@dataclass(frozen=True)
class SearchParam:
    field: Field
    distribution: BaseDistribution

    @property
    def name(self) -> str:
        return self.field.name


def tier_fields(tier: TierName) -> tuple[Field, ...]:
    if tier == "fast":
        return FAST_TIER
    if tier == "deep":
        return DEEP_TIER
    raise ValueError(f"unknown tuning tier {tier!r}: expected 'fast' or 'deep'")


def _contains(distribution: BaseDistribution, value: Any) -> bool:
    """Whether ``value`` is a point of one of this module's distributions (Optuna's own check is private)."""
    if isinstance(distribution, IntDistribution):
        return (float(value).is_integer() and distribution.low <= value <= distribution.high
                and (int(value) - distribution.low) % distribution.step == 0)
    if isinstance(distribution, FloatDistribution):
        on_grid = distribution.step is None or math.isclose(
            round((value - distribution.low) / distribution.step) * distribution.step, value - distribution.low)
        return math.isfinite(value) and distribution.low <= value <= distribution.high and on_grid
    raise TypeError(f"no containment rule for {type(distribution).__name__}")


def _distribution(f: Field, cfg: PredictorConfig) -> BaseDistribution:
    lo, hi = cfg[f"meta_optimization.{f.name}_min"], cfg[f"meta_optimization.{f.name}_max"]
    if f.kind == "int":
        step = cfg[f"meta_optimization.{f.name}_step"] if f.step is not None else 1
        hi = lo + ((hi - lo) // step) * step  # Optuna requires (high - low) to be a multiple of step
        return IntDistribution(int(lo), int(hi), log=f.log, step=int(step))
    return FloatDistribution(float(lo), float(hi), log=f.log)


def _suggest(trial: optuna.Trial, p: SearchParam) -> Any:
    d = p.distribution
    if isinstance(d, IntDistribution):
        return trial.suggest_int(p.name, d.low, d.high, step=d.step, log=d.log)
    assert isinstance(d, FloatDistribution)
    return trial.suggest_float(p.name, d.low, d.high, log=d.log)


class SearchSpace:
    """The tier's parameters with their distributions, and the mapping params -> valid config."""

    def __init__(self, tier: TierName, base_config: PredictorConfig):
        self.tier: TierName = tier
        self.base_config = base_config
        self.params: tuple[SearchParam, ...] = tuple(
            SearchParam(f, _distribution(f, base_config)) for f in tier_fields(tier))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)

    @property
    def distributions(self) -> dict[str, BaseDistribution]:
        return {p.name: p.distribution for p in self.params}

    @property
    def static_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params if p.field.static)

    @property
    def shared_names(self) -> tuple[str, ...]:
        """Parameters a batch holds fixed: the static ones (one compilation) and the kernel-side dynamic ones,
        so that the batch runs the kernels once and vmaps only the fusion over trials."""
        from usp_core.engine.step import KERNEL_SIDE_PARAMS

        return tuple(p.name for p in self.params if p.field.static or p.name in KERNEL_SIDE_PARAMS)

    def base_params(self) -> dict[str, Any] | None:
        """The base config's values of the tier's parameters, or None if one lies outside its distribution."""
        values = {p.name: self.base_config[p.field.key] for p in self.params}
        inside = all(_contains(p.distribution, values[p.name]) for p in self.params)
        return values if inside else None

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        """Sample every parameter of the tier (shared ones first, so a batch can fix them)."""
        shared = set(self.shared_names)
        ordered = sorted(self.params, key=lambda p: p.name not in shared)
        values = {p.name: _suggest(trial, p) for p in ordered}
        return {name: values[name] for name in self.names}

    def repair(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """Project sampled values onto the cross-field-feasible set (identity when already feasible)."""
        out = dict(params)
        base = self.base_config
        get = lambda name, key: out.get(name, base[key])  # noqa: E731
        if "stiffness_low" in out or "stiffness_high" in out:
            low = get("stiffness_low", "orchestration.stiffness_low")
            high = get("stiffness_high", "orchestration.stiffness_high")
            if not low < high:  # the seed's ranges touch at 500: keep high, step low just below it
                out["stiffness_low"] = math.nextafter(float(high), -math.inf)
        if "sinkhorn_epsilon_min" in out or "sinkhorn_epsilon_0" in out:
            eps_min = get("sinkhorn_epsilon_min", "orchestration.sinkhorn_epsilon_min")
            eps_0 = get("sinkhorn_epsilon_0", "orchestration.sinkhorn_epsilon_0")
            if eps_min > eps_0:  # eps_t = max(eps_min, ...) behaves identically at eps_min = eps_0
                out["sinkhorn_epsilon_min"] = float(eps_0)
        if "entropy_window" in out:
            floor = base["orchestration.entropy_window_floor"]
            if out["entropy_window"] < floor:
                out["entropy_window"] = int(floor)
        return out

    def changes(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """``section.name -> value`` overrides of the base config for a trial's params (repaired)."""
        by_name = {p.name: p.field for p in self.params}
        return {by_name[name].key: value for name, value in self.repair(params).items() if name in by_name}

    def config(self, params: Mapping[str, Any]) -> PredictorConfig:
        """The validated config of ``params`` (raises ConfigError only if the base config's own
        untuned fields make the point infeasible, which ``repair`` guards against)."""
        return self.base_config.replace(self.changes(params), source=f"{self.tier} tuning trial")

    def static_params(self, params: Mapping[str, Any]) -> dict[str, Any]:
        return {name: params[name] for name in self.static_names}

    def shared_params(self, params: Mapping[str, Any]) -> dict[str, Any]:
        return {name: params[name] for name in self.shared_names}
