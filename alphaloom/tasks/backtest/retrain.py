"""One walk-forward period: retrain the network (and the LightGBM baseline) and score the period.

The period is a stage like the data stages: its output `<work_dir>/backtest/<key>/` holds the
out-of-sample predictions of each model (`network.parquet`, `lightgbm.parquet`: the evaluation's
prediction frame of the period's test split) and `period.json` (the period, the child run of
each model, its fit details and test metrics), written atomically and sealed by checksums. The
key covers the period's shard set (its data and split dates), every setting and all the code
training and scoring read (`train.fingerprint`, the model-side code version, this package and
the baseline), so a rerun after a crash finds the finished periods `Cached` and retrains only
the others; an interrupted period continues its child run and training checkpoint.

Each model runs in its own child run of the backtest's parent (tasks/backtest/tracking.py),
trained with `train_model` / `train_lightgbm` and scored with `predict` / `predict_lightgbm` on
the period's `test` split, its metrics logged as `test/*` like every other run's. With
`train.ensemble` K > 1 the period's network is the seed ensemble (tasks/training/ensemble.py):
its members train one after another in the network's run, and it is scored as one model. Nothing is
registered: a backtest never moves the champion.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from typing import Any

import pandas as pd

from alphaloom.tasks.backtest.periods import Period
from alphaloom.tasks.backtest.tracking import child_run
from alphaloom.tasks.common.config import PipelineConfig
from alphaloom.tasks.common.storage import atomic_dir
from alphaloom.tasks.comparison import baselines
from alphaloom.tasks.evaluation.evaluate import evaluate_predictions
from alphaloom.tasks.orchestration.caching import StageRef, stage_key, stage_task
from alphaloom.tasks.tracking import runs
from alphaloom.tasks.training.train import TrainResult, fingerprint

log = logging.getLogger(__name__)

PERIOD_FILE = "period.json"
PREDICTION_FILES = {"network": "network.parquet", "lightgbm": "lightgbm.parquet"}


@dataclass
class Scored:
    """One model's out-of-sample predictions of a period and what to record about them."""

    preds: pd.DataFrame
    record: dict[str, Any]


def with_lightgbm(cfg: PipelineConfig) -> bool:
    """Whether the baseline runs: asked for, and the optional `lightgbm` extra installed."""
    return cfg.backtest.lightgbm and baselines.lightgbm_available()


def period_location(
    cfg: PipelineConfig,
    period: Period,
    shards: StageRef,
    parent_run_id: str | None = None,
    label: str = "",
) -> StageRef:
    """The period's output: key = its shard set + the period + training and baseline settings
    + the code (`parent_run_id` and `label` only say where to log and what to print)."""
    section = {
        "period": period.model_dump(mode="json"),
        "lightgbm": with_lightgbm(cfg),
        "lightgbm_params": cfg.backtest.lightgbm_params,
    }
    if cfg.train.ensemble > 1:  # the fingerprint leaves it out; one network keeps its old key
        section["ensemble"] = cfg.train.ensemble
    extra = fingerprint(cfg, shards.path) + runs.model_code_version()
    modules = (sys.modules[__name__], baselines)
    key = stage_key("backtest-period", [shards.key], section, modules, extra=extra)
    return StageRef.at(cfg.work_dir, "backtest", key)


def log_test(cfg: PipelineConfig, run: runs.TrackedRun, preds: pd.DataFrame) -> dict[str, float]:
    """Evaluate a period's predictions and log them as the run's `test/*` metrics."""
    metrics, _ = evaluate_predictions(preds, cfg.evaluate, with_figures=False)
    run.log_evaluation("test", metrics)
    return metrics


def train_network(cfg: PipelineConfig, shards: StageRef, run_id: str, label: str) -> TrainResult:
    """The period's network: one, or a seed ensemble of `train.ensemble` members trained one
    after another (the period is already one fit of the backtest's pool)."""
    from alphaloom.tasks.training import ensemble
    from alphaloom.tasks.training.progress import ProgressReporter
    from alphaloom.tasks.training.train import checkpoint_dir_for, train_model

    checkpoints = str(checkpoint_dir_for(cfg, run_id))
    if cfg.train.ensemble > 1:
        return ensemble.train_members(shards.path, cfg, checkpoints, run_id, label)
    reporter = ProgressReporter(cfg.train.epochs, None, artifact=False, label=label)
    try:
        return train_model(shards.path, cfg, checkpoints, run_id, progress=reporter)
    finally:
        reporter.close()


