"""How much better could the fusion be on the dev set? Upper bounds from hindsight, per series.

    python bench/fusion_headroom.py --stretch newest
    python bench/fusion_headroom.py --stretch older --set orchestration.fusion_temperature=0.01

The fused forecast is a mean (the weighted experts' means) and a sigma (pooled candidates times the interval
scale and GARCH factor). Each half is scored with the other held at the fused one, against what hindsight allows:

- mean: CRPS skill vs naive of the fused mean; of the best single expert's mean; of the best *fixed* convex
  combination of the experts' means chosen on the scored points themselves (no online weighting can beat it
  by more than noise: it is the target a fusion that fuses is measured against);
- sigma: of the fused sigma; of the best single candidate sigma (each expert's own), and of GARCH(1,1)'s sigma,
  all with the fused mean.

A small gap in both halves means the pool, not the weighting, limits the forecast. Stretches as in
``dev_stretches.py``; all folds of each series, as ``usp bench``.
"""

from __future__ import annotations

import numpy as np
from dev_stretches import stretch_arguments, stretch_inputs
from scipy.optimize import minimize

from usp_core.backtest.baselines import garch_forecast, naive_forecast
from usp_core.backtest.metrics import gaussian_crps
from usp_core.backtest.runner import run_backtest, target_aligned
from usp_core.config import PredictorConfig
from usp_core.kernels import EXPERT_NAMES


def _aligned(x) -> np.ndarray:
    """Entry t of the time axis (axis 1) holds the forecast OF t, for arrays with trailing expert axes too."""
    a = np.moveaxis(np.asarray(x, dtype=np.float64), 1, -1)
    return np.moveaxis(target_aligned(a), -1, 1)


def best_convex_mean(actual, means, sigma) -> tuple[float, np.ndarray]:
    """Mean CRPS of the best fixed convex combination of the experts' means (softmax-parametrised, L-BFGS from
    uniform and from each corner), and its weights."""
    k = means.shape[1]

    def loss(a):
        w = np.exp(a - a.max())
        return float(np.mean(gaussian_crps(actual, means @ (w / w.sum()), sigma)))

    starts = [np.zeros(k)] + [np.where(np.arange(k) == i, 10.0, 0.0) for i in range(k)]
    fits = [minimize(loss, s, method="L-BFGS-B") for s in starts]
    best = min(fits, key=lambda r: r.fun)
    w = np.exp(best.x - best.x.max())
    return best.fun, w / w.sum()


def headroom(cfg: PredictorConfig, panel) -> list[dict]:
    result = run_backtest(cfg, panel, include="all")
    out, values = result.output, result.values
    prediction, sigma = _aligned(out.prediction), _aligned(out.sigma)
    means, sigmas = _aligned(out.kernel_predictions), _aligned(out.kernel_sigmas)
    first_origins = np.asarray([min(f.test.start for f in folds) - 1 for folds in result.folds])
    naive = naive_forecast(values, window=cfg.static.base_min_signal_length, level=0.95)
    garch = garch_forecast(values, level=0.95, first_origins=first_origins)
    naive_mu, naive_sigma = target_aligned(naive.prediction), target_aligned(naive.sigma)
    garch_sigma = target_aligned(garch.sigma)
    rows = []
    for b, series_id in enumerate(result.series_ids):
        scored = np.zeros(values.shape[1], bool)
        for fold in result.folds[b]:
            scored[fold.test.start:fold.test.stop] = True
        scored &= np.isfinite(prediction[b]) & np.isfinite(values[b])
        y, mu, sd = values[b, scored], prediction[b, scored], sigma[b, scored]
        reference = np.mean(gaussian_crps(y, naive_mu[b, scored], naive_sigma[b, scored]))

        def skill(m, s, reference=reference, y=y):
            return 1.0 - float(np.mean(gaussian_crps(y, m, s))) / reference

        expert_means = [skill(means[b, scored, i], sd) for i in range(means.shape[2])]
        expert_sigmas = [skill(mu, sigmas[b, scored, i]) for i in range(sigmas.shape[2])]
        convex, weights = best_convex_mean(y, means[b, scored], sd)
        rows.append({
            "series": series_id, "fused": skill(mu, sd),
            "best_mean": max(expert_means), "best_mean_of": EXPERT_NAMES[int(np.argmax(expert_means))],
            "convex_mean": 1.0 - convex / reference, "convex_weights": weights,
            "best_sigma": max(expert_sigmas), "best_sigma_of": EXPERT_NAMES[int(np.argmax(expert_sigmas))],
            "garch_sigma": skill(mu, garch_sigma[b, scored]),
        })
    return rows


def main() -> None:
    panel, overrides = stretch_inputs(stretch_arguments(__doc__.splitlines()[0], "newest").parse_args())
    cfg = PredictorConfig.default().replace(overrides)
    rows = headroom(cfg, panel)
    print("| series | fused | best expert mean | best convex mean (weights " + ", ".join(EXPERT_NAMES)
          + ") | best expert sigma | GARCH sigma |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        w = " ".join(f"{x:.2f}" for x in r["convex_weights"])
        print(f"| {r['series']} | {r['fused']:+.3f} | {r['best_mean']:+.3f} ({r['best_mean_of']}) | "
              f"{r['convex_mean']:+.3f} ({w}) | {r['best_sigma']:+.3f} ({r['best_sigma_of']}) | {r['garch_sigma']:+.3f} |")
    mean = {k: np.mean([r[k] for r in rows]) for k in ("fused", "best_mean", "convex_mean", "best_sigma", "garch_sigma")}
    print(f"| **mean** | {mean['fused']:+.3f} | {mean['best_mean']:+.3f} | {mean['convex_mean']:+.3f} | "
          f"{mean['best_sigma']:+.3f} | {mean['garch_sigma']:+.3f} |")


if __name__ == "__main__":
    main()
