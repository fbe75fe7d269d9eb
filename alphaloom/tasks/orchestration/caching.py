"""Content-addressed stage outputs and the one caching mechanism over them.

A stage's key is the hash of (its upstream stages' keys, its own config section, its code
version); its output lives in `<work_dir>/<stage>/<key>` (a local path or an fsspec URL),
written atomically and sealed by a checksum record (tasks/common/storage.py).

Prefect caches a stage task on that key plus the output's location (`StageOutputPolicy`, a
documented `CachePolicy`), so a rerun with the same data and config is `Cached`. A cache record
only says the output was once written, so `StageTask` checks the output against its checksums
before every call: intact, and the call is the normal cached one; missing, incomplete or corrupt,
and the task runs with `refresh_cache=True`, rebuilding the output and its record. Stage
functions themselves are plain builders and never look for an existing output.

Before a stage builds, it removes the temporaries of its own output (`.<key>.tmp-*`,
`.<key>.parts-*`) that a killed writer left (`remove_stale_temps`); each names its writer (host
and pid, storage's `temp_tag`), so a live writer's (another process or thread building the same
key now) is never touched.
"""

from __future__ import annotations

import glob
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import psutil
from prefect import Task, task
from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext
from prefect.exceptions import MissingContextError
from prefect.futures import PrefectFuture
from prefect.logging import get_run_logger
from pydantic import BaseModel

from alphaloom.tasks.common.hashing import code_version, combine, hash_json, package_closure
from alphaloom.tasks.common.storage import (
    HOST_TAG,
    FsPath,
    Location,
    local_copy,
    output_problem,
    remove_temp,
)
from alphaloom.tasks.orchestration.retries import retry_transient

log = logging.getLogger(__name__)

KEY_LENGTH = 20

STALE_TEMP_SECONDS = 24 * 3600  # a temporary of another host, or without a writer tag, untouched


class StageRef(BaseModel):
    """A stage output: which stage, its content key, and where it lives (path or URL)."""

    stage: str
    key: str
    path: str

    @classmethod
    def at(cls, work_dir: Location, stage: str, key: str) -> StageRef:
        """The output of `stage` with this key under `work_dir`: `<work_dir>/<stage>/<key>`."""
        return cls(stage=stage, key=key, path=str(stage_dir(work_dir, stage, key)))

    @property
    def location(self) -> FsPath:
        """Where the output lives, resolved (read in place: pyarrow and pandas take its URL)."""
        return FsPath.of(self.path)

    def file(self, name: str) -> FsPath:
        """One file of the output, read in place (small files: no local copy is made)."""
        return self.location / name

    @property
    def dir(self) -> Path:
        """A local directory with the output: itself, or a verified local copy of a URL output."""
        return local_copy(self.path)


def stage_key(
    stage: str,
    upstream: list[str],
    section: Any,
    modules: tuple[ModuleType, ...],
    extra: str = "",
) -> str:
    """The content key of a stage: upstream keys + config section + code version (+ extra).

    The code version covers `modules` and every module of their packages they import
    (`package_closure`), so editing a helper module rebuilds the stages built on it.
    """
    code = code_version(*package_closure(*modules))
    return combine(stage, *upstream, hash_json(section), code, extra)[:KEY_LENGTH]


def stage_dir(work_dir: Location, stage: str, key: str) -> FsPath:
    """Where a stage output with this key lives."""
    return FsPath.of(work_dir) / stage / key


Locate = Callable[..., StageRef]


@dataclass
class StageOutputPolicy(CachePolicy):
    """Prefect cache policy of a stage task: the key is the stage key + the output's location
    (the same content under another work_dir is another output)."""

    locate: Locate | None = None

    def compute_key(
        self,
        task_ctx: TaskRunContext,
        inputs: dict[str, Any],
        flow_parameters: dict[str, Any],
        **kwargs: Any,
    ) -> str | None:
        if self.locate is None:
            return None
        ref = self.locate(**inputs)
        return combine(ref.key, ref.location.id)


