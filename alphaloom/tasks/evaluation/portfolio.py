"""A TopkDropout strategy (Qlib's) on a predictions frame: what of the signal survives trading.

The decile long-short book of `metrics.long_short_returns` is rebuilt from scratch every day, so
its turnover (and cost) is as large as the score is noisy. Qlib's TopkDropoutStrategy holds `topk`
names and replaces at most `n_drop` of them a day, trading a little ranking quality for much less
turnover. Two books:

* long-only: the held names, judged by their excess return over the equal-weighted universe of
  the day (the names the strategy could choose from), as Qlib judges it against a benchmark;
* long-short: the top book long and a bottom book (the same rule on the negated score) short.

The rule of one day (Qlib's `generate_trade_decision` with `method_sell="bottom"`,
`method_buy="top"`): `last` = the held names; `today` = the best-ranked
`n_drop + topk - len(last)` names not held; of `last` and `today` together, the `n_drop` worst
ranked are the sell candidates and the held ones among them are sold (so a held name is sold only
when enough better-ranked names wait outside); then the best `len(sold) + topk - len(last)` of
`today` are bought. With `n_drop >= topk` this is a full daily rebalance into the top k.

Where this deviates from Qlib, and why:

* equal weights 1/k within a leg every day, fully invested (Qlib: survivors drift with their
  prices, new names share 95 % of the cash); the implicit re-weighting of survivors is not
  charged, as `long_short_returns` ignores drift;
* a name is eligible on a day when it has a finite score and a finite forward return there (the
  rows `long_short_returns` uses). A held name that is not eligible (no score, or no known return:
  no bar on t+1 or t+2) ranks below every eligible name, so the rule sells it first within
  `n_drop`; if more such names are held than `n_drop`, the rest leave too (a name with no known
  return cannot be valued; Qlib would keep an untradable name at its last price);
* days with fewer than two eligible names (the unlabelled newest days) are skipped: no row, and
  the holdings carry over unchanged to the next day;
* ties in score break by symbol (Qlib's sort is not stable), so the books are deterministic;
* `hold_thresh` (minimum holding days, 1 in Qlib's default) is not modelled: every name can be
  sold the day after it is bought, as with Qlib's default;
* with fewer than 2 * topk eligible names the two legs can hold one name both ways; its weights
  net out in the long-short book.

Returns and costs follow `metrics.long_short_returns`: the day-t return is the weighted forward
return of the book chosen from day t's scores; turnover is sum |w_t - w_{t-1}| (both sides, the
first day pays for building the book) and cost = turnover * cost_bps / 1e4, bp per side of
traded weight. Risk figures use Qlib's additive ("sum") convention via `metrics.portfolio_metrics`.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from alphaloom.tasks.evaluation.metrics import (
    EvaluationError,
    portfolio_metrics,
    require_columns,
)

_MIN_NAMES_PER_DAY = 2

DAILY_COLUMNS = (
    "long_return",
    "benchmark",
    "excess_gross",
    "excess_net",
    "long_turnover",
    "ls_gross",
    "ls_net",
    "ls_turnover",
)


def topk_dropout_holdings(scores: np.ndarray, topk: int, n_drop: int) -> np.ndarray:
    """Held names per day (T x N booleans) of the TopkDropout rule on a T x N score matrix.

    NaN marks a name that is not eligible that day (see the module docstring); columns are in
    symbol order, which breaks ties. One numpy step per day: the state (what is held) is serial.
    """
    _check_book(topk, n_drop)
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2:
        raise EvaluationError(f"scores must be a days x names matrix, got shape {scores.shape}")
    n_days, n_names = scores.shape
    eligible = np.isfinite(scores)
    # best first, ties by column, ineligible names last (they rank below every eligible one)
    order = np.argsort(np.where(eligible, -scores, np.inf), axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.broadcast_to(np.arange(n_names), order.shape), axis=1)
    held = np.zeros(n_names, dtype=bool)
    out = np.zeros((n_days, n_names), dtype=bool)
    for t in range(n_days):
        ranked = order[t]
        candidates = ranked[eligible[t, ranked] & ~held[ranked]]  # not held, best first
        last = np.flatnonzero(held)
        today = candidates[: max(n_drop + topk - last.size, 0)]
        sell = _dropped(rank[t, last], rank[t, today], n_drop, last)
        sell = np.union1d(sell, last[~eligible[t, last]])  # no return: cannot stay in the book
        buy = candidates[: max(sell.size + topk - last.size, 0)]
        held[sell] = False
        held[buy] = True
        out[t] = held
    return out


def _dropped(last_rank: np.ndarray, today_rank: np.ndarray, n_drop: int, last: np.ndarray):
    """The held names among the `n_drop` worst ranked of held + today's candidates."""
    if n_drop == 0 or last.size == 0:
        return last[:0]
    comb = np.concatenate([last_rank, today_rank])
    if comb.size <= n_drop:
        return last
    cutoff = np.partition(comb, comb.size - n_drop)[comb.size - n_drop]
    return last[last_rank >= cutoff]


