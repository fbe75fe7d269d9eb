"""The features stage fanned out over symbol partitions, and the Prefect tasks that run it.

Why this split: Alpha158 factors are a pure per-symbol function (tasks/data/alpha158.py), so they
can be computed for disjoint sets of symbols anywhere (threads, processes, a Dask cluster) and
cached per partition. Labels (per-day quantiles across symbols), date splits and the train-only
normalisation are cross-sectional: they run once, on the stitched raw factors of all symbols, in
the features stage's own builder (`features.run_features_stage` with the partitions' outputs), so
the table is the single task's, bit for bit (tests/test_fanout.py), under the stage's key. The
single task is this with one partition of all symbols, computed in memory.

* `plan_partitions`: symbols -> `runner.partitions` groups by a stable hash of the symbol name
  (adding a symbol changes one partition, not all); each partition's key is the hash of its own
  bars, so new data for some symbols recomputes only their partitions.
* `run_raw_factors`: one partition's raw factors -> `<work_dir>/raw_factors/<key>/raw.parquet`.
* `assemble_features`: stitch, label, split, normalise -> the features stage's usual output.
"""

from __future__ import annotations

import hashlib
import logging
import sys
from collections.abc import Sequence

import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from alphaloom.tasks.common.config import PipelineConfig
from alphaloom.tasks.common.hashing import hash_frame
from alphaloom.tasks.common.storage import FsPath, atomic_dir, output_problem
from alphaloom.tasks.data import alpha158
from alphaloom.tasks.data.alpha158 import compute_alpha158
from alphaloom.tasks.data.factor_names import select_factors
from alphaloom.tasks.data.features import (
    PartitionError,
    features_location,
    run_features_stage,
    sort_bars,
)
from alphaloom.tasks.data.ingest import load_saved_market
from alphaloom.tasks.orchestration.caching import StageRef, stage_key, stage_task
from alphaloom.tasks.orchestration.retries import retry_transient

log = logging.getLogger(__name__)

RAW_FILE = "raw.parquet"
BARS_FILE = "bars.parquet"


class Partition(BaseModel):
    """One group of symbols of a saved market, keyed by the content of their bars."""

    market_path: str
    number: int
    symbols: list[str]
    key: str


# ----------------------------------------------------------------------------------------------
# planning


def partition_of(symbol: str, n_partitions: int) -> int:
    """A symbol's partition: sha256 of its name mod n (stable across runs and machines)."""
    digest = hashlib.sha256(symbol.encode()).digest()
    return int.from_bytes(digest[:8], "big") % n_partitions


def group_symbols(symbols: Sequence[str], n_partitions: int) -> list[list[str]]:
    """Symbols grouped by `partition_of`, each group sorted, empty groups dropped."""
    if n_partitions < 1:
        raise ValueError(f"runner.partitions must be >= 1, got {n_partitions}")
    groups: list[list[str]] = [[] for _ in range(n_partitions)]
    for symbol in sorted(set(symbols)):
        groups[partition_of(symbol, n_partitions)].append(symbol)
    return [group for group in groups if group]


def partitions_of_bars(bars: pd.DataFrame, market_path: str, n_partitions: int) -> list[Partition]:
    """The partitions of a bars table, each keyed by the hash of its own rows."""
    ordered = sort_bars(bars)
    out = []
    for number, symbols in enumerate(group_symbols(ordered["symbol"].tolist(), n_partitions)):
        rows = ordered[ordered["symbol"].isin(symbols)]
        out.append(Partition(market_path=market_path, number=number, symbols=symbols,
                             key=hash_frame(rows)[:20]))  # fmt: skip
    return out


def plan_partitions(market: StageRef, cfg: PipelineConfig) -> list[Partition]:
    """Partitions to compute: none when the features output is there intact (checksums
    verified: a corrupt one is planned, rebuilt and replaced)."""
    features = features_location(market, cfg)
    if output_problem(features.location) is None:
        log.info("features already built at %s: no partition to compute", features.path)
        return []
    bars = load_saved_market(market.dir).bars
    return partitions_of_bars(bars, market.path, cfg.runner.partitions)


# ----------------------------------------------------------------------------------------------
# one partition


def raw_location(partition: Partition, cfg: PipelineConfig) -> StageRef:
    """Key: the partition's bars + the selected factor names + the factor code. Labels, splits
    and normalisation are not in it: changing them reuses every partition."""
    names = select_factors(cfg.features.factors, cfg.features.windows)
    key = stage_key(
        "raw_factors", [partition.key], {"factors": names}, (alpha158, sys.modules[__name__])
    )
    return StageRef.at(cfg.work_dir, "raw_factors", key)


def partition_bars(partition: Partition) -> pd.DataFrame:
    """The partition's rows of the saved market's bars (only those symbols are decoded)."""
    path = FsPath.of(partition.market_path) / BARS_FILE
    bars = pd.read_parquet(str(path), filters=[("symbol", "in", partition.symbols)])
    found = set(bars["symbol"].unique())
    if found != set(partition.symbols):
        missing = sorted(set(partition.symbols) - found)[:5]
        raise PartitionError(f"{path}: partition {partition.number} lacks symbols {missing}")
    return sort_bars(bars)


def run_raw_factors(partition: Partition, cfg: PipelineConfig) -> StageRef:
    """Raw Alpha158 factors of one partition under `<work_dir>/raw_factors/<key>`."""
    ref = raw_location(partition, cfg)
    names = select_factors(cfg.features.factors, cfg.features.windows)
    raw = compute_alpha158(partition_bars(partition), names)
    with atomic_dir(ref.path) as tmp:
        raw.to_parquet(tmp / RAW_FILE, index=False)
    return ref


# ----------------------------------------------------------------------------------------------
# the cross-sectional part, once


def assemble_features(market: StageRef, raw: Sequence[StageRef], cfg: PipelineConfig) -> StageRef:
    """The features stage's output (same key and directory) from the partitions' raw factors,
    read one partition at a time (tasks/data/feature_chunks.py)."""
    return run_features_stage(market, cfg, [str(part.file(RAW_FILE)) for part in raw])


# ----------------------------------------------------------------------------------------------
# Prefect tasks


@task(
    name="plan-partitions",
    cache_policy=NO_CACHE,
    persist_result=False,
    retries=2,
    retry_condition_fn=retry_transient,
)
def plan_partitions_task(market: StageRef, cfg: PipelineConfig) -> list[Partition]:
    """Prefect task: cheap (reads the bars and hashes each partition), so never cached."""
    return plan_partitions(market, cfg)


@stage_task("raw-factors", raw_location)
def raw_factors_task(partition: Partition, cfg: PipelineConfig) -> StageRef:
    """Prefect task: cached on the partition's content, the factor list and the factor code."""
    return run_raw_factors(partition, cfg)


@stage_task("assemble-features", lambda market, raw, cfg: features_location(market, cfg))
def assemble_features_task(market: StageRef, raw: list[StageRef], cfg: PipelineConfig) -> StageRef:
    """Prefect task: cached on the features stage's key (the same output as `features_task`)."""
    return assemble_features(market, raw, cfg)
