"""Dagster definitions by area: data, backtest, tuning, promotion, inference, common."""
