"""Labels: the forward return over the label horizon and its 4 ordered classes (3 = best).

Calendar-true: the return of day t is close[t+1+h] / close[t+1] - 1 where t+1 and t+1+h are
positions on the market's trading calendar (tasks/data/trading_calendar.py), not the symbol's
next rows.
When the symbol has no bar on the entry or the exit day (a halt, a gap, a delisting), the return
is unknown (NaN, label -1) instead of stretched over the gap; missing bars strictly between entry
and exit do not matter (the position was held through them). So no label reads a price later
than calendar day t+1+h, which is what the purge gap between splits relies on.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from alphaloom.tasks.common.config import LabelSection
from alphaloom.tasks.data.alpha158 import validate_bars
from alphaloom.tasks.data.trading_calendar import calendar_positions, trading_calendar

UNLABELLED = -1


def forward_return(
    bars: pd.DataFrame, horizon: int, calendar: np.ndarray | None = None
) -> np.ndarray:
    """close[t+1+h] / close[t+1] - 1 on the trading calendar (NaN where a bar is missing or the
    calendar ends), in bars' order. `calendar` defaults to the union of bars' dates."""
    cal = trading_calendar(bars["date"]) if calendar is None else calendar
    position = calendar_positions(bars["date"], cal)
    codes = pd.factorize(bars["symbol"])[0].astype(np.int64)
    stride = len(cal) + horizon + 2  # wider than any position: keys of symbols never overlap
    key = codes * stride + position
    order = np.argsort(key, kind="stable")
    sorted_key = key[order]
    close = bars["close"].to_numpy(np.float64)

    def close_at(target: np.ndarray) -> np.ndarray:
        at = np.clip(np.searchsorted(sorted_key, target), 0, len(key) - 1)
        return np.where(sorted_key[at] == target, close[order[at]], np.nan)

    entry, exit_ = close_at(key + 1), close_at(key + 1 + horizon)
    return exit_ / entry - 1.0


def _quantile_classes(fwd: np.ndarray, dates: pd.Series, edges: tuple[float, ...]) -> np.ndarray:
    """Class of each return by its mid-rank percentile (rank - 0.5) / n among the same day's."""
    day = pd.factorize(dates)[0]
    ret = pd.Series(fwd)
    rank = ret.groupby(day).rank(method="average").to_numpy()
    count = ret.groupby(day).transform("count").to_numpy(np.float64)
    with np.errstate(invalid="ignore"):
        pct = (rank - 0.5) / count
    return np.searchsorted(np.asarray(edges), pct, side="right")


def compute_labels(
    bars: pd.DataFrame, label: LabelSection, calendar: np.ndarray | None = None
) -> pd.DataFrame:
    """`symbol, date, fwd_return` (float32) and `label` (int8, 0..3, -1 where unknown).

    Quantile mode buckets each day's cross-section at `quantile_edges` (default 0.3/0.6/0.9, so
    class 3 is the top decile); threshold mode counts the `thresholds` strictly below the return.
    Rows come back in the order of `bars`.
    """
    validate_bars(bars)
    fwd = forward_return(bars, label.horizon, calendar)
    known = ~np.isnan(fwd)
    if label.mode == "quantile":
        classes = _quantile_classes(fwd, bars["date"], label.quantile_edges)
    else:
        classes = np.searchsorted(np.asarray(label.thresholds), fwd, side="left")
    return pd.DataFrame(
        {
            "symbol": bars["symbol"],
            "date": bars["date"].astype("datetime64[ns]"),
            "fwd_return": fwd.astype(np.float32),
            "label": np.where(known, classes, UNLABELLED).astype(np.int8),
        },
        index=bars.index,
    )
