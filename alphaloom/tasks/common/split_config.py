"""features.splits: how the trading calendar is cut into train, valid and test.

Apart from tasks/common/config.py because its rules (three modes that cannot be mixed) are the
longest of any section.
"""

from __future__ import annotations

import datetime as dt

from pydantic import Field, model_validator

from alphaloom.tasks.common.config_section import Section


class SplitSection(Section):
    """Date splits: by explicit end dates (which win over fractions), by fractions of the trading
    calendar, or rolling, by trailing lengths counted back from the newest day (`valid_days`).

    `test_end` (optional) ends the test split: later days are in no split (a backtest of an
    earlier period on data that goes on). `train_start` (optional) starts the train split:
    earlier days are in no split but still give windows their history (a walk-forward period's
    rolling window, tasks/backtest/periods.py).

    Rolling splits keep their windows pinned to the newest data as the calendar grows, so a
    nightly retrain trains on everything up to its validation window. From the end:
    `test_days` (0: no test split, the production mode), then `promotion_days` (the window on
    which the registry compares champion and challenger: neither selected on it), then
    `valid_days`, then training (at most `train_days`, default all that is left), with
    `purge_days` between neighbours. Without a promotion window the registry uses the test split.
    The fractions are ignored in rolling mode; explicit end dates cannot be combined with it.
    """

    train_start: dt.date | None = None
    train_end: dt.date | None = None
    valid_end: dt.date | None = None
    test_end: dt.date | None = None
    train_fraction: float = Field(0.7, gt=0.0, lt=1.0)
    valid_fraction: float = Field(0.15, gt=0.0, lt=1.0)
    purge_days: int | None = Field(None, ge=0, description="default: label horizon + 1")
    valid_days: int | None = Field(None, ge=1, description="rolling splits: trailing valid days")
    test_days: int = Field(0, ge=0, description="rolling: trailing test days; 0 = no test split")
    promotion_days: int = Field(0, ge=0, description="rolling: champion/challenger window days")
    train_days: int | None = Field(None, ge=1, description="rolling: cap on training days")

    @property
    def rolling(self) -> bool:
        """Whether the splits are trailing lengths (`valid_days` set)."""
        return self.valid_days is not None

    @model_validator(mode="after")
    def _rolling_is_one_mode(self) -> SplitSection:
        if not self.rolling:
            trailing = {"test_days": self.test_days, "promotion_days": self.promotion_days}
            trailing["train_days"] = self.train_days
            for name, value in trailing.items():
                if value:
                    raise ValueError(
                        f"features.splits.{name} is a rolling split length: it needs "
                        "features.splits.valid_days"
                    )
            return self
        dated = [
            name
            for name in ("train_start", "train_end", "valid_end", "test_end")
            if getattr(self, name)
        ]
        if dated:
            raise ValueError(
                "features.splits.valid_days (rolling splits) cannot be combined with "
                + ", ".join(f"features.splits.{name}" for name in dated)
            )
        if self.test_days == 0 and self.promotion_days == 0:
            raise ValueError(
                "rolling features.splits need promotion_days or test_days > 0: the registry "
                "compares champion and challenger on a window after validation"
            )
        return self

    @model_validator(mode="after")
    def _splits_leave_room(self) -> SplitSection:
        if self.train_fraction + self.valid_fraction >= 1.0:
            raise ValueError(
                "features.splits.train_fraction + features.splits.valid_fraction must be < 1"
            )
        if self.train_end and self.valid_end and self.valid_end <= self.train_end:
            raise ValueError("features.splits.valid_end must be after features.splits.train_end")
        if self.test_end and (self.valid_end is None or self.test_end <= self.valid_end):
            raise ValueError("features.splits.test_end needs features.splits.valid_end before it")
        if self.train_start and (self.train_end is None or self.train_end <= self.train_start):
            raise ValueError("features.splits.train_start needs features.splits.train_end after it")
        return self
