"""Crash resume across invocations at the tracking level: dead runs are marked KILLED when found,
a rerun of the same work continues the unfinished run, `--resume RUN_ID` is checked."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys

import mlflow
import psutil
import pytest
from prefect.exceptions import TerminationSignal

from alphaloom.tasks.common.config import PipelineConfig
from alphaloom.tasks.tracking import resume, runs, store

WORK = {runs.TAG_DATA_HASH: "data-1", runs.TAG_SHARD_KEY: "shards-1", runs.TAG_CODE_VERSION: "c1"}


class Crash(RuntimeError):
    pass


@pytest.fixture
def cfg(mlflow_uri: str, request) -> PipelineConfig:
    return PipelineConfig(tracking={"tracking_uri": mlflow_uri, "experiment": "resume"})


def dead_owner() -> resume.Owner:
    """The owner record of a process that has exited."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    owner = resume.Owner(
        socket.gethostname(), process.pid, psutil.Process(process.pid).create_time()
    )
    process.kill()
    process.wait()
    return owner


def orphan_run(cfg: PipelineConfig, owner: resume.Owner, tags=WORK) -> str:
    """A RUNNING run left behind by `owner` (as a kill -9 leaves it)."""
    extra = {
        resume.TAG_FINGERPRINT: resume.run_fingerprint(cfg, tags),
        resume.TAG_OWNER: owner.tag(),
    }
    return runs.start_run(cfg, {**tags, **extra})


def status(cfg: PipelineConfig, run_id: str) -> str:
    return mlflow.MlflowClient(cfg.tracking.tracking_uri).get_run(run_id).info.status


def test_a_run_whose_process_died_is_marked_killed_when_found(cfg: PipelineConfig) -> None:
    other_work = {**WORK, runs.TAG_SHARD_KEY: "shards-2"}
    dead = orphan_run(cfg, dead_owner(), other_work)
    alive = orphan_run(cfg, resume.Owner.this_process(), other_work)
    elsewhere = orphan_run(cfg, resume.Owner("another-host", 1, 0.0), other_work)
    with resume.resumable_run(cfg, WORK) as run_id:
        assert run_id not in (dead, alive, elsewhere)  # other work: nothing to resume
    assert status(cfg, dead) == "KILLED"
    tags = mlflow.MlflowClient(cfg.tracking.tracking_uri).get_run(dead).data.tags
    assert "is gone" in tags[resume.TAG_DIED]
    assert status(cfg, alive) == status(cfg, elsewhere) == "RUNNING"


def test_a_rerun_of_the_same_work_continues_the_unfinished_run(cfg: PipelineConfig) -> None:
    with pytest.raises(Crash), resume.resumable_run(cfg, WORK) as failed:
        raise Crash("out of memory")
    assert status(cfg, failed) == "FAILED"
    killed = orphan_run(cfg, dead_owner())
    with resume.resumable_run(cfg, WORK) as again:  # the newest unfinished one
        assert again == killed and status(cfg, killed) == "RUNNING"
    assert status(cfg, killed) == "FINISHED"
    run = mlflow.MlflowClient(cfg.tracking.tracking_uri).get_run(killed)
    assert run.data.tags[resume.TAG_RESUMED] == "1"
    assert resume.Owner.of(run) == resume.Owner.this_process()
    with resume.resumable_run(cfg, WORK) as older:
        assert older == failed  # then the FAILED one
    with resume.resumable_run(cfg, WORK) as fresh:
        assert fresh not in (failed, killed)  # all finished: new work


def test_only_settings_that_change_results_make_it_other_work(cfg: PipelineConfig) -> None:
    base = resume.run_fingerprint(cfg, WORK)
    faster = cfg.model_copy(deep=True)
    faster.train.num_threads, faster.train.device = 2, "cpu"
    assert resume.run_fingerprint(faster, WORK) == base
    other = cfg.model_copy(deep=True)
    other.train.lr = cfg.train.lr * 2
    assert resume.run_fingerprint(other, WORK) != base
    assert resume.run_fingerprint(cfg, {**WORK, runs.TAG_CODE_VERSION: "c2"}) != base
    assert resume.run_fingerprint(cfg, {**WORK, runs.TAG_DATA_HASH: "data-2"}) != base


