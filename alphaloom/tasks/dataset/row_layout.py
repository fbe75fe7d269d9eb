"""Shard rows on the trading calendar, each with the instrument fields valid on its date.

Why here: a model window of T rows must be T trading days, so a symbol's interior gap days
become rows (`bar` = 0, zero factors, no label) between its first and last bar; and with dated
instruments (tasks/data/instruments.py) a row's industry, index and description are those of the
instrument row valid on its date, so they are per shard row, not per symbol. Without dates every
row of a symbol gets the same ids and its text row is its symbol id, as cheap as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import pandas as pd

from alphaloom.tasks.data.instruments import canonical, empty_instruments, valid_rows
from alphaloom.tasks.data.trading_calendar import calendar_positions, fill_gaps, trading_calendar


class ShardBuildError(ValueError):
    """The inputs cannot be written as shards; the message names the input and the column."""


class TextLike(Protocol):
    """What tasks/dataset/text.py's TextVectors provides."""

    symbols: list[str]
    starts: list[str]
    vectors: np.ndarray
    has_text: np.ndarray


@dataclass
class CalendarRows:
    """The rows of a sorted feature frame laid out on the calendar, gap days included."""

    source: np.ndarray  # row of the frame, -1 on a day the symbol has no bar
    codes: np.ndarray  # symbol id
    days: np.ndarray  # days since 1970-01-01

    def __len__(self) -> int:
        return len(self.source)

    @property
    def bar(self) -> np.ndarray:
        return (self.source >= 0).astype(np.int8)


def calendar_rows(
    codes: np.ndarray, days: np.ndarray, calendar: list[str] | np.ndarray | None
) -> CalendarRows:
    """Every trading day of each symbol from its first to its last bar.

    `codes` / `days` (int days since 1970-01-01) are sorted by (symbol, date); `calendar` is the
    market's trading days (None: the union of `days`, right for a frame of all symbols).
    """
    as_dates = np.asarray(days, dtype="datetime64[D]")
    cal = trading_calendar(as_dates) if calendar is None else np.asarray(calendar, "datetime64[D]")
    try:
        positions = calendar_positions(as_dates, cal)
    except ValueError as err:
        raise ShardBuildError(f"feature table: {err}") from None
    source, filled_codes, filled_positions = fill_gaps(codes, positions)
    return CalendarRows(source, filled_codes, cal[filled_positions].astype(np.int64))


def split_of_days(
    days: np.ndarray, split_dates: dict[str, Any], codes: dict[str, int]
) -> np.ndarray:
    """Split code (-1 none) of each day from the splits' [first, last] dates."""
    out = np.full(len(days), -1, np.int8)
    day = np.asarray(days, dtype=np.int64)
    for name, (first, last) in split_dates.items():
        lo, hi = (np.datetime64(str(d)[:10], "D").astype(np.int64) for d in (first, last))
        out[(day >= lo) & (day <= hi)] = codes[name]
    return out


