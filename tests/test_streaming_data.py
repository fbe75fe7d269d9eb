"""The data stages in bounded memory give the tables and shard sets of the one-shot builds.

`write_feature_table` builds the feature table chunk by chunk (tasks/data/feature_chunks.py) and
`build_shard_set` cuts shards from batches of the saved table (tasks/dataset/shard_fanout.py);
these tests make the chunks and batches tiny so that every boundary is crossed, and compare with
`build_feature_table` / `build_shards_from`, which hold everything in memory.
"""

from __future__ import annotations

import itertools
import json

import numpy as np
import pandas as pd
import pytest

from alphaloom.tasks.common.config import load_config
from alphaloom.tasks.common.hashing import sha256_file
from alphaloom.tasks.common.storage import FsPath
from alphaloom.tasks.data.alpha158 import compute_alpha158
from alphaloom.tasks.data.feature_chunks import chunk_bounds
from alphaloom.tasks.data.features import (
    PartitionError,
    build_feature_table,
    load_feature_table,
    write_feature_table,
)
from alphaloom.tasks.data.partitions import group_symbols
from alphaloom.tasks.data.synthetic import generate_market

FACTORS = ["KMID", "ROC5", "MA10", "STD20", "CORR10", "RANK5", "IMAX10", "VSUMP5"]


@pytest.fixture(scope="module")
def cfg():
    return load_config(
        None,
        [
            "data.synthetic.n_symbols=24",
            "data.synthetic.n_days=260",
            f"features.factors={json.dumps(FACTORS)}",
        ],
    )


@pytest.fixture(scope="module")
def bars(cfg) -> pd.DataFrame:
    bars = generate_market(cfg.data.synthetic).bars
    # ragged histories: some symbols start late, so chunks hold unequal row counts
    late = bars["symbol"].isin(sorted(bars["symbol"].unique())[::5])
    return bars[~late | (bars["date"] > bars["date"].min() + pd.Timedelta(days=90))]


def _same(table, out) -> None:
    back = load_feature_table(out)
    pd.testing.assert_frame_equal(back.frame, table.frame.reset_index(drop=True), check_exact=True)
    assert back.stats == table.stats
    assert back.split_dates == table.split_dates
    assert back.calendar == table.calendar
    assert back.feature_names == table.feature_names


@pytest.mark.parametrize("chunk_rows", [1, 700, 2000, 10**9])
def test_feature_table_in_chunks_is_the_one_shot_table(cfg, bars, tmp_path, chunk_rows) -> None:
    one_shot = build_feature_table(bars, cfg.features)
    out = write_feature_table(bars.sample(frac=1.0, random_state=1), cfg.features,
                              tmp_path / "t", chunk_rows=chunk_rows)  # fmt: skip
    _same(one_shot, out)


def test_feature_table_from_partition_files_in_chunks(cfg, bars, tmp_path) -> None:
    names = FACTORS
    parts = []
    for number, symbols in enumerate(group_symbols(bars["symbol"].unique().tolist(), 3)):
        rows = bars[bars["symbol"].isin(symbols)].sort_values(["symbol", "date"])
        path = tmp_path / f"raw-{number}.parquet"
        compute_alpha158(rows, names).to_parquet(path, index=False)
        parts.append(str(path))
    out = write_feature_table(bars, cfg.features, tmp_path / "t", parts[::-1], chunk_rows=900)
    _same(build_feature_table(bars, cfg.features), out)
    with pytest.raises(PartitionError, match="no partition holds"):
        write_feature_table(bars, cfg.features, tmp_path / "u", parts[:2], chunk_rows=900)


def test_chunk_bounds_cut_at_symbols_within_the_limit() -> None:
    symbols = pd.Series(np.repeat(["a", "b", "c", "d", "e"], [3, 5, 2, 9, 1]))
    bounds = chunk_bounds(symbols, 6)
    assert bounds == [(0, 3), (3, 8), (8, 10), (10, 19), (19, 20)]  # d (9 rows) alone
    assert bounds[0][0] == 0 and bounds[-1][1] == len(symbols)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
    starts = {0, 3, 8, 10, 19, 20}
    for begin, stop in bounds:
        assert begin in starts and stop in starts
        one_symbol = len(set(symbols[begin:stop])) == 1
        assert stop - begin <= 6 or one_symbol
    assert chunk_bounds(symbols, 100) == [(0, 20)]
    assert len(chunk_bounds(symbols, 1)) == 5


def test_streamed_shard_set_is_the_in_memory_set_file_for_file(tmp_path) -> None:
    """The shards stage (`run_shards_stage`, batches of the saved table) writes the files that
    `build_shards_from` writes from the table in memory."""
    from alphaloom.tasks.data.features import features_task
    from alphaloom.tasks.data.ingest import ingest_task, load_saved_market
    from alphaloom.tasks.dataset import shard_fanout
    from alphaloom.tasks.dataset.shards import build_shards_from, shards_location
    from alphaloom.tasks.dataset.text import load_text_vectors, text_task

    cfg = load_config(
        None,
        [
            f"work_dir={tmp_path / 'work'}",
            "data.synthetic.n_symbols=20",
            "data.synthetic.n_days=200",
            f"features.factors={json.dumps(FACTORS)}",
            "text.enabled=false",
            "shards.n_shards=3",
        ],
    )
    market = ingest_task.reuse_or_build(cfg)
    features = features_task.reuse_or_build(market, cfg)
    text = text_task.reuse_or_build(market, cfg)
    ref = shards_location(features, text, market, cfg)
    shard_fanout.build_shard_set(features, text, market, cfg, batch_rows=333)
    in_memory = build_shards_from(
        load_feature_table(features.path),
        load_saved_market(market.dir).instruments,
        load_text_vectors(text.dir),
        cfg.shards,
        tmp_path / "memory",
        json.loads(market.file("meta.json").read_text())["source_hash"],
        key=ref.key,
    )
    streamed = FsPath.of(ref.path).local
    names = sorted(p.name for p in streamed.iterdir() if p.name.endswith((".parquet", ".npy")))
    assert any(n.startswith("shard-") for n in names)
    assert names == sorted(
        p.name for p in in_memory.iterdir() if p.name.endswith((".parquet", ".npy"))
    )
    for name in names:
        assert sha256_file(streamed / name) == sha256_file(in_memory / name), name
    a, b = (json.loads((d / "manifest.json").read_text()) for d in (streamed, in_memory))
    a.pop("created", None), b.pop("created", None)
    assert a == b
