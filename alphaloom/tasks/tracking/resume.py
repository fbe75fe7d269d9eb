"""Crash resume across invocations: a rerun continues the unfinished MLflow run of the same work.

Checkpoints live under the MLflow run id (`<work_dir>/checkpoints/<run id>`), so continuing a
killed training means continuing its run. Every pipeline run is tagged with a fingerprint of
what it computes (the resolved config without the settings that cannot change a result, the
shard set's key and source-data hash, the model code's version) and with its owner process
(host, pid, start time). Opening a run then:

1. marks KILLED every RUNNING run of the experiment whose owner process on this host is gone
   (a `kill -9`, the OOM killer, a pre-empted machine: nothing got to end it);
2. resumes the newest run with the same fingerprint that is not FINISHED (KILLED or FAILED;
   a run stopped by SIGTERM or SIGINT ends KILLED, tasks/orchestration/shutdown.py), or the run
   named by `alphaloom run --resume RUN_ID`, setting it RUNNING again under this process;
   training then finds its checkpoint (or the previous one if it is unreadable, or starts
   over: tasks/training/checkpoint.py);
3. else starts a new run.

A RUNNING run whose owner is alive, or on another host (its liveness cannot be seen from here),
is never taken over implicitly; `--resume` takes over one on another host, which the caller then
vouches is dead.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import mlflow
import psutil
from mlflow.entities import Run, RunStatus
from mlflow.exceptions import MlflowException

from alphaloom.tasks.common.config import PipelineConfig
from alphaloom.tasks.common.hashing import hash_json
from alphaloom.tasks.orchestration import shutdown
from alphaloom.tasks.tracking.runs import (
    TAG_CODE_VERSION,
    TAG_DATA_HASH,
    TAG_DIED,
    TAG_SHARD_KEY,
    owned_run,
    start_run,
)
from alphaloom.tasks.tracking.store import client_for, ensure_experiment, resolve_tracking_uri

log = logging.getLogger(__name__)

TAG_FINGERPRINT = "alphaloom.run_fingerprint"
TAG_OWNER = "alphaloom.owner"
TAG_RESUMED = "alphaloom.resumed"

# Settings that change where or how fast a run computes, never what: a rerun that differs only in
# them is the same work (training's checkpoint fingerprint ignores the same ones).
VOLATILE = {
    "train": ("device", "num_threads", "checkpoint_every_batches", "progress_every_batches"),
    "loader": ("num_workers", "prefetch"),
    "tracking": ("ui_port",),
    "runner": ("kind", "workers", "dask_address", "dask_processes", "fit_workers"),
}


class ResumeError(RuntimeError):
    """`--resume RUN_ID` names a run that cannot be resumed; the message says why."""


def run_fingerprint(cfg: PipelineConfig, tags: Mapping[str, str]) -> str:
    """What a run computes: config (less VOLATILE), shard key, data hash and model code."""
    config = cfg.model_dump(mode="json")
    for section, keys in VOLATILE.items():
        for key in keys:
            config[section].pop(key, None)
    identity = {key: tags.get(key, "") for key in (TAG_DATA_HASH, TAG_SHARD_KEY, TAG_CODE_VERSION)}
    return hash_json({"config": config, "identity": identity})


@dataclass(frozen=True)
class Owner:
    """The process a run belongs to."""

    host: str
    pid: int
    started: float  # psutil create_time: with the pid, names one process even if pids are reused

    @classmethod
    def this_process(cls) -> Owner:
        me = psutil.Process()
        return cls(socket.gethostname(), me.pid, me.create_time())

    @classmethod
    def of(cls, run: Run) -> Owner | None:
        raw = run.data.tags.get(TAG_OWNER)
        try:
            return None if raw is None else cls(**json.loads(raw))
        except (TypeError, ValueError):
            return None

    def tag(self) -> str:
        return json.dumps(asdict(self))

    def alive(self) -> bool | None:
        """True or False on this host; None on another one (not visible from here)."""
        if self.host != socket.gethostname():
            return None
        try:
            process = psutil.Process(self.pid)
            running = process.status() != psutil.STATUS_ZOMBIE
            return running and abs(process.create_time() - self.started) < 1e-3
        except psutil.NoSuchProcess:
            return False


def mark_killed(client: mlflow.MlflowClient, run: Run, why: str) -> None:
    """End a run whose process died as KILLED, saying so in the tag `alphaloom.died`."""
    client.set_tag(run.info.run_id, TAG_DIED, why[:5000])
    client.set_terminated(run.info.run_id, status=RunStatus.to_string(RunStatus.KILLED))
    log.warning("MLflow run %s: %s; marked KILLED", run.info.run_id, why)


def mark_dead_runs(
    client: mlflow.MlflowClient,
    experiment_id: str,
    why: str | None = None,
    born_after: float | None = None,
) -> list[str]:
    """Mark KILLED the experiment's RUNNING runs whose owner process on this host is gone
    (`why`, if given, says what ended it); with `born_after` (a psutil create time), only
    those whose owner process started after it."""
    marked = []
    running = client.search_runs(
        [experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=1000
    )
    for run in running:
        owner = Owner.of(run)
        if owner is None or (born_after is not None and owner.started < born_after):
            continue
        if owner.alive() is False:
            gone = f"its process {owner.pid} on {owner.host} is gone"
            mark_killed(client, run, f"{why}: {gone}" if why else gone)
            marked.append(run.info.run_id)
    return marked


@contextlib.contextmanager
def marking_orphaned_runs(cfg: PipelineConfig) -> Iterator[None]:
    """While the block runs, a signal that stops this process marks KILLED, once its child
    processes have ended, the runs they owned and left RUNNING: a fit worker stuck in a long
    call that holds the GIL cannot mark its own before it is killed. Only runs of processes
    started after this one are marked (another command's, dead before it started, are not
    this stop's to explain)."""
    client = client_for(cfg)
    experiment_id = ensure_experiment(client, cfg)
    # the fit workers (the owners of the runs to mark) start after this process; compared on
    # psutil's clock (Owner.started), which can be a second or two off time.time()
    began = psutil.Process().create_time()

    def mark(why: str) -> int:
        return len(mark_dead_runs(client, experiment_id, why, born_after=began))

    with shutdown.on_stop(mark, after_children=True):
        yield


def find_unfinished(client: mlflow.MlflowClient, experiment_id: str, fp: str) -> Run | None:
    """The newest KILLED or FAILED run with fingerprint `fp`, or None."""
    found = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{TAG_FINGERPRINT}` = '{fp}'",
        order_by=["attributes.start_time DESC"],
        max_results=100,
    )
    for run in found:
        if run.info.status in ("KILLED", "FAILED"):
            return run
        if run.info.status == "RUNNING":
            log.warning("run %s does this work and is still running: not resumed", run.info.run_id)
    return None


def resumable_target(client: mlflow.MlflowClient, cfg: PipelineConfig, run_id: str, fp: str) -> Run:
    """The run `--resume RUN_ID` names, checked: it exists, is unfinished, does the same work and
    is not running elsewhere on this host. A RUNNING run of another host is marked KILLED."""
    where = resolve_tracking_uri(cfg)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise ResumeError(f"--resume {run_id}: no such run in {where}") from None
    if run.info.status == "FINISHED":
        raise ResumeError(f"--resume {run_id}: the run FINISHED; there is nothing to resume")
    theirs = run.data.tags.get(TAG_FINGERPRINT)
    if theirs != fp:
        raise ResumeError(
            f"--resume {run_id}: the run was started with other data, config or code "
            f"(fingerprint {theirs} vs {fp} now); rerun with what it ran, or without --resume"
        )
    if run.info.status == "RUNNING":
        owner = Owner.of(run)
        alive = None if owner is None else owner.alive()
        if alive:
            raise ResumeError(f"--resume {run_id}: still running as pid {owner.pid} on this host")
        mark_killed(client, run, f"declared dead by --resume (owner {owner})")
    return client.get_run(run_id)


def reopen(client: mlflow.MlflowClient, run: Run) -> str:
    """Set a KILLED or FAILED run RUNNING again, owned by this process; returns its id."""
    run_id = run.info.run_id
    count = int(run.data.tags.get(TAG_RESUMED, "0")) + 1
    client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
    client.set_tag(run_id, TAG_OWNER, Owner.this_process().tag())
    client.set_tag(run_id, TAG_RESUMED, str(count))
    log.info("resuming MLflow run %s (was %s; resumption %d)", run_id, run.info.status, count)
    return run_id


@contextlib.contextmanager
def resumable_run(
    cfg: PipelineConfig,
    tags: Mapping[str, str],
    resume: str | None = None,
    run_name: str | None = None,
) -> Iterator[str]:
    """Yield the id of the run to work in: `resume`, else an unfinished run of the same work,
    else a new one; it ends FAILED if the block raises and FINISHED else (see module doc)."""
    client = client_for(cfg)
    experiment_id = ensure_experiment(client, cfg)
    fp = run_fingerprint(cfg, tags)
    mark_dead_runs(client, experiment_id)
    target = (
        resumable_target(client, cfg, resume, fp)
        if resume
        else find_unfinished(client, experiment_id, fp)
    )

    def make_run() -> str:
        if target is not None:
            return reopen(client, target)
        extra: dict[str, Any] = {TAG_FINGERPRINT: fp, TAG_OWNER: Owner.this_process().tag()}
        return start_run(cfg, {**tags, **extra}, run_name)

    with owned_run(client, make_run) as run_id:
        yield run_id
