"""Walk-forward backtest: retrain every K months, score the next period, concatenate, compare.

Composition only: the periods come from tasks/backtest/periods.py, each period's data stages are
the pipeline's (cached per key), each period's retrain-and-score is one cached task
(tasks/backtest/retrain.py) logging a child run per model under one MLflow parent run, and the
table over the concatenated out-of-sample predictions is built and logged by
tasks/backtest/report.py. A rerun after a crash continues the same parent run, finds the
finished periods `Cached` and resumes the interrupted one from its checkpoint.
"""

from __future__ import annotations

import time
from typing import Any

from prefect import flow

from alphaloom.flows.pipeline import resolve_config
from alphaloom.tasks.backtest.periods import period_config, plan_periods, trading_calendar
from alphaloom.tasks.backtest.report import concatenate, log_backtest
from alphaloom.tasks.backtest.retrain import backtest_period_task, load_period
from alphaloom.tasks.backtest.tracking import backtest_key, parent_run
from alphaloom.tasks.common.config import PipelineConfig
from alphaloom.tasks.data.ingest import ingest_task, load_saved_oracle
from alphaloom.tasks.dataset.chain import data_stages
from alphaloom.tasks.training.progress import elapsed_text


@flow(name="backtest", log_prints=True)
def backtest(
    config: PipelineConfig | None = None, config_path: str | None = None
) -> dict[str, Any]:
    """Retrain and score every walk-forward period; log the comparison to one parent run."""
    cfg = resolve_config(config, config_path)
    market = ingest_task(cfg)
    periods = plan_periods(trading_calendar(market), cfg)
    started, loaded = time.time(), []
    with parent_run(cfg, backtest_key(cfg, market, periods), periods) as parent_id:
        for period in periods:
            label = f"period {period.number}/{len(periods)} {period.label}"
            print(f"{label} ({elapsed_text(time.time() - started)})")
            pcfg = period_config(cfg, period)
            shards = data_stages(pcfg).shards
            task = backtest_period_task.with_options(task_run_name=f"period{period.number}")
            loaded.append(load_period(task(pcfg, period, shards, parent_id, label)))
        oracle, wall = load_saved_oracle(market), time.time() - started
        summary = log_backtest(cfg, parent_id, *concatenate(loaded), oracle, wall)
    print(summary["markdown"])
    return summary
