"""Where the fits of `compare` and `backtest` run: Prefect task runners, one fit per worker.

A fit (a variant and seed of `compare`, a period of `backtest`) is a Prefect task. With one
worker it runs in this process, as it always did. With more, it is submitted to an existing
engine: Prefect's `ProcessPoolTaskRunner` (spawned local worker processes), or with
`runner.kind: dask` Prefect-Dask's `DaskTaskRunner` (a local cluster, or the scheduler at
`runner.dask_address`). Every fit keeps its own seed, cache key, checkpoint directory, MLflow
child run and progress lines, so a fit computes the same numbers wherever it runs; a failed fit
ends as a failed state and the others go on; the caller collects the states in the order it
submitted them.

How many at once (`fit_workers`): `runner.fit_workers`, else the cores this process may use
divided by the torch threads a fit uses (`train.num_threads`). On a machine with several GPUs
each local worker process gets one of them (round robin, `CUDA_VISIBLE_DEVICES` set when the
worker starts, before CUDA is initialised); with one GPU the workers share it.

Start-up: a spawned worker spends 20-30 s importing torch, MLflow and the trainer before its
first fit. The pool starts all its workers when it opens (`warm_modules` are imported by each
worker's initializer), so a flow that opens the pool before its data stages overlaps that
start-up with them instead of paying it after.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import multiprocessing
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from alphaloom.tasks.common.config import PipelineConfig
from alphaloom.tasks.orchestration import shutdown
from alphaloom.tasks.orchestration.caching import StageTask, remove_dead_writers_temps

log = logging.getLogger(__name__)


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def fit_workers(cfg: PipelineConfig) -> int:
    """How many fits run at once: `runner.fit_workers`, else cores // torch threads per fit."""
    if cfg.runner.fit_workers is not None:
        return cfg.runner.fit_workers
    threads = cfg.train.num_threads or usable_cores()
    return max(1, usable_cores() // threads)


def visible_gpus(cfg: PipelineConfig) -> int:
    """CUDA devices a fit may use (0 when `train.device` keeps training off CUDA)."""
    if cfg.train.device not in ("auto", "cuda"):
        return 0
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def prepare_worker(counter: Any, n_gpus: int, warm_modules: Sequence[str] = ()) -> None:
    """Worker process initializer: signals handled as in a command (a stopped command's fits
    mark their runs KILLED); with several GPUs, this worker sees one, the next in round robin;
    then `warm_modules` are imported (after CUDA_VISIBLE_DEVICES, which torch reads once)."""
    from alphaloom.tasks.orchestration.shutdown import handle_signals_in_worker

    handle_signals_in_worker()
    if n_gpus > 1:
        with counter.get_lock():
            index = counter.value
            counter.value += 1
        os.environ["CUDA_VISIBLE_DEVICES"] = str(index % n_gpus)
    for name in warm_modules:
        importlib.import_module(name)


@task(name="start-fit-worker", cache_policy=NO_CACHE, persist_result=False)
def worker_started() -> int:
    """Nothing but a started worker: submitted once per worker when the pool opens, so every
    worker process is spawned (and imports its `warm_modules`) at once. Returns its pid."""
    return os.getpid()


def fit_task_runner(cfg: PipelineConfig, workers: int, warm_modules: Sequence[str] = ()) -> Any:
    """The Prefect task runner for `workers` concurrent fits (see the module docstring)."""
    if cfg.runner.kind == "dask":
        from alphaloom.tasks.orchestration.runners import task_runner_for

        return task_runner_for(cfg.runner.model_copy(update={"workers": workers}))
    from prefect.task_runners import ProcessPoolTaskRunner

    counter = multiprocessing.get_context("spawn").Value("i", 0)
    return ProcessPoolTaskRunner(
        max_workers=workers,
        initializer=prepare_worker,
        initargs=(counter, visible_gpus(cfg), tuple(warm_modules)),
    )


@dataclass
class SubmittedFit:
    """A fit handed to the pool: its Prefect future, or the final state of an inline run."""

    future: Any = None
    done: Any = None

    def state(self) -> Any:
        """The fit's final Prefect state (waits for it); never raises for a failed fit."""
        if self.done is None:
            self.future.wait()
            self.done = self.future.state
        return self.done


class FitPool:
    """Submits fit tasks to a started task runner, or runs them inline when there is none."""

    def __init__(self, runner: Any | None, workers: int) -> None:
        self.runner, self.workers = runner, workers
        self.started: list[SubmittedFit] = []  # the `worker_started` probes

    def start_workers(self) -> None:
        """Spawn every local worker now (one probe each), not one by one as fits arrive."""
        if self.runner is not None and not self.started:
            self.started = [self.submit(worker_started) for _ in range(self.workers)]

    def submit(self, task: Any, **parameters: Any) -> SubmittedFit:
        """Start `task(**parameters)`; inline (this process, now) when there is one worker."""
        if self.runner is None:
            return SubmittedFit(done=task(**parameters, return_state=True))
        if isinstance(task, StageTask):  # its output checked here, the Prefect task submitted
            task = task.task_for((), parameters)
        return SubmittedFit(future=self.runner.submit(task, parameters=parameters))


@contextlib.contextmanager
def fit_pool(
    cfg: PipelineConfig, n_fits: int, warm_modules: Sequence[str] = ()
) -> Iterator[FitPool]:
    """A pool for `n_fits` fits, its task runner started for the block and shut down after;
    local workers are all spawned on entry, each importing `warm_modules` (module docstring).

    One worker, or one fit, runs inline (no runner) unless `runner.kind` is dask, which always
    uses the cluster it names.
    """
    workers = min(fit_workers(cfg), max(n_fits, 1))
    if workers == 1 and cfg.runner.kind != "dask":
        yield FitPool(None, 1)
        return
    with (
        shutdown.on_stop(lambda _why: _remove_workers_temps(cfg), after_children=True),
        fit_task_runner(cfg, workers, warm_modules) as runner,
    ):
        pool = FitPool(runner, workers)
        if cfg.runner.kind != "dask":  # a cluster's workers are already running
            pool.start_workers()
        yield pool
        for probe in pool.started:  # settled before the runner shuts down
            probe.state()


def _remove_workers_temps(cfg: PipelineConfig) -> int:
    """After a stop has ended the workers: remove the temporaries a killed one left under the
    work dir (logged; returns 0, no MLflow run marked)."""
    removed = remove_dead_writers_temps(cfg.work_dir)
    if removed:
        log.warning(
            "removed %s: left by a fit worker ended by the stop", ", ".join(map(str, removed))
        )
    return 0
