"""The fit pool: how many fits run at once, and that a fit runs inline when there is one worker."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from alphaloom.tasks.common.config import load_config
from alphaloom.tasks.orchestration import fits

SMOKE = Path(__file__).resolve().parent.parent / "configs" / "smoke.yaml"


@pytest.mark.parametrize(
    ("cores", "threads", "configured", "expected"),
    [(16, 1, None, 16), (16, 4, None, 4), (2, 1, None, 2), (2, 4, None, 1), (16, 1, 3, 3)],
)
def test_fit_workers_share_the_cores_by_torch_threads(
    monkeypatch, cores: int, threads: int, configured: int | None, expected: int
) -> None:
    monkeypatch.setattr(fits, "usable_cores", lambda: cores)
    sets = [f"train.num_threads={threads}"]
    if configured is not None:
        sets.append(f"runner.fit_workers={configured}")
    assert fits.fit_workers(load_config(SMOKE, sets)) == expected


def test_one_worker_or_one_fit_runs_inline_without_a_task_runner(monkeypatch) -> None:
    monkeypatch.setattr(fits, "usable_cores", lambda: 8)
    calls = []

    def task(**parameters):
        calls.append(parameters)
        return "final state"

    cfg = load_config(SMOKE, ["runner.fit_workers=1"])
    with fits.fit_pool(cfg, n_fits=5) as pool:
        submitted = pool.submit(task, period=1)
        assert calls == [{"period": 1, "return_state": True}]  # ran now, in this process
    assert pool.runner is None and submitted.state() == "final state"
    with fits.fit_pool(load_config(SMOKE), n_fits=1) as pool:  # 8 workers, but one fit
        assert pool.runner is None and pool.workers == 1


def test_a_worker_imports_the_warm_modules_when_it_starts(monkeypatch) -> None:
    import sys

    from alphaloom.tasks.orchestration import shutdown

    monkeypatch.setattr(shutdown, "handle_signals_in_worker", lambda: None)  # not in pytest
    name = "alphaloom.tasks.evaluation.smoothing"
    monkeypatch.delitem(sys.modules, name, raising=False)
    fits.prepare_worker(None, 0, (name,))
    assert name in sys.modules


def test_a_local_pool_spawns_every_worker_when_it_opens_on_this_api_with_its_thread_share() -> None:
    import multiprocessing

    from prefect import flow
    from prefect.client.orchestration import get_client
    from threadpoolctl import threadpool_info

    before = set(multiprocessing.active_children())
    parent_threads = {pool["internal_api"]: pool["num_threads"] for pool in threadpool_info()}

    @flow
    def opened() -> tuple[int, list[fits.WorkerInfo], str]:
        cfg = load_config(SMOKE, ["runner.fit_workers=2", "train.num_threads=1"])
        with fits.fit_pool(cfg, n_fits=3) as pool:
            infos = [probe.state().result() for probe in pool.started]
            spawned = set(multiprocessing.active_children()) - before  # no fit submitted yet
        return len(spawned), infos, str(get_client(sync_client=True).api_url).rstrip("/")

    spawned, infos, api_url = opened()
    assert spawned == 2  # both workers started on entry, not the second at the second fit
    pids = {info.pid for info in infos}
    assert len(pids) == 2 and os.getpid() not in pids  # the probes ran in the workers
    # no worker started a temporary Prefect server of its own: they report to this one
    assert {(info.api_url or "").rstrip("/") for info in infos} == {api_url}
    for info in infos:  # OpenMP and OpenBLAS limited to the worker's one thread; this process not
        assert info.native_threads and set(info.native_threads.values()) == {1}
    assert {pool["internal_api"]: pool["num_threads"] for pool in threadpool_info()} == (
        parent_threads
    )
