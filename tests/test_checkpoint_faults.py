"""A bad checkpoint never stops a run: one WARNING line names the file, then training resumes
from the previous checkpoint kept beside it, or starts from scratch; never a traceback."""

from __future__ import annotations

import logging
from pathlib import Path

import mlflow
import pytest
import torch

from alphaloom.tasks.training.checkpoint import (
    CHECKPOINT_NAME,
    CORRUPT_SUFFIX,
    PREVIOUS_CHECKPOINT_NAME,
    load_checkpoint,
)
from alphaloom.tasks.training.progress import TrainProgress
from alphaloom.tasks.training.train import TrainResult, train_model
from tests.helpers_train import TinyData, build_tiny_shards, tiny_config

EPOCHS = 3
LOGGER = "alphaloom.tasks.training.checkpoint"


class InjectedFailure(RuntimeError):
    """Stands in for a crash at the start of an epoch."""


def crash_in(epoch: int):
    def progress(event: TrainProgress) -> None:
        if event.phase == "batch" and event.epoch == epoch:
            raise InjectedFailure(f"crash in epoch {epoch}")

    return progress


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> TinyData:
    extra = (f"train.epochs={EPOCHS}", f"train.patience={EPOCHS}", "train.max_batches_per_epoch=4")
    return build_tiny_shards(tmp_path_factory.mktemp("shards"), *extra)


@pytest.fixture(scope="module")
def reference(tiny: TinyData, tmp_path_factory) -> TrainResult:
    """One uninterrupted run, which every recovery below must end with."""
    return train_model(tiny.shard_dir, tiny.cfg, tmp_path_factory.mktemp("reference"))


def crashed_after_two_epochs(tiny: TinyData, where: Path) -> None:
    """Checkpoints after epochs 0 and 1: `checkpoint.pt` at epoch 2, the previous at epoch 1."""
    with pytest.raises(InjectedFailure):
        train_model(tiny.shard_dir, tiny.cfg, where, progress=crash_in(2))
    assert load_checkpoint(where / CHECKPOINT_NAME)["state"]["epoch"] == 2
    assert load_checkpoint(where / PREVIOUS_CHECKPOINT_NAME)["state"]["epoch"] == 1


def warnings_of(caplog) -> list[str]:
    """The checkpoint module's warnings, each one line."""
    found = [
        record.getMessage()
        for record in caplog.records
        if record.name == LOGGER and record.levelno >= logging.WARNING
    ]
    assert all("\n" not in message for message in found)
    return found


def test_a_truncated_checkpoint_resumes_from_the_previous_one(
    tiny: TinyData, reference: TrainResult, tmp_path: Path, caplog
) -> None:
    crashed_after_two_epochs(tiny, tmp_path)
    truncate(tmp_path / CHECKPOINT_NAME)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        resumed = train_model(tiny.shard_dir, tiny.cfg, tmp_path)
    (warning,) = warnings_of(caplog)
    assert str(tmp_path / CHECKPOINT_NAME) in warning and "unreadable" in warning
    assert f"trying {tmp_path / PREVIOUS_CHECKPOINT_NAME}" in warning
    assert resumed.resumed_at == (1, 0)  # epoch 1 is trained again, epoch 0 is not
    assert len(resumed.history) == EPOCHS
    assert same_weights(resumed.model, reference.model)
    assert (tmp_path / (CHECKPOINT_NAME + CORRUPT_SUFFIX)).is_file()  # set aside, not reused
    assert load_checkpoint(tmp_path / CHECKPOINT_NAME)["state"]["finished"]


def test_no_readable_checkpoint_restarts_training_from_scratch(
    tiny: TinyData, reference: TrainResult, tmp_path: Path, caplog
) -> None:
    crashed_after_two_epochs(tiny, tmp_path)
    truncate(tmp_path / CHECKPOINT_NAME)
    (tmp_path / PREVIOUS_CHECKPOINT_NAME).write_bytes(b"\0" * 100)  # not a torch file at all
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        fresh = train_model(tiny.shard_dir, tiny.cfg, tmp_path)
    first, second = warnings_of(caplog)
    assert str(tmp_path / CHECKPOINT_NAME) in first
    assert str(tmp_path / PREVIOUS_CHECKPOINT_NAME) in second
    assert second.endswith("training restarts from scratch")
    assert fresh.resumed_at is None and len(fresh.history) == EPOCHS
    assert same_weights(fresh.model, reference.model)


def test_a_checkpoint_that_loads_but_cannot_be_restored_is_undone(
    tiny: TinyData, reference: TrainResult, tmp_path: Path, caplog
) -> None:
    """The model's weights are restored before the optimizer's fail: the fresh start must not
    keep them."""
    crashed_after_two_epochs(tiny, tmp_path)
    (tmp_path / PREVIOUS_CHECKPOINT_NAME).unlink()
    broken = load_checkpoint(tmp_path / CHECKPOINT_NAME)
    del broken["optimizer"]
    torch.save(broken, tmp_path / CHECKPOINT_NAME)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        fresh = train_model(tiny.shard_dir, tiny.cfg, tmp_path)
    (warning,) = warnings_of(caplog)
    assert "cannot be restored (KeyError" in warning
    assert warning.endswith("training restarts from scratch")
    assert fresh.resumed_at is None
    assert same_weights(fresh.model, reference.model)


def test_a_killed_save_leaves_no_temporary_behind(tiny: TinyData, tmp_path: Path) -> None:
    crashed_after_two_epochs(tiny, tmp_path)
    from alphaloom.tasks.common.storage import HOST_TAG

    dead = tmp_path / f".{CHECKPOINT_NAME}.tmp-{HOST_TAG}-999999999-x"  # no such pid
    dead.write_bytes(b"half a checkpoint")
    train_model(tiny.shard_dir, tiny.cfg, tmp_path)
    assert not dead.exists()


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_a_rerun_over_a_truncated_checkpoint_finishes_its_run(
    tmp_path: Path, mlflow_uri: str, monkeypatch, caplog
) -> None:
    """The issue's case: a crashed `alphaloom run`, its checkpoint truncated, then a rerun. It
    used to end FAILED with the hint on the last line of a traceback."""
    from alphaloom.flows.pipeline import train_pipeline
    from alphaloom.tasks.training.progress import ProgressReporter

    cfg = tiny_config(
        f"work_dir={tmp_path / 'work'}",
        f"tracking.tracking_uri={mlflow_uri}",
        "data.synthetic.n_symbols=30",
        "data.synthetic.n_days=320",
        "text.enabled=false",
        "train.epochs=3",
        "train.max_batches_per_epoch=2",
    )
    report = ProgressReporter.__call__

    def crash_in_epoch_2(self, event):
        report(self, event)
        if event.phase == "batch" and event.epoch == 2:
            raise RuntimeError("power cut")

    monkeypatch.setattr(ProgressReporter, "__call__", crash_in_epoch_2)
    with pytest.raises(RuntimeError, match="power cut"):
        train_pipeline(config=cfg)
    monkeypatch.setattr(ProgressReporter, "__call__", report)
    (checkpoint,) = (tmp_path / "work" / "checkpoints").glob(f"*/{CHECKPOINT_NAME}")
    truncate(checkpoint)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        summary = train_pipeline(config=cfg)
    assert summary["run_id"] == checkpoint.parent.name  # the crashed run, continued
    run = mlflow.MlflowClient(mlflow_uri).get_run(summary["run_id"])
    assert run.info.status == "FINISHED"
    (warning,) = warnings_of(caplog)
    assert str(checkpoint) in warning
