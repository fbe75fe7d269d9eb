"""Which Prefect task runner executes fanned-out stage tasks: threads, processes or Dask."""

from __future__ import annotations

from typing import Any

from alphaloom.tasks.common.config import RunnerSection


def task_runner_for(runner: RunnerSection) -> Any:
    """The Prefect task runner the `runner` section names (prefect-dask only imported for dask)."""
    from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner

    if runner.kind == "thread":
        return ThreadPoolTaskRunner(max_workers=runner.workers)
    if runner.kind == "process":
        return ProcessPoolTaskRunner(max_workers=runner.workers)
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:
        raise RuntimeError(
            "runner.kind is 'dask' but prefect-dask is not installed: pip install 'alphaloom[dask]'"
        ) from None
    if runner.dask_address:
        return DaskTaskRunner(address=runner.dask_address)
    return DaskTaskRunner(
        cluster_kwargs={
            "n_workers": runner.workers,
            "threads_per_worker": 1,
            "processes": runner.dask_processes,
            "dashboard_address": None,
        }
    )
