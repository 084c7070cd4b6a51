import numpy as np
import pandas as pd
import pytest

from usp_core import PredictorConfig

SMALL = {
    "kernels.kernel_c_num_paths": 8, "kernels.dgm_width_size": 8, "kernels.dgm_depth": 1,
    "orchestration.sinkhorn_max_iter": 10, "kernels.sde_numel_integrations": 10, "kernels.wtmm_buffer_size": 64,
    # the store tests compare the job's batched steps with one online series at rtol 1e-9: a float32 Kernel A
    # rounds by batch shape (~3e-9 here); its own bounds are in tests/core/engine/test_predictor.py
    "kernels.kernel_a_dtype": "float64",
}


@pytest.fixture(scope="session")
def small_cfg():
    """Small static sizes: the store logic does not depend on them and they compile fast."""
    return PredictorConfig.default().replace(SMALL)


def observations(series: dict[str, int], *, start="2024-01-01", seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frames = []
    for sid, n in series.items():
        ts = pd.date_range(start, periods=n, freq="h", tz="UTC")
        frames.append(pd.DataFrame({"series_id": sid, "ts": ts.strftime("%Y-%m-%dT%H:%M:%SZ"),
                                    "value": np.cumsum(rng.normal(size=n)).astype(object)}))
    return pd.concat(frames, ignore_index=True)


def online_predictions(cfg, frame: pd.DataFrame) -> tuple[list[float], object]:
    """The forecasts and final state of one uninterrupted online run over a one-series frame: init on
    ``min_history`` values, then one step per row (what stored-state inference must reproduce)."""
    from usp_core.engine.predictor import Predictor

    p = Predictor(cfg)
    m = p.min_history
    values = frame["value"].astype(float).to_numpy()
    stamps = pd.to_datetime(frame["ts"], utc=True).astype("int64").to_numpy()
    state, out0 = p.init_output(values[:m], timestamp_ns=int(stamps[m - 1]))
    expected = [float(out0.prediction)]
    for v, t in zip(values[m:], stamps[m:], strict=True):
        res, state = p.step(state, v, timestamp_ns=int(t), now_ns=int(t))
        expected.append(float(res.prediction))
    return expected, state