def test_resume_by_run_id(cfg: PipelineConfig) -> None:
    elsewhere = orphan_run(cfg, resume.Owner("another-host", 1, 0.0))
    with resume.resumable_run(cfg, WORK, resume=elsewhere) as run_id:
        assert run_id == elsewhere  # the caller vouches that the other host's process is dead
    assert status(cfg, elsewhere) == "FINISHED"
    tags = mlflow.MlflowClient(cfg.tracking.tracking_uri).get_run(elsewhere).data.tags
    assert "declared dead by --resume" in tags[resume.TAG_DIED]

    with (
        pytest.raises(resume.ResumeError, match="FINISHED"),
        resume.resumable_run(cfg, WORK, resume=elsewhere),
    ):
        pass
    running = orphan_run(cfg, resume.Owner.this_process())
    with (
        pytest.raises(resume.ResumeError, match="still running as pid"),
        resume.resumable_run(cfg, WORK, resume=running),
    ):
        pass
    other_work = orphan_run(cfg, dead_owner(), {**WORK, runs.TAG_CODE_VERSION: "c9"})
    with (
        pytest.raises(resume.ResumeError, match="other data, config or code"),
        resume.resumable_run(cfg, WORK, resume=other_work),
    ):
        pass
    with (
        pytest.raises(resume.ResumeError, match="no such run"),
        resume.resumable_run(cfg, WORK, resume="0" * 32),
    ):
        pass
    store.client_for(cfg).set_terminated(running)


@pytest.mark.parametrize(
    ("interrupt", "name"),
    [(KeyboardInterrupt(), "SIGINT"), (TerminationSignal(signal.SIGTERM), "SIGTERM")],
)
def test_a_signal_raised_in_a_run_ends_it_killed_and_a_rerun_continues_it(
    cfg: PipelineConfig, interrupt: BaseException, name: str
) -> None:
    """Ctrl-C, or Prefect's SIGTERM bridge in a flow-run process, ends the run KILLED (not
    FAILED) saying which signal; the rerun of the same work continues it."""
    with pytest.raises(type(interrupt)), resume.resumable_run(cfg, WORK) as stopped:
        raise interrupt
    run = mlflow.MlflowClient(cfg.tracking.tracking_uri).get_run(stopped)
    assert run.info.status == "KILLED"
    assert run.data.tags[resume.TAG_DIED].startswith(f"stopped by {name}")
    with resume.resumable_run(cfg, WORK) as again:
        assert again == stopped
    finished = runs.TrackedRun.of(cfg, stopped)
    assert not finished.mark_stopped("late")  # a finished run is left as it ended
    assert status(cfg, stopped) == "FINISHED"


def test_a_stop_marks_the_runs_its_dead_fit_workers_left_running(cfg: PipelineConfig) -> None:
    """A stop's after-children hook marks KILLED the runs of fit workers started inside the
    block that died without marking them; older dead owners' runs are not its business."""
    gone = dead_owner()
    started_before = psutil.Process().create_time() - 60  # a process older than this one
    older = orphan_run(cfg, resume.Owner(gone.host, gone.pid, started_before))
    from alphaloom.tasks.orchestration import shutdown

    with resume.marking_orphaned_runs(cfg):
        worker = orphan_run(cfg, dead_owner(), {**WORK, runs.TAG_SHARD_KEY: "period-2"})
        live = orphan_run(cfg, resume.Owner.this_process(), {**WORK, runs.TAG_SHARD_KEY: "p3"})
        marked: list[int] = []
        shutdown._run_hooks("stopped by SIGTERM (test)", marked, deadline=0.0, after_children=True)
        before_children: list[int] = []
        shutdown._run_hooks("early", before_children, deadline=0.0, after_children=False)
    assert marked == [1] and before_children == []  # only in the after-children phase
    assert status(cfg, worker) == "KILLED"
    died = mlflow.MlflowClient(cfg.tracking.tracking_uri).get_run(worker).data.tags
    assert died[resume.TAG_DIED].startswith("stopped by SIGTERM (test): its process")
    assert status(cfg, older) == status(cfg, live) == "RUNNING"
