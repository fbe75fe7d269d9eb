"""What a score ranks besides expected return: its daily correlation with volatility and size.

A model can look skilful by ranking volatile (or small) stocks first in a market where they
happened to do well; a quant checks this before anything else. From the canonical bars, per
(symbol, date) and known at that day's close:

* `vol20`: standard deviation of the last 20 daily log returns (at least 10),
* `log_dollar_volume`: log of the mean close * volume of the last 20 days (at least 10).

`exposure_metrics` gives the mean daily Spearman correlation of the score with each
(`score_vol_corr`, `score_size_corr`), on the prediction rows that have both.

`neutral.market_exposures` computes, once per market, the wider table of
`neutral.neutral_exposures` (these two plus the 5-day reversal and the point-in-time industry),
so the same frame serves `exposure_metrics` and the factor-neutral Rank IC.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from alphaloom.tasks.evaluation.metrics import daily_ic, normalise_dates, require_columns

WINDOW = 20
MIN_DAYS = 10
EXPOSURES = {"vol20": "score_vol_corr", "log_dollar_volume": "score_size_corr"}


def risk_exposures(bars: pd.DataFrame) -> pd.DataFrame:
    """symbol, date, vol20, log_dollar_volume per bar (NaN until MIN_DAYS of history)."""
    require_columns(bars, ["symbol", "date", "close", "volume"], "bars")
    frame = bars[["symbol", "date", "close", "volume"]].sort_values(["symbol", "date"])
    frame = frame.reset_index(drop=True)
    symbol = frame["symbol"]
    log_close = np.log(frame["close"])
    log_return = log_close - log_close.groupby(symbol, sort=False).shift(1)
    vol = log_return.groupby(symbol, sort=False).rolling(WINDOW, MIN_DAYS).std()
    dollar = (frame["close"] * frame["volume"]).groupby(symbol, sort=False)
    mean_dollar = dollar.rolling(WINDOW, MIN_DAYS).mean()
    return pd.DataFrame(
        {
            "symbol": symbol.astype(str),
            "date": normalise_dates(frame["date"]),
            "vol20": vol.droplevel(0).sort_index(),
            "log_dollar_volume": np.log(mean_dollar.droplevel(0).sort_index().clip(lower=1e-12)),
        }
    )


def exposure_metrics(preds: pd.DataFrame, exposures: pd.DataFrame) -> dict[str, float]:
    """Mean daily Spearman correlation of `score` with each exposure (NaN when undefined)."""
    require_columns(exposures, ["symbol", "date", *EXPOSURES], "exposures")
    left = preds[["symbol", "date", "score"]].assign(
        symbol=lambda f: f["symbol"].astype(str), date=lambda f: normalise_dates(f["date"])
    )
    right = exposures[["symbol", "date", *EXPOSURES]]
    joined = left.merge(right, on=["symbol", "date"], how="inner", validate="one_to_one")
    out = {}
    for column, metric in EXPOSURES.items():
        series = daily_ic(joined, "spearman", score="score", target=column)
        out[metric] = float(series.mean()) if len(series) else float("nan")
    return out
