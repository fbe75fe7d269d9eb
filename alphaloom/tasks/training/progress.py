"""Training progress for people: tqdm bars in the terminal and a Prefect progress artifact.

Why separate from training: the training loop only emits `TrainProgress` events; how they are
shown (terminal, Prefect UI, nothing in tests) is the caller's choice.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainProgress:
    """One progress event: after each batch (`phase="batch"`) and each epoch (`"epoch"`)."""

    phase: str
    epoch: int
    epochs: int
    batch: int
    metrics: dict[str, float] = field(default_factory=dict)


ProgressFn = Callable[[TrainProgress], None]


class ProgressReporter:
    """Epoch and batch bars on stderr plus a Prefect progress artifact updated once per epoch."""

    def __init__(
        self,
        epochs: int,
        batches_per_epoch: int | None,
        artifact: bool = True,
        label: str = "",
        started: float | None = None,
    ) -> None:
        """`label` prefixes each epoch line (e.g. "variant 3/20 cross_entropy seed 1"), and with
        `started` (a time.time()) the line says how long the whole job has run."""
        self.epochs = epochs
        self.label = label
        self.started = started
        self.batches_per_epoch = batches_per_epoch
        disable = not sys.stderr.isatty()
        self.epoch_bar = tqdm(total=epochs, desc="epochs", unit="epoch", disable=disable)
        self.batch_bar = tqdm(
            total=batches_per_epoch, desc="batches", unit="batch", leave=False, disable=disable
        )
        self.batches_done = 0
        self.artifact_id: Any = None
        self.logger = _run_logger()
        if artifact:
            self.artifact_id = _create_artifact()

    def __call__(self, event: TrainProgress) -> None:
        if event.phase == "batch":
            self.batch_bar.update(max(event.batch - self.batches_done, 0))
            self.batches_done = event.batch
            if event.metrics.get("loss") is not None:
                self.batch_bar.set_postfix(loss=f"{event.metrics['loss']:.4f}", refresh=False)
            return
        self.batch_bar.reset(total=self.batches_per_epoch)
        self.batches_done = 0
        self.epoch_bar.update(1)
        val = event.metrics.get("valid/rank_ic")
        if val is not None:
            self.epoch_bar.set_postfix(valid_rank_ic=f"{val:.4f}")
        self.logger.info("%s", epoch_line(event, self.epochs, self.label, self.started))
        _update_artifact(self.artifact_id, 100.0 * (event.epoch + 1) / max(self.epochs, 1))

    def close(self) -> None:
        self.batch_bar.close()
        self.epoch_bar.close()
        _update_artifact(self.artifact_id, 100.0)


def epoch_line(
    event: TrainProgress, epochs: int, label: str = "", started: float | None = None
) -> str:
    """The one line a finished epoch gets at INFO: `ProgressReporter` logs it, and training
    logs it itself when nobody reports its progress (a DDP job, a library call)."""
    prefix = f"{label}: " if label else ""
    elapsed = "" if started is None else f", {elapsed_text(time.time() - started)}"
    loss = event.metrics.get("train/loss", float("nan"))
    rank_ic = event.metrics.get("valid/rank_ic", float("nan"))
    seconds = event.metrics.get("epoch_seconds", float("nan"))
    return (
        f"{prefix}epoch {event.epoch + 1}/{epochs}: train loss {loss:.4f}, "
        f"valid Rank IC {rank_ic:.4f} ({seconds:.0f} s{elapsed})"
    )


def elapsed_text(seconds: float) -> str:
    """'elapsed 1 h 02 min' / 'elapsed 4 min 05 s'."""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"elapsed {hours} h {minutes:02d} min"
    return f"elapsed {minutes} min {secs:02d} s"


def _run_logger() -> Any:
    """Prefect's run logger inside a flow or task run (shown in its UI), else this module's."""
    try:
        from prefect.logging import get_run_logger

        return get_run_logger()
    except Exception:
        return log


def _create_artifact() -> Any:
    """A Prefect progress artifact when inside a flow or task run, else None."""
    try:
        from prefect.artifacts import create_progress_artifact
        from prefect.context import get_run_context

        get_run_context()
    except Exception:
        return None
    try:
        return create_progress_artifact(
            progress=0.0, key="training-progress", description="Epochs completed"
        )
    except Exception as err:  # the UI nicety must never fail training
        log.debug("no progress artifact: %s", err)
        return None


def _update_artifact(artifact_id: Any, progress: float) -> None:
    if artifact_id is None:
        return
    from prefect.artifacts import update_progress_artifact

    with contextlib.suppress(Exception):
        update_progress_artifact(artifact_id=artifact_id, progress=min(progress, 100.0))
