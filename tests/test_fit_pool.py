"""The fit pool: how many fits run at once, and that a fit runs inline when there is one worker."""

from __future__ import annotations

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
