"""data assets of the USP pipeline."""
