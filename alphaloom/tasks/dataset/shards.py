"""Write the normalised feature table as a content-addressed, checksummed set of parquet shards.

Why shards: training must not need the whole data set in memory. Each shard holds the whole
histories of a seeded random, size-balanced subset of symbols, sorted by (symbol, date), so every
T-day window lies inside one shard and the loader (model/dataset.py) can shuffle pool by pool.

Layout of `<root>/<key>/` (the key hashes the feature table, instruments, text vectors, the
`shards` config section and the code version; see `shard_set_key`):

* `shard-NNNNN.parquet`: one row per trading day of each symbol from its first bar to its
  last; columns `symbol` (int32 id), `date` (int32 days since 1970-01-01), `split`, `label`
  (int8), `fwd_return` (float32), `industry`, `index` (int32 ids of the instrument row valid on
  the date), `text_row` (int32 row of text.npy, -1 none), `bar` (int8: 0 on a day the symbol
  has no bar, whose factors are zeros) and `x`, the F factors of a row as one fixed-size binary
  value (little-endian float32; measured faster to read than a FixedSizeList or F columns, see
  alphaloom.model.shard_format.encode_x).
* `symbols.parquet`: symbol id -> symbol name and its latest industry id, index id, text row,
  has_text.
* `names.parquet`: (kind, id, name) for industries (0 = unknown) and indices (0 = none).
* `texts.parquet`: text row -> symbol id, start date ("" undated), has_text.
* `text.npy`: [n_text_rows, text_dim] float32 description vectors; undated instruments have one
  text row per symbol, its id.
* `manifest.json`, written last: schema version, feature names, window, split dates, per shard
  its file, rows, bars, sha256, symbols and window counts, normalisation statistics, each
  split's label coverage, source hash, code version and the sizes the network needs.

The directory is written through tasks.common.storage.atomic_dir: a crash leaves no complete-looking
set, and two writers of the same set cannot corrupt each other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd

from alphaloom.model.dataset import ShardedWindowDataset
from alphaloom.model.device_loader import WindowLoader
from alphaloom.model.shard_format import SPLIT_CODES
from alphaloom.tasks.common.config import LoaderSection, PipelineConfig, ShardsSection
from alphaloom.tasks.common.storage import FsPath, Location, atomic_dir
from alphaloom.tasks.dataset.feature_rows import FeatureRows
from alphaloom.tasks.dataset.row_layout import InstrumentLayout, TextLike, label_coverage
from alphaloom.tasks.dataset.shard_writer import (
    ManifestInfo,
    plan_shards,
    shard_file,
    shard_set_key,
    shards_location,
    write_feature_shard,
    write_manifest,
    write_side_tables,
)
from alphaloom.tasks.orchestration.caching import StageRef, stage_task


class FeatureTableLike(Protocol):
    """What tasks/data/features.py's FeatureTable provides."""

    frame: pd.DataFrame
    feature_names: list[str]
    stats: dict[str, Any]
    split_dates: dict[str, Any]


def build_shards(
    frame: pd.DataFrame,
    feature_names: list[str],
    stats: dict[str, Any],
    split_dates: dict[str, Any],
    instruments: pd.DataFrame | None,
    text: TextLike | None,
    cfg: ShardsSection,
    root: Location,
    source_hash: str,
    key: str | None = None,
    calendar: list[str] | None = None,
) -> Path | str:
    """Write the feature table as a shard set under `root`; return its directory (a Path, or
    the URL when `root` is one).

    Rows are laid out on the trading `calendar` (None: the union of the table's dates): a
    symbol's gap days between its first and last bar become rows without a bar.

    The directory is `root/<key>`; without `key` it is the hash of the inputs' content (the
    pipeline passes its stage key, built from the upstream stages' keys, to skip that hashing).
    An intact set already there is kept as it is (see storage.atomic_dir). Bad input raises
    ShardBuildError naming the column; nothing partial is ever left behind.
    """
    feature_names = list(feature_names)
    rows = FeatureRows.check(frame, feature_names, split_dates, calendar)
    layout = InstrumentLayout.build(instruments, rows.symbols)
    vectors, has_text = layout.text_vectors(text)
    if key is None:
        text_keys = np.asarray(["\0".join(k) for k in layout.text_keys()], dtype=object)
        key = shard_set_key(
            rows.frame,
            feature_names,
            stats,
            split_dates,
            instruments,
            (text_keys.astype(str), vectors, has_text),
            cfg,
            calendar,
        )
    final = FsPath.of(root) / key
    plan = plan_shards(rows.rows_per_symbol(), len(feature_names), cfg)
    info = ManifestInfo(
        key=key,
        cfg=cfg,
        feature_names=feature_names,
        split_dates=split_dates,
        stats=stats,
        source_hash=source_hash,
        label_coverage=label_coverage(rows.frame, SPLIT_CODES),
    )
    with atomic_dir(final) as tmp:
        entries = [
            write_feature_shard(tmp / shard_file(number), rows.of_symbols(ids), layout, cfg)
            for number, ids in enumerate(plan)
        ]
        side_tables = write_side_tables(tmp, rows.symbols, layout, vectors, has_text)
        write_manifest(tmp, info, entries, side_tables)
    return final.local_or_url


def build_shards_from(
    table: FeatureTableLike,
    instruments: pd.DataFrame | None,
    text: TextLike | None,
    cfg: ShardsSection,
    root: Location,
    source_hash: str,
    key: str | None = None,
) -> Path | str:
    """`build_shards` for any object with frame / feature_names / stats / split_dates."""
    return build_shards(
        table.frame,
        table.feature_names,
        table.stats,
        table.split_dates,
        instruments,
        text,
        cfg,
        root,
        source_hash,
        key,
        getattr(table, "calendar", None),
    )


def run_shards_stage(
    features: StageRef, text: StageRef, market: StageRef, cfg: PipelineConfig
) -> StageRef:
    """Write the shard set of a feature table under `<work_dir>/shards/<key>`, shard by shard
    (`shard_fanout.build_shard_set`: the set `build_shards_from` writes from the table in
    memory, without ever holding the table)."""
    from alphaloom.tasks.dataset.shard_fanout import build_shard_set

    return build_shard_set(features, text, market, cfg)


@stage_task("shards", shards_location)
def shards_task(
    features: StageRef, text: StageRef, market: StageRef, cfg: PipelineConfig
) -> StageRef:
    """Prefect task: cached on the upstream keys, the shards section and the code."""
    return run_shards_stage(features, text, market, cfg)


def open_loader(
    shard_dir: str | Path,
    cfg: LoaderSection,
    split: str | None,
    *,
    seed: int,
    device: str = "cpu",
    shuffle: bool | None = None,
    dates: list[Any] | None = None,
    rank: int | None = None,
    world_size: int | None = None,
) -> WindowLoader:
    """A device loader over a shard set configured by the `loader` section."""
    dataset = ShardedWindowDataset(
        shard_dir,
        split,
        batch_size=cfg.batch_size,
        pool_shards=cfg.pool_shards,
        min_valid_days=cfg.min_valid_days,
        seed=seed,
        shuffle=shuffle,
        equalize=cfg.equalize,
        prefetch=cfg.prefetch,
        dates=dates,
        rank=rank,
        world_size=world_size,
    )
    return WindowLoader(dataset, num_workers=cfg.num_workers, device=device)
