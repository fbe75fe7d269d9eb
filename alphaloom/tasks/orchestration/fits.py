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
start-up with them instead of paying it after. The workers report to this process's Prefect API
(its temporary server when none is configured) rather than each starting a server of its own.

Threads: each local worker's native thread pools (OpenMP, OpenBLAS, MKL, Arrow) are limited to
its share of the cores (`train.num_threads`, else cores // workers). Left at their default of
every core, N workers on N cores oversubscribe them and OpenBLAS's spinning threads slowed each
concurrent epoch by ~17 % on 2 cores (sp500-dev; docs/scaling.md section 3).
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


def threads_per_worker(cfg: PipelineConfig, workers: int) -> int:
    """Native threads one local worker may use: `train.num_threads`, else its share of the cores."""
    return cfg.train.num_threads or max(1, usable_cores() // workers)


# read by OpenMP, OpenBLAS and MKL when they load (a worker imports torch after this is set)
NATIVE_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def limit_native_threads(threads: int) -> None:
    """This process's native thread pools to `threads`: the ones loaded already (threadpoolctl,
    torch, Arrow) and, through the environment, the ones loaded later (module docstring)."""
    import sys

    from threadpoolctl import threadpool_limits

    for variable in NATIVE_THREAD_VARIABLES:
        os.environ[variable] = str(threads)
    threadpool_limits(limits=threads)  # not a `with`: the limit holds for the worker's life
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
    if "pyarrow" in sys.modules:
        sys.modules["pyarrow"].set_cpu_count(threads)


def prepare_worker(
    counter: Any, n_gpus: int, warm_modules: Sequence[str] = (), threads: int | None = None
) -> None:
    """Worker process initializer: signals handled as in a command (a stopped command's fits
    mark their runs KILLED); with several GPUs, this worker sees one, the next in round robin;
    native threads limited to `threads`; then `warm_modules` are imported (after
    CUDA_VISIBLE_DEVICES, which torch reads once) and the limit applied to what they loaded."""
    from alphaloom.tasks.orchestration.shutdown import handle_signals_in_worker

    handle_signals_in_worker()
    if n_gpus > 1:
        with counter.get_lock():
            index = counter.value
            counter.value += 1
        os.environ["CUDA_VISIBLE_DEVICES"] = str(index % n_gpus)
    if threads is not None:
        limit_native_threads(threads)
    for name in warm_modules:
        importlib.import_module(name)
    if threads is not None:
        limit_native_threads(threads)


@dataclass(frozen=True)
class WorkerInfo:
    """What a started worker reports: its pid, the Prefect API it uses, its native threads."""

    pid: int
    api_url: str | None
    native_threads: dict[str, int]


@task(name="start-fit-worker", cache_policy=NO_CACHE, persist_result=False)
def worker_started() -> WorkerInfo:
    """Nothing but a started worker: submitted once per worker when the pool opens, so every
    worker process is spawned (and imports its `warm_modules`) at once."""
    from prefect.settings import PREFECT_API_URL
    from threadpoolctl import threadpool_info

    threads = {pool["internal_api"]: pool["num_threads"] for pool in threadpool_info()}
    return WorkerInfo(os.getpid(), PREFECT_API_URL.value(), threads)


@contextlib.contextmanager
def sharing_this_api() -> Iterator[None]:
    """Tasks submitted inside the block use this process's Prefect API: with no PREFECT_API_URL
    configured, the URL of the temporary server this process started (a spawned worker would
    otherwise start one of its own, ~10 s of CPU each while the data stages run). Local workers
    only: a Dask cluster's workers may run on machines that cannot reach this one's 127.0.0.1."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        yield
        return
    from prefect.client.orchestration import get_client

    url = str(get_client(sync_client=True).api_url)
    with temporary_settings(updates={PREFECT_API_URL: url}):
        yield


def fit_task_runner(cfg: PipelineConfig, workers: int, warm_modules: Sequence[str] = ()) -> Any:
    """The Prefect task runner for `workers` concurrent fits (see the module docstring)."""
    if cfg.runner.kind == "dask":
        from alphaloom.tasks.orchestration.runners import task_runner_for

        return task_runner_for(cfg.runner.model_copy(update={"workers": workers}))
    from prefect.task_runners import ProcessPoolTaskRunner

    counter = multiprocessing.get_context("spawn").Value("i", 0)
    threads = threads_per_worker(cfg, workers)
    return ProcessPoolTaskRunner(
        max_workers=workers,
        initializer=prepare_worker,
        initargs=(counter, visible_gpus(cfg), tuple(warm_modules), threads),
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
        sharing_this_api() if cfg.runner.kind != "dask" else contextlib.nullcontext(),
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
