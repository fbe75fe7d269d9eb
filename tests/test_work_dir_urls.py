"""Outputs at fsspec URLs: stages, checkpoints and scores written to `work_dir=memory://...`.

The memory filesystem stands in for an object store: no directory rename, files only. What is
checked is what a user of s3:// relies on: the same content as a local run, a completion marker
written last, nothing that looks complete after a failure, and verified reads.
"""

from __future__ import annotations

import json
from pathlib import Path

import fsspec
import pandas as pd
import pytest
import torch

from alphaloom.model.shard_set import ShardSetInfo
from alphaloom.tasks.common import storage
from alphaloom.tasks.common.storage import COMPLETE_MARKER, atomic_dir, local_copy, output_complete
from alphaloom.tasks.data.features import load_feature_table, run_features_stage
from alphaloom.tasks.data.ingest import load_saved_market, run_ingest_stage
from alphaloom.tasks.dataset.shards import run_shards_stage
from alphaloom.tasks.dataset.text import run_text_stage
from alphaloom.tasks.training.checkpoint import CHECKPOINT_NAME, load_weights
from alphaloom.tasks.training.train import train_model
from tests.helpers_train import tiny_config

SMALL = ["data.synthetic.n_symbols=16", "data.synthetic.n_days=300", "text.enabled=false"]


@pytest.fixture(autouse=True)
def local_cache(tmp_path, monkeypatch) -> Path:
    """Local copies of URL outputs go to a per-test cache, not ~/.cache."""
    cache = tmp_path / "cache"
    monkeypatch.setenv(storage.CACHE_DIR_ENV, str(cache))
    return cache


def files_under(url: str) -> list[str]:
    fs, root = fsspec.core.url_to_fs(url)
    return sorted(path[len(root) :] for path in fs.find(root)) if fs.exists(root) else []


def data_stages(work_dir: str | Path):
    cfg = tiny_config(f"work_dir={work_dir}", *SMALL)
    market = run_ingest_stage(cfg)
    features = run_features_stage(market, cfg)
    text = run_text_stage(market, cfg)
    shards = run_shards_stage(features, text, market, cfg)
    return cfg, market, features, text, shards


@pytest.fixture
def both_runs(memory_root, tmp_path):
    """The data stages once into a local work_dir and once into a memory:// work_dir."""
    return data_stages(tmp_path / "work"), data_stages(memory_root)


def test_data_stages_at_a_url_match_a_local_run(both_runs, memory_root, tmp_path) -> None:
    local, remote = both_runs
    for local_ref, remote_ref in zip(local[1:], remote[1:], strict=True):
        assert local_ref.key == remote_ref.key  # same content key: the location is not in it
        assert remote_ref.path == f"{memory_root}/{remote_ref.stage}/{remote_ref.key}"
        assert output_complete(remote_ref.path)
    pd.testing.assert_frame_equal(
        load_feature_table(local[2].dir).frame, load_feature_table(remote[2].dir).frame
    )
    local_manifest = json.loads((local[4].dir / "manifest.json").read_text())
    remote_manifest = json.loads(remote[4].file("manifest.json").read_text())
    assert [s["sha256"] for s in local_manifest["shards"]] == [
        s["sha256"] for s in remote_manifest["shards"]
    ]
    # the loader reads the URL shard set directly, and the windows are the same
    assert ShardSetInfo.open(remote[4].path).window_count("train", 10) == ShardSetInfo.open(
        local[4].path
    ).window_count("train", 10)
    # nothing was written to a local work_dir for the URL run
    assert not Path("outputs", "shards", remote[4].key).exists()


def test_every_url_output_has_its_marker_last_and_lists_its_files(both_runs) -> None:
    _, remote = both_runs
    for ref in remote[1:]:
        marker = json.loads(ref.file(COMPLETE_MARKER).read_text())
        listed = {f"/{name}" for name in marker["files"]}
        present = {p for p in files_under(ref.path) if not p.endswith(COMPLETE_MARKER)}
        assert listed == present and listed


def test_a_rerun_reuses_the_url_outputs_without_rewriting(both_runs, memory_root) -> None:
    _, remote = both_runs
    fs, _ = fsspec.core.url_to_fs(memory_root)
    before = {p: fs.info(f"{memory_root}{p}")["created"] for p in files_under(memory_root)}
    again = data_stages(memory_root)
    assert [ref.path for ref in again[1:]] == [ref.path for ref in remote[1:]]
    after = {p: fs.info(f"{memory_root}{p}")["created"] for p in files_under(memory_root)}
    assert after == before


def test_a_failed_block_leaves_nothing_at_the_url(memory_root) -> None:
    target = f"{memory_root}/features/abc"
    with pytest.raises(RuntimeError, match="boom"), atomic_dir(target) as tmp:
        (tmp / "features.parquet").write_bytes(b"half")
        raise RuntimeError("boom")
    assert not output_complete(target) and files_under(target) == []


