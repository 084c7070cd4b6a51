"""Shared fixtures. JAX compilations are cached on disk across test processes (tests/.jax_cache)."""

from __future__ import annotations

import os
from pathlib import Path

import jax
import pytest

import usp_core  # noqa: F401  (enables float64)

ROOT = Path(__file__).resolve().parents[1]
_CACHE = ROOT / ".pytest_cache" / "jax_cache"
_CACHE.mkdir(parents=True, exist_ok=True)
jax.config.update("jax_compilation_cache_dir", str(_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
os.environ.setdefault("USP_ROOT", str(ROOT))

# A cheaper predictor than the defaults (smaller networks, fewer paths and iterations) with the same code
# paths; tests that need the defaults use PredictorConfig.default() explicitly.
SMALL_OVERRIDES = {
    "orchestration.sinkhorn_max_iter": 50,
    "orchestration.residual_window_size": 50,
    "kernels.dgm_width_size": 16,
    "kernels.dgm_depth": 2,
    "kernels.dgm_collocation_points": 16,
    "kernels.kernel_c_num_paths": 16,
    "kernels.sde_numel_integrations": 20,
    "kernels.wtmm_buffer_size": 64,
    "core.base_min_signal_length": 32,
    "kernels.kernel_a_embedding_dim": 4,
}


@pytest.fixture(scope="session")
def small_config():
    from usp_core import load_config

    return load_config(None, SMALL_OVERRIDES, environ={})
