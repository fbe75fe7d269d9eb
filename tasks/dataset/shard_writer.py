"""Writing a shard set: input checks, content key, shard plan, shards, side tables, manifest."""

from __future__ import annotations

import datetime as dt
import hashlib
import heapq
import importlib
import json
import math
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from alphaloom.model.shard_format import (
    MANIFEST_NAME,
    NAMES_NAME,
    SCHEMA_VERSION,
    SYMBOLS_NAME,
    TEXT_NAME,
    WINDOW_KEYS,
    X_LAYOUT,
    ShardArrays,
    shard_table,
    window_histograms,
)
from alphaloom.tasks.common.config import ShardsSection
from alphaloom.tasks.common.hashing import code_version, hash_frame, hash_json, sha256_file
from alphaloom.tasks.orchestration.caching import stage_key

REQUIRED_COLUMNS = ("symbol", "date", "label", "fwd_return", "split")


INSTRUMENT_COLUMNS = ("symbol", "industry", "index")


# Bytes per row besides the factors: symbol, date, industry, index, fwd_return (4 each) + 2 int8.
ROW_OVERHEAD_BYTES = 22


MIB = 1 << 20


DICTIONARY_COLUMNS = ["symbol", "split", "label", "industry", "index"]


STATISTICS_COLUMNS = ["symbol", "date", "split", "label"]


class ShardBuildError(ValueError):
    """The inputs cannot be written as shards; the message names the input and the column."""


class TextLike(Protocol):
    """What tasks/text.py's TextVectors provides."""

    symbols: list[str]
    vectors: np.ndarray
    has_text: np.ndarray


class FeatureTableLike(Protocol):
    """What tasks/features.py's FeatureTable provides."""

    frame: pd.DataFrame
    feature_names: list[str]
    stats: dict[str, Any]
    split_dates: dict[str, Any]


def _validated_frame(
    frame: pd.DataFrame, feature_names: list[str]
) -> tuple[pd.DataFrame, np.ndarray, np.ndarray, np.ndarray]:
    """Check the feature table contract; return it sorted with symbol codes, names and days."""
    if not isinstance(frame, pd.DataFrame):
        raise ShardBuildError(f"feature table must be a DataFrame, got {type(frame).__name__}")
    if not feature_names or len(set(feature_names)) != len(feature_names):
        raise ShardBuildError(f"feature_names must be non-empty and unique, got {feature_names}")
    missing = [c for c in (*REQUIRED_COLUMNS, *feature_names) if c not in frame.columns]
    if missing:
        raise ShardBuildError(f"feature table is missing column(s) {missing}")
    if frame.empty:
        raise ShardBuildError("feature table has no rows")
    for name in feature_names:
        if not pd.api.types.is_numeric_dtype(frame[name]):
            raise ShardBuildError(f"feature column {name!r} is {frame[name].dtype}, not numeric")
    if frame["symbol"].isna().any():
        raise ShardBuildError("feature table column 'symbol' has missing values")
    if not pd.api.types.is_datetime64_any_dtype(frame["date"]) or frame["date"].isna().any():
        raise ShardBuildError(
            f"feature table column 'date' must be datetime64 without NaT, got {frame['date'].dtype}"
        )
    _check_codes(frame, "label", range(-1, 4))
    _check_codes(frame, "split", range(-1, 3))
    codes, symbols = pd.factorize(frame["symbol"].astype(str), sort=True)
    days = frame["date"].to_numpy().astype("datetime64[D]").astype(np.int64)
    order_ok = np.all((np.diff(codes) > 0) | ((np.diff(codes) == 0) & (np.diff(days) > 0)))
    if not order_ok:
        order = np.lexsort((days, codes))
        frame, codes, days = frame.take(order), codes[order], days[order]
    same = (np.diff(codes) == 0) & (np.diff(days) == 0)
    if same.any():
        row = int(np.flatnonzero(same)[0])
        raise ShardBuildError(
            f"feature table has duplicate (symbol, date) rows, e.g. "
            f"({symbols[codes[row]]}, {np.datetime64(int(days[row]), 'D')})"
        )
    return frame, codes.astype(np.int64), np.asarray(symbols, dtype=object), days


