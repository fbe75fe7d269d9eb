"""Training progress: batches are counted as reported and each epoch is logged."""

from __future__ import annotations

import logging

from alphaloom.tasks.training.progress import ProgressReporter, TrainProgress


def test_reporter_counts_batches_and_logs_epochs(caplog) -> None:
    reporter = ProgressReporter(epochs=2, batches_per_epoch=30, artifact=False)
    with caplog.at_level(logging.INFO, logger="alphaloom.tasks.training.progress"):
        for done in (10, 20, 30):
            reporter(TrainProgress("batch", 0, 2, done, {"loss": 0.7}))
        assert reporter.batches_done == 30
        reporter(TrainProgress("epoch", 0, 2, -1, {"train/loss": 0.7, "valid/rank_ic": 0.05}))
    assert reporter.batches_done == 0  # reset for the next epoch
    assert "epoch 1/2" in caplog.text and "0.0500" in caplog.text
    reporter.close()
