"""Offline study (issue 11, honest kernels): shrink each kernel's predicted increment toward the last value by a
causal, discounted regression of the realised increment on the predicted one, and compare one-step MSE with the
naive forecast's on the processes of tests/core/kernels/test_against_naive.py plus a stationary AR(2).

    python bench/honest_shrinkage.py

For kernel k at step t: s = S_xy / S_xx over the earlier steps (discount ``lam``), its standard error from the
regression residual, and the shrunk increment max(0, min(1, s - z se)) * (prediction - last value). The engine
does not use it: put inside the step, the same shrinkage costs the fused forecast in every setting tried (README,
"Forecast quality", evidence-scaled kernel increments); this script shows what it does to the kernels alone.
"""

from __future__ import annotations

import numpy as np

from usp_core import Predictor
from usp_core.config import PredictorConfig
from usp_core.data import synthetic
from usp_core.kernels import KERNEL_NAMES

LENGTH, BATCH, BURN_IN = 800, 8, 100
VARIANTS = ((0.99, 0.0), (0.99, 1.0), (0.995, 1.0), (0.995, 2.0))  # (discount, z)


def shrunk_increments(x: np.ndarray, pred: np.ndarray, lam: float, z: float) -> np.ndarray:
    dp, dy = pred[:, :-1] - x[:, :-1], x[:, 1:] - x[:, :-1]
    b, t_len = dp.shape
    sxy, sxx, syy, n = np.zeros(b), np.full(b, 1e-300), np.zeros(b), np.zeros(b)
    out = np.empty_like(dp)
    for t in range(t_len):
        s = sxy / sxx
        se = np.sqrt(np.maximum(syy - s * sxy, 0.0) / np.maximum(n - 1.0, 1.0) / sxx)
        out[:, t] = np.clip(s - z * se, 0.0, 1.0) * dp[:, t]
        ok = np.isfinite(dp[:, t]) & np.isfinite(dy[:, t])
        d, y = np.where(ok, dp[:, t], 0.0), np.where(ok, dy[:, t], 0.0)
        sxy, sxx, syy, n = lam * sxy + d * y, lam * sxx + d * d, lam * syy + y * y, lam * n + ok
    return out


def main() -> None:
    processes = {
        "random walk": synthetic.brownian_motion(LENGTH, x0=50.0, seed=100, batch=BATCH),
        "gbm": synthetic.geometric_brownian_motion(LENGTH, mu=5e-4, sigma=1e-2, x0=100.0, seed=101, batch=BATCH),
        "ou theta 0.1": synthetic.ornstein_uhlenbeck(LENGTH, theta=0.1, sigma=0.3, mu=5.0, seed=102, batch=BATCH),
        "ar(0.5, 0.3)": np.stack([synthetic.ar_process(LENGTH, [0.5, 0.3], sigma=1.0, seed=200 + i)
                                  for i in range(BATCH)]) + 10.0,
    }
    predictor = Predictor(PredictorConfig.default())
    print("MSE / naive MSE after the burn-in: raw | " + " | ".join(f"lam {lam} z {z}" for lam, z in VARIANTS))
    for name, x in processes.items():
        predictions = np.asarray(predictor.run(x).kernel_predictions)
        dy = (x[:, 1:] - x[:, :-1])[:, BURN_IN:]
        print(name)
        for k, kernel in enumerate(KERNEL_NAMES):
            pred = predictions[..., k]
            raw = np.mean((dy - (pred[:, :-1] - x[:, :-1])[:, BURN_IN:]) ** 2) / np.mean(dy**2)
            shrunk = [np.mean((dy - shrunk_increments(x, pred, lam, z)[:, BURN_IN:]) ** 2) / np.mean(dy**2)
                      for lam, z in VARIANTS]
            print(f"  {kernel:>10}: {raw:.4f} | " + " | ".join(f"{r:.4f}" for r in shrunk), flush=True)


if __name__ == "__main__":
    main()