def _check_codes(frame: pd.DataFrame, column: str, allowed: range) -> None:
    values = frame[column]
    if not pd.api.types.is_integer_dtype(values):
        raise ShardBuildError(
            f"feature table column {column!r} must be integer, got {values.dtype}"
        )
    bad = ~values.isin(list(allowed))
    if bad.any():
        raise ShardBuildError(
            f"feature table column {column!r} has values outside {allowed.start}.."
            f"{allowed.stop - 1}, e.g. {values[bad].iloc[0]}"
        )


def _categories(
    instruments: pd.DataFrame | None, symbols: np.ndarray
) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """Industry and index ids per symbol (0 = unknown / none) and the id -> name lists."""
    n = len(symbols)
    if instruments is None:
        return np.zeros(n, np.int32), np.zeros(n, np.int32), [""], [""]
    missing = [c for c in INSTRUMENT_COLUMNS if c not in instruments.columns]
    if missing:
        raise ShardBuildError(f"instruments table is missing column(s) {missing}")
    table = instruments[list(INSTRUMENT_COLUMNS)].astype(object).fillna("").astype(str)
    duplicated = table["symbol"].duplicated()
    if duplicated.any():
        raise ShardBuildError(
            f"instruments table lists symbol {table['symbol'][duplicated].iloc[0]!r} twice"
        )
    table = table.set_index("symbol").reindex(list(symbols), fill_value="")
    ids, names = [], []
    for column in ("industry", "index"):
        values = sorted(set(instruments[column].astype(object).fillna("").astype(str)) - {""})
        lookup = {name: i + 1 for i, name in enumerate(values)}
        ids.append(table[column].map(lambda v, lk=lookup: lk.get(v, 0)).to_numpy(np.int32))
        names.append(["", *values])
    return ids[0], ids[1], names[0], names[1]


