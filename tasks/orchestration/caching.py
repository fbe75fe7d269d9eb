"""Content-addressed stage outputs and the Prefect cache keys built from them.

A stage's key is the hash of (its upstream stages' keys, its own config section, its code version).
Its output lives in `<work_dir>/<stage>/<key>` (a local path or an fsspec URL), written
atomically, so an existing directory (at a URL: one with its completion marker) means the output
is complete. Prefect's cache key is that same key while the output exists; if someone deleted it,
the key is made unique so the task reruns instead of returning a dangling path.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from pydantic import BaseModel

from alphaloom.tasks.common.hashing import code_version, combine, hash_json
from alphaloom.tasks.common.storage import (
    Location,
    child,
    local_copy,
    local_or_url,
    location_id,
    output_complete,
)

log = logging.getLogger(__name__)

KEY_LENGTH = 20


class StageRef(BaseModel):
    """A finished stage output: which stage, its content key, and where it lives."""

    stage: str
    key: str
    path: str

    @property
    def location(self) -> Location:
        """Where the output lives: a local Path or a URL string (read directly by pyarrow)."""
        return local_or_url(self.path)

    def file(self, name: str) -> Location:
        """One file of the output, read in place (small files: no local copy is made)."""
        return child(self.location, name)

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
    """The content key of a stage: upstream keys + config section + code version (+ extra)."""
    return combine(stage, *upstream, hash_json(section), code_version(*modules), extra)[:KEY_LENGTH]


def stage_dir(work_dir: str | Path, stage: str, key: str) -> Location:
    """Where a stage output with this key lives (a Path, or a URL when work_dir is one)."""
    return child(child(local_or_url(work_dir), stage), key)


def existing_output_cache_key(
    key_and_dir: Callable[[dict[str, Any]], tuple[str, Location]],
) -> Callable[[Any, dict[str, Any]], str]:
    """A Prefect `cache_key_fn`: the stage key + output location, unless the output vanished.

    A cached record whose output directory was deleted would hand downstream tasks a dangling
    path, so in that case (and only then) the key is made unique and the task reruns.
    """

    def cache_key_fn(context: Any, parameters: dict[str, Any]) -> str:
        key, out_dir = key_and_dir(parameters)
        cache_key = combine(key, location_id(out_dir))
        if output_complete(out_dir):
            return cache_key
        store = getattr(context, "result_store", None)
        if store is not None and store.exists(cache_key):
            log.info("output %s was deleted: rebuilding it", out_dir)
            return f"{cache_key}-rebuild-{uuid.uuid4().hex}"
        return cache_key

    return cache_key_fn


def stage_task(
    name: str,
    locate: Callable[..., tuple[str, Location]],
    *,
    retries: int = 2,
    timeout_seconds: float = 3600,
) -> Callable[[Callable[..., StageRef]], Any]:
    """The thin Prefect wrapper every data stage uses.

    `locate` takes the task's parameters and returns (stage key, output directory); the task is
    cached on that key across runs (results persisted as JSON, never pickled), IO failures retry
    with backoff, and a hung stage times out.
    """
    from prefect import task

    def key_and_dir(parameters: dict[str, Any]) -> tuple[str, Location]:
        return locate(**parameters)

    def decorate(func: Callable[..., StageRef]) -> Any:
        return task(
            name=name,
            cache_key_fn=existing_output_cache_key(key_and_dir),
            persist_result=True,
            result_serializer="json",
            retries=retries,
            retry_delay_seconds=[2, 10, 30][:retries] or 0,
            timeout_seconds=timeout_seconds,
        )(func)

    return decorate
