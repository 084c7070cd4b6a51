"""ParquetJsonIOManager: atomic, durable writes that concurrent jobs can share (issue 12)."""

from __future__ import annotations

import os
import threading

import dagster as dg
import numpy as np
import pandas as pd
import pytest

from usp_pipeline.defs.common.io_manager import ParquetJsonIOManager

KEY = dg.AssetKey(["data", "validated_observations"])


def _frame(value: float, n: int = 200_000) -> pd.DataFrame:
    return pd.DataFrame({"series_id": ["a"] * n, "value": np.full(n, value)})


def _leftovers(root) -> list[str]:
    return [p.name for p in root.rglob("*") if p.is_file() and p.suffix not in {".parquet", ".json"}]


def _write(manager: ParquetJsonIOManager, obj, key: dg.AssetKey = KEY) -> None:
    manager.handle_output(dg.build_output_context(asset_key=key), obj)


def _read(manager: ParquetJsonIOManager, key: dg.AssetKey = KEY):
    return manager.load_input(dg.build_input_context(asset_key=key))


def test_round_trip_frame_and_json(tmp_path):
    manager = ParquetJsonIOManager(base_dir=str(tmp_path))
    _write(manager, _frame(1.0, 5))
    pd.testing.assert_frame_equal(_read(manager), _frame(1.0, 5))
    _write(manager, {"best": np.float64(0.5), "ids": np.arange(2)})
    assert _read(manager) == {"best": 0.5, "ids": [0, 1]}
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["validated_observations.json"]


def test_concurrent_writers_never_tear_the_asset(tmp_path):
    """The daily and the deep job may materialise the same asset at once: every read sees one whole value
    and no temp file is left behind."""
    manager = ParquetJsonIOManager(base_dir=str(tmp_path))
    frames = [_frame(1.0), _frame(2.0)]
    _write(manager, frames[0])
    errors: list[BaseException] = []
    done = threading.Event()

    start = threading.Barrier(3)

    def writer(frame: pd.DataFrame) -> None:
        context = dg.build_output_context(asset_key=KEY)  # built once: building holds the GIL for long
        start.wait()
        try:
            for _ in range(30):
                manager.handle_output(context, frame)
        except BaseException as exc:  # noqa: BLE001  (reported by the assertion below)
            errors.append(exc)

    def reader() -> None:
        context = dg.build_input_context(asset_key=KEY)
        start.wait()
        try:
            while not done.is_set():
                value = manager.load_input(context)
                assert any(value.equals(f) for f in frames), "torn read"
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    writers = [threading.Thread(target=writer, args=(f,)) for f in frames]
    watcher = threading.Thread(target=reader)
    for t in [*writers, watcher]:
        t.start()
    for t in writers:
        t.join()
    done.set()
    watcher.join()
    assert errors == []
    assert any(_read(manager).equals(f) for f in frames)
    assert _leftovers(tmp_path) == []


def test_failed_write_keeps_previous_value_and_removes_its_temp(tmp_path, monkeypatch):
    manager = ParquetJsonIOManager(base_dir=str(tmp_path))
    _write(manager, _frame(1.0, 5))

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        _write(manager, _frame(2.0, 5))
    monkeypatch.undo()
    pd.testing.assert_frame_equal(_read(manager), _frame(1.0, 5))
    assert _leftovers(tmp_path) == []


def test_unserialisable_value_writes_nothing(tmp_path):
    manager = ParquetJsonIOManager(base_dir=str(tmp_path))
    _write(manager, {"ok": 1})
    with pytest.raises(TypeError, match="cannot store object"):
        _write(manager, {"bad": object()})
    assert _read(manager) == {"ok": 1}
    assert _leftovers(tmp_path) == []
