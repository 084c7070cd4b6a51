import pytest

SMALL = {
    "kernels.kernel_c_num_paths": 8, "kernels.dgm_width_size": 8, "kernels.dgm_depth": 1,
    "orchestration.sinkhorn_max_iter": 10, "kernels.sde_numel_integrations": 10, "kernels.wtmm_buffer_size": 64,
}


@pytest.fixture
def pipeline_home(tmp_path, monkeypatch):
    """A temp DAGSTER_HOME and a small config file (fast compiles); every store lives under tmp_path."""
    from usp_core import PredictorConfig
    from usp_core.config.render import render_toml

    cfg = PredictorConfig.default().replace(SMALL)
    config = tmp_path / "config" / "config.toml"
    config.parent.mkdir()
    config.write_text(render_toml(dict(cfg)))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    monkeypatch.setenv("USP_CONFIG_PATH", str(config))
    for var in ("MLFLOW_TRACKING_URI", "USP_OPTUNA_STORAGE", "USP_DUCKDB_PATH"):
        monkeypatch.delenv(var, raising=False)
    (tmp_path / "dagster_home").mkdir()
    return tmp_path
