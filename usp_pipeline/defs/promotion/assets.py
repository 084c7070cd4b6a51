"""Champion/challenger promotion through the statistical gate and the atomic config rewrite (SPEC §6)."""

import dagster as dg
import pandas as pd

from usp_pipeline.defs.common.io_manager import ALLOW_MISSING
from usp_pipeline.defs.common.metadata import rounded
from usp_pipeline.defs.common.pools import CONFIG_WRITER_POOL, GPU_POOL
from usp_pipeline.defs.common.resources import ConfigStoreResource, MLflowTrackerResource

GROUP = "promotion"


@dg.asset(
    group_name=GROUP,
    kinds={"python", "toml"},
    ins={
        "fast_tuning_campaign": dg.AssetIn(),
        "deep_tuning_campaign": dg.AssetIn(metadata={ALLOW_MISSING: True}),
    },
)
def challenger_config(
    context: dg.AssetExecutionContext,
    fast_tuning_campaign: dict,
    deep_tuning_campaign: dict | None,
    config_store: ConfigStoreResource,
) -> dg.MaterializeResult:
    """Best parameters of the latest campaigns applied to the champion: the candidate to promote."""
    champion = config_store.load()
    campaigns = [c for c in (fast_tuning_campaign, deep_tuning_campaign) if c and c.get("best_params")]
    best = min(campaigns, key=lambda c: c["best_value"]) if campaigns else None
    params = dict(best["best_params"]) if best else {}
    challenger = champion.replace(params, source="challenger")
    delta = {k: [champion[k], challenger[k]] for k in params if champion[k] != challenger[k]}
    context.log.info(f"challenger {challenger.version} from {best['tier'] if best else 'no'} campaign: {delta}")
    return dg.MaterializeResult(
        value={
            "version": challenger.version,
            "champion_version": champion.version,
            "params": params,
            "delta": delta,
            "campaign": best["study_name"] if best else None,
            "tier": best["tier"] if best else None,
            "best_value": best["best_value"] if best else None,
            "mlflow_run_url": best.get("mlflow_run_url") if best else None,
        },
        metadata={
            "config_version": challenger.version,
            "champion_version": champion.version,
            "source_campaign": (best["study_name"] if best else "none"),
            "changed_keys": len(delta),
            "delta": dg.MetadataValue.json(delta),
        },
    )


@dg.asset(group_name=GROUP, kinds={"python", "jax", "mlflow"}, pool=GPU_POOL)
def promotion_decision(
    context: dg.AssetExecutionContext,
    challenger_config: dict,
    validated_observations: pd.DataFrame,
    config_store: ConfigStoreResource,
) -> dg.MaterializeResult:
    """Champion vs challenger on the holdout folds: improvement and one-sided Diebold-Mariano p-value."""
    from usp_core.config import load_config
    from usp_pipeline.defs.common.core_adapters import promotion_gate

    # champion_config applies the decision only while the file still holds this version. It is the file's own
    # version (environment overrides are not in the file), read before the judged config so that a change in
    # between can only make the decision stale, never let it apply to a config it did not see.
    file_version = load_config(config_store.path(), environ={}).version
    champion = config_store.load()
    challenger = champion.replace(challenger_config["params"], source="challenger")
    decision = promotion_gate(champion, challenger, validated_observations)
    decision.update(challenger_params=challenger_config["params"], challenger_version=challenger.version,
                    champion_version=file_version, campaign_mlflow_run_url=challenger_config.get("mlflow_run_url"))
    context.log.info(f"promotion decision: {'PROMOTE' if decision['promote'] else 'keep champion'} ({decision['reason']})")
    objective = champion["backtest.objective"]
    meta = {
        "decision": "promote" if decision["promote"] else "keep champion",
        "reason": decision["reason"],
        "champion_version": file_version,
        "challenger_version": challenger.version,
        "scored_on": f"{objective} (lower is better) on the holdout fold of every series, the same steps for both "
                     "configs (not the tuning folds the campaign scored)",
    }
    for key, digits in (("champion_score", 4), ("challenger_score", 4), ("improvement", 4), ("p_value", 4),
                        ("dm_stat", 3)):
        if decision.get(key) is not None:
            meta[key] = rounded(decision[key], digits)
    meta["improvement_definition"] = "(champion - challenger) / champion: > 0 when the challenger is better"
    if decision.get("campaign_mlflow_run_url"):
        meta["campaign_mlflow_run"] = dg.MetadataValue.url(decision["campaign_mlflow_run_url"])
    return dg.MaterializeResult(value=decision, metadata=meta)


@dg.asset(group_name=GROUP, kinds={"toml", "mlflow"}, pool=CONFIG_WRITER_POOL)
def champion_config(
    context: dg.AssetExecutionContext,
    promotion_decision: dict,
    config_store: ConfigStoreResource,
    mlflow: MLflowTrackerResource,
) -> dg.MaterializeResult:
    """config/config.toml: rewritten atomically (audited, alias moved) when the gate promotes the version it judged."""
    from usp_core.promotion.promote import is_stale_reason
    from usp_pipeline.defs.common.core_adapters import apply_promotion

    outcome = apply_promotion(config_store.path(), promotion_decision, changes=promotion_decision["challenger_params"],
                              tracking_uri=mlflow.uri(), run_id=context.run.run_id,
                              campaign_run_url=promotion_decision.get("campaign_mlflow_run_url"))
    stale = is_stale_reason(outcome["reason"])
    # A stale decision is an expected outcome of concurrent writers, not a failure: the file is intact and
    # downstream assets should still run on it, so the asset materialises (promoted=False, stale=True).
    log = context.log.warning if stale else context.log.info
    log(f"champion config {outcome['version']} (promoted: {outcome['promoted']}, {outcome['reason']})")
    return dg.MaterializeResult(
        value=outcome,
        metadata={
            "config_version": outcome["version"],
            "previous_version": outcome["previous_version"],
            "promoted": outcome["promoted"],
            "stale": stale,
            "judged_version": str(promotion_decision.get("champion_version")),
            "reason": outcome["reason"],
            "path": dg.MetadataValue.path(str(config_store.path())),
            "delta": dg.MetadataValue.json(outcome.get("delta", {})),
            "champion_model_version": str(outcome.get("champion_model_version")),
            **({"mlflow_promotion_run": dg.MetadataValue.url(outcome["mlflow_run_url"])} if outcome.get("mlflow_run_url")
               else {}),
            **({"mlflow_champion_model": dg.MetadataValue.url(outcome["champion_model_url"])}
               if outcome.get("champion_model_url") else {}),
        },
    )
