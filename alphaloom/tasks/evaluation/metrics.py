"""Metrics of a predictions frame: IC family (Qlib's), classification, long-short, oracle."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable

import numpy as np
import pandas as pd

from alphaloom.model.batch import NUM_CLASSES
from alphaloom.tasks.data.labels import forward_return
from alphaloom.tasks.data.synthetic import SyntheticMarket


def oracle_rank_ic(market: SyntheticMarket) -> float:
    """Mean daily Spearman correlation of the oracle with the realised close[t+2]/close[t+1]-1.

    This is the ceiling for any model's Rank IC on this market (the rest is pure noise).
    """
    # Imported here: the evaluation module pulls in torch, which `alphaloom synth` and the
    # generator's tests should not pay for unless they ask for the IC.
    from alphaloom.tasks.evaluation.metrics import daily_ic

    bars = market.bars[["symbol", "date", "close"]].copy()
    bars["fwd"] = forward_return(bars, horizon=1)
    both = bars.merge(market.oracle, on=["symbol", "date"], how="inner")
    return float(daily_ic(both, "spearman", score="expected_return", target="fwd").mean())


PROB_COLUMNS = [f"p{k}" for k in range(NUM_CLASSES)]


PRED_COLUMNS = ["symbol", "date", "score", *PROB_COLUMNS, "label", "fwd_return"]


_MIN_NAMES_PER_DAY = 2


class EvaluationError(ValueError):
    """Predictions or oracle tables are malformed; the message names the column."""


def require_columns(frame: pd.DataFrame, columns: Iterable[str], what: str) -> None:
    """Raise an EvaluationError naming every missing column of `frame` (called `what`)."""
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise EvaluationError(f"{what} lacks column(s) {missing}; has {list(frame.columns)}")


def labelled_rows(preds: pd.DataFrame) -> pd.DataFrame:
    """Rows whose outcome is known (the newest days have no forward return yet)."""
    return preds[np.isfinite(preds["fwd_return"].to_numpy(dtype=float))]


def daily_ic(
    preds: pd.DataFrame,
    method: str = "pearson",
    score: str = "score",
    target: str = "fwd_return",
) -> pd.Series:
    """Per-day cross-sectional correlation of `score` with `target` (Pearson or Spearman).

    Days with fewer than two names or a constant column have no defined correlation and are
    dropped, as Qlib does, rather than counted as zero.
    """
    if method not in ("pearson", "spearman"):
        raise EvaluationError(f"unknown IC method {method!r}; use 'pearson' or 'spearman'")
    require_columns(preds, ["date", score, target], "predictions")
    frame = preds[["date", score, target]].dropna()
    if method == "spearman":
        ranks = frame.groupby("date", sort=True)[[score, target]].rank(method="average")
        frame = frame.assign(**{score: ranks[score], target: ranks[target]})
    return _pearson_by_day(frame, score, target)


def _pearson_by_day(frame: pd.DataFrame, a: str, b: str) -> pd.Series:
    """Vectorised per-day Pearson correlation (a groupby-apply is ~100x slower)."""
    g = frame.groupby("date", sort=True)
    n = g[a].count()
    mean_a = g[a].transform("mean")
    mean_b = g[b].transform("mean")
    da = frame[a] - mean_a
    db = frame[b] - mean_b
    parts = pd.DataFrame({"date": frame["date"], "ab": da * db, "aa": da * da, "bb": db * db})
    sums = parts.groupby("date", sort=True)[["ab", "aa", "bb"]].sum()
    denom = np.sqrt(sums["aa"] * sums["bb"])
    tol = 1e-12 * np.maximum(1.0, np.sqrt(sums["aa"] * sums["bb"]).abs())
    ic = sums["ab"] / denom.where(denom > tol)
    ic = ic[(n >= _MIN_NAMES_PER_DAY) & ic.notna()]
    ic.name = "ic"
    return ic.astype(float)


def ic_summary(ic: pd.Series) -> tuple[float, float]:
    """(mean, mean/std) of a daily IC series; NaN where undefined (fewer than two days)."""
    if len(ic) == 0:
        return math.nan, math.nan
    mean = float(ic.mean())
    std = float(ic.std(ddof=1)) if len(ic) > 1 else math.nan
    ir = mean / std if std and np.isfinite(std) and std > 0 else math.nan
    return mean, ir


def ic_metrics(preds: pd.DataFrame, score: str = "score") -> dict[str, float]:
    """IC, Rank IC, ICIR and Rank ICIR of `score` against the forward return."""
    ic, icir = ic_summary(daily_ic(preds, "pearson", score=score))
    rank_ic, rank_icir = ic_summary(daily_ic(preds, "spearman", score=score))
    return {"ic": ic, "rank_ic": rank_ic, "icir": icir, "rank_icir": rank_icir}


def predicted_class(preds: pd.DataFrame) -> np.ndarray:
    """Arg-max class of the probability columns p0..p3."""
    require_columns(preds, PROB_COLUMNS, "predictions")
    return preds[PROB_COLUMNS].to_numpy(dtype=float).argmax(axis=1)


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """NUM_CLASSES x NUM_CLASSES counts, rows = true class, columns = predicted class."""
    from sklearn import metrics  # scikit-learn is slow to import; only evaluation needs it

    labels = np.asarray(labels, dtype=np.int64)
    predicted = np.asarray(predicted, dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise EvaluationError(f"column 'label' must hold classes 0..{NUM_CLASSES - 1}")
    if not labels.size:  # no labelled row (scikit-learn refuses empty input)
        return np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64)
    return metrics.confusion_matrix(labels, predicted, labels=np.arange(NUM_CLASSES))


def classification_metrics(cm: np.ndarray) -> dict[str, float]:
    """Accuracy, macro-F1 and per-class recall from a confusion matrix (scikit-learn's).

    Macro-F1 averages over the classes that occur in the labels or the predictions (as
    scikit-learn does without `labels=`), so an absent class does not count as F1 = 0; the
    recall of a class absent from the labels is NaN.
    """
    from sklearn import metrics  # scikit-learn is slow to import; only evaluation needs it

    cm = np.asarray(cm)
    classes = np.arange(cm.shape[0])
    # each (true, predicted) pair that occurs, weighted by its count
    true, predicted = np.nonzero(cm)
    weight = cm[true, predicted].astype(float)
    if not weight.sum():
        return {
            "accuracy": math.nan,
            **{f"recall_{k}": math.nan for k in classes},
            "macro_f1": math.nan,
        }
    recall = metrics.recall_score(
        true, predicted, labels=classes, average=None, sample_weight=weight, zero_division=np.nan
    )
    return {
        "accuracy": float(metrics.accuracy_score(true, predicted, sample_weight=weight)),
        **{f"recall_{k}": float(r) for k, r in zip(classes, recall, strict=True)},
        "macro_f1": float(metrics.f1_score(true, predicted, average="macro", sample_weight=weight)),
    }


def long_short_weights(preds: pd.DataFrame, quantile: float) -> pd.DataFrame:
    """Daily target weights: +1/n on the top `quantile` by score, -1/n on the bottom.

    n = max(1, floor(quantile * names that day)); ties break by symbol so the book is
    deterministic. Days with fewer than two names hold nothing.
    """
    require_columns(preds, ["symbol", "date", "score"], "predictions")
    frame = preds[["symbol", "date", "score"]].dropna(subset=["score"])
    frame = frame.sort_values(["date", "score", "symbol"], ascending=[True, False, True])
    g = frame.groupby("date", sort=True)
    size = g["score"].transform("size").to_numpy()
    pos = g.cumcount().to_numpy()
    n = np.maximum(1, np.floor(quantile * size + 1e-9)).astype(int)
    valid = size >= _MIN_NAMES_PER_DAY
    long = valid & (pos < n)
    short = valid & (pos >= size - n) & ~long
    weight = np.where(long, 1.0 / n, 0.0) - np.where(short, 1.0 / n, 0.0)
    out = frame[["date", "symbol"]].assign(weight=weight)
    return out[out["weight"] != 0.0].reset_index(drop=True)


def long_short_returns(preds: pd.DataFrame, quantile: float, cost_bps: float) -> pd.DataFrame:
    """Daily gross return, turnover, cost and net return of the long-short book.

    The book is rebalanced to its targets every day (drift between rebalances is ignored), the
    day-t return is the weighted forward return of day t's book, and turnover is sum |w_t -
    w_{t-1}| over both legs (the first day pays for building the book). Forward returns span
    the label horizon; with the default horizon of 1 day this is the daily P&L.
    """
    require_columns(preds, ["fwd_return"], "predictions")
    known = labelled_rows(preds)
    weights = long_short_weights(known, quantile)
    rets = known[["date", "symbol", "fwd_return"]]
    book = weights.merge(rets, on=["date", "symbol"], how="left", validate="one_to_one")
    gross = (book["weight"] * book["fwd_return"]).groupby(book["date"], sort=True).sum()
    dates = sorted(known["date"].unique())
    wide = weights.pivot(index="date", columns="symbol", values="weight")
    wide = wide.reindex(dates).fillna(0.0)
    turnover = wide.diff().abs().sum(axis=1)
    if len(wide):
        turnover.iloc[0] = wide.iloc[0].abs().sum()
    out = pd.DataFrame({"gross": gross.reindex(dates).fillna(0.0), "turnover": turnover})
    out["cost"] = out["turnover"] * cost_bps / 1e4
    out["net"] = out["gross"] - out["cost"]
    out.index.name = "date"
    return out


def portfolio_metrics(daily: pd.DataFrame, annualization_days: int) -> dict[str, float]:
    """Annualised return, Sharpe, max drawdown (additive) and mean daily turnover of `net`."""
    net = daily["net"]
    if len(net) == 0:
        return {k: math.nan for k in ("ls_ann_return", "ls_sharpe", "max_drawdown", "ls_turnover")}
    mean = float(net.mean())
    std = float(net.std(ddof=1)) if len(net) > 1 else math.nan
    sharpe = mean / std * math.sqrt(annualization_days) if std and std > 0 else math.nan
    wealth = net.cumsum()
    drawdown = float((wealth - wealth.cummax().clip(lower=0.0)).min())
    return {
        "ls_ann_return": mean * annualization_days,
        "ls_sharpe": sharpe,
        "max_drawdown": min(drawdown, 0.0),
        "ls_turnover": float(daily["turnover"].mean()),
    }


def normalise_dates(values: pd.Series) -> pd.Series:
    """Dates as midnight datetime64[ns], so frames from different sources join on them."""
    return pd.to_datetime(values).dt.normalize().astype("datetime64[ns]")


def oracle_metrics(preds: pd.DataFrame, oracle: pd.DataFrame) -> dict[str, float]:
    """IC / Rank IC of the generator's true expected return on the same (symbol, date) rows.

    The ratio model / oracle says how much of the attainable ranking skill the model found.
    """
    require_columns(oracle, ["symbol", "date", "expected_return"], "oracle")
    left = labelled_rows(preds)[["symbol", "date", "fwd_return"]].assign(
        symbol=lambda f: f["symbol"].astype(str), date=lambda f: normalise_dates(f["date"])
    )
    right = oracle[["symbol", "date", "expected_return"]].assign(
        symbol=lambda f: f["symbol"].astype(str), date=lambda f: normalise_dates(f["date"])
    )
    joined = left.merge(right, on=["symbol", "date"], how="inner", validate="one_to_one")
    if joined.empty:
        raise EvaluationError("oracle shares no (symbol, date) rows with the predictions")
    oracle_ic = ic_metrics(joined, score="expected_return")
    return {"oracle_ic": oracle_ic["ic"], "oracle_rank_ic": oracle_ic["rank_ic"]}


def quantile_returns(preds: pd.DataFrame, n_quantiles: int = 5) -> pd.DataFrame:
    """Mean forward return of each daily score quantile (1 = lowest scores), averaged over days.

    Each day's names are split into `n_quantiles` equal groups by score rank (ties by order of
    appearance, as alphalens' quantile buckets by rank); a day with fewer names than quantiles
    is skipped. Returns one row per quantile: quantile, mean_return, days.
    """
    require_columns(preds, ["date", "score", "fwd_return"], "predictions")
    frame = labelled_rows(preds)[["date", "score", "fwd_return"]].dropna(subset=["score"])
    size = frame.groupby("date")["score"].transform("size")
    frame = frame[size >= n_quantiles]
    pct = frame.groupby("date")["score"].rank(method="first", pct=True)
    bucket = np.ceil(pct.to_numpy() * n_quantiles).astype(int).clip(1, n_quantiles)
    daily = frame.assign(quantile=bucket).groupby(["date", "quantile"])["fwd_return"].mean()
    table = daily.groupby(level="quantile").agg(["mean", "size"])
    table = table.reindex(range(1, n_quantiles + 1))
    return pd.DataFrame(
        {
            "quantile": table.index.to_numpy(),
            "mean_return": table["mean"].to_numpy(dtype=float),
            "days": table["size"].fillna(0).to_numpy(dtype=int),
        }
    )


def quantile_metrics(table: pd.DataFrame) -> dict[str, float]:
    """q1_return .. qN_return and qN_minus_q1 (top minus bottom quantile) from the table."""
    pairs = zip(table["quantile"], table["mean_return"], strict=True)
    out = {f"q{int(q)}_return": float(r) for q, r in pairs}
    top, bottom = table["mean_return"].iloc[-1], table["mean_return"].iloc[0]
    out[f"q{len(table)}_minus_q1"] = float(top - bottom)
    return out


def paired_t(differences: Iterable[float]) -> tuple[float, float, int]:
    """Mean of paired differences (e.g. one model's daily Rank IC minus another's on the same
    days), its one-sample t-statistic mean / (std / sqrt(n)) with ddof=1 (scipy's), and n.

    Used by the comparison table, the backtest report and the registry's champion/challenger
    decision, so all report the same statistic. Mean and t are NaN with fewer than two
    differences (or when one is NaN); t is NaN when they are all equal.
    """
    from scipy import stats  # scipy is slow to import; only the paired comparisons need it

    diffs = np.asarray(list(differences), dtype=np.float64)
    n = int(diffs.size)
    if n < 2:
        return math.nan, math.nan, n
    with warnings.catch_warnings():  # nearly equal differences: t is NaN or huge, as before
        warnings.filterwarnings("ignore", "Precision loss occurred", RuntimeWarning)
        t_stat = float(stats.ttest_1samp(diffs, 0.0).statistic)
    # all differences equal: a zero standard error, so t is 0/0 or +-inf; it says nothing
    return float(diffs.mean()), t_stat if math.isfinite(t_stat) else math.nan, n
