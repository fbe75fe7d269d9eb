"""Features stage: Alpha158 factors, forward-return labels, date splits, train-only normalisation.

`build_feature_table` turns canonical bars into one table sorted by (symbol, date) holding the
normalised factors, the class label, the continuous forward return and the split code of every
row. Rows without a known forward return (each symbol's last `horizon + 1` bars, and bars whose
entry or exit day the symbol has no bar on) keep label -1: they are history for the windows and
what the scoring flow scores. Statistics are fitted on the train split only and stored with the
table, so every later stage applies the same ones. The table also records the market's trading
calendar, on which labels are computed and model windows are laid out (tasks/dataset/shards.py).

Factors are computed over each symbol's own bars, as Alpha158's expressions are on a feed
without suspensions: a 20-bar factor right after a halt spans more than 20 trading days. So they
can be computed per partition of the symbols and stitched (the fan-out, tasks/data/partitions.py);
the single task is the same build with one partition of all symbols, computed in memory.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from alphaloom.tasks.common.config import (
    FeaturesSection,
    PipelineConfig,
)
from alphaloom.tasks.common.storage import FsPath, Location, atomic_dir
from alphaloom.tasks.data import alpha158
from alphaloom.tasks.data.alpha158 import compute_alpha158, validate_bars
from alphaloom.tasks.data.factor_names import ALPHA158_NAMES, select_factors
from alphaloom.tasks.data.feature_chunks import (
    DEFAULT_CHUNK_ROWS,
    RawSource,
    Scratch,
    TableWriter,
    chunk_bounds,
    fit_stats_from_chunks,
    partition_rows,
    scratch_dir,
    write_chunks_from_parts,
)
from alphaloom.tasks.data.ingest import load_saved_bars
from alphaloom.tasks.data.labels import compute_labels
from alphaloom.tasks.data.splits import SPLIT_CODES, assign_splits
from alphaloom.tasks.data.trading_calendar import trading_calendar
from alphaloom.tasks.orchestration.caching import StageRef, stage_key, stage_task

__all__ = [
    "ALPHA158_NAMES",
    "FEATURES_FILE",
    "META_FILE",
    "FeatureTable",
    "PartitionError",
    "apply_normalizer",
    "assign_splits",
    "build_feature_table",
    "compute_alpha158",
    "compute_labels",
    "fit_normalizer",
    "load_feature_table",
    "run_features_stage",
    "save_feature_table",
    "select_factors",
    "sort_bars",
    "stitch_raw",
    "typed_feature_frame",
    "write_feature_table",
]

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 2
FEATURES_FILE = "features.parquet"
META_FILE = "features.json"
MAD_TO_STD = 1.4826  # makes the MAD a consistent estimator of a normal std


# ----------------------------------------------------------------------------------------------
# Normalisation


def _robust_center_scale(values: np.ndarray) -> tuple[float, float]:
    """Median and 1.4826 * MAD of the finite values; a zero MAD falls back to the std, then 1."""
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 0.0, 1.0
    median = float(np.median(values))
    scale = MAD_TO_STD * float(np.median(np.abs(values - median)))
    tiny = 1e-12 * max(1.0, abs(median))
    if not scale > tiny:
        scale = float(values.std())
    if not scale > tiny:
        scale = 1.0
    return median, scale


def fit_normalizer(
    raw: pd.DataFrame, names: list[str], train_mask: np.ndarray | pd.Series, clip: float = 3.0
) -> dict[str, Any]:
    """Per-feature median and robust scale fitted on the rows where `train_mask` is true."""
    mask = np.asarray(train_mask, dtype=bool)
    if mask.shape != (len(raw),):
        raise ValueError(f"train_mask has shape {mask.shape}, expected ({len(raw)},)")
    if not mask.any():
        raise ValueError("fit_normalizer: train_mask selects no rows")
    if not clip > 0:
        raise ValueError(f"features.clip must be > 0, got {clip}")
    _require_columns(raw, names, "raw factor table")
    median: dict[str, float] = {}
    scale: dict[str, float] = {}
    for name in names:
        median[name], scale[name] = _robust_center_scale(raw[name].to_numpy(np.float64)[mask])
    return {"median": median, "scale": scale, "clip": float(clip)}


def apply_normalizer(raw: pd.DataFrame, names: list[str], stats: dict[str, Any]) -> pd.DataFrame:
    """A copy of `raw` with each feature robust-z-scored, clipped to +-clip, NaN -> 0, float32."""
    _require_columns(raw, names, "raw factor table")
    for key in ("median", "scale", "clip"):
        if key not in stats:
            raise ValueError(f"normalisation stats lack key {key!r}")
    unknown = [n for n in names if n not in stats["median"] or n not in stats["scale"]]
    if unknown:
        raise ValueError(f"normalisation stats have no entry for feature(s) {unknown}")
    clip = float(stats["clip"])
    block = np.empty((len(names), len(raw)), dtype=np.float32)  # one float32 block, no copies
    for row, name in zip(block, names, strict=True):
        z = (raw[name].to_numpy(np.float64) - stats["median"][name]) / stats["scale"][name]
        row[...] = np.nan_to_num(np.clip(z, -clip, clip), nan=0.0)
    normed = pd.DataFrame(block.T, columns=names, index=raw.index, copy=False)
    out = pd.concat([raw.drop(columns=names), normed], axis=1)
    return out if list(out.columns) == list(raw.columns) else out[list(raw.columns)]


def _require_columns(frame: pd.DataFrame, names: list[str], what: str) -> None:
    missing = [n for n in names if n not in frame.columns]
    if missing:
        raise ValueError(f"{what} is missing column(s) {missing}")


# ----------------------------------------------------------------------------------------------
# The feature table


@dataclass
class FeatureTable:
    """Normalised factors + labels + splits, and what a consumer needs to reproduce them."""

    frame: pd.DataFrame  # symbol, date, features (float32), label, fwd_return, split
    feature_names: list[str]
    stats: dict[str, Any]
    split_dates: dict[str, list[str]]
    calendar: list[str] | None = None  # the trading days (ISO), None: the frame's dates


class PartitionError(ValueError):
    """Partition outputs do not fit the market they are stitched into; names the file."""


def sort_bars(bars: pd.DataFrame) -> pd.DataFrame:
    """Bars in (symbol, date) order, the row order of raw factors and of the feature table.

    A partition's rows (tasks/data/partitions.py) sorted this way are the rows of its symbols in
    all sorted bars, in the same order, which is what `stitch_raw` relies on.
    """
    return bars.sort_values(["symbol", "date"], kind="stable", ignore_index=True)


def build_feature_table(
    bars: pd.DataFrame, cfg: FeaturesSection, parts: Sequence[pd.DataFrame] | None = None
) -> FeatureTable:
    """Factors, labels and splits of canonical bars, normalised with train-split statistics.

    The per-symbol raw factors are those of `parts`, the outputs of the fan-out's symbol
    partitions (tasks/data/partitions.py), stitched; without `parts` the bars are one partition
    of all symbols and their factors are computed here. Labels, splits and statistics are
    cross-sectional, so they are always computed here, on every symbol at once.
    """
    validate_bars(bars)
    bars = sort_bars(bars)
    names = select_factors(cfg.factors, cfg.windows)
    split, split_dates = assign_splits(bars["date"], cfg.splits, cfg.label.horizon)
    raw = compute_alpha158(bars, names) if parts is None else stitch_raw(bars, parts, names)
    stats = fit_normalizer(raw, names, split == SPLIT_CODES["train"], clip=cfg.clip)
    calendar = trading_calendar(bars["date"])
    labels = compute_labels(bars, cfg.label, calendar)
    targets = labels[["label", "fwd_return"]].assign(split=split)
    frame = pd.concat([apply_normalizer(raw, names, stats), targets], axis=1)
    return FeatureTable(frame, names, stats, split_dates, [str(d) for d in calendar])


def stitch_raw(bars: pd.DataFrame, parts: Sequence[pd.DataFrame], names: list[str]) -> pd.DataFrame:
    """Raw factors of (symbol, date)-sorted `bars` from partition tables, as compute_alpha158
    would return them for all of `bars`; every row must come from exactly one partition."""
    n = len(bars)
    block = np.empty((len(names), n), dtype=np.float32)
    filled = np.zeros(n, dtype=bool)
    symbols = bars["symbol"].to_numpy()
    dates = bars["date"].to_numpy("datetime64[ns]")
    for number, part in enumerate(parts):
        rows = partition_rows(symbols, dates, part, number, filled, names, PartitionError)
        for row, name in zip(block, names, strict=True):
            row[rows] = part[name].to_numpy(np.float32)
        filled[rows] = True
    if not filled.all():
        absent = sorted(set(symbols[~filled]))[:5]
        raise PartitionError(f"no partition holds the raw factors of symbols {absent}")
    frame = pd.DataFrame(block.T, columns=names, index=bars.index, copy=False)
    frame.insert(0, "date", bars["date"].astype("datetime64[ns]"))
    frame.insert(0, "symbol", bars["symbol"])
    return frame


def save_feature_table(table: FeatureTable, out_dir: Location) -> Location:
    """Write `features.parquet` + `features.json` atomically; return `out_dir`.

    Callers name `out_dir` by the content key of the inputs, so an intact directory already
    there holds this table and is kept (see tasks/common/storage.atomic_dir).
    """
    _require_columns(table.frame, [*_KEY_COLUMNS, *table.feature_names, *_TARGET_COLUMNS], "table")
    meta = {
        "schema_version": SCHEMA_VERSION,
        "feature_names": table.feature_names,
        "stats": table.stats,
        "split_dates": table.split_dates,
        "calendar": table.calendar,
        "n_rows": len(table.frame),
    }
    with atomic_dir(out_dir) as tmp:
        table.frame.to_parquet(tmp / FEATURES_FILE, index=False)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1))
    return out_dir


_KEY_COLUMNS = ("symbol", "date")
_META_KEYS = ("schema_version", "feature_names", "stats", "split_dates")
_TARGET_COLUMNS = ("label", "fwd_return", "split")


def _read_meta(path: FsPath) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"feature table metadata not found: {path}")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON: {err}") from None
    missing = [k for k in _META_KEYS if k not in meta]
    if missing:
        raise ValueError(f"{path}: missing key(s) {missing}")
    if meta["schema_version"] != SCHEMA_VERSION:
        raise ValueError(
            f"{path}: schema_version {meta['schema_version']} is not {SCHEMA_VERSION}; rebuild it"
        )
    return meta


def load_feature_table(out_dir: Location, symbols: list[str] | None = None) -> FeatureTable:
    """Read a table written by `save_feature_table` (a path or URL), checking its columns against
    its metadata; with `symbols`, only their rows are read (a parquet filter: fanned-out tasks)."""
    out = FsPath.of(out_dir)
    meta = _read_meta(out / META_FILE)
    data_path = out / FEATURES_FILE
    if not data_path.is_file():
        raise FileNotFoundError(f"feature table data not found: {data_path}")
    filters = None if symbols is None else [("symbol", "in", list(symbols))]
    frame = pd.read_parquet(str(data_path), filters=filters)
    names = list(meta["feature_names"])
    _require_columns(frame, [*_KEY_COLUMNS, *names, *_TARGET_COLUMNS], str(data_path))
    if symbols is None and "n_rows" in meta and len(frame) != meta["n_rows"]:
        raise ValueError(f"{data_path}: {len(frame)} rows, metadata says {meta['n_rows']}")
    frame = typed_feature_frame(frame, names)
    return FeatureTable(frame, names, meta["stats"], meta["split_dates"], meta.get("calendar"))


def typed_feature_frame(frame: pd.DataFrame, names: list[str]) -> pd.DataFrame:
    """Rows of a saved feature table with the table's dtypes (as `load_feature_table` returns)."""
    frame["date"] = frame["date"].astype("datetime64[ns]")
    return frame.astype(
        {**dict.fromkeys(names, np.float32), "label": np.int8, "fwd_return": np.float32}
    ).astype({"split": np.int8})


