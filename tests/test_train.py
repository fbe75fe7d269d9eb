"""Training: it learns, it resumes to identical weights, it checkpoints and logs per epoch."""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlflow
import pytest
import torch

from alphaloom.model.shard_set import ShardSetInfo
from alphaloom.tasks.common.hashing import sha256_file
from alphaloom.tasks.evaluation.evaluate import evaluate_and_log
from alphaloom.tasks.evaluation.metrics import ic_metrics
from alphaloom.tasks.evaluation.predictions import predict
from alphaloom.tasks.tracking import runs
from alphaloom.tasks.training.checkpoint import CHECKPOINT_NAME, load_checkpoint
from alphaloom.tasks.training.progress import TrainProgress
from alphaloom.tasks.training.runtime import select_device
from alphaloom.tasks.training.state import TrainState
from alphaloom.tasks.training.train import (
    TrainResult,
    _close_epoch,
    build_model,
    checkpoint_dir_for,
    train_model,
)
from tests.helpers_train import TinyData, build_tiny_shards, tiny_config


class InjectedFailure(RuntimeError):
    """Stands in for a crash (OOM, pre-emption) in the middle of an epoch."""


def fail_at(epoch: int, batch: int):
    def progress(event: TrainProgress) -> None:
        if event.phase == "batch" and (event.epoch, event.batch) == (epoch, batch):
            raise InjectedFailure(f"injected at epoch {epoch}, batch {batch}")

    return progress


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def untimed(history: list[dict[str, float]]) -> list[dict[str, float]]:
    return [{k: v for k, v in row.items() if not k.endswith("_seconds")} for row in history]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> TinyData:
    return build_tiny_shards(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="module")
def reference(tiny: TinyData, tmp_path_factory) -> TrainResult:
    """One uninterrupted run that the resume tests compare against."""
    return train_model(tiny.shard_dir, tiny.cfg, tmp_path_factory.mktemp("ref"))


def test_training_beats_an_untrained_model_on_validation_rank_ic(
    tiny: TinyData, reference: TrainResult
) -> None:
    torch.manual_seed(tiny.cfg.train.seed)
    untrained = build_model(ShardSetInfo.open(tiny.shard_dir), tiny.cfg)
    before = ic_metrics(predict(untrained, tiny.shard_dir, "valid", tiny.cfg))["rank_ic"]
    after = ic_metrics(predict(reference.model, tiny.shard_dir, "valid", tiny.cfg))["rank_ic"]
    assert after == pytest.approx(reference.best_val_rank_ic)
    assert after > before + 0.01
    assert len(reference.history) == tiny.cfg.train.epochs
    assert reference.history[reference.best_epoch]["valid/rank_ic"] == reference.best_val_rank_ic


def test_a_crash_in_epoch_two_resumes_to_identical_weights(
    tiny: TinyData, reference: TrainResult, tmp_path: Path
) -> None:
    with pytest.raises(InjectedFailure):
        train_model(tiny.shard_dir, tiny.cfg, tmp_path, progress=fail_at(epoch=1, batch=5))
    saved = load_checkpoint(tmp_path / CHECKPOINT_NAME)
    assert saved is not None and saved["state"]["epoch"] == 1 and saved["state"]["batch"] == 0
    resumed = train_model(tiny.shard_dir, tiny.cfg, tmp_path)
    assert resumed.resumed_at == (1, 0)
    assert same_weights(resumed.model, reference.model)
    assert untimed(resumed.history) == untimed(reference.history)


def test_a_mid_epoch_checkpoint_resumes_mid_epoch_to_identical_weights(
    tiny: TinyData, reference: TrainResult, tmp_path: Path
) -> None:
    cfg = tiny.cfg.model_copy(update={"train": tiny.cfg.train.model_copy()})
    cfg.train.checkpoint_every_batches = 4
    with pytest.raises(InjectedFailure):
        train_model(tiny.shard_dir, cfg, tmp_path, progress=fail_at(epoch=1, batch=6))
    resumed = train_model(tiny.shard_dir, cfg, tmp_path)
    assert resumed.resumed_at == (1, 4)
    assert same_weights(resumed.model, reference.model)


def test_a_finished_checkpoint_returns_without_training(tiny: TinyData, tmp_path: Path) -> None:
    cfg = tiny_config("train.epochs=1", "train.max_batches_per_epoch=3")
    first = train_model(tiny.shard_dir, cfg, tmp_path)
    events: list[TrainProgress] = []
    again = train_model(tiny.shard_dir, cfg, tmp_path, progress=events.append)
    assert events == []
    assert same_weights(first.model, again.model)
    best = torch.load(again.model_state_path, weights_only=True)
    assert all(torch.equal(best[k], v) for k, v in again.model.state_dict().items())


