"""The CPU devices ``Predictor.run`` splits a panel of series over, and the entry points' switch that creates
them.

JAX gives a CPU host one device, and XLA:CPU spreads one program over the cores only partly (measured on 2
cores: 1.8 cores busy at B = 64). ``p.run``'s series are independent, so with several CPU devices
``Predictor.run`` gives each device a block of series (one ``shard_map`` program, nothing crosses devices)
and the blocks run at the same time. JAX fixes its devices when its backend starts, so creating them is an
entry point's choice, never an import side effect of the library: ``usp backtest|promote|bench`` and
``bench/run_bench.py`` call :func:`configure_cpu_devices` first; a program of your own can call it before
its first JAX computation, or start with ``JAX_NUM_CPU_DEVICES=2 PJRT_NPROC=3`` in its environment.

``PJRT_NPROC`` matters: jaxlib 0.10's LAPACK kernels (Cholesky, triangular solve, LU) cut a large batch into
pieces on XLA:CPU's intra-op thread pool and block their own pool thread until the pieces are done. The pool
has ``max(cores, devices)`` threads, so with one device per core every device's program could block a thread
in such a kernel at the same moment and leave none to run the pieces. That is the deadlock of the sharded
run on 2 cores (gdb: both ``tf_XLAEigen`` threads in ``BlockingCounter::Wait`` under
``jax::ParallelBatchMap``, in ``lapack_dtrsm_ffi`` and ``lapack_dpotrf_ffi``; no collective in the program).
With more pool threads than devices one is always free; :func:`configure_cpu_devices` sizes the pool so,
and :func:`series_devices` keeps ``p.run`` on one device where the pool is not larger than the device count.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import MutableMapping

import jax

CPU_DEVICES_ENV = "USP_CPU_DEVICES"  # devices configure_cpu_devices creates (default: one per core; 1: off)
_POOL_ENVS = ("PJRT_NPROC", "NPROC")  # what XLA:CPU sizes its thread pools by, in this order, else the cores
_FORCED_DEVICES = re.compile(r"--xla_force_host_platform_device_count=(\d+)")


def host_cores() -> int:
    """The cores this process may run on (what XLA:CPU sizes its thread pools by)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _pool_env(environ: MutableMapping[str, str]) -> int | None:
    for name in _POOL_ENVS:
        value = environ.get(name, "").strip()
        if value.isdigit():
            return int(value)
    return None


def intra_op_pool_size(devices: int, environ: MutableMapping[str, str] | None = None) -> int:
    """Threads of XLA:CPU's intra-op pool in a process with ``devices`` CPU devices: ``PJRT_NPROC`` (else
    ``NPROC``, else the cores), at least one per device (the ``tf_XLAEigen`` threads, counted)."""
    pool = _pool_env(os.environ if environ is None else environ)
    return max(host_cores() if pool is None else pool, devices)


def configure_cpu_devices(count: int | None = None, environ: MutableMapping[str, str] | None = None) -> int:
    """Create ``count`` CPU devices (default ``$USP_CPU_DEVICES``, else one per core), with an intra-op pool
    larger than the device count (``PJRT_NPROC`` = devices + 1 where the default pool is not), so that
    ``p.run`` splits its series over them. Returns the CPU device count JAX will have.

    Without ``environ`` this configures the calling process: call it before its first JAX computation (after
    that JAX's devices are fixed: it warns and changes nothing). The variables are also set in ``os.environ``,
    so that child processes start the same way. With ``environ`` it only prepares that environment for a child
    process. A device count already set (``JAX_NUM_CPU_DEVICES``, ``--xla_force_host_platform_device_count``
    in ``XLA_FLAGS``) and a pool size already set (``PJRT_NPROC``, ``NPROC``) are kept."""
    own = environ is None
    env = os.environ if own else environ
    forced = _FORCED_DEVICES.search(env.get("XLA_FLAGS", ""))
    preset = env.get("JAX_NUM_CPU_DEVICES", "").strip() or (forced.group(1) if forced else "")
    if preset:
        count = int(preset)
    elif count is None:
        count = int(env.get(CPU_DEVICES_ENV, "").strip() or host_cores())
    if count < 1:
        raise ValueError(f"configure_cpu_devices needs at least one device, got {count}")
    if own and not forced:
        try:  # JAX read JAX_NUM_CPU_DEVICES when it was imported; the config is what its backend will use
            jax.config.update("jax_num_cpu_devices", count)
        except RuntimeError:  # the backend has started (JAX's own check): its devices are fixed
            current = len(jax.local_devices(backend="cpu"))
            if current != count:
                warnings.warn(f"configure_cpu_devices({count}) after JAX started: it keeps its {current} CPU "
                              "device(s)", stacklevel=2)
            return current
    if not preset:
        env["JAX_NUM_CPU_DEVICES"] = str(count)
    if count > 1 and _pool_env(env) is None and host_cores() <= count:
        # one thread more than devices: the margin one device has on 2 cores; more threads measured slower
        # (B = 64, T = 1000 on 2 cores: 1.1-1.3x one device with 3 threads, 1.08x with 4)
        env["PJRT_NPROC"] = str(count + 1)
    return count


def series_devices(batch: int) -> list:
    """The CPU devices ``p.run`` splits a (padded) batch of ``batch`` series over: as many local devices as
    divide the batch evenly, or one device where there is one, or where the intra-op pool is not larger than
    the device count (the deadlock above; it warns)."""
    devices = jax.local_devices()
    n = len(devices)
    if n > 1 and intra_op_pool_size(n) <= n:
        warnings.warn(f"{n} CPU devices but an intra-op pool of {intra_op_pool_size(n)} threads: p.run stays on one "
                      "device (jaxlib's LAPACK kernels can deadlock); set PJRT_NPROC above the device count, or "
                      "call usp_core.engine.devices.configure_cpu_devices before JAX starts", stacklevel=2)
        n = 1
    while n > 1 and batch % n:
        n -= 1
    return devices[:n]
