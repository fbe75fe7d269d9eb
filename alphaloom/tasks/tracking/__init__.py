"""MLflow: one run per pipeline run, metrics, params, artifacts, run summaries."""
