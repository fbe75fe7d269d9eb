"""The on-disk shard format: columns, the packed factor column, windows, day numbers.

Rows follow the market's trading calendar: each symbol has one row per trading day from its
first bar to its last, and a day it has no bar (a halt, a gap in the vendor's file) is a row
with `bar` = 0, zero factors and no label. So a window of T rows is T trading days; its
gap days are masked, never concatenated away, and `valid` counts the symbol's own bars in it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

SCHEMA_VERSION = 2


MANIFEST_NAME = "manifest.json"


SYMBOLS_NAME = "symbols.parquet"


NAMES_NAME = "names.parquet"


TEXT_NAME = "text.npy"


TEXTS_NAME = "texts.parquet"


SPLIT_CODES = {"train": 0, "valid": 1, "test": 2}


ALL_KEY = "all"


WINDOW_KEYS = (*SPLIT_CODES, ALL_KEY)


X_LAYOUT = "fixed_size_binary(4*n_features): little-endian float32 factors of one row"


SHARD_COLUMNS = (
    "symbol",
    "date",
    "split",
    "label",
    "fwd_return",
    "industry",
    "index",
    "text_row",
    "bar",
    "x",
)


MANIFEST_KEYS = (
    "schema_version",
    "feature_names",
    "n_features",
    "window",
    "text_dim",
    "n_symbols",
    "n_industries",
    "n_indices",
    "last_date",
    "splits",
    "side_tables",
    "shards",
)


class ShardSetError(RuntimeError):
    """A shard set is incomplete, corrupt or of another schema; the message says how to rebuild."""


def rebuild_hint(shard_dir: str | Path) -> str:
    """The one sentence every integrity error ends with."""
    return (
        f"delete the shard-set directory {shard_dir} and rerun the pipeline "
        "(`alphaloom run`) to rebuild it"
    )


@dataclass
class ShardArrays:
    """One shard's columns as numpy arrays; rows sorted by (symbol, date)."""

    symbol: np.ndarray  # int32 symbol id
    date: np.ndarray  # int32 days since 1970-01-01
    split: np.ndarray  # int8: 0 train, 1 valid, 2 test, -1 none
    label: np.ndarray  # int8: 0..3, -1 unknown
    fwd_return: np.ndarray  # float32, NaN unknown
    industry: np.ndarray  # int32, 0 unknown (the instrument row valid on the date)
    index: np.ndarray  # int32, 0 none
    text_row: np.ndarray  # int32 row of text.npy, -1 none (the description valid on the date)
    bar: np.ndarray  # int8: 1 the symbol has a bar that day, 0 a gap day (zero factors)
    x: np.ndarray  # float32 [rows, F]

    def __len__(self) -> int:
        return len(self.symbol)


def encode_x(x: np.ndarray) -> pa.Array:
    """[rows, F] float32 -> one fixed-size binary value per row.

    Measured against a FixedSizeList<float32>[F] column and F separate columns (200k rows x 158,
    uncompressed): fixed-size binary reads ~10x faster than the list and ~8x faster than the
    columns, because it decodes as one flat buffer that numpy views without a copy.
    """
    x = np.ascontiguousarray(x, dtype="<f4")
    rows, width = x.shape
    return pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(4 * width), rows, [None, pa.py_buffer(x.reshape(-1).view(np.uint8))]
    )


def decode_x(column: pa.ChunkedArray | pa.Array, n_features: int) -> np.ndarray:
    """The inverse of `encode_x`: a read-only [rows, F] float32 view of the column's buffer."""
    if isinstance(column, pa.ChunkedArray):
        column = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
    array = column
    data = array.buffers()[1]
    width = 4 * n_features
    return np.frombuffer(
        data, dtype="<f4", count=len(array) * n_features, offset=array.offset * width
    ).reshape(len(array), n_features)


