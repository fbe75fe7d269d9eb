"""The MLflow tracking store: which one, created once across processes, one client on it per
process, experiment, UI command."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from urllib.parse import unquote, urlparse

import mlflow
from filelock import FileLock
from mlflow.exceptions import MlflowException

from alphaloom.tasks.common.config import PipelineConfig

_CLIENTS: dict[str, mlflow.MlflowClient] = {}  # tracking URI -> its client, store created


def resolve_tracking_uri(cfg: PipelineConfig) -> str:
    """cfg.tracking.tracking_uri, else $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db."""
    if cfg.tracking.tracking_uri:
        return cfg.tracking.tracking_uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


def _sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:"):
        return None
    path = unquote(urlparse(uri).path)
    if path in ("", "/:memory:"):
        return None
    # sqlite:///relative.db parses to "/relative.db" and sqlite:////abs.db to "//abs.db"
    return Path(path[1:])


def local_store_path(uri: str) -> Path | None:
    """The file (SQLite) or directory (file store) a tracking URI lives in on this machine; None
    for a tracking server, whose state only it can see."""
    db = _sqlite_path(uri)
    if db is not None:
        return db
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme == "" and uri:
        return Path(uri)
    return None


def ensure_store(uri: str) -> None:
    """Create (migrate) the tracking store, serialised across processes by a file lock."""
    db = _sqlite_path(uri)
    if db is None:
        mlflow.MlflowClient(uri).search_experiments(max_results=1)
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(db.with_name(db.name + ".lock")):
        mlflow.MlflowClient(uri).search_experiments(max_results=1)


def client_for(cfg: PipelineConfig) -> mlflow.MlflowClient:
    """The client on the configured store: made once per store and process (creating the store
    if needed); also points MLflow's global URIs at it, for the calls that take no client (model
    logging and loading, the active run)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    uri = resolve_tracking_uri(cfg)
    use_store(uri)
    client = _CLIENTS.get(uri)
    if client is None:
        ensure_store(uri)
        client = _CLIENTS.setdefault(uri, mlflow.MlflowClient(uri, registry_uri=uri))
    return client


def use_store(uri: str) -> None:
    """Point MLflow's global tracking and registry URIs at `uri`, for the calls that take no
    client."""
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)


def ensure_experiment(client: mlflow.MlflowClient, cfg: PipelineConfig) -> str:
    """The experiment id, creating it (artifacts beside a SQLite store) when missing."""
    name = cfg.tracking.experiment
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    db = _sqlite_path(client.tracking_uri)
    if db is not None:
        location = (db.resolve().parent / "mlartifacts").as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:
        found = client.get_experiment_by_name(name)  # another process created it first
        if found is None:
            raise
        return found.experiment_id


def ui_command(tracking_uri: str, port: int = 5000) -> list[str]:
    """argv for `mlflow ui` on 127.0.0.1 against the tracking store `tracking_uri`."""
    return [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        tracking_uri,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
