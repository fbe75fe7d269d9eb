"""The shards stage fanned out: one task per shard, mapped on the configured task runner.

The single-task stage (tasks/dataset/shards.py) reads the whole feature table into one process.
Here a cheap planning task reads only the table's key columns and makes the same seeded,
size-balanced plan (`plan_shards`); each mapped task reads only its symbols' rows (a parquet
filter), writes its one shard file and returns the manifest entry; a last task writes the side
tables and the manifest and marks the set complete. Both paths write with the same functions
(tasks/dataset/shard_writer.py), so the shard files and side tables are byte-identical to the
single task's, under the same key and directory, and either path reuses the other's output (only
the manifest's `created` time differs).

Where the parts go while the set is unfinished is storage's `parts_dir`: locally a hidden
sibling `<work_dir>/shards/.<key>.parts-<token>/`, one per planning (so overlapping runs cannot
mix their files), renamed to `<key>/` by the last task (workers must share that filesystem: a
local Dask cluster, or a shared mount); at a URL the set's own location, which counts as absent
until the last task writes its completion marker.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from alphaloom.model.shard_format import MANIFEST_NAME, SPLIT_CODES
from alphaloom.tasks.common.config import PipelineConfig
from alphaloom.tasks.common.hashing import sha256_file
from alphaloom.tasks.common.storage import (
    FsPath,
    atomic_file,
    complete_parts,
    output_problem,
    parts_dir,
)
from alphaloom.tasks.data.features import (
    FEATURES_FILE,
    META_FILE,
    FeatureTable,
    load_feature_table,
    typed_feature_frame,
)
from alphaloom.tasks.dataset.feature_rows import FeatureRows, calendar_rows_per_symbol
from alphaloom.tasks.dataset.row_layout import InstrumentLayout, ShardBuildError, label_coverage
from alphaloom.tasks.dataset.shard_writer import (
    ManifestInfo,
    plan_shards,
    shard_file,
    shards_location,
    write_feature_shard,
    write_manifest,
    write_side_tables,
)
from alphaloom.tasks.orchestration.caching import StageRef, stage_task
from alphaloom.tasks.orchestration.retries import retry_transient

log = logging.getLogger(__name__)

BUCKET_ROWS = 500_000  # feature-table rows read at once by `build_shard_set`


class ShardJob(BaseModel):
    """One shard to write: its number, its symbols, every symbol of the set (ids are positions
    in that sorted list) and where the unfinished set's files go."""

    number: int
    symbols: list[str]
    all_symbols: list[str]
    parts: str

    @property
    def file(self) -> str:
        return shard_file(self.number)


class WrittenShard(BaseModel):
    """What a shard task hands the last task: the manifest entry, its symbols, where it is."""

    entry: dict[str, Any]
    symbols: list[str]
    parts: str


def plan_shard_jobs(
    features: StageRef, text: StageRef, market: StageRef, cfg: PipelineConfig
) -> list[ShardJob]:
    """`build_shards`' plan from the table's symbol column alone; [] if the set is there intact
    (checksums verified: a corrupt set is planned, rebuilt and replaced)."""
    final = shards_location(features, text, market, cfg)
    if output_problem(final.location) is None:
        log.info("shards already built at %s: no shard to write", final.path)
        return []
    keys = pd.read_parquet(str(features.file(FEATURES_FILE)), columns=["symbol", "date"])
    keys = keys.sort_values(["symbol", "date"], ignore_index=True)
    codes, names = pd.factorize(keys["symbol"].astype(str), sort=True)
    meta = json.loads(features.file(META_FILE).read_text())
    days = keys["date"].to_numpy().astype("datetime64[D]").astype(np.int64)
    per_symbol = calendar_rows_per_symbol(
        codes.astype(np.int64), days, meta.get("calendar"), len(names)
    )
    plan = plan_shards(per_symbol, len(meta["feature_names"]), cfg.shards)
    parts = parts_dir(final.location)
    everyone = [str(name) for name in names]
    return [
        ShardJob(
            number=n, symbols=[everyone[i] for i in ids], all_symbols=everyone, parts=str(parts)
        )
        for n, ids in enumerate(plan)
    ]


