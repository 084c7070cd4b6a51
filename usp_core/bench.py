"""Benchmark harness of SPEC §9 (``usp bench``): throughput of the compiled scan vs a Python loop of jitted
steps, compile time and recompilations, single-step latency, batched vs sequential trials, and the dev-set
accuracy table. Writes ``<out_dir>/bench.json`` and ``<out_dir>/latest.md``.

Every shape (B, T) is one compilation, so the grid is cut to fit a time budget on small machines; whatever
was skipped is listed in the table.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from usp_core.config import PredictorConfig
from usp_core.data import synthetic
from usp_core.engine.workers import single_thread_blas

FULL_GRID = {"batch": (1, 16, 64, 256), "length": (500, 2000)}
QUICK_GRID = {"batch": (1, 16, 64), "length": (500,)}
# On a GPU the rate grows with B up to the device's width: B rises first, and the budget cuts the longer series.
GPU_SHAPES = ((256, 1000), (1024, 1000), (4096, 1000), (4096, 2000), (1024, 2000), (256, 2000), (1, 1000))
RATIO_POINT = (64, 1000)
RECOMPILE_POINT = (4, 300)  # compile counts do not depend on the shape: keep this check cheap
TRIALS_K = 8
TRIALS_REPEATS = 3


def _timed(fn, *args, **kwargs) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn(*args, **kwargs)  # Predictor.run returns numpy arrays: the call has finished
    return time.perf_counter() - start, out


def _panel(batch: int, length: int, seed: int = 0) -> np.ndarray:
    return synthetic.ornstein_uhlenbeck(length, theta=0.05, sigma=1.0, seed=seed, batch=batch)


def _dynamic_variant(cfg: PredictorConfig, i: int) -> PredictorConfig:
    """A config that differs from cfg only in a dynamic parameter (the CUSUM allowance k)."""
    return cfg.replace({"orchestration.cusum_k": 0.3 + 0.05 * i})


def _compiled_run(p, values) -> tuple[float, float]:
    """Compile ``p.run``'s program for this shape ahead of time, then time one run of it, outputs on the host:
    (compile s, run s)."""
    compiled = p.compile_run(values)
    start = time.perf_counter()
    compiled(values)
    return compiled.compile_seconds, time.perf_counter() - start


def throughput(cfg, batch: int, length: int) -> dict[str, float]:
    from usp_core.engine.predictor import Predictor

    compile_s, run_s = _compiled_run(Predictor(cfg), _panel(batch, length))
    return {"batch": batch, "length": length, "compile_s": compile_s, "steady_s": run_s,
            "series_steps_per_s": batch * length / run_s}


def step_loop(cfg, n_steps: int) -> dict[str, float]:
    """A Python loop calling the jitted single step on one series (the online latency)."""
    from usp_core.engine.predictor import Predictor

    p = Predictor(cfg)
    values = _panel(1, p.min_history + n_steps + 1)[0]
    start = time.perf_counter()  # p.init compiles the priming and the step program that p.step then runs
    state = p.init(values[: p.min_history])
    out, state = p.step(state, values[p.min_history])
    jax.block_until_ready(out.prediction)
    compile_s = time.perf_counter() - start
    latencies = []
    with single_thread_blas():  # as the README advises for an online loop
        for v in values[p.min_history + 1 :]:
            start = time.perf_counter()
            out, state = p.step(state, float(v))
            jax.block_until_ready(out.prediction)
            latencies.append(time.perf_counter() - start)
    lat = np.asarray(latencies)
    return {"steps": len(lat), "first_step_s": compile_s, "p50_s": float(np.median(lat)),
            "p99_s": float(np.quantile(lat, 0.99)), "series_steps_per_s": float(1.0 / lat.mean())}


def seed_loop(cfg, batch: int, n_steps: int) -> dict[str, float]:
    """The seed's ``orchestrate_step_batch`` (seed §11.3.1): at every time step, a Python loop over the B series
    slices each series' state out of the batched state, calls the jitted single-series step, and stacks the
    new states back; the host waits for each time step (the seed's per-series ``device_get``)."""
    import jax.numpy as jnp

    from usp_core.engine.predictor import Predictor

    p = Predictor(cfg)
    m = p.min_history
    values = _panel(batch, m + n_steps + 1)
    states, _ = p.init_batch(values[:, :m], np.full(batch, m - 1))

    def time_step(states, t):
        new = []
        for i in range(batch):
            new.append(p.step(jax.tree.map(lambda x, i=i: x[i], states), float(values[i, t]))[1])
        states = jax.tree.map(lambda *xs: jnp.stack(xs), *new)
        return jax.block_until_ready(states)

    states = time_step(states, m)  # compiles the single step
    with single_thread_blas():
        start = time.perf_counter()
        for t in range(m + 1, m + 1 + n_steps):
            states = time_step(states, t)
        elapsed = time.perf_counter() - start
    return {"batch": batch, "time_steps": n_steps, "elapsed_s": elapsed,
            "series_steps_per_s": batch * n_steps / elapsed}


def recompilations(cfg, batch: int, length: int) -> dict[str, Any]:
    """Run configs differing only in dynamic parameters on an already compiled shape; count new compilations."""
    from usp_core.engine.predictor import Predictor, count_compilations

    values = _panel(batch, length, seed=1)
    with count_compilations() as first:
        Predictor(cfg).run(values)
    with count_compilations() as again:
        for i in range(3):
            Predictor(_dynamic_variant(cfg, i)).run(values)
    return {"first_run": dict(first), "after": dict(again), "recompilations": int(sum(again.values()))}


def trials(cfg, batch: int, length: int, k: int = TRIALS_K) -> dict[str, float]:
    from usp_core.engine.predictor import Predictor, stack_params

    configs = [_dynamic_variant(cfg, i) for i in range(k)]
    values = _panel(batch, length, seed=2)
    p = Predictor(cfg)
    p.run(values)  # warm: the sequential path reuses this compilation
    # each side is its best of TRIALS_REPEATS timings: one timing of ~1 s swung the ratio from 3.5x to 4.9x here
    seq_s = sum(min(_timed(Predictor(c).run, values)[0] for _ in range(TRIALS_REPEATS)) for c in configs)
    params = stack_params(configs)
    first, _ = _timed(p.run_trials, values, params)
    batched_s = min(_timed(p.run_trials, values, params)[0] for _ in range(TRIALS_REPEATS))
    return {"k": k, "batch": batch, "length": length, "sequential_s": seq_s, "batched_first_s": first,
            "batched_s": batched_s, "sequential_trials_per_s": k / seq_s, "batched_trials_per_s": k / batched_s,
            "speedup": seq_s / batched_s}


def dev_accuracy(cfg, max_length: int) -> dict[str, Any]:
    from usp_core.backtest.runner import MODELS, run_backtest
    from usp_core.data.real import load_dev_panel

    panel, provenance = load_dev_panel(max_length=max_length)
    start = time.perf_counter()
    result = run_backtest(cfg, panel, include="all")
    elapsed = time.perf_counter() - start
    from usp_core.kernels import EXPERT_NAMES

    rows = []
    out = result.output
    for b, series_id in enumerate(result.series_ids):
        row = {"series_id": series_id}
        for model in MODELS:
            m = result.per_series.loc[(model, series_id)]
            row[model] = {"mase": float(m["mase"]), "crps_skill": float(m["crps_skill"]), "coverage": float(m["coverage"]),
                          "crps": float(m["crps"])}
        live = np.isfinite(np.asarray(out.prediction)[b]) & ~np.asarray(out.rejected)[b]

        def mean_over_live(x, names, b=b, live=live):
            return dict(zip(names, np.asarray(x)[b][live].mean(axis=0).tolist(), strict=True))

        row["emergency_fraction"] = float(np.asarray(out.emergency)[b][live].mean())
        row["mean_weights"] = mean_over_live(out.weights, EXPERT_NAMES)
        row["mean_scale_weights"] = mean_over_live(out.scale_weights, (*EXPERT_NAMES, "mixture"))
        row["mean_selection_weights"] = mean_over_live(out.selection_weights, ("fused", *EXPERT_NAMES))
        rows.append(row)
    aggregate = {model: {k: float(v) for k, v in result.aggregate.loc[model, ["mase", "crps_skill", "coverage"]].items()}
                 for model in MODELS}
    return {"max_length": max_length, "elapsed_s": elapsed, "rows": rows, "aggregate": aggregate,
            "provenance": provenance.to_dict(orient="records"), "level": cfg["core.interval_level"]}


def loops(cfg, batch: int, single_steps: int, seed_steps: int) -> dict[str, Any]:
    """Both Python loops in one process: the seed's loop reuses the single step's compilation."""
    return {"step_loop": step_loop(cfg, single_steps), "seed_loop": seed_loop(cfg, batch, seed_steps)}


MEASURES = {"loops": loops, "throughput": throughput, "recompilation": recompilations, "trials": trials,
            "dev": dev_accuracy}


def _init_worker() -> None:
    jax.config.update("jax_enable_compilation_cache", False)  # measure real compilations


def _measure(name: str, cfg_values: dict[str, Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    start = time.perf_counter()
    result = MEASURES[name](PredictorConfig(cfg_values), **kwargs)
    elapsed = time.perf_counter() - start
    print(f"bench: {name} {kwargs} done in {elapsed:.0f} s", file=sys.stderr, flush=True)
    return {**result, "task_s": elapsed}


def _tasks(quick: bool, backend: str) -> list[tuple[str, str, dict[str, Any]]]:
    """(label, measure, kwargs): on a CPU the SPEC §9 ratios first, then the throughput grid from the cheapest
    shape up, so that a time budget cuts the largest shapes; on a GPU the throughput shapes come right after the
    ratio point (they are what a GPU run is for) and the dev-set table, which does not depend on the device, last."""
    if quick:
        shapes = [(b, t) for t in QUICK_GRID["length"] for b in QUICK_GRID["batch"]]
    elif backend == "gpu":
        shapes = list(GPU_SHAPES)
    else:
        shapes = sorted(((b, t) for b in FULL_GRID["batch"] for t in FULL_GRID["length"]), key=lambda bt: bt[0] * bt[1])
    ratio_b, ratio_t = RATIO_POINT
    ratio = [("ratio point", "throughput", {"batch": ratio_b, "length": ratio_t})]
    grid = [(f"throughput B={b} T={t}", "throughput", {"batch": b, "length": t}) for b, t in shapes if (b, t) != RATIO_POINT]
    ratios = [
        ("loops", "loops", {"batch": ratio_b, "single_steps": 100 if quick else 300, "seed_steps": 2 if quick else 10}),
        ("recompilation", "recompilation", {"batch": RECOMPILE_POINT[0], "length": RECOMPILE_POINT[1]}),
        ("batched trials", "trials", {"batch": 8, "length": 400}),
    ]
    dev = [("dev-set accuracy", "dev", {"max_length": 500 if quick else 1000})]
    if backend == "gpu":
        return ratio + grid + ratios + dev
    return ratios[:1] + ratio + ratios[1:] + dev + grid


def _estimate_s(report: dict[str, Any], batch: int, length: int) -> float:
    """Seconds a throughput shape should take: a compile like the last one, and the rate of the widest batch
    measured so far (rates do not fall with B on either backend)."""
    grid = report["grid"]
    if not grid:
        return 0.0
    widest = max(grid, key=lambda g: (g["batch"], g["length"]))
    return grid[-1]["compile_s"] + batch * length / widest["series_steps_per_s"]


def run_bench(out_dir: str | os.PathLike[str] = "bench/results", quick: bool = False, *, budget_s: float | None = None,
              cfg: PredictorConfig | None = None) -> dict[str, Any]:
    """Run the benchmark and write ``bench.json`` (plus a timestamped copy) and ``latest.md`` into out_dir.

    Measurements run one after the other in a fresh worker process (its own JAX caches). A throughput shape
    whose estimated time (compile + B T / the ratio point's rate) would end past ``budget_s`` is skipped and
    listed; so is any measurement not started by then."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    cfg = cfg or PredictorConfig.default()
    budget_s = (240.0 if quick else 570.0) if budget_s is None else budget_s
    started = time.perf_counter()
    report: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "backend": jax.default_backend(),
                    "devices": [str(d) for d in jax.devices()], "jax": jax.__version__},
        "config_version": cfg.version, "quick": quick, "skipped": [], "grid": [],
    }
    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn"), initializer=_init_worker) as pool:
        for label, name, kwargs in _tasks(quick, report["machine"]["backend"]):
            elapsed = time.perf_counter() - started
            estimate = _estimate_s(report, kwargs["batch"], kwargs["length"]) if name == "throughput" else 0.0
            if elapsed + estimate > budget_s:
                report["skipped"].append(f"{label} (time budget: ~{estimate:.0f} s more)" if estimate
                                         else f"{label} (time budget)")
                continue
            result = pool.submit(_measure, name, dict(cfg), kwargs).result()
            if label == "loops":
                report.update(step_loop=result["step_loop"], seed_loop=result["seed_loop"])
            elif name == "throughput":
                if label == "ratio point":
                    report["ratio_point"] = result
                report["grid"].append(result)
            else:
                report[name] = result
            _finish(report, started)
            _write(Path(out_dir), report, final=False)  # a run cut short (a lent GPU's time limit) keeps what it measured
    _finish(report, started)
    _write(Path(out_dir), report)
    return report


def _finish(report: dict[str, Any], started: float) -> None:
    if "ratio_point" in report:
        report["compile_s"] = report["ratio_point"]["compile_s"]
        rate = report["ratio_point"]["series_steps_per_s"]
        for loop in ("seed_loop", "step_loop"):
            if loop in report:
                report[f"speedup_vs_{loop}"] = rate / report[loop]["series_steps_per_s"]
    report["total_s"] = time.perf_counter() - started


def _fmt(x: float, digits: int = 3) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{x:.{digits}g}" if abs(x) >= 1000 else f"{x:.{digits}f}"


def render_markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        f"Benchmark of {report['when']} on {m['backend']} ({m['cpus']} CPUs, {m['platform']}, jax {m['jax']}), "
        f"config {report['config_version']}{', quick mode' if report['quick'] else ''}; total {report['total_s']:.0f} s "
        "(one measuring process).",
        "",
        "| measure | value | target |",
        "|---|---|---|",
    ]
    rp, loop, seed = report.get("ratio_point"), report.get("step_loop"), report.get("seed_loop")

    def cell(d: dict | None, key: str, fmt: str, scale: float = 1.0) -> str:
        return format(scale * d[key], fmt) if d and key in d else "n/a (skipped)"

    latency = f"{cell(loop, 'p50_s', '.2f', 1e3)} / {cell(loop, 'p99_s', '.2f', 1e3)}" if loop else cell(None, "", "")
    recompiled = report["recompilation"]["recompilations"] if "recompilation" in report else cell(None, "", "")
    b, t = RATIO_POINT
    lines += [
        f"| `p.run` throughput at B={b}, T={t} (series-steps/s) | {cell(rp, 'series_steps_per_s', '.0f')} | |",
        f"| seed's loop: per time step, jitted `p.step` on each of B={b} series, states sliced and stacked "
        f"(series-steps/s) | {cell(seed, 'series_steps_per_s', '.0f')} | |",
        f"| **speedup of `p.run` over the seed's loop** | {cell(report, 'speedup_vs_seed_loop', '.1f')}{'x' * ('speedup_vs_seed_loop' in report)} | >= 50x |",
        f"| Python loop of jitted `p.step` on one series (series-steps/s) | {cell(loop, 'series_steps_per_s', '.0f')} | |",
        f"| speedup of `p.run` over that loop | {cell(report, 'speedup_vs_step_loop', '.1f')}{'x' * ('speedup_vs_step_loop' in report)} | |",
        f"| compile time of `p.run` at the ratio point (s) | {cell(rp, 'compile_s', '.1f')} | |",
        f"| first `p.init` + `p.step` incl. compile (s) | {cell(loop, 'first_step_s', '.1f')} | |",
        f"| recompilations when only dynamic params change | {recompiled} | 0 |",
        f"| single-step latency p50 / p99 (ms) | {latency} | |",
    ]
    if "trials" in report:
        tr = report["trials"]
        lines.append(f"| batched trials K={tr['k']} vs sequential (trials/s, B={tr['batch']}, T={tr['length']}) | "
                     f"{tr['batched_trials_per_s']:.2f} vs {tr['sequential_trials_per_s']:.2f} ({tr['speedup']:.1f}x) | >= 4x |")
    lines += ["", "Throughput of `p.run` (series-steps/s of the compiled program; compile time apart):", "",
              "| B | T | series-steps/s | compile (s) |", "|---|---|---|---|"]
    for g in sorted(report["grid"], key=lambda g: (g["length"], g["batch"])):
        lines.append(f"| {g['batch']} | {g['length']} | {g['series_steps_per_s']:.0f} | {g['compile_s']:.1f} |")
    if "dev" in report:
        dev = report["dev"]
        models = list(dev["aggregate"])
        lines += ["", f"Dev-set accuracy (walk-forward, all folds, newest {dev['max_length']} points per series; "
                  f"MASE / CRPS skill vs naive / {100 * dev['level']:.0f}% coverage):", "",
                  "| series | " + " | ".join(models) + " |", "|---" * (len(models) + 1) + "|"]
        cell = lambda d: f"{_fmt(d['mase'], 2)} / {_fmt(d['crps_skill'], 2)} / {_fmt(d['coverage'], 2)}"  # noqa: E731
        for row in dev["rows"]:
            lines.append(f"| {row['series_id']} | " + " | ".join(cell(row[mdl]) for mdl in models) + " |")
        lines.append("| **mean** | " + " | ".join(cell(dev["aggregate"][mdl]) for mdl in models) + " |")
        sigma_names = list(dev["rows"][0].get("mean_scale_weights", {}))
        selection_names = list(dev["rows"][0].get("mean_selection_weights", {}))
        lines += ["", "Fusion per series: emergency fraction, mean weights of the experts' means, of the candidate "
                  "sigmas and of the final selection (the fused forecast, then each expert whole), usp's CRPS relative "
                  "to the best single kernel and to GARCH(1,1) (< 0: usp is better):", "",
                  "| series | emergency | weights (" + ", ".join(dev["rows"][0]["mean_weights"]) + ") | sigma weights ("
                  + ", ".join(sigma_names) + ") | selection (" + ", ".join(selection_names)
                  + ") | vs best kernel | vs GARCH |",
                  "|---|---|---|---|---|---|---|"]
        experts = [mdl for mdl in models if mdl.startswith("kernel_")]
        for row in dev["rows"]:
            best = min(row[mdl]["crps"] for mdl in experts)
            weights = " ".join(f"{w:.2f}" for w in row["mean_weights"].values())
            sigma_weights = " ".join(f"{w:.2f}" for w in row.get("mean_scale_weights", {}).values()) or "-"
            selection = " ".join(f"{w:.2f}" for w in row.get("mean_selection_weights", {}).values()) or "-"
            lines.append(f"| {row['series_id']} | {row['emergency_fraction']:.2f} | {weights} | {sigma_weights} | {selection} | "
                         f"{row['usp']['crps'] / best - 1:+.3f} | {row['usp']['crps'] / row['garch']['crps'] - 1:+.3f} |")
        lines += ["", "Sources: " + "; ".join(f"{p['series_id']} = {p['package']}.{p['dataset']}[{p['column']}], {p['transformation']}"
                                             for p in dev["provenance"]) + "."]
    if report["skipped"]:
        lines += ["", "Skipped to stay within the time budget: " + "; ".join(report["skipped"]) + "."]
    if m["backend"] != "gpu":
        lines += ["", "GPU: not measured in this run (no GPU backend)."]
    return "\n".join(lines) + "\n"


def _write(out_dir: Path, report: dict[str, Any], final: bool = True) -> None:
    """bench.json and latest*.md after every measurement; the timestamped copy once the run is complete."""
    from usp_core.durable import atomic_write_bytes

    text = json.dumps(report, indent=2, default=float).encode()
    atomic_write_bytes(out_dir / "bench.json", text, mode=0o644)
    suffix = "gpu" if report["machine"]["backend"] == "gpu" else "cpu"
    if final:
        atomic_write_bytes(out_dir / f"bench_{suffix}_{report['when'].replace(':', '')}.json", text, mode=0o644)
    atomic_write_bytes(out_dir / ("latest_gpu.md" if suffix == "gpu" else "latest.md"), render_markdown(report).encode(),
                       mode=0o644)


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="USP benchmark (SPEC §9)")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--budget", type=float, default=None, help="seconds (default 570, 240 with --quick)")
    args = parser.parse_args()
    report = run_bench(args.out, quick=args.quick, budget_s=args.budget)
    print(render_markdown(report))


if __name__ == "__main__":
    main()
