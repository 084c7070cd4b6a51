"""configure_cpu_devices: the environment an entry point gives JAX (and its children) to split p.run's
series over CPU devices. The split itself runs in tests/core/test_bench.py (a child process per setting)."""

import os

import jax
import pytest

from usp_core.engine.devices import configure_cpu_devices, host_cores, intra_op_pool_size


def test_devices_with_a_pool_larger_than_their_count():
    env = {}
    assert configure_cpu_devices(2, environ=env) == 2
    assert env["JAX_NUM_CPU_DEVICES"] == "2"
    assert intra_op_pool_size(2, env) > 2  # PJRT_NPROC = devices + 1 where the cores alone are too few
    assert env.get("PJRT_NPROC") == ("3" if host_cores() <= 2 else None)


def test_one_device_per_core_by_default_and_usp_cpu_devices_overrides():
    env = {}
    assert configure_cpu_devices(environ=env) == host_cores()
    env = {"USP_CPU_DEVICES": "1"}
    assert configure_cpu_devices(environ=env) == 1 and "PJRT_NPROC" not in env


def test_settings_already_in_the_environment_are_kept():
    env = {"JAX_NUM_CPU_DEVICES": "3", "PJRT_NPROC": "8"}
    assert configure_cpu_devices(2, environ=env) == 3 and env == {"JAX_NUM_CPU_DEVICES": "3", "PJRT_NPROC": "8"}
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    assert configure_cpu_devices(environ=env) == 4 and "JAX_NUM_CPU_DEVICES" not in env
    assert intra_op_pool_size(4, env) > 4
    with pytest.raises(ValueError):
        configure_cpu_devices(0, environ={})


def test_after_jax_started_nothing_changes():
    jax.devices()  # the backend has started: its devices are fixed
    before = dict(os.environ)
    with pytest.warns(UserWarning, match="after JAX started"):
        assert configure_cpu_devices(jax.local_device_count() + 1) == jax.local_device_count()
    assert dict(os.environ) == before

