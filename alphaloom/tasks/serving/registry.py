"""The model registry: registered versions, their aliases, and loading them for scoring.

Every trained model is registered once per MLflow run (a retried or resumed run finds its
version by run id instead of creating another) and gets the alias `challenger`; the alias
`champion` moves only through tasks/serving/promotion.py. Models are loaded back through MLflow
pyfunc, exactly as any serving process would load them, so what is compared and scored is what
the registry holds.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

from alphaloom.tasks.common.config import PipelineConfig
from alphaloom.tasks.evaluation.ensemble import combine_members
from alphaloom.tasks.evaluation.predictions import ScoreFn, eval_dataset, predict_with
from alphaloom.tasks.serving import model_logging
from alphaloom.tasks.tracking import store
from alphaloom.tasks.training.train import TrainResult

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"


class IncompatibleChampion(RuntimeError):
    """The champion cannot be scored on the new data (e.g. a different feature set)."""


def alias_version(client: mlflow.MlflowClient, name: str, alias: str) -> str | None:
    """The version an alias points to, or None when the model or the alias does not exist."""
    try:
        aliases = client.get_registered_model(name).aliases or {}
    except MlflowException as err:
        if err.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            return None
        raise
    version = aliases.get(alias)
    return None if version is None else str(version)


def current_champion(client: mlflow.MlflowClient, name: str) -> str | None:
    """The champion's version number, or None when nothing has been promoted yet."""
    return alias_version(client, name, CHAMPION)


def champion_uri(cfg: PipelineConfig) -> str:
    """`models:/<name>@champion`, or a clear error when nothing has been promoted yet."""
    client = store.client_for(cfg)
    name = cfg.tracking.registered_model
    if current_champion(client, name) is None:
        raise LookupError(
            f"registered model {name!r} has no '{CHAMPION}' alias yet in "
            f"{store.resolve_tracking_uri(cfg)}: run `alphaloom run` first"
        )
    return f"models:/{name}@{CHAMPION}"


def version_uri(name: str, version: str) -> str:
    """`models:/<name>/<version>`: one version, whatever its aliases do meanwhile."""
    return f"models:/{name}/{version}"


def registered_score_fns(model_uri: str, feature_names: list[str]) -> list[ScoreFn]:
    """Load a logged ranker through MLflow; one batch scorer per network it holds (CPU, float32):
    one for a single network, one per member of a seed ensemble (its `member` parameter).

    Raises IncompatibleChampion when the model's recorded feature names differ from
    `feature_names` (scoring it would silently feed it the wrong columns).
    """
    loaded = mlflow.pyfunc.load_model(model_uri)
    spec = getattr(loaded.unwrap_python_model(), "spec", {})
    old, new = list(spec.get("feature_names", [])), list(feature_names)
    if old != new:
        diff = sorted(set(old) ^ set(new))[:8]
        raise IncompatibleChampion(
            f"its feature set differs from the shard set's ({len(old)} vs {len(new)} "
            f"features; e.g. {diff or 'same names, different order'})"
        )
    keys = list(spec["input_keys"])
    size = int(spec.get("ensemble", 1))

    def scorer(member: int | None) -> ScoreFn:
        params = None if member is None else {"member": member}

        def score_batch(batch: dict) -> tuple[np.ndarray, np.ndarray]:
            out = loaded.predict({k: batch[k].cpu().numpy() for k in keys}, params=params)
            return out["score"].to_numpy(), out[["p0", "p1", "p2", "p3"]].to_numpy()

        return score_batch

    return [scorer(None)] if size == 1 else [scorer(i) for i in range(size)]


def predict_registered(
    model_uri: str,
    shard_dir: str | Path,
    split: str | None,
    cfg: PipelineConfig,
    feature_names: list[str],
    dates: Iterable[Any] | None = None,
) -> pd.DataFrame:
    """The registered model's predictions of a split (or `dates`) as `predict` makes them: each
    network over the whole cross-section, an ensemble's members combined per day."""
    days = None if dates is None else list(dates)
    fns = registered_score_fns(model_uri, feature_names)
    return combine_members([predict_with(fn, shard_dir, split, cfg, days) for fn in fns])


def version_of_run(client: mlflow.MlflowClient, name: str, run_id: str) -> str | None:
    """The version registered from run `run_id` (the first, if a past bug made several)."""
    try:
        found = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    except MlflowException as err:
        if err.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            return None
        raise
    versions = sorted(int(v.version) for v in found)
    return str(versions[0]) if versions else None


def register_once(
    cfg: PipelineConfig, run_id: str, result: TrainResult, shard_dir: str | Path
) -> str:
    """Log and register the trained model unless run `run_id` already has a version; either way
    point `challenger` at it. Idempotent: a retried task or a resumed run adds no version."""
    client = store.client_for(cfg)
    name = cfg.tracking.registered_model
    version = version_of_run(client, name, run_id)
    if version is not None:
        log.info("run %s already registered %s v%s; not logging it again", run_id, name, version)
    else:
        batch = next(iter(eval_dataset(shard_dir, "valid", cfg)))
        example = model_logging.model_input_example(batch, result.model.input_keys)
        _, version = model_logging.log_ranker(
            cfg, run_id, result.model, result.dims, example, result.feature_names,
            shard_dir=shard_dir,
        )  # fmt: skip
        if version is None:
            raise RuntimeError(f"model of run {run_id} was logged but not registered")
    client.set_registered_model_alias(name, CHALLENGER, str(version))
    return str(version)
