"""Real series shipped inside pip packages (statsmodels, arch): nothing is downloaded at run time (SPEC §4.4).

Each series records its provenance (package, dataset, column, transformation) so that benchmark tables and
demos say exactly what was forecast.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class Provenance:
    series_id: str
    package: str
    dataset: str
    column: str
    transformation: str
    frequency: str


def _arch(name: str) -> pd.DataFrame:
    return importlib.import_module(f"arch.data.{name}").load()


def _log(s: pd.Series) -> pd.Series:
    return np.log(s)


def _log_return_pct(s: pd.Series) -> pd.Series:
    return (100.0 * np.log(s).diff()).iloc[1:]


def _french_index(df: pd.DataFrame) -> pd.DataFrame:
    # arch stores YYYYMM integers as nanoseconds since the epoch; rebuild month starts.
    yyyymm = df.index.asi8
    return df.set_axis(pd.to_datetime({"year": yyyymm // 100, "month": yyyymm % 100, "day": 1}))


def _elnino() -> pd.Series:
    wide = importlib.import_module("statsmodels.datasets.elnino").load_pandas().data
    long = wide.melt(id_vars="YEAR", var_name="month", value_name="sst")
    months = {m: i + 1 for i, m in enumerate(wide.columns[1:])}
    long["ts"] = pd.to_datetime({"year": long["YEAR"].astype(int), "month": long["month"].map(months), "day": 1})
    return long.set_index("ts")["sst"].sort_index()


def _co2() -> pd.Series:
    return importlib.import_module("statsmodels.datasets.co2").load_pandas().data["co2"]


# series_id -> (loader of the raw column, provenance without the id)
_CATALOG: dict[str, tuple[Callable[[], pd.Series], tuple[str, str, str, str, str]]] = {
    "sp500_log_close": (lambda: _log(_arch("sp500")["Adj Close"]), ("arch", "sp500", "Adj Close", "log", "business daily")),
    "sp500_return": (lambda: _log_return_pct(_arch("sp500")["Adj Close"]), ("arch", "sp500", "Adj Close", "100 * diff(log)", "business daily")),
    "nasdaq_log_close": (lambda: _log(_arch("nasdaq")["Adj Close"]), ("arch", "nasdaq", "Adj Close", "log", "business daily")),
    "nasdaq_return": (lambda: _log_return_pct(_arch("nasdaq")["Adj Close"]), ("arch", "nasdaq", "Adj Close", "100 * diff(log)", "business daily")),
    "wti_log_price": (lambda: _log(_arch("wti")["DCOILWTICO"]), ("arch", "wti", "DCOILWTICO", "log", "business daily")),
    "vix": (lambda: _arch("vix")["vix"], ("arch", "vix", "vix", "none", "business daily")),
    "core_cpi_inflation": (lambda: _log_return_pct(_arch("core_cpi")["CPILFESL"]), ("arch", "core_cpi", "CPILFESL", "100 * diff(log) (monthly inflation, %)", "monthly")),
    "aaa_yield": (lambda: _arch("default")["AAA"], ("arch", "default", "AAA", "none (percent)", "monthly")),
    "baa_aaa_spread": (lambda: _arch("default")["BAA"] - _arch("default")["AAA"], ("arch", "default", "BAA, AAA", "BAA - AAA", "monthly")),
    "ff_market_excess": (lambda: _french_index(_arch("frenchdata"))["Mkt-RF"], ("arch", "frenchdata", "Mkt-RF", "none (percent)", "monthly")),
    "ff_smb": (lambda: _french_index(_arch("frenchdata"))["SMB"], ("arch", "frenchdata", "SMB", "none (percent)", "monthly")),
    "co2": (_co2, ("statsmodels", "co2", "co2", "none (missing weeks dropped)", "weekly")),
    "elnino_sst": (_elnino, ("statsmodels", "elnino", "JAN..DEC", "wide table melted to a monthly series", "monthly")),
}

DEV_SERIES = tuple(_CATALOG)


def load_series(series_id: str) -> tuple[pd.Series, Provenance]:
    """One bundled real series (DatetimeIndex, float64, missing values dropped) and its provenance."""
    if series_id not in _CATALOG:
        raise KeyError(f"unknown real series {series_id!r}; available: {', '.join(DEV_SERIES)}")
    loader, (package, dataset, column, transformation, frequency) = _CATALOG[series_id]
    series = loader().astype("float64")
    dropped = int(series.isna().sum())
    series = series[np.isfinite(series)]
    if dropped and "dropped" not in transformation:
        transformation = f"{transformation}; {dropped} missing values dropped"
    return series.rename(series_id), Provenance(series_id, package, dataset, column, transformation, frequency)


def load_dev_panel(series: tuple[str, ...] | None = None, *, max_length: int | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Long observations (series_id, ts UTC, value) of the dev set and a provenance table (one row per series,
    with ``n_points``). ``max_length`` keeps the newest points of each series (used by quick benchmarks)."""
    frames, records = [], []
    for series_id in series or DEV_SERIES:
        values, provenance = load_series(series_id)
        if max_length is not None:
            values = values.iloc[-max_length:]
        ts = pd.DatetimeIndex(values.index).tz_localize("UTC").as_unit("ns")
        frames.append(pd.DataFrame({"series_id": series_id, "ts": ts, "value": values.to_numpy()}))
        records.append({**asdict(provenance), "n_points": len(values)})
    return pd.concat(frames, ignore_index=True), pd.DataFrame.from_records(records)