def _text_table(text: TextLike | None, symbols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Description vectors and has_text aligned with symbol ids (zeros where absent)."""
    if text is None:
        return np.zeros((len(symbols), 0), np.float32), np.zeros(len(symbols), bool)
    vectors = np.asarray(text.vectors, dtype=np.float32)
    has_text = np.asarray(text.has_text, dtype=bool)
    names = [str(s) for s in text.symbols]
    if vectors.ndim != 2 or not len(names) == len(vectors) == len(has_text):
        raise ShardBuildError(
            f"text vectors: {len(names)} symbols, vectors of shape {vectors.shape} and "
            f"{len(has_text)} has_text flags do not line up"
        )
    if len(set(names)) != len(names):
        raise ShardBuildError("text vectors list a symbol twice")
    if not np.isfinite(vectors).all():
        raise ShardBuildError("text vectors contain NaN or infinite values")
    rows = pd.Index(names).get_indexer(list(symbols))
    found = rows >= 0
    out = np.zeros((len(symbols), vectors.shape[1]), np.float32)
    out[found] = vectors[rows[found]]
    flags = np.zeros(len(symbols), bool)
    flags[found] = has_text[rows[found]]
    return out, flags


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
) -> str:
    """Name of a shard set: its inputs' content + the shards section + the code version."""
    inputs = [
        hash_frame(frame),
        hash_json(_jsonable({"features": feature_names, "stats": stats, "splits": split_dates})),
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
        "bytes": path.stat().st_size,
        "sha256": sha256_file(path),
        "symbols": np.unique(arrays.symbol).tolist(),
        "first_date": str(np.datetime64(int(arrays.date.min()), "D")),
        "last_date": str(np.datetime64(int(arrays.date.max()), "D")),
        "windows": window_histograms(arrays, window),
    }


def write_side_tables(
    out: Path,
    symbols: np.ndarray,
    industry: np.ndarray,
    index: np.ndarray,
    industries: list[str],
    indices: list[str],
    text: np.ndarray,
    has_text: np.ndarray,
) -> dict[str, str]:
    """Write symbols.parquet, names.parquet and text.npy; return their sha256 by file name."""
    ids = np.arange(len(symbols), dtype=np.int32)
    pq.write_table(
        pa.table(
            {
                "symbol_id": ids,
                "symbol": pa.array([str(s) for s in symbols], pa.string()),
                "industry": industry.astype(np.int32),
                "index": index.astype(np.int32),
                "text_row": ids,
                "has_text": has_text.astype(bool),
            }
        ),
        out / SYMBOLS_NAME,
    )
    kinds = ["industry"] * len(industries) + ["index"] * len(indices)
    name_ids = list(range(len(industries))) + list(range(len(indices)))
    pq.write_table(
        pa.table(
            {"kind": kinds, "id": pa.array(name_ids, pa.int32()), "name": industries + indices}
        ),
        out / NAMES_NAME,
    )
    np.save(out / TEXT_NAME, np.ascontiguousarray(text, dtype=np.float32), allow_pickle=False)
    return {name: sha256_file(out / name) for name in (SYMBOLS_NAME, NAMES_NAME, TEXT_NAME)}


def write_manifest(
    out: Path,
    *,
    key: str,
    cfg: ShardsSection,
    feature_names: list[str],
    entries: list[dict[str, Any]],
    side_tables: dict[str, str],
    text_dim: int,
    n_symbols: int,
    n_industries: int,
    n_indices: int,
    split_dates: dict[str, Any],
    stats: dict[str, Any],
    source_hash: str,
) -> dict[str, Any]:
    """Assemble and write manifest.json. Call it last: its presence marks the set complete."""
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "key": key,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "feature_names": feature_names,
        "n_features": len(feature_names),
        "x_layout": X_LAYOUT,
        "window": cfg.window,
        "text_dim": text_dim,
        "n_symbols": n_symbols,
        "n_industries": n_industries,
        "n_indices": n_indices,
        "rows": sum(entry["rows"] for entry in entries),
        "first_date": min(entry["first_date"] for entry in entries),
        "last_date": max(entry["last_date"] for entry in entries),
        "splits": split_dates,
        "stats": stats,
        "source_hash": source_hash,
        "code_version": code_version(*shard_code_modules()),
        "config": cfg.model_dump(mode="json"),
        "side_tables": side_tables,
        "windows": summarize_windows(entries, cfg.window),
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
    codes: np.ndarray,
    days: np.ndarray,
    industry: np.ndarray,
    index: np.ndarray,
) -> dict[str, np.ndarray]:
    """The non-factor columns of sorted `frame` rows, with symbol ids `codes` of the whole set."""
    return {
        "symbol": codes.astype(np.int32),
        "date": days.astype(np.int32),
        "split": frame["split"].to_numpy(np.int8),
        "label": frame["label"].to_numpy(np.int8),
        "fwd_return": frame["fwd_return"].to_numpy(np.float32, na_value=np.nan),
        "industry": industry[codes],
        "index": index[codes],
    }


def _shard_arrays(
    frame: pd.DataFrame,
    rows: np.ndarray,
    columns: dict[str, np.ndarray],
    feature_positions: list[int],
    feature_names: list[str],
) -> ShardArrays:
    """One shard's arrays; the factors are checked finite here, one shard at a time."""
    x = frame.iloc[rows, feature_positions].to_numpy(dtype=np.float32)
    finite = np.isfinite(x)
    if not finite.all():
        row, col = np.argwhere(~finite)[0]
        raise ShardBuildError(
            f"feature column {feature_names[col]!r} has a NaN or infinite value (symbol "
            f"{frame['symbol'].iloc[rows[row]]}, date {frame['date'].iloc[rows[row]]}); "
            "factors must be normalised and filled before sharding"
        )
    return ShardArrays(
        symbol=columns["symbol"][rows],
        date=columns["date"][rows],
        split=columns["split"][rows],
        label=columns["label"][rows],
        fwd_return=columns["fwd_return"][rows],
        industry=columns["industry"][rows],
        index=columns["index"][rows],
        x=x,
    )
