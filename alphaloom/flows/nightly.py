"""The nightly retrain: refreshed data in, rebuild what changed, retrain, promote, score."""

from __future__ import annotations

from typing import Any

from prefect import flow

from alphaloom.flows.pipeline import model_stages, resolve_config
from alphaloom.tasks.common.config import PipelineConfig
from alphaloom.tasks.dataset.chain import data_stages
from alphaloom.tasks.serving.scoring import score_task


@flow(name="nightly-retrain", log_prints=True)
def nightly_retrain(
    config: PipelineConfig | None = None, config_path: str | None = None
) -> dict[str, Any]:
    """Retrain on the data as it is tonight; the champion moves only if the new model is better."""
    cfg = resolve_config(config, config_path).model_copy(deep=True)
    cfg.tracking.trigger = "nightly"
    data = data_stages(cfg)
    summary = model_stages(cfg, data.market, data.shards)
    summary["scores"] = score_task(cfg, data.shards.path)
    return summary
