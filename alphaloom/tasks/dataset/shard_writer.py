"""Writing a shard set: content key, shard plan, shards, side tables, manifest.

The one implementation behind both ways of running the shards stage: the single task
(tasks/dataset/shards.py) writes every shard of the plan in one process, the fan-out
(tasks/dataset/shard_fanout.py) one shard per task; each shard is written by
`write_feature_shard` from its symbols' rows, and each set finished by `write_side_tables`
and `write_manifest`, so the two write the same bytes.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import heapq
import importlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from alphaloom.model.shard_format import (
    MANIFEST_NAME,
    NAMES_NAME,
    SCHEMA_VERSION,
    SPLIT_CODES,
    SYMBOLS_NAME,
    TEXT_NAME,
    TEXTS_NAME,
    WINDOW_KEYS,
    X_LAYOUT,
    ShardArrays,
    shard_table,
    window_histograms,
)
from alphaloom.tasks.common.config import PipelineConfig, ShardsSection
from alphaloom.tasks.common.hashing import code_version, hash_frame, hash_json, sha256_file
from alphaloom.tasks.dataset.feature_rows import FeatureRows
from alphaloom.tasks.dataset.row_layout import (
    CalendarRows,
    InstrumentLayout,
    ShardBuildError,
    TextLike,
    calendar_rows,
    split_of_days,
)
from alphaloom.tasks.orchestration.caching import StageRef, stage_key

__all__ = ["ShardBuildError", "TextLike"]

# Bytes per row besides the factors: symbol, date, industry, index, text_row, fwd_return (4
# each) + split, label, bar (1 each).
ROW_OVERHEAD_BYTES = 27


MIB = 1 << 20


DICTIONARY_COLUMNS = ["symbol", "split", "label", "industry", "index", "text_row", "bar"]


STATISTICS_COLUMNS = ["symbol", "date", "split", "label"]


def _jsonable(value: Any) -> Any:
    """numpy / pandas / datetime values -> plain JSON (NaN -> null), exact for floats."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, pd.Series | pd.Index):
        return _jsonable(value.to_dict() if isinstance(value, pd.Series) else value.tolist())
    if isinstance(value, list | tuple | np.ndarray):
        return [_jsonable(v) for v in (value.tolist() if isinstance(value, np.ndarray) else value)]
    if isinstance(value, np.datetime64):
        return str(value.astype("datetime64[D]"))
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    if isinstance(value, pd.Timestamp | dt.datetime):
        return value.date().isoformat() if value == value.normalize() else value.isoformat()
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _array_hash(*arrays: np.ndarray) -> str:
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


SHARD_CODE = (
    "alphaloom.model.shard_format",
    "alphaloom.tasks.dataset.feature_rows",
    "alphaloom.tasks.dataset.shard_writer",
    "alphaloom.tasks.dataset.shards",
)


def shard_code_modules() -> tuple[ModuleType, ...]:
    """The modules whose source decides a shard set's bytes: their code version is in its key,
    whichever path (one task or the fan-out) writes it."""
    return tuple(importlib.import_module(name) for name in SHARD_CODE)


def shard_set_key(
    frame: pd.DataFrame,
    feature_names: list[str],
    stats: dict[str, Any],
    split_dates: dict[str, Any],
    instruments: pd.DataFrame | None,
    text: tuple[np.ndarray, np.ndarray, np.ndarray],
    cfg: ShardsSection,
    calendar: list[str] | None = None,
) -> str:
    """Name of a shard set: its inputs' content + the shards section + the code version."""
    inputs = [
        hash_frame(frame),
        hash_json(
            _jsonable(
                {
                    "features": feature_names,
                    "stats": stats,
                    "splits": split_dates,
                    "calendar": calendar,
                }
            )
        ),
        "none" if instruments is None else hash_frame(instruments),
        _array_hash(*text),
    ]
    return stage_key("shards", inputs, cfg, shard_code_modules(), extra=f"schema{SCHEMA_VERSION}")


def plan_shards(
    rows_per_symbol: np.ndarray, n_features: int, cfg: ShardsSection
) -> list[list[int]]:
    """Seeded random, size-balanced assignment of symbol ids to shards (sorted within each).

    The shard count comes from `n_shards` or the target size; symbols are taken in a permuted
    order and each goes to the currently smallest shard, so shards are near-equal in rows, which
    keeps pools (and the loader's shuffle) even.
    """
    n_symbols = len(rows_per_symbol)
    total_bytes = float(rows_per_symbol.sum()) * (4 * n_features + ROW_OVERHEAD_BYTES)
    wanted = cfg.n_shards or math.ceil(total_bytes / (cfg.target_shard_mb * MIB))
    n_shards = max(1, min(int(wanted), n_symbols))
    heap = [(0, shard) for shard in range(n_shards)]
    members: list[list[int]] = [[] for _ in range(n_shards)]
    for symbol in np.random.default_rng(cfg.seed).permutation(n_symbols):
        rows, shard = heapq.heappop(heap)
        members[shard].append(int(symbol))
        heapq.heappush(heap, (rows + int(rows_per_symbol[symbol]), shard))
    return [sorted(ids) for ids in members if ids]


