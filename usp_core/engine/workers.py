"""A process per core for ``Predictor.run``: the series of a large panel split into blocks, each block run by
a worker process pinned to a core of its own, the outputs joined along the series axis.

Why processes: XLA:CPU in one process does not run two CPU devices' programs at the same time once they call
jaxlib's LAPACK kernels (Kernel A's Cholesky and triangular solve, Kernel D's solves): those kernels share and
block the intra-op pool. Measured on the 2-core machine, B = 256, T = 500, default config: one device
5 700 series-steps/s, two devices in one process 5 900-6 300, pinned to one core 5 900; a toy scan of batched
Cholesky factors ran no faster on two devices than on one (and up to 80x slower with a larger pool), while
the same scan without them ran twice as fast. Processes share nothing, so two pinned workers run twice one.

The workers start on a panel's first split run (a spawn and a JAX start each, then one compile per block
shape, all workers at once) and stay for the life of the process (they are daemons: they end with it); a
worker keeps the last few compiled programs, so later runs of the same static config and block shape only
ship arrays. Outputs are the same as in-process to rounding: a run (``step.run_chunk``) draws a step's random numbers once
for the whole panel from the predictor's key, so every block draws the same ones.

``USP_RUN_PROCESSES``: unset, a panel of at least ``MIN_SERIES_STEPS`` series-steps is split over one worker
per core this process may run on; ``1`` never splits; ``n > 1`` splits every panel of two or more series over
up to n workers (at most one per core).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.context
import os
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import numpy as np

RUN_PROCESSES_ENV = "USP_RUN_PROCESSES"
_WORKER_ENV = "USP_RUN_WORKER"  # set inside a worker: a worker never splits again
MIN_SERIES_STEPS = 50_000
"""Smallest panel split by default: ~10 s on one core, enough to repay a first split's worker start (~5 s)."""
_COMPILED_KEPT = 4


class CompiledPrograms:
    """At most ``capacity`` compiled programs, the least recently used dropped first: an XLA executable is freed
    with its last reference, so a long campaign (a program per static key, trial count and panel shape) holds a
    bounded number of them. JAX's own jit caches grow until :func:`jax.clear_caches`, which drops every program."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._programs: OrderedDict[Hashable, Any] = OrderedDict()

    def get(self, key: Hashable, compile_program: Callable[[], Any]) -> tuple[Any, bool]:
        """The program under ``key``, compiled now (``(program, True)``) if it is not held."""
        program = self._programs.get(key)
        if program is not None:
            self._programs.move_to_end(key)
            return program, False
        self._programs[key] = program = compile_program()
        while len(self._programs) > self.capacity:
            self._programs.popitem(last=False)
        return program, True

    def clear(self) -> None:
        self._programs.clear()

    def __len__(self) -> int:
        return len(self._programs)


def available_cores() -> list[int]:
    """The cores this process may run on, sorted (empty where the platform does not tell)."""
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []


def host_cores() -> int:
    """How many cores this process may run on."""
    return len(available_cores()) or os.cpu_count() or 1


_broken = False  # the workers could not start in this process: split no more


def run_processes(batch: int, length: int) -> int:
    """How many worker processes ``p.run`` splits a (batch, length) panel over (1: it runs in this process)."""
    if _broken or os.environ.get(_WORKER_ENV) or multiprocessing.current_process().daemon:
        return 1  # a daemon process may not start children
    setting = os.environ.get(RUN_PROCESSES_ENV, "").strip()
    cores = len(available_cores())  # 0 where affinity is unknown (not Linux): no pinned workers
    if setting:
        return max(1, min(int(setting), cores, batch))
    return min(cores, batch) if batch * length >= MIN_SERIES_STEPS else 1


@contextlib.contextmanager
def single_thread_blas() -> Iterator[None]:
    """OpenBLAS (scipy's, which jaxlib's LAPACK kernels call) on one thread while the block runs. Its own
    threads fight XLA's for the cores on the tiny per-series factorisations: B = 256, T = 500 on 2 cores, one
    process 5 700 -> 7 600 series-steps/s with one BLAS thread; a worker pinned to a core after scipy loaded
    (BLAS sized to 2 threads on 1 core) ran 3-5x slower than with one."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield


def _start_worker(core: int) -> None:
    """Before JAX starts in the worker: its core, one BLAS thread, one CPU device, and no further split."""
    from threadpoolctl import threadpool_limits

    os.sched_setaffinity(0, {core})
    threadpool_limits(limits=1, user_api="blas")  # the worker's own process: for good
    os.environ["OPENBLAS_NUM_THREADS"] = "1"  # BLAS libraries loaded later
    os.environ[_WORKER_ENV] = "1"
    os.environ["JAX_NUM_CPU_DEVICES"] = "1"
    for name in ("PJRT_NPROC", "NPROC"):
        os.environ.pop(name, None)
    flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                     if not f.startswith("--xla_force_host_platform_device_count"))
    os.environ["XLA_FLAGS"] = flags


