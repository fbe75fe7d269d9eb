"""Which windows of a shard set are held out: the splits to evaluate and the promotion window.

A shard manifest records each window's first and last date under `splits` (written by the
features stage, tasks/data/splits.py). Fraction and date layouts always have a test split;
rolling layouts may have none (the production mode) and then have a promotion window instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from alphaloom.tasks.data.splits import PROMOTION

EVALUATED_SPLITS = ("valid", "test")


@dataclass(frozen=True)
class DateWindow:
    """A named range of trading dates of a shard set (both ends included)."""

    name: str
    first: pd.Timestamp
    last: pd.Timestamp

    def dates(self) -> pd.DatetimeIndex:
        """Every calendar day of the window: a filter, so non-trading days simply match nothing."""
        return pd.date_range(self.first, self.last, freq="D")

    def label(self) -> str:
        return f"{self.name} {self.first:%Y-%m-%d}..{self.last:%Y-%m-%d}"


def split_bounds(shard_dir: str | Path) -> dict[str, list[str]]:
    """{window name: [first date, last date]} from the shard set's manifest."""
    from alphaloom.model.shard_set import read_manifest

    return dict(read_manifest(shard_dir).get("splits") or {})


def evaluated_splits(shard_dir: str | Path) -> tuple[str, ...]:
    """The splits the evaluation stage scores: valid, and test when the layout has one."""
    bounds = split_bounds(shard_dir)
    return tuple(name for name in EVALUATED_SPLITS if name in bounds)


def promotion_window(shard_dir: str | Path) -> DateWindow:
    """The window on which champion and challenger are compared: the promotion window when the
    splits have one, else the test split. Neither is used for training or model selection."""
    bounds = split_bounds(shard_dir)
    for name in (PROMOTION, "test"):
        if name in bounds:
            first, last = bounds[name]
            return DateWindow(name, pd.Timestamp(first), pd.Timestamp(last))
    raise ValueError(
        f"{shard_dir}/manifest.json: splits {sorted(bounds)} have neither a promotion window "
        "nor a test split to compare models on; set features.splits.promotion_days"
    )