def write_feature_shard(
    path: Path, rows: FeatureRows, layout: InstrumentLayout, cfg: ShardsSection
) -> dict[str, Any]:
    """Write the shard of exactly these rows (`FeatureRows.of_symbols`, or a table read for
    those symbols) laid out on the calendar; return its manifest entry (`write_shard`)."""
    laid_out = calendar_rows(rows.codes, rows.days, rows.calendar)
    columns = shard_columns(rows.frame, laid_out, rows.symbols, layout, rows.split_dates)
    arrays = _shard_arrays(rows.frame, columns, rows.feature_names)
    return write_shard(path, arrays, cfg.window, cfg.compression)


def shard_file(number: int) -> str:
    """The file name of shard `number` of a set."""
    return f"shard-{number:05d}.parquet"


def write_shard(
    path: Path, arrays: ShardArrays, window: int, compression: str = "none"
) -> dict[str, Any]:
    """Write one shard and return its manifest entry (rows, sha256, symbols, window counts)."""
    pq.write_table(
        shard_table(arrays),
        path,
        compression=compression,
        use_dictionary=DICTIONARY_COLUMNS,
        write_statistics=STATISTICS_COLUMNS,
    )
    return {
        "file": path.name,
        "rows": len(arrays),
        "bars": int(arrays.bar.sum()),
        "bytes": path.stat().st_size,
        "sha256": sha256_file(path),
        "symbols": np.unique(arrays.symbol).tolist(),
        "first_date": str(np.datetime64(int(arrays.date.min()), "D")),
        "last_date": str(np.datetime64(int(arrays.date.max()), "D")),
        "windows": window_histograms(arrays, window),
    }


@dataclass(frozen=True)
class SideTables:
    """What `write_side_tables` wrote: each file's sha256 by name, and the sizes they fix."""

    sha256: dict[str, str]
    n_symbols: int
    n_industries: int
    n_indices: int
    text_dim: int


def write_side_tables(
    out: Path, symbols: np.ndarray, layout: InstrumentLayout, text: np.ndarray, flags: np.ndarray
) -> SideTables:
    """Write symbols.parquet, names.parquet, texts.parquet and text.npy (a symbol's row shows
    its latest instrument row: industry, index, text)."""
    ids = np.arange(len(symbols), dtype=np.int32)
    latest = layout.latest(symbols)
    pq.write_table(
        pa.table(
            {
                "symbol_id": ids,
                "symbol": pa.array([str(s) for s in symbols], pa.string()),
                "industry": layout.industry[latest].astype(np.int32),
                "index": layout.index[latest].astype(np.int32),
                "text_row": latest.astype(np.int32),
                "has_text": flags[latest].astype(bool),
            }
        ),
        out / SYMBOLS_NAME,
    )
    industries, indices = layout.industries, layout.indices
    kinds = ["industry"] * len(industries) + ["index"] * len(indices)
    name_ids = list(range(len(industries))) + list(range(len(indices)))
    pq.write_table(
        pa.table(
            {"kind": kinds, "id": pa.array(name_ids, pa.int32()), "name": industries + indices}
        ),
        out / NAMES_NAME,
    )
    keys = layout.text_keys()
    owner = pd.Index([str(s) for s in symbols]).get_indexer([k[0] for k in keys])
    pq.write_table(
        pa.table(
            {
                "text_row": pa.array(np.arange(len(keys)), pa.int32()),
                "symbol_id": pa.array(owner, pa.int32()),
                "start_date": pa.array([k[1] for k in keys], pa.string()),
                "has_text": pa.array(flags.astype(bool)),
            }
        ),
        out / TEXTS_NAME,
    )
    np.save(out / TEXT_NAME, np.ascontiguousarray(text, dtype=np.float32), allow_pickle=False)
    names = (SYMBOLS_NAME, NAMES_NAME, TEXTS_NAME, TEXT_NAME)
    return SideTables(
        sha256={name: sha256_file(out / name) for name in names},
        n_symbols=len(symbols),
        n_industries=len(industries),
        n_indices=len(indices),
        text_dim=int(text.shape[1]),
    )


@dataclass(frozen=True)
class ManifestInfo:
    """What a shard set's manifest records besides its own files: its key and config, and the
    feature table it was cut from (`write_manifest`)."""

    key: str
    cfg: ShardsSection
    feature_names: list[str]
    split_dates: dict[str, Any]
    stats: dict[str, Any]
    source_hash: str
    label_coverage: dict[str, dict[str, int]]


