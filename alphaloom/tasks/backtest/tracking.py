"""MLflow runs a rerun continues: the backtest's parent run and each period's child runs.

A rerun after a crash must land in the same parent run, and a period that was interrupted in
the same child run (so its per-epoch metrics and its checkpoint directory,
`<work_dir>/checkpoints/<run id>`, carry on). Runs are found by their tags in the experiment:
the parent by the backtest's key, a child by the parent, the period's key and the model.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator, Mapping, Sequence

import mlflow
from mlflow.entities import Run, RunStatus

from alphaloom.tasks.backtest.periods import Period
from alphaloom.tasks.common.config import PipelineConfig
from alphaloom.tasks.orchestration.caching import StageRef, stage_key
from alphaloom.tasks.tracking import resume, runs, store

log = logging.getLogger(__name__)

TAG_PARENT = "mlflow.parentRunId"
TAG_KIND = "alphaloom.kind"
TAG_BACKTEST_KEY = "alphaloom.backtest_key"
TAG_PERIOD_KEY = "alphaloom.period_key"
TAG_PERIOD = "alphaloom.period"
TAG_MODEL = "alphaloom.backtest_model"


def backtest_key(cfg: PipelineConfig, market: StageRef, periods: Sequence[Period]) -> str:
    """Identity of a backtest: the market, the periods and every setting that changes a result
    (not the work dir, tracking or `resume.VOLATILE`: device, threads, runner), plus this
    package's code."""
    raw = cfg.model_dump(mode="json")
    for section, keys in resume.VOLATILE.items():
        for key in keys:
            raw[section].pop(key, None)
    for section in ("work_dir", "tracking"):
        raw.pop(section)
    section = {"config": raw, "periods": [p.model_dump(mode="json") for p in periods]}
    return stage_key("backtest", [market.key], section, (sys.modules[__name__],))


def find_run(
    client: mlflow.MlflowClient, experiment_id: str, tags: Mapping[str, str], unfinished_only: bool
) -> Run | None:
    """The newest active run of the experiment carrying all `tags` (not FINISHED ones if
    `unfinished_only`), or None."""
    clauses = [f"tags.`{key}` = '{value}'" for key, value in tags.items()]
    found = client.search_runs(
        [experiment_id],
        filter_string=" and ".join(clauses),
        order_by=["attributes.start_time DESC"],
    )
    for run in found:
        if not unfinished_only or run.info.status != RunStatus.to_string(RunStatus.FINISHED):
            return run
    return None


@contextlib.contextmanager
def continued_run(
    cfg: PipelineConfig,
    match: Mapping[str, str],
    tags: Mapping[str, str],
    run_name: str,
    unfinished_only: bool,
) -> Iterator[str]:
    """Yield the run to work in: the newest with the `match` tags, reopened and owned by this
    process (tasks/tracking/resume.py: a RUNNING run whose process died is marked KILLED first),
    else a new one. It ends FINISHED, or FAILED if the block raises. A run with these tags still
    RUNNING in a live process (or on another host) is an error, never taken over."""
    client = store.client_for(cfg)
    experiment_id = store.ensure_experiment(client, cfg)
    resume.mark_dead_runs(client, experiment_id)
    run = find_run(client, experiment_id, match, unfinished_only)
    if run is not None and run.info.status == RunStatus.to_string(RunStatus.RUNNING):
        raise RuntimeError(
            f"MLflow run {run.info.run_id} ({run_name}) is still running in another process "
            f"({run.data.tags.get(resume.TAG_OWNER, 'owner unknown')}); wait for it or end it"
        )

    def make_run() -> str:
        if run is not None:
            return resume.reopen(client, run)
        owner = {resume.TAG_OWNER: resume.Owner.this_process().tag()}
        return runs.start_run(cfg, {**tags, **match, **owner}, run_name)

    with runs.owned_run(client, make_run) as run_id:
        yield run_id


def parent_run(
    cfg: PipelineConfig, key: str, periods: Sequence[Period]
) -> contextlib.AbstractContextManager[str]:
    """The backtest's parent run: one per backtest key, continued by every rerun."""
    match = {TAG_BACKTEST_KEY: key, TAG_KIND: "backtest"}
    tags = {
        "alphaloom.backtest_periods": str(len(periods)),
        "alphaloom.backtest_window": cfg.backtest.window,
        "alphaloom.backtest_span": f"{periods[0].test_start}..{periods[-1].test_end}",
    }
    name = f"backtest {cfg.backtest.window} {cfg.backtest.retrain_months}m {key[:8]}"
    return continued_run(cfg, match, tags, name, unfinished_only=False)


def child_run(
    cfg: PipelineConfig, parent_id: str, period_key: str, number: int, model: str
) -> contextlib.AbstractContextManager[str]:
    """One model's run of one period under the parent: an interrupted one is continued."""
    match = {TAG_PARENT: parent_id, TAG_PERIOD_KEY: period_key, TAG_MODEL: model}
    tags = {TAG_KIND: "backtest-period", TAG_PERIOD: str(number)}
    return continued_run(cfg, match, tags, f"period {number} {model}", unfinished_only=True)
