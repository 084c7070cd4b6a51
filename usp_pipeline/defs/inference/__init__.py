"""inference assets of the USP pipeline."""
