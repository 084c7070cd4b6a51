from __future__ import annotations

import json

import pytest

from usp_core import bench


def _fake_report(backend: str = "cpu") -> dict:
    loop = {"steps": 100, "first_step_s": 2.0, "p50_s": 0.001, "p99_s": 0.002, "series_steps_per_s": 1000.0}
    seed = {"batch": 64, "time_steps": 5, "elapsed_s": 3.2, "series_steps_per_s": 100.0}
    point = {"batch": 64, "length": 1000, "compile_s": 10.0, "steady_s": 0.5, "series_steps_per_s": 128000.0}
    metrics = {"mase": 1.0, "crps_skill": 0.1, "coverage": 0.95, "crps": 0.5}
    models = {"usp": metrics, "naive": metrics, "garch": {**metrics, "crps": 0.4}, "kernel_ridge": {**metrics, "crps": 0.45}}
    return {
        "when": "2024-01-01T00:00:00Z",
        "machine": {"platform": "linux", "cpus": 2, "backend": backend, "devices": ["cpu:0"], "jax": "0"},
        "config_version": "abc", "quick": True, "skipped": ["throughput B=256 T=2000 (time budget)"],
        "step_loop": loop, "seed_loop": seed, "ratio_point": point, "compile_s": 10.0,
        "speedup_vs_step_loop": 128.0, "speedup_vs_seed_loop": 1280.0,
        "recompilation": {"recompilations": 0}, "grid": [point],
        "trials": {"k": 8, "batch": 16, "length": 500, "batched_trials_per_s": 4.0, "sequential_trials_per_s": 1.0, "speedup": 4.0},
        "dev": {"max_length": 500, "level": 0.95, "aggregate": models,
                "rows": [{"series_id": "vix", **models, "emergency_fraction": 0.02,
                          "mean_weights": {"kernel_ridge": 0.7, "last_value": 0.3},
                          "mean_scale_weights": {"kernel_ridge": 0.4, "last_value": 0.5, "mixture": 0.1},
                          "mean_selection_weights": {"fused": 0.6, "kernel_ridge": 0.1, "last_value": 0.3}}],
                "provenance": [{"series_id": "vix", "package": "arch", "dataset": "vix", "column": "vix", "transformation": "none"}]},
        "total_s": 60.0,
    }


def test_markdown_table_has_every_section(tmp_path):
    report = _fake_report()
    bench._write(tmp_path, report)
    text = (tmp_path / "latest.md").read_text()
    assert "1280.0x | >= 50x" in text
    assert "| speedup of `p.run` over that loop | 128.0x | |" in text
    assert "| recompilations when only dynamic params change | 0 | 0 |" in text
    assert "| vix | 1.00 / 0.10 / 0.95 | 1.00 / 0.10 / 0.95 |" in text
    assert ("| series | emergency | weights (kernel_ridge, last_value) | sigma weights (kernel_ridge, last_value, mixture) "
            "| selection (fused, kernel_ridge, last_value) | vs best kernel | vs GARCH |") in text
    assert "| vix | 0.02 | 0.70 0.30 | 0.40 0.50 0.10 | 0.60 0.10 0.30 | +0.111 | +0.250 |" in text
    assert "Skipped to stay within the time budget: throughput B=256 T=2000" in text
    assert "GPU: not measured" in text
    assert json.loads((tmp_path / "bench.json").read_text())["speedup_vs_step_loop"] == 128.0
    bench._write(tmp_path, _fake_report("gpu"))
    assert (tmp_path / "latest_gpu.md").exists()


@pytest.mark.slow
def test_measurements_run_on_a_small_config(small_config):
    """The measuring functions themselves (not their speed): AOT-compiled run, the seed's loop, recompilations."""
    point = bench.throughput(small_config, 2, 120)
    assert point["compile_s"] > 0 and point["series_steps_per_s"] > 0
    seed = bench.seed_loop(small_config, 3, n_steps=2)
    assert seed["time_steps"] == 2 and seed["series_steps_per_s"] > 0
    assert bench.recompilations(small_config, 2, 120)["recompilations"] == 0


def test_gpu_measures_its_grid_first_and_cpu_keeps_the_ratios_first():
    gpu = [label for label, _, _ in bench._tasks(quick=False, backend="gpu")]
    assert gpu[0] == "ratio point" and gpu[-1] == "dev-set accuracy"
    assert gpu.index("throughput B=4096 T=1000") < gpu.index("loops")
    cpu = [label for label, _, _ in bench._tasks(quick=False, backend="cpu")]
    assert cpu[:2] == ["loops", "ratio point"] and cpu[-1] == "throughput B=256 T=2000"
    for tasks in (gpu, cpu):
        assert "throughput B=64 T=1000" not in tasks  # the ratio point is that shape, measured once


def test_time_estimate_uses_the_widest_batch_measured():
    report = {"grid": [{"batch": 64, "length": 1000, "compile_s": 5.0, "series_steps_per_s": 1000.0},
                       {"batch": 256, "length": 1000, "compile_s": 7.0, "series_steps_per_s": 4000.0}]}
    assert bench._estimate_s(report, 1024, 1000) == pytest.approx(7.0 + 256.0)
    assert bench._estimate_s({"grid": []}, 1024, 1000) == 0.0
