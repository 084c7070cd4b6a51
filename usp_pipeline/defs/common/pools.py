"""Dagster pools (limit 1 each, set by ``concurrency.pools.default_limit`` in dagster_home/dagster.yaml)."""

GPU_POOL = "gpu"  # JAX work: one process on the accelerator at a time (SPEC §3.10)
DUCKDB_WRITER_POOL = "duckdb_writer"  # DuckDB allows one writer process per database file
CONFIG_WRITER_POOL = "config_writer"  # config.toml mutation and the model registry alias
