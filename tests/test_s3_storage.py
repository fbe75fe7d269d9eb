"""work_dir at s3:// against a real S3 API: moto's server on 127.0.0.1, reached through s3fs
(uploads, markers, local copies) and pyarrow's own S3 filesystem (the loader), as on AWS."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator

import fsspec
import pytest

from alphaloom.model.shard_set import ShardSetInfo
from alphaloom.tasks.common import storage
from alphaloom.tasks.data.features import run_features_stage
from alphaloom.tasks.data.ingest import run_ingest_stage
from alphaloom.tasks.dataset.shards import run_shards_stage
from alphaloom.tasks.dataset.text import run_text_stage
from alphaloom.tasks.training.checkpoint import CHECKPOINT_NAME, load_weights
from alphaloom.tasks.training.distributed import free_port
from alphaloom.tasks.training.train import train_model
from tests.helpers_train import tiny_config

SMALL = ["data.synthetic.n_symbols=16", "data.synthetic.n_days=300", "text.enabled=false"]
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "test",
    "AWS_SECRET_ACCESS_KEY": "test",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server on a free localhost port; AWS_ENDPOINT_URL points both clients at it."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    saved = {key: os.environ.get(key) for key in [*AWS_ENV, "AWS_ENDPOINT_URL"]}
    os.environ.update({**AWS_ENV, "AWS_ENDPOINT_URL": url})
    try:
        deadline = time.monotonic() + 120
        while True:
            if server.poll() is not None:
                pytest.fail(f"moto server exited with {server.returncode}")
            try:
                urllib.request.urlopen(f"{url}/moto-api/", timeout=2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail("moto server did not answer in 120 s")
                time.sleep(0.3)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def bucket(s3_endpoint, tmp_path, monkeypatch) -> str:
    monkeypatch.setenv(storage.CACHE_DIR_ENV, str(tmp_path / "cache"))
    name = f"alphaloom-{uuid.uuid4().hex[:8]}"
    fsspec.filesystem("s3", skip_instance_cache=True).mkdir(name)
    return f"s3://{name}"


def test_stages_and_training_with_work_dir_in_an_s3_bucket(bucket, tmp_path) -> None:
    remote_cfg = tiny_config(f"work_dir={bucket}/work", *SMALL, "train.epochs=1")
    remote_cfg.train.max_batches_per_epoch = 3
    market = run_ingest_stage(remote_cfg)
    features = run_features_stage(market, remote_cfg)
    text = run_text_stage(market, remote_cfg)
    shards = run_shards_stage(features, text, market, remote_cfg)
    local_cfg = tiny_config(f"work_dir={tmp_path / 'work'}", *SMALL)
    local_market = run_ingest_stage(local_cfg)
    local = run_shards_stage(
        run_features_stage(local_market, local_cfg),
        run_text_stage(local_market, local_cfg),
        local_market,
        local_cfg,
    )

    s3 = fsspec.filesystem("s3", skip_instance_cache=True)
    for ref in (market, features, text, shards):
        assert ref.path.startswith(f"{bucket}/work/{ref.stage}/")
        assert s3.isfile(f"{ref.path}/{storage.COMPLETE_MARKER}")
    assert shards.key == local.key
    remote_info, local_info = ShardSetInfo.open(shards.path), ShardSetInfo.open(local.path)
    assert type(remote_info.filesystem).__name__ == "S3FileSystem"  # pyarrow's own client
    assert [s.sha256 for s in remote_info.shards] == [s.sha256 for s in local_info.shards]

    checkpoints = f"{bucket}/work/checkpoints/run-1"
    result = train_model(shards.path, remote_cfg, checkpoints)
    assert s3.isfile(f"{checkpoints}/{CHECKPOINT_NAME}")
    weights = load_weights(result.model_state_path)
    assert set(weights) == set(result.model.state_dict())
    assert train_model(shards.path, remote_cfg, checkpoints).resumed_at == (1, 0)


def test_a_ddp_launch_keeps_its_config_checkpoint_and_result_in_the_bucket(
    bucket, tmp_path
) -> None:
    from alphaloom.tasks.training.distributed import CONFIG_NAME, RESULT_NAME, launch_training
    from tests.helpers_train import build_tiny_shards

    overrides = ("model.mlp_dropout=0.0", "train.epochs=1", "train.max_batches_per_epoch=2")
    tiny = build_tiny_shards(tmp_path / "shards", *overrides)
    checkpoints = f"{bucket}/checkpoints/ddp-run"
    result = launch_training(str(tiny.shard_dir), tiny.cfg, checkpoints, nproc_per_node=2)
    s3 = fsspec.filesystem("s3", skip_instance_cache=True)
    assert storage.FsPath.of(f"{checkpoints}/{CONFIG_NAME}").read_text() == tiny.cfg.to_yaml()
    assert s3.isfile(f"{checkpoints}/{CHECKPOINT_NAME}")
    assert s3.isfile(f"{checkpoints}/{RESULT_NAME}")
    assert len(result.history) == 1 and not result.model.training
