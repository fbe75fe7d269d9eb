"""The model registry: the alias `champion` moves only to a model that ranks better.

A new model version is compared with the current champion on the *new* validation window: the
champion is loaded from the registry and re-scored on the new shard set, so both numbers measure
the same days and names. If the champion cannot be scored there (its feature set differs, its code
no longer loads), the comparison is impossible; the new model then wins and the reason is logged.
Every decision and both scores are written to the run (metrics `registry/*`, tags `registry.*`)
and to the new model version's tags.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode
from prefect import task
from prefect.cache_policies import NO_CACHE

from alphaloom.tasks.common.config import PipelineConfig
from alphaloom.tasks.evaluation.metrics import ic_metrics
from alphaloom.tasks.evaluation.predictions import ScoreFn, eval_dataset, predict_with
from alphaloom.tasks.serving import model_logging
from alphaloom.tasks.tracking import runs, store
from alphaloom.tasks.training.train import TrainResult

log = logging.getLogger(__name__)

CHAMPION = "champion"
ChampionScorer = Callable[[str], float]


class IncompatibleChampion(RuntimeError):
    """The champion cannot be scored on the new data (e.g. a different feature set)."""


@dataclass(frozen=True)
class PromotionDecision:
    """What the registry decided and why; both scores are on the same validation window."""

    promoted: bool
    new_version: str
    new_score: float
    champion_version: str | None
    champion_score: float | None
    reason: str


def decide(
    new_score: float,
    champion_version: str | None,
    champion_score: float | None,
    champion_error: str | None = None,
) -> tuple[bool, str]:
    """Pure decision rule: (promote?, reason). The new model must *strictly* beat the champion."""
    if champion_version is None:
        return True, "no champion yet"
    if champion_error is not None:
        return True, (
            f"champion v{champion_version} could not be scored on the new validation window "
            f"({champion_error}); the new model wins by default"
        )
    if not math.isfinite(new_score):
        return False, "the new model's validation Rank IC is undefined"
    if champion_score is None or not math.isfinite(champion_score):
        return True, f"champion v{champion_version}'s validation Rank IC is undefined"
    if new_score > champion_score:
        return True, f"new Rank IC {new_score:.5f} > champion's {champion_score:.5f}"
    return False, f"new Rank IC {new_score:.5f} <= champion's {champion_score:.5f}"


def current_champion(client: mlflow.MlflowClient, name: str) -> str | None:
    """The champion's version number, or None when the model or the alias does not exist."""
    try:
        aliases = client.get_registered_model(name).aliases or {}
    except MlflowException as err:
        if err.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            return None
        raise
    version = aliases.get(CHAMPION)
    return None if version is None else str(version)


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


def registered_score_fn(model_uri: str, feature_names: list[str]) -> ScoreFn:
    """Load a logged ranker through MLflow and score batches with it.

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

    def score_batch(batch: dict) -> tuple[np.ndarray, np.ndarray]:
        out = loaded.predict({k: batch[k].cpu().numpy() for k in keys})
        return out["score"].to_numpy(), out[["p0", "p1", "p2", "p3"]].to_numpy()

    return score_batch


def pyfunc_champion_scorer(shard_dir: str | Path, cfg: PipelineConfig) -> ChampionScorer:
    """A scorer: load a registered model, return its Rank IC on `shard_dir`'s valid split."""
    from alphaloom.model.shard_set import read_manifest

    feature_names = list(read_manifest(shard_dir)["feature_names"])

    def score(model_uri: str) -> float:
        score_batch = registered_score_fn(model_uri, feature_names)
        preds = predict_with(score_batch, shard_dir, "valid", cfg)
        return float(ic_metrics(preds)["rank_ic"])

    return score


def promote_if_better(
    cfg: PipelineConfig,
    run_id: str,
    new_version: str,
    new_score: float,
    score_champion: ChampionScorer,
) -> PromotionDecision:
    """Compare a freshly registered version with the champion; move the alias if it is better."""
    client = store.client_for(cfg)
    name = cfg.tracking.registered_model
    champion = current_champion(client, name)
    champion_score: float | None = None
    error: str | None = None
    if champion is not None and champion != str(new_version):
        try:
            champion_score = float(score_champion(f"models:/{name}/{champion}"))
        except Exception as err:  # any failure means "cannot be compared": say why
            error = f"{type(err).__name__}: {err}"
            log.warning("champion v%s of %s cannot be scored: %s", champion, name, error)
    elif champion == str(new_version):
        champion = None  # re-running the decision for the champion itself
    promoted, reason = decide(new_score, champion, champion_score, error)
    if promoted:
        client.set_registered_model_alias(name, CHAMPION, str(new_version))
    decision = PromotionDecision(
        promoted, str(new_version), float(new_score), champion, champion_score, reason
    )
    _log_decision(cfg, client, run_id, name, decision)
    log.info("registry %s v%s: %s", name, new_version, reason)
    return decision


def _log_decision(
    cfg: PipelineConfig,
    client: mlflow.MlflowClient,
    run_id: str,
    name: str,
    decision: PromotionDecision,
) -> None:
    metrics = {
        "registry/new_valid_rank_ic": decision.new_score,
        "registry/promoted": float(decision.promoted),
    }
    if decision.champion_score is not None:
        metrics["registry/champion_valid_rank_ic"] = decision.champion_score
    runs.log_metrics(cfg, run_id, metrics)
    tags = {
        "registry.promoted": str(decision.promoted).lower(),
        "registry.reason": decision.reason,
        "registry.new_version": decision.new_version,
        "registry.champion_version": decision.champion_version or "none",
    }
    runs.set_tags(cfg, run_id, tags)
    version_tags = {
        "valid_rank_ic": f"{decision.new_score:.6f}",
        "promoted": str(decision.promoted).lower(),
        "decision": decision.reason,
    }
    for key, value in version_tags.items():
        client.set_model_version_tag(name, decision.new_version, key, value[:5000])


def register_and_promote(
    cfg: PipelineConfig,
    run_id: str,
    result: TrainResult,
    shard_dir: str | Path,
) -> PromotionDecision | None:
    """Log the trained model to the run, register it, and move `champion` if it is better.

    Returns None when `tracking.log_model` is off (nothing is registered then).
    """
    if not cfg.tracking.log_model:
        return None
    batch = next(iter(eval_dataset(shard_dir, "valid", cfg)))
    example = model_logging.model_input_example(batch, result.model.input_keys)
    _, version = model_logging.log_ranker(
        cfg, run_id, result.model, result.dims, example, result.feature_names, shard_dir=shard_dir
    )
    if version is None:
        raise RuntimeError(f"model of run {run_id} was logged but not registered")
    scorer = pyfunc_champion_scorer(shard_dir, cfg)
    return promote_if_better(cfg, run_id, version, result.best_val_rank_ic, scorer)


@task(
    name="register-model",
    retries=1,
    timeout_seconds=1800,
    persist_result=False,
    cache_policy=NO_CACHE,
)
def register_task(
    cfg: PipelineConfig, run_id: str, result: TrainResult, shard_dir: str
) -> PromotionDecision | None:
    """Prefect wrapper of `register_and_promote`."""
    return register_and_promote(cfg, run_id, result, shard_dir)
