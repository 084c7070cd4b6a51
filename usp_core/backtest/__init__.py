"""Walk-forward backtesting: splits, metrics, baselines, runner."""