def test_a_checkpoint_for_other_settings_is_not_resumed(tiny: TinyData, tmp_path: Path) -> None:
    cfg = tiny_config("train.epochs=1", "train.max_batches_per_epoch=2")
    train_model(tiny.shard_dir, cfg, tmp_path)
    other = tiny_config("train.epochs=1", "train.max_batches_per_epoch=2", "train.lr=0.01")
    result = train_model(tiny.shard_dir, other, tmp_path)
    assert result.resumed_at is None
    assert result.history[0]["lr"] == pytest.approx(0.01)


def test_epoch_metrics_reach_mlflow_with_the_epoch_as_step(
    tiny: TinyData, tmp_path: Path, mlflow_uri: str
) -> None:
    cfg = tiny_config("train.epochs=2", "train.max_batches_per_epoch=2", f"work_dir={tmp_path}")
    cfg.tracking.tracking_uri = mlflow_uri
    events: list[TrainProgress] = []
    with runs.tracked_run(cfg, runs.run_tags(tiny.shard_dir)) as run_id:
        runs.TrackedRun.of(cfg, run_id).log_shard_dataset(tiny.shard_dir)
        ckpt = checkpoint_dir_for(cfg, run_id)
        result = train_model(tiny.shard_dir, cfg, ckpt, run_id=run_id, progress=events.append)
    client = mlflow.MlflowClient(mlflow_uri)
    tags = client.get_run(run_id).data.tags
    assert tags[runs.TAG_DATA_HASH] == "tiny"  # the source hash the shards were built with
    assert tags[runs.TAG_CODE_VERSION] == runs.model_code_version()
    assert (ckpt / CHECKPOINT_NAME).is_file() and run_id in str(ckpt)
    (dataset_input,) = client.get_run(run_id).inputs.dataset_inputs
    assert dataset_input.dataset.digest == sha256_file(tiny.shard_dir / "manifest.json")[:20]
    assert json.loads(dataset_input.dataset.schema)["mlflow_colspec"][0]["name"] == "KMID"
    for key in ("train/loss", "train/focal", "train/distance", "valid/ic", "valid/rank_ic", "lr"):
        history = client.get_metric_history(run_id, key)
        assert sorted(m.step for m in history) == [0, 1], key
        by_step = {m.step: m.value for m in history}
        for epoch, row in enumerate(result.history):
            assert by_step[epoch] == pytest.approx(row[key]), key
    assert [e.epoch for e in events if e.phase == "epoch"] == [0, 1]
    assert sum(e.phase == "batch" for e in events) == 4


def test_early_stopping_keeps_the_best_epoch() -> None:
    cfg = tiny_config("train.epochs=10", "train.patience=2")
    model = torch.nn.Linear(2, 1)
    state = TrainState()
    terms = {"loss": 1.0, "focal": 1.0, "distance": 0.0, "rank": 0.0}
    for score in (0.02, 0.05, 0.04, math.nan):
        with torch.no_grad():
            model.weight.fill_(score if math.isfinite(score) else -1.0)
        _close_epoch(state, terms, {"ic": score, "rank_ic": score}, 1e-3, model, cfg)
    assert state.finished
    assert state.best_epoch == 1 and state.best_score == 0.05
    assert torch.all(state.best_state["weight"] == 0.05)


def test_device_selection() -> None:
    assert select_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else None
    if expected is None:
        assert select_device("auto").type in ("cpu", "mps")
        with pytest.raises(RuntimeError, match=r"train\.device"):
            select_device("cuda")


def test_evaluation_of_the_trained_model_is_logged_per_split(
    tiny: TinyData, reference: TrainResult, mlflow_uri: str
) -> None:
    cfg = tiny.cfg.model_copy(update={"tracking": tiny.cfg.tracking.model_copy()})
    cfg.tracking.tracking_uri = mlflow_uri
    with runs.tracked_run(cfg) as run_id:
        flat = evaluate_and_log(reference.model, tiny.shard_dir, cfg, run_id, oracle=tiny.oracle)
    run = mlflow.MlflowClient(mlflow_uri).get_run(run_id)
    for split in ("valid", "test"):
        for key in (
            "ic",
            "rank_ic",
            "icir",
            "rank_icir",
            "accuracy",
            "macro_f1",
            "ls_ann_return",
            "ls_sharpe",
            "max_drawdown",
            "oracle_ic",
            "oracle_rank_ic",
            "rank_ic_vs_oracle",
        ):
            assert run.data.metrics[f"{split}/{key}"] == pytest.approx(flat[f"{split}/{key}"])
    assert flat["valid/rank_ic"] == pytest.approx(reference.best_val_rank_ic)
    assert flat["test/oracle_rank_ic"] > flat["test/rank_ic"]  # the oracle knows the truth
    plots = mlflow.MlflowClient(mlflow_uri).list_artifacts(run_id, "plots/test")
    assert {Path(p.path).name for p in plots} >= {"long_short_cumulative.png", "calibration.png"}
