"""Meta-optimisation: search spaces, Optuna campaigns, checkpoints, reports, MLflow tracking."""