@dataclass
class InstrumentLayout:
    """Instrument rows of a shard set's symbols, their category ids and their text rows.

    Text rows are these instrument rows in (symbol id, start date) order; undated instruments
    have one per symbol, so a symbol's text row is its id.
    """

    table: pd.DataFrame  # canonical instruments, one row per text row
    industry: np.ndarray  # int32 id per instrument row, 0 = unknown
    index: np.ndarray  # int32 id per instrument row, 0 = none
    industries: list[str]  # id -> name
    indices: list[str]

    @classmethod
    def build(cls, instruments: pd.DataFrame | None, symbols: np.ndarray) -> InstrumentLayout:
        names = [str(s) for s in symbols]
        if instruments is None:
            table = empty_instruments(names)
        else:
            missing = [c for c in ("symbol", "industry", "index") if c not in instruments.columns]
            if missing:
                raise ShardBuildError(f"instruments table is missing column(s) {missing}")
            given = canonical(instruments)
            dup = given.duplicated(["symbol", "start_date"])
            if dup.any():
                raise ShardBuildError(
                    f"instruments table lists symbol {given['symbol'][dup].iloc[0]!r} twice"
                )
            held = given[given["symbol"].isin(names)]
            absent = empty_instruments(sorted(set(names) - set(held["symbol"])))
            table = canonical(pd.concat([held, absent], ignore_index=True))
        order = pd.Index(names).get_indexer(table["symbol"])
        start = table["start_date"].fillna(pd.Timestamp.min).to_numpy()
        table = table.iloc[np.lexsort((start, order))]
        table = table.reset_index(drop=True)
        source = table if instruments is None else canonical(instruments)
        ids, lists = [], []
        for column in ("industry", "index"):
            values = sorted(set(source[column]) - {""})
            lookup = {name: i + 1 for i, name in enumerate(values)}
            ids.append(table[column].map(lambda v, lk=lookup: lk.get(v, 0)).to_numpy(np.int32))
            lists.append(["", *values])
        return cls(table, ids[0], ids[1], lists[0], lists[1])

    def rows_of(self, symbols: np.ndarray, days: np.ndarray) -> np.ndarray:
        """The instrument (= text) row valid on each (symbol name, day), -1 if none."""
        return valid_rows(self.table, symbols, np.asarray(days, dtype="datetime64[D]"))

    def fields(self, symbols: np.ndarray, days: np.ndarray) -> dict[str, np.ndarray]:
        """industry, index and text_row of each (symbol name, day)."""
        rows = self.rows_of(symbols, days)
        found = rows >= 0
        safe = np.where(found, rows, 0)
        return {
            "industry": np.where(found, self.industry[safe], 0).astype(np.int32),
            "index": np.where(found, self.index[safe], 0).astype(np.int32),
            "text_row": rows.astype(np.int32),
        }

    def latest(self, symbols: np.ndarray) -> np.ndarray:
        """Each symbol's last instrument row (what the per-symbol side table shows)."""
        names = self.table["symbol"].to_numpy()
        last = np.flatnonzero(np.r_[names[1:] != names[:-1], True])
        return last[pd.Index(names[last]).get_indexer([str(s) for s in symbols])]

    def text_keys(self) -> list[tuple[str, str]]:
        """(symbol, start date or "") of each text row, how text vectors are matched."""
        starts = self.table["start_date"].dt.strftime("%Y-%m-%d").fillna("")
        return list(zip(self.table["symbol"], starts, strict=True))

    def text_vectors(self, text: TextLike | None) -> tuple[np.ndarray, np.ndarray]:
        """Description vectors and has_text flags aligned with the text rows (zeros where
        `text` has no vector for a row)."""
        n = len(self.table)
        if text is None:
            return np.zeros((n, 0), np.float32), np.zeros(n, bool)
        vectors = np.asarray(text.vectors, dtype=np.float32)
        has_text = np.asarray(text.has_text, dtype=bool)
        starts = list(getattr(text, "starts", None) or [""] * len(text.symbols))
        keys = list(zip((str(s) for s in text.symbols), starts, strict=False))
        if vectors.ndim != 2 or not len(keys) == len(vectors) == len(has_text) == len(starts):
            raise ShardBuildError(
                f"text vectors: {len(keys)} symbols, vectors of shape {vectors.shape} and "
                f"{len(has_text)} has_text flags do not line up"
            )
        if len(set(keys)) != len(keys):
            raise ShardBuildError("text vectors list a (symbol, start date) twice")
        if not np.isfinite(vectors).all():
            raise ShardBuildError("text vectors contain NaN or infinite values")
        at = {key: i for i, key in enumerate(keys)}
        rows = np.array([at.get(key, -1) for key in self.text_keys()], dtype=np.int64)
        found = rows >= 0
        out = np.zeros((n, vectors.shape[1]), np.float32)
        out[found] = vectors[rows[found]]
        flags = np.zeros(n, bool)
        flags[found] = has_text[rows[found]]
        return out, flags


def label_coverage(frame: pd.DataFrame, split_codes: dict[str, int]) -> dict[str, dict[str, int]]:
    """Per split: its bars, and those without a forward return on a day whose forward return
    is known for some other symbol (the symbol had no bar on the entry or exit day, e.g. halted
    or delisted), as opposed to the last days of the data, where nobody's is known."""
    known = frame["fwd_return"].notna().to_numpy()
    day_known = pd.Series(known).groupby(frame["date"].to_numpy()).transform("any").to_numpy()
    split = frame["split"].to_numpy()
    out = {}
    for name, code in split_codes.items():
        rows = split == code
        out[name] = {
            "rows": int(rows.sum()),
            "rows_no_fwd_return": int((rows & ~known & day_known).sum()),
        }
    return out
