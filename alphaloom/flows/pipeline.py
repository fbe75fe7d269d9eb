"""The training pipeline: ingest -> features -> text -> shards -> train -> evaluate -> register.

Composition only: every stage is a task from tasks/. The data stages (declared once, in
tasks/dataset/chain.py) are cached on the content of their inputs, their config section and their
code, so a rerun with the same data and config skips them (Prefect logs `Cached`) and a change
rebuilds exactly what depends on it.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from prefect import flow

from alphaloom.tasks.common.config import PipelineConfig, load_config
from alphaloom.tasks.data.ingest import load_saved_oracle
from alphaloom.tasks.dataset.chain import data_stages
from alphaloom.tasks.dataset.split_windows import evaluated_splits
from alphaloom.tasks.evaluation.evaluate import evaluate_task
from alphaloom.tasks.evaluation.neutral import market_exposures
from alphaloom.tasks.orchestration.caching import StageRef
from alphaloom.tasks.serving.promotion import register_task
from alphaloom.tasks.tracking.data_quality import log_data_quality
from alphaloom.tasks.tracking.report import publish_summary, run_summary
from alphaloom.tasks.tracking.resume import resumable_run
from alphaloom.tasks.tracking.runs import TrackedRun, run_tags
from alphaloom.tasks.training.distributed import Backend, train_ddp_task
from alphaloom.tasks.training.ensemble import fit_ensemble
from alphaloom.tasks.training.train import TrainResult, checkpoint_dir_for, train_task


def resolve_config(config: PipelineConfig | None, config_path: str | None) -> PipelineConfig:
    """A flow's config: the model given, else the YAML file given, else the defaults."""
    if config is not None:
        return config
    return load_config(config_path)


def model_stages(
    cfg: PipelineConfig,
    market: StageRef,
    shards: StageRef,
    train: Callable[..., TrainResult] = train_task,
    resume_run_id: str | None = None,
) -> dict[str, Any]:
    """Train (`train_task`, or e.g. the DDP launcher; K members when `train.ensemble` is K),
    evaluate and register inside one MLflow run (FAILED if any stage fails): `resume_run_id`,
    else the unfinished run of the same work (its checkpoint resumes), else a new run
    (tasks/tracking/resume.py)."""
    with resumable_run(cfg, run_tags(shards), resume_run_id) as run_id:
        run = TrackedRun.of(cfg, run_id)
        run.log_shard_dataset(shards.path)
        notes = log_data_quality(run, market)
        checkpoints = str(checkpoint_dir_for(cfg, run_id))
        result = fit_ensemble(train, shards.path, cfg, checkpoints, run_id)
        oracle, exposures = load_saved_oracle(market), market_exposures(market)
        splits = evaluated_splits(shards.path)
        metrics = evaluate_task(result.model, shards.path, cfg, run_id, oracle, exposures, splits)
        decision = register_task(cfg, run_id, result, shards.path)
    summary = run_summary(cfg, run, metrics, decision, result.best_epoch, notes)
    publish_summary(summary)
    return summary


@flow(name="train-pipeline", log_prints=True)
def train_pipeline(
    config: PipelineConfig | None = None,
    config_path: str | None = None,
    resume_run_id: str | None = None,
) -> dict[str, Any]:
    """Train, evaluate and register a ranker on the configured data (continuing MLflow run
    `resume_run_id`, or an unfinished run of the same work, from its checkpoint)."""
    cfg = resolve_config(config, config_path)
    data = data_stages(cfg)
    return model_stages(cfg, data.market, data.shards, resume_run_id=resume_run_id)


@flow(name="train-pipeline-ddp", log_prints=True)
def train_pipeline_ddp(
    config: PipelineConfig | None = None,
    config_path: str | None = None,
    nproc_per_node: int = 2,
    backend: Backend = "auto",
    resume_run_id: str | None = None,
) -> dict[str, Any]:
    """The training pipeline with training run by torchrun (DDP) on this machine."""
    cfg = resolve_config(config, config_path)
    data = data_stages(cfg)
    train = partial(train_ddp_task, nproc_per_node=nproc_per_node, backend=backend)
    return model_stages(cfg, data.market, data.shards, train, resume_run_id)
