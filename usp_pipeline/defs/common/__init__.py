"""Shared pieces of the pipeline: resources, IO manager, metadata helpers, pools."""