def write_manifest(
    out: Path, info: ManifestInfo, entries: list[dict[str, Any]], side: SideTables
) -> dict[str, Any]:
    """Assemble and write manifest.json. Call it last: its presence marks the set complete."""
    cfg = info.cfg
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "key": info.key,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "feature_names": info.feature_names,
        "n_features": len(info.feature_names),
        "x_layout": X_LAYOUT,
        "window": cfg.window,
        "text_dim": side.text_dim,
        "n_symbols": side.n_symbols,
        "n_industries": side.n_industries,
        "n_indices": side.n_indices,
        "rows": sum(entry["rows"] for entry in entries),
        "bars": sum(entry["bars"] for entry in entries),
        "first_date": min(entry["first_date"] for entry in entries),
        "last_date": max(entry["last_date"] for entry in entries),
        "splits": info.split_dates,
        "stats": info.stats,
        "source_hash": info.source_hash,
        "code_version": code_version(*shard_code_modules()),
        "config": cfg.model_dump(mode="json"),
        "side_tables": side.sha256,
        "windows": summarize_windows(entries, cfg.window),
        "label_coverage": info.label_coverage,
        "shards": entries,
    }
    manifest = _jsonable(manifest)
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1, allow_nan=False))
    return manifest


def summarize_windows(entries: list[dict[str, Any]], window: int) -> dict[str, list[int]]:
    """Window counts of the whole set by key and valid length (sum of the shards')."""
    return {
        key: np.sum([e["windows"][key] for e in entries], axis=0, dtype=np.int64).tolist()
        if entries
        else [0] * window
        for key in WINDOW_KEYS
    }


def shard_columns(
    frame: pd.DataFrame,
    rows: CalendarRows,
    symbols: np.ndarray,
    layout: InstrumentLayout,
    split_dates: dict[str, Any],
) -> dict[str, np.ndarray]:
    """The non-factor columns of the calendar rows of sorted `frame` (symbol ids `rows.codes`
    index `symbols`, the whole set's); a gap day gets its day's split, label -1, NaN return."""
    source = rows.source
    real = source >= 0
    pick = np.where(real, source, 0)

    def from_frame(column: str, dtype: Any, fill: Any) -> np.ndarray:
        values = frame[column].to_numpy(dtype, na_value=np.nan) if column == "fwd_return" else (
            frame[column].to_numpy(dtype)
        )  # fmt: skip
        return np.where(real, values[pick], fill).astype(dtype)

    split = np.where(real, frame["split"].to_numpy(np.int8)[pick], 0).astype(np.int8)
    if not real.all():
        split[~real] = split_of_days(rows.days[~real], split_dates, SPLIT_CODES)
    fields = layout.fields(symbols[rows.codes], rows.days.astype("datetime64[D]"))
    return {
        "symbol": rows.codes.astype(np.int32),
        "date": rows.days.astype(np.int32),
        "split": split,
        "label": from_frame("label", np.int8, -1),
        "fwd_return": from_frame("fwd_return", np.float32, np.nan),
        **fields,
        "bar": rows.bar,
        "source": source,
    }


def _shard_arrays(
    frame: pd.DataFrame, columns: dict[str, np.ndarray], feature_names: list[str]
) -> ShardArrays:
    """A shard's arrays from its calendar rows' `columns`; the factors of its bars are checked
    finite here, one shard at a time, and gap days get zeros."""
    source = columns["source"]
    real = source >= 0
    positions = [frame.columns.get_loc(name) for name in feature_names]
    x = np.zeros((len(source), len(positions)), np.float32)
    x[real] = frame.iloc[source[real], positions].to_numpy(dtype=np.float32)
    finite = np.isfinite(x)
    if not finite.all():
        row, col = np.argwhere(~finite)[0]
        raise ShardBuildError(
            f"feature column {feature_names[col]!r} has a NaN or infinite value (symbol "
            f"{frame['symbol'].iloc[source[row]]}, date {frame['date'].iloc[source[row]]}); "
            "factors must be normalised and filled before sharding"
        )
    return ShardArrays(
        **{name: columns[name] for name in ShardArrays.__dataclass_fields__ if name != "x"}, x=x
    )


def shards_location(
    features: StageRef, text: StageRef, market: StageRef, cfg: PipelineConfig
) -> StageRef:
    """The shards stage's output: key = the features' and text's keys + shards section + code
    version.

    The market is a parameter only for its instruments and source hash, which those two keys
    already cover.
    """
    key = stage_key(
        "shards",
        [features.key, text.key],
        cfg.shards,
        shard_code_modules(),
        extra=f"schema{SCHEMA_VERSION}",
    )
    return StageRef.at(cfg.work_dir, "shards", key)
