"""Walk-forward backtest: retrain every K months, score the next period, concatenate, compare.

Composition only: the periods come from tasks/backtest/periods.py. The market's raw factors and
text vectors are computed once and shared; each period labels, normalises on its own training
days and writes its shards (tasks/dataset/chain.py, each cached on its key). Each period's
retrain-and-score is one cached task (tasks/backtest/retrain.py) logging a child run per model
under one MLflow parent run, submitted to the fit pool (tasks/orchestration/fits.py: inline with
one worker, else local worker processes or a Dask cluster) as soon as its shards are written, so
the next period's data is prepared while earlier periods train. The table over the concatenated
out-of-sample predictions is built and logged by tasks/backtest/report.py. A rerun after a crash
continues the same parent run, finds the finished periods `Cached` and resumes the interrupted
one from its checkpoint; a failed period fails the backtest after the others have finished.
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
from alphaloom.tasks.dataset.chain import market_factors, period_shards
from alphaloom.tasks.dataset.text import text_task
from alphaloom.tasks.evaluation.neutral import market_exposures
from alphaloom.tasks.orchestration.fits import fit_pool
from alphaloom.tasks.tracking.resume import marking_orphaned_runs
from alphaloom.tasks.training.progress import elapsed_text

# what a period's worker imports when it starts, while this process computes the factors
WARM_MODULES = ("alphaloom.tasks.backtest.retrain", "alphaloom.tasks.training.train",
                "alphaloom.tasks.evaluation.predictions")  # fmt: skip


@flow(name="backtest", log_prints=True)
def backtest(
    config: PipelineConfig | None = None, config_path: str | None = None
) -> dict[str, Any]:
    """Retrain and score every walk-forward period; log the comparison to one parent run."""
    cfg = resolve_config(config, config_path)
    market = ingest_task(cfg)
    periods = plan_periods(trading_calendar(market), cfg)
    started = time.time()
    with parent_run(cfg, backtest_key(cfg, market, periods), periods) as parent_id:
        with marking_orphaned_runs(cfg), fit_pool(cfg, len(periods), WARM_MODULES) as pool:
            if pool.workers > 1:
                print(f"{len(periods)} periods on {pool.workers} workers")
            factors, text = market_factors(market, cfg), text_task(market, cfg)
            submitted = []
            for period in periods:
                label = f"period {period.number}/{len(periods)} {period.label}"
                print(f"{label} ({elapsed_text(time.time() - started)})")
                pcfg = period_config(cfg, period)
                shards = period_shards(market, factors, text, pcfg)
                task = backtest_period_task.with_options(task_run_name=f"period{period.number}")
                fit = pool.submit(
                    task, cfg=pcfg, period=period, shards=shards, parent_run_id=parent_id,
                    label=label,
                )  # fmt: skip
                submitted.append((label, fit))
            states = [(label, fit.state()) for label, fit in submitted]
        failed = [(label, state) for label, state in states if not state.is_completed()]
        for label, state in failed:
            print(f"{label} failed: {state.message}")
        if failed:  # the first failure's own error (the finished periods are cached)
            failed[0][1].result()
        loaded = [load_period(state.result()) for _, state in states]
        oracle, exposures = load_saved_oracle(market), market_exposures(market)
        wall = time.time() - started
        summary = log_backtest(cfg, parent_id, *concatenate(loaded), oracle, wall, exposures)
    print(summary["markdown"])
    return summary
