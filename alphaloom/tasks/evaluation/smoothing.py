"""Score smoothing across days: an EMA of each symbol's daily score rank, to cut turnover.

A daily score is noisy; a book built from it trades whatever the noise reshuffles. Averaging a
symbol's recent scores keeps the persistent part of the signal and damps the day-to-day noise,
at the price of reacting later.

What is averaged is the daily cross-sectional percentile rank (rank / names scored that day, in
(0, 1]), not the raw score and not a z-score: the model's score has no fixed scale across days
(its level and spread drift with the market and between retrains), a rank is bounded so one
outlier day cannot dominate the average, and everything downstream (Rank IC, the top-k books)
uses only the order; seed ensembles average per-day ranks too. The smoothed score is therefore
a rank average in (0, 1], not in the model's units.

The EMA (pandas' `ewm(halflife=h, adjust=True, ignore_na=False)`) is causal: the value on day t
uses days <= t only. Weight of a rank d market days old is 0.5 ** (d / h), normalised over the
days the symbol has a rank. Market days are the dates of the frame. A symbol missing a day
(no row, or a NaN score) adds nothing that day but time still passes: its older ranks keep
decaying by the days elapsed, so after a gap its first new rank weighs more; its row on that day,
if any, keeps a NaN score. The EMA starts with the frame's first day: smooth a frame that begins
early enough (e.g. validation and test together) for the first days to have history.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from alphaloom.tasks.evaluation.metrics import EvaluationError, require_columns


def smooth_scores(preds: pd.DataFrame, half_life: float | None) -> pd.DataFrame:
    """`preds` with `score` replaced by the EMA of its daily percentile rank per symbol.

    `half_life` in market days; 0 or None returns `preds` itself, unsmoothed (not even ranked),
    so turning smoothing off changes nothing.
    """
    if not half_life:
        return preds
    if half_life < 0 or not np.isfinite(half_life):
        raise EvaluationError(f"half_life must be >= 0 days, got {half_life}")
    require_columns(preds, ["symbol", "date", "score"], "predictions")
    if preds.duplicated(["symbol", "date"]).any():
        raise EvaluationError("predictions repeat a (symbol, date) row")
    rank = preds.groupby("date", sort=False)["score"].rank(pct=True).to_numpy(dtype=np.float64)
    day, dates = pd.factorize(preds["date"], sort=True)
    name, symbols = pd.factorize(preds["symbol"], sort=True)
    wide = np.full((len(dates), len(symbols)), np.nan)
    wide[day, name] = rank
    ema = pd.DataFrame(wide).ewm(halflife=half_life, adjust=True, ignore_na=False).mean()
    smoothed = ema.to_numpy()[day, name]
    return preds.assign(score=np.where(np.isfinite(rank), smoothed, np.nan))
