"""Score the latest date with the champion model and write a ranked parquet + CSV."""

from __future__ import annotations

from prefect import flow

from alphaloom.flows.pipeline import resolve_config
from alphaloom.tasks.common.config import PipelineConfig
from alphaloom.tasks.dataset.chain import data_stages
from alphaloom.tasks.serving.scoring import score_task


@flow(name="score-latest", log_prints=True)
def score_latest(
    config: PipelineConfig | None = None, config_path: str | None = None
) -> dict[str, object]:
    """Refresh the data stages (cached when unchanged), then rank every symbol on the last date."""
    cfg = resolve_config(config, config_path)
    return score_task(cfg, data_stages(cfg).shards.path)
