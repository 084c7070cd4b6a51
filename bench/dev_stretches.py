"""Dev-set quality on two disjoint stretches, the table of the README's "Forecast quality" section.

    python bench/dev_stretches.py --stretch older --table
    python bench/dev_stretches.py --stretch newest --set scale_temperature=0.05 --grid calibration_alpha=0.01,0.05

``newest`` is the newest ``--length`` points of each series (the bench's dev table); ``older`` the ``--length``
points before them, or the first half of a series shorter than twice that. Per series: CRPS skill vs naive of the
fused forecast, of the best single kernel and of GARCH(1,1), 95 % coverage, interval (Winkler) score over the
naive forecast's, emergency fraction, regime changes and mean weights; then one summary line per config against
the SPEC §4.3 targets.
"""

from __future__ import annotations

import argparse
import itertools
import time

import numpy as np
import pandas as pd

from usp_core.backtest.runner import GARCH, KERNEL_MODELS, NAIVE, USP, run_backtest
from usp_core.config import PredictorConfig
from usp_core.data.real import load_dev_panel

RETURN_SERIES = ("ff_market_excess", "ff_smb", "nasdaq_return", "sp500_return")


def _value(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text, text)


def stretch_of(full: pd.DataFrame, stretch: str, length: int) -> pd.DataFrame:
    """The newest ``length`` points of each series of a long panel, or (``older``) the ``length`` before them, or
    the first half of a series shorter than twice that."""
    parts = []
    for _, g in full.groupby("series_id", sort=False):
        g = g.sort_values("ts")
        if stretch == "newest":
            parts.append(g.iloc[-length:])
        else:
            parts.append(g.iloc[-2 * length:-length] if len(g) >= 2 * length else g.iloc[: len(g) // 2])
    return pd.concat(parts, ignore_index=True)


def stretch_panel(stretch: str, length: int, series: tuple[str, ...] | None) -> pd.DataFrame:
    return stretch_of(load_dev_panel(series)[0], stretch, length)


def evaluate(cfg: PredictorConfig, panel: pd.DataFrame) -> pd.DataFrame:
    result = run_backtest(cfg, panel, include="all")
    per_series, out = result.per_series, result.output
    rows = []
    for b, series_id in enumerate(result.series_ids):
        best = max(KERNEL_MODELS, key=lambda m, s=series_id: per_series.loc[(m, s)]["crps_skill"])
        live = np.isfinite(np.asarray(out.prediction)[b]) & ~np.asarray(out.rejected)[b]
        rows.append({
            "series": series_id, "usp": per_series.loc[(USP, series_id)]["crps_skill"],
            "best_kernel": per_series.loc[(best, series_id)]["crps_skill"], "which": best.removeprefix("kernel_"),
            "garch": per_series.loc[(GARCH, series_id)]["crps_skill"],
            "coverage": per_series.loc[(USP, series_id)]["coverage"],
            "interval_score": per_series.loc[(USP, series_id)]["interval_score"]
            / per_series.loc[(NAIVE, series_id)]["interval_score"],
            "emergency": float(np.asarray(out.emergency)[b][live].mean()),
            "regime_changes": int(np.asarray(out.regime_change)[b].sum()),
            "weights": " ".join(f"{w:.2f}" for w in np.asarray(out.weights)[b][live].mean(axis=0)),
        })
    return pd.DataFrame(rows)


def summary(df: pd.DataFrame, returns: pd.Series | None = None) -> str:
    """One line against the SPEC §4.3 targets; ``returns`` marks the return series (default: the dev set's)."""
    returns = df.series.isin(RETURN_SERIES) if returns is None else returns
    worst = df.usp.idxmin()
    return (f"mean skill {df.usp.mean():+.4f}, worst {df.usp[worst]:+.3f} ({df.series[worst]}), fused >= best kernel "
            f"{int((df.usp >= df.best_kernel).sum())}/{len(df)}, coverage in [0.93, 0.97] "
            f"{int(df.coverage.between(0.93, 0.97).sum())}/{len(df)}, interval score / naive's "
            f"{df.interval_score.mean():.4f}, returns >= GARCH "
            f"{int((df.usp[returns] >= df.garch[returns]).sum())}/{int(returns.sum())}, "
            f"mean emergency {df.emergency.mean():.3f} (max {df.emergency.max():.3f})")


def stretch_arguments(description: str, default_stretch: str) -> argparse.ArgumentParser:
    """The options every dev-stretch script shares: which stretch, its length, which series, config overrides."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--stretch", choices=("older", "newest"), default=default_stretch)
    parser.add_argument("--length", type=int, default=1000)
    parser.add_argument("--series", default="", help="comma-separated series ids (default: all 13)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    return parser


def stretch_inputs(args: argparse.Namespace) -> tuple[pd.DataFrame, dict]:
    """The panel and the config overrides the shared options name."""
    panel = stretch_panel(args.stretch, args.length, tuple(args.series.split(",")) if args.series else None)
    return panel, {k: _value(v) for k, v in (item.split("=", 1) for item in args.set)}


def main() -> None:
    parser = stretch_arguments(__doc__.splitlines()[0], "older")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2", help="values to sweep")
    parser.add_argument("--table", action="store_true", help="print the per-series table")
    args = parser.parse_args()

    panel, base = stretch_inputs(args)
    grid = [(k, [_value(v) for v in values.split(",")]) for k, values in (item.split("=", 1) for item in args.grid)]
    for values in itertools.product(*(v for _, v in grid)):
        changes = dict(zip((k for k, _ in grid), values, strict=True))
        start = time.perf_counter()
        df = evaluate(PredictorConfig.default().replace({**base, **changes}), panel)
        if args.table:
            print(df.to_string(float_format=lambda x: f"{x:+.3f}"))
        print(f"{changes or 'defaults'}: {summary(df)} ({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
