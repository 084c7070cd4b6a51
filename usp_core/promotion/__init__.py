"""Champion/challenger promotion: the statistical gate and the model registry."""
