"""Observation schemas, synthetic generators, bundled real datasets."""