# ----------------------------------------------------------------------------------------------
# The stage


def features_location(market: StageRef, cfg: PipelineConfig) -> StageRef:
    """The features stage's output: key = market key + features section + code."""
    key = stage_key("features", [market.key], cfg.features, (sys.modules[__name__], alpha158))
    return StageRef.at(cfg.work_dir, "features", key)


def run_features_stage(
    market: StageRef, cfg: PipelineConfig, parts: Sequence[RawSource] | None = None
) -> StageRef:
    """Build the feature table of an ingested market under `<work_dir>/features/<key>`, from
    the fan-out's partition outputs `parts` (frames or their parquet files) or, without them,
    computing every symbol's factors here (nothing is written under raw_factors/). Either way
    the key and the table are the same; memory is bounded by a chunk (`write_feature_table`).
    """
    ref = features_location(market, cfg)
    write_feature_table(load_saved_bars(market.dir), cfg.features, ref.path, parts)
    return ref


def write_feature_table(
    bars: pd.DataFrame,
    cfg: FeaturesSection,
    out_dir: Location,
    parts: Sequence[RawSource] | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> Location:
    """`save_feature_table(build_feature_table(bars, cfg, parts), out_dir)`, the same table,
    built and written chunk by chunk (tasks/data/feature_chunks.py): at most `chunk_rows` rows
    of factors are in memory at once, whatever the size of the market."""
    validate_bars(bars)
    bars = sort_bars(bars)
    names = select_factors(cfg.factors, cfg.windows)
    split, split_dates = assign_splits(bars["date"], cfg.splits, cfg.label.horizon)
    calendar = trading_calendar(bars["date"])
    labels = compute_labels(bars, cfg.label, calendar)
    label, fwd_return = labels["label"].to_numpy(), labels["fwd_return"].to_numpy()
    del labels
    split = np.asarray(split)
    bounds = chunk_bounds(bars["symbol"], chunk_rows)
    with scratch_dir() as root:
        scratch = Scratch(Path(root), len(names), bounds)
        if parts is None:
            for chunk, (begin, stop) in enumerate(bounds):
                raw = compute_alpha158(bars.iloc[begin:stop], names)
                scratch.write(chunk, (raw[name].to_numpy() for name in names))
                del raw
        else:
            symbols = bars["symbol"].to_numpy()
            dates = bars["date"].to_numpy("datetime64[ns]")
            write_chunks_from_parts(scratch, symbols, dates, parts, names, PartitionError)
        stats = fit_stats_from_chunks(
            scratch, names, split == SPLIT_CODES["train"], cfg.clip, _robust_center_scale
        )
        meta = {
            "schema_version": SCHEMA_VERSION,
            "feature_names": names,
            "stats": stats,
            "split_dates": split_dates,
            "calendar": [str(d) for d in calendar],
            "n_rows": len(bars),
        }
        with atomic_dir(out_dir) as tmp:
            writer = TableWriter(tmp / FEATURES_FILE)
            try:
                for chunk, (begin, stop) in enumerate(bounds):
                    keys = bars.iloc[begin:stop]
                    raw = pd.DataFrame(scratch.block(chunk).T, columns=names, copy=False)
                    raw.insert(0, "date", keys["date"].astype("datetime64[ns]").to_numpy())
                    raw.insert(0, "symbol", keys["symbol"].to_numpy())
                    frame = apply_normalizer(raw, names, stats)
                    del raw
                    frame["label"] = label[begin:stop]
                    frame["fwd_return"] = fwd_return[begin:stop]
                    frame["split"] = split[begin:stop]
                    writer.append(frame)
                    del frame
            finally:
                writer.close()
            (tmp / META_FILE).write_text(json.dumps(meta, indent=1))
    return out_dir


@stage_task("features", features_location)
def features_task(market: StageRef, cfg: PipelineConfig) -> StageRef:
    """Prefect task: cached on the market's key, the features section and the code."""
    return run_features_stage(market, cfg)
