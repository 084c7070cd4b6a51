"""backtest assets of the USP pipeline."""
