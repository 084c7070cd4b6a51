"""An IO manager that never pickles: DataFrames as Parquet, everything else as JSON (SPEC §10)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd

from usp_core.paths import dagster_home

ALLOW_MISSING = "usp/allow_missing"


class ParquetJsonIOManager(dg.ConfigurableIOManager):
    """Stores asset values under ``base_dir`` (default ``$DAGSTER_HOME/storage``) without pickle."""

    base_dir: str = ""

    def _stem(self, key: dg.AssetKey) -> Path:
        root = Path(self.base_dir) if self.base_dir else dagster_home() / "storage"
        return root.joinpath(*key.path)

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        stem = self._stem(context.asset_key)
        stem.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(obj, pd.DataFrame):
            target, other = stem.with_suffix(".parquet"), stem.with_suffix(".json")
            tmp = target.with_suffix(".parquet.tmp")
            obj.to_parquet(tmp, index=False)
        else:
            target, other = stem.with_suffix(".json"), stem.with_suffix(".parquet")
            tmp = target.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(obj, default=_json_default, indent=1), encoding="utf-8")
        os.replace(tmp, target)
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
