"""``Predictor``: the public face of the engine (SPEC §3.1, §3.10).

The jitted functions live at module level and take the :class:`StaticConfig` as a static argument, so a
compilation is shared by every predictor with the same static key and shape; dynamic parameters are traced
leaves, so changing them never recompiles.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from usp_core.config import PredictorConfig
from usp_core.engine import step as step_mod
from usp_core.engine.state import PredictorOutput, PredictorState, StepOutput
from usp_core.engine.workers import (
    CompiledPrograms,
    compile_split,
    run_processes,
    run_split,
    single_thread_blas,
)
from usp_core.paths import project_root

_prime_jit = jax.jit(step_mod.prime_state, static_argnames=("static",))
_step_jit = jax.jit(step_mod.step, static_argnames=("static",))
_step_batch_jit = jax.jit(step_mod.step_batch, static_argnames=("static",))
_prime_batch_jit = jax.jit(step_mod.prime_batch, static_argnames=("static",))
_advance_batch_jit = jax.jit(step_mod.advance_batch, static_argnames=("static",))
_run_chunk_jit = jax.jit(step_mod.run_chunk, static_argnames=("static",))
_prime_trials_jit = jax.jit(step_mod.prime_trials, static_argnames=("static",))
_run_trials_chunk_jit = jax.jit(step_mod.run_trials_chunk, static_argnames=("static",))
_prime_trials_shared_jit = jax.jit(step_mod.prime_trials_shared, static_argnames=("static",))
_run_trials_shared_chunk_jit = jax.jit(step_mod.run_trials_shared_chunk, static_argnames=("static",))

RUN_CHUNK = 64  # time steps per call of a run program: one program per batch shape serves every series length

# a run is two programs: its start (priming, "prime_batch" and the trial versions) and its chunk of RUN_CHUNK steps
_ENTRY_POINTS = {"prime": _prime_jit, "step": _step_jit, "step_batch": _step_batch_jit, "prime_batch": _prime_batch_jit,
                 "advance_batch": _advance_batch_jit, "run": _run_chunk_jit, "prime_trials": _prime_trials_jit,
                 "run_trials": _run_trials_chunk_jit, "prime_trials_shared": _prime_trials_shared_jit,
                 "run_trials_shared": _run_trials_shared_chunk_jit}
_BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"  # JAX's monitoring event of an XLA compile

TRIAL_PROGRAMS_KEPT = 8
_trial_programs = CompiledPrograms(TRIAL_PROGRAMS_KEPT)


def release_compiled_programs() -> None:
    """Free every compiled program of this process: the trial programs ``run_trials`` keeps (at most
    ``TRIAL_PROGRAMS_KEPT``) and JAX's jit caches (the next call of any shape compiles again)."""
    _trial_programs.clear()
    jax.clear_caches()


def _program_key(name: str, static, args: tuple) -> tuple:
    leaves, treedef = jax.tree.flatten(args)
    return name, static, treedef, tuple((x.shape, x.dtype.str) for x in leaves)


