"""Inputs and shard sets at fsspec URLs (memory://, file://): same data as from a local path."""

from __future__ import annotations

from pathlib import Path

import fsspec
import pandas as pd
import pytest
import torch

from alphaloom.filesystems import arrow_filesystem
from alphaloom.model.dataset import ShardedWindowDataset
from alphaloom.model.shard_format import ShardSetError
from alphaloom.model.shard_set import ShardSetInfo
from alphaloom.tasks.common.config import DataSection, load_config
from alphaloom.tasks.common.storage import FsPath
from alphaloom.tasks.data.checks import DataValidationError
from alphaloom.tasks.data.ingest import load_market, run_ingest_stage, source_fingerprint
from alphaloom.tasks.data.readers import bar_files
from alphaloom.tasks.data.synthetic import generate_market
from tests.helpers_train import build_tiny_shards

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def local_files(tmp_path_factory) -> Path:
    """A small market as one CSV per symbol plus instruments.csv (the user-file layout)."""
    cfg = load_config(REPO / "configs" / "smoke.yaml", ["data.synthetic.n_symbols=12"])
    market = generate_market(cfg.data.synthetic)
    out = tmp_path_factory.mktemp("bars")
    for symbol, rows in market.bars.groupby("symbol"):
        rows.drop(columns="symbol").to_csv(out / f"{symbol}.csv", index=False)
    market.instruments.to_csv(out / "instruments.csv", index=False)
    return out


def upload(local: Path, url: str) -> None:
    fs, root = fsspec.core.url_to_fs(url)
    for path in sorted(local.iterdir()):
        fs.put_file(str(path), f"{root}/{path.name}")


def test_bars_and_instruments_read_from_a_memory_url_equal_the_local_read(
    local_files: Path, memory_root: str
) -> None:
    upload(local_files, memory_root)
    remote = DataSection(source="files", bars_path=memory_root)
    local = DataSection(source="files", bars_path=str(local_files))
    files = bar_files(memory_root)
    assert all(str(f).startswith("memory://") for f in files) and len(files) == 12
    got, expected = load_market(remote, 30), load_market(local, 30)
    pd.testing.assert_frame_equal(got.bars, expected.bars, check_exact=True)
    pd.testing.assert_frame_equal(got.instruments, expected.instruments)
    assert (got.instruments["industry"] != "").all()  # the companion instruments.csv was found
    # Same names and bytes, same cache key: moving the data does not rebuild anything.
    assert source_fingerprint(remote) == source_fingerprint(local)


def test_a_file_url_is_a_local_path(local_files: Path, tmp_path: Path) -> None:
    url = (local_files / "instruments.csv").as_uri()
    assert url.startswith("file:///")
    assert FsPath.of(url).local_or_url == local_files / "instruments.csv"
    cfg = load_config(
        REPO / "configs" / "smoke.yaml",
        [
            "data.source=files",
            f"data.bars_path={local_files.as_uri()}",
            f"data.instruments_path={url}",
            f"work_dir={tmp_path}",
        ],
    )
    market = run_ingest_stage(cfg)
    bars = pd.read_parquet(market.dir / "bars.parquet")
    assert bars["symbol"].nunique() == 12


def test_a_missing_or_unknown_url_is_an_error_that_names_it(memory_root: str) -> None:
    missing = f"{memory_root}/nothing-here"
    with pytest.raises(DataValidationError, match="nothing-here: no such file"):
        load_market(DataSection(source="files", bars_path=missing), 30)
    with pytest.raises(ValueError, match="nosuchscheme://x"):
        bar_files("nosuchscheme://x/bars")


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory) -> Path:
    return build_tiny_shards(tmp_path_factory.mktemp("shards")).shard_dir


def batches(dataset: ShardedWindowDataset) -> list[dict[str, torch.Tensor]]:
    dataset.set_epoch(1)
    return list(dataset)


def same_batches(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
        for x, y in zip(a, b, strict=True)
    )


def loader(shards: str | Path | ShardSetInfo) -> ShardedWindowDataset:
    return ShardedWindowDataset(shards, "train", batch_size=64, pool_shards=2, min_valid_days=10)


def test_the_loader_reads_a_shard_set_from_a_memory_url(tiny_shards: Path, memory_root: str):
    upload(tiny_shards, memory_root)
    filesystem, path = arrow_filesystem(memory_root)
    remote = ShardSetInfo.open(path, filesystem=filesystem)
    assert remote.filesystem is filesystem
    assert same_batches(batches(loader(remote)), batches(loader(tiny_shards)))


def test_the_loader_reads_a_shard_set_from_a_file_url(tiny_shards: Path) -> None:
    assert same_batches(batches(loader(tiny_shards.as_uri())), batches(loader(tiny_shards)))


def test_a_corrupt_remote_shard_is_caught_by_its_checksum(tiny_shards: Path, memory_root: str):
    upload(tiny_shards, memory_root)
    fs, root = fsspec.core.url_to_fs(memory_root)
    victim = f"{root}/{ShardSetInfo.open(tiny_shards).shards[0].file}"
    fs.pipe_file(victim, fs.cat_file(victim)[:-100])
    filesystem, path = arrow_filesystem(memory_root)
    with pytest.raises(ShardSetError, match="corrupt or truncated"):
        batches(loader(ShardSetInfo.open(path, filesystem=filesystem)))
    with pytest.raises(ShardSetError, match="corrupt or truncated"):
        batches(loader(memory_root))  # the URL alone: fsspec's memory filesystem, wrapped
    with pytest.raises(ShardSetError, match="no filesystem for this URL"):
        ShardSetInfo.open("nosuchscheme://bucket/shards")