def shard_table(arrays: ShardArrays) -> pa.Table:
    """The parquet table of one shard (the one place the shard layout is defined)."""
    return pa.table(
        {
            "symbol": pa.array(arrays.symbol, pa.int32()),
            "date": pa.array(arrays.date, pa.int32()),
            "split": pa.array(arrays.split, pa.int8()),
            "label": pa.array(arrays.label, pa.int8()),
            "fwd_return": pa.array(arrays.fwd_return, pa.float32()),
            "industry": pa.array(arrays.industry, pa.int32()),
            "index": pa.array(arrays.index, pa.int32()),
            "text_row": pa.array(arrays.text_row, pa.int32()),
            "bar": pa.array(arrays.bar, pa.int8()),
            "x": encode_x(arrays.x),
        }
    )


def window_spans(symbol: np.ndarray, window: int) -> np.ndarray:
    """Per row: how many of the window's T rows belong to the row's own symbol (<= T).

    Rows are sorted by (symbol, date), so a symbol's rows are one run; a window reaches back
    min(position in run + 1, T) rows (trading days) without leaving its symbol.
    """
    n = len(symbol)
    if n == 0:
        return np.zeros(0, np.int16)
    run_starts = np.flatnonzero(np.r_[True, symbol[1:] != symbol[:-1]])
    run_lengths = np.diff(np.r_[run_starts, n])
    position = np.arange(n) - np.repeat(run_starts, run_lengths)
    return np.minimum(position + 1, window).astype(np.int16)


def valid_lengths(symbol: np.ndarray, window: int, bar: np.ndarray | None = None) -> np.ndarray:
    """Per row: how many of the window's T trading days the symbol has a bar on (<= span).

    `bar` (1 = a bar, 0 = a gap day) defaults to every row being a bar, where this equals
    `window_spans`. `loader.min_valid_days` is compared with this count.
    """
    spans = window_spans(symbol, window)
    if bar is None:
        return spans
    bars = np.r_[0, np.cumsum(bar, dtype=np.int64)]
    ends = np.arange(1, len(symbol) + 1)
    return (bars[ends] - bars[ends - spans]).astype(np.int16)


@dataclass(frozen=True)
class Selection:
    """Which rows end an emitted window: a bar on the end day, split, known label, history,
    dates."""

    split: int | None
    min_valid: int
    dates: np.ndarray | None = None

    def mask(self, arrays: ShardArrays, valid: np.ndarray) -> np.ndarray:
        """Boolean mask of window end rows (the writer's window counts use the same rule)."""
        keep = (valid >= self.min_valid) & (arrays.bar == 1)
        if self.split is not None:
            keep &= (arrays.split == self.split) & (arrays.label >= 0)
        if self.dates is not None:
            keep &= np.isin(arrays.date, self.dates)
        return keep


def window_histograms(arrays: ShardArrays, window: int) -> dict[str, list[int]]:
    """Per window key, counts of emit-able windows by valid length 1..T (for the manifest).

    Any loader's `min_valid_days` m then gives its exact count as sum(counts[m-1:]) without
    reading the shard, which is what lets every rank equalise batch counts without talking.
    """
    valid = valid_lengths(arrays.symbol, window, arrays.bar)
    out = {}
    for key in WINDOW_KEYS:
        selected = Selection(SPLIT_CODES.get(key), 1).mask(arrays, valid)
        out[key] = np.bincount(valid[selected], minlength=window + 1)[1:].tolist()
    return out


def dates_to_days(values: Iterable[Any] | np.ndarray) -> np.ndarray:
    """Dates (datetime64, date, Timestamp or ISO string) -> int64 days since 1970-01-01."""
    items = values if isinstance(values, np.ndarray) else list(values)
    return np.asarray(items, dtype="datetime64[D]").astype(np.int64)


def days_to_dates(days: np.ndarray | torch.Tensor | Sequence[int]) -> np.ndarray:
    """int days since 1970-01-01 (a batch's `date`) -> datetime64[D]."""
    if isinstance(days, torch.Tensor):
        days = days.cpu().numpy()
    return np.asarray(days, dtype=np.int64).astype("datetime64[D]")
