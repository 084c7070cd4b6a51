"""tuning assets of the USP pipeline."""
