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

from mlflow.entities import RunStatus

from alphaloom.tasks.backtest.periods import Period
from alphaloom.tasks.common.config import PipelineConfig
from alphaloom.tasks.orchestration.caching import StageRef, stage_key
from alphaloom.tasks.tracking import runs, store

log = logging.getLogger(__name__)

TAG_PARENT = "mlflow.parentRunId"
TAG_KIND = "alphaloom.kind"
TAG_BACKTEST_KEY = "alphaloom.backtest_key"
TAG_PERIOD_KEY = "alphaloom.period_key"
TAG_PERIOD = "alphaloom.period"
TAG_MODEL = "alphaloom.backtest_model"
# Settings that say where or how fast a run goes, not what it computes (train.fingerprint
# leaves the same ones out of a checkpoint's identity).
_NOT_IDENTITY = {
    "train": ("device", "num_threads", "checkpoint_every_batches", "progress_every_batches"),
    "loader": ("num_workers", "prefetch"),
}


def backtest_key(cfg: PipelineConfig, market: StageRef, periods: Sequence[Period]) -> str:
    """Identity of a backtest: the market, the periods and every setting that changes a result
    (not the work dir, tracking, runner or device), plus this package's code."""
    raw = cfg.model_dump(mode="json")
    for section in ("work_dir", "tracking", "runner"):
        raw.pop(section)
    for section, keys in _NOT_IDENTITY.items():
        for key in keys:
            raw[section].pop(key)
    section = {"config": raw, "periods": [p.model_dump(mode="json") for p in periods]}
    return stage_key("backtest", [market.key], section, (sys.modules[__name__],))


def find_run(cfg: PipelineConfig, tags: Mapping[str, str], unfinished_only: bool) -> str | None:
    """The newest active run of the experiment carrying all `tags` (unfinished ones only if
    asked), or None."""
    client = store.client_for(cfg)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    if experiment is None:
        return None
    clauses = [f"tags.`{key}` = '{value}'" for key, value in tags.items()]
    found = client.search_runs(
        [experiment.experiment_id],
        filter_string=" and ".join(clauses),
        order_by=["attributes.start_time DESC"],
    )
    finished = RunStatus.to_string(RunStatus.FINISHED)
    for run in found:
        if not unfinished_only or run.info.status != finished:
            return run.info.run_id
    return None


@contextlib.contextmanager
def continued_run(
    cfg: PipelineConfig,
    match: Mapping[str, str],
    tags: Mapping[str, str],
    run_name: str,
    unfinished_only: bool,
) -> Iterator[str]:
    """`runs.tracked_run`, but an existing run with the `match` tags is reopened instead of a
    new one created; it ends FINISHED, or FAILED if the block raises."""
    run_id = find_run(cfg, match, unfinished_only)
    if run_id is None:
        with runs.tracked_run(cfg, {**tags, **match}, run_name) as new_id:
            yield new_id
        return
    log.info("continuing MLflow run %s (%s)", run_id, run_name)
    client = store.client_for(cfg)
    client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
    try:
        yield run_id
    except BaseException:
        runs.end_run(cfg, run_id, failed=True)
        raise
    runs.end_run(cfg, run_id, failed=False)


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
