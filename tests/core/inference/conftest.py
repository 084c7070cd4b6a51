import numpy as np
import pandas as pd
import pytest

from usp_core import PredictorConfig

SMALL = {
    "kernels.kernel_c_num_paths": 8, "kernels.dgm_width_size": 8, "kernels.dgm_depth": 1,
    "orchestration.sinkhorn_max_iter": 10, "kernels.sde_numel_integrations": 10, "kernels.wtmm_buffer_size": 64,
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