_compiled = CompiledPrograms(_COMPILED_KEPT)  # in a worker: (static, batch, dtype, bucket) -> CompiledRun


def _run_block(cfg_values: dict[str, Any], values: np.ndarray, timestamps_ns: np.ndarray, now_ns: np.ndarray,
               bucket: bool, compile_cache: bool, compile_only: bool) -> Any:
    """In a worker: run one block of series (compiling its shape once), or only compile it (returns seconds).
    ``compile_cache``: whether the caller's predictor uses JAX's persistent compilation cache."""
    import jax

    from usp_core.config import PredictorConfig
    from usp_core.engine.predictor import CompiledRun, Predictor

    if not compile_cache:
        jax.config.update("jax_enable_compilation_cache", False)
    p = Predictor(PredictorConfig(cfg_values), compile_cache=compile_cache)
    key = (p.static, values.shape[0], values.dtype.str, bucket)  # a compiled run serves every series length
    compiled, fresh = _compiled.get(key, lambda: p.compile_run(values, timestamps_ns, now_ns=now_ns, bucket=bucket))
    if compile_only:
        return compiled.compile_seconds if fresh else 0.0
    return CompiledRun(p, compiled.programs, compiled.compile_seconds, bucket)(values, timestamps_ns, now_ns=now_ns)


_pools: dict[int, ProcessPoolExecutor] = {}  # core -> that core's worker
_pools_lock = threading.Lock()


class _DaemonSpawnProcess(multiprocessing.context.SpawnProcess):
    """A daemon worker: an exiting multiprocessing child (a Dagster step, the bench's measuring process) joins
    its non-daemon children, and a pool's idle worker would never leave; daemon ones are terminated."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.daemon = True


class _DaemonSpawnContext(multiprocessing.context.SpawnContext):
    Process = _DaemonSpawnProcess


def _workers(n: int) -> list[ProcessPoolExecutor]:
    with _pools_lock:
        pools = []
        for core in available_cores()[:n]:
            if core not in _pools:
                _pools[core] = ProcessPoolExecutor(1, mp_context=_DaemonSpawnContext(), initializer=_start_worker,
                                                   initargs=(core,))
            pools.append(_pools[core])
        return pools


def shutdown() -> None:
    """Stop the workers (they restart on the next split run)."""
    with _pools_lock:
        pools = list(_pools.values())
        _pools.clear()
    for pool in pools:
        pool.shutdown(wait=True, cancel_futures=True)


def _blocks(batch: int, n: int) -> list[slice]:
    edges = np.linspace(0, batch, n + 1).round().astype(int)
    return [slice(a, b) for a, b in zip(edges[:-1], edges[1:], strict=True) if b > a]


def _submit(cfg_values, values, timestamps_ns, now_ns, n, bucket, compile_cache, compile_only) -> list[Any]:
    blocks = _blocks(values.shape[0], n)
    futures = [pool.submit(_run_block, cfg_values, values[s], timestamps_ns[s], now_ns[s], bucket, compile_cache,
                           compile_only)
               for pool, s in zip(_workers(len(blocks)), blocks, strict=False)]
    try:
        return [f.result() for f in futures]
    except BrokenProcessPool:
        # e.g. a script without an ``if __name__ == "__main__":`` guard, which a spawned worker re-runs
        global _broken
        _broken = True
        shutdown()
        warnings.warn("p.run's worker processes could not start or died; this process runs its panels itself from "
                      "now on (a script that calls p.run needs an `if __name__ == '__main__':` guard for its "
                      "workers)", RuntimeWarning, stacklevel=3)
        return None
    except BaseException:
        shutdown()  # interrupted: start afresh next time
        raise


def run_split(cfg_values: dict[str, Any], values: np.ndarray, timestamps_ns: np.ndarray, now_ns: np.ndarray,
              n: int, bucket: bool = True, compile_cache: bool = True) -> Any:
    """``Predictor.run`` of (B, T) host arrays over n workers: the outputs, joined along the series axis (None:
    the workers could not start; the caller runs the panel itself)."""
    import jax

    outs = _submit(cfg_values, values, timestamps_ns, now_ns, n, bucket, compile_cache, compile_only=False)
    if outs is None:
        return None
    return jax.tree.map(lambda *xs: np.concatenate(xs, axis=0), *outs)


def compile_split(cfg_values: dict[str, Any], values: np.ndarray, timestamps_ns: np.ndarray, now_ns: np.ndarray,
                  n: int, bucket: bool = True, compile_cache: bool = True) -> float:
    """Start the workers and compile each block's shape (all at once): the wall seconds it took (None: the
    workers could not start)."""
    start = time.perf_counter()
    if _submit(cfg_values, values, timestamps_ns, now_ns, n, bucket, compile_cache, compile_only=True) is None:
        return None
    return time.perf_counter() - start
