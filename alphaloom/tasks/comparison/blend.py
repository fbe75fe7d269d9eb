"""Gradient-boosted trees on top of the network: a rank blend fitted on the validation split.

The two models see the data differently (the network a 30-day window with embeddings, LightGBM
the end day's factors), so their errors are partly independent and a blend can rank better than
either. The blend is the simplest stacking that cannot leak: each day's scores of both models
become centred percentile ranks, and the score is w * network + (1 - w) * LightGBM with the one
weight w in {0, 0.1, ..., 1} that maximises the validation Rank IC. The test split is never
seen until it is scored. w = 1 or 0 means the blend found nothing to add to that model.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from alphaloom.tasks.evaluation.metrics import ic_metrics

WEIGHTS = tuple(round(w, 1) for w in np.linspace(0.0, 1.0, 11))
KEYS = ["symbol", "date"]


def day_ranks(preds: pd.DataFrame) -> pd.Series:
    """Each score's centred percentile rank within its day (ties averaged)."""
    days = preds.groupby("date")["score"]
    return (days.rank(method="average") - 0.5) / days.transform("size") - 0.5


def blended(network: pd.DataFrame, lightgbm: pd.DataFrame, weight: float) -> pd.DataFrame:
    """The network's prediction frame with score = w * its day rank + (1 - w) * LightGBM's.

    Rows are matched on (symbol, date); both models score the same windows (the LightGBM
    baseline reads the end day of every window the evaluation loader yields), so a missing
    row is an error.
    """
    other = lightgbm[KEYS].assign(other=day_ranks(lightgbm).to_numpy())
    joined = network.merge(other, on=KEYS, how="left", validate="one_to_one")
    if joined["other"].isna().any():
        missing = joined.loc[joined["other"].isna(), KEYS].head(3).to_dict("records")
        raise ValueError(f"LightGBM did not score every window the network scored: {missing}")
    score = weight * day_ranks(joined) + (1.0 - weight) * joined["other"]
    return joined.drop(columns="other").assign(score=score.to_numpy())


def choose_weight(network: pd.DataFrame, lightgbm: pd.DataFrame) -> tuple[float, float]:
    """(w, validation Rank IC at w): the grid weight with the best Rank IC on these frames."""
    scores = [(ic_metrics(blended(network, lightgbm, w))["rank_ic"], w) for w in WEIGHTS]
    best_ic, best_w = max(scores, key=lambda pair: (np.nan_to_num(pair[0], nan=-np.inf), pair[1]))
    return best_w, float(best_ic)
