"""Factor-neutral Rank IC: the score's ranking skill beyond volatility, size, reversal and industry.

A score can earn a good Rank IC by ranking volatile, small or recently fallen stocks first, or one
industry above another; that is a simple factor bet, not a model. Each day the score is regressed
(ordinary least squares) on those exposures and the Rank IC of the residual with the forward
return says what is left.

Exposures per (symbol, date), known at that day's close (`neutral_exposures`): `vol20` and
`log_dollar_volume` from `exposures.risk_exposures`, `reversal5` (the past 5-day return
close[t] / close[t-5] - 1, in the symbol's own bars), and `industry` from the instruments, point
in time when they are dated ("" when unknown, which is one group of its own).

The regression works on cross-sectional percentile ranks, of the score and of the three
continuous exposures, plus an intercept and industry dummies: Rank IC is a rank statistic, and
ranks keep a few extreme volatilities or reversals from dominating the fit, so the residual is
free of each exposure's monotone part rather than of a linear fit driven by outliers.
"""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd

from alphaloom.tasks.data.instruments import canonical, valid_rows
from alphaloom.tasks.evaluation.exposures import risk_exposures
from alphaloom.tasks.evaluation.metrics import (
    daily_ic,
    ic_summary,
    labelled_rows,
    normalise_dates,
    require_columns,
)
from alphaloom.tasks.orchestration.caching import StageRef

REVERSAL_DAYS = 5
FACTORS = ("vol20", "log_dollar_volume", "reversal5")
_EXPLAINED = 1e-10  # residual / total sum of squares below this: the exposures are the score


def neutral_exposures(bars: pd.DataFrame, instruments: pd.DataFrame | None = None) -> pd.DataFrame:
    """symbol, date, vol20, log_dollar_volume, reversal5, industry per bar (NaN until known).

    Reuses `risk_exposures` for volatility and size; the reversal and the industry are added
    here. Without instruments every name is in one industry ("").
    """
    require_columns(bars, ["symbol", "date", "close", "volume"], "bars")
    frame = pd.DataFrame(
        {
            "symbol": bars["symbol"].astype(str).to_numpy(),
            "date": normalise_dates(bars["date"]).to_numpy(),
            "close": bars["close"].to_numpy(dtype=np.float64),
        }
    ).sort_values(["symbol", "date"], kind="stable")
    past = frame.groupby("symbol", sort=False)["close"].shift(REVERSAL_DAYS)
    frame["reversal5"] = frame["close"] / past - 1.0
    out = risk_exposures(bars).merge(
        frame[["symbol", "date", "reversal5"]], on=["symbol", "date"], validate="one_to_one"
    )
    if instruments is None:
        out["industry"] = ""
        return out
    require_columns(instruments, ["symbol", "industry"], "instruments")
    table = canonical(instruments)
    row = valid_rows(table, out["symbol"].to_numpy(), out["date"].to_numpy())
    industry = np.append(table["industry"].astype(str).to_numpy(), "")  # row -1: no valid row
    out["industry"] = industry[row]
    return out


def neutral_daily_rank_ic(preds: pd.DataFrame, exposures: pd.DataFrame) -> pd.Series:
    """Per-day Rank IC of the score's residual after the exposures (index date, name `ic`).

    Rows without a finite score, forward return or any exposure are left out; a day with fewer
    names than the design's columns (intercept, three exposures, one dummy per industry present
    but one) + 2 is skipped, as is a day whose score is constant. A day whose score the
    exposures explain completely (residual numerically zero) counts as 0: nothing is left.
    """
    require_columns(preds, ["symbol", "date", "score", "fwd_return"], "predictions")
    require_columns(exposures, ["symbol", "date", *FACTORS, "industry"], "exposures")
    left = labelled_rows(preds)[["symbol", "date", "score", "fwd_return"]].assign(
        symbol=lambda f: f["symbol"].astype(str), date=lambda f: normalise_dates(f["date"])
    )
    joined = left.merge(
        exposures[["symbol", "date", *FACTORS, "industry"]],
        on=["symbol", "date"],
        how="inner",
        validate="one_to_one",
    )
    joined = joined.dropna(subset=["score", *FACTORS]).sort_values("date", kind="stable")
    joined = joined.reset_index(drop=True)
    residual, explained = _residuals(
        joined["date"].to_numpy(),
        joined[["score", *FACTORS]].to_numpy(dtype=np.float64),
        pd.factorize(joined["industry"].astype(str))[0],
    )
    ic = daily_ic(joined.assign(residual=residual), "spearman", score="residual")
    zeros = pd.Series(0.0, index=pd.Index(explained, name=ic.index.name), name="ic")
    out = pd.concat([ic, zeros]).sort_index() if len(explained) else ic
    out.name = "ic"
    return out.astype(float)


def _residuals(
    dates: np.ndarray, values: np.ndarray, industry: np.ndarray
) -> tuple[np.ndarray, list]:
    """Per day (rows sorted by date), the OLS residual of the score's percentile rank (column 0
    of `values`) on the ranks of the exposures (the other columns) and industry dummies; NaN on
    skipped or explained days. Also the list of explained days."""
    from scipy.stats import rankdata  # scipy is slow to import; only this metric needs it here

    residual = np.full(len(values), np.nan)
    explained = []
    if not len(dates):
        return residual, explained
    bounds = np.r_[np.flatnonzero(np.r_[True, dates[1:] != dates[:-1]]), len(dates)]
    for lo, hi in itertools.pairwise(bounds):
        groups, code = np.unique(industry[lo:hi], return_inverse=True)
        dummies = np.eye(groups.size)[code][:, 1:]  # the intercept stands for the first
        if hi - lo < 1 + (values.shape[1] - 1) + dummies.shape[1] + 2:  # design columns + 2
            continue
        ranks = rankdata(values[lo:hi], axis=0) / (hi - lo)  # pandas' rank(pct=True)
        target = ranks[:, 0]
        design = np.column_stack([np.ones(hi - lo), ranks[:, 1:], dummies])
        fit, *_ = np.linalg.lstsq(design, target, rcond=None)
        resid = target - design @ fit
        total = float(((target - target.mean()) ** 2).sum())
        if total <= 0:  # a constant score has no Rank IC (daily_ic drops such days too)
            continue
        if float((resid**2).sum()) <= _EXPLAINED * total:
            explained.append(dates[lo])
            continue
        residual[lo:hi] = resid
    return residual, explained


def neutral_ic_metrics(preds: pd.DataFrame, exposures: pd.DataFrame) -> dict[str, float]:
    """`rank_ic_neutral` (mean of the daily series) and `rank_icir_neutral` (mean / std)."""
    series = neutral_daily_rank_ic(preds, exposures)
    mean, ir = ic_summary(series)
    return {"rank_ic_neutral": mean, "rank_icir_neutral": ir}


def market_exposures(market: StageRef) -> pd.DataFrame:
    """`neutral_exposures` of an ingested market's canonical bars and instruments (volatility,
    size, reversal, industry): what both `exposure_metrics` and the neutral Rank IC need."""
    from alphaloom.tasks.data.ingest import load_saved_bars

    directory = market.dir
    bars = load_saved_bars(directory)  # verifies every file's checksum, instruments' too
    return neutral_exposures(bars, pd.read_parquet(directory / "instruments.parquet"))