def write_shard_job(
    job: ShardJob, features: StageRef, market: StageRef, cfg: PipelineConfig
) -> WrittenShard:
    """Write one shard of the plan from its symbols' rows; return its manifest entry."""
    table = load_feature_table(features.location, symbols=job.symbols)
    return write_shard_rows(job, table, features, market, cfg)


def write_shard_rows(
    job: ShardJob, table: FeatureTable, features: StageRef, market: StageRef, cfg: PipelineConfig
) -> WrittenShard:
    """Write one shard of the plan from `table`, its symbols' rows of the feature table."""
    rows = FeatureRows.check(table.frame, table.feature_names, table.split_dates, table.calendar)
    found = [str(s) for s in rows.symbols]
    if found != sorted(job.symbols):
        missing = sorted(set(job.symbols) - set(found))[:5]
        raise ShardBuildError(
            f"{features.path}: no rows for symbols {missing} of shard {job.number}"
        )
    rows = rows.in_set(np.asarray(job.all_symbols, dtype=object))
    layout = InstrumentLayout.build(
        pd.read_parquet(str(market.file("instruments.parquet"))), rows.symbols
    )
    with atomic_file(FsPath.of(job.parts) / job.file) as tmp:
        entry = write_feature_shard(tmp, rows, layout, cfg.shards)
    return WrittenShard(entry={**entry, "file": job.file}, symbols=job.symbols, parts=job.parts)


def finish_shard_set(
    features: StageRef,
    text: StageRef,
    market: StageRef,
    written: list[WrittenShard],
    cfg: PipelineConfig,
) -> StageRef:
    """Side tables and manifest (last) next to the written shards, then mark the set complete."""
    from alphaloom.tasks.dataset.text import load_text_vectors

    ref = shards_location(features, text, market, cfg)
    if not written:
        raise ShardBuildError(f"{ref.path}: no shard was written")
    if len({shard.parts for shard in written}) != 1:
        raise ShardBuildError(f"{ref.path}: shards of different plans cannot make one set")
    entries = sorted((shard.entry for shard in written), key=lambda entry: entry["file"])
    everyone = np.asarray(sorted(s for shard in written for s in shard.symbols), dtype=object)
    table_meta = json.loads(features.file(META_FILE).read_text())
    layout = InstrumentLayout.build(
        pd.read_parquet(str(market.file("instruments.parquet"))), everyone
    )
    vectors, has_text = layout.text_vectors(load_text_vectors(text.dir))
    targets = pd.read_parquet(
        str(features.file(FEATURES_FILE)), columns=["date", "split", "fwd_return"]
    )
    info = ManifestInfo(
        key=ref.key,
        cfg=cfg.shards,
        feature_names=list(table_meta["feature_names"]),
        split_dates=table_meta["split_dates"],
        stats=table_meta["stats"],
        source_hash=json.loads(market.file("meta.json").read_text())["source_hash"],
        label_coverage=label_coverage(targets, SPLIT_CODES),
    )
    parts = FsPath.of(written[0].parts)
    with tempfile.TemporaryDirectory(prefix="alphaloom-shards-") as staging:
        local = Path(staging)
        side_tables = write_side_tables(local, everyone, layout, vectors, has_text)
        write_manifest(local, info, entries, side_tables)
        checksums = {entry["file"]: entry["sha256"] for entry in entries}
        for name in [*side_tables.sha256, MANIFEST_NAME]:  # the manifest last
            with atomic_file(parts / name) as tmp:
                tmp.write_bytes((local / name).read_bytes())
            checksums[name] = sha256_file(local / name)
    complete_parts(parts, ref.location, checksums)
    return ref


