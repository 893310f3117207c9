"""MLflow integration: the experiment tracker and the model registry."""