@contextlib.contextmanager
def count_compilations() -> Iterator[dict[str, int]]:
    """Counts the XLA compilations of the predictor's jitted entry points (``run``, ``step``, ...) while the
    block runs, from JAX's public monitoring events (a persistent-cache hit counts too: tests and the bench
    turn that cache off)."""
    names = {f"jit({fn.__wrapped__.__name__})": entry for entry, fn in _ENTRY_POINTS.items()}
    counts = dict.fromkeys(_ENTRY_POINTS, 0)

    def listener(event: str, duration: float, **kwargs: Any) -> None:
        entry = names.get(kwargs.get("fun_name", "")) if event == _BACKEND_COMPILE_EVENT else None
        if entry is not None:
            counts[entry] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield counts
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def enable_compile_cache(cfg: PredictorConfig, root: str | os.PathLike[str] | None = None) -> None:
    """Turn on JAX's persistent compilation cache at ``core.compile_cache_dir`` (relative to ``root``)."""
    target = cfg["core.compile_cache_dir"]
    if not target or jax.config.jax_compilation_cache_dir:
        return
    path = Path(target)
    if not path.is_absolute():
        path = Path(root or project_root()) / path
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def _bucket(length: int, quantum: int) -> int:
    return length if length <= quantum else -(-length // quantum) * quantum


def next_power_of_two(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


_B_QUANTUM = 8


def batch_bucket(b: int) -> int:
    """Padded batch size: a power of two up to ``_B_QUANTUM``, then a multiple of it (130 series run as 136, not
    256; a program per 8 series of panel size)."""
    return next_power_of_two(b) if b <= _B_QUANTUM else _bucket(b, _B_QUANTUM)


def run_steps(t: int, min_history: int) -> int:
    """Steps a run of length ``t`` scans: from index ``min_history - 1`` on, padded to a multiple of
    ``RUN_CHUNK`` (a short run costs less than a compile)."""
    return -(-(t - min_history + 1) // RUN_CHUNK) * RUN_CHUNK


def _placeholder_head(x: np.ndarray, axis: int, length: int) -> np.ndarray:
    """Outputs before the first forecast (SPEC §3.1): NaN floats, False flags, -1 integers."""
    shape = (*x.shape[:axis], length, *x.shape[axis + 1:])
    if np.issubdtype(x.dtype, np.floating):
        return np.full(shape, np.nan, x.dtype)
    return np.zeros(shape, bool) if x.dtype == np.bool_ else np.full(shape, -1, x.dtype)


class RunInputs(NamedTuple):
    """A run's padded inputs: the priming heads (values (B, m), last timestamps (B,)) and the scanned steps from
    index m - 1 on as host arrays (B, S), S a multiple of ``RUN_CHUNK``."""

    heads: tuple[Array, Array]
    steps: tuple[np.ndarray, np.ndarray, np.ndarray]

    def chunks(self, place) -> Iterator[tuple[Array, ...]]:
        """Each chunk's (values, timestamps, observation times, priming flags), placed on devices by ``place``."""
        for start in range(0, self.steps[0].shape[1], RUN_CHUNK):
            # a fresh array per chunk: a device array may alias host memory until the computation has read it
            first = np.zeros(RUN_CHUNK, bool)
            first[0] = start == 0
            yield (*(place(x[:, start:start + RUN_CHUNK]) for x in self.steps), jnp.asarray(first))

    def chunk_shapes(self, place) -> tuple[Any, ...]:
        return _abstract(next(self.chunks(place)))


def _abstract(tree):
    """Shapes and dtypes of ``tree``'s arrays, with their sharding only where it spans several devices: a
    one-device sharding would annotate the lowered program, so that it is no longer the one ``jit`` lowers from
    arrays (another persistent-cache key, another compile)."""
    def spec(x):
        sharding = getattr(x, "sharding", None)
        keep = isinstance(sharding, jax.sharding.NamedSharding) and len(sharding.device_set) > 1
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding if keep else None)

    return jax.tree.map(spec, tree)


class RunPlan(NamedTuple):
    """A run's two programs and their dynamic arguments: ``start(*start_args, **start_kwargs)`` primes the
    carry, ``chunk(carry, *chunk_inputs, **chunk_kwargs)`` runs ``RUN_CHUNK`` steps of it."""

    start_entry: Any
    chunk_entry: Any
    start_args: tuple
    start_kwargs: dict[str, Any]
    chunk_kwargs: dict[str, Any]

    def jitted(self, static) -> RunPrograms:
        return RunPrograms(functools.partial(self.start_entry, static=static),
                           functools.partial(self.chunk_entry, static=static))

    def compile(self, static, inputs: RunInputs, place) -> RunPrograms:
        """Both programs compiled ahead of time (JAX's lower/compile)."""
        start = self.start_entry.lower(*self.start_args, static=static, **self.start_kwargs).compile()
        chunk = self.chunk_entry.lower(_abstract(start.out_info), *inputs.chunk_shapes(place), static=static,
                                       **self.chunk_kwargs).compile()
        return RunPrograms(start, chunk)


class RunPrograms(NamedTuple):
    """A run's start and chunk programs (jitted functions with the static key bound, or compiled executables)."""

    start: Any
    chunk: Any

    def __call__(self, plan: RunPlan, inputs: RunInputs, place, lead: int) -> StepOutput:
        """The outputs of the whole run as host arrays (``lead`` leading trial axes, then B, then time from
        index 0: the placeholders before the first forecast included)."""
        carry = self.start(*plan.start_args, **plan.start_kwargs)
        outs = []
        for xs in inputs.chunks(place):
            carry, out = self.chunk(carry, *xs, **plan.chunk_kwargs)
            outs.append(out)
        axis = lead + 1
        body = jax.tree.map(lambda *xs: np.concatenate([np.asarray(x) for x in xs], axis=axis), *outs)
        m = inputs.heads[0].shape[1]
        return jax.tree.map(lambda x: np.concatenate([_placeholder_head(x, axis, m - 1), x], axis=axis), body)


class HostPanel(NamedTuple):
    """A run's inputs as (B, T) host arrays, and whether the caller passed one series."""

    values: np.ndarray
    timestamps_ns: np.ndarray
    now_ns: np.ndarray
    single: bool

    @property
    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.values, self.timestamps_ns, self.now_ns


class Predictor:
    """Causal, regime-aware probabilistic one-step-ahead predictor for one or many series."""

    def __init__(self, cfg: PredictorConfig, *, compile_cache: bool = True):
        self.cfg = cfg
        self.static = cfg.static
        self.dtype = jnp.dtype(cfg["core.dtype"])
        self.params = cfg.dynamic_params(self.dtype)
        self.key = jax.random.PRNGKey(cfg["core.seed"])
        self.compile_cache = compile_cache and bool(jax.config.jax_enable_compilation_cache)
        if compile_cache:
            enable_compile_cache(cfg)

    @property
    def min_history(self) -> int:
        return self.static.base_min_signal_length

    # -- single series, online ---------------------------------------------------------------------------
    def init(self, history, *, timestamp_ns: int | None = None) -> PredictorState:
        return self.init_output(history, timestamp_ns=timestamp_ns)[0]

    def init_output(self, history, *, timestamp_ns: int | None = None) -> tuple[PredictorState, StepOutput]:
        """Like :meth:`init`, also returning the output (forecast of the next value) at that moment. The kernels are
        primed on ``history`` and make their first forecasts in the step's program (its priming branch), so an
        online predictor compiles the forecast code once."""
        history = jnp.asarray(history, self.dtype)
        if history.ndim != 1 or history.shape[0] < self.min_history:
            raise ValueError(f"init needs a 1-D history of at least {self.min_history} values, got shape {history.shape}")
        ts = jnp.asarray(history.shape[0] - 1 if timestamp_ns is None else timestamp_ns, jnp.int64)
        primed = _prime_jit(history, ts, self.key, self.static, self.params)
        return _step_jit(primed, history[-1], ts, ts, self.static, self.params, jnp.asarray(True))

    def step(self, state: PredictorState, value, timestamp_ns: int | None = None,
             now_ns: int | None = None) -> tuple[StepOutput, PredictorState]:
        """Consume one observation; ``res.prediction`` forecasts the next one. Default timestamps: one
        tick after the last accepted observation, observed immediately (never stale)."""
        ts = state.last_timestamp_ns + 1 if timestamp_ns is None else jnp.asarray(timestamp_ns, jnp.int64)
        now = ts if now_ns is None else jnp.asarray(now_ns, jnp.int64)
        state, out = _step_jit(state, jnp.asarray(value, self.dtype), ts, now, self.static, self.params,
                               jnp.asarray(False))
        return out, state

    # -- many series, online (inference job) -------------------------------------------------------------
    def prime_batch(self, histories, timestamps_ns) -> PredictorState:
        """States for B series from equal-length histories (B, m) whose last values were observed at
        ``timestamps_ns`` (B,), primed: their first step (``advance_batch``'s ``first``) makes the first forecasts."""
        histories = jnp.asarray(histories, self.dtype)
        return _prime_batch_jit(histories, jnp.asarray(timestamps_ns, jnp.int64), self.key, self.static, self.params)

    def init_batch(self, histories, timestamps_ns) -> tuple[PredictorState, StepOutput]:
        """States for B series from equal-length histories (B, m) whose last values were observed at
        ``timestamps_ns`` (B,), and the outputs of that moment (the priming step in ``step_batch``'s program)."""
        histories, ts = jnp.asarray(histories, self.dtype), jnp.asarray(timestamps_ns, jnp.int64)
        primed = _prime_batch_jit(histories, ts, self.key, self.static, self.params)
        return _step_batch_jit(primed, histories[:, -1], ts, ts, self.static, self.params, jnp.asarray(True))

    def step_batch(self, states: PredictorState, values, timestamps_ns, now_ns) -> tuple[StepOutput, PredictorState]:
        """One step of B series at once (states stacked along a leading axis)."""
        new_states, out = _step_batch_jit(states, jnp.asarray(values, self.dtype), jnp.asarray(timestamps_ns, jnp.int64),
                                          jnp.asarray(now_ns, jnp.int64), self.static, self.params, jnp.asarray(False))
        return out, new_states

    def advance_batch(self, states: PredictorState, values, timestamps_ns, now_ns, mask,
                      first=None) -> tuple[StepOutput, PredictorState]:
        """L steps of B series in one compiled scan (B, L arrays); a series keeps its state where ``mask`` is
        False, and takes its priming step where ``first`` (a state from :meth:`prime_batch`; default nowhere).
        Callers pad L to a few sizes: each (B, L) compiles once. Returns once the scan has run."""
        mask = jnp.asarray(mask, bool)
        first = jnp.zeros_like(mask) if first is None else jnp.asarray(first, bool)
        with single_thread_blas():
            new_states, out = jax.block_until_ready(_advance_batch_jit(
                states, jnp.asarray(values, self.dtype), jnp.asarray(timestamps_ns, jnp.int64),
                jnp.asarray(now_ns, jnp.int64), mask, first, self.static, self.params))
        return out, new_states

    # -- whole series, compiled once (scan over time, vmap over series) -----------------------------------
    def _host_arrays(self, values, timestamps_ns, now_ns) -> HostPanel:
        """(values, timestamps, observation times) as (B, T) host arrays, and whether ``values`` was one series."""
        arr = np.asarray(values, dtype=self.dtype)
        single = arr.ndim == 1
        if single:
            arr = arr[None, :]
        if arr.ndim != 2:
            raise ValueError(f"values must have shape (T,) or (B, T), got {arr.shape}")
        b, t = arr.shape
        if t < self.min_history:
            raise ValueError(f"run needs at least {self.min_history} time steps (min_history), got {t}")
        if timestamps_ns is None:
            ts = np.broadcast_to(np.arange(t, dtype=np.int64), (b, t))
        else:
            ts = np.broadcast_to(np.asarray(timestamps_ns, dtype=np.int64), (b, t))
        now = ts if now_ns is None else np.broadcast_to(np.asarray(now_ns, dtype=np.int64), (b, t))
        return HostPanel(arr, ts, now, single)

    @staticmethod
    def _split_processes(host: HostPanel) -> int:
        """Worker processes ``run`` splits these series over (:mod:`usp_core.engine.workers`; CPU only)."""
        if host.single or jax.default_backend() != "cpu":
            return 1
        return run_processes(*host.values.shape)

    def _prepare(self, host: HostPanel, bucket: bool) -> tuple[RunInputs, Callable[[np.ndarray], Array], bool, int, int]:
        """:meth:`_host_arrays`' arrays padded (the series axis to its bucket where ``bucket``; the scanned steps
        to a multiple of ``RUN_CHUNK``) as :class:`RunInputs`, the function that places a chunk on devices, and
        ``(single, b, t)``. Accelerators: the series axis sharded over every local device (XLA propagates the
        sharding); CPU: the default device."""
        arr, ts, now, single = host
        b, t = arr.shape
        m = self.min_history
        bb = batch_bucket(b) if bucket else b
        devices = jax.local_device_count() if jax.default_backend() != "cpu" else 1
        if bucket and devices > 1:
            bb = -(-bb // devices) * devices
        pad = m - 1 + run_steps(t, m) - t
        # Padding steps are NaN (rejected, state untouched) and padding series repeat the first one; both are
        # sliced off, so they only save compilations.
        arr = np.concatenate([arr, np.full((b, pad), np.nan, arr.dtype)], axis=1)
        ts = np.concatenate([ts, ts[:, -1:] + 1 + np.arange(pad)], axis=1)
        now = np.concatenate([now, now[:, -1:] + 1 + np.arange(pad)], axis=1)
        arr, ts, now = (np.concatenate([x, np.repeat(x[:1], bb - b, axis=0)]) for x in (arr, ts, now))
        place = jnp.asarray
        if devices > 1 and bb % devices == 0:
            # Auto axes: XLA propagates the series sharding through the step; nothing inside it is sharding-aware.
            mesh = jax.make_mesh((devices,), ("series",), axis_types=(jax.sharding.AxisType.Auto,))
            place = functools.partial(jax.device_put, device=jax.sharding.NamedSharding(
                mesh, jax.sharding.PartitionSpec("series")))
        inputs = RunInputs((place(arr[:, :m]), place(ts[:, m - 1])), (arr[:, m - 1:], ts[:, m - 1:], now[:, m - 1:]))
        return inputs, place, single, b, t

    def _run_plan(self, inputs: RunInputs) -> RunPlan:
        return RunPlan(_prime_batch_jit, _run_chunk_jit, (*inputs.heads, self.key), {"params": self.params},
                       {"params": self.params})

    @staticmethod
    def _finish(out: StepOutput, single: bool, b: int, t: int, lead: tuple = ()) -> PredictorOutput:
        idx = (*[slice(None)] * len(lead), slice(0, b), slice(0, t))
        # Copy to host before slicing: indexing a sharded array would run a cross-device gather, which
        # deadlocked on XLA:CPU with forced host devices.
        out = jax.tree.map(lambda x: np.asarray(x)[idx], out)
        if single:
            out = jax.tree.map(lambda x: x[(*[slice(None)] * len(lead), 0)], out)
        return out

    def run(self, values, timestamps_ns=None, *, now_ns=None, bucket: bool = True) -> PredictorOutput:
        """Run whole series causally: ``values`` (T,) or (B, T) -> outputs with the same leading axes, where
        ``out.prediction[..., t]`` forecasts ``values[..., t + 1]`` (NaN before ``min_history - 1``).

        On a CPU host with several cores a large panel is split over a worker process per core
        (:mod:`usp_core.engine.workers`)."""
        host = self._host_arrays(values, timestamps_ns, now_ns)
        processes = self._split_processes(host)
        if processes > 1:
            out = run_split(dict(self.cfg), *host.arrays, processes, bucket, self.compile_cache)
            if out is not None:
                return out
        inputs, place, single, b, t = self._prepare(host, bucket)
        plan = self._run_plan(inputs)
        with single_thread_blas():
            return self._finish(plan.jitted(self.static)(plan, inputs, place, 0), single, b, t)

    def compile_run(self, values, timestamps_ns=None, *, now_ns=None, bucket: bool = True) -> CompiledRun:
        """``run``'s programs compiled ahead of time for the batch shape of ``values`` (JAX's AOT lower/compile):
        the returned callable runs any input with that (bucketed) number of series, of any length, without
        tracing, and says how long the compilation took. A panel that ``run`` splits over worker processes is
        compiled in each worker for its block (all at once; the seconds are the wall time, worker start included)."""
        host = self._host_arrays(values, timestamps_ns, now_ns)
        processes = self._split_processes(host)
        if processes > 1:
            seconds = compile_split(dict(self.cfg), *host.arrays, processes, bucket, self.compile_cache)
            if seconds is not None:
                return CompiledRun(self, None, seconds, bucket, processes)
        inputs, place, *_ = self._prepare(host, bucket)
        start = time.perf_counter()
        programs = self._run_plan(inputs).compile(self.static, inputs, place)
        return CompiledRun(self, programs, time.perf_counter() - start, bucket)

    def run_trials(self, values, params_batch: dict[str, Any], timestamps_ns=None, *, now_ns=None,
                   bucket: bool = True) -> PredictorOutput:
        """Evaluate K parameter sets that share this predictor's static key in ONE compiled call.

        ``params_batch`` maps each dynamic parameter to an array with a leading K axis (see
        :func:`stack_params`); outputs have leading axes (K, B, T) (or (K, T) for a single series). When the
        trials agree on every kernel-side parameter the kernels run once and only the fusion is vmapped over
        trials (``run_trials_shared``), which is what makes a batch of fusion trials cheap.
        """
        inputs, place, single, b, t = self._prepare(self._host_arrays(values, timestamps_ns, now_ns), bucket)
        missing = set(self.params) - set(params_batch)
        if missing:
            raise ValueError(f"params_batch lacks dynamic parameters: {sorted(missing)}")
        batch = {k: jnp.asarray(params_batch[k], self.params[k].dtype) for k in self.params}
        host = {k: np.asarray(v) for k, v in batch.items()}
        heads = (*inputs.heads, self.key)
        if all((host[k] == host[k][0]).all() for k in step_mod.KERNEL_SIDE_PARAMS):
            kwargs = {"kernel_params": {k: batch[k][0] for k in step_mod.KERNEL_SIDE_PARAMS}, "params_batch": batch}
            name, plan = "run_trials_shared", RunPlan(_prime_trials_shared_jit, _run_trials_shared_chunk_jit, heads,
                                                      kwargs, kwargs)
        else:
            kwargs = {"params_batch": batch}
            name, plan = "run_trials", RunPlan(_prime_trials_jit, _run_trials_chunk_jit, heads, kwargs, kwargs)
        # compiled ahead of time and kept in a bounded cache: a campaign's programs are released as it moves on
        key = _program_key(name, self.static, (plan.start_args, plan.start_kwargs, inputs.chunk_shapes(place)))
        programs, _ = _trial_programs.get(key, lambda: plan.compile(self.static, inputs, place))
        with single_thread_blas():
            return self._finish(programs(plan, inputs, place, 1), single, b, t, lead=(0,))


@dataclasses.dataclass(frozen=True)
class CompiledRun:
    """``Predictor.run`` compiled for one batch shape, any series length (see :meth:`Predictor.compile_run`)."""

    predictor: Predictor
    programs: RunPrograms | None  # None where the workers hold the programs
    compile_seconds: float
    bucket: bool
    processes: int = 1

    def __call__(self, values, timestamps_ns=None, *, now_ns=None) -> PredictorOutput:
        p = self.predictor
        host = p._host_arrays(values, timestamps_ns, now_ns)
        if self.processes > 1:
            out = run_split(dict(p.cfg), *host.arrays, self.processes, self.bucket, p.compile_cache)
            if out is None:
                raise RuntimeError("p.run's worker processes died; compile this run again (it then runs in-process)")
            return out
        inputs, place, single, b, t = p._prepare(host, self.bucket)
        with single_thread_blas():
            return p._finish(self.programs(p._run_plan(inputs), inputs, place, 0), single, b, t)


def stack_params(configs: list[PredictorConfig]) -> dict[str, Array]:
    """Stack the dynamic parameters of configs sharing one static key along a new leading axis."""
    if not configs:
        raise ValueError("stack_params needs at least one config")
    static = configs[0].static
    if any(c.static != static for c in configs):
        raise ValueError("configs in one batch must share the same static key")
    dicts = [c.dynamic_params() for c in configs]
    return {k: jnp.stack([d[k] for d in dicts]) for k in dicts[0]}