def retrain_network(cfg: PipelineConfig, shards: StageRef, run_id: str, label: str) -> Scored:
    """Train on the period's train split (early stopping on valid) and score its test split."""
    from alphaloom.tasks.evaluation.predictions import predict
    from alphaloom.tasks.training.ensemble import fit_details

    result = train_network(cfg, shards, run_id, label)
    preds = predict(result.model, shards.path, "test", cfg, device=result.device)
    fit = fit_details(result)
    run = runs.TrackedRun.of(cfg, run_id)
    run.log_metrics({k: v for k, v in fit.items() if k != "members"})
    return Scored(preds, {"run_id": run_id, **fit, "test": log_test(cfg, run, preds)})


def retrain_lightgbm(cfg: PipelineConfig, shards: StageRef, run_id: str) -> Scored:
    """The baseline on the same splits: fit on train (early stopping on valid), score test."""
    fit = baselines.train_lightgbm(
        shards.path, cfg, cfg.backtest.lightgbm_params, seed=cfg.train.seed
    )
    run = runs.TrackedRun.of(cfg, run_id)
    run.log_params({f"lightgbm.{k}": v for k, v in fit.params.items()})
    preds = baselines.predict_lightgbm(fit, shards.path, "test", cfg)
    details = {
        "best_iteration": float(fit.best_iteration),
        "best_valid_rank_ic": fit.best_val_rank_ic,
        "fit_seconds": fit.fit_seconds,
    }
    run.log_metrics(details)
    return Scored(preds, {"run_id": run_id, **details, "test": log_test(cfg, run, preds)})


def run_period(
    cfg: PipelineConfig, period: Period, shards: StageRef, parent_run_id: str, label: str = ""
) -> StageRef:
    """Retrain and score every model of one period; write `<work_dir>/backtest/<key>/`."""
    ref = period_location(cfg, period, shards, parent_run_id)
    outcome: dict[str, Any] = {"period": period.model_dump(mode="json"), "shards": shards.key}
    with atomic_dir(ref.path) as tmp:
        with child_run(cfg, parent_run_id, ref.key, period.number, "network") as run_id:
            scored = {"network": retrain_network(cfg, shards, run_id, label)}
        if with_lightgbm(cfg):
            with child_run(cfg, parent_run_id, ref.key, period.number, "lightgbm") as run_id:
                scored["lightgbm"] = retrain_lightgbm(cfg, shards, run_id)
        elif cfg.backtest.lightgbm:
            log.warning("LightGBM is not installed (%s): the baseline is skipped",
                        baselines.INSTALL_HINT)  # fmt: skip
        for model, result in scored.items():
            result.preds.to_parquet(tmp / PREDICTION_FILES[model], index=False)
            outcome[model] = result.record
        (tmp / PERIOD_FILE).write_text(json.dumps(outcome, indent=1))
    return ref


@stage_task("backtest-period", period_location, retries=1, timeout_seconds=12 * 3600)
def backtest_period_task(
    cfg: PipelineConfig, period: Period, shards: StageRef, parent_run_id: str, label: str = ""
) -> StageRef:
    """Prefect task: cached on the period's key, its output verified before it is trusted."""
    return run_period(cfg, period, shards, parent_run_id, label)


def load_period(ref: StageRef) -> tuple[dict[str, Any], dict[str, pd.DataFrame]]:
    """(period.json, {model: its out-of-sample predictions}) of a finished period."""
    record = json.loads(ref.file(PERIOD_FILE).read_text())
    preds = {
        model: pd.read_parquet(str(ref.file(name)))
        for model, name in PREDICTION_FILES.items()
        if model in record
    }
    return record, preds
