"""Helpers that turn core results into Dagster metadata (tables a user reads at a glance)."""

from __future__ import annotations

import base64
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd


def md_table(frame: pd.DataFrame, *, max_rows: int = 20, floatfmt: str = ".4g") -> dg.MetadataValue:
    """A markdown table of the first ``max_rows`` rows (no tabulate dependency)."""
    head = frame.head(max_rows)
    cols = [str(c) for c in head.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in head.itertuples(index=False):
        lines.append("| " + " | ".join(_fmt(v, floatfmt) for v in row) + " |")
    if len(frame) > max_rows:
        lines.append(f"\n_{len(frame) - max_rows} more rows_")
    return dg.MetadataValue.md("\n".join(lines))


def _fmt(value: Any, floatfmt: str) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else format(value, floatfmt)
    return str(value)


def scalar_metadata(values: Mapping[str, Any]) -> dict[str, Any]:
    """Finite numbers, strings and bools of ``values`` as metadata entries (NaN/None dropped)."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, bool | str):
            out[key] = value
        elif isinstance(value, int | float) and math.isfinite(float(value)):
            out[key] = float(value) if isinstance(value, float) else int(value)
    return out


def png_markdown(path: str | Path, caption: str = "") -> dg.MetadataValue:
    """A PNG shown inline on the asset page (markdown with the image embedded as a data URI), its caption and
    the file it came from (the same file is logged to MLflow where the plot has a run)."""
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    lines = [f"![{caption or Path(path).stem}](data:image/png;base64,{data})", "", f"_{caption}_ `{path}`" if caption
             else f"`{path}`"]
    return dg.MetadataValue.md("\n".join(lines))


def rounded(value: float | None, digits: int) -> float | None:
    """``value`` rounded for display (None stays None)."""
    return None if value is None else round(float(value), digits)