class StageTask:
    """A stage's Prefect task behind one check: its output is verified before a cached result
    is trusted, so a deleted, incomplete or corrupt output is rebuilt and never `Cached`.

    Call it like the task (`ingest_task(cfg)`, `.submit`; a fan-out submits one call per element,
    each checked); `.fn` is the plain builder and
    `.reuse_or_build` the same check without Prefect (the CLI, torchrun workers).
    """

    def __init__(self, prefect_task: Task, locate: Locate) -> None:
        self.task = prefect_task
        self.locate = locate
        self.refreshing = prefect_task.with_options(refresh_cache=True)
        self.__doc__ = prefect_task.fn.__doc__

    @property
    def fn(self) -> Callable[..., StageRef]:
        return self.task.fn

    @property
    def name(self) -> str:
        return self.task.name

    def problem(self, *args: Any, **kwargs: Any) -> tuple[StageRef, str | None]:
        """(The output these inputs build, why it cannot be reused or None when intact)."""
        ref = self.locate(*args, **kwargs)
        return ref, output_problem(ref.location)

    def task_for(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Task:
        """The Prefect task to run for these inputs: the cached one when their output is intact,
        else one that refreshes the cache (for a task runner's `submit`, which takes a Task)."""
        try:
            ref, problem = self.problem(*args, **kwargs)
        except Exception:  # the task itself then fails (or retries) with this error
            return self.task
        if problem is None:
            return self.task
        run_logger().info(_rebuild_message(ref, problem))
        _before_build(ref)
        return self.refreshing

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.task_for(args, kwargs)(*args, **kwargs)

    def submit(self, *args: Any, **kwargs: Any) -> PrefectFuture:
        return self.task_for(args, kwargs).submit(*args, **kwargs)

    def with_options(self, **options: Any) -> StageTask:
        return StageTask(self.task.with_options(**options), self.locate)

    def reuse_or_build(self, *args: Any, **kwargs: Any) -> StageRef:
        """Without Prefect: the intact output of these inputs, else the one the builder writes."""
        ref, problem = self.problem(*args, **kwargs)
        if problem is None:
            log.info("%s: reusing %s", self.name, ref.path)
            return ref
        log.info("%s: %s", self.name, _rebuild_message(ref, problem))
        _before_build(ref)
        return self.fn(*args, **kwargs)


def _writer_alive(temp: Path, tag: str) -> bool:
    """Whether the writer named by a temporary's tag (`<host>-<pid>-...`) may still be writing
    it: on this host, that pid running since before the temporary was last touched (a reused
    pid started later); another host's, or an untagged one, while touched within
    STALE_TEMP_SECONDS."""
    host, _, rest = tag.partition("-")
    pid = rest.partition("-")[0]
    try:
        touched = temp.lstat().st_mtime
        if host != HOST_TAG or not pid.isdigit():
            return time.time() - touched < STALE_TEMP_SECONDS
        writer = psutil.Process(int(pid))
        return writer.status() != psutil.STATUS_ZOMBIE and writer.create_time() <= touched + 2
    except FileNotFoundError:
        return True  # removed meanwhile: nothing to do
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        return True  # cannot tell: leave it


# what marks a temporary in a name: atomic writes' `.<name>.tmp-<writer>-*`, the shard
# fan-out's `.<name>.parts-<writer>-*`
TEMP_KINDS = (".tmp-", ".parts-")


def remove_stale_temps(output: Location) -> list[Path]:
    """Remove the temporaries of the local output `output` (`.<name>.tmp-*` beside it, the
    shard fan-out's `.<name>.parts-*`) whose writer is gone; returns those removed."""
    out = FsPath.of(output).local
    if out is None:
        return []  # at a URL nothing is staged beside the output
    removed = []
    for kind in TEMP_KINDS:
        prefix = f".{out.name}{kind}"
        for temp in sorted(out.parent.glob(glob.escape(prefix) + "*")):
            if not _writer_alive(temp, temp.name[len(prefix) :]):
                remove_temp(temp)
                removed.append(temp)
    if removed:
        run_logger().info("removed %s: left by a writer that is gone", ", ".join(map(str, removed)))
    return removed


def remove_dead_writers_temps(root: Location) -> list[Path]:
    """Remove every temporary under the local directory `root` whose writer is gone (as
    `remove_stale_temps` does beside one output): what a fit worker killed by a stop left, since
    a worker too busy to handle the signal cannot remove its own. Returns those removed."""
    base = FsPath.of(root).local
    if base is None:
        return []
    removed = []
    for folder, dirs, files in os.walk(base):
        for name in [*dirs, *files]:
            for kind in TEMP_KINDS:
                _, found, tag = name.partition(kind)
                temp = Path(folder) / name
                if name.startswith(".") and found and not _writer_alive(temp, tag):
                    remove_temp(temp)
                    removed.append(temp)
        dirs[:] = [name for name in dirs if not name.startswith(".")]  # not into temporaries
    return removed


def _before_build(ref: StageRef) -> None:
    try:
        remove_stale_temps(ref.location)
    except OSError as err:  # never a reason not to build
        run_logger().warning("could not remove stale temporaries of %s: %s", ref.path, err)


def _rebuild_message(ref: StageRef, problem: str) -> str:
    action = "building" if problem == "missing" else "rebuilding"
    return f"output {ref.path} is {problem}: {action} it"


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    """The flow run's logger (shown in the Prefect UI) inside a flow, else this module's."""
    try:
        return get_run_logger()
    except MissingContextError:
        return log


def stage_task(
    name: str,
    locate: Locate,
    *,
    retries: int = 2,
    timeout_seconds: float = 3600,
) -> Callable[[Callable[..., StageRef]], StageTask]:
    """The thin Prefect wrapper every data stage uses.

    `locate` takes the task's parameters and returns the StageRef the task will build; the task
    is cached on its key and location across runs (results persisted as JSON, never pickled),
    its output is verified before a cached result is used, transient IO errors retry with
    backoff (deterministic ones fail at once) and a hung stage times out.
    """

    def decorate(func: Callable[..., StageRef]) -> StageTask:
        prefect_task = task(
            name=name,
            cache_policy=StageOutputPolicy(locate=locate),
            persist_result=True,
            result_serializer="json",
            retries=retries,
            retry_delay_seconds=[2, 10, 30][:retries] or 0,
            retry_condition_fn=retry_transient,
            timeout_seconds=timeout_seconds,
        )(func)
        return StageTask(prefect_task, locate)

    return decorate
