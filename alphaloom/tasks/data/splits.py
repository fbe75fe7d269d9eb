"""Date splits (train / valid / test, and the promotion window) with a purge gap, as split codes
per row.

Two layouts. Fixed: explicit end dates or fractions of the calendar, counted from its start (a
backtest of one period). Rolling (`valid_days` set): trailing lengths counted back from the
newest day, so a nightly retrain on a calendar that grows keeps its validation, promotion and
test windows on the newest days and trains on everything before them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from alphaloom.tasks.common.config import (
    SplitSection,
)

SPLIT_CODES = {"train": 0, "valid": 1, "test": 2}


PURGED = -1  # in no split: purge gaps, days after test_end, the promotion window


PROMOTION = "promotion"  # a window in the bounds only: the registry selects its days by date


def resolve_purge_days(splits: SplitSection, horizon: int) -> int:
    """The purge gap in trading days: configured, else horizon + 1; below horizon is an error."""
    purge = horizon + 1 if splits.purge_days is None else splits.purge_days
    if purge < horizon:
        raise ValueError(
            f"features.splits.purge_days ({purge}) must be >= features.label.horizon ({horizon}): "
            "a shorter gap lets training labels overlap validation days"
        )
    return purge


def _end_index(calendar: pd.DatetimeIndex, end: Any, fraction_end: int) -> int:
    """Index of the last date of a split: an explicit end date wins over the fraction."""
    if end is None:
        return fraction_end
    return int(calendar.searchsorted(pd.Timestamp(end), side="right")) - 1


def _start_index(calendar: pd.DatetimeIndex, start: Any) -> int:
    """Index of the first date on or after `start`."""
    return int(calendar.searchsorted(pd.Timestamp(start), side="left"))


def _fixed_ranges(
    calendar: pd.DatetimeIndex, splits: SplitSection, purge: int
) -> dict[str, tuple[int, int]]:
    """(first, last) calendar index of each split from end dates or fractions, start first."""
    n = len(calendar)
    train_last = _end_index(calendar, splits.train_end, round(splits.train_fraction * n) - 1)
    valid_first = train_last + 1 + purge
    valid_last = _end_index(
        calendar, splits.valid_end, valid_first + round(splits.valid_fraction * n) - 1
    )
    test_first = valid_last + 1 + purge
    test_last = _end_index(calendar, splits.test_end, n - 1)
    train_first = 0 if splits.train_start is None else _start_index(calendar, splits.train_start)
    return {
        "train": (train_first, train_last),
        "valid": (valid_first, valid_last),
        "test": (test_first, test_last),
    }


def _rolling_ranges(n: int, splits: SplitSection, purge: int) -> dict[str, tuple[int, int]]:
    """(first, last) calendar index of each split from trailing lengths, newest window first:
    test, promotion, valid, then train (all the rest, or its last `train_days`)."""
    assert splits.valid_days is not None
    ranges: dict[str, tuple[int, int]] = {}
    last = n - 1
    for name, length in (
        ("test", splits.test_days),
        (PROMOTION, splits.promotion_days),
        ("valid", splits.valid_days),
    ):
        if length:
            ranges[name] = (last - length + 1, last)
            last -= length + purge
    first = 0 if splits.train_days is None else max(0, last - splits.train_days + 1)
    ranges["train"] = (first, last)
    return {name: ranges[name] for name in ("train", "valid", PROMOTION, "test") if name in ranges}


def _describe(splits: SplitSection) -> str:
    """The settings that placed the splits, for an error message."""
    if splits.rolling:
        keys = ("valid_days", "promotion_days", "test_days", "train_days")
    else:
        keys = ("train_start", "train_end", "valid_end", "test_end", "train_fraction",
                "valid_fraction")  # fmt: skip
    return ", ".join(f"{key}={getattr(splits, key)}" for key in keys)


def assign_splits(
    dates: pd.Series, splits: SplitSection, horizon: int
) -> tuple[np.ndarray, dict[str, list[str]]]:
    """Split code per row (0 train, 1 valid, 2 test, -1 in no split) and each window's first/last
    date ("train", "valid", and "test" and "promotion" when the layout has them).

    The calendar is the sorted unique dates. `purge_days` trading days are dropped between
    neighbouring windows, so the last training label (which reads close up to t + 1 + horizon)
    ends before the first validation day when purge_days = horizon + 1. Days after `test_end`
    and before `train_start` (when set) are in no split; so are the promotion window's, which
    no model trains or selects on: the registry scores champion and challenger on them by date.
    """
    purge = resolve_purge_days(splits, horizon)
    calendar = pd.DatetimeIndex(np.unique(pd.to_datetime(dates).to_numpy("datetime64[ns]")))
    n = len(calendar)
    if splits.rolling:
        ranges = _rolling_ranges(n, splits, purge)
    else:
        ranges = _fixed_ranges(calendar, splits, purge)
    for name, (first, last) in ranges.items():
        if not 0 <= first <= last < n:
            raise ValueError(
                f"features.splits: no {name} dates with {n} trading dates, "
                f"{_describe(splits)}, purge_days={purge}"
            )
    by_day = np.full(n, PURGED, dtype=np.int8)
    for name, (first, last) in ranges.items():
        by_day[first : last + 1] = SPLIT_CODES.get(name, PURGED)
    rows = calendar.searchsorted(pd.to_datetime(dates).to_numpy("datetime64[ns]"))
    bounds = {
        name: [calendar[first].date().isoformat(), calendar[last].date().isoformat()]
        for name, (first, last) in ranges.items()
    }
    return by_day[rows], bounds
