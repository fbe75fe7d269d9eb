"""The market's trading calendar and each bar's place on it.

Why: a symbol's rows are not its trading days. A halt, a suspension or a vendor's gap removes
rows, and anything that counts rows (a "1-day" label, a 30-day window) then silently spans
more of the market's days. Labels (tasks/data/labels.py) and model windows
(tasks/dataset/shard_writer.py) count positions on this calendar instead.

The calendar is the sorted union of the dates in the data: a day on which any symbol traded.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd


def trading_calendar(dates: pd.Series | np.ndarray | Iterable) -> np.ndarray:
    """Sorted unique trading days as datetime64[D]."""
    return np.unique(np.asarray(pd.to_datetime(np.asarray(dates)), dtype="datetime64[D]"))


def calendar_positions(dates: pd.Series | np.ndarray, calendar: np.ndarray) -> np.ndarray:
    """Position of each date on the calendar (int64); a date not on it is an error."""
    days = np.asarray(pd.to_datetime(np.asarray(dates)), dtype="datetime64[D]")
    cal = np.asarray(calendar, dtype="datetime64[D]")
    pos = np.searchsorted(cal, days)
    bad = (pos >= len(cal)) | (cal[np.clip(pos, 0, len(cal) - 1)] != days)
    if bad.any():
        raise ValueError(f"date {days[bad][0]} is not on the trading calendar")
    return pos.astype(np.int64)


def fill_gaps(
    codes: np.ndarray, positions: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every calendar position of each symbol from its first to its last bar.

    `codes` (symbol ids) and `positions` (calendar positions) are sorted by (symbol, date).
    Returns (source, codes, positions) of the filled rows: `source` is the input row of each
    filled row, or -1 where the symbol has no bar that day (an interior gap). Days before a
    symbol's first bar or after its last (not listed yet, delisted) are not filled.
    """
    n = len(codes)
    if n == 0:
        return np.zeros(0, np.int64), codes.astype(np.int64), positions.astype(np.int64)
    same = np.r_[False, codes[1:] == codes[:-1]]
    step = np.ones(n, np.int64)
    step[same] = positions[1:][same[1:]] - positions[:-1][same[1:]]
    if (step < 1).any():
        raise ValueError("fill_gaps: rows must be sorted by (symbol, date) without repeats")
    step[~same] = 1
    out_index = np.cumsum(step) - 1  # where each input row lands in the filled rows
    total = int(out_index[-1]) + 1
    source = np.full(total, -1, np.int64)
    source[out_index] = np.arange(n)
    anchor = source[np.maximum.accumulate(np.where(source >= 0, np.arange(total), 0))]
    filled_codes = codes[anchor].astype(np.int64)  # a gap row belongs to the bar before it
    offset = np.arange(total) - out_index[anchor]
    filled_positions = positions[anchor].astype(np.int64) + offset
    return source, filled_codes, filled_positions
