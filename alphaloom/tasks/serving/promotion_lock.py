"""One promotion at a time per registered model, where the tracking store allows it.

MLflow has no compare-and-set on aliases: two runs that both read "champion is v3", both beat it
and both move the alias leave whichever wrote last, maybe the worse one, and each recorded a
decision against a champion that was no longer current. For a store on this machine (SQLite
file, file store) promotions take an exclusive file lock (`filelock`: `flock` on POSIX) on a
lock file beside it, which holds across threads and processes, so read-score-decide-move is one
step. A tracking server offers no lock; there the promotion re-reads the champion before moving
the alias and decides again if it moved (tasks/serving/promotion.py), which narrows the race to
the instant between that read and the write but cannot close it; schedule promotions through one
Prefect deployment with `concurrency_limit: 1` (prefect.yaml) to rule it out.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock

from alphaloom.tasks.common.config import PipelineConfig
from alphaloom.tasks.tracking.store import local_store_path, resolve_tracking_uri

log = logging.getLogger(__name__)


def lock_file(tracking_uri: str, name: str) -> Path | None:
    """`<store>.promote-<model>.lock` beside a local store; None for a tracking server."""
    store = local_store_path(tracking_uri)
    if store is None:
        return None
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
    if store.is_dir():
        return store / f".promote-{safe}.lock"
    return store.with_name(f"{store.name}.promote-{safe}.lock")


@contextlib.contextmanager
def promotion_lock(cfg: PipelineConfig, name: str) -> Iterator[bool]:
    """Hold the promotion lock of registered model `name` for the block; yields whether a lock
    is held (False for a tracking server, see the module docstring)."""
    path = lock_file(resolve_tracking_uri(cfg), name)
    if path is None:
        log.info("tracking server: no promotion lock; the champion is re-read before it moves")
        yield False
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    # waits as long as it takes; a new FileLock per call is its own lock, so threads exclude too
    with FileLock(path):
        yield True
