"""The predictor engine: state, ingestion gate, CUSUM, fusion, adaptive layer, step, predictor, snapshots."""
