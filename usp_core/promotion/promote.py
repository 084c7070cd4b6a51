"""Apply a gate decision: audit, MLflow decision run, atomic rewrite and champion alias (SPEC §6)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from usp_core.config.audit import append_audit_record
from usp_core.config.loader import ConfigError, PredictorConfig
from usp_core.config.mutation import (
    MutationResult,
    atomic_write_config,
    parse_config_text,
    render_changes,
    resolve_audit_log,
    validate_changes,
)
from usp_core.promotion.gate import PromotionDecision


@dataclasses.dataclass(frozen=True)
class PromotionOutcome:
    decision: PromotionDecision
    promoted: bool
    reason: str
    mutation: MutationResult | None
    mlflow_run_id: str | None
    challenger_model_version: str | None
    champion_model_version: str | None


def challenger_changes(champion: Mapping[str, Any], challenger: Mapping[str, Any]) -> dict[str, Any]:
    """The keys whose value differs between two configs (what promotion writes)."""
    return {k: challenger[k] for k in champion if champion[k] != challenger[k]}


def decision_objective(decision: PromotionDecision) -> dict[str, float]:
    return {"champion": decision.champion_score, "challenger": decision.challenger_score,
            "improvement": decision.improvement, "dm_stat": decision.dm_stat, "p_value": decision.p_value}


def promote(
    config_path: str | os.PathLike[str],
    challenger: Mapping[str, Any] | PredictorConfig,
    decision: PromotionDecision,
    *,
    registry: Any = None,
    audit_log: str | os.PathLike[str] | None = None,
    now: dt.datetime | None = None,
    lock_timeout: float = 30.0,
) -> PromotionOutcome:
    """Promote ``challenger`` (a full config or a mapping of changes) if ``decision.promote``.

    With ``registry`` (:class:`~usp_core.promotion.registry.ConfigRegistry`) the decision is an MLflow run
    whose candidate config becomes a new model version with alias ``challenger``; on success the
    ``champion`` alias moves to it. A rejected decision is audited as ``MUTATION_REJECTED`` with its reason;
    an accepted one goes through :func:`~usp_core.config.mutation.atomic_write_config` (trigger
    ``"promotion"``), whose guards may still block it.
    """
    path = Path(config_path)
    text = path.read_text(encoding="utf-8")
    champion = parse_config_text(text, source=str(path))
    changes = challenger_changes(champion, challenger) if isinstance(challenger, PredictorConfig) else dict(challenger)
    objective = decision_objective(decision)
    run_id = challenger_version = None
    if registry is not None:
        try:
            _, delta = validate_changes(champion, changes, check_relative_change=False)
            candidate_text = render_changes(text, {k: new for k, (_, new) in delta.items()})
            run_id, challenger_version = registry.log_decision(decision, candidate_text,
                                                               champion_version=champion.version)
        except ConfigError:
            pass  # an invalid candidate is rejected (and audited) by atomic_write_config below
    if not decision.promote:
        append_audit_record(
            resolve_audit_log(path, champion, audit_log), event="MUTATION_REJECTED", trigger="promotion",
            delta={k: (champion[k] if k in champion else None, v) for k, v in changes.items()
                   if k not in champion or champion[k] != v},
            objective=objective, config_version_before=champion.version, config_version_after=champion.version,
            mlflow_run_id=run_id, reason=f"gate: {decision.reason}", now=now)
        return PromotionOutcome(decision, False, decision.reason, None, run_id, challenger_version, None)
    result = atomic_write_config(path, changes, "promotion", audit_log=audit_log, objective=objective,
                                 mlflow_run_id=run_id, now=now, reason=decision.reason, lock_timeout=lock_timeout)
    champion_version = None
    if result.applied and registry is not None:
        champion_version = registry.reconcile(path).model_version
    return PromotionOutcome(decision, result.applied, result.reason, result, run_id, challenger_version,
                            champion_version)


def evaluate_and_promote(
    config_path: str | os.PathLike[str],
    challenger: Mapping[str, Any] | PredictorConfig,
    panel: Any,
    *,
    registry: Any = None,
    audit_log: str | os.PathLike[str] | None = None,
    backtest: Any = None,
    now: dt.datetime | None = None,
) -> PromotionOutcome:
    """The whole gate: backtest champion (``config_path``) and challenger on the holdout, decide, promote."""
    from usp_core.promotion.gate import evaluate_promotion

    path = Path(config_path)
    champion = parse_config_text(path.read_text(encoding="utf-8"), source=str(path))
    challenger_cfg = challenger if isinstance(challenger, PredictorConfig) else champion.replace(dict(challenger))
    decision = evaluate_promotion(champion, challenger_cfg, panel, backtest=backtest)
    return promote(path, challenger_cfg, decision, registry=registry, audit_log=audit_log, now=now)
