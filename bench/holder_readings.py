"""What the circuit breaker reads (SPEC §3.7): the Hölder exponent's two readings on full analysis buffers.

    python bench/holder_readings.py                 # every dev series and the simulated processes
    python bench/holder_readings.py --series vix core_cpi_inflation --no-simulated

Per series or process, over its full-buffer windows (every ``wtmm_stride`` values of a dev series; 64
independent windows of a simulated process): the median level exponent, the median profile exponent and its
10-90 % range, the share of windows whose profile exponent lies in [0.9, 1.3] (near the fold's discontinuity
at 1), and the share of windows with H = max(level, folded profile) under ``holder_threshold``. The engine's
gate adds hysteresis (exit above threshold + ``holder_hysteresis``) and runs on partially filled buffers early in
a series; ``bench/dev_stretches.py`` reports its emergency fractions. ``--splices`` runs the default predictor
on the SPEC §3.7 acceptance scenario: a 700-value segment with H = 0.15 spliced into white noise, as fGn (the
increments) and as fBm (the path), and prints the emergency fraction before, inside (from 64 and from 256
values after its start) and 300 values after the segment. ``--fill`` reads the simulated processes on buffers holding
only their newest 64, 128 or 256 values (the engine arms the circuit breaker once the buffer is full).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from usp_core.config import PredictorConfig
from usp_core.data import synthetic
from usp_core.data.real import load_dev_panel
from usp_core.kernels import wtmm


def simulated(length: int, count: int = 64) -> dict[str, np.ndarray]:
    walk = synthetic.brownian_motion(length, seed=11, batch=count)
    noise = np.random.default_rng(12).standard_normal((count, length))
    return {
        "white noise": noise,
        "ar(1) phi=0.5": synthetic.ar_process(length, [0.5], seed=13, batch=count),
        "ar(1) phi=-0.3": synthetic.ar_process(length, [-0.3], seed=14, batch=count),
        "garch(1,1) returns": synthetic.garch_returns(length, seed=15, batch=count),
        "brownian motion": walk,
        "ou theta=0.1": synthetic.ornstein_uhlenbeck(length, theta=0.1, sigma=0.3, seed=16, batch=count),
        "fbm H=0.15": synthetic.fractional_brownian_motion(length, 0.15, seed=17, batch=count),
        "fgn H=0.15": synthetic.fractional_gaussian_noise(length, 0.15, seed=18, batch=count),
        "local level, noise 1x": walk + noise,
        "local level, noise 3x": walk + 3.0 * noise,
    }


def splices(seeds: int = 3) -> None:
    from usp_core import Predictor

    rows, names = [], []
    for seed in range(seeds):
        noise = synthetic.fractional_gaussian_noise(1900, 0.5, seed=10 + seed)
        for kind, segment in (("fgn", synthetic.fractional_gaussian_noise(700, 0.15, seed=20 + seed)),
                              ("fbm", synthetic.fractional_brownian_motion(700, 0.15, seed=30 + seed))):
            rows.append(np.concatenate([noise[:600], segment, noise[600:]]))
            names.append(f"{kind} H=0.15, seed {seed}")
    emergency = np.asarray(Predictor(PredictorConfig.default()).run(np.stack(rows)).emergency)
    print(f"{'spliced segment':24s} {'before':>7s} {'from 64':>8s} {'from 256':>9s} {'after':>6s}")
    for name, e in zip(names, emergency, strict=True):
        print(f"{name:24s} {e[64:600].mean():7.2f} {e[664:1300].mean():8.2f} {e[856:1300].mean():9.2f} {e[1600:].mean():6.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--series", nargs="*", default=None, help="dev series (default: all)")
    parser.add_argument("--no-simulated", action="store_true")
    parser.add_argument("--splices", action="store_true", help="run the spliced-segment scenario instead")
    parser.add_argument("--fill", action="store_true", help="simulated processes on partially filled buffers")
    args = parser.parse_args()
    if args.splices:
        splices()
        return

    cfg = PredictorConfig.default()
    static, params = cfg.static, cfg.dynamic_params()
    length = wtmm.analysis_length(static)
    threshold = float(cfg["orchestration.holder_threshold"])

    @jax.jit
    @jax.vmap
    def readings(buffer, n):
        return (wtmm.wtmm_exponent(buffer, n, static, params), wtmm.wtmm_exponent(wtmm.profile(buffer, n), n, static, params),
                wtmm.holder_exponent(buffer, n, static, params))

    def report(name: str, windows: np.ndarray, fill: int = length) -> None:
        partial = np.zeros_like(windows)
        partial[:, length - fill:] = windows[:, length - fill:]
        level, prof, h = map(np.asarray, readings(jnp.asarray(partial), jnp.full(len(windows), fill, jnp.int32)))
        near_one = np.mean((prof > 0.9) & (prof < 1.3))
        print(f"{name:24s} {len(windows):5d} {np.median(level):6.2f} {np.median(prof):6.2f} "
              f"[{np.quantile(prof, 0.1):.2f}, {np.quantile(prof, 0.9):.2f}] {near_one:8.2f} {np.mean(h < threshold):8.2f}"
              f" {np.std(h):6.2f}")

    if args.fill:
        print(f"buffer {length} holding its newest n values, holder_threshold {threshold}")
        print(f"{'process, n':24s} {'wins':>5s} {'level':>6s} {'prof':>6s} {'prof 10-90 %':>12s} {'near 1':>8s} "
              f"{'H < thr':>8s} {'sd H':>6s}")
        for name, windows in simulated(length, count=256).items():
            for fill in (64, 128, length):
                report(f"{name}, {fill}", windows, fill)
        return
    print(f"buffer {length}, holder_threshold {threshold}")
    print(f"{'series':24s} {'wins':>5s} {'level':>6s} {'prof':>6s} {'prof 10-90 %':>12s} {'near 1':>8s} {'H < thr':>8s} "
          f"{'sd H':>6s}")
    if args.series is None or args.series:
        full, _ = load_dev_panel(tuple(args.series) if args.series else None)
        for name, g in full.groupby("series_id", sort=True):
            x = g.sort_values("ts")["value"].to_numpy()
            ends = range(length, len(x) + 1, static.wtmm_stride)
            report(name, np.stack([x[e - length:e] for e in ends]))
    if not args.no_simulated:
        for name, windows in simulated(length).items():
            report(name, windows)


if __name__ == "__main__":
    main()
