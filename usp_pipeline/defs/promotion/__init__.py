"""promotion assets of the USP pipeline."""
