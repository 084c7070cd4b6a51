"""p.run split over worker processes (usp_core.engine.workers): when it splits, and that the joined blocks are
the in-process run."""

from __future__ import annotations

import os

import numpy as np
import pytest

from usp_core import Predictor
from usp_core.data import synthetic
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


@pytest.mark.slow
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores to split over")
def test_split_run_equals_in_process_run(small_config, monkeypatch):
    """Two pinned workers run half the series each (compiled ahead of time and plain), and the joined outputs
    are the in-process run's: the panel's random numbers come from one key, drawn once per step for the panel
    (rtol 1e-9: the blocks are compiled for another batch size)."""
    values = synthetic.ornstein_uhlenbeck(150, theta=0.05, sigma=1.0, seed=3, batch=5)
    values[2, 90] = np.nan  # a missing value in one block
    p = Predictor(small_config)
    single = p.run(values)
    monkeypatch.setenv(workers.RUN_PROCESSES_ENV, "2")
    try:
        compiled = p.compile_run(values)
        assert compiled.processes == 2 and compiled.executable is None
        for split in (compiled(values), p.run(values)):
            for name in single._fields:
                x, y = np.asarray(getattr(split, name)), np.asarray(getattr(single, name))
                assert x.shape == y.shape, name
                if np.issubdtype(y.dtype, np.floating):
                    np.testing.assert_allclose(x, y, rtol=1e-9, atol=1e-12, equal_nan=True, err_msg=name)
                else:
                    np.testing.assert_array_equal(x, y, err_msg=name)
        assert len(workers._pools) == 2
    finally:
        workers.shutdown()
    assert not workers._pools


_NESTED = '''
import json, sys
from concurrent.futures import ProcessPoolExecutor
import multiprocessing as mp


def job(config):
    import os
    os.environ["USP_RUN_PROCESSES"] = "2"
    from usp_core import Predictor, PredictorConfig
    from usp_core.data import synthetic
    from usp_core.engine import workers
    values = synthetic.ornstein_uhlenbeck(120, theta=0.05, sigma=1.0, seed=0, batch=4)
    Predictor(PredictorConfig(config), compile_cache=False).run(values)
    return len(workers._pools)


if __name__ == "__main__":
    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        print(pool.submit(job, json.loads(sys.argv[1])).result())
'''


@pytest.mark.slow
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores to split over")
def test_a_multiprocessing_child_that_split_a_run_exits(small_config, tmp_path):
    """A Dagster step or the bench's measuring process is a multiprocessing child: when it exits it joins its
    non-daemon children, so p.run's idle workers (daemons) must not keep it alive."""
    import json
    import subprocess
    import sys

    script = tmp_path / "nested.py"
    script.write_text(_NESTED)
    env = {k: v for k, v in os.environ.items() if k != workers.RUN_PROCESSES_ENV}
    proc = subprocess.run([sys.executable, str(script), json.dumps(dict(small_config))], capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-1] == "2"  # the child did split over two workers
