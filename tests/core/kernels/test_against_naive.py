"""Every kernel against the last value (SPEC §3.4, issue "honest kernels"): one-step MSE relative to the naive
forecast and 95 % coverage of each kernel's own interval, from one default-config run of 8 series per process.

Measured with the default config (seeds below): on random walks and GBM (mu = 5e-4, sigma = 1e-2, level 100)
ridge 1.006 / 1.005, DGM 1.008 / 1.010, SDE 1.008 / 1.002, signature 1.013 / 1.008 times the naive MSE (DGM 1.058 /
1.056 before its local drift was shrunk by its sampling noise, signature 1.027 / 1.022 before its readout's
increment was); on an OU process (theta = 0.1, sigma = 0.3) the SDE kernel 0.963 (the known-parameter AR(1)
forecast: 0.952), since its drift slope pools the window's with the whole history's (it was 1.000 from the
64-point window alone).
The regression bounds below sit just above those figures; the SPEC's acceptance (no kernel worse than naive on a
random walk) is the strict xfail."""

from __future__ import annotations

import numpy as np
import pytest

from usp_core import Predictor
from usp_core.config import PredictorConfig
from usp_core.data import synthetic
from usp_core.kernels import KERNEL_NAMES

LENGTH, BATCH, BURN_IN = 800, 8, 100
KERNELS = list(KERNEL_NAMES)


def _scores(series: np.ndarray) -> dict[str, tuple[float, float]]:
    """{kernel: (MSE / naive MSE, coverage of the kernel's 95 % interval)} after the burn-in."""
    out = Predictor(PredictorConfig.default()).run(series)
    predictions = np.asarray(out.kernel_predictions)[:, BURN_IN:-1]
    sigmas = np.asarray(out.kernel_sigmas)[:, BURN_IN:-1]
    actual, naive = series[:, BURN_IN + 1:], series[:, BURN_IN:-1]
    naive_mse = np.mean((actual - naive) ** 2)
    scores = {}
    for k, name in enumerate(KERNELS):
        error = actual - predictions[..., k]
        scores[name] = (float(np.mean(error**2) / naive_mse), float(np.mean(np.abs(error) <= 1.959964 * sigmas[..., k])))
    return scores


@pytest.fixture(scope="module")
def processes() -> dict[str, dict[str, tuple[float, float]]]:
    walk = synthetic.brownian_motion(LENGTH, x0=50.0, seed=100, batch=BATCH)
    gbm = synthetic.geometric_brownian_motion(LENGTH, mu=5e-4, sigma=1e-2, x0=100.0, seed=101, batch=BATCH)
    ou = synthetic.ornstein_uhlenbeck(LENGTH, theta=0.1, sigma=0.3, mu=5.0, seed=102, batch=BATCH)
    return {"random walk": _scores(walk), "gbm": _scores(gbm), "ou": _scores(ou)}


REGRESSION_BOUND = {"ridge": 1.02, "dgm": 1.02, "sde": 1.02, "signature": 1.02}


@pytest.mark.slow
@pytest.mark.parametrize("process", ["random walk", "gbm"])
def test_kernels_stay_close_to_naive_on_unit_root_series(processes, process):
    for name, (ratio, coverage) in processes[process].items():
        assert ratio <= REGRESSION_BOUND[name], (process, name, ratio)
        assert abs(coverage - 0.95) <= 0.03, (process, name, coverage)


@pytest.mark.slow
def test_sde_kernel_beats_naive_on_a_weakly_mean_reverting_ou(processes):
    ratio, coverage = processes["ou"]["sde"]
    assert ratio <= 0.98 and abs(coverage - 0.95) <= 0.03, (ratio, coverage)


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="SPEC §3.4 acceptance not met: on a random walk every kernel's MSE is "
                   "0.6-1.3 % above the last value's (window estimates of n = 64 points); see the module docstring")
def test_no_kernel_is_worse_than_naive_on_a_random_walk(processes):
    assert all(ratio <= 1.0 for ratio, _ in processes["random walk"].values())
