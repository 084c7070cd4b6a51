"""Configuration: the declarative schema, loading and validation, mutation and audit, hot reload."""

from usp_core.config.loader import ConfigError, DynamicParams, PredictorConfig, StaticConfig, load_config
from usp_core.config.schema import ALL_FIELDS, BY_KEY, DEEP_TIER, FAST_TIER, FIELDS, Field

__all__ = [
    "ALL_FIELDS", "BY_KEY", "DEEP_TIER", "FAST_TIER", "FIELDS", "ConfigError", "DynamicParams", "Field",
    "PredictorConfig", "StaticConfig", "load_config",
]
