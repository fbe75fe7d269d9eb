"""Labels: the forward return over the label horizon and its 4 ordered classes (3 = best)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from alphaloom.tasks.common.config import (
    LabelSection,
)
from alphaloom.tasks.data.alpha158 import validate_bars
from alphaloom.tasks.data.rolling import symbol_layout

UNLABELLED = -1


def forward_return(bars: pd.DataFrame, horizon: int) -> np.ndarray:
    """close[t+1+h] / close[t+1] - 1 within each symbol's rows (NaN where unknown), bars' order."""
    layout = symbol_layout(bars["symbol"], bars["date"], pad=1)
    close = bars["close"].to_numpy(np.float64)[layout.order]
    n = len(close)
    i = np.arange(n)
    entry, exit_ = i + 1, i + 1 + horizon
    known = exit_ < n
    known[known] = layout.col[exit_[known]] == layout.col[i[known]]
    sorted_ret = np.full(n, np.nan)
    sorted_ret[known] = close[exit_[known]] / close[entry[known]] - 1.0
    out = np.empty(n)
    out[layout.order] = sorted_ret
    return out


def _quantile_classes(fwd: np.ndarray, dates: pd.Series, edges: tuple[float, ...]) -> np.ndarray:
    """Class of each return by its mid-rank percentile (rank - 0.5) / n among the same day's."""
    day = pd.factorize(dates)[0]
    ret = pd.Series(fwd)
    rank = ret.groupby(day).rank(method="average").to_numpy()
    count = ret.groupby(day).transform("count").to_numpy(np.float64)
    with np.errstate(invalid="ignore"):
        pct = (rank - 0.5) / count
    return np.searchsorted(np.asarray(edges), pct, side="right")


def compute_labels(bars: pd.DataFrame, label: LabelSection) -> pd.DataFrame:
    """`symbol, date, fwd_return` (float32) and `label` (int8, 0..3, -1 where unknown).

    Quantile mode buckets each day's cross-section at `quantile_edges` (default 0.3/0.6/0.9, so
    class 3 is the top decile); threshold mode counts the `thresholds` strictly below the return.
    Rows come back in the order of `bars`.
    """
    validate_bars(bars)
    fwd = forward_return(bars, label.horizon)
    known = ~np.isnan(fwd)
    if label.mode == "quantile":
        classes = _quantile_classes(fwd, bars["date"], label.quantile_edges)
    else:
        classes = np.searchsorted(np.asarray(label.thresholds), fwd, side="left")
    out = pd.DataFrame(
        {
            "symbol": bars["symbol"],
            "date": bars["date"].astype("datetime64[ns]"),
            "fwd_return": fwd.astype(np.float32),
            "label": np.where(known, classes, UNLABELLED).astype(np.int8),
        },
        index=bars.index,
    )
    return out
