"""Dagster definitions of the USP pipeline (no model logic: everything calls usp_core)."""
