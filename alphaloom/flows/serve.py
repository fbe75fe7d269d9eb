"""`alphaloom serve`: the nightly retrain and scoring deployments, served from one process."""

from __future__ import annotations

from prefect import serve
from prefect.schedules import Cron

from alphaloom.flows.nightly import nightly_retrain
from alphaloom.flows.score import score_latest


def serve_deployments(config_path: str, cron: str, timezone: str) -> None:
    """Serve both deployments until interrupted (no work pool or worker needed)."""
    nightly = nightly_retrain.to_deployment(
        name="nightly-retrain",
        parameters={"config_path": config_path},
        schedule=Cron(cron, timezone=timezone),
        tags=["alphaloom", "nightly"],
        concurrency_limit=1,  # one promotion at a time (tasks/serving/promotion_lock.py)
    )
    scoring = score_latest.to_deployment(
        name="score-latest", parameters={"config_path": config_path}, tags=["alphaloom"]
    )
    serve(nightly, scoring)
