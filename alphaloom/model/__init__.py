"""PyTorch only: shard format and loader, network, losses. No Prefect, no MLflow, no tasks."""
