"""Walk-forward periods: which days each retrain trains, validates and scores on.

Period p scores the `retrain_months` from its start out of sample. It is trained on what comes
before: its validation span (early stopping) is the `valid_months` before the start, its
training span everything before that ("expanding") or only the last `train_months`
("rolling"). The spans are separated by the pipeline's purge gap (`horizon + 1` trading days by
default), so no training or validation label reads a day of the period it is used to score.

A period is handed to the pipeline's own data stages as explicit split dates
(`features.splits.train_start/train_end/valid_end/test_end`): the features stage then fits its
normalisation on that period's training days only, and the shards stage writes that period's
split codes, each cached on its own key.
"""

from __future__ import annotations

import datetime as dt
import logging

import pandas as pd
from pydantic import BaseModel

from alphaloom.tasks.common.config import PipelineConfig, config_from_dict
from alphaloom.tasks.data.splits import resolve_purge_days
from alphaloom.tasks.orchestration.caching import StageRef

log = logging.getLogger(__name__)


class BacktestError(ValueError):
    """The backtest cannot be planned on this data; the message names the settings."""


class Period(BaseModel):
    """One retrain: its trading-day spans (inclusive first and last days)."""

    number: int  # 1-based
    train_start: dt.date
    train_end: dt.date
    valid_start: dt.date
    valid_end: dt.date
    test_start: dt.date
    test_end: dt.date

    @property
    def label(self) -> str:
        return f"{self.test_start:%Y-%m-%d}..{self.test_end:%Y-%m-%d}"


def trading_calendar(market: StageRef) -> pd.DatetimeIndex:
    """The sorted trading days of a saved market (its bars' dates only are read)."""
    dates = pd.read_parquet(str(market.file("bars.parquet")), columns=["date"])["date"]
    return pd.DatetimeIndex(sorted(pd.to_datetime(dates).unique()))


def _months(day: pd.Timestamp, months: int) -> pd.Timestamp:
    return day + pd.DateOffset(months=months)


def _first_on_or_after(calendar: pd.DatetimeIndex, day: pd.Timestamp) -> int:
    return int(calendar.searchsorted(day, side="left"))


def _last_on_or_before(calendar: pd.DatetimeIndex, day: pd.Timestamp) -> int:
    return int(calendar.searchsorted(day, side="right")) - 1


def plan_periods(calendar: pd.DatetimeIndex, cfg: PipelineConfig) -> list[Period]:
    """The walk-forward periods of `calendar` under `cfg.backtest` (see the module docstring).

    The last period ends at `backtest.end` or at the last day with a known forward return; a
    last period shorter than `min_test_days` trading days joins the previous one (its model
    scores them: no retrain for a few days), or with `short_last_period: drop` is dropped.
    """
    bt, horizon = cfg.backtest, cfg.features.label.horizon
    purge = resolve_purge_days(cfg.features.splits, horizon)
    last_known = len(calendar) - 2 - horizon  # close[t + 1 + horizon] must exist
    if last_known < 0:
        raise BacktestError(f"{len(calendar)} trading days leave no day with a known return")
    end = calendar[last_known]
    if bt.end is not None:
        end = min(end, pd.Timestamp(bt.end))
    start = pd.Timestamp(bt.start) if bt.start else None
    if start is None:
        start = _months(calendar[0], bt.train_months + bt.valid_months)
    periods: list[Period] = []
    while start <= end:
        stop = _months(start, bt.retrain_months) - pd.Timedelta(days=1)
        test_first = _first_on_or_after(calendar, start)
        test_last = _last_on_or_before(calendar, min(stop, end))
        if test_last - test_first + 1 < bt.min_test_days:
            if periods and bt.short_last_period == "join":
                days = test_last - test_first + 1
                log.info("backtest: the last %d days from %s join period %d (min_test_days %d)",
                         days, f"{start:%F}", len(periods), bt.min_test_days)  # fmt: skip
                periods[-1] = periods[-1].model_copy(
                    update={"test_end": calendar[test_last].date()}
                )
            else:
                log.info("backtest: the last period from %s is too short; dropped", f"{start:%F}")
            break
        valid_first = _first_on_or_after(calendar, _months(start, -bt.valid_months))
        valid_last = test_first - purge - 1
        train_last = valid_first - purge - 1
        train_first = 0
        if bt.window == "rolling":
            months = bt.valid_months + bt.train_months
            train_first = _first_on_or_after(calendar, _months(start, -months))
        if train_first > train_last or valid_first > valid_last:
            raise BacktestError(
                f"backtest period {len(periods) + 1} from {start:%Y-%m-%d}: no training or "
                f"validation days before it (data from {calendar[0]:%Y-%m-%d}, "
                f"backtest.start={bt.start}, train_months={bt.train_months}, "
                f"valid_months={bt.valid_months}, purge {purge} days)"
            )
        periods.append(
            Period(
                number=len(periods) + 1,
                train_start=calendar[train_first].date(),
                train_end=calendar[train_last].date(),
                valid_start=calendar[valid_first].date(),
                valid_end=calendar[valid_last].date(),
                test_start=calendar[test_first].date(),
                test_end=calendar[test_last].date(),
            )
        )
        start = stop + pd.Timedelta(days=1)
    if not periods:
        raise BacktestError(
            f"backtest: no period to score between {start:%Y-%m-%d} and {end:%Y-%m-%d} "
            f"(backtest.start={bt.start}, backtest.end={bt.end}, min_test_days={bt.min_test_days})"
        )
    return periods


def period_config(cfg: PipelineConfig, period: Period) -> PipelineConfig:
    """The pipeline config of one period: its split dates (train_start only when rolling)."""
    splits = {
        "train_start": period.train_start if cfg.backtest.window == "rolling" else None,
        "train_end": period.train_end,
        "valid_end": period.valid_end,
        "test_end": period.test_end,
    }
    raw = cfg.model_dump(mode="json")
    raw["features"]["splits"].update({k: v and v.isoformat() for k, v in splits.items()})
    return config_from_dict(raw, source=f"backtest period {period.number}")
