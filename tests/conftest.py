"""Shared fixtures."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import jax
import pytest

import usp_core  # noqa: F401  (enables float64)

ROOT = Path(__file__).resolve().parents[1]
_JAX_CACHE = pytest.StashKey[str]()


def pytest_configure(config):
    """A persistent compilation cache per test process, fresh for each session: modules that compile the same
    program (the small config's run at one shape, say) load it instead of compiling it again after
    ``_release_compiled_programs`` dropped it. Never one folder for two xdist workers: JAX aborted a worker
    while writing an entry that the other worker shared."""
    if os.environ.get("USP_TEST_JAX_CACHE", "1") == "0":
        jax.config.update("jax_enable_compilation_cache", False)
        return
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    folder = tempfile.mkdtemp(prefix=f"usp-test-jax-cache-{worker}-")
    config.stash[_JAX_CACHE] = folder
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def pytest_unconfigure(config):
    folder = config.stash.get(_JAX_CACHE, None)
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


# `make test` sends whole modules to a worker (--dist loadscope: a module's fixtures and compiled programs
# serve all its tests once). The longest modules (2-6 min each on the 2-core machine) start first, longest
# first, so that neither worker is left with one of them while the other has nothing more to do.
_LONGEST_FIRST = ("tests/core/engine/test_predictor.py", "tests/core/config/test_config.py",
                  "tests/e2e/test_demo_instance.py", "tests/core/engine/test_scenarios.py",
                  "tests/core/engine/test_guards.py", "tests/core/inference/test_observation_store.py",
                  "tests/core/inference/test_sigkill.py", "tests/pipeline/test_materialize.py",
                  "tests/core/inference/test_inference_store.py", "tests/core/engine/test_float32.py")


def pytest_collection_modifyitems(config, items):
    def rank(item):
        path = item.nodeid.split("::")[0]
        return _LONGEST_FIRST.index(path) if path in _LONGEST_FIRST else len(_LONGEST_FIRST)

    items.sort(key=rank)  # stable: modules keep their tests together and in order


os.environ.setdefault("USP_ROOT", str(ROOT))
# p.run stays in the test's process (xdist already runs a test per core); tests/core/engine/test_workers.py
# splits on purpose
os.environ.setdefault("USP_RUN_PROCESSES", "1")

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
    # float64 so that the engine's invariants are checked at the rounding level; the float32 DGM and Kernel A of
    # the defaults have their own bounds (tests/core/engine/test_predictor.py)
    "kernels.dgm_dtype": "float64",
    "kernels.kernel_a_dtype": "float64",
}


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop compiled XLA programs after each test module. A long-lived xdist worker otherwise accumulates
    hundreds of executables (each static config, shape and kernel test compiles its own), and XLA:CPU aborted
    compiling the pipeline test after ~250 tests in one worker; in isolation that test passes."""
    yield
    from usp_core.engine.predictor import release_compiled_programs

    release_compiled_programs()


@pytest.fixture(scope="session")
def small_config():
    from usp_core import load_config

    return load_config(None, SMALL_OVERRIDES, environ={})


# The pipeline's smallest predictor: every asset compiles quickly; the pipeline and e2e tests run on it.
PIPELINE_OVERRIDES = {
    "kernels.kernel_c_num_paths": 8, "kernels.dgm_width_size": 8, "kernels.dgm_depth": 1,
    "orchestration.sinkhorn_max_iter": 10, "kernels.sde_numel_integrations": 10, "kernels.wtmm_buffer_size": 64,
}


@pytest.fixture
def pipeline_home(tmp_path, monkeypatch):
    """A temp DAGSTER_HOME and a small config file (fast compiles); every store lives under tmp_path."""
    from usp_core import PredictorConfig
    from usp_core.config.render import render_toml

    cfg = PredictorConfig.default().replace(PIPELINE_OVERRIDES)
    config = tmp_path / "config" / "config.toml"
    config.parent.mkdir()
    config.write_text(render_toml(dict(cfg)))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    monkeypatch.setenv("USP_CONFIG_PATH", str(config))
    for var in ("MLFLOW_TRACKING_URI", "USP_OPTUNA_STORAGE", "USP_DUCKDB_PATH"):
        monkeypatch.delenv(var, raising=False)
    (tmp_path / "dagster_home").mkdir()
    return tmp_path


@pytest.fixture
def repo(tmp_path):
    """A project folder holding the default config at ``config/config.toml``."""
    (tmp_path / "config").mkdir()
    path = tmp_path / "config" / "config.toml"
    from usp_core.config.render import render_toml

    path.write_text(render_toml(), encoding="utf-8")
    return path


def audit_log_of(config_path: Path) -> Path:
    """Where the default config's relative ``audit.audit_log`` resolves for a config under ``config/``."""
    return config_path.parent.parent / "audit" / "mutations.jsonl"
