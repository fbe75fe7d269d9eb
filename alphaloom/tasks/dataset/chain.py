"""The data stages, declared once: ingest -> features -> text -> shards.

Every caller that needs data goes through `data_stages`: the pipeline, nightly, score, compare
and backtest flows run the stages as Prefect tasks (cached on their keys, retried, and with
`runner.partitions` > 1 fanned out on the configured task runner); `alphaloom features` and the
DDP workers pass `prefect=False`, which reuses each stage's intact output (checksums verified)
and builds a missing or broken one in this process, with no Prefect server. Either way a stage's
output is the same file under the same key, so one path reuses what the other built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from prefect import flow, unmapped

from alphaloom.tasks.common.config import PipelineConfig
from alphaloom.tasks.data.features import features_task
from alphaloom.tasks.data.ingest import ingest_task, load_saved_bars
from alphaloom.tasks.data.partitions import (
    Partition,
    assemble_features_task,
    partitions_of_bars,
    plan_partitions_task,
    raw_factors_task,
)
from alphaloom.tasks.dataset.shard_fanout import (
    finish_shards_task,
    plan_shards_task,
    write_shard_task,
)
from alphaloom.tasks.dataset.shards import shards_task
from alphaloom.tasks.dataset.text import text_task
from alphaloom.tasks.orchestration.caching import StageRef
from alphaloom.tasks.orchestration.runners import task_runner_for

Until = Literal["features", "shards"]


@dataclass(frozen=True)
class DataStages:
    """The outputs of the data stages that ran (text and shards are None `until="features"`)."""

    market: StageRef
    features: StageRef
    text: StageRef | None = None
    shards: StageRef | None = None


def data_stages(cfg: PipelineConfig, until: Until = "shards", prefect: bool = True) -> DataStages:
    """Run (or reuse) ingest, features and, unless `until="features"`, text and shards."""
    if not prefect:
        market = ingest_task.reuse_or_build(cfg)
        features = features_task.reuse_or_build(market, cfg)
        if until == "features":
            return DataStages(market, features)
        text = text_task.reuse_or_build(market, cfg)
        return DataStages(
            market, features, text, shards_task.reuse_or_build(features, text, market, cfg)
        )
    market = ingest_task(cfg)
    features = features_stage(market, cfg)
    if until == "features":
        return DataStages(market, features)
    text = text_task(market, cfg)
    return DataStages(market, features, text, shards_stage(features, text, market, cfg))


def features_stage(market: StageRef, cfg: PipelineConfig) -> StageRef:
    """One features task, or with `runner.partitions` > 1 the fan-out on the configured runner."""
    if cfg.runner.partitions == 1:
        return features_task(market, cfg)
    return features_fanout.with_options(task_runner=task_runner_for(cfg.runner))(market, cfg)


@flow(name="features-fanout")
def features_fanout(market: StageRef, cfg: PipelineConfig) -> StageRef:
    """Per-partition factors submitted to the task runner, then the cross-sectional part once."""
    partitions = plan_partitions_task(market, cfg)
    raw = [raw_factors_task.submit(partition, cfg) for partition in partitions]
    return assemble_features_task(market, [future.result() for future in raw], cfg)


def market_factors(market: StageRef, cfg: PipelineConfig) -> list[StageRef]:
    """The raw factors of every symbol partition of the market, computed (or reused) once.

    Their keys hold the bars and the factor list, not the splits, so the periods of a backtest
    share them: each period only labels, normalises on its own training days and writes its
    shards (`period_shards`)."""
    bars = load_saved_bars(market.dir)
    partitions = partitions_of_bars(bars, market.path, cfg.runner.partitions)
    del bars
    if len(partitions) == 1:
        return [raw_factors_task(partitions[0], cfg)]
    return raw_factors_fanout.with_options(task_runner=task_runner_for(cfg.runner))(partitions, cfg)


@flow(name="raw-factors-fanout")
def raw_factors_fanout(partitions: list[Partition], cfg: PipelineConfig) -> list[StageRef]:
    """Each partition's raw factors in its own task on the runner, in partition order."""
    return [future.result() for future in raw_factors_task.map(partitions, unmapped(cfg))]


def period_shards(
    market: StageRef, factors: list[StageRef], text: StageRef, cfg: PipelineConfig
) -> StageRef:
    """One split configuration's shards from shared raw factors and text vectors: labels, the
    normalisation fitted on its training days and its shard set (each cached on its key)."""
    features = assemble_features_task(market, factors, cfg)
    return shards_stage(features, text, market, cfg)


def shards_stage(
    features: StageRef, text: StageRef, market: StageRef, cfg: PipelineConfig
) -> StageRef:
    """One shards task, or with `runner.partitions` > 1 one task per shard on the runner."""
    if cfg.runner.partitions == 1:
        return shards_task(features, text, market, cfg)
    fanout = shards_fanout.with_options(task_runner=task_runner_for(cfg.runner))
    return fanout(features, text, market, cfg)


@flow(name="shards-fanout")
def shards_fanout(
    features: StageRef, text: StageRef, market: StageRef, cfg: PipelineConfig
) -> StageRef:
    """Plan from the symbol column, write each shard in its own task, then finish the set."""
    jobs = plan_shards_task(features, text, market, cfg)
    written = write_shard_task.map(jobs, unmapped(features), unmapped(market), unmapped(cfg))
    return finish_shards_task(features, text, market, written, cfg)
