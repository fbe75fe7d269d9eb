"""An epoch sized in windows (`train.samples_per_epoch`) or as a share (`train.epoch_fraction`)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from alphaloom.model.shard_set import ShardSetInfo
from alphaloom.tasks.common.config import ConfigError, PipelineConfig
from alphaloom.tasks.training.runtime import epoch_batch_limit
from alphaloom.tasks.training.train import batches_per_epoch, train_model
from tests.helpers_train import TinyData, build_tiny_shards, tiny_config


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> TinyData:
    return build_tiny_shards(tmp_path_factory.mktemp("shards"))


def _trained_batches(tiny: TinyData, tmp_path: Path, *extra: str) -> int:
    cfg = tiny_config("train.epochs=1", *extra)
    seen: list[int] = []

    def progress(event) -> None:
        if event.phase == "batch":
            seen.append(event.batch)

    train_model(tiny.shard_dir, cfg, tmp_path / "ckpt", progress=progress)
    return max(seen)


def test_samples_per_epoch_sets_the_batches_an_epoch_trains(tiny, tmp_path) -> None:
    assert _trained_batches(tiny, tmp_path / "a") == 12  # max_batches_per_epoch
    assert _trained_batches(tiny, tmp_path / "b", "train.samples_per_epoch=300") == 3  # 128 each
    min_valid = tiny_config().loader.min_valid_days
    windows = ShardSetInfo.open(tiny.shard_dir).window_count("train", min_valid)
    expected = math.ceil(0.01 * windows / 128)
    assert 1 <= expected < 12
    assert _trained_batches(tiny, tmp_path / "c", "train.epoch_fraction=0.01") == expected


def test_the_limit_and_the_progress_bar_agree(tiny) -> None:
    info = ShardSetInfo.open(tiny.shard_dir)
    for extra, limit in (
        ((), 12),
        (("train.samples_per_epoch=129",), 2),
        (("train.samples_per_epoch=1", "train.max_batches_per_epoch=50"), 1),
        (("train.max_batches_per_epoch=null",), None),
    ):
        cfg = tiny_config(*extra)
        assert epoch_batch_limit(cfg, info) == limit
        total = math.ceil(info.window_count("train", cfg.loader.min_valid_days) / 128)
        assert batches_per_epoch(tiny.shard_dir, cfg) == min(total, limit or total)


def test_default_epoch_is_todays_and_both_sizes_cannot_be_set() -> None:
    cfg = PipelineConfig()
    assert cfg.train.samples_per_epoch is None and cfg.train.epoch_fraction is None
    assert cfg.train.max_batches_per_epoch == 240
    with pytest.raises((ConfigError, ValueError), match="not both"):
        tiny_config("train.samples_per_epoch=10", "train.epoch_fraction=0.5")
