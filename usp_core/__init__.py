"""USP predictor core: the public API of SPEC §3.1 and nothing else."""

from __future__ import annotations

import jax

# float64 is the default dtype on CPU (SPEC §3.2) and timestamps are int64 nanoseconds.
jax.config.update("jax_enable_x64", True)

from usp_core.config import ConfigError, PredictorConfig, load_config  # noqa: E402

__all__ = ["load_config", "PredictorConfig", "ConfigError", "Predictor", "walk_forward_split", "run_backtest"]


def __getattr__(name: str):
    if name == "Predictor":
        from usp_core.engine.predictor import Predictor

        return Predictor
    if name == "walk_forward_split":
        from usp_core.backtest.splits import walk_forward_split

        return walk_forward_split
    if name == "run_backtest":
        from usp_core.backtest.runner import run_backtest

        return run_backtest
    raise AttributeError(f"module 'usp_core' has no attribute {name!r}")
