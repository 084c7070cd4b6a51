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
    STALE_PREFIX,
    MutationResult,
    atomic_write_config,
    find_applied_write,
    parse_config_text,
    render_changes,
    resolve_audit_log,
    stale_reason,
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
    stale: bool = False


def is_stale_reason(reason: str) -> bool:
    """Whether a promotion outcome's (or audit record's) reason is a stale-decision rejection."""
    return reason.startswith(STALE_PREFIX)


def challenger_changes(champion: Mapping[str, Any], challenger: Mapping[str, Any]) -> dict[str, Any]:
    """The keys whose value differs between two configs (what promotion writes)."""
    return {k: challenger[k] for k in champion if champion[k] != challenger[k]}


def decision_objective(decision: PromotionDecision) -> dict[str, float]:
    return {"champion": decision.champion_score, "challenger": decision.challenger_score,
            "improvement": decision.improvement, "dm_stat": decision.dm_stat, "p_value": decision.p_value}


def _requested_delta(champion: PredictorConfig, changes: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    return {k: (champion[k] if k in champion else None, v) for k, v in changes.items()
            if k not in champion or champion[k] != v}


def _log_decision(registry: Any, decision: PromotionDecision, champion: PredictorConfig, text: str,
                  changes: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """The decision's MLflow run and candidate model version, or ``(None, None)`` without a registry."""
    if registry is None:
        return None, None
    try:
        _, delta = validate_changes(champion, changes, check_relative_change=False)
        candidate_text = render_changes(text, {k: new for k, (_, new) in delta.items()})
        return registry.log_decision(decision, candidate_text, champion_version=champion.version)
    except ConfigError:
        return None, None  # an invalid candidate is rejected (and audited) by atomic_write_config


def _audit_rejection(path: Path, champion: PredictorConfig, changes: Mapping[str, Any],
                     decision: PromotionDecision, reason: str, *, audit_log: Any, run_id: str | None,
                     now: dt.datetime | None, extra: Mapping[str, Any] | None = None) -> None:
    append_audit_record(
        resolve_audit_log(path, champion, audit_log), event="MUTATION_REJECTED", trigger="promotion",
        delta=_requested_delta(champion, changes), objective=decision_objective(decision),
        config_version_before=champion.version, config_version_after=champion.version,
        mlflow_run_id=run_id, reason=reason, now=now, extra=extra)


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

    When ``decision.champion_version`` is set, the decision is applied as a compare-and-swap: if the file no
    longer holds that version (now, or when the write takes the config lock), nothing is written, the attempt
    is audited as stale and the outcome has ``stale=True``.
    """
    path = Path(config_path)
    text = path.read_text(encoding="utf-8")
    champion = parse_config_text(text, source=str(path))
    changes = challenger_changes(champion, challenger) if isinstance(challenger, PredictorConfig) else dict(challenger)
    expected = decision.champion_version
    if expected is not None and champion.version != expected and (
            not decision.promote or find_applied_write(path, champion, expected, changes) is None):
        # Nothing is written on this path, so it needs no lock; no registry run either: its candidate would be
        # rendered from a champion the gate never saw.
        why = stale_reason(expected, champion.version)
        _audit_rejection(path, champion, changes, decision, why, audit_log=audit_log, run_id=None, now=now,
                         extra={"expected_version": expected, "found_version": champion.version})
        return PromotionOutcome(decision, False, why, None, None, None, None, stale=True)
    run_id, challenger_version = _log_decision(registry, decision, champion, text, changes)
    if not decision.promote:
        _audit_rejection(path, champion, changes, decision, f"gate: {decision.reason}", audit_log=audit_log,
                         run_id=run_id, now=now)
        # the champion alias names the file's config even when nothing was ever promoted (a fresh registry)
        champion_version = registry.reconcile(path).model_version if registry is not None else None
        return PromotionOutcome(decision, False, decision.reason, None, run_id, challenger_version, champion_version)
    result = atomic_write_config(path, changes, "promotion", audit_log=audit_log,
                                 objective=decision_objective(decision), mlflow_run_id=run_id, now=now,
                                 reason=decision.reason, lock_timeout=lock_timeout, expected_version=expected)
    stale = not result.applied and expected is not None and result.version_before != expected
    # a stale attempt leaves the alias to the writer that changed the file
    champion_version = registry.reconcile(path).model_version if registry is not None and not stale else None
    return PromotionOutcome(decision, result.applied, result.reason, result, run_id, challenger_version,
                            champion_version, stale=stale)


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
    decision = dataclasses.replace(decision, champion_version=champion.version)
    return promote(path, challenger_cfg, decision, registry=registry, audit_log=audit_log, now=now)
