"""Content-addressed stage outputs and the Prefect cache keys built from them.

A stage's key is the hash of (its upstream stages' keys, its own config section, its code version).
Its output lives in `<work_dir>/<stage>/<key>`, written atomically, so an existing directory means
the output is complete. Prefect's cache key is that same key while the directory exists; if someone
deleted the output, the key is made unique so the task reruns instead of returning a dangling path.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from pydantic import BaseModel

from tasks.hashing import code_version, combine, hash_json

log = logging.getLogger(__name__)

KEY_LENGTH = 20


class StageRef(BaseModel):
    """A finished stage output: which stage, its content key, and where it lives."""

    stage: str
    key: str
    path: str

    @property
    def dir(self) -> Path:
        return Path(self.path)


def stage_key(
    stage: str,
    upstream: list[str],
    section: Any,
    modules: tuple[ModuleType, ...],
    extra: str = "",
) -> str:
    """The content key of a stage: upstream keys + config section + code version (+ extra)."""
    return combine(stage, *upstream, hash_json(section), code_version(*modules), extra)[:KEY_LENGTH]


def stage_dir(work_dir: str | Path, stage: str, key: str) -> Path:
    """Where a stage output with this key lives."""
    return Path(work_dir) / stage / key


def existing_output_cache_key(
    key_and_dir: Callable[[dict[str, Any]], tuple[str, Path]],
) -> Callable[[Any, dict[str, Any]], str]:
    """A Prefect `cache_key_fn`: the stage key + output location, unless the output vanished.

    A cached record whose output directory was deleted would hand downstream tasks a dangling
    path, so in that case (and only then) the key is made unique and the task reruns.
    """

    def cache_key_fn(context: Any, parameters: dict[str, Any]) -> str:
        key, out_dir = key_and_dir(parameters)
        cache_key = combine(key, str(out_dir.resolve()))
        if out_dir.is_dir():
            return cache_key
        store = getattr(context, "result_store", None)
        if store is not None and store.exists(cache_key):
            log.info("output %s was deleted: rebuilding it", out_dir)
            return f"{cache_key}-rebuild-{uuid.uuid4().hex}"
        return cache_key

    return cache_key_fn


def stage_task(
    name: str,
    locate: Callable[..., tuple[str, Path]],
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

    def key_and_dir(parameters: dict[str, Any]) -> tuple[str, Path]:
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
