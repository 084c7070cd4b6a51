"""Meta-optimisation: search spaces, Optuna campaigns, checkpoints, reports, MLflow tracking."""

from usp_core.tuning.campaign import BacktestEvaluator, CampaignResult, run_campaign
from usp_core.tuning.checkpoint import IntegrityError
from usp_core.tuning.optimizer import (
    AsyncMetaOptimizer,
    BayesianMetaOptimizer,
    MetaOptimizationConfig,
    TrialScore,
    default_storage_url,
    make_storage,
    study_name_for,
)
from usp_core.tuning.report import OptimizationReport
from usp_core.tuning.space import SearchSpace
from usp_core.tuning.tracking import CampaignTracker

__all__ = [
    "AsyncMetaOptimizer", "BacktestEvaluator", "BayesianMetaOptimizer", "CampaignResult", "CampaignTracker",
    "IntegrityError", "MetaOptimizationConfig", "OptimizationReport", "SearchSpace", "TrialScore",
    "default_storage_url", "make_storage", "run_campaign", "study_name_for",
]
