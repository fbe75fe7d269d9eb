"""Prefect flows: composition of tasks in order, no domain logic (may import tasks and model)."""