def test_a_failed_upload_removes_what_it_uploaded(memory_root, monkeypatch) -> None:
    target = f"{memory_root}/shards/abc"
    memory = fsspec.filesystem("memory")
    real_put = memory.put_file
    calls = []

    def failing_put(lpath, rpath, **kwargs):
        calls.append(rpath)
        if len(calls) == 2:
            raise OSError("connection reset")
        return real_put(lpath, rpath, **kwargs)

    monkeypatch.setattr(memory, "put_file", failing_put)
    with pytest.raises(OSError, match="connection reset"), atomic_dir(target) as tmp:
        for name in ("a.parquet", "b.parquet", "c.parquet"):
            (tmp / name).write_bytes(name.encode())
    assert len(calls) == 2
    assert not output_complete(target) and files_under(target) == []


def test_metadata_goes_up_after_the_data_and_the_marker_last(memory_root, monkeypatch) -> None:
    memory = fsspec.filesystem("memory")
    order: list[str] = []
    real_put, real_pipe = memory.put_file, memory.pipe_file

    def put(lpath: str, rpath: str, **kwargs) -> None:
        order.append(rpath)
        real_put(lpath, rpath)

    def pipe(rpath: str, value: bytes, **kwargs) -> None:
        order.append(rpath)
        real_pipe(rpath, value)

    monkeypatch.setattr(memory, "put_file", put)
    monkeypatch.setattr(memory, "pipe_file", pipe)
    with atomic_dir(f"{memory_root}/shards/abc") as tmp:
        for name in ("manifest.json", "shard-00000.parquet", "text.npy", "zz.parquet"):
            (tmp / name).write_bytes(name.encode())
    names = [path.rsplit("/", 1)[-1] for path in order]
    assert names[-2:] == ["manifest.json", COMPLETE_MARKER]


def test_a_writer_that_fails_after_another_completed_leaves_the_output(
    memory_root, monkeypatch
) -> None:
    target = f"{memory_root}/features/abc"
    memory = fsspec.filesystem("memory")
    real_put = memory.put_file

    def other_writer_finishes_then_we_fail(lpath, rpath, **kwargs):
        real_put(lpath, rpath)
        storage.mark_complete(target, {"a.parquet": "x"})  # the winner's marker
        raise OSError("connection reset")

    monkeypatch.setattr(memory, "put_file", other_writer_finishes_then_we_fail)
    with pytest.raises(OSError, match="connection reset"), atomic_dir(target) as tmp:
        (tmp / "a.parquet").write_bytes(b"a")
    assert output_complete(target)
    assert set(files_under(target)) == {"/a.parquet", f"/{COMPLETE_MARKER}"}


def test_an_output_without_its_marker_is_rebuilt(memory_root) -> None:
    cfg, market, features, _, _ = data_stages(memory_root)
    fs, inner = fsspec.core.url_to_fs(features.path)
    fs.rm_file(f"{inner}/{COMPLETE_MARKER}")  # as if the upload had died before the marker
    fs.pipe_file(f"{inner}/features.parquet", b"truncated")
    rebuilt = run_features_stage(market, cfg)
    assert output_complete(rebuilt.path)
    assert len(load_feature_table(rebuilt.dir).frame) > 0


def test_a_corrupt_url_output_is_caught_when_copied(memory_root) -> None:
    market = run_ingest_stage(tiny_config(f"work_dir={memory_root}", *SMALL))  # no copy yet
    fs, inner = fsspec.core.url_to_fs(market.path)
    fs.pipe_file(f"{inner}/bars.parquet", fs.cat_file(f"{inner}/bars.parquet")[:-10])
    with pytest.raises(storage.StorageError, match=r"bars\.parquet: checksum does not match"):
        local_copy(market.path)


def test_local_copy_is_reused_and_refreshed_when_the_marker_changes(memory_root) -> None:
    _, market, _, _, _ = data_stages(memory_root)
    first = local_copy(market.path)
    stamp = (first / "bars.parquet").stat().st_mtime_ns
    assert local_copy(market.path) == first
    assert (first / "bars.parquet").stat().st_mtime_ns == stamp
    pd.testing.assert_frame_equal(
        load_saved_market(market.path).bars, pd.read_parquet(first / "bars.parquet")
    )


def test_training_checkpoints_at_a_url_and_returns_the_finished_run(memory_root) -> None:
    cfg, _, _, _, shards = data_stages(memory_root)
    cfg.train.epochs, cfg.train.max_batches_per_epoch = 1, 3
    checkpoint_dir = f"{memory_root}/checkpoints/run-1"
    first = train_model(shards.path, cfg, checkpoint_dir)
    assert storage.FsPath.of(f"{checkpoint_dir}/{CHECKPOINT_NAME}").is_file()
    again = train_model(shards.path, cfg, checkpoint_dir)  # finished: nothing left to train
    assert again.resumed_at == (1, 0)
    assert again.best_epoch == first.best_epoch
    for name, tensor in first.model.state_dict().items():
        assert torch.equal(tensor, again.model.state_dict()[name]), name
    best = load_weights(first.model_state_path)  # the best weights, read back from the URL
    assert str(first.model_state_path).startswith(checkpoint_dir)
    assert all(torch.equal(best[k], v) for k, v in again.model.state_dict().items())


def test_a_memory_work_dir_with_a_process_runner_is_a_config_error() -> None:
    from alphaloom.tasks.common.config import ConfigError

    with pytest.raises(ConfigError, match=r"memory.*runner\.kind=thread"):
        tiny_config("work_dir=memory:///x", "runner.kind=process", "runner.partitions=2")
    assert tiny_config("work_dir=memory:///x", "runner.partitions=2").runner.kind == "thread"
