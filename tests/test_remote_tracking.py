"""The pipeline against a real MLflow tracking server over HTTP (`MLFLOW_TRACKING_URI=http://...`).

A `mlflow server` process bound to 127.0.0.1 stands in for a team's shared server: runs, metrics,
the logged model (uploaded through the server's artifact proxy) and the registry alias all go
through its REST API, and the champion is scored back from it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from alphaloom.flows.pipeline import train_pipeline
from alphaloom.flows.score import score_latest
from alphaloom.tasks.common.config import load_config
from alphaloom.tasks.training.distributed import free_port

REPO = Path(__file__).resolve().parent.parent
FAST = ["train.epochs=1", "train.device=cpu", "train.num_threads=1", "model.use_attention=false"]


def wait_until_serving(url: str, server: subprocess.Popen, log: Path) -> None:
    """Poll /health until the server answers; fail with its log if it exits or never answers."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if server.poll() is not None:
            tail = log.read_text()[-3000:]
            pytest.fail(f"mlflow server exited with {server.returncode}:\n{tail}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"mlflow server did not answer in 180 s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    log = root / "server.log"
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
        "--artifacts-destination", str(root / "artifacts"),
    ]  # fmt: skip
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    with open(log, "w") as handle:
        server = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(url, server, log)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


def test_pipeline_logs_registers_and_scores_through_a_tracking_server(
    prefect_harness, tracking_server, tmp_path, monkeypatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_server)
    monkeypatch.chdir(tmp_path)  # nothing may fall back to ./mlflow.db or ./mlruns
    cfg = load_config(
        REPO / "configs" / "smoke.yaml",
        [f"work_dir={tmp_path / 'work'}", "tracking.registered_model=alphaloom-remote", *FAST],
    )
    summary = train_pipeline(config=cfg)

    client = mlflow.MlflowClient(tracking_server)
    run = client.get_run(summary["run_id"])
    assert run.info.status == "FINISHED"
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # uploaded via the server
    assert {"valid/rank_ic", "test/rank_ic"} <= set(run.data.metrics)
    champion = client.get_model_version_by_alias("alphaloom-remote", "champion")
    assert champion.run_id == summary["run_id"]
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()

    scores = score_latest(config=cfg)  # the champion is loaded back from the server
    ranked = pd.read_parquet(scores["parquet"])
    assert len(ranked) > 0 and ranked["score"].is_monotonic_decreasing
    assert scores["model_uri"].startswith("models:/alphaloom-remote")
