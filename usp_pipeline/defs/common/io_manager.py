"""An IO manager that never pickles: DataFrames as Parquet, everything else as JSON (SPEC §10)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd

from usp_core.durable import atomic_write_bytes
from usp_core.paths import dagster_home

ALLOW_MISSING = "usp/allow_missing"


class ParquetJsonIOManager(dg.ConfigurableIOManager):
    """Stores asset values under ``base_dir`` (default ``$DAGSTER_HOME/storage``) without pickle."""

    base_dir: str = ""

    def _stem(self, key: dg.AssetKey) -> Path:
        root = Path(self.base_dir) if self.base_dir else dagster_home() / "storage"
        return root.joinpath(*key.path)

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        # The daily and deep jobs may materialise one asset at the same time: each write goes through its own
        # temp file (atomic_write_bytes), so the last rename wins and no reader ever sees a torn file.
        stem = self._stem(context.asset_key)
        if isinstance(obj, pd.DataFrame):
            target, other = stem.with_suffix(".parquet"), stem.with_suffix(".json")
            data = obj.to_parquet(None, index=False)
        else:
            target, other = stem.with_suffix(".json"), stem.with_suffix(".parquet")
            data = json.dumps(obj, default=_json_default, indent=1).encode("utf-8")
        atomic_write_bytes(target, data)
        other.unlink(missing_ok=True)

    def load_input(self, context: dg.InputContext) -> Any:
        stem = self._stem(context.asset_key)
        if stem.with_suffix(".parquet").exists():
            return pd.read_parquet(stem.with_suffix(".parquet"))
        if stem.with_suffix(".json").exists():
            return json.loads(stem.with_suffix(".json").read_text(encoding="utf-8"))
        if (context.definition_metadata or {}).get(ALLOW_MISSING):
            return None
        raise FileNotFoundError(f"asset {context.asset_key.to_user_string()} has not been materialised yet")


def _json_default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path | pd.Timestamp):
        return str(obj)
    raise TypeError(f"cannot store {type(obj).__name__} as JSON")
