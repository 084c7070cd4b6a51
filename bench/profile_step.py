"""Where a step's time goes: µs per series-step of each part of the step, each run as its own
``jit(vmap(lax.scan(...)))`` over B series and T steps (so the numbers are comparable with ``p.run``).

    python bench/profile_step.py [--batch 64] [--length 256] [--parts step,kernels,A,B,C,D,last_value,long_mean,wtmm,krr]

Pin it to one core (``taskset -c 1``) on a shared machine; compare parts measured in one run.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from usp_core.config import PredictorConfig
from usp_core.data import synthetic
from usp_core.engine import step as step_mod
from usp_core.engine.workers import single_thread_blas
from usp_core.kernels import ANCHORS, KERNELS, ridge, wtmm

jax.config.update("jax_enable_x64", True)


def _time(fn, *args, reps: int) -> tuple[float, float]:
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    compile_s = time.perf_counter() - start
    best = np.inf
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
    return compile_s, best


def _kernel_scan(kernel, static, params):
    """Scan one kernel's forecast over a series: the window slides, the kernel's carry is threaded."""
    n = static.base_min_signal_length

    def run(values, key):
        window0 = values[:n]
        carry0 = kernel.init_carry(values[: n - 1], static, params, key)

        def body(c, y):
            window, carry = c
            window = jnp.concatenate([window[1:], y[None]])
            r = kernel.forecast(window, carry, key, static, params)
            return (window, r.carry), r.prediction

        return jax.lax.scan(body, (window0, carry0), values[n:])[1]

    return run


def _window_scan(fn, static):
    n = static.base_min_signal_length

    def run(values, key):
        def body(window, y):
            window = jnp.concatenate([window[1:], y[None]])
            return window, fn(window)

        return jax.lax.scan(body, values[:n], values[n:])[1]

    return run


def parts(cfg: PredictorConfig) -> dict:
    static = cfg.static
    params = step_mod._with_adaptive(cfg.dynamic_params(), jnp.asarray(0.5))
    length = wtmm.analysis_length(static)
    out = {
        "step": lambda v, k: step_mod.run_series(v, jnp.arange(v.shape[0]), jnp.arange(v.shape[0]), k, static,
                                                  cfg.dynamic_params()).prediction,
    }
    def kernel_pass(v, k):
        n = static.base_min_signal_length
        ts = jnp.arange(v.shape[0])
        state = step_mod.init_state(v[:n], ts[n - 1], k, static, cfg.dynamic_params())[0].kernel

        def body(s, xs):
            return step_mod.kernel_step(s, *xs, static, cfg.dynamic_params())

        return jax.lax.scan(body, state, (v[n:], ts[n:], ts[n:]))[1].predictions

    out["kernels"] = kernel_pass
    for name, kernel in zip("ABCD", KERNELS, strict=True):
        out[name] = _kernel_scan(kernel, static, params)
    for anchor in ANCHORS:
        out[anchor.name] = _kernel_scan(anchor, static, params)
    out["wtmm"] = _window_scan(lambda w: wtmm.holder_exponent(
        jnp.concatenate([jnp.zeros(max(length - w.shape[0], 0)), w])[-length:], jnp.asarray(w.shape[0]), static,
        params), static)
    out["krr"] = _window_scan(lambda w: ridge.krr_forecast(
        (w - w.mean()) / w.std(), static, params)[0], static)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--parts", default="step,A,B,C,D,wtmm,krr")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    args = ap.parse_args()
    overrides = {}
    for item in args.set:
        key, value = item.split("=", 1)
        overrides[key] = type(PredictorConfig.default()[key])(value)
    cfg = PredictorConfig.default().replace(overrides) if overrides else PredictorConfig.default()
    values = jnp.asarray(synthetic.ornstein_uhlenbeck(args.length, theta=0.05, sigma=1.0, seed=0, batch=args.batch))
    key = jax.random.PRNGKey(0)
    steps = args.batch * (args.length - cfg.static.base_min_signal_length)
    table = parts(cfg)
    print(f"B={args.batch} T={args.length} ({steps} series-steps), backend {jax.default_backend()}")
    for name in args.parts.split(","):
        fn = jax.jit(jax.vmap(table[name], in_axes=(0, None)))
        with single_thread_blas():  # as p.run runs
            compile_s, best = _time(fn, values, key, reps=args.reps)
        print(f"{name:>6}: {1e6 * best / steps:9.1f} us/series-step   (compile+first {compile_s:6.1f} s)", flush=True)


if __name__ == "__main__":
    main()