def topk_dropout_returns(
    preds: pd.DataFrame, topk: int, n_drop: int, cost_bps: float
) -> pd.DataFrame:
    """Daily frame (index `date`) of both books: the long book's raw return, the benchmark
    (equal-weighted eligible universe), its excess gross / net of costs and turnover, and the
    long-short book's gross, net and turnover (columns `DAILY_COLUMNS`)."""
    require_columns(preds, ["symbol", "date", "score", "fwd_return"], "predictions")
    if cost_bps < 0:
        raise EvaluationError(f"cost_bps must be >= 0, got {cost_bps}")
    _check_book(topk, n_drop)
    dates, score, ret = _wide(preds)
    long_w = _equal_weights(topk_dropout_holdings(score, topk, n_drop))
    short_w = _equal_weights(topk_dropout_holdings(-score, topk, n_drop))
    known = np.nan_to_num(ret, nan=0.0)  # held names always have a return (module docstring)
    rate = cost_bps / 1e4
    long_return = (long_w * known).sum(axis=1)
    benchmark = np.nanmean(ret, axis=1) if len(dates) else np.zeros(0)
    long_turnover = _turnover(long_w)
    ls_w = long_w - short_w
    ls_gross = (ls_w * known).sum(axis=1)
    ls_turnover = _turnover(ls_w)
    excess = long_return - benchmark
    out = pd.DataFrame(
        {
            "long_return": long_return,
            "benchmark": benchmark,
            "excess_gross": excess,
            "excess_net": excess - long_turnover * rate,
            "long_turnover": long_turnover,
            "ls_gross": ls_gross,
            "ls_net": ls_gross - ls_turnover * rate,
            "ls_turnover": ls_turnover,
        },
        index=pd.Index(dates, name="date"),
    )
    return out


def topk_dropout_metrics(daily: pd.DataFrame, annualization_days: int) -> dict[str, float]:
    """Annualised return, volatility, information ratio (long book's excess) or Sharpe
    (long-short), additive max drawdown, gross and net of costs, and mean daily turnover.

    Keys: `topk_excess_{ann_return,vol,ir,max_drawdown}_{gross,net}`, `topk_excess_turnover`,
    `topk_ls_{ann_return,vol,sharpe,max_drawdown}_{gross,net}`, `topk_ls_turnover`.
    """
    require_columns(daily, DAILY_COLUMNS, "daily strategy returns")
    out: dict[str, float] = {}
    books = (
        ("topk_excess", "excess", "ir", "long_turnover"),
        ("topk_ls", "ls", "sharpe", "ls_turnover"),
    )
    for name, column, ratio, turnover in books:
        for kind in ("gross", "net"):
            series = daily[f"{column}_{kind}"]
            summary = portfolio_metrics(
                pd.DataFrame({"net": series, "turnover": daily[turnover]}), annualization_days
            )
            std = float(series.std(ddof=1)) if len(series) > 1 else math.nan
            out[f"{name}_ann_return_{kind}"] = summary["ls_ann_return"]
            out[f"{name}_vol_{kind}"] = std * math.sqrt(annualization_days)
            out[f"{name}_{ratio}_{kind}"] = summary["ls_sharpe"]
            out[f"{name}_max_drawdown_{kind}"] = summary["max_drawdown"]
        out[f"{name}_turnover"] = summary["ls_turnover"]
    return out


def topk_dropout(
    preds: pd.DataFrame, topk: int, n_drop: int, cost_bps: float, annualization_days: int
) -> tuple[pd.DataFrame, dict[str, float]]:
    """(`topk_dropout_returns`, `topk_dropout_metrics`) of one predictions frame."""
    daily = topk_dropout_returns(preds, topk, n_drop, cost_bps)
    return daily, topk_dropout_metrics(daily, annualization_days)


def _check_book(topk: int, n_drop: int) -> None:
    """Reject a book that cannot hold anything or a negative dropout."""
    if int(topk) != topk or topk < 1:
        raise EvaluationError(f"topk must be a whole number >= 1, got {topk}")
    if int(n_drop) != n_drop or n_drop < 0:
        raise EvaluationError(f"n_drop must be a whole number >= 0, got {n_drop}")


def _wide(preds: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dates, score, fwd_return) as days x symbols matrices of the eligible rows, NaN elsewhere;
    days with fewer than two eligible names are left out. Symbols sorted, so ties break by name."""
    score = preds["score"].to_numpy(dtype=np.float64)
    fwd = preds["fwd_return"].to_numpy(dtype=np.float64)
    frame = preds.loc[np.isfinite(score) & np.isfinite(fwd), ["symbol", "date"]]
    if frame.duplicated().any():
        raise EvaluationError("predictions repeat a (symbol, date) row")
    keep = frame["date"].map(frame["date"].value_counts()).to_numpy() >= _MIN_NAMES_PER_DAY
    rows = np.flatnonzero(np.isfinite(score) & np.isfinite(fwd))[keep]
    day_code, dates = pd.factorize(preds["date"].to_numpy()[rows], sort=True)
    sym_code, symbols = pd.factorize(preds["symbol"].astype(str).to_numpy()[rows], sort=True)
    shape = (len(dates), len(symbols))
    wide_score = np.full(shape, np.nan)
    wide_ret = np.full(shape, np.nan)
    wide_score[day_code, sym_code] = score[rows]
    wide_ret[day_code, sym_code] = fwd[rows]
    return np.asarray(dates), wide_score, wide_ret


def _equal_weights(held: np.ndarray) -> np.ndarray:
    """1 / (names held that day) on each held name."""
    count = held.sum(axis=1, keepdims=True)
    return np.divide(held, count, out=np.zeros(held.shape), where=count > 0)


def _turnover(weights: np.ndarray) -> np.ndarray:
    """sum |w_t - w_{t-1}| per day; the first day trades from an empty book."""
    return np.abs(np.diff(weights, axis=0, prepend=np.zeros((1, weights.shape[1])))).sum(axis=1)
