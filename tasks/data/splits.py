"""Date splits (train / valid / test) with a purge gap, as split codes per row."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from alphaloom.tasks.common.config import (
    SplitSection,
)

SPLIT_CODES = {"train": 0, "valid": 1, "test": 2}


PURGED = -1


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


def assign_splits(
    dates: pd.Series, splits: SplitSection, horizon: int
) -> tuple[np.ndarray, dict[str, list[str]]]:
    """Split code per row (0 train, 1 valid, 2 test, -1 purged) and each split's first/last date.

    The calendar is the sorted unique dates. `purge_days` trading days are dropped between train
    and valid and between valid and test, so the last training label (which reads close up to
    t + 1 + horizon) ends before the first validation day when purge_days = horizon + 1. Days
    after `test_end` and before `train_start` (when set) are in no split.
    """
    purge = resolve_purge_days(splits, horizon)
    calendar = pd.DatetimeIndex(np.unique(pd.to_datetime(dates).to_numpy("datetime64[ns]")))
    n = len(calendar)
    train_last = _end_index(calendar, splits.train_end, round(splits.train_fraction * n) - 1)
    valid_first = train_last + 1 + purge
    valid_last = _end_index(
        calendar, splits.valid_end, valid_first + round(splits.valid_fraction * n) - 1
    )
    test_first = valid_last + 1 + purge
    test_last = _end_index(calendar, splits.test_end, n - 1)
    train_first = 0 if splits.train_start is None else _start_index(calendar, splits.train_start)
    ranges = {
        "train": (train_first, train_last),
        "valid": (valid_first, valid_last),
        "test": (test_first, test_last),
    }
    for name, (first, last) in ranges.items():
        if not 0 <= first <= last < n:
            raise ValueError(
                f"features.splits: no {name} dates with {n} trading dates, "
                f"train_start={splits.train_start}, train_end={splits.train_end}, "
                f"valid_end={splits.valid_end}, "
                f"train_fraction={splits.train_fraction}, valid_fraction={splits.valid_fraction}, "
                f"purge_days={purge}"
            )
    by_day = np.full(n, PURGED, dtype=np.int8)
    for name, (first, last) in ranges.items():
        by_day[first : last + 1] = SPLIT_CODES[name]
    rows = calendar.searchsorted(pd.to_datetime(dates).to_numpy("datetime64[ns]"))
    bounds = {
        name: [calendar[first].date().isoformat(), calendar[last].date().isoformat()]
        for name, (first, last) in ranges.items()
    }
    return by_day[rows], bounds