def _table_batches(features: StageRef, batch_rows: int) -> Iterator[pd.DataFrame]:
    """The feature table's rows, one row group (or `batch_rows` of one) at a time.

    Row groups are read one by one and pyarrow's pool is released after each: the reader's
    `iter_batches` reads ahead, and measured on 4.5M rows it held 3.4 GB (RSS growing by
    ~0.5 GB a batch at 15M rows) where this holds one row group (~0.9 GB peak).
    """
    with features.file(FEATURES_FILE).open("rb") as source:
        reader = pq.ParquetFile(source, pre_buffer=False)
        for group in range(reader.metadata.num_row_groups):
            table = reader.read_row_group(group)
            for start in range(0, table.num_rows, batch_rows):
                yield table.slice(start, batch_rows).to_pandas()
            del table
            pa.default_memory_pool().release_unused()


def build_shard_set(
    features: StageRef,
    text: StageRef,
    market: StageRef,
    cfg: PipelineConfig,
    batch_rows: int = BUCKET_ROWS,
) -> StageRef:
    """The whole shard set in this process, in bounded memory: the same plan, shard files and
    manifest as the fan-out (so the same set as the single task always wrote), but the feature
    table is read once, `batch_rows` rows at a time, and each batch's rows are spread to local
    per-shard pieces; each shard is then written from its pieces alone. Peak memory is one
    batch or one shard, not the table (which at 3000 symbols x 5000 days is ~10 GB)."""
    ref = shards_location(features, text, market, cfg)
    jobs = plan_shard_jobs(features, text, market, cfg)
    if not jobs:
        return ref
    meta = json.loads(features.file(META_FILE).read_text())
    names = list(meta["feature_names"])
    number_of = {symbol: job.number for job in jobs for symbol in job.symbols}
    pieces: list[list[Path]] = [[] for _ in jobs]
    with tempfile.TemporaryDirectory(prefix="alphaloom-shard-pieces-") as staging:
        for batch_no, frame in enumerate(_table_batches(features, batch_rows)):
            shard = frame["symbol"].map(number_of).to_numpy()
            if pd.isna(shard).any():
                raise ShardBuildError(f"{features.path}: rows of symbols the plan lacks")
            shard = shard.astype(np.int64)
            for number in np.unique(shard):
                piece = Path(staging) / f"{number:05d}-{batch_no:05d}.parquet"
                frame[shard == number].to_parquet(piece, index=False)
                pieces[number].append(piece)
            del frame
        written = []
        for job in jobs:
            frame = pd.concat(
                [pd.read_parquet(piece) for piece in pieces[job.number]], ignore_index=True
            )
            for piece in pieces[job.number]:
                piece.unlink()
            table = FeatureTable(
                typed_feature_frame(frame, names),
                names,
                meta["stats"],
                meta["split_dates"],
                meta.get("calendar"),
            )
            del frame
            written.append(write_shard_rows(job, table, features, market, cfg))
            del table
    return finish_shard_set(features, text, market, written, cfg)


# ----------------------------------------------------------------------------------------------
# Prefect tasks


@task(
    name="plan-shards",
    cache_policy=NO_CACHE,
    persist_result=False,
    retries=2,
    retry_condition_fn=retry_transient,
)
def plan_shards_task(
    features: StageRef, text: StageRef, market: StageRef, cfg: PipelineConfig
) -> list[ShardJob]:
    """Prefect task: reads one column, so never cached."""
    return plan_shard_jobs(features, text, market, cfg)


@task(
    name="write-shard",
    cache_policy=NO_CACHE,  # the finished set is the cache (finish-shards)
    persist_result=False,
    retries=2,
    retry_delay_seconds=[2, 10],
    retry_condition_fn=retry_transient,
)
def write_shard_task(
    job: ShardJob, features: StageRef, market: StageRef, cfg: PipelineConfig
) -> WrittenShard:
    """Prefect task: one shard file (a retry rewrites it: same content, written atomically)."""
    return write_shard_job(job, features, market, cfg)


finish_shards_task = stage_task(
    "finish-shards",
    lambda features, text, market, written, cfg: shards_location(features, text, market, cfg),
)(finish_shard_set)  # Prefect task: cached on the shards stage's key (the shards_task output)
