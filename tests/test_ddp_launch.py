"""`torchrun -m alphaloom.tasks.training.distributed` as the launcher runs it: 2 gloo ranks,
rank-0-only MLflow."""

from __future__ import annotations

from pathlib import Path

import pytest
from torch import nn

from alphaloom.flows.cli import build_parser
from alphaloom.tasks.training.distributed import (
    CONFIG_NAME,
    DistributedLaunchError,
    launch_training,
    load_result,
)
from tests.helpers_train import TinyData, build_tiny_shards, tiny_config

OVERRIDES = ("model.mlp_dropout=0.0", "train.epochs=2", "train.max_batches_per_epoch=2")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> TinyData:
    return build_tiny_shards(tmp_path_factory.mktemp("shards"), *OVERRIDES)


def test_torchrun_launch_logs_each_epoch_once_and_returns_the_best_model(
    tiny: TinyData, tmp_path: Path, mlflow_uri: str
) -> None:
    import mlflow

    from alphaloom.tasks.tracking import runs

    cfg = tiny_config(*OVERRIDES, f"work_dir={tmp_path}")
    cfg.tracking.tracking_uri = mlflow_uri
    run_id = runs.start_run(cfg)
    ckpt = tmp_path / "ckpt"
    result = launch_training(str(tiny.shard_dir), cfg, str(ckpt), run_id, nproc_per_node=2)
    runs.TrackedRun.of(cfg, run_id).end(failed=False)
    history = mlflow.MlflowClient(mlflow_uri).get_metric_history(run_id, "valid/rank_ic")
    assert sorted(m.step for m in history) == [0, 1]  # once per epoch: rank 0 only
    assert len(result.history) == 2
    best = result.history[result.best_epoch]["valid/rank_ic"]
    assert result.best_val_rank_ic == pytest.approx(best)
    assert isinstance(result.model, nn.Module) and not result.model.training
    assert (ckpt / CONFIG_NAME).read_text() == cfg.to_yaml()  # every rank read these settings


def test_cli_has_a_train_ddp_command() -> None:
    args = build_parser().parse_args(["train-ddp", "--nproc-per-node", "3", "--backend", "gloo"])
    assert (args.command, args.nproc_per_node, args.backend) == ("train-ddp", 3, "gloo")


def test_a_job_whose_rank_zero_did_not_finish_is_an_error(tiny: TinyData, tmp_path: Path) -> None:
    with pytest.raises(DistributedLaunchError, match="rank 0 did not finish"):
        load_result(str(tiny.shard_dir), tiny.cfg, tmp_path)
