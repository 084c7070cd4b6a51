"""p.run split over worker processes (usp_core.engine.workers): when it splits, and that the joined blocks are
the in-process run."""

from __future__ import annotations

import os

import numpy as np
import pytest

from usp_core.engine import workers


def test_processes_follow_the_setting_and_the_cores(monkeypatch):
    cores = len(os.sched_getaffinity(0))
    monkeypatch.setenv(workers.RUN_PROCESSES_ENV, "1")
    assert workers.run_processes(256, 2000) == 1
    monkeypatch.setenv(workers.RUN_PROCESSES_ENV, "8")
    assert workers.run_processes(256, 100) == min(8, cores)  # forced: any panel, at most a worker per core
    assert workers.run_processes(1, 100_000) == 1
    monkeypatch.delenv(workers.RUN_PROCESSES_ENV)
    assert workers.run_processes(4, 100) == 1  # default: small panels stay in-process
    assert workers.run_processes(256, 2000) == min(cores, 256)
    monkeypatch.setenv(workers._WORKER_ENV, "1")
    assert workers.run_processes(256, 2000) == 1  # a worker never splits again


def test_blocks_cover_the_series_once():
    for batch, n in [(5, 2), (256, 2), (3, 3), (7, 4)]:
        blocks = workers._blocks(batch, n)
        assert np.array_equal(np.concatenate([np.arange(batch)[s] for s in blocks]), np.arange(batch))
        assert max(s.stop - s.start for s in blocks) - min(s.stop - s.start for s in blocks) <= 1


_CHILD = '''
import json, os, sys
from concurrent.futures import ProcessPoolExecutor
import multiprocessing as mp

import numpy as np


def job(config, out_path):
    from usp_core import Predictor, PredictorConfig
    from usp_core.data import synthetic
    from usp_core.engine import workers

    values = synthetic.ornstein_uhlenbeck(150, theta=0.05, sigma=1.0, seed=3, batch=5)
    values[2, 90] = np.nan  # a missing value in one block
    p = Predictor(PredictorConfig(config), compile_cache=False)
    os.environ["USP_RUN_PROCESSES"] = "1"
    single = p.run(values)
    os.environ["USP_RUN_PROCESSES"] = "2"
    compiled = p.compile_run(values)
    runs = {"aot": compiled(values), "run": p.run(values)}
    np.savez(out_path, **{f"single_{k}": v for k, v in single._asdict().items()},
             **{f"{name}_{k}": v for name, out in runs.items() for k, v in out._asdict().items()})
    return [compiled.processes, compiled.programs is None, len(workers._pools)]


if __name__ == "__main__":
    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        print(json.dumps(pool.submit(job, json.loads(sys.argv[1]), sys.argv[2]).result()))
'''


@pytest.mark.slow
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores to split over")
def test_split_run_equals_in_process_run_and_its_process_exits(small_config, tmp_path):
    """In a multiprocessing child (as in a Dagster step or the bench's measuring process), two pinned workers
    run half the series each, compiled ahead of time and plain; the joined outputs are the in-process run's (the
    panel's random numbers come from one key, drawn once per step for the panel; rtol 1e-9: the blocks are
    compiled for another batch size). The child then exits: it joins its non-daemon children on exit, so the
    idle workers (daemons) must not keep it alive."""
    import json
    import subprocess
    import sys

    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    env = {k: v for k, v in os.environ.items() if k != workers.RUN_PROCESSES_ENV}
    proc = subprocess.run([sys.executable, str(script), json.dumps(dict(small_config)), str(tmp_path / "out.npz")],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [2, True, 2]
    out = np.load(tmp_path / "out.npz")
    names = [k.removeprefix("single_") for k in out.files if k.startswith("single_")]
    assert "prediction" in names
    for run in ("aot", "run"):
        for name in names:
            x, y = out[f"{run}_{name}"], out[f"single_{name}"]
            assert x.shape == y.shape, name
            if np.issubdtype(y.dtype, np.floating):
                np.testing.assert_allclose(x, y, rtol=1e-9, atol=1e-12, equal_nan=True, err_msg=f"{run} {name}")
            else:
                np.testing.assert_array_equal(x, y, err_msg=f"{run} {name}")
