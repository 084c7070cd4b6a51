"""Champion/challenger promotion: the statistical gate and the model registry."""

from usp_core.promotion.gate import PromotionDecision, diebold_mariano, evaluate_promotion, promotion_decision
from usp_core.promotion.promote import PromotionOutcome, evaluate_and_promote, promote

__all__ = [
    "PromotionDecision", "PromotionOutcome", "diebold_mariano", "evaluate_and_promote", "evaluate_promotion",
    "promote", "promotion_decision",
]
