"""The rows of a feature table as a shard set is cut from them: checked, sorted, symbol ids.

Both ways of running the shards stage start here: the single task checks the whole table
(`FeatureRows.check`) and takes each shard's rows from it (`of_symbols`); a fan-out task checks
the rows it read for its shard's symbols and numbers them as the whole set does (`in_set`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pandas as pd

from alphaloom.tasks.data.trading_calendar import trading_calendar
from alphaloom.tasks.dataset.row_layout import ShardBuildError, calendar_rows

REQUIRED_COLUMNS = ("symbol", "date", "label", "fwd_return", "split")


@dataclass(frozen=True)
class FeatureRows:
    """Rows of a feature table as shards are cut from them: checked, sorted by (symbol, date).

    `codes` (symbol ids: positions in `symbols`, the set's sorted symbol names) and `days` (days
    since 1970-01-01) have one value per row of `frame`; `calendar` holds the trading days
    (datetime64[D]) on which the rows are laid out, gap days included.
    """

    frame: pd.DataFrame
    codes: np.ndarray
    days: np.ndarray
    symbols: np.ndarray
    feature_names: list[str]
    split_dates: dict[str, Any]
    calendar: np.ndarray

    @classmethod
    def check(
        cls,
        frame: pd.DataFrame,
        feature_names: list[str],
        split_dates: dict[str, Any],
        calendar: list[str] | None = None,
    ) -> FeatureRows:
        """The feature table's rows, sorted, after checking its contract (ShardBuildError names
        the column); `calendar` None: the union of the table's dates."""
        if not isinstance(frame, pd.DataFrame):
            raise ShardBuildError(f"feature table must be a DataFrame, got {type(frame).__name__}")
        if not feature_names or len(set(feature_names)) != len(feature_names):
            raise ShardBuildError(
                f"feature_names must be non-empty and unique, got {feature_names}"
            )
        missing = [c for c in (*REQUIRED_COLUMNS, *feature_names) if c not in frame.columns]
        if missing:
            raise ShardBuildError(f"feature table is missing column(s) {missing}")
        if frame.empty:
            raise ShardBuildError("feature table has no rows")
        for name in feature_names:
            if not pd.api.types.is_numeric_dtype(frame[name]):
                raise ShardBuildError(
                    f"feature column {name!r} is {frame[name].dtype}, not numeric"
                )
        if frame["symbol"].isna().any():
            raise ShardBuildError("feature table column 'symbol' has missing values")
        if not pd.api.types.is_datetime64_any_dtype(frame["date"]) or frame["date"].isna().any():
            raise ShardBuildError(
                "feature table column 'date' must be datetime64 without NaT, got "
                f"{frame['date'].dtype}"
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
        cal = trading_calendar(days.astype("datetime64[D]")) if calendar is None else calendar
        return cls(
            frame,
            codes.astype(np.int64),
            days,
            np.asarray(symbols, dtype=object),
            list(feature_names),
            split_dates,
            np.asarray(cal, dtype="datetime64[D]"),
        )

    def rows_per_symbol(self) -> np.ndarray:
        """Calendar rows of each symbol id (`calendar_rows_per_symbol`): the plan's weights."""
        return calendar_rows_per_symbol(self.codes, self.days, self.calendar, len(self.symbols))

    def of_symbols(self, ids: Sequence[int]) -> FeatureRows:
        """The rows of the symbols with these ids (sorted), which keep their ids."""
        starts = np.searchsorted(self.codes, ids, side="left")
        stops = np.searchsorted(self.codes, ids, side="right")
        picked = np.concatenate([np.arange(a, b) for a, b in zip(starts, stops, strict=True)])
        return replace(
            self, frame=self.frame.take(picked), codes=self.codes[picked], days=self.days[picked]
        )

    def in_set(self, symbols: np.ndarray) -> FeatureRows:
        """The same rows with ids into `symbols`: the sorted names of a set holding theirs."""
        codes = np.searchsorted(symbols, self.symbols)[self.codes]
        return replace(self, codes=codes.astype(np.int64), symbols=symbols)


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


def calendar_rows_per_symbol(
    codes: np.ndarray,
    days: np.ndarray,
    calendar: np.ndarray | list[str] | None,
    n_symbols: int,
) -> np.ndarray:
    """Rows of each symbol id laid out on the calendar (gap days included) from rows sorted by
    (symbol id, day): the weights of `plan_shards`, from the table or its key columns alone."""
    rows = calendar_rows(codes, days, calendar)
    return np.bincount(rows.codes, minlength=n_symbols)
